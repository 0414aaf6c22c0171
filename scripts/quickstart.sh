#!/usr/bin/env bash
# Set up the virtual environment (if missing) and run the main job or the test suite.
#   bash scripts/quickstart.sh demo   # state-tracking demo on CPU (a few minutes)
#   bash scripts/quickstart.sh test   # the test suite (CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DPJAX_VENV:-.venv}"

find_python() {
  # JAX >= 0.11 needs Python >= 3.12; these machines keep 3.12 under pyenv.
  local candidates=()
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || true)")
  fi
  candidates+=("$(command -v python3.12 2>/dev/null || true)" "$(command -v python3 2>/dev/null || true)")
  for py in "${candidates[@]}"; do
    if [ -n "$py" ] && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  echo "error: no Python >= 3.12 found (tried pyenv 3.12.1, python3.12, python3)" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import dpjax, pytest, xdist' 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
fi

case "${1:-}" in
  demo)
    shift
    exec "$VENV/bin/python" experiments/demo.py "$@"
    ;;
  test)
    shift
    # pytest exits non-zero on any failure and with 5 when no test ran; both fail this script.
    exec "$VENV/bin/python" -m pytest -n 2 -q "$@"
    ;;
  *)
    echo "usage: bash scripts/quickstart.sh demo|test [extra args]" >&2
    exit 2
    ;;
esac
