#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the pinned stack (constraints.txt): the model, the
# LLaMA-Factory patches, evaluation and test extras. Used by scripts/test.sh and scripts/demo.sh; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade "pip<26.2"
fi
echo "Installing the project into .venv (pinned by constraints.txt)"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[train,eval,test]"
