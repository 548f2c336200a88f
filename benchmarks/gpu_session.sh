#!/usr/bin/env bash
# One prepared GPU check, sized for a 15-minute device lease: a single call of at most 9 minutes
# (the default steps' limits add up to 550 s, under the device's 600 s per call). A machine start
# takes under a minute to 2, then the default steps run in order of what issue 11 still needs:
# speed_eager, cuda_tests, speed_compile_paired; speed_b96 (110 s) by name if time is left.
# Each step runs under its own time limit so one slow step cannot eat the others, and writes its
# log and JSON under $OUT (or ./gpu_out):
#   speed_eager: issue 11's GPU suite, resnet152 32x3x224x224, float32 and bf16 autocast: eager rows
#      (original, checkpoint_sequential, memory-saving, ordinary autograd, paired
#      (ConvertConfig(pair_blocks=True))), time and peak memory; original, checkpoint_sequential,
#      memory-saving and paired again with the whole step captured in a CUDA graph (launch
#      overhead gone); memory-saving and paired converted with ConvertConfig(cuda_graphs=True)
#      (--segment-graphs: each segment replays its captured graphs; first run on a GPU, with their
#      gradients against the eager rows and the memory the graphs hold); each variant's kernel
#      launches in one profiled step (--count-launches);
#   cuda_tests: pytest -k cuda (autocast exactness, no device synchronisation, CUDA-graph capture,
#      cuda_graphs against eager in float64 and bf16 and without synchronisation,
#      the direct backward against cuDNN's norms, compiled couplings under inductor, estimate vs the
#      CUDA allocator, step cost on CUDA);
#   exactness, exactness_paired: whole-model exactness per precision (cuda_check.py), default
#      (only when named) and paired (--pair-blocks) conversion;
#   speed_compile (only when named): bf16, torch.compile'd original against paired with compiled
#      couplings, with and without an outer torch.compile (inductor compiles each model for ~100 s
#      on a 16-core host);
#   speed_compile_paired (~230 s): bf16, torch.compile of the paired conversion (segments as graph
#      breaks, run eagerly; and with cuda_graphs=True, replaying their graphs) against the compiled
#      original;
#   speed_b96 (only when named): the eager and graphed suite at batch 96, bf16: a step less bound
#      by kernel launches, where keep keeps every 3x3 convolution (with its A/B: kept outputs
#      through the module calls), and cuda_graphs=True (--segment-graphs), default and paired
#      conversion;
#   plan (only when named): issue 15's plan table on the GPU (estimated vs max_memory_allocated
#      peaks), resnet152 at 64x224 (measured on an H200; resnet50's on an H100).
#
#   bash benchmarks/gpu_session.sh                          # the default steps, on the device machine
#   bash benchmarks/gpu_session.sh speed_b96 speed_compile_paired   # only these steps
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
    grep -v pow_by_natural "$out/$name.log" | tail -n 40  # a warning inductor repeats by the hundred
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(speed_eager cuda_tests speed_compile_paired)  # others by name
for name in "${steps[@]}"; do
    case $name in
    speed_eager) step speed_eager 170 "$py" benchmarks/speed.py --device cuda --suites gpu --dtypes float32 bfloat16 \
        --compile-backend none --cuda-graphs --segment-graphs --count-launches --repeats 7 \
        --json "$out/speed_eager.json" --variants original ckpt-sequential memory-saving ordinary paired \
        "memory-saving, cuda_graphs" "paired, cuda_graphs" \
        "graphed original" "graphed ckpt-sequential" "graphed memory-saving" "graphed paired" ;;
    cuda_tests) step cuda_tests 120 "$py" -m pytest -q -k cuda tests -p no:cacheprovider ;;
    plan) step plan 240 "$py" benchmarks/plan.py --device cuda --models resnet152 --batch 64 --size 224 \
        --budgets 0.65 0.4 --compile-budgets 0.2 --reps 3 --json "$out/plan.json" ;;
    speed_compile) step speed_compile 300 "$py" benchmarks/speed.py --device cuda --suites gpu --dtypes bfloat16 \
        --compile-dtypes bfloat16 --compile-fg --repeats 5 --json "$out/speed_compile.json" \
        --variants original paired "compiled original" "paired F/G compiled" "compiled paired F/G" ;;
    speed_compile_paired) step speed_compile_paired 260 "$py" benchmarks/speed.py --device cuda --suites gpu \
        --dtypes bfloat16 --compile-dtypes bfloat16 --repeats 4 --segment-graphs \
        --json "$out/speed_compile_paired.json" \
        --variants original paired "compiled original" "compiled paired" "compiled paired, cuda_graphs" ;;
    speed_b96) step speed_b96 110 "$py" benchmarks/speed.py --device cuda --suites gpu --gpu-batch 96 --keep-through-modules --segment-graphs \
        --dtypes bfloat16 --compile-backend none --cuda-graphs --repeats 5 --json "$out/speed_b96.json" ;;
    exactness) step exactness 30 "$py" benchmarks/cuda_check.py --model resnet50 --batch 8 --size 128 ;;
    exactness_paired) step exactness_paired 30 "$py" benchmarks/cuda_check.py --model resnet50 --batch 8 --size 128 \
        --pair-blocks ;;
    *) echo "unknown step $name"; exit 2 ;;
    esac
done
echo "total $(( $(date +%s) - start ))s"
