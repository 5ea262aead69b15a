#!/usr/bin/env bash
# Issue #18: the configs/gpu.yaml pipeline, typed as the README says, on every GPU of this host and then on one
# (CUDA_VISIBLE_DEVICES=0), in one call; then checks from the stage logs that the multi-GPU run's concurrent jobs
# held distinct GPUs, that no job waited for a GPU while another had room, and that a job killed mid-run freed
# its GPU (benchmarks/check_gpu_claims.py). Everything lands under $OUT (default ./multi_gpu_out):
#   multi_gpu_run.json   wall times, speed-up, the claim checks, per-job seconds of both runs
#   all.log, one.log     Snakemake's output of each run; results_{all,one}.tgz: stage logs, benchmarks, evals
#
#   bash benchmarks/multi_gpu_run.sh                 # both runs (each about 8 min on one H100 at commit 75b2d75)
#   PARTS="all" bash benchmarks/multi_gpu_run.sh     # only the multi-GPU run (PARTS: any of "all one")
#   LIMIT_S=280 ...                                  # time limit of each run (default 540)
#
# The kill test: KILL_RULE (default train_detector) is the rule whose first job is SIGKILLed KILL_AFTER_S (default
# 5) seconds after it claims its GPU; the script then probes the killed job's lock slot, Snakemake stops after its
# running jobs, and the same command is started again, as a user resumes (README "Rerunning"), so the killed job
# reruns and claims a GPU again. Set KILL_RULE=none to skip it. The one-GPU run has no kill.
#
# A rehearsal without GPUs (the claiming, the kill and the checks, on the CPU): a fake nvidia-smi on PATH that lists
# two GPUs, CONFIG=configs/tiny.yaml, and EXTRA="--set-resources train_nerf:gpu=1 train_detector:gpu=1 ..." so that
# CPU stages claim the fake GPUs; NO_KERNELS=1 skips the kernel build. A fake nvidia-smi: a script that prints
# "GPU 0: Fake GPU (UUID: GPU-0)" and "GPU 1: ..." for `-L` (as tests/test_gpus.py writes one).
#
# Both runs load the CUDA kernels from one cache built beforehand, so neither pays for the build. Python
# packages the machine lacks (snakemake, pycocotools, ...) are installed from .whl/*.whl when that folder exists
# (see /work/.library/device/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-multi_gpu_out}"
parts="${PARTS:-all one}"
limit="${LIMIT_S:-540}"
kill_rule="${KILL_RULE:-train_detector}"
kill_after="${KILL_AFTER_S:-5}"
config="${CONFIG:-configs/gpu.yaml}"
read -r -a extra <<< "${EXTRA:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export INSTSIM_GPU_LOCK_DIR="${INSTSIM_GPU_LOCK_DIR:-/tmp/instsim-gpu-locks-multi}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi
command -v snakemake > /dev/null || { echo "snakemake is not installed here" >&2; exit 2; }
unset CUDA_VISIBLE_DEVICES
nvidia-smi -L | tee "$out/gpus.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
build_s=0
if [ -z "${NO_KERNELS:-}" ]; then
    t=$(date +%s); python3 -c "from instsim.backend import load_kernels; load_kernels(0)"; build_s=$(( $(date +%s) - t ))
    echo "kernels ready in ${build_s} s"
fi
results=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['results_dir'].rstrip('/'))" "$config")
cmd=(snakemake --cores all --configfile "$config" --replace-workflow-config "${extra[@]}")   # the README's command

# Kills the first job of $kill_rule once it has held its GPU for $kill_after s; records the kill and whether the
# killed job's lock slot was free right after it.
killer() {
    local kills="$1" log="" pid="" slot=""
    while [ -z "$log" ]; do
        sleep 0.5
        log=$(grep -l "claimed GPU" "$results"/logs/"$kill_rule"/*.log "$results"/logs/"$kill_rule"/*/*.log 2>/dev/null | head -1)
    done
    sleep "$kill_after"
    slot=$(grep -o "claimed GPU [^ ]* of [0-9]* (slot [0-9]*" "$log" | head -1)
    gpu=$(echo "$slot" | awk '{print $3}'); s=$(echo "$slot" | awk '{print $7}')
    pid=$(head -1 "$INSTSIM_GPU_LOCK_DIR/gpu${gpu}.slot${s}.lock")
    # the time just before the signal: the kernel frees the lock when the process dies, after it, so a job that
    # takes the slot next always claims after this time
    t_kill=$(date +%s.%N); kill -9 "$pid"
    # the rerun after the resume writes a new log at the same path: keep the killed job's own
    mkdir -p "$results/logs/killed" && cp "$log" "$results/logs/killed/${kill_rule}_$(basename "$log")"
    log="$results/logs/killed/${kill_rule}_$(basename "$log")"
    sleep 0.2
    python3 - "$kills" "$log" "$t_kill" "$gpu" "$s" "$pid" "$results" <<'EOF'
import json, sys
from pathlib import Path
from instsim import gpus
kills, log, t, gpu, slot, killed, results = sys.argv[1:]
path = gpus._slot_file(Path(gpus.lock_dir()), gpu, int(slot))
# free, or already taken by a waiting job (which wrote its own pid into the file)
holder = path.read_text().strip()
free = not gpus._held(path) or holder != killed
with open(kills, "a") as f:
    f.write(json.dumps({"log": str(Path(log).relative_to(results)), "time": float(t), "gpu": gpu,
                        "slot": int(slot), "slot_free_after": bool(free), "killed_pid": int(killed),
                        "probe_holder": holder}) + "\n")
EOF
}

run() {  # name, then the environment prefix
    local name="$1"; shift
    rm -rf "$results" .snakemake "$INSTSIM_GPU_LOCK_DIR"
    : > "$out/kills_$name.jsonl"
    local start=$(date +%s) kpid="" rc
    if [ "$name" = all ] && [ "$kill_rule" != none ]; then killer "$out/kills_$name.jsonl" & kpid=$!; fi
    env "$@" timeout -k 10 "$limit" "${cmd[@]}" > "$out/$name.log" 2>&1; rc=$?
    [ -n "$kpid" ] && { kill "$kpid" 2>/dev/null; wait "$kpid" 2>/dev/null; }
    if [ "$rc" -ne 0 ] && [ -s "$out/kills_$name.jsonl" ]; then  # the killed job: resume as a user would
        left=$(( limit - ($(date +%s) - start) )); [ "$left" -lt 10 ] && left=10
        env "$@" timeout -k 10 "$left" "${cmd[@]}" >> "$out/$name.log" 2>&1; rc=$?
    fi
    echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/walls.txt"
    echo "$(( $(date +%s) - start )) $rc" > "$out/wall_$name.txt"
    if [ "$name" = all ]; then  # the one-GPU run claims nothing: CUDA_VISIBLE_DEVICES=0 is kept by every job
        python3 benchmarks/check_gpu_claims.py "$results" --kills "$out/kills_$name.jsonl" \
            --out "$out/claims_$name.json" > "$out/claims_$name.txt" 2>&1
    fi
    [ -f "$results"/eval/summary.tsv ] && cp "$results"/eval/summary.tsv "$out/summary_$name.tsv"
    tar czf "$out/results_$name.tgz" "$results"/benchmarks "$results"/logs "$results"/eval/*.tsv \
        "$results"/nerf/*/validation.json 2>/dev/null
}

for part in $parts; do
    case "$part" in
        all) run all ;;                          # every GPU: the profile's limit is GPUs x jobs per GPU
        one) run one CUDA_VISIBLE_DEVICES=0 ;;   # one card: the profile counts the listed device
    esac
done

python3 - "$out" "$build_s" "${cmd[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, build = Path(sys.argv[1]), int(sys.argv[2])
res = {"benchmark": "multi_gpu_run", "command": " ".join(sys.argv[3:]),
       "gpus": (out / "gpus.txt").read_text().splitlines(), "kernel_build_s": build, "runs": {}}
for name in ("all", "one"):
    if (out / f"wall_{name}.txt").exists():
        wall, rc = (out / f"wall_{name}.txt").read_text().split()
        claims = json.loads((out / f"claims_{name}.json").read_text()) if (out / f"claims_{name}.json").exists() else None
        res["runs"][name] = {"wall_s": int(wall), "exit": int(rc), "claims": claims,
                             "summary": (out / f"summary_{name}.tsv").read_text().splitlines() if (out / f"summary_{name}.tsv").exists() else None}
if {"all", "one"} <= set(res["runs"]):
    res["speedup_all_vs_one"] = round(res["runs"]["one"]["wall_s"] / max(1, res["runs"]["all"]["wall_s"]), 2)
    res["note"] = "the 'all' run includes a killed and resumed job (KILL_RULE) unless that was skipped"
(out / "multi_gpu_run.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
for name, r in res["runs"].items():
    c = r["claims"] or {}
    print(name, r["wall_s"], "s, exit", r["exit"], "| balanced", c.get("balanced"), "no_idle_wait", c.get("no_idle_wait"),
          "kill_frees", c.get("kill_frees"), "| problems", (c.get("problems") or [])[:3])
EOF
ls -la "$out"
