#!/usr/bin/env bash
# One prepared GPU check, sized for a 15-minute device lease: two calls of under 10 minutes each
# on the same warm machine (part 1: the speed suite, at most 6 min; part 2: the rest, at most 6 min; with a machine start of
# 1-2 min that leaves a minute or two of the 15 for a rerun).
#
# Runs, each under its own time limit so one slow step cannot eat the others, and writes every
# log and JSON under $OUT (or ./gpu_out):
#   1. the CUDA tests (pytest -k cuda: autocast exactness, no device synchronisation, estimate vs
#      the CUDA allocator);
#   2. issue 11's GPU speed suite: resnet152 32x3x224x224, float32 and bf16, eager rows plus
#      torch.compile'd original, memory-saving, and memory-saving with F/G compiled (bf16);
#   3. the same suite at batch 96, eager bf16 only: the regime revconvert exists for (bigger batches),
#      where a step is less host-bound;
#   4. issue 15's plan table on the GPU (estimated vs max_memory_allocated peaks), resnet50;
#   5. whole-model exactness per precision (cuda_check.py).
#
#   bash benchmarks/gpu_session.sh 1          # on the device machine, from the repository root: step 2
#   bash benchmarks/gpu_session.sh 2          # steps 1, 3, 4, 5
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, at $(( $(date +%s) - start ))s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $(( $(date +%s) - start ))s"
    tail -n 40 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

part="${1:-all}"
if [[ $part == 1 || $part == all ]]; then
    step speed 360 "$py" benchmarks/speed.py --device cuda --suites gpu ops --compile-fg --repeats 7 \
        --json "$out/speed_cuda.json"
fi
if [[ $part == 2 || $part == all ]]; then
    step cuda_tests 80 "$py" -m pytest -q -x -k cuda tests -p no:cacheprovider
    step speed_b96 80 "$py" benchmarks/speed.py --device cuda --suites gpu --gpu-batch 96 --dtypes bfloat16 \
        --compile-backend none --repeats 5 --json "$out/speed_cuda_b96.json"
    step plan 150 "$py" benchmarks/plan.py --device cuda --models resnet50 --batch 64 --size 224 \
        --budgets 0.65 0.4 --compile-budgets 0.2 --reps 3 --json "$out/plan_cuda.json"
    step exactness 45 "$py" benchmarks/cuda_check.py --model resnet50 --batch 8 --size 128
fi
echo "total $(( $(date +%s) - start ))s"
