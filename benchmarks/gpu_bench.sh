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
# The issue-17 parts, on a real BlenderNeRF scene ($BENCH_DATA, default ../build/bench/blendernerf128: 128x128,
# 100 training views, made by tests/data/blendernerf_tiny/make_dataset.py with BN_RES=128 BN_NTRAIN=100
# BN_NTEST=10) and beside torch-ngp ($NGP, a torch-ngp checkout; not part of this repository):
# build:      the kernels, and torch-ngp's extensions in parallel when $NGP is set
# tests:      tests/test_cuda.py
# default128: the default (paper preset, 2^18 samples per step), 3000 steps, test PSNR every 100
# rays128:    4096 rays per step (batch_samples 0), 3000 steps, test PSNR every 250
# ngp128:     torch-ngp -O, 3000 iterations (bench_torch_ngp.py)
# profile128: torch.profiler of default steps replayed as a graph (profile128eager: run op by op, INSTSIM_CUDA_GRAPHS=0)
# render128:  bench_render.py (frames/s, pose-gradient rays/s, both backends) on default128's checkpoint
# Test PSNR is evaluated every 100 steps (train128: 500), outside the timed training but not outside the wall
# time: at 800x800 one evaluation (10 views, PSNR on the CPU) takes about 3 s, so train800 needs about 4 minutes.
# Give every run its steps: the paper preset's schedule is 20000 steps.
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-gpu_bench_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(train800 torch800 render train128)  # the issue-17 parts are named explicitly
work="${TMPDIR:-/tmp}/instsim_gpu_bench"
data="${BENCH_DATA:-../build/bench/blendernerf128}"
ngp="${NGP:-}"
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
        build)    if [ -n "$ngp" ]; then
                      # torch-ngp's own flags ask for C++14, which torch 2.x headers refuse: C++17 in a copy
                      rm -rf "$work/ngp" && mkdir -p "$work" && cp -r "$ngp" "$work/ngp" &&
                      sed -i 's/c++14/c++17/g' "$work"/ngp/*/backend.py
                      for ext in raymarching gridencoder shencoder freqencoder; do
                          (cd "$work/ngp" && TORCH_CUDA_ARCH_LIST=9.0 python3 -c "import $ext.backend" \
                              > "$out/ngp_build_$ext.log" 2>&1; echo "torch-ngp $ext build: exit $?") &
                      done
                  fi
                  python3 -c "from instsim.backend import load_kernels; load_kernels(0)"; wait ;;
        tests)    (cd .. && timeout -k 5 "${PART_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py) ;;
        default128) $run bench_nerf_train.py --device cuda --data "$data" --eval-every 100 \
                      --set steps=3000 --workdir "$work/d128" --out "$out/nerf_train_blender128_default.json" ;;
        rays128)  $run bench_nerf_train.py --device cuda --data "$data" --eval-every 250 \
                      --set steps=3000 batch_rays=4096 batch_samples=0 --workdir "$work/r128" \
                      --out "$out/nerf_train_blender128_4096rays.json" ;;
        ngp128)   TORCH_CUDA_ARCH_LIST=9.0 $run bench_torch_ngp.py --ngp "$work/ngp" --data "$data" --iters 3000 --out "$out/torch_ngp_blender128.json" ;;
        profile128) $run profile_train_step.py --data "$data" --warm 300 --steps 100 --rows 30 ;;
        profile128eager) INSTSIM_CUDA_GRAPHS=0 $run profile_train_step.py --data "$data" --warm 300 --steps 50 --rows 40 ;;
        render128) $run bench_render.py "$work/d128/$(basename "$data")/nerf.pt" --size 800 --radius 3.5 --fov 39.6 \
                      --out "$out/render_cuda_blender128.json" ;;
        *) echo "unknown part $part" >&2; exit 2 ;;
    esac > "$out/$part.log" 2>&1
    echo "$part: exit $? after $(( $(date +%s) - start )) s"
    grep -E "^\[(bench|render|profile|torch-ngp)|Error|passed|failed|build: exit" "$out/$part.log" | grep -v "pose-gradient step x3" | tail -8
done
