"""Implicit (hyper)gradients of a bilevel problem: Hessian-vector products, inverse-HVP, and the gradient of
the validation loss with respect to the data-distribution parameters psi.

Bilevel problem: ``theta*(psi) = argmin_theta L_train(theta, psi)``, minimize ``L_val(theta*(psi), psi)``.
The implicit-function theorem gives::

    dL_val/dpsi = dL_val/dpsi|_direct - (dL_val/dtheta) H^{-1} d^2 L_train / (dtheta dpsi),
    H = d^2 L_train / dtheta^2  at theta*.

With ``v = dL_val/dtheta`` and ``u ~ H^{-1} v`` (:func:`inverse_hvp`) the second term is
``-d/dpsi [ (dL_train/dtheta) . u ]`` with ``u`` held constant -- note the **minus sign** (the published
Neural-Sim code drops it; without it the optimizer ascends the validation loss).

In Neural-Sim, psi reaches ``L_train`` only through the rendered images ``x(psi)``, so the outer loop
uses :func:`implicit_image_grad`, which returns ``-d/dx [ (dL_train/dtheta) . u ]`` per image (minus sign
included); backpropagating it through the re-rendered images, ``x.backward(gradient=g)``, leaves
``dL_val/dpsi`` in ``psi.grad``.

Parameters are sequences of tensors (e.g. ``[p for p in model.parameters() if p.requires_grad]``); every
vector in parameter space (``v``, ``u``, HVPs) is a tuple of tensors with the same shapes. Loss closures
take the parameter tuple as their first argument; a closure over an ``nn.Module`` may ignore it and use
the module (whose parameters *are* those tensors).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Literal, MutableMapping, Sequence

import torch

__all__ = [
    "INVERSE_HVP_METHODS",
    "NEUMANN_SAFETY",
    "Params",
    "param_grad",
    "make_hvp",
    "hvp",
    "inverse_hvp",
    "implicit_gradient",
    "implicit_image_grad",
    "implicit_input_grads",
    "influences",
    "InverseHVPMethod",
    "lambda_max",
]

Params = Sequence[torch.Tensor]
Vector = tuple[torch.Tensor, ...]
InverseHVPMethod = Literal["identity", "neumann", "cg"]

#: every inverse-HVP method :func:`inverse_hvp` implements, in one place (the config validation and the
#: schema's enum are checked against it)
INVERSE_HVP_METHODS: tuple[str, ...] = ("identity", "neumann", "cg")

#: the curvature-guarded Neumann step is ``alpha <= NEUMANN_SAFETY / lambda_max_estimate``. Power iteration
#: under-estimates lambda_max (a Rayleigh quotient), and with ``alpha = 1 / lambda_est`` every eigen-direction up to
#: ``2 lambda_est`` still has ``|1 - alpha lambda| <= 1``: no sign flip, no divergence.
NEUMANN_SAFETY = 1.0


# ---------------------------------------------------------------------------------------------------------
# small vector-space helpers on tuples of tensors
# ---------------------------------------------------------------------------------------------------------


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _axpy(alpha: float | torch.Tensor, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vector:
    """``alpha * x + y``."""
    return tuple(alpha * xi + yi for xi, yi in zip(x, y))


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Vector:
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, like))


def param_grad(loss_fn: Callable[[Params], torch.Tensor], params: Params) -> Vector:
    """``dloss/dparams`` as a detached tuple (zeros for parameters the loss does not use), e.g. the
    validation gradient ``v = dL_val/dtheta``."""
    params = tuple(params)
    grads = torch.autograd.grad(loss_fn(params), params, allow_unused=True)
    return tuple(g.detach() for g in _zeros_for_none(grads, params))


# ---------------------------------------------------------------------------------------------------------
# Hessian-vector products
# ---------------------------------------------------------------------------------------------------------


def _hvp_from_grads(grads: Sequence[torch.Tensor | None], params: Vector) -> Callable[[Params], Vector]:
    """HVP closure from first-order gradients computed with ``create_graph=True``."""
    pairs = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def fn(vec: Params) -> Vector:
        if not pairs:  # loss at most linear in every parameter: H = 0
            return tuple(torch.zeros_like(p) for p in params)
        out = torch.autograd.grad(
            [grads[i] for i in pairs],
            params,
            grad_outputs=[vec[i].detach().to(grads[i].dtype) for i in pairs],
            retain_graph=True,
            allow_unused=True,
        )
        return tuple(o.detach() for o in _zeros_for_none(out, params))

    return fn


def make_hvp(loss_fn: Callable[[Params], torch.Tensor], params: Params) -> Callable[[Params], Vector]:
    """A reusable Hessian-vector product ``vec -> H vec`` with ``H = d^2 loss / dparams^2`` at ``params``.

    The loss and its gradient graph are built once (double backprop, ``create_graph=True``); each call
    costs one extra backward pass. The graph is kept alive as long as the closure is.
    """
    params = tuple(params)
    grads = torch.autograd.grad(loss_fn(params), params, create_graph=True, allow_unused=True)
    return _hvp_from_grads(grads, params)


def hvp(loss_fn: Callable[[Params], torch.Tensor], params: Params, vec: Params) -> Vector:
    """One Hessian-vector product ``H vec`` (tuple shaped like ``params``) by double backprop."""
    return make_hvp(loss_fn, params)(vec)


# ---------------------------------------------------------------------------------------------------------
# inverse Hessian-vector products
# ---------------------------------------------------------------------------------------------------------


def lambda_max(hvp_fn: Callable[[Params], Vector], like: Params, iters: int, seed: int = 0) -> float:
    """Estimate the largest-magnitude eigenvalue of ``H`` (``hvp_fn``) by ``iters`` power-iteration HVPs.

    The start vector is standard normal from a CPU generator seeded with ``seed`` (the same estimate on CPU and
    GPU for the same H), shaped like ``like``. Returns the last Rayleigh quotient ``q.Hq / q.q``, signed: for a
    symmetric H it never exceeds the true ``lambda_max`` and converges to it like ``(lambda_2/lambda_1)^(2 iters)``.
    ``0.0`` when ``H q = 0``.
    """
    if iters < 1:
        raise ValueError(f"power iterations must be >= 1, got {iters}")
    gen = torch.Generator().manual_seed(int(seed))
    q = tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype) for t in like)
    estimate = 0.0
    for _ in range(iters):
        norm = math.sqrt(float(_dot(q, q)))
        if norm == 0.0:
            return 0.0
        q = tuple(t / norm for t in q)
        hq = tuple(hvp_fn(q))
        estimate = float(_dot(q, hq))
        q = hq
    return estimate


def inverse_hvp(
    hvp_fn: Callable[[Params], Vector],
    v: Params,
    method: InverseHVPMethod = "neumann",
    k: int = 10,
    alpha: float = 0.1,
    damping: float = 0.0,
    tol: float = 1e-12,
    power_iters: int = 0,
    info: MutableMapping[str, Any] | None = None,
) -> Vector:
    """Approximate ``u = (H + damping I)^{-1} v`` using only Hessian-vector products.

    Args:
        hvp_fn: ``vec -> H vec`` (e.g. :func:`make_hvp` of the training loss at the fine-tuned theta).
        v: the right-hand side, usually ``dL_val/dtheta``; tuple of tensors shaped like the parameters.
        method:
            * ``"identity"``: ``u = v`` (H taken as the identity; no HVP; only the direction is roughly
              right, the scale is off by H's).
            * ``"neumann"``: ``u = alpha * sum_{j=0}^{k} (I - alpha (H + damping I))^j v``
              (k HVPs). Converges when ``0 < alpha * (lambda_max + damping) < 2`` and H + damping I is
              positive definite; the error shrinks like ``(1 - alpha * (lambda_min + damping))^k``. Per
              eigen-direction ``lambda`` it returns ``(1 - (1 - alpha lambda)^(k+1)) / lambda`` times that component
              of ``v``: with ``alpha lambda > 2`` and odd ``k + 1`` that is *negative* (at ``alpha = 0.01, k = 5``:
              -10x the true value at ``lambda = 250``), a flipped sign that stays finite. ``power_iters > 0`` guards
              against it: ``lambda_max`` of ``H + damping I`` is estimated by that many power-iteration HVPs
              (:func:`lambda_max`) and the step becomes ``min(alpha, NEUMANN_SAFETY / lambda_max)``.
            * ``"cg"``: k steps of conjugate gradient on ``(H + damping I) u = v`` from ``u = 0``
              (k HVPs; exact after ``dim(theta)`` steps in exact arithmetic). Assumes positive curvature:
              on a direction with ``p.(H + damping I)p <= 0`` it stops and returns the current iterate
              (``v`` itself, with a warning, if that happens on the first step) -- add damping for
              non-convex training losses.
        k: number of Hessian-vector products (Neumann terms after the first / CG iterations).
        alpha: Neumann step size (ignored by the other methods); the largest step, with ``power_iters``.
        damping: ``lambda >= 0`` added to the Hessian's diagonal (Neumann and CG).
        tol: CG stops early once ``|r| <= tol * |v|``.
        power_iters: Neumann only: power-iteration HVPs for the curvature guard (0: none, ``alpha`` as given).
        info: if given, filled with what was used: ``method``, ``hvps`` (HVPs spent), for Neumann ``alpha``
            (the step taken) and, with the guard, ``lambda_max`` (the estimate of ``H + damping I``'s), for CG
            ``iterations``.

    Returns:
        ``u``, a detached tuple shaped like ``v``.
    """
    v = tuple(t.detach() for t in v)
    record = info if info is not None else {}
    record["method"] = method
    if method == "identity":
        record["hvps"] = 0
        return tuple(t.clone() for t in v)
    if method not in INVERSE_HVP_METHODS:
        raise ValueError(f"unknown inverse-HVP method {method!r}; choose one of {list(INVERSE_HVP_METHODS)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if power_iters < 0:
        raise ValueError(f"power_iters must be >= 0, got {power_iters}")

    def damped(vec: Vector) -> Vector:
        hv = hvp_fn(vec)
        return _axpy(damping, vec, hv) if damping else tuple(hv)

    if method == "neumann":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        record["hvps"] = k
        if power_iters:
            lam = lambda_max(damped, v, power_iters)
            record["lambda_max"] = lam
            record["hvps"] = k + power_iters
            if lam > 0:
                alpha = min(alpha, NEUMANN_SAFETY / lam)
        record["alpha"] = alpha
        term, total = v, v
        for _ in range(k):
            term = _axpy(-alpha, damped(term), term)  # (I - alpha H) term
            total = tuple(a + b for a, b in zip(total, term))
        return tuple(alpha * t for t in total)
    # method == "cg"
    x = tuple(torch.zeros_like(t) for t in v)
    r, p = v, v
    rs = _dot(r, r)
    stop = (tol * tol) * rs
    record["iterations"] = 0
    for it in range(k):
        if rs <= stop or rs == 0:
            break
        hp = damped(p)
        record["iterations"] = it + 1
        curvature = _dot(p, hp)
        if not curvature > 0:
            if it == 0:
                warnings.warn("inverse_hvp(cg): non-positive curvature on the first step; returning v "
                              "(identity); add damping", RuntimeWarning, stacklevel=2)
                record["hvps"] = 1
                return tuple(t.clone() for t in v)
            break
        step = rs / curvature
        x = _axpy(step, p, x)
        r = _axpy(-step, hp, r)
        rs_new = _dot(r, r)
        p = _axpy(rs_new / rs, p, r)
        rs = rs_new
    record["hvps"] = record["iterations"]
    return x


# ---------------------------------------------------------------------------------------------------------
# implicit gradients
# ---------------------------------------------------------------------------------------------------------


def implicit_gradient(
    train_loss: Callable[[Params, Params], torch.Tensor],
    val_loss: Callable[[Params], torch.Tensor],
    params: Params,
    psi: Params,
    method: InverseHVPMethod = "neumann",
    k: int = 10,
    alpha: float = 0.1,
    damping: float = 0.0,
    power_iters: int = 0,
) -> Vector:
    """The hypergradient ``dL_val/dpsi`` of a bilevel problem, with ``params`` at (near) ``theta*(psi)``.

    ``dL_val/dpsi = dL_val/dpsi|_direct - (dL_val/dtheta) H^{-1} d^2 L_train/(dtheta dpsi)``, with the
    minus sign, so descending it lowers the validation loss.

    Args:
        train_loss: ``(params, psi) -> scalar`` inner (training) loss.
        val_loss: ``params -> scalar`` outer (validation) loss. If the closure also uses ``psi`` the
            direct term is included automatically.
        params: the inner parameters theta, leaf tensors with ``requires_grad`` at the inner solution.
        psi: the outer parameters, tensors with ``requires_grad``.
        method, k, alpha, damping, power_iters: inverse-HVP settings, see :func:`inverse_hvp`.

    Returns:
        tuple of gradients shaped like ``psi`` (detached).
    """
    params, psi = tuple(params), tuple(psi)
    n = len(params)
    grads = torch.autograd.grad(val_loss(params), params + psi, allow_unused=True)
    grads = _zeros_for_none(grads, params + psi)
    v, direct = grads[:n], grads[n:]
    g_train = torch.autograd.grad(train_loss(params, psi), params, create_graph=True, allow_unused=True)
    u = inverse_hvp(_hvp_from_grads(g_train, params), v, method=method, k=k, alpha=alpha, damping=damping,
                    power_iters=power_iters)
    live = [i for i, g in enumerate(g_train) if g is not None and g.requires_grad]
    if not live:
        return tuple(d.detach() for d in direct)
    mixed = torch.autograd.grad([g_train[i] for i in live], psi, grad_outputs=[u[i] for i in live], allow_unused=True)
    mixed = _zeros_for_none(mixed, psi)
    return tuple((d - m).detach() for d, m in zip(direct, mixed))


def implicit_image_grad(
    train_loss_fn: Callable[[Params, torch.Tensor], torch.Tensor],
    params: Params,
    images: torch.Tensor,
    u: Params,
) -> torch.Tensor:
    """The hypergradient with respect to the training images: ``-d/dx [ (dL_train(theta, x)/dtheta) . u ]``.

    **The minus sign of the implicit-function theorem is already applied.** Backpropagate the result
    through the re-rendered, psi-dependent images, ``images_psi.backward(gradient=g)``, and ``psi.grad``
    holds ``dL_val/dpsi`` (when ``L_val`` does not depend on psi directly): step the optimizer to descend.

    Args:
        train_loss_fn: ``(params, images) -> scalar`` the training loss the detector was fine-tuned on,
            in the same mode (eval/train, augmentation off) as the HVPs that gave ``u``.
        params: detector parameters theta (after fine-tuning).
        images: ``(n, ...)`` the rendered training images (any float tensor; detached inside).
        u: ``~H^{-1} dL_val/dtheta`` from :func:`inverse_hvp`, shaped like ``params``.

    Returns:
        ``(n, ...)`` gradient, same shape, dtype and device as ``images``.
    """
    return implicit_input_grads(train_loss_fn, params, (images,), u)[0]


def implicit_input_grads(
    train_loss_fn: Callable[..., torch.Tensor],
    params: Params,
    inputs: Sequence[torch.Tensor],
    u: Params,
) -> tuple[torch.Tensor, ...]:
    """:func:`implicit_image_grad` for a training loss of several psi-dependent inputs, e.g. the images *and* the
    boxes they are labelled with: ``-d/d input [ (dL_train(theta, *inputs)/dtheta) . u ]`` for each input.

    Args:
        train_loss_fn: ``(params, *inputs) -> scalar``, twice differentiable in the inputs.
        inputs: tensors (detached inside), e.g. ``images (n, 3, H, W)`` and ``boxes (n, 4)``.

    Returns:
        one gradient per input, same shapes (zeros for an input the loss does not reach); minus sign applied.
    """
    params = tuple(params)
    xs = tuple(t.detach().requires_grad_(True) for t in inputs)
    g = torch.autograd.grad(train_loss_fn(params, *xs), params, create_graph=True, allow_unused=True)
    live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    if not live:
        return tuple(torch.zeros_like(x) for x in xs)
    dot = sum((g[i] * u[i].detach().to(g[i].dtype)).sum() for i in live)
    grads = torch.autograd.grad(dot, xs, allow_unused=True)
    return tuple(torch.zeros_like(x) if gx is None else -gx.detach() for gx, x in zip(grads, xs))


def influences(per_sample_loss_fn: Callable[[Params], torch.Tensor], params: Params, u: Params) -> torch.Tensor:
    """The first-order influence of every training sample on the validation loss, ``I_i = -(dl_i/dtheta) . u``.

    With ``u = H^-1 dL_val/dtheta`` this is ``-(dL_val/dtheta) H^-1 dl_i/dtheta``: how much ``L_val`` of the
    re-trained detector would change per unit of extra weight on sample ``i`` (negative: the sample helps).
    Computed for all samples at once: with ``L = sum_i w_i l_i`` at ``w = 1``,
    ``dl_i/dtheta . u = d/dw_i [(dL/dtheta) . u]`` (one backward with ``create_graph``, one more backward).

    Args:
        per_sample_loss_fn: ``params -> (n,)`` the per-sample training losses (e.g. the detector's
            ``detection_loss(..., reduction="none")``).
        u: ``~H^-1 dL_val/dtheta``, shaped like ``params``.

    Returns:
        ``(n,)`` detached influences ``I_i``, minus sign applied.
    """
    params = tuple(params)
    losses = per_sample_loss_fn(params)
    if losses.ndim != 1:
        raise ValueError(f"per_sample_loss_fn must return a (n,) vector, got shape {tuple(losses.shape)}")
    w = torch.ones_like(losses, requires_grad=True)
    g = torch.autograd.grad((losses * w).sum(), params, create_graph=True, allow_unused=True)
    live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    if not live:
        return torch.zeros_like(losses).detach()
    dot = sum((g[i] * u[i].detach().to(g[i].dtype)).sum() for i in live)
    (gw,) = torch.autograd.grad(dot, w, allow_unused=True)
    return torch.zeros_like(losses).detach() if gw is None else -gw.detach()
