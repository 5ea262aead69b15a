"""Which hypergradient estimator points where single-bin fine-tuning says, per pose factor? And which inverse HVP?

On the NeRFs and target/val of a finished run (``--results``), from a detector warm-started on uniform renders:

* ``ground_truth``: per factor and bin, fine-tune copies of the warm detector ``--ft-steps`` steps on renders whose
  factor is all in that bin (the other factors uniform, every class) and take ``L_val`` (mean of ``--ft-seeds``).
  At uniform psi the hypergradient's logit ``b`` component is, to first order, ``p_b (L_b - mean L)``: so
  ``L_b - mean L`` is the direction a correct ``dL_val/dpsi`` points in.
* ``estimators``: ``--draws`` independent iterations of the loop's own code at uniform psi (samples drawn, inner
  fine-tuning as configured from the warm detector, ``v``, one ``u`` shared by all estimators), each estimator's
  ``dL_val/dpsi`` per class and factor. Reported per factor: the cosine of the mean (over draws and classes) with
  the ground truth, the share of single class-draws with a positive cosine, the relative standard error
  (``|se| / |mean|``) and the seconds per estimate.
* ``inverse``: on the first ``--inverse-draws`` draws, ``lambda_max`` of the training loss's Hessian (20 power iterations) and, per
  inverse-HVP setting, the cosine of its per-image influences ``-(dl_i/dtheta) . u`` with those of a reference
  ``u`` (CG, 50 steps, damping 0.01), and its HVP count.

    python benchmarks/neuralsim_estimators.py --results results --out benchmarks/results/neuralsim_estimators.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instsim.detect import DetectorConfig, detection_loss, finetune, train_detector  # noqa: E402
from instsim.detect.train import param_groups  # noqa: E402
from instsim.poses import PoseSpace  # noqa: E402
from instsim.io import read_json  # noqa: E402
from instsim.neuralsim.config import InverseHVPConfig, NeuralSimConfig  # noqa: E402
from instsim.neuralsim.distribution import PoseDistribution  # noqa: E402
from instsim.neuralsim.estimator import ESTIMATORS  # noqa: E402
from instsim.neuralsim.hypergradient import hypergradient, inverse_hvp_of_training_loss  # noqa: E402
from instsim.neuralsim.implicit import influences, lambda_max, make_hvp  # noqa: E402
from instsim.detect.loss import loss_terms  # noqa: E402
from instsim.detect.model import DetectorOutput  # noqa: E402
from instsim.neuralsim.objective import ValSet, detector_targets, float_images, val_ap, val_loss_and_grad  # noqa: E402
from instsim.neuralsim.samples import ClassRenderers, draw_samples, render_training_set  # noqa: E402
from instsim.seeds import generator  # noqa: E402
from instsim.stages.strategies import detector_config, load_class_nerfs, load_coco_images  # noqa: E402
from instsim.synthesis import DetectionCamera, make_synthetic_set  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

INVERSES = {
    "neumann_fixed_a0.01_k5": InverseHVPConfig("neumann", 5, 0.01, 0.01, 0),
    "neumann_guarded_k5": InverseHVPConfig("neumann", 5, 0.01, 0.01, 8),
    "cg_k5_d0.01": InverseHVPConfig("cg", 5, 0.01, 0.01, 0),
    "cg_k10_d0.1": InverseHVPConfig("cg", 10, 0.01, 0.1, 0),
    "identity": InverseHVPConfig("identity", 0, 0.01, 0.0, 0),
}


def _synth(ctx, probs, n, seed):
    s = make_synthetic_set(ctx["models"], ctx["centres"], probs, ctx["space"], ctx["camera"], n, seed, radii=ctx["radii"])
    return s.images.permute(0, 3, 1, 2).contiguous(), [b[None] for b in s.boxes], [l[None] for l in s.labels]


def _val_loss(model, ctx) -> float:
    params = tuple(p for p in model.parameters() if p.requires_grad)
    return val_loss_and_grad(model, params, ctx["val"], ctx["val_targets"])[0]


def _val_terms(model, ctx) -> dict[str, float]:
    """The val loss's terms (heatmap focal, size, offset; unweighted means over the val images) and the val AP."""
    val = ctx["val"]
    p0 = next(model.parameters())
    with torch.no_grad():
        x = float_images(val.images, p0.dtype).to(p0.device)
        terms = loss_terms(DetectorOutput(*model(x)), ctx["val_targets"].to(p0.device), model.cfg)
    out = {k: float(v.mean()) for k, v in terms.items()}
    out["AP"] = val_ap(model, val, ctx["classes"])
    return out


def ground_truth(ctx, warm, steps, n, lr, seeds, mix: float = 1.0) -> dict:
    """Per factor: val loss after fine-tuning on each bin's renders, and the centred direction. ``mix``: the share of
    the fine-tuning set in that bin (1: single bin; below 1 the rest is uniform, a smaller, more local move of psi)."""
    space, out = ctx["space"], {}
    for f in space.FACTORS:
        losses, terms = [], []
        for b in range(space.factor(f).bins):
            uni = {k: v.clone() for k, v in space.uniform().items()}
            one = torch.nn.functional.one_hot(torch.tensor(b), space.factor(f).bins).double()
            uni[f] = mix * one + (1.0 - mix) * uni[f]
            vals, parts = [], []
            for s in seeds:
                x, bx, lb = _synth(ctx, {c: uni for c in ctx["classes"]}, n, seed=777 + s)
                m = copy.deepcopy(warm)
                finetune(m, x, bx, lb, steps, seed=s, optimizer=torch.optim.AdamW(param_groups(m, m.cfg.weight_decay), lr=lr))
                vals.append(_val_loss(m.eval(), ctx))
                parts.append(_val_terms(m, ctx))
            losses.append(sum(vals) / len(vals))
            terms.append({k: sum(q[k] for q in parts) / len(parts) for k in parts[0]})
            print("ground truth", f, b, losses[-1], terms[-1], flush=True)
        mean = sum(losses) / len(losses)
        out[f] = {"val_loss_per_bin": losses, "direction": [v - mean for v in losses],
                  "val_terms_per_bin": {k: [t[k] for t in terms] for k in terms[0]}}
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def measure(ctx, warm, ns: NeuralSimConfig, draws: int, gt: dict, inverse_draws: int, on_draw=None) -> tuple[dict, dict]:
    space, classes = ctx["space"], ctx["classes"]
    gen = generator(ns.seed, 99)
    grads = {e: {f: [] for f in space.FACTORS} for e in ESTIMATORS}
    secs = {e: [] for e in ESTIMATORS}
    inv_rows = []
    for d in range(draws):
        dist = PoseDistribution(space, classes, learned=list(space.FACTORS))
        det = copy.deepcopy(warm)
        samples = draw_samples(space, classes, ns.images_per_class, ctx["camera"], gen)
        train = render_training_set(ctx["renders"], dist, samples, ns.temperature, ns.relaxation)
        finetune(det, train.images, train.boxes, train.labels, ns.inner_steps, batch_size=ns.inner_batch_size, seed=d,
                 augment=False, optimizer=torch.optim.AdamW(param_groups(det, det.cfg.weight_decay), lr=ns.inner_lr))
        det.eval()
        det.to(ctx["device"])
        params = tuple(p for p in det.parameters() if p.requires_grad)
        _, v = val_loss_and_grad(det, params, ctx["val"], ctx["val_targets"])
        x = train.images.to(device=params[0].device, dtype=params[0].dtype)
        targets = detector_targets(train.boxes, train.labels, x, det.cfg, x.dtype).to(x.device)
        t0 = time.perf_counter()
        info: dict = {}
        u = inverse_hvp_of_training_loss(det, params, x, targets, v, ns.inverse_hvp, info)
        t_u = time.perf_counter() - t0
        for e in ESTIMATORS:
            out = hypergradient(d, ctx["renders"], dist, det, det.cfg, ns, samples, train, params, v, estimator=e, u=u)
            secs[e].append(out["seconds"] + t_u)
            for c in classes:
                for f, p in dist.learned_parameters(c).items():
                    grads[e][f].append(p.grad.detach().double().cpu().clone())
        if d < inverse_draws:
            hvp_fn = make_hvp(lambda p: detection_loss(det, x, targets), params)
            lam = lambda_max(hvp_fn, v, 20)
            per_image = lambda p: detection_loss(det, x, targets, reduction="none")  # noqa: E731
            ref = inverse_hvp_of_training_loss(det, params, x, targets, v, InverseHVPConfig("cg", 50, 0.01, 0.01, 0))
            ref_i = influences(per_image, params, ref)
            row = {"lambda_max": lam, "old_neumann_alpha_times_lambda": 0.01 * lam}
            for name, ih in INVERSES.items():
                t1 = time.perf_counter()
                inf: dict = {}
                uu = inverse_hvp_of_training_loss(det, params, x, targets, v, ih, inf)
                row[name] = {"influence_cos_vs_cg50": _cos(influences(per_image, params, uu), ref_i),
                             "hvps": inf.get("hvps"), "alpha": inf.get("alpha"), "seconds": time.perf_counter() - t1}
            inv_rows.append(row)
            print("inverse", json.dumps(row), flush=True)
        print(f"draw {d + 1}/{draws} done", flush=True)
        if on_draw is not None:
            on_draw(*summarize(space, grads, secs, inv_rows, gt), d + 1)
    return summarize(space, grads, secs, inv_rows, gt)


def summarize(space: PoseSpace, grads: dict, secs: dict, inv_rows: list, gt: dict) -> tuple[dict, dict]:
    """Per estimator and factor: the mean gradient's cosine with the ground truth, the share of single class-draws
    with a positive cosine, the relative standard error; per inverse HVP: the influence cosine with CG-50."""
    res = {}
    for e in ESTIMATORS:
        res[e] = {"seconds_per_estimate": sum(secs[e]) / len(secs[e])}
        for f in space.FACTORS:
            g = torch.stack(grads[e][f])
            want = torch.tensor(gt[f]["direction"], dtype=torch.float64) if f in gt else None
            mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
            entry = {"mean": mean.tolist(), "se": se.tolist(), "rel_se": float(se.norm() / mean.norm().clamp_min(1e-30)),
                     "n": len(g)}
            if want is not None and g.shape[1] > 1:
                entry["cos_mean_vs_ground_truth"] = _cos(mean, want)
                entry["share_single_cos_positive"] = sum(_cos(x_, want) > 0 for x_ in g) / len(g)
            res[e][f] = entry
        print("estimator", e, json.dumps({f: {k: res[e][f].get(k) for k in ("cos_mean_vs_ground_truth", "share_single_cos_positive", "rel_se")}
                                          for f in space.FACTORS}), flush=True)
    inv = {}
    if inv_rows:
        inv["lambda_max"] = [r["lambda_max"] for r in inv_rows]
        for name in INVERSES:
            inv[name] = {k: sum(r[name][k] for r in inv_rows) / len(inv_rows) for k in ("influence_cos_vs_cg50", "seconds")}
            inv[name]["hvps"] = inv_rows[0][name]["hvps"]
    return res, inv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warm-steps", type=int, default=300)
    ap.add_argument("--warm-images", type=int, default=64)
    ap.add_argument("--ft-steps", type=int, default=20)
    ap.add_argument("--ft-images", type=int, default=24)
    ap.add_argument("--ft-seeds", type=int, default=2)
    ap.add_argument("--ft-mix", type=float, default=1.0, help="share of the ground truth's fine-tuning set in the bin")
    ap.add_argument("--inverse-hvp", default=None, help="JSON overrides of neuralsim.inverse_hvp for the shared u")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--inverse-draws", type=int, default=2, help="draws on which the inverse HVPs are compared")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = yaml.safe_load(args.config.read_text())
    classes = sorted(cfg["classes"])
    space = PoseSpace.from_config(cfg["pose_space"])
    r = args.results
    models, centres, radii = load_class_nerfs({c: r / f"nerf/{c}/checkpoint.pt" for c in classes},
                                              {c: r / f"data/{c}/intrinsics.json" for c in classes}, args.device)
    coco, images, boxes, labels = load_coco_images(r / "target/val/annotations.json", r / "target/val/images")
    det_cfg = detector_config(cfg["detector"]["settings"], cfg["target"]["image_size"], len(classes), cfg["seed"])
    camera = DetectionCamera.from_target_config(cfg["target"])
    ctx = {"classes": classes, "space": space, "models": models, "centres": centres, "radii": radii, "camera": camera,
           "renders": ClassRenderers(models, centres, camera, radii), "val": ValSet(images, boxes, labels, coco),
           "val_targets": detector_targets(boxes, labels, images, det_cfg, torch.float32), "device": args.device}
    ns_dict = dict(cfg["neuralsim"])
    if args.inverse_hvp:
        ns_dict["inverse_hvp"] = {**ns_dict["inverse_hvp"], **json.loads(args.inverse_hvp)}
    ns = NeuralSimConfig.from_dict(ns_dict)
    t0 = time.perf_counter()
    x, bx, lb = _synth(ctx, {c: space.uniform() for c in classes}, args.warm_images, seed=12345)
    warm = train_detector(x, bx, lb, DetectorConfig.from_dict({**det_cfg.to_dict(), "steps": args.warm_steps}), progress=False,
                          device=args.device)
    warm.cfg = det_cfg
    warm = warm.to(args.device).eval()
    res = {"benchmark": "neuralsim_estimators", "script": "benchmarks/neuralsim_estimators.py", "config": str(args.config),
           "device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "cuda_device": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
           "neuralsim": ns.to_dict(), "warm_steps": args.warm_steps, "warm_val_loss": _val_loss(warm, ctx),
           "target": read_json(r / "target/val/distribution.json")["probabilities"], "draws": args.draws,
           "ft": {"steps": args.ft_steps, "images_per_class": args.ft_images, "seeds": args.ft_seeds, "mix": args.ft_mix}}

    def write(estimators: dict | None = None, inverse: dict | None = None, draws_done: int = 0) -> None:
        # rewritten after the ground truth and after every draw, so a time-boxed run keeps what it measured
        res.update(estimators=estimators, inverse=inverse, draws_done=draws_done, seconds=time.perf_counter() - t0)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1) + "\n")
            tmp.replace(args.out)

    res["warm_val_terms"] = _val_terms(warm, ctx)
    res["ground_truth"] = ground_truth(ctx, warm, args.ft_steps, args.ft_images, ns.inner_lr, range(args.ft_seeds),
                                       args.ft_mix)
    write()
    if args.draws > 0:
        write(*measure(ctx, warm, ns, args.draws, res["ground_truth"], args.inverse_draws, on_draw=write), args.draws)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
