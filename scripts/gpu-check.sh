#!/usr/bin/env bash
# Run what only a CUDA host can show: the gpu-marked tests, the whole suite with the hbm tier
# on the GPU, and the hot-GET benchmark with the HBM arena in device memory.
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# Uses the host's python3 and its torch (a CUDA build); kvgate's other requirements must be
# importable (pip install -e .[dev], or wheels on PYTHONPATH). Logs and results go to OUT_DIR.
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - <<'EOF' | tee "$out/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
nproc | sed 's/^/cpus /' | tee -a "$out/env.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run one step under a time limit, log it, keep going
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$out/steps.txt"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$out/$name.log"
    echo "== $name: exit $rc" | tee -a "$out/steps.txt"
    [ "$rc" -eq 0 ] || status=1
}

step gpu-tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests
step suite 420 python3 -m pytest -q -p no:cacheprovider -rfs tests
if [ "${GPU_CHECK_BENCH:-1}" = 1 ]; then
    step hot-get 300 python3 -m loadtest.run hot-get --target kvgate --target kvgate-shm \
        --target dict --rounds 2 --duration 4 --no-plots --quiet --out "$out/hot-get"
fi
exit $status
