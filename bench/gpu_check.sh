#!/usr/bin/env bash
# A GPU session's one device call (bench/RESULTS.md, "The GPU check"):
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Installs the carried wheels (bench/gpu_wheels.txt) beside the image's packages, puts this
# checkout's neoxlab first on the path (no install: the machine has no index to build from),
# and runs every check and measurement into $OUT; arguments go to bench/gpu_check.py
# (`bash bench/gpu_check.sh --only compile-cuda-graphs --budget 200` reruns one item).
set -eu
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
exec python3 bench/gpu_check.py --out "${OUT:?the device tool sets OUT}" "$@"
