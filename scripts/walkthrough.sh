#!/usr/bin/env bash
# The whole method (SL-CAI → SFT → AI labels → DPO and a reward model → evals, 2 rounds) is one recipe;
# rerunning continues where it stopped. See docs/recipes.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/factory run recipes/cai.yaml "$@"
