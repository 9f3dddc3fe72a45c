#!/usr/bin/env bash
# The GPU check, run on a CUDA machine from the repository:
#   on a connected machine, once:  bash bench/gpu/build_wheels.sh   (~19 MiB into .whl/, git-ignored)
#   on the GPU machine (with .whl/ copied along):  bash bench/gpu/run.sh   (results under $OUT, default /tmp/gpu_check_out)
# Installs the wheels of .whl/ into /tmp/site (no index, no deps), puts them and the repo root on PYTHONPATH (the
# working tree is copied there, not installed) and runs bench/gpu/check.py (overall budget 420 s) writing
# $OUT/gpu_check.json, $OUT/gpu_check.log and $OUT/fit.log. Extra arguments go to check.py (e.g. --only bench).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; echo "wheel install failed (bash bench/gpu/build_wheels.sh here, carry .whl)"; exit 3; }
echo "wheels installed in $(( $(date +%s) - t0 )) s"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
# the hard stop stays inside the device call's 480 s, so what check.py wrote still comes back
timeout -k 10 "${GPU_CHECK_TIMEOUT:-455}" python3 bench/gpu/check.py --out "$OUT" "$@"
rc=$?
echo "check.py exit status $rc after $(( $(date +%s) - t0 )) s"
exit $rc
