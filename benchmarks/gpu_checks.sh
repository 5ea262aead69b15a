#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then the configs/gpu.yaml pipeline, with everything a reader needs
# written under $OUT (default ./gpu_checks_out): the test log, the pipeline log and a tarball of the per-job
# benchmark files, logs, validation and evaluation results.
#
#   bash benchmarks/gpu_checks.sh [pipeline time limit in s, default 540]
#   GPU_TESTS=none bash benchmarks/gpu_checks.sh   # the pipeline only (or GPU_TESTS=devices: detector and loop)
#
# Kernels are built at first use into $INSTSIM_KERNEL_CACHE (default ~/.cache/instsim/kernels); Python packages
# the machine lacks can be installed beforehand (e.g. pip install --target DIR wheels; put DIR on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_checks_out}"
limit="${1:-540}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
tests="${GPU_TESTS:-all}"
: > "$out/gpu_tests.log"
[ "$tests" = all ] && python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py >> "$out/gpu_tests.log" 2>&1
[ "$tests" != none ] && python3 -m pytest -q -p no:cacheprovider tests/test_detect.py tests/test_neuralsim_loop.py \
    -k gpu >> "$out/gpu_tests.log" 2>&1
echo "gpu tests: $(grep -E "passed|failed|skipped" "$out/gpu_tests.log" | tr '\n' ' ')"

start=$(date +%s)
# one card (the profile lets three GPU jobs share it: they are small and launch-bound); the README's command
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" timeout -k 10 "$limit" \
    snakemake --cores all --configfile configs/gpu.yaml --replace-workflow-config --keep-going \
    > "$out/pipeline.log" 2>&1
echo "pipeline: exit $? after $(( $(date +%s) - start )) s"
grep -E "Error in rule" "$out/pipeline.log" | sort | uniq -c
[ -f results_gpu/eval/summary.tsv ] && cut -f1-5 results_gpu/eval/summary.tsv
tar czf "$out/results_gpu.tgz" results_gpu/benchmarks results_gpu/logs results_gpu/eval/*.tsv results_gpu/eval/*.json \
    results_gpu/nerf/*/validation.json results_gpu/neuralsim*/*.json results_gpu/neuralsim*/*.tsv 2>/dev/null
ls -la "$out"
