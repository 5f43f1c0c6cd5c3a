"""Post-processing of a guide's draws: small steps that :meth:`~pyro_stein.AmortizedSteinGuide.sample_posterior`
applies in order.

Usage::

    from pyro_stein import HMC, MALA, MomentCorrection

    samples = guide.sample_posterior(1000, X, y, postprocess=[MomentCorrection(rounds=2), HMC(steps=10, leapfrog=5)])
    guide.postprocess = [MomentCorrection()]  # the guide's default for later calls (saved with it)

:class:`MomentCorrection` moves each dataset's draws by one affine map towards Stein's identities (exact for a
Gaussian posterior); :class:`MALA` and :class:`HMC` run a few Metropolis-adjusted steps on every draw, each leaving
the posterior invariant. Every step costs batched evaluations of the model's log density and score (one per
correction round, ``steps`` for MALA, ``steps * leapfrog`` for HMC); draws made by ``forward`` (and so by
:class:`~pyro.infer.Predictive`) are never post-processed.

Each step is a frozen dataclass: its options are checked when it is made, and :meth:`PostProcess.to_dict` /
:meth:`PostProcess.from_dict` save and restore it. The steps work on a *population*: at least ``num_draws`` draws
per dataset (the correction's moment estimates, the MCMC preconditioner), of which the first ``num_samples`` are
returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ._checks import _int_at_least
from .kernels import IMQKernel
from .logjoint import all_finite, finite_sets
from .mcmc import hmc_polish, mala_polish
from .stein import ksd, stein_moment_correction, stein_moment_residual

__all__ = ["HMC", "MALA", "MomentCorrection", "PostProcess", "Targets", "moment_correction"]

Evaluation = tuple[Tensor, Tensor]  # (log density, score)


class Targets(NamedTuple):
    """The posteriors a step's draws target, as the guide evaluates them (a model that subsamples on all its data).

    :ivar batch: ``z (B, n, D) -> (log density (B, n), score (B, n, D))``, every dataset at once.
    :ivar each: one function per dataset, ``z (n, D) -> (log density (n,), score (n, D))`` in ``z``'s dtype.
    """

    batch: Callable[[Tensor], Evaluation]
    each: Sequence[Callable[[Tensor], Evaluation]]

    @classmethod
    def of(cls, log_density, datasets: Sequence, context: Callable = nullcontext) -> Targets:
        """The posteriors of ``datasets`` (:class:`~pyro_stein.data.Dataset`) under ``log_density`` (a
        :class:`~pyro_stein.logjoint.ModelLogDensity`), evaluated unchecked inside ``context()`` (e.g. the full
        data of a model that subsamples)."""

        def batch(x):
            with context():
                return log_density.log_density_and_score_batch(x, datasets, check=False)

        def one(x, d):
            with context():
                lp, score = log_density.log_density_and_score(x, d.args, d.kwargs, check=False)
            return lp.to(x.dtype), score.to(x.dtype)  # a model may compute in another precision than its draws

        return cls(batch, [lambda x, d=d: one(x, d) for d in datasets])


def _inf_if_not_finite(x: Tensor) -> Tensor:
    """``x`` with every NaN or infinite entry set to ``+inf`` (a statistic that must never look small)."""
    return torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf")))


def moment_correction(
    z: Tensor, evaluate: Callable[[Tensor], Evaluation], rounds: int, covariance: bool = True
) -> tuple[Tensor, Evaluation]:
    """``rounds`` rounds of :func:`~pyro_stein.stein.stein_moment_correction` on draws ``z`` ``(B, n, D)``, one set
    per dataset; returns the corrected draws and the log density and score at them (each dataset's from its last
    evaluation), in ``z``'s dtype. ``covariance=False``, or at most ``2 D`` draws: the location step alone.

    A round is kept for a dataset only if it lowers :func:`~pyro_stein.stein.stein_moment_residual`
    (the distance from the two identities it targets, measured in the draws' own frame) or the
    kernelized Stein discrepancy of 200 of the draws (IMQ kernel). Each statistic alone misjudges
    some cases (the residual's frame shrinks with too-narrow draws; the 200-draw KSD is noisy near
    the posterior); a round that raises both, e.g. a linearisation far from the posterior that
    overshoots, is dropped, so the draws never end worse than the sampler's own by both measures.
    """
    affine = z.shape[-2] > 2 * z.shape[-1] and covariance

    def zero_unless(ok, s):  # the values of datasets that are not ok (not finite) replaced by zeros
        return torch.where(ok[:, None, None], s, torch.zeros_like(s))

    def score_and_residual(x):
        lp, s = evaluate(x)
        if all_finite(lp, s):
            finite = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        else:  # a draw outside the support (log density -inf) rules the dataset's round out too
            finite = finite_sets(lp, s)
        r = stein_moment_residual(x, zero_unless(finite, s)).masked_fill(~finite, float("inf"))
        return lp, s, _inf_if_not_finite(r)

    def small_ksd(x, s):
        return _inf_if_not_finite(ksd(x[:, :200], s[:, :200], IMQKernel()))

    lp, score, resid = score_and_residual(z)
    active = torch.isfinite(resid)  # a dataset with a non-finite score keeps its draws
    for _ in range(rounds):
        if not active.any():
            break
        # datasets whose draws are not all in the support (infinite residual) take no part: zero draws and scores
        ok = torch.isfinite(resid)
        moved, _ = stein_moment_correction(zero_unless(ok, z), zero_unless(ok, score), affine)
        new_lp, new_score, new_resid = score_and_residual(moved)
        better = active & (new_resid < resid)
        # the KSD decides only where the residual did not improve: computed lazily, for those datasets
        undecided = active & ~better & torch.isfinite(new_resid)
        if undecided.any():
            idx = undecided.nonzero().squeeze(-1)
            wins = small_ksd(moved[idx], new_score[idx]) < small_ksd(z[idx], score[idx])
            better = better.index_put((idx,), wins)
        z = torch.where(better[:, None, None], moved, z)
        score = torch.where(better[:, None, None], new_score, score)
        lp = torch.where(better[:, None], new_lp, lp)
        resid = torch.where(better, new_resid, resid)
        active = better
    return z, (lp.to(z.dtype), score.to(z.dtype))


@dataclass(frozen=True)
class PostProcess:
    """A post-processing step: maps each dataset's draws to draws closer to its posterior.

    :param int num_draws: the step runs on at least this many draws per dataset (default 1000; at least 3): the
        moment estimates of a correction, the preconditioner of an MCMC polish. ``sample_posterior(k)`` makes
        ``max(k, num_draws)`` draws for its steps and returns the first ``k``.
    """

    num_draws: int = field(default=1000, kw_only=True)
    _registry: ClassVar[dict[str, type[PostProcess]]] = {}  # the steps from_dict knows, by class name

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            PostProcess._registry[cls.__name__] = cls

    def __post_init__(self):
        self._int("num_draws", 3)

    def _int(self, name: str, lo: int, expected: str | None = None) -> None:
        """Check the int option ``name`` (>= ``lo``) and hold it as an ``int`` (e.g. from ``numpy.int64``)."""
        value = _int_at_least(getattr(self, name), f"{type(self).__name__}.{name}", lo, expected)
        object.__setattr__(self, name, value)

    def __call__(self, z: Tensor, start: Evaluation | None, targets: Targets) -> tuple[Tensor, Evaluation | None]:
        """Apply the step to draws ``z`` ``(B, n, D)``; ``start``: the log density and score at ``z`` when known.
        Returns the new draws and, when known, the log density and score at them."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The step as plain values: ``{"name": class name, option: value, ...}``."""
        return {"name": type(self).__name__, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PostProcess:
        """The step :meth:`to_dict` gave ``d`` (a ``ValueError`` for an unknown step or option)."""
        if not isinstance(d, dict) or d.get("name") not in PostProcess._registry:
            known = sorted(PostProcess._registry)
            raise ValueError(f"a post-processing step must be a dict with 'name' one of {known}, got {d!r}")
        cls = PostProcess._registry[d["name"]]
        options = {k: v for k, v in d.items() if k != "name"}
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__} has no option(s) {unknown}")
        return cls(**options)


@dataclass(frozen=True)
class MomentCorrection(PostProcess):
    """Rounds of the Stein moment correction (:func:`moment_correction`).

    Each round evaluates the model's score at the draws once and moves them, by one affine map per dataset, towards
    satisfying ``E[s] = 0`` and ``E[s (z - m)^T] = -I``: exact for Gaussian posteriors, the identity (up to Monte
    Carlo error) when the draws are already exact. It removes most of an amortized guide's location and scale error
    on a new dataset at the cost of one batched score evaluation per round.

    :param int rounds: correction rounds (default 1).
    :param bool covariance: also correct the covariance (needs more than ``2 D`` draws, else only the location is
        corrected); ``False``: the location step alone.
    """

    rounds: int = 1
    covariance: bool = True

    def __post_init__(self):
        super().__post_init__()
        self._int("rounds", 1)
        if not isinstance(self.covariance, bool):
            raise TypeError(f"MomentCorrection.covariance must be True or False, got {self.covariance!r}")

    def __call__(self, z: Tensor, start: Evaluation | None, targets: Targets) -> tuple[Tensor, Evaluation]:
        return moment_correction(z, targets.batch, self.rounds, self.covariance)


@dataclass(frozen=True)
class _Polish(PostProcess):
    """``steps`` Metropolis-adjusted steps on every draw, as independent chains preconditioned by the population."""

    steps: int = 10

    def __post_init__(self):
        super().__post_init__()
        self._int("steps", 1)

    def _polish(self, z: Tensor, evaluate, initial: Evaluation | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, z: Tensor, start: Evaluation | None, targets: Targets) -> tuple[Tensor, None]:
        out = [
            self._polish(zi, fn, None if start is None else (start[0][i], start[1][i]))
            for i, (zi, fn) in enumerate(zip(z, targets.each))
        ]
        return torch.stack(out), None


@dataclass(frozen=True)
class MALA(_Polish):
    """Preconditioned Metropolis-adjusted Langevin steps on every draw (:func:`~pyro_stein.mcmc.mala_polish`).

    Each step leaves the posterior invariant, so it can only bring the draws' distribution closer to it (in total
    variation); it fixes the shape (skew, curvature, tails) that an affine correction cannot. One batched evaluation
    of the log density and score per step.

    :param int steps: MALA steps (default 10).
    """

    def _polish(self, z: Tensor, evaluate, initial: Evaluation | None) -> Tensor:
        return mala_polish(z, evaluate, self.steps, initial=initial)[0]


@dataclass(frozen=True)
class HMC(_Polish):
    """Hamiltonian Monte Carlo steps of ``leapfrog`` leapfrog steps on every draw
    (:func:`~pyro_stein.mcmc.hmc_polish`), costing ``steps * leapfrog`` evaluations.

    A trajectory travels where MALA diffuses, but with few steps HMC has less room to tune its step size, so use it
    after a :class:`MomentCorrection` has fixed the draws' spread (see the post-processing guide for a comparison
    at equal cost).

    :param int steps: HMC steps (default 10).
    :param int leapfrog: leapfrog steps per HMC step (default 5).
    """

    leapfrog: int = 5

    def __post_init__(self):
        super().__post_init__()
        self._int("leapfrog", 1)

    def _polish(self, z: Tensor, evaluate, initial: Evaluation | None) -> Tensor:
        return hmc_polish(z, evaluate, self.steps, self.leapfrog, initial=initial)[0]


def is_polish(step: PostProcess) -> bool:
    """Whether ``step`` is an MCMC polish (:class:`MALA` or :class:`HMC`)."""
    return isinstance(step, _Polish)


def steps_argument(value, arg: str = "postprocess") -> tuple[PostProcess, ...]:
    """``value`` as a tuple of steps: ``None`` or ``()`` (none), one :class:`PostProcess`, or a sequence of them."""
    if value is None:
        return ()
    if isinstance(value, PostProcess):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(s, PostProcess) for s in value):
        return tuple(value)
    raise TypeError(
        f"{arg} must be a list of post-processing steps (e.g. [MomentCorrection(rounds=2), HMC(steps=10)] from "
        f"pyro_stein), one step, or None, got {value!r}"
    )


def population(num_samples: int, steps: Sequence[PostProcess]) -> int:
    """How many draws per dataset to make for ``num_samples`` returned ones and ``steps``."""
    return max([num_samples, *(s.num_draws for s in steps)])


def apply(steps: Sequence[PostProcess], z: Tensor, targets: Targets) -> Tensor:
    """The draws ``z`` ``(B, n, D)`` after each step in order (each step starts from the log density and score the
    previous one computed, when it has them)."""
    start = None
    for step in steps:
        z, start = step(z, start, targets)
    return z


# ------------------------------------------------------------------------------------------------ calibration
# calibrate(): draws and correction rounds of the Stein moment correction folded into the frame after training
CALIBRATION_SAMPLES = 4000
_CALIBRATION_ROUNDS = 2
_CALIBRATION_KSD_DRAWS = 1000


def calibration_shift(z: Tensor, targets: Targets) -> Tensor | None:
    """The location shift that :meth:`~pyro_stein.AmortizedSteinGuide.calibrate` folds into a guide's frame, from its
    draws ``z`` ``(n, D)`` of one dataset, or ``None`` when no round of the correction helped.

    Up to 2 rounds of the location step of :func:`moment_correction`; the shift is kept only if it also lowers the
    kernelized Stein discrepancy (IMQ kernel) of 1,000 of the draws."""
    moved, evaluated = moment_correction(z.unsqueeze(0), targets.batch, _CALIBRATION_ROUNDS, covariance=False)
    moved = moved[0]
    if torch.equal(moved, z) or not torch.isfinite(moved).all():
        return None  # no round helped
    k = min(z.shape[0], _CALIBRATION_KSD_DRAWS)
    _, before = targets.each[0](z[:k])
    after = evaluated[1][0, :k]  # the correction's own last evaluation, at the moved draws
    ksd_before = _inf_if_not_finite(ksd(z[:k], before.to(z.dtype), IMQKernel()))
    ksd_after = _inf_if_not_finite(ksd(moved[:k], after.to(z.dtype), IMQKernel()))
    if not bool(ksd_after < ksd_before):
        return None
    return (moved - z).mean(0)  # the location step moves every draw by the same vector


# ------------------------------------------------------------------------------------------------ the old options
LEGACY_OPTIONS = ("moment_correction", "correction_samples", "mcmc_steps", "mcmc_leapfrog")
LEGACY_DEFAULTS = {"moment_correction": 0, "correction_samples": 1000, "mcmc_steps": 0, "mcmc_leapfrog": 1}


def legacy_steps(moment_correction: int, correction_samples: int, mcmc_steps: int, mcmc_leapfrog: int) -> tuple:
    """The steps that the guide options ``moment_correction``, ``correction_samples``, ``mcmc_steps`` and
    ``mcmc_leapfrog`` of earlier versions stood for (a correction, then MALA or HMC, on ``correction_samples``
    draws)."""
    steps: list[PostProcess] = []
    if moment_correction:
        steps.append(MomentCorrection(rounds=moment_correction, num_draws=correction_samples))
    if mcmc_steps:
        if mcmc_leapfrog == 1:
            steps.append(MALA(steps=mcmc_steps, num_draws=correction_samples))
        else:
            steps.append(HMC(steps=mcmc_steps, leapfrog=mcmc_leapfrog, num_draws=correction_samples))
    return tuple(steps)


def legacy_values(steps: Sequence[PostProcess]) -> dict[str, int]:
    """The old options' values that describe ``steps`` (as far as they can)."""
    out = dict(LEGACY_DEFAULTS)
    for s in steps:
        out["correction_samples"] = s.num_draws
        if isinstance(s, MomentCorrection):
            out["moment_correction"] = s.rounds
        elif isinstance(s, _Polish):
            out["mcmc_steps"] = s.steps
            out["mcmc_leapfrog"] = s.leapfrog if isinstance(s, HMC) else 1
    return out
