#!/usr/bin/env bash
# Creates .venv and installs the appliance, CPU only.
#   ./install.sh                      the appliance and everything the tests need
#   EXTRAS=test,gguf ./install.sh     also the llama.cpp backend (a ~4 minute source build)
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS="${EXTRAS:-test}"

python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# The CPU torch wheel first, pinned: an open torch requirement pulls a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
if [[ ",${EXTRAS}," == *",gguf,"* ]]; then
    # Not -march=native: on AMX CPUs the native build segfaults on quantized models. pip's
    # wheel cache ignores CMAKE_ARGS, hence --no-cache-dir.
    CMAKE_ARGS="-DGGML_NATIVE=OFF" "${pip[@]}" --no-cache-dir -c constraints.txt \
        "llama-cpp-python==0.3.36"
fi
"${pip[@]}" -c constraints.txt -e ".[${EXTRAS}]"
echo "installed: $(.venv/bin/appliance --version)"
