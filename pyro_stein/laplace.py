"""Pure functions for per-dataset Laplace frames: a batched, score-only Newton search for posterior modes.

An amortized guide with ``whiten="laplace"`` draws ``z = m_d + L_d u`` for dataset ``d``, where
``m_d`` is the mode of that dataset's unnormalized log density in unconstrained space and
``L_d L_d^T`` is the inverse of the (positive-definite part of the) Hessian of ``-log p`` there.
The sampler then only has to learn what the Gaussian approximation misses (skew, curvature,
heavy tails) in coordinates that mean the same thing for every dataset, instead of learning the
data-to-posterior map itself.

The search needs only the model's log density and score (no second-order autodiff through the
model): the Hessian comes from central differences of the score, all ``2 D + 1`` stencil points
evaluated as one particle set, so one Newton iteration costs one batched model evaluation.
Directions use the absolute eigenvalues of the Hessian (saddle-free Newton), and each step is
accepted only when it raises the log density enough (Armijo). Far from a mode, where a full step
can overshoot badly, a ladder of step lengths is evaluated in the same batched call and the
longest acceptable one is taken, so backtracking costs no extra evaluation; when none is
acceptable the next direction is damped (Levenberg-Marquardt), which shortens it most along
nearly flat directions of the Hessian, where a Newton step runs off. At a stationary point that
is not a mode (a minimum or saddle of ``log p``, where the Newton step vanishes) the search steps
off along the direction of upward curvature. Datasets are processed
together but never interact; converged datasets drop out.

References:

[1] J. Nocedal, S. Wright, "Numerical Optimization", 2nd ed., 2006 (Newton with line search;
    Levenberg-Marquardt damping, ch. 10).
[2] Y. Dauphin et al., "Identifying and attacking the saddle point problem in high-dimensional
    non-convex optimization", NeurIPS 2014 (absolute-eigenvalue Newton).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LaplaceFrame", "LaplaceFrameWarning", "hessian_stencil", "laplace_frames", "newton_direction"]

# step lengths tried together while a dataset is far from its mode
_LADDER = (1.0, 0.2, 0.04)

#: ``fn(index, points) -> (log_density, score)``: evaluates datasets ``index`` (a long tensor of
#: positions in the batch) at ``points`` ``(len(index), P, D)``; returns ``(len(index), P)`` and
#: ``(len(index), P, D)``, non-finite values allowed.
LogDensityAndScore = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class LaplaceFrameWarning(UserWarning):
    """A dataset's mode search stopped before converging (at its evaluation cap, or stalled), so its frame is
    centred at the best point found, which may be far from the posterior mass."""


class LaplaceFrame(NamedTuple):
    """Per-dataset Gaussian frames: ``loc`` ``(B, D)``, ``scale`` ``(B, D, D)`` with ``scale scale^T = H^{-1}``."""

    loc: Tensor
    scale: Tensor
    converged: Tensor  # (B,) bool: Newton decrement below the tolerance at a point where log p curves down
    num_evaluations: int  # batched model evaluations used (each one stencil of 2 D + 1 points)


def hessian_stencil(z: Tensor, step: float | None = None) -> Tensor:
    """Points ``(..., 2 D + 1, D)`` for ``z`` ``(..., D)``: ``z`` then ``z + h e_k`` and ``z - h e_k`` for every
    coordinate ``k``.

    ``h`` defaults to ``eps^(1/3)`` of ``z``'s dtype (the step that balances the truncation and
    rounding errors of a central difference).
    """
    h = torch.finfo(z.dtype).eps ** (1 / 3) if step is None else step
    shift = h * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    centre = z.unsqueeze(-2)
    return torch.cat([centre, centre + shift, centre - shift], -2)


def _stencil_derivatives(score: Tensor, step: float) -> tuple[Tensor, Tensor]:
    """``(grad, H)`` from the scores at :func:`hessian_stencil` points; ``H`` is the symmetrised Hessian of
    ``-log p``."""
    d = score.shape[-1]
    hess = -(score[..., 1 : d + 1, :] - score[..., d + 1 :, :]) / (2 * step)
    return score[..., 0, :], 0.5 * (hess + hess.transpose(-1, -2))


def _newton_terms(
    grad: Tensor, hess: Tensor, rel_floor: float = 1e-6, damping: Tensor | None = None, escape_rel: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`newton_direction`'s ``(step, decrement, |H|)`` and, from the same eigendecomposition, the way off a
    stationary point that is not a mode ``(direction (B, D), needed (B,) bool)``: where ``log p`` curves upwards
    (``hess``, the Hessian of ``-log p``, has an eigenvalue below ``-escape_rel`` times its largest magnitude), the
    eigenvector of the most negative eigenvalue, scaled to one sd of that curvature and signed uphill (at a minimum
    or saddle of ``log p`` the gradient, and so the saddle-free Newton step, vanishes)."""
    lam, vec = torch.linalg.eigh(hess)
    low, v = lam[..., 0], vec[..., 0]
    needed = low < -escape_rel * lam.abs().amax(-1)
    sign = torch.where((grad * v).sum(-1) < 0, -1.0, 1.0).to(v.dtype)
    escape = v * (sign / (-low).clamp_min(torch.finfo(lam.dtype).tiny).sqrt()).unsqueeze(-1)
    lam = lam.abs()
    lam = torch.maximum(lam, rel_floor * lam.amax(-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny))
    g = (vec.transpose(-1, -2) @ grad.unsqueeze(-1)).squeeze(-1)
    step = (vec @ (g / (lam if damping is None else lam + damping.unsqueeze(-1))).unsqueeze(-1)).squeeze(-1)
    decrement = (g.square() / lam).sum(-1).sqrt()
    return step, decrement, (vec * lam.unsqueeze(-2)) @ vec.transpose(-1, -2), escape, needed


def newton_direction(
    grad: Tensor, hess: Tensor, rel_floor: float = 1e-6, damping: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Saddle-free Newton step for maximising ``log p``: ``|H|^{-1} grad``, with ``|H| = V |Lambda| V^T``.

    Eigenvalues are floored at ``rel_floor`` times the largest. Returns ``(step, decrement, |H|)``,
    the decrement ``sqrt(grad^T |H|^{-1} grad)`` being the step's length in the frame's sds.
    ``damping`` ``(B,)`` (Levenberg-Marquardt) adds to every eigenvalue for the step only (the
    decrement and ``|H|`` stay undamped): it shortens the step most along nearly flat directions,
    where an undamped step would run off.
    """
    return _newton_terms(grad, hess, rel_floor, damping)[:3]


def laplace_frames(
    fn: LogDensityAndScore,
    init: Tensor,
    max_evaluations: int = 50,
    tol: float = 0.1,
    armijo: float = 1e-4,
) -> LaplaceFrame:
    """Modes and Laplace scales of ``B`` log densities at once, from the starting points ``init`` ``(B, D)``.

    :param fn: see :data:`LogDensityAndScore`.
    :param int max_evaluations: cap on batched evaluations; a dataset not converged by then keeps
        its best point so far (``converged`` says which), which still gives a valid frame.
    :param float tol: stop a dataset when its Newton decrement is below ``tol`` (the remaining
        distance to the mode, in the frame's sds) and take that last Newton step without evaluating
        it: near a mode the log density is close to quadratic, so the returned mode is then about
        ``tol^2`` sds from the true one (the scale is the Hessian's at the last evaluated point).
        A point with a small decrement where ``log p`` curves upwards (a minimum or saddle) is not a
        mode: the search steps off it along that curvature, and stops unconverged if no step gains.
    :param float armijo: sufficient-increase constant of the line search.
    :raises ValueError: if the log density or score is not finite at a starting point.
    """
    if init.dim() != 2:
        raise ValueError(f"init must have shape (num_datasets, D), got {tuple(init.shape)}")
    if max_evaluations < 1:
        raise ValueError(f"max_evaluations must be >= 1, got {max_evaluations!r}")
    if not tol > 0:
        raise ValueError(f"tol must be a positive Newton decrement, got {tol!r}")
    num, dim = init.shape
    h = torch.finfo(init.dtype).eps ** (1 / 3)
    everyone = torch.arange(num, device=init.device)

    def evaluate(idx: Tensor, z: Tensor):
        """Log density, gradient, Hessian and finiteness at points ``z`` ``(len(idx), ..., D)``."""
        stencils = hessian_stencil(z, h)  # (len(idx), ..., 2 D + 1, D)
        lp, score = fn(idx, stencils.reshape(len(idx), -1, dim))
        lp, score = lp.reshape(stencils.shape[:-1]), score.reshape(stencils.shape)
        grad, hess = _stencil_derivatives(score, h)
        ok = torch.isfinite(lp[..., 0]) & torch.isfinite(score).all(-1).all(-1)
        return lp[..., 0], grad, torch.where(ok[..., None, None], hess, torch.zeros_like(hess)), ok

    z = init.clone()
    lp, grad, hess, ok = evaluate(everyone, z)
    evaluations = 1
    if not ok.all():
        bad = everyone[~ok].tolist()
        raise ValueError(
            f"whiten='laplace': the log density or its score is not finite at the starting point of dataset(s) {bad} "
            "in this batch; check those datasets, or start from a different init_loc_fn"
        )
    step, dec, abs_hess, escape_dir, curved_up = _newton_terms(grad, hess)
    mu = torch.zeros(num, dtype=z.dtype, device=z.device)  # Levenberg-Marquardt damping of each direction
    stalled = torch.zeros(num, dtype=torch.bool, device=z.device)
    ladder = torch.tensor(_LADDER, dtype=z.dtype, device=z.device)
    while evaluations < max_evaluations:
        # a dataset whose decrement is small at a point where log p curves upwards (a minimum or saddle: e.g. the
        # symmetric start of a bimodal posterior) is not at a mode; it steps off along that curvature
        escape = (dec <= tol) & curved_up
        idx = everyone[((dec > tol) | escape) & ~stalled]
        esc = escape[idx]
        direction = torch.where(esc[:, None], escape_dir[idx], step[idx])
        damped = (mu[idx] > 0) & ~esc
        if damped.any():
            direction = torch.where(
                damped[:, None], newton_direction(grad[idx], hess[idx], damping=mu[idx])[0], direction
            )
            # a direction damped to nothing (under 0.001 sds) cannot make progress: the dataset stops where it is
            move = (direction.unsqueeze(-2) @ abs_hess[idx] @ direction.unsqueeze(-1)).flatten().clamp_min(0).sqrt()
            stalled[idx[move < 1e-3]] = True
            idx, direction, esc = idx[move >= 1e-3], direction[move >= 1e-3], esc[move >= 1e-3]
        if not idx.numel():
            break
        # far from a mode (decrement > 1) a full Newton step can overshoot by orders of magnitude: the whole
        # ladder of step lengths is tried in the same evaluation, so a backtrack costs no extra one
        lengths = ladder if bool((dec[idx] > 1).any() or esc.any()) else ladder[:1]  # (K,)
        cand = z[idx, None] + lengths[:, None] * direction[:, None]  # (n, K, D)
        lp_c, grad_c, hess_c, ok_c = evaluate(idx, cand)
        evaluations += 1
        slope = (grad[idx] * direction).sum(-1, keepdim=True)  # d log p / d length at 0 (> 0: an ascent direction)
        # an escape (where the slope is ~0) must gain a fifth of what its curvature promises, lengths^2 / 2 nats
        gain = torch.where(esc[:, None], 0.1 * lengths.square(), armijo * lengths * slope)
        good = ok_c & (lp_c >= lp[idx, None] + gain)
        accept = good.any(-1)
        stalled[idx[esc & ~accept]] = True  # no way up found: the dataset stops there, unconverged
        best = good.to(torch.int8).argmax(-1)  # the longest acceptable length (the ladder decreases)
        rows = torch.arange(len(idx), device=best.device)  # cand, lp_c, grad_c, hess_c and best share a device
        pick = lambda x, rows=rows, best=best: x[rows, best]  # noqa: E731 (defaults bind this iteration's values)
        acc = idx[accept]
        z[acc], lp[acc], grad[acc], hess[acc] = (
            pick(cand)[accept],
            pick(lp_c)[accept],
            pick(grad_c)[accept],
            pick(hess_c)[accept],
        )
        if acc.numel():
            step[acc], dec[acc], abs_hess[acc], escape_dir[acc], curved_up[acc] = _newton_terms(grad[acc], hess[acc])
        # no length acceptable: damp the direction 10x more (from 0.001 of the largest curvature), which shortens
        # it most along nearly flat directions of |H|, where a Newton step runs off; after a success, a tenth as much
        lam_max = abs_hess[idx].diagonal(dim1=-2, dim2=-1).amax(-1)
        relaxed = torch.where(mu[idx] / 10 < 1e-3 * lam_max, torch.zeros_like(lam_max), mu[idx] / 10)
        mu[idx] = torch.where(accept, relaxed, torch.maximum(10 * mu[idx], 1e-3 * lam_max))
    converged = (dec <= tol) & ~curved_up  # dec is always the current point's (undamped) decrement
    # converged datasets take their last Newton step without evaluating it: within tol of the mode the log
    # density is close to quadratic, so the step lands ~tol^2 from it (at no cost)
    z = torch.where(converged[:, None], z + step, z)
    chol, info = torch.linalg.cholesky_ex(abs_hess)
    if (info != 0).any():  # |H| is positive definite by construction; this guards against rounding only
        abs_hess = abs_hess + 1e-6 * abs_hess.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None] * torch.eye(
            dim, dtype=z.dtype, device=z.device
        )
        chol = torch.linalg.cholesky(abs_hess)
    eye = torch.eye(dim, dtype=z.dtype, device=z.device).expand(num, dim, dim)
    scale = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)  # L = R^{-T}: L L^T = (R R^T)^{-1}
    return LaplaceFrame(z, scale, converged, evaluations)
