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

import warnings
from typing import Callable, Literal, Sequence

import torch

__all__ = [
    "Params",
    "param_grad",
    "make_hvp",
    "hvp",
    "inverse_hvp",
    "implicit_gradient",
    "implicit_image_grad",
    "InverseHVPMethod",
]

Params = Sequence[torch.Tensor]
Vector = tuple[torch.Tensor, ...]
InverseHVPMethod = Literal["identity", "neumann", "cg"]


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


def inverse_hvp(
    hvp_fn: Callable[[Params], Vector],
    v: Params,
    method: InverseHVPMethod = "neumann",
    k: int = 10,
    alpha: float = 0.1,
    damping: float = 0.0,
    tol: float = 1e-12,
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
              positive definite; the error shrinks like ``(1 - alpha * (lambda_min + damping))^k``.
            * ``"cg"``: k steps of conjugate gradient on ``(H + damping I) u = v`` from ``u = 0``
              (k HVPs; exact after ``dim(theta)`` steps in exact arithmetic). Assumes positive curvature:
              on a direction with ``p.(H + damping I)p <= 0`` it stops and returns the current iterate
              (``v`` itself, with a warning, if that happens on the first step) -- add damping for
              non-convex training losses.
        k: number of Hessian-vector products (Neumann terms after the first / CG iterations).
        alpha: Neumann step size (ignored by the other methods).
        damping: ``lambda >= 0`` added to the Hessian's diagonal (Neumann and CG).
        tol: CG stops early once ``|r| <= tol * |v|``.

    Returns:
        ``u``, a detached tuple shaped like ``v``.
    """
    v = tuple(t.detach() for t in v)
    if method == "identity":
        return tuple(t.clone() for t in v)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")

    def damped(vec: Vector) -> Vector:
        hv = hvp_fn(vec)
        return _axpy(damping, vec, hv) if damping else tuple(hv)

    if method == "neumann":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        term, total = v, v
        for _ in range(k):
            term = _axpy(-alpha, damped(term), term)  # (I - alpha H) term
            total = tuple(a + b for a, b in zip(total, term))
        return tuple(alpha * t for t in total)
    if method == "cg":
        x = tuple(torch.zeros_like(t) for t in v)
        r, p = v, v
        rs = _dot(r, r)
        stop = (tol * tol) * rs
        for it in range(k):
            if rs <= stop or rs == 0:
                break
            hp = damped(p)
            curvature = _dot(p, hp)
            if not curvature > 0:
                if it == 0:
                    warnings.warn("inverse_hvp(cg): non-positive curvature on the first step; returning v "
                                  "(identity); add damping", RuntimeWarning, stacklevel=2)
                    return tuple(t.clone() for t in v)
                break
            step = rs / curvature
            x = _axpy(step, p, x)
            r = _axpy(-step, hp, r)
            rs_new = _dot(r, r)
            p = _axpy(rs_new / rs, p, r)
            rs = rs_new
        return x
    raise ValueError(f"unknown inverse-HVP method {method!r}; choose identity, neumann or cg")


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
        method, k, alpha, damping: inverse-HVP settings, see :func:`inverse_hvp`.

    Returns:
        tuple of gradients shaped like ``psi`` (detached).
    """
    params, psi = tuple(params), tuple(psi)
    n = len(params)
    grads = torch.autograd.grad(val_loss(params), params + psi, allow_unused=True)
    grads = _zeros_for_none(grads, params + psi)
    v, direct = grads[:n], grads[n:]
    g_train = torch.autograd.grad(train_loss(params, psi), params, create_graph=True, allow_unused=True)
    u = inverse_hvp(_hvp_from_grads(g_train, params), v, method=method, k=k, alpha=alpha, damping=damping)
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
    params = tuple(params)
    x = images.detach().requires_grad_(True)
    g = torch.autograd.grad(train_loss_fn(params, x), params, create_graph=True, allow_unused=True)
    live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    if not live:
        return torch.zeros_like(x)
    dot = sum((g[i] * u[i].detach().to(g[i].dtype)).sum() for i in live)
    (gx,) = torch.autograd.grad(dot, x, allow_unused=True)
    if gx is None:
        return torch.zeros_like(x)
    return -gx.detach()
