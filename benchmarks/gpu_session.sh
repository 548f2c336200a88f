#!/usr/bin/env bash
# One prepared GPU check, sized for a 15-minute device lease: a single call of at most ~9.5 minutes
# (a machine start of 1-2 min, then the steps below, in order of what the open issues need most).
# Each step runs under its own time limit so one slow step cannot eat the others, and writes its
# log and JSON under $OUT (or ./gpu_out), 8 files in all:
#   1. speed_eager: issue 11's GPU suite, resnet152 32x3x224x224, float32 and bf16 autocast, eager rows
#      (original, checkpoint_sequential, memory-saving, ordinary autograd, keep), time and peak memory;
#   2. cuda_tests: pytest -k cuda (autocast exactness, no device synchronisation, estimate vs the
#      CUDA allocator);
#   3. plan: issue 15's plan table on the GPU (estimated vs max_memory_allocated peaks), resnet50 64x224;
#   4. speed_compile: the suite in bf16 with torch.compile'd original, memory-saving, and memory-saving
#      with F/G compiled;
#   5. exactness: whole-model exactness per precision (cuda_check.py).
#
#   bash benchmarks/gpu_session.sh            # on the device machine, from the repository root
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

step speed_eager 130 "$py" benchmarks/speed.py --device cuda --suites gpu --dtypes float32 bfloat16 \
    --compile-backend none --repeats 7 --json "$out/speed_eager.json"
step cuda_tests 70 "$py" -m pytest -q -x -k cuda tests -p no:cacheprovider
step plan 110 "$py" benchmarks/plan.py --device cuda --models resnet50 --batch 64 --size 224 \
    --budgets 0.65 0.4 --compile-budgets 0.2 --reps 3 --json "$out/plan.json"
step speed_compile 200 "$py" benchmarks/speed.py --device cuda --suites gpu --dtypes bfloat16 \
    --compile-dtypes bfloat16 --compile-fg --repeats 5 --json "$out/speed_compile.json"
step exactness 30 "$py" benchmarks/cuda_check.py --model resnet50 --batch 8 --size 128
echo "total $(( $(date +%s) - start ))s"
