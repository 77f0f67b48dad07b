#!/usr/bin/env bash
# Set up instanas on a fresh Debian/Ubuntu machine: the Fashion-MNIST package, a virtual
# environment with the pinned CPU build of torch, and the package itself (editable).
# Usage: bash scripts/setup.sh [--test]    (--test also installs the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing the Fashion-MNIST data set (Debian package dataset-fashion-mnist)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)"
  .venv/bin/pip install -q torch==2.13.0
fi
echo "setup: installing instanas${extras}"
.venv/bin/pip install -q -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import instanas, torch; print('setup: instanas', instanas.__version__, 'torch', torch.__version__)"
