#!/usr/bin/env bash
# The CUDA-kernel benchmarks of docs/experiments.md (GPU section), on one GPU, in one call. Each part writes its JSON
# and log under $OUT (default ./gpu_bench_out); copy the JSON to benchmarks/results/ to commit it.
#
#   bash benchmarks/gpu_bench.sh [part ...]     # parts: train800 torch800 render train128 (default: all four)
#
# train800: 800x800/100 views, paper sizes, 1500 steps, the three hands, CUDA kernels (time to 30/33 dB, rays/s)
# torch800: the same scene on the PyTorch path, 600 steps (the baseline of the ratios; one hand)
# render:   inference frames/s at 800x800 and pose-gradient rays/s, both backends, on train800's fist
# train128: torch-ngp's form: 128x128/100 views, 4096 rays per step, 3000 steps
# Test PSNR is evaluated every 100 steps (train128: 500), outside the timed training but not outside the wall
# time: at 800x800 one evaluation (10 views, PSNR on the CPU) takes about 3 s, so train800 needs about 4 minutes.
# Give every run its steps: the paper preset's schedule is 20000 steps.
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-gpu_bench_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(train800 torch800 render train128)
work="${TMPDIR:-/tmp}/instsim_gpu_bench"
# each part time-boxed (PART_TIMEOUT s; on SIGABRT faulthandler prints where it was): a stuck part must not
# cost the others
run="timeout -s ABRT -k 5 ${PART_TIMEOUT:-300} python3 -X faulthandler"
for part in "${parts[@]}"; do
    start=$(date +%s)
    case "$part" in
        train800) $run bench_nerf_train.py --device cuda --size 800 --eval-every 100 \
                      --set steps=1500 --workdir "$work/k800" --out "$out/nerf_train_cuda_kernels.json" ;;
        torch800) $run bench_nerf_train.py --device cuda --size 800 --gestures fist --eval-every 100 \
                      --set backend=torch steps=600 --workdir "$work/t800" --out "$out/nerf_train_cuda_torchpath.json" ;;
        render)   $run bench_render.py "$work/k800/fist/nerf.pt" --size 800 --profile 25 \
                      --out "$out/render_cuda.json" ;;
        train128) $run bench_nerf_train.py --device cuda --size 128 --eval-every 500 \
                      --set steps=3000 batch_rays=4096 batch_samples=0 --workdir "$work/k128" \
                      --out "$out/nerf_train_128px_4096rays.json" ;;
        *) echo "unknown part $part" >&2; exit 2 ;;
    esac > "$out/$part.log" 2>&1
    echo "$part: exit $? after $(( $(date +%s) - start )) s"
    grep -E "^\[(bench|render)|Error" "$out/$part.log" | grep -v "pose-gradient step x3" | tail -8
done
