#!/usr/bin/env bash
# The GPU checks of issue #7 as one script, for a machine with a CUDA device and the project's
# dependencies importable (python3; see benchmarks/RESULTS.md for how a lent machine got them):
#   1. stage seconds and network passes on the host CPU and the GPU, from the same process,
#      with the GPU's verdicts, scores and images compared against the CPU's;
#   2. the README's main job (`cycguard demo`) with the gadgets' default device (auto: the GPU),
#      and again with the GPU hidden, and the two runs' images and verdicts compared.
# Usage: benchmarks/gpu_check.sh OUT_DIR [all|stages|demo] (default all: both steps). Writes at most 7 files, all in OUT_DIR. Every step
# runs even when an earlier one failed; the exit status is the number of failed steps.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [all|stages|demo]}
steps=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } >"$out/gpu.txt" 2>&1 || failed=$((failed + 1))
cat "$out/gpu.txt"
if [[ $steps == all || $steps == stages ]]; then
    python3 -m benchmarks.stage_cost --devices cpu cuda --tag gpu --out "$out" >"$out/stage_cost.log" 2>&1 || failed=$((failed + 1))
    tail -n 25 "$out/stage_cost.log"
fi
[[ $steps == all || $steps == demo ]] || { echo "failed steps: $failed"; exit "$failed"; }
work=$(mktemp -d)
python3 -m gadgets.cli demo --out "$work/gpu" >"$out/demo.log" 2>&1 || failed=$((failed + 1))
CUDA_VISIBLE_DEVICES= python3 -m gadgets.cli demo --out "$work/cpu" >>"$out/demo.log" 2>&1 || failed=$((failed + 1))
tail -n 30 "$out/demo.log"
python3 -m benchmarks.compare_images "$work/cpu/demo_images.h5" "$work/gpu/demo_images.h5" 2>&1 | tee "$out/demo_compare.txt" || failed=$((failed + 1))
echo "failed steps: $failed"
exit "$failed"
