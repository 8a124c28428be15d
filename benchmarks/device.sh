#!/usr/bin/env bash
# The GPU figures (evaluation speed, condense speed, paper-scale accuracy) in ONE call of a lent GPU
# machine, whose image has torch, torchvision, timm, pluggy, click and rich but no network.
#
# Here, once (the data folder is git-ignored; the .gz files are ~42 MB, under the 64 MiB carry limit):
#   for d in MNIST FashionMNIST; do mkdir -p .data/$d/raw; cp ../shared/data/$d/raw/*.gz .data/$d/raw/; done
# Then, with the device tool:
#   run(command="bash benchmarks/device.sh", carry=[".data"], timeout_s=590)
# Results come back under $OUT: results/ (JSON and tables), the log, nvidia-smi's view. Copy results/*
# into benchmarks/results/, run `python -m benchmarks.report`, commit, naming the device.
#
# Sized for ~9 minutes on one H100/H200. Environment overrides: ACC_DATASETS (default mnist),
# ACC_IPC (1), ACC_METHODS (random dm m3d), DEVICE (cuda), QUICK=1 (tiny settings: checks this
# script end to end on a CPU in a few minutes; its numbers mean nothing).
set -uo pipefail
OUT="${OUT:-runs/device-out}"
export PYTHONUNBUFFERED=1 DISTILLKIT_DATA="${DISTILLKIT_DATA:-$PWD/.data}" DISTILLKIT_BENCH_RESULTS="$OUT/results"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt"

step() {  # step SECONDS COMMAND...: a time-limited step; a failure is logged and the next step still runs
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || echo "!! exit $status: $*" | tee -a "$OUT/log"
}

if [ "${QUICK:-0}" = 1 ]; then
    eval_epochs=(--epochs 2 --test-limit 200) long_epochs=(--epochs 3 --test-limit 200)
    speed=(--inputs mnist --ipc 1 --iterations 1) accuracy=(--iterations 2 --epochs 2 --runs 2)
else
    eval_epochs=(--epochs 200) long_epochs=(--epochs 1000 --test-limit 10000)
    speed=(--iterations 10) accuracy=()
fi
step 150 python3 -m benchmarks.eval_speed --devices "$DEVICE" --ipc 1 10 50 "${eval_epochs[@]}"
step 90 python3 -m benchmarks.eval_speed --devices "$DEVICE" --ipc 10 "${long_epochs[@]}" --name eval_speed_1000
step 100 python3 -m benchmarks.speed --device "$DEVICE" "${speed[@]}"
# shellcheck disable=SC2086  # the grid overrides are word lists
step 220 python3 -m benchmarks.accuracy --scale paper --device "$DEVICE" --datasets ${ACC_DATASETS:-mnist} \
    --ipc ${ACC_IPC:-1} --methods ${ACC_METHODS:-random dm m3d} --work runs/device "${accuracy[@]}"
ls -l "$OUT" "$OUT/results"
