"""Health checks at the end of :meth:`AmortizedSVGD.run <pyro_stein.AmortizedSVGD.run>`: did training diverge, did
its Stein discrepancy settle, did the draws' spread collapse below the posterior's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch
from torch import Tensor

__all__ = ["TrainingWarning", "collapse_problem", "history_problems"]

# windows of the KSD history, and the collapse statistic's threshold
_HEALTH_WINDOWS = 10
_COLLAPSE_THRESHOLD = 0.25
_HEALTH_DRAWS = 2000
# the HMC check at the end of run(): draws, HMC steps x leapfrogs, and how far the chains may move the draws' means
# (in their own sds) and scale their sds before the sampler is judged off; Monte Carlo noise at 256 draws is about
# 0.1 sd in a mean and 10 % in an sd per coordinate
_SHIFT_DRAWS = 256
_SHIFT_HMC = (10, 5)
_SHIFT_MEAN = 0.75
_SHIFT_SD = 1.5
_HEALTH_MIN_STEPS = 200  # shorter runs are too noisy to judge from the KSD history


class TrainingWarning(UserWarning):
    """:meth:`AmortizedSVGD.run` ended in a state that should not be trusted: it diverged, the Stein discrepancy had
    not settled, or the draws' spread collapsed below the posterior's. The message says what to do."""


def history_problems(history: Sequence[float]) -> list[str]:
    """What the KSD history of a run says went wrong: divergence, or no settling (messages; empty when healthy).

    The history is cut into 10 windows; their medians are compared. Diverged: a non-finite value, or a last window
    whose median exceeds the best window's by 100x. Not settled: the last window's median more than 5x the best's,
    or the last two windows' medians more than 2x apart (a discrepancy that still moves)."""
    if not history:
        return []
    values = torch.tensor(history, dtype=torch.float64)
    if not torch.isfinite(values).all():
        first = int((~torch.isfinite(values)).nonzero()[0, 0])
        return [
            f"the Stein discrepancy became non-finite at step {first} of this run: training diverged. Lower the "
            "learning rate (the optimiser's lr) or check the model for values outside its supports."
        ]
    if len(history) < _HEALTH_MIN_STEPS:
        return []
    medians = torch.stack([w.abs().median() for w in values.tensor_split(_HEALTH_WINDOWS)])
    best, last, before = float(medians.min()), float(medians[-1]), float(medians[-2])
    tiny = torch.finfo(torch.float64).tiny
    if last > 100 * max(best, tiny):
        return [
            f"the Stein discrepancy ended {last / max(best, tiny):.3g}x above its best window median: training "
            "diverged. Lower the learning rate (the optimiser's lr)."
        ]
    if last > 5 * max(best, tiny) or max(last, before) > 2 * max(min(last, before), tiny):
        return [
            f"the Stein discrepancy had not settled by the end of training (median of the last tenth of the "
            f"steps {last:.3g}, of the tenth before {before:.3g}, best tenth {best:.3g}). Train longer, or lower "
            "the learning rate if it swings."
        ]
    return []


def _site_names(guide, mask: Tensor) -> list[str]:
    """The sorted names of the guide's sites that hold the coordinates of the packed latent vector where ``mask``."""
    coords = mask.nonzero().flatten().tolist()
    return sorted({s.name for s in guide.sites for i in coords if s.offset <= i < s.offset + s.size})


@torch.no_grad()
def collapse_problem(guide, evaluate: Callable[[Tensor], tuple[Tensor, Tensor]]) -> str | None:
    """A message when the draws of a guide fitted to one dataset are far narrower than the posterior in some
    direction, else ``None``. ``evaluate(z)``: the posterior's log density and score at draws ``z`` ``(n, D)``.

    For any distribution ``p`` (with tails that vanish), ``E_p[s (z - m)^T] = -I`` (Stein's identity, ``s`` the
    score). In the draws' own whitened coordinates ``u = L^{-1} (z - m)`` (``L L^T`` their covariance, score
    ``L^T s``), ``M = -E[s_u u^T]`` is ``I`` at the posterior; for a Gaussian posterior and draws narrower by a
    factor ``r`` along a direction, ``M`` has the eigenvalue ``r^2`` there. An eigenvalue of its symmetric part
    below 0.25 (``r`` below about 0.5; Monte Carlo noise at 2,000 draws is a few hundredths per eigenvalue in 10
    dimensions) flags a collapse; affine invariant, so correlated posteriors are judged like independent ones.
    """
    rng = pyro.util.get_rng_state()  # the check must not change the random stream of the training that follows
    try:
        z = guide.draw(_HEALTH_DRAWS)
        lp, score = evaluate(z)
    finally:
        pyro.util.set_rng_state(rng)
    ok = torch.isfinite(lp) & torch.isfinite(score).all(-1)
    if int(ok.sum()) < _HEALTH_DRAWS // 2:
        return (
            f"after training, {_HEALTH_DRAWS - int(ok.sum())} of {_HEALTH_DRAWS} draws have a non-finite log "
            "joint or score: the guide puts mass where the model has none. Train longer or lower the learning "
            "rate, and check the model's supports."
        )
    z, score = z[ok].double(), score[ok].double()
    zc = z - z.mean(0)
    chol, info = torch.linalg.cholesky_ex(zc.T @ zc / (z.shape[0] - 1))
    if info != 0:  # a degenerate direction: the draws have no spread there at all
        return (
            "the guide's draws have no spread in some direction (their covariance is singular): training "
            "collapsed. Train longer, use more particles, or check the model's parameterisation."
        )
    u = torch.linalg.solve_triangular(chol, zc.T, upper=False).T
    m = -(((score - score.mean(0)) @ chol).T @ u) / (z.shape[0] - 1)  # as stein_identity_eigenvalues
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.T))
    if not float(evals[0]) < _COLLAPSE_THRESHOLD:
        return None
    direction = (chol @ evecs[:, 0]).abs()  # the collapsed direction in the latent coordinates
    names = _site_names(guide, direction > 0.3 * direction.max())
    return (
        f"the guide's draws are narrower than the posterior along a direction of site(s) {names}: Stein's "
        f"identity gives a squared sd ratio of about {float(evals[0]):.2g} there (1 at the posterior). For a "
        "centred hierarchical model (a funnel), a non-centred parameterisation "
        "(pyro.infer.reparam.LocScaleReparam) trains better; otherwise train longer or use more particles. "
        "The calibration at the end of run() corrects the draws' mean, not their spread."
    )


@torch.no_grad()
def hmc_shift_problem(guide, evaluate: Callable[[Tensor], tuple[Tensor, Tensor]]) -> str | None:
    """A message when a few HMC steps move the guide's draws far, else ``None``. ``evaluate(z)``: the posterior's
    log density and score at draws ``z`` ``(n, D)``.

    HMC leaves the posterior invariant: started from exact draws, its chains keep their distribution, so their mean
    and spread change only by Monte Carlo noise. :data:`_SHIFT_DRAWS` draws go through ``10`` HMC steps of ``5``
    leapfrogs (:func:`~pyro_stein.mcmc.hmc_polish`); a coordinate whose mean moves by more than 0.75 of the draws' sd,
    or whose sd changes by more than a factor 1.5, shows draws that are off in a way the linear Stein identities of
    :func:`collapse_problem` can miss (a skewed or misplaced marginal). Costs 51 batched evaluations of 256 draws.
    No verdict (``None``) when a trajectory reaches a point where the model raises.
    """
    from .logjoint import ModelEvaluationError
    from .mcmc import hmc_polish

    rng = pyro.util.get_rng_state()  # the check must not change the random stream of the training that follows
    try:
        z = guide.draw(_SHIFT_DRAWS).detach()

        def fn(x: Tensor) -> tuple[Tensor, Tensor]:
            lp, score = evaluate(x)
            return lp.to(x.dtype), score.to(x.dtype)

        try:
            moved = hmc_polish(z, fn, *_SHIFT_HMC)[0]
        except (ModelEvaluationError, RuntimeError, ValueError):  # a trajectory reached where the model raises
            return None  # (e.g. a covariance that is not positive definite): no verdict
    finally:
        pyro.util.set_rng_state(rng)
    if not (torch.isfinite(z).all() and torch.isfinite(moved).all()):
        return None  # the collapse check reports draws outside the support
    sd = z.std(0).clamp_min(torch.finfo(z.dtype).tiny)
    shift = ((moved.mean(0) - z.mean(0)) / sd).abs()
    ratio = moved.std(0) / sd
    bad = (shift > _SHIFT_MEAN) | (ratio > _SHIFT_SD) | (ratio < 1 / _SHIFT_SD)
    if not bool(bad.any()):
        return None
    i = int((shift + (ratio.log().abs())).argmax())
    names = _site_names(guide, bad)
    return (
        f"a few HMC steps (which leave the posterior invariant) moved the guide's draws of site(s) {names}: by up to "
        f"{float(shift[i]):.2g} of their sd in the mean and a factor {float(ratio[i]):.2g} in the sd, so the trained "
        "sampler is off there (e.g. a skewed marginal it does not follow). Train longer or with more particles; for "
        "a hierarchical model, check its parameterisation."
    )
