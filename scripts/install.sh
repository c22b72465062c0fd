#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the pinned stack (constraints.txt): the model, the
# LLaMA-Factory patches and the extras given (default: train,eval,test,lmms, what scripts/test.sh needs;
# scripts/demo.sh asks for train,eval). Safe to rerun.
#
#   bash scripts/install.sh [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade "pip<26.2"
fi
EXTRAS=${1:-train,eval,test,lmms}
case "$EXTRAS" in *[!a-z,]*) echo "install.sh: extras are comma-separated names, got '$EXTRAS'" >&2; exit 2 ;; esac
echo "Installing the project with [$EXTRAS] into .venv (pinned by constraints.txt)"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
