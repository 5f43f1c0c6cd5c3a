"""A few Metropolis-adjusted Langevin or Hamiltonian Monte Carlo steps on a population of draws
(polishing a guide's output).

An amortized guide's draws for a new dataset are close to its posterior but not exact. Every
Metropolis–Hastings kernel leaves the posterior invariant, so applying one to each draw can only
move the draws' distribution towards the posterior (total variation never increases). This module
applies ``num_steps`` preconditioned MALA steps to all draws at once, as independent chains: the
preconditioner is the draws' own covariance and the step size is tuned between steps from the
population's acceptance rate, so the cost is ``num_steps`` batched evaluations of the log density
and its score. :func:`hmc_polish` does the same with ``num_leapfrog`` leapfrog steps per proposal
(MALA is its one-leapfrog case): a trajectory travels where MALA's steps diffuse, but with few
steps it has less room than MALA to tune its step size. (The no-worse guarantee is for a fixed
kernel; choosing the preconditioner and step size from the population, as sequential Monte Carlo
samplers do, keeps every step's kernel posterior-invariant but makes the chains weakly dependent.)

References:

[1] G. O. Roberts, R. L. Tweedie, "Exponential convergence of Langevin distributions and their
    discrete approximations", Bernoulli 2(4), 1996.
[2] G. O. Roberts, J. S. Rosenthal, "Optimal scaling of discrete approximations to Langevin
    diffusions", JRSS B 60(1), 1998.
[3] R. M. Neal, "MCMC using Hamiltonian dynamics", Handbook of Markov Chain Monte Carlo, 2011.
[4] A. Beskos, N. Pillai, G. Roberts, J. M. Sanz-Serna, A. Stuart, "Optimal tuning of the hybrid
    Monte Carlo algorithm", Bernoulli 19(5A), 2013.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import _int_at_least
from .logjoint import all_finite

__all__ = ["hmc_polish", "mala_polish"]

LogDensityAndScore = Callable[[Tensor], "tuple[Tensor, Tensor]"]


def _preconditioner(z: Tensor) -> Tensor:
    """A lower-triangular ``L`` with ``L L^T`` = the covariance of the finite draws (diagonal when there
    are no more of them than ``D``), jittered.

    :raises ValueError: when fewer than two draws are finite or the finite ones have no spread: the
        population then sets no scale, and chains preconditioned by it would never move.
    """
    finite = torch.isfinite(z).all(-1)
    zf = z if bool(finite.all()) else z[finite]
    n, d = zf.shape
    zc = zf - zf.mean(0)
    var = zc.pow(2).sum(0) / max(n - 1, 1)
    if n < 2 or not bool(var.max() > 0):
        if z.shape[0] < 2:
            what = f"z has {z.shape[0]} row"
        elif n < 2:
            what = f"only {n} of the {z.shape[0]} rows of z are finite"
        else:
            what = f"the {n} finite rows of z are all equal"
        raise ValueError(
            f"the MCMC preconditioner is the covariance of the draws to polish, but {what}; pass at least two "
            "distinct finite draws (the guide polishes at least the steps' num_draws draws per dataset)"
        )
    # jitter relative to each coordinate's own variance (a floor relative to their mean made a coordinate 10^4 times
    # narrower than another wider than its spread, so the chains rejected every step), with a tiny one for none
    floor = var * 1e-6 + var.max() * 1e-12
    if n > d:
        cov = zc.T @ zc / (n - 1) + torch.diag(floor)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0:
            return chol
    return torch.diag((var + floor).sqrt())


def _check_polish_arguments(z, num_steps: int, target_accept: float) -> int:
    """Check the polish's arguments; returns ``num_steps`` as an ``int``."""
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[-1] == 0:
        raise ValueError(
            f"z must be a Tensor of draws with shape (n, D), D >= 1, got {getattr(z, 'shape', type(z).__name__)}"
        )
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point Tensor (the draws), got dtype {z.dtype}")
    num_steps = _int_at_least(num_steps, "num_steps", 0)
    if isinstance(target_accept, bool) or not isinstance(target_accept, (int, float)) or not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must be a number in (0, 1), got {target_accept!r}")
    return num_steps


def _mask_nonfinite(lp: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """``-inf`` log density and a zero score wherever either is not finite."""
    if all_finite(lp, score):
        return lp, score
    ok = torch.isfinite(lp) & torch.isfinite(score).all(-1)
    return torch.where(ok, lp, torch.full_like(lp, -math.inf)), torch.where(ok[:, None], score, torch.zeros_like(score))


def _finite_evaluator(log_density_and_score: LogDensityAndScore) -> LogDensityAndScore:
    """``log_density_and_score`` with its shapes checked, ``-inf`` where the value or score is not finite
    and a zero score there."""

    def evaluate(x: Tensor) -> tuple[Tensor, Tensor]:
        lp, score = log_density_and_score(x)
        if lp.shape != x.shape[:1] or score.shape != x.shape:
            raise ValueError(
                f"log_density_and_score must return shapes ({x.shape[0]},) and {tuple(x.shape)}, "
                f"got {tuple(lp.shape)} and {tuple(score.shape)}"
            )
        if lp.dtype != x.dtype or score.dtype != x.dtype:
            raise ValueError(
                f"log_density_and_score must return the draws' dtype {x.dtype}, got {lp.dtype} and {score.dtype}; "
                "evaluate the model in the dtype of z (or pass z in the model's dtype)"
            )
        return _mask_nonfinite(lp, score)

    return evaluate


def _start(z: Tensor, evaluate: LogDensityAndScore, initial: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """The log density and score at the starting draws: ``initial`` (checked) or one evaluation."""
    if initial is None:
        return evaluate(z)
    pair = isinstance(initial, (tuple, list)) and len(initial) == 2 and all(isinstance(t, Tensor) for t in initial)
    if not pair or initial[0].shape != z.shape[:1] or initial[1].shape != z.shape:
        got = ", ".join(str(tuple(t.shape)) for t in initial) if pair else type(initial).__name__
        raise ValueError(
            f"initial must be a pair (log density, score) at z with shapes ({z.shape[0]},) and {tuple(z.shape)}, "
            f"got {got}"
        )
    if initial[0].dtype != z.dtype or initial[1].dtype != z.dtype:
        raise ValueError(
            f"initial must be in the draws' dtype {z.dtype}, got {initial[0].dtype} and {initial[1].dtype}"
        )
    return _mask_nonfinite(*initial)


def _metropolis_update(current: tuple, proposed: tuple, log_a: Tensor, valid: Tensor) -> tuple:
    """Accept each chain's proposal with probability ``min(1, exp(log_a))`` (never where ``valid`` is
    false or ``log_a`` is NaN); ``current``/``proposed`` are ``(z, lp, score)``. Returns the new
    ``(z, lp, score)`` and the acceptance rate."""
    z, lp, score = current
    z_p, lp_p, score_p = proposed
    log_a = torch.where(valid & ~torch.isnan(log_a), log_a, torch.full_like(log_a, -math.inf))
    accept = torch.rand_like(lp).log() < log_a
    return (
        torch.where(accept[:, None], z_p, z),
        torch.where(accept, lp_p, lp),
        torch.where(accept[:, None], score_p, score),
        accept.to(z.dtype).mean(),
    )


def hmc_polish(
    z: Tensor,
    log_density_and_score: LogDensityAndScore,
    num_steps: int,
    num_leapfrog: int,
    target_accept: float = 0.65,
    initial: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Apply ``num_steps`` Hamiltonian Monte Carlo steps of ``num_leapfrog`` leapfrog steps each to
    every row of ``z`` (independent chains), preconditioned by the draws' covariance.

    In coordinates ``u`` with ``z = L u`` (``L L^T`` the covariance of the starting draws), each step
    draws a momentum ``p ~ N(0, I)``, runs ``num_leapfrog`` leapfrog steps of size ``eps`` and accepts
    the end point with the Metropolis–Hastings probability ``min(1, exp(-dH))``, so each step leaves
    the target invariant. ``eps`` starts at ``min(1.5 D^(-1/4), pi / (2 L))`` (``L = num_leapfrog``;
    ``D^(-1/4)`` is the optimal-scaling order for HMC [4]), so the first trajectory is at most
    ``pi / 2`` long: that takes a Gaussian whose covariance the draws match to an independent draw,
    whereas a trajectory near ``pi`` returns to the mirror image of its start (and keeps a population's
    offset, with its sign flipped). After each step ``eps`` is multiplied by ``exp(rate -
    target_accept)``, ``rate`` being the fraction of draws that moved. Each chain's step size is jittered
    by a uniform factor in ``[0.8, 1.2]`` so that no trajectory length resonates with the target. A
    trajectory that meets a non-finite log density or score is rejected. Costs ``num_steps *
    num_leapfrog + 1`` batched evaluations of the log density and score.

    :param Tensor z: draws ``(n, D)``.
    :param callable log_density_and_score: ``(n, D) -> (log density (n,), score (n, D))``.
    :param int num_steps: HMC steps (0 returns ``z`` unchanged).
    :param int num_leapfrog: leapfrog steps per HMC step (``>= 1``).
    :param float target_accept: acceptance rate the step size is tuned towards, in ``(0, 1)``.
    :param tuple initial: the log density ``(n,)`` and score ``(n, D)`` at ``z`` when already known
        (saves one evaluation); values that are not finite count as outside the support.
    :returns: ``(polished draws (n, D), acceptance rate of each step (num_steps,))``.
    :raises ValueError: when ``num_steps > 0`` and fewer than two rows of ``z`` are finite, or they are
        all equal (the preconditioner is their covariance).
    """
    num_steps = _check_polish_arguments(z, num_steps, target_accept)
    num_leapfrog = _int_at_least(num_leapfrog, "num_leapfrog", 1)
    rates = z.new_zeros(num_steps)
    if num_steps == 0:
        return z, rates
    evaluate = _finite_evaluator(log_density_and_score)
    n, d = z.shape
    chol = _preconditioner(z)
    eps = min(1.5 * d ** (-0.25), math.pi / (2 * num_leapfrog))
    lp, score = _start(z, evaluate, initial)
    for k in range(num_steps):
        step = eps * (0.8 + 0.4 * torch.rand(n, 1, dtype=z.dtype, device=z.device))
        p0 = torch.randn_like(z)
        x, p = z, p0 + 0.5 * step * (score @ chol)  # momentum in u coordinates: grad_u = L^T grad_z
        finite = torch.ones_like(lp, dtype=torch.bool)
        for i in range(num_leapfrog):
            x = x + step * (p @ chol.T)
            lp_x, score_x = evaluate(x)
            finite &= torch.isfinite(lp_x)
            p = p + (step if i < num_leapfrog - 1 else 0.5 * step) * (score_x @ chol)
        log_a = lp_x - lp - 0.5 * p.pow(2).sum(-1) + 0.5 * p0.pow(2).sum(-1)
        z, lp, score, rates[k] = _metropolis_update((z, lp, score), (x, lp_x, score_x), log_a, finite)
        eps *= math.exp(float(rates[k]) - target_accept)
    return z, rates


def mala_polish(
    z: Tensor,
    log_density_and_score: LogDensityAndScore,
    num_steps: int,
    target_accept: float = 0.574,
    initial: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Apply ``num_steps`` preconditioned MALA steps to every row of ``z`` (independent chains).

    Proposal: ``z' = z + (eps^2 / 2) C s(z) + eps L xi`` with ``C = L L^T`` the covariance of the
    starting draws, ``s`` the score and ``xi ~ N(0, I)``; accepted with the Metropolis–Hastings
    probability, so each step leaves the target invariant. ``eps`` starts at ``D^(-1/6)`` (the
    optimal-scaling order for MALA) and is multiplied by ``exp(rate - target_accept)`` after each
    step, ``rate`` being the fraction of draws that moved. A proposal whose log density is not
    finite is rejected.

    :param Tensor z: draws ``(n, D)``.
    :param callable log_density_and_score: ``(n, D) -> (log density (n,), score (n, D))``.
    :param int num_steps: MALA steps (0 returns ``z`` unchanged).
    :param float target_accept: acceptance rate the step size is tuned towards, in ``(0, 1)``.
    :param tuple initial: the log density ``(n,)`` and score ``(n, D)`` at ``z`` when already known
        (saves one evaluation); values that are not finite count as outside the support.
    :returns: ``(polished draws (n, D), acceptance rate of each step (num_steps,))``.
    :raises ValueError: when ``num_steps > 0`` and fewer than two rows of ``z`` are finite, or they are
        all equal (the preconditioner is their covariance).
    """
    num_steps = _check_polish_arguments(z, num_steps, target_accept)
    rates = z.new_zeros(num_steps)
    if num_steps == 0:
        return z, rates
    evaluate = _finite_evaluator(log_density_and_score)
    d = z.shape[-1]
    chol = _preconditioner(z)
    cov = chol @ chol.T
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    eps = d ** (-1.0 / 6.0)
    lp, score = _start(z, evaluate, initial)
    for k in range(num_steps):
        fwd = z + 0.5 * eps**2 * score @ cov
        prop = fwd + eps * torch.randn_like(z) @ chol.T
        lp_p, score_p = evaluate(prop)
        bwd = prop + 0.5 * eps**2 * score_p @ cov
        # log q(z | z') - log q(z' | z), the proposal being N(mean, eps^2 C)
        log_q_back = -0.5 * ((z - bwd) @ chol_inv.T).pow(2).sum(-1) / eps**2
        log_q_fwd = -0.5 * ((prop - fwd) @ chol_inv.T).pow(2).sum(-1) / eps**2
        log_a = lp_p - lp + log_q_back - log_q_fwd
        z, lp, score, rates[k] = _metropolis_update((z, lp, score), (prop, lp_p, score_p), log_a, torch.isfinite(lp_p))
        eps *= math.exp(float(rates[k]) - target_accept)
    return z, rates
