"""Neural-Sim's outer loop: learn the pose distribution psi by implicit differentiation through the detector's
training and the renderer (one iteration: :mod:`instsim.neuralsim.step`).

:func:`optimize_distribution` runs the loop: optional warm start of the detector on samples of the initial
psi, then ``iterations`` outer steps, a row of ``trajectory.tsv`` per iteration, periodic atomic checkpoints
(psi, both optimizers, theta, the sampling generator, the rows so far) that a killed run resumes from. With
``update_psi=False`` it is the *control*: the same samples, fine-tuning and validation, but psi never moves
(and the hypergradient is not computed), so a gain of the learned run can be told apart from the extra
fine-tuning the loop gives its detector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..detect import DetectorConfig, build_detector, param_groups, train_detector
from ..errors import ConfigError, InputError, InstsimError
from ..io import save_torch
from ..seeds import generator
from .config import NeuralSimConfig, psi_lr_at
from .distribution import PoseDistribution
from .objective import val_ap, val_loss_and_grad
from .resume import CHECKPOINT_FORMAT, describe_difference, fingerprint, read_checkpoint
from .samples import draw_samples, render_training_set
from .step import BilevelProblem, LoopState, NeuralSimError, outer_step
from .trajectory import flatten_row, psi_state, trajectory_columns, write_trajectory

__all__ = ["optimize_distribution"]

log = logging.getLogger(__name__)


def _check_problem(problem: BilevelProblem) -> None:
    classes = problem.classes
    missing = [c for c in classes if c not in problem.renders.centres]
    if missing:
        raise InputError(None, "centres", f"no look-at centre for {missing}")
    if problem.detector_cfg.num_classes != len(classes):
        raise ConfigError(None, "detector.num_classes",
                          f"{problem.detector_cfg.num_classes} but there are {len(classes)} classes")
    intr = problem.renders.camera.intrinsics
    if tuple(problem.val.images.shape[2:]) != (intr.h, intr.w):
        raise InputError(None, "target.image_size", f"val images are {tuple(problem.val.images.shape[2:])}, the "
                         f"detection camera is {(intr.h, intr.w)}")


def _pretrain(problem: BilevelProblem, dist: PoseDistribution, cfg: NeuralSimConfig, say) -> torch.nn.Module:
    """The warm-started detector (or a fresh one with ``pretrain_steps: 0``), on ``problem.device``."""
    det_cfg, device = problem.detector_cfg, problem.device
    if cfg.pretrain_steps == 0:
        return build_detector(det_cfg).to(device)
    samples = draw_samples(dist.space, dist.classes, cfg.pretrain_images_per_class, problem.renders.camera,
                           generator(cfg.seed, 1))
    train = render_training_set(problem.renders, dist, samples, cfg.temperature, cfg.relaxation)
    if len(train.images) == 0:
        raise NeuralSimError("Neural-Sim warm start: no rendered sample shows its object; check the NeRFs and pose space")
    pre_cfg = DetectorConfig.from_dict({**det_cfg.to_dict(), "steps": cfg.pretrain_steps})
    say(f"warm start: detector trained {cfg.pretrain_steps} steps on {len(train.images)} images of the initial psi")
    model = train_detector(train.images, train.boxes, train.labels, pre_cfg, progress=False, device=device)
    # the config of the loop's detector is the run's, not the warm start's step count
    model.cfg = det_cfg
    return model.to(device)


def _inner_optimizer(detector: torch.nn.Module, problem: BilevelProblem, cfg: NeuralSimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(detector, problem.detector_cfg.weight_decay), lr=cfg.inner_lr)


def _initial_row(problem: BilevelProblem, state: LoopState) -> dict[str, Any]:
    """Row 0: the warm-started detector's val loss/AP and the initial psi."""
    detector = state.detector
    detector.eval()
    params = tuple(p for p in detector.parameters() if p.requires_grad)
    val_loss, _ = val_loss_and_grad(detector, params, problem.val, problem.val_targets)
    row0 = {"val_loss": val_loss, "val_AP": val_ap(detector, problem.val, problem.classes),
            **psi_state(state.dist, problem.target_probs)}
    return flatten_row(0, row0)


def _say_row(say, it: int, cfg: NeuralSimConfig, row: Mapping[str, Any]) -> None:
    ap = f" AP {row['val_AP']:.3f}" if row["val_AP"] is not None else ""
    gn = f" |grad| {row['grad_norm']:.3g}" if row["grad_norm"] is not None else ""
    tv = f" TV {row['tv_to_target']:.3f}" if row["tv_to_target"] is not None else ""
    say(f"iteration {it}/{cfg.iterations}: L_val {row['val_loss']:.4f}{ap}{gn}{tv} ({row['seconds']:.1f} s)")


def optimize_distribution(
    problem: BilevelProblem,
    cfg: NeuralSimConfig,
    *,
    seed: int | None = None,
    update_psi: bool = True,
    init: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    checkpoint_path: str | Path | None = None,
    log_tsv: str | Path | None = None,
    max_iterations: int | None = None,
    progress: bool = True,
    on_iteration: Callable[[dict], None] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> tuple[PoseDistribution, torch.nn.Module, list[dict]]:
    """Run Neural-Sim (or, with ``update_psi=False``, its control) and return ``(dist, detector, rows)``.

    Args:
        problem: the renders, pose space, val set, detector config, target distribution and device.
        cfg: :class:`~instsim.neuralsim.config.NeuralSimConfig`.
        seed: overrides ``cfg.seed`` (the workflow derives it from the run seed and ``cfg.seed``).
        update_psi: False runs the control: psi stays exactly at its initial value.
        init: initial probabilities per class (default uniform).
        checkpoint_path: resume state, written atomically every ``cfg.checkpoint_every`` iterations and at the
            end; an existing one is resumed (refused if it belongs to another config, val set or mode).
        log_tsv: ``trajectory.tsv`` rewritten after every iteration (row 0: the initial state).
        max_iterations: stop after this many iterations in total (a checkpoint is written), e.g. to time-box.
        on_iteration: called with each new row (after it is logged).
        log_fn: one-line progress messages.

    Rows: ``iteration 0`` is the state before the loop (the warm-started detector's val loss/AP, the initial
    psi); row ``i`` holds the val loss/AP of the detector fine-tuned in iteration ``i`` on samples of
    ``psi_{i-1}``, the hypergradient norm at ``psi_{i-1}``, and the probabilities and TV of ``psi_i``. The
    returned detector is on the CPU.
    """
    say = log_fn or (lambda msg: log.info("%s", msg))
    if seed is not None:
        cfg = NeuralSimConfig.from_dict({**cfg.to_dict(), "seed": int(seed)})
    _check_problem(problem)
    tprobs = problem.target_probs
    if tprobs is not None:
        tprobs = problem.space.check_probs(tprobs, field="target distribution")
        problem = BilevelProblem(problem.renders, problem.space, problem.val, problem.detector_cfg, tprobs, problem.device)
    dist = PoseDistribution(problem.space, problem.classes, learned=cfg.learned, init=init)
    adam = torch.optim.Adam(dist.parameters(), lr=cfg.psi_lr)
    identity = {"config": cfg.to_dict(), "detector_config": problem.detector_cfg.to_dict(), "update_psi": bool(update_psi),
                "classes": problem.classes, "fingerprint": fingerprint(problem.val, problem.classes, problem.space, tprobs),
                "init": repr(init)}
    state = LoopState(dist, adam if update_psi else None, None, None, generator(cfg.seed, 2))
    run = _Run(problem, cfg, state, adam, identity, Path(checkpoint_path) if checkpoint_path is not None else None,
               log_tsv, say)
    run.start()
    stop = cfg.iterations if max_iterations is None else max(0, min(cfg.iterations, int(max_iterations)))
    run.iterate(stop, update_psi, progress, on_iteration)
    return dist, run.state.detector.cpu().eval(), run.rows


class _Run:
    """The mutable bookkeeping of one :func:`optimize_distribution` call: state, rows, the warm-start weights
    (``reset_detector``), the resume checkpoint and the last iteration saved to it."""

    def __init__(self, problem: BilevelProblem, cfg: NeuralSimConfig, state: LoopState, adam: torch.optim.Optimizer,
                 identity: dict, ckpt: Path | None, log_tsv: str | Path | None, say) -> None:
        self.problem, self.cfg, self.state, self.identity = problem, cfg, state, identity
        # the control keeps a psi optimizer too (never stepped) so that both modes checkpoint and resume alike
        self.adam = adam
        self.ckpt, self.log_tsv, self.say = ckpt, log_tsv, say
        self.columns = trajectory_columns(state.dist)
        self.rows: list[dict] = []
        self.start_iteration = 0
        self.warm: dict[str, torch.Tensor] | None = None
        self.last_saved: int | None = None

    def start(self) -> None:
        """Resume from the checkpoint if there is one, else warm-start the detector and log row 0."""
        problem, cfg, state = self.problem, self.cfg, self.state
        ck = None
        if self.ckpt is not None and self.ckpt.exists():
            ck = read_checkpoint(self.ckpt)
            for key, want in self.identity.items():
                if ck.get(key) != want:
                    raise ConfigError(self.ckpt, key, f"the resume checkpoint was made with another {key} "
                                      f"({describe_difference(ck.get(key), want)}); delete it to start over")
            state.dist.load_state_dict(ck["psi"])
            self.adam.load_state_dict(ck["psi_optimizer"])
            state.detector = build_detector(problem.detector_cfg).to(problem.device)
            state.detector.load_state_dict(ck["detector"])
            state.generator.set_state(ck["generator"])
            self.rows = [dict(r) for r in ck["rows"]]
            self.start_iteration = int(ck["iteration"])
            self.last_saved = self.start_iteration
            self.say(f"resumed Neural-Sim from {self.ckpt} at iteration {self.start_iteration}/{cfg.iterations}")
        else:
            state.detector = _pretrain(problem, state.dist, cfg, self.say)
        state.inner_optimizer = _inner_optimizer(state.detector, problem, cfg)
        if ck is not None and self.start_iteration > 0:
            state.inner_optimizer.load_state_dict(ck["inner_optimizer"])
        if cfg.reset_detector:
            weights = ck["warm_detector"] if ck is not None and self.start_iteration > 0 else state.detector.state_dict()
            self.warm = {k: t.detach().clone() for k, t in weights.items()}
        if not self.rows:
            self.rows.append(_initial_row(problem, state))
        self._write_trajectory()
        if self.ckpt is not None and ck is None:
            self.save(0)  # the warm start is not redone after a kill

    def save(self, iteration: int) -> None:
        if self.ckpt is None:
            return
        s = self.state
        save_torch({"format": CHECKPOINT_FORMAT, **self.identity, "iteration": iteration, "psi": s.dist.state_dict(),
                    "psi_optimizer": self.adam.state_dict(), "detector": s.detector.state_dict(),
                    "inner_optimizer": s.inner_optimizer.state_dict(), "generator": s.generator.get_state(),
                    "rows": self.rows, **({"warm_detector": self.warm} if self.warm is not None else {})}, self.ckpt)
        self.last_saved = iteration

    def _write_trajectory(self) -> None:
        if self.log_tsv is not None:
            write_trajectory(self.log_tsv, self.rows, self.columns)

    def iterate(self, stop: int, update_psi: bool, progress: bool, on_iteration) -> None:
        """Outer iterations ``start+1 .. stop``, then the final checkpoint."""
        cfg, start = self.cfg, self.start_iteration
        mode = "Neural-Sim" if update_psi else "Neural-Sim control (psi frozen)"
        if start < stop:
            self.say(f"{mode}: iterations {start + 1}..{stop} of {cfg.iterations}, {cfg.images_per_class} images per "
                     f"class, {cfg.inner_steps} inner steps, inverse HVP {cfg.inverse_hvp.method}, learned {list(cfg.learned)}")
        bar = tqdm(total=stop, initial=min(start, stop), desc="neuralsim", unit="it", disable=not progress or start >= stop)
        try:
            for it in range(start + 1, stop + 1):
                self._iteration(it, bar)
                if it % cfg.checkpoint_every == 0 and it < stop:
                    self.save(it)
                if on_iteration is not None:
                    on_iteration(self.rows[-1])
        finally:
            bar.close()
        if start < stop or (self.ckpt is not None and not self.ckpt.exists()):
            self.save(stop)

    def _iteration(self, it: int, bar) -> None:
        cfg, state = self.cfg, self.state
        for group in self.adam.param_groups:
            group["lr"] = psi_lr_at(cfg, it)
        if self.warm is not None:
            state.detector.load_state_dict(self.warm)
            state.inner_optimizer = _inner_optimizer(state.detector, self.problem, cfg)
        try:
            row = outer_step(it, self.problem, state, cfg,
                             compute_ap=(it % cfg.eval_every == 0) or it == cfg.iterations or it == 1)
        except InstsimError as e:  # NeuralSimError, or the fine-tune's DetectorTrainingError
            where = (f" The last good checkpoint (iteration {self.last_saved}) is kept: {self.ckpt}."
                     if self.last_saved is not None else "")
            raise NeuralSimError(f"{str(e).rstrip('.')}.{where}") from None
        self.rows.append(flatten_row(it, row))
        self._write_trajectory()
        bar.update(1)
        bar.set_postfix(val_loss=f"{row['val_loss']:.3f}",
                        tv=f"{row['tv_to_target']:.3f}" if row["tv_to_target"] is not None else "-")
        _say_row(self.say, it, cfg, row)
