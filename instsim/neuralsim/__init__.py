"""instsim.neuralsim: Neural-Sim, the bilevel optimization of a pose distribution through a renderer and a
detector.

The core, independent of NeRFs and detectors:

* :mod:`.distribution` -- :class:`PoseDistribution`, the learned per-class categorical distributions psi over
  binned pose factors (azimuth / elevation / zoom), ``distribution.json`` I/O and TV distances.
* :mod:`.sampling` -- Gumbel-softmax relaxed pose samples whose noise is stored, so the images rendered
  without gradient can be re-rendered identically with gradient through the poses.
* :mod:`.implicit` -- Hessian-vector products, inverse-HVP (identity / Neumann / CG) and implicit
  hypergradients, including the per-image form used by the outer loop (minus sign applied).

The outer loop, which renders through :mod:`instsim.synthesis` and trains an :mod:`instsim.detect` detector:

* :mod:`.config` -- :class:`~.config.NeuralSimConfig`, the config's ``neuralsim`` section;
* :mod:`.samples` -- the stored samples of each class and their renders with and without gradient;
* :mod:`.objective` -- the val set, ``L_val`` and its gradient, the val AP;
* :mod:`.step` -- one outer iteration; :mod:`.loop` -- :func:`~.loop.optimize_distribution`;
* :mod:`.trajectory` -- ``trajectory.tsv``; :mod:`.resume` -- resume checkpoints.

Typical outer-loop iteration (per class ``c``; ``render`` and the detector come from elsewhere)::

    noise = draw_noise(dist.space, K, gen)
    with torch.no_grad():
        _, c2w = relaxed_poses(dist, c, noise, tau)
        images = render(c2w)                                    # (K, 3, H, W)
    ...fine-tune theta on images (N steps from the previous theta)...
    v = param_grad(val_loss_fn, params)                          # dL_val/dtheta on target/val
    u = inverse_hvp(make_hvp(lambda p: train_loss_fn(p, images), params), v, "neumann", k, alpha)
    g = implicit_image_grad(train_loss_fn, params, images, u)   # = -d/dx[(dL_train/dtheta).u]
    _, c2w = relaxed_poses(dist, c, noise, tau)                  # same noise, same psi -> same poses
    render(c2w).backward(gradient=g)                             # psi.grad += dL_val/dpsi
    clip_grad_norm_(dist.parameters(), max_norm); adam.step(); adam.zero_grad()
"""

from .distribution import LOGIT_FLOOR_PROB, PoseDistribution, tv_distance
from .implicit import (
    InverseHVPMethod,
    Params,
    hvp,
    implicit_gradient,
    implicit_image_grad,
    inverse_hvp,
    make_hvp,
    param_grad,
)
from .sampling import (
    RELAXATIONS,
    RelaxedSample,
    draw_noise,
    hard_bins,
    is_circular,
    poses_from_values,
    relaxed_pose_values,
    relaxed_poses,
    to_pose_sample,
    value_bins,
)

__all__ = [
    "LOGIT_FLOOR_PROB",
    "RELAXATIONS",
    "InverseHVPMethod",
    "Params",
    "PoseDistribution",
    "RelaxedSample",
    "draw_noise",
    "hard_bins",
    "hvp",
    "implicit_gradient",
    "implicit_image_grad",
    "inverse_hvp",
    "is_circular",
    "make_hvp",
    "param_grad",
    "poses_from_values",
    "relaxed_pose_values",
    "relaxed_poses",
    "to_pose_sample",
    "tv_distance",
    "value_bins",
]
