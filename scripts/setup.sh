#!/usr/bin/env bash
# Installs mla-gen for development and tests: `scripts/setup.sh && python -m pytest -q`.
#
# torch is installed only when none imports: on a GPU machine the CUDA build already there is kept;
# elsewhere torch==2.13.0 is the CPU build that pip finds on this kind of machine, installed before
# the project so nothing pulls a multi-GB CUDA build. The compiler half (generator/) needs no torch.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
  echo "setup: keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')" >&2
else
  echo "setup: installing torch==2.13.0" >&2
  "$PYTHON" -m pip install --quiet torch==2.13.0
fi

"$PYTHON" -m pip install --quiet -e '.[test]'
echo "setup: done ($("$PYTHON" -c 'import generator; print("mla-gen", generator.__version__)'))" >&2
