#!/usr/bin/env bash
# Creates .venv and installs the appliance with its test tools, CPU only.
# Usage: ./install.sh            (extras: EXTRAS=test,train ./install.sh)
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS="${EXTRAS:-test}"

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU torch wheel first, pinned: an open torch requirement pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${EXTRAS}]"
echo "installed: $(.venv/bin/appliance --version)"
