"""Diagnostic: does Neural-Sim's azimuth hypergradient point toward the target, and does the signal exist at all?

On the NeRFs and target/val of a finished workflow run, from a detector warm-started on uniform renders
(cached under ``--cache``), it measures at uniform psi:

* ``finetune``: the ground truth at this scale: fine-tune copies of the warm detector ``--ft-steps`` steps on
  renders of one azimuth bin (every class; elevation and zoom uniform) and report the val loss per bin
  (lower: that bin's images help the target more), next to fine-tuning on uniform renders;
* ``influence``: the first-order influence of each bin's images, ``-(dL_train_i/dtheta) . u`` averaged per
  bin (what upweighting that bin would do to L_val; no renderer involved);
* ``hypergrad``: the hypergradient ``dL_val/dpsi_azimuth`` of :func:`~instsim.neuralsim.loop.outer_step` (the
  loop's own code path, inner steps 0, no clipping, psi not moved) per relaxation, averaged over classes and
  ``--draws`` independent sample draws, with its standard error, and its cosine with the direction toward
  the target (centred target logits): positive means descent moves psi toward the target.

    python benchmarks/diag_neuralsim.py [--results results] [--warm-steps 300] [--draws 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instsim.poses import PoseSpace
from instsim.detect import (
    DetectorConfig,
    detection_loss,
    finetune,
    load_detector,
    param_groups,
    save_detector,
    train_detector,
)
from instsim.io import read_json
from instsim.neuralsim.distribution import PoseDistribution
from instsim.neuralsim.config import NeuralSimConfig
from instsim.neuralsim.implicit import inverse_hvp, make_hvp
from instsim.neuralsim.objective import ValSet, detector_targets, val_loss_and_grad
from instsim.neuralsim.samples import ClassRenderers
from instsim.neuralsim.step import BilevelProblem, LoopState, outer_step
from instsim.seeds import generator
from instsim.stages.strategies import detector_config, load_class_nerfs, load_coco_images
from instsim.synthesis import DetectionCamera, make_synthetic_set

REPO = Path(__file__).resolve().parents[1]


def _bin_probs(space: PoseSpace, classes, one_bin: int | None, factor: str = "azimuth"):
    """Per-class probabilities: uniform, or all of ``factor``'s mass on ``one_bin``."""
    uni = {f: torch.tensor(v, dtype=torch.float64) for f, v in space.uniform().items()}
    if one_bin is not None:
        uni[factor] = torch.nn.functional.one_hot(torch.tensor(one_bin), space.factor(factor).bins).double()
    return {c: uni for c in classes}


def _synth(ctx, one_bin, n, seed, factor: str = "azimuth"):
    probs = _bin_probs(ctx["space"], ctx["classes"], one_bin, factor)
    camera = DetectionCamera.from_target_config(ctx["cfg"]["target"])
    s = make_synthetic_set(ctx["models"], ctx["centres"], probs, ctx["space"], camera, n, seed, radii=ctx["radii"])
    return s.images.permute(0, 3, 1, 2).contiguous(), [b[None] for b in s.boxes], [l[None] for l in s.labels]


def warm_detector(ctx, steps: int, n: int, cache: Path):
    """A detector trained ``steps`` steps on ``n`` uniform renders per class (cached)."""
    path = cache / f"warm_{steps}_{n}.pt"
    det_cfg = DetectorConfig.from_dict({**ctx["det"].to_dict(), "steps": steps})
    if path.exists():
        model = load_detector(path)
    else:
        x, b, l = _synth(ctx, None, n, seed=12345)
        model = train_detector(x, b, l, det_cfg, progress=False)
        save_detector(model, path)
    model.cfg = ctx["det"]
    return model.eval()


def val_loss(model, ctx) -> float:
    params = tuple(p for p in model.parameters() if p.requires_grad)
    return val_loss_and_grad(model, params, ctx["val"], ctx["val_targets"])[0]


def measure_finetune(ctx, warm, steps: int, n: int, lr: float, seeds, factor: str = "azimuth") -> dict:
    """Val loss after fine-tuning on one ``factor`` bin's renders (and on uniform ones), mean over seeds."""
    out = {}
    for b in [None] + list(range(ctx["space"].factor(factor).bins)):
        losses = []
        for s in seeds:
            x, bx, lb = _synth(ctx, b, n, seed=777 + s, factor=factor)
            m = copy.deepcopy(warm)
            opt = torch.optim.AdamW(param_groups(m, m.cfg.weight_decay), lr=lr)
            finetune(m, x, bx, lb, steps, seed=s, optimizer=opt)
            losses.append(val_loss(m.eval(), ctx))
        out["uniform" if b is None else b] = sum(losses) / len(losses)
        print("finetune", b, out["uniform" if b is None else b], flush=True)
    return out


def measure_influence(ctx, warm, n: int, method: str) -> dict:
    """Per azimuth bin, mean of ``-(dL_train_i/dtheta) . u`` over ``n`` renders per class (u = H^-1 v)."""
    params = tuple(p for p in warm.parameters() if p.requires_grad)
    _, v = val_loss_and_grad(warm, params, ctx["val"], ctx["val_targets"])
    out = {}
    for b in range(ctx["space"].factor("azimuth").bins):
        x, bx, lb = _synth(ctx, b, n, seed=999)
        t = detector_targets(bx, lb, x, warm.cfg, x.dtype)
        if method == "identity":
            u = v
        else:
            u = inverse_hvp(make_hvp(lambda p, x=x, t=t: detection_loss(warm, x, t), params), v, method, 5, 0.01, 0.01)
        vals = []
        for i in range(len(x)):
            g = torch.autograd.grad(detection_loss(warm, x[i:i + 1], t.index(slice(i, i + 1))), params, allow_unused=True)
            vals.append(-sum(float((gi * ui).sum()) for gi, ui in zip(g, u) if gi is not None))
        out[b] = sum(vals) / len(vals)
        print("influence", method, b, out[b], flush=True)
    return out


def measure_hypergrad(ctx, warm, ns: NeuralSimConfig, draws: int, seed: int) -> dict:
    """Mean and standard error over draws (and classes) of dL_val/dpsi_azimuth at uniform psi, with the loop's
    own outer_step (0 inner steps, no clipping, psi not moved: SGD with lr 0)."""
    ns = NeuralSimConfig.from_dict({**ns.to_dict(), "inner_steps": 0, "grad_clip": 0.0, "learned": ["azimuth"]})
    space = ctx["space"]
    renders = ClassRenderers(ctx["models"], ctx["centres"], DetectionCamera.from_target_config(ctx["cfg"]["target"]), ctx["radii"])
    problem = BilevelProblem(renders, space, ctx["val"], ctx["det"])
    gen = generator(seed, 99)
    per = []
    for d in range(draws):
        dist = PoseDistribution(space, ctx["classes"], learned=["azimuth"])
        sgd = torch.optim.SGD(dist.parameters(), lr=0.0)
        det = copy.deepcopy(warm)
        inner = torch.optim.AdamW(param_groups(det, det.cfg.weight_decay), lr=ns.inner_lr)
        outer_step(d + 1, problem, LoopState(dist, sgd, det, inner, gen), ns, compute_ap=False)
        for c in ctx["classes"]:
            per.append(dist.learned_parameters(c)["azimuth"].grad.detach().double().clone())
    g = torch.stack(per)  # (draws * classes, bins)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
    tgt = torch.log(torch.tensor(ctx["target"]["azimuth"], dtype=torch.float64))
    want = tgt - tgt.mean()  # direction of logits toward the target
    cos = float(torch.nn.functional.cosine_similarity(-mean, want, dim=0))
    per_cos = [float(torch.nn.functional.cosine_similarity(-x, want, dim=0)) for x in g]
    return {"mean": mean.tolist(), "se": se.tolist(), "cos_descent_vs_target": cos,
            "frac_samples_cos_pos": sum(c > 0 for c in per_cos) / len(per_cos), "n": len(g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/nsdiag"))
    ap.add_argument("--warm-steps", type=int, default=300)
    ap.add_argument("--warm-images", type=int, default=96)
    ap.add_argument("--measure", nargs="+", default=["finetune", "influence", "hypergrad"])
    ap.add_argument("--ft-steps", type=int, default=20)
    ap.add_argument("--ft-images", type=int, default=24)
    ap.add_argument("--ft-seeds", type=int, default=2)
    ap.add_argument("--ft-factor", default="azimuth", help="factor whose bins the finetune measure compares")
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--relaxations", nargs="+", default=["soft"])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.5])
    ap.add_argument("--inverse", nargs="+", default=["identity"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(args.config.read_text())
    classes = sorted(cfg["classes"])
    space = PoseSpace.from_config(cfg["pose_space"])
    r = args.results
    models, centres, radii = load_class_nerfs({c: r / f"nerf/{c}/checkpoint.pt" for c in classes},
                                       {c: r / f"data/{c}/intrinsics.json" for c in classes}, "cpu")
    coco, images, boxes, labels = load_coco_images(r / "target/val/annotations.json", r / "target/val/images")
    det = detector_config(cfg["detector"]["settings"], cfg["target"]["image_size"], len(classes), cfg["seed"])
    val = ValSet(images, boxes, labels, coco)
    ctx = {"cfg": cfg, "classes": classes, "space": space, "models": models, "centres": centres, "radii": radii, "val": val, "det": det,
           "val_targets": detector_targets(boxes, labels, images, det, torch.float32),
           "target": read_json(r / "target/val/distribution.json")["probabilities"]}
    t0 = time.perf_counter()
    warm = warm_detector(ctx, args.warm_steps, args.warm_images, args.cache)
    res = {"warm_steps": args.warm_steps, "warm_val_loss": val_loss(warm, ctx), "target_azimuth": ctx["target"]["azimuth"],
           "loadavg": os.getloadavg()}
    print("warm val loss", res["warm_val_loss"], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    ns = NeuralSimConfig.from_dict(cfg["neuralsim"])
    if "finetune" in args.measure:
        res["finetune"] = measure_finetune(ctx, warm, args.ft_steps, args.ft_images, ns.inner_lr, range(args.ft_seeds),
                                           args.ft_factor)
        res["finetune_factor"] = args.ft_factor
    if "influence" in args.measure:
        res["influence"] = {m: measure_influence(ctx, warm, 8, m) for m in args.inverse}
    if "hypergrad" in args.measure:
        res["hypergrad"] = {}
        for relax in args.relaxations:
            for tau in args.temperatures:
                for inv in args.inverse:
                    extra = {"temperature": tau, "inverse_hvp": {"method": inv, "k": 5, "alpha": 0.01, "damping": 0.01}}
                    if relax != "soft":
                        extra["relaxation"] = relax
                    key = f"{relax}/tau={tau}/{inv}"
                    t1 = time.perf_counter()
                    res["hypergrad"][key] = measure_hypergrad(ctx, warm, NeuralSimConfig.from_dict({**ns.to_dict(), **extra}),
                                                              args.draws, seed=0)
                    res["hypergrad"][key]["seconds"] = time.perf_counter() - t1
                    print("hypergrad", key, json.dumps(res["hypergrad"][key]), flush=True)
    res["seconds"] = time.perf_counter() - t0
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
