#!/usr/bin/env bash
# One device call for issue #15's measurements on a config (default: config.yaml): the pipeline's data, target and
# NeRFs once, then several Neural-Sim variants (estimator, inverse HVP, psi seed) with their detectors, partial oracles
# (the target's distribution of some factors only), and beside them the estimator-agreement benchmark. Everything
# runs on the GPU; KERNELS=1 builds the NeRF kernels (for nerf.backend: cuda). Results land under $OUT.
#
#   OUT=/tmp/out LIMIT=540 bash benchmarks/neuralsim_matrix.sh [config.yaml]
#
# Needs pycocotools (and PyYAML) importable: wheels in .whl/ are installed into /tmp/site when present.
set -u
CONFIG=${1:-config.yaml}
OUT=${OUT:-/tmp/neuralsim_matrix}
LIMIT=${LIMIT:-540}            # seconds for the whole call; the pipeline is stopped before it, partial results kept
VARIANTS=${VARIANTS:-sf0 sf1 cg0 cg1 pw0 az0}
ESTIMATORS_BENCH=${ESTIMATORS_BENCH:-1}
ESTIMATOR_ARGS=${ESTIMATOR_ARGS:-}     # extra arguments of both estimator benchmarks, e.g. --warm-images 200
PARTIAL_ORACLES=${PARTIAL_ORACLES-azimuth elevation,zoom}   # set to "" for none
R=${RESULTS:-/tmp/ns_matrix_results}
mkdir -p "$OUT" "$R"
start=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# KERNELS=0 (default): CXX unset keeps the NeRFs on the PyTorch path (no kernel build); 1 for nerf.backend: cuda
[ "${KERNELS:-0}" = 1 ] || export CXX=/nonexistent

cg='{"method": "cg", "k": 5, "alpha": 0.01, "damping": 0.01, "power_iters": 0}'
declare -A V=(
    [sf0]='{"estimator": "score_function", "seed": 0}'
    [sf1]='{"estimator": "score_function", "seed": 1}'
    [cg0]="{\"estimator\": \"score_function\", \"seed\": 0, \"inverse_hvp\": $cg}"
    [cg1]="{\"estimator\": \"score_function\", \"seed\": 1, \"inverse_hvp\": $cg}"
    [pw0]='{"estimator": "pathwise", "seed": 0}'
    [pw1]='{"estimator": "pathwise", "seed": 1}'
    [az0]='{"learned": ["azimuth"], "seed": 0}'
    [az1]='{"learned": ["azimuth"], "seed": 1}'
    # the warm start on as many images as the baseline detectors (200 per class) instead of 64
    [w0]='{"pretrain_images_per_class": 200, "seed": 0}'
    [w1]='{"pretrain_images_per_class": 200, "seed": 1}'
    [w2]='{"pretrain_images_per_class": 200, "seed": 2}'
    [wpw0]='{"pretrain_images_per_class": 200, "estimator": "pathwise", "seed": 0}'
    [wcg0]="{\"pretrain_images_per_class\": 200, \"seed\": 0, \"inverse_hvp\": $cg}"
    [waz0]='{"pretrain_images_per_class": 200, "learned": ["azimuth"], "seed": 0}'
    # the per-factor control variate, and a KL(psi || uniform) penalty of weight 0.03 / 0.1
    [pf0]='{"baseline": "per_factor", "seed": 0}'
    [pf1]='{"baseline": "per_factor", "seed": 1}'
    [kl0]='{"prior_weight": 0.03, "seed": 0}'
    [kl1]='{"prior_weight": 0.03, "seed": 1}'
    [pfkl0]='{"baseline": "per_factor", "prior_weight": 0.03, "seed": 0}'
    [pfkl1]='{"baseline": "per_factor", "prior_weight": 0.03, "seed": 1}'
    [kls0]='{"prior_weight": 0.1, "seed": 0}'
    [loo0]='{"baseline": "leave_one_out", "seed": 0}'
    # with the per_factor default: more psi seeds, longer fine-tuning, a smaller psi step, azimuth only
    [pf2]='{"baseline": "per_factor", "seed": 2}'
    [pf3]='{"baseline": "per_factor", "seed": 3}'
    [pfn0]='{"baseline": "per_factor", "inner_steps": 20, "seed": 0}'
    [pfn1]='{"baseline": "per_factor", "inner_steps": 20, "seed": 1}'
    [pflr0]='{"baseline": "per_factor", "psi_lr": 0.05, "seed": 0}'
    [pflr1]='{"baseline": "per_factor", "psi_lr": 0.05, "seed": 1}'
    [pfaz0]='{"baseline": "per_factor", "learned": ["azimuth"], "seed": 0}'
    [pfaz1]='{"baseline": "per_factor", "learned": ["azimuth"], "seed": 1}'
    [loo1]='{"baseline": "leave_one_out", "seed": 1}'
)
args=()
for v in $VARIANTS; do args+=(--variant "$v" "${V[$v]}"); done
for f in $PARTIAL_ORACLES; do args+=(--partial-oracle "$f"); done

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import torch, platform; print(torch.__version__, torch.version.cuda, platform.processor(), flush=True)" >> "$OUT/device.txt"

timeout $((LIMIT - 15)) python3 benchmarks/neuralsim_pipeline.py --config "$CONFIG" --results "$R" "${args[@]}" \
    > "$OUT/pipeline.log" 2>&1 &
pipe=$!

if [ "$ESTIMATORS_BENCH" = 1 ]; then
    # the estimator benchmark needs the NeRFs and target/val: wait for the validations
    while kill -0 $pipe 2>/dev/null; do
        n=$(ls "$R"/nerf/*/validation.json 2>/dev/null | wc -l)
        [ "$n" -ge 3 ] && [ -f "$R/target/val/annotations.json" ] && break
        sleep 3
    done
    left=$((LIMIT - 20 - $(date +%s) + start))
    timeout $left python3 benchmarks/neuralsim_estimators.py --results "$R" --config "$CONFIG" --device cuda \
        --draws 8 --inverse-draws 1 --ft-seeds 4 $ESTIMATOR_ARGS --out "$OUT/estimators_neumann.json" > "$OUT/estimators_neumann.log" 2>&1 &
    timeout $left python3 benchmarks/neuralsim_estimators.py --results "$R" --config "$CONFIG" --device cuda \
        --draws 8 --inverse-draws 0 --ft-seeds 4 $ESTIMATOR_ARGS --ft-mix 0.5 --inverse-hvp "$cg" \
        --out "$OUT/estimators_cg_mix0.5.json" > "$OUT/estimators_cg.log" 2>&1 &
fi
wait
echo "wall $(( $(date +%s) - start )) s" >> "$OUT/device.txt"
cp "$R/pipeline_summary.json" "$OUT/" 2>/dev/null
# the device returns a limited number of files: the job logs, the loops' trajectories and distributions, the NeRF
# validations and the evaluations in one tarball
(cd "$R" && tar czf "$OUT/results.tgz" pipeline_jobs $(ls -d */trajectory.tsv */distribution.json nerf/*/validation.json \
    eval/*/seed_?.json 2>/dev/null))
true
