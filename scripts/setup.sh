#!/usr/bin/env bash
# Create .venv and install scratchgpt with everything it needs, pinned by requirements/constraints.txt.
#
#   bash scripts/setup.sh                 # CPU (the torch 2.13.0 CPU wheel)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh   # CUDA build of torch 2.13.0
#
# The book's package `llms-from-scratch` is a test-only reference; it is installed with --no-deps because
# its metadata pulls TensorFlow and JupyterLab, which nothing here needs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate
      break
    fi
  done
fi
[ -n "$python" ] || { echo "setup.sh: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

echo "setup.sh: creating .venv with $($python --version)"
"$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  echo "setup.sh: installing torch==2.13.0 from $TORCH_INDEX_URL"
  "${pip[@]}" install --quiet torch==2.13.0 --index-url "$TORCH_INDEX_URL"
fi
echo "setup.sh: installing scratchgpt[test] (pinned by requirements/constraints.txt)"
"${pip[@]}" install --quiet -c requirements/constraints.txt -e '.[test]'
"${pip[@]}" install --quiet -c requirements/constraints.txt --no-deps llms-from-scratch
.venv/bin/python -c 'import torch, scratchgpt; print(f"setup.sh: ready: torch {torch.__version__}, scratchgpt {scratchgpt.__version__}")'
