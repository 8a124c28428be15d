#!/usr/bin/env bash
# The GPU figures (evaluation speed, condense speed, paper-scale accuracy) in ONE measured call of a lent
# GPU machine, whose image has torch, torchvision, timm, pluggy, click and rich but no network.
#
# A call carries at most 64 MiB, so the data travels ahead in git-ignored .data/ (ignored files stay on the
# machine between calls while it is warm, 30 s after each call on an H200). Here, once:
#   mkdir -p .data/MNIST/raw && cp ../shared/data/MNIST/raw/*.gz .data/MNIST/raw/        # 11 MiB
#   python3 -m benchmarks.stage_cifar split     # full CIFAR-10 -> .data/cifar-parts/: 3 x 45 + 27 MiB
# Then these four calls of the device tool, back to back (each within 30 s of the last one's reply; a
# reply with warm: false means a fresh machine, whose staged parts are gone: start again at call 1):
#   P=.data/cifar-parts; M=$P/manifest.json; C="python3 -m benchmarks.stage_cifar check"
#   1. run(command=C, carry=[M, "$P/train.npz.part0"], timeout_s=120)
#   2. run(command=C, carry=[M, "$P/train.npz.part1"], timeout_s=60)
#   3. run(command=C, carry=[M, "$P/train.npz.part2"], timeout_s=60)
#   4. run(command="bash benchmarks/device.sh", carry=[M, "$P/test.npz.part0", "$P/classes.txt.part0", ".data/MNIST"],
#          timeout_s=590)
# (never carry ".data" itself: it would replace the staged parts there). Call 4 joins the parts into
# .data/CIFAR10 and checks every part's, file's and decoded array's sha256 (stage_cifar.py) before any
# CIFAR-10 cell runs; without all of them it says so (!! in the log) and measures the MNIST cell instead.
# Results come back under $OUT: results/ (JSON and tables), the log, nvidia-smi's view. Copy results/*
# into benchmarks/results/, run `python -m benchmarks.report`, commit, naming the device.
#
# Sized for ~9 minutes on one H100/H200 (the step limits add up to 540 s; they are estimates until a
# run's log gives the real times). The paper-scale cell is CIFAR-10 at IPC 10 (random baseline, DM and
# M3D at their defaults, 1000 epochs x 5 runs under dc-classic, M3D also under idc), M3D first and DM
# (20 000 iterations) in its own step, so an overrun of one keeps the other. Environment overrides:
# ACC_DATASETS, ACC_IPC, ACC_METHODS, ACC_SCALE (the cell measured when CIFAR-10 is not staged: mnist, 1,
# random dm m3d, paper; ACC_SCALE=smoke ACC_DATASETS="mnist fashionmnist" ACC_IPC="1 10" ACC_METHODS="random
# dm idm" gives the smoke cells IDM needs, 8x DM's time per iteration on a CPU), SWEEP_CELLS (cells of
# benchmarks.sweep run after the grid, e.g. "m3d:mnist:50:lr_img=50 m3d:cifar10:50:lr_img=5,50": the IPC 50
# rates, hours per value on a CPU), DEVICE (cuda), QUICK=1 (tiny settings: checks this script end to end on a CPU in a few
# minutes; its numbers mean nothing; its step limits are LIMIT_SCALE=4 times the GPU's; without
# .data/cifar-parts it takes the MNIST cell).
set -uo pipefail
OUT="${OUT:-runs/device-out}"
export PYTHONUNBUFFERED=1 DISTILLKIT_DATA="${DISTILLKIT_DATA:-$PWD/.data}" DISTILLKIT_BENCH_RESULTS="$OUT/results"
DEVICE="${DEVICE:-cuda}"
LIMIT_SCALE="${LIMIT_SCALE:-$([ "${QUICK:-0}" = 1 ] && echo 4 || echo 1)}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt"

step() {  # step SECONDS COMMAND...: a time-limited step; a failure is logged (and returned), the next step still runs
    local limit=$(($1 * LIMIT_SCALE))  # the limits are sized for the GPU; a CPU dry run stretches them
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || echo "!! exit $status: $*" | tee -a "$OUT/log"
    return "$status"
}

if [ "${QUICK:-0}" = 1 ]; then
    eval_epochs=(--epochs 2 --test-limit 200) long_epochs=(--epochs 3 --test-limit 200)
    speed=(--inputs mnist --ipc 1 --iterations 1) accuracy=(--iterations 2 --epochs 2 --runs 2)
else
    eval_epochs=(--epochs 200) long_epochs=(--epochs 1000 --test-limit 10000)
    speed=(--iterations 10) accuracy=()
fi
paper=(python3 -m benchmarks.accuracy --scale paper --device "$DEVICE" --work runs/device)
grid=(python3 -m benchmarks.accuracy --scale "${ACC_SCALE:-paper}" --device "$DEVICE" --work runs/device)
cifar=0  # the CIFAR-10 cell runs only on the full, verified set
if [ -f .data/cifar-parts/manifest.json ]; then
    step 40 python3 -m benchmarks.stage_cifar join && cifar=1
fi
[ "$cifar" = 1 ] || echo "!! CIFAR-10 not staged intact (see the header): measuring the MNIST cell instead" \
    | tee -a "$OUT/log"
step 90 python3 -m benchmarks.eval_speed --devices "$DEVICE" --ipc 1 10 50 "${eval_epochs[@]}"
step 60 python3 -m benchmarks.eval_speed --devices "$DEVICE" --ipc 10 "${long_epochs[@]}" --name eval_speed_1000
step 50 python3 -m benchmarks.speed --device "$DEVICE" "${speed[@]}"
if [ "$cifar" = 1 ]; then
    step 130 "${paper[@]}" --datasets cifar10 --ipc 10 --methods random m3d "${accuracy[@]}"
    step 170 "${paper[@]}" --datasets cifar10 --ipc 10 --methods dm "${accuracy[@]}"
else
    # shellcheck disable=SC2086  # the grid overrides are word lists
    step 300 "${grid[@]}" --datasets ${ACC_DATASETS:-mnist} --ipc ${ACC_IPC:-1} \
        --methods ${ACC_METHODS:-random dm m3d} "${accuracy[@]}"
fi
if [ -n "${SWEEP_CELLS:-}" ]; then
    # shellcheck disable=SC2086  # a word list of cells
    step 200 python3 -m benchmarks.sweep --device "$DEVICE" --work runs/device-sweep --cells $SWEEP_CELLS
fi
ls -l "$OUT" "$OUT/results"
