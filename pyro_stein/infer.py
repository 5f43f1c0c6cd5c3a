"""The Infer-style driver: amortized Stein variational gradient descent, shaped like :class:`pyro.infer.SVI`.

One step is one pipeline (:meth:`AmortizedSVGD.step`): the datasets, their frames and encodings, the particles
drawn from the guide, the model's log density and score at them, the Stein direction (:func:`stein_update`, a
function of the particles, their scores and the kernel), and the all-or-nothing optimiser update of the guide's
parameters (:mod:`pyro_stein.updates`). :meth:`AmortizedSVGD.reduce_gradients` is the hook where a data-parallel
driver (:class:`~pyro_stein.distributed.DistributedAmortizedSVGD`) averages the gradients over processes.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.optim import PyroOptim
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import _CheckedOption, _int_at_least
from .data import (
    Dataset,
    LastDataset,
    PriorPredictiveStream,
    _check_batch_size,
    _dataset_sequence,
    dataset_batch,
    iterate_batches,
)
from .frames import adaptive_frame
from .guide import AmortizedSteinGuide
from .health import TrainingWarning, collapse_problem, hmc_shift_problem
from .health import history_problems as _history_problems
from .kernels import KernelMatrices, RadialKernel, RBFKernel
from .logjoint import ModelLogDensity, NonFiniteLogJointError, all_finite, finite_sets
from .postprocess import HMC
from .stein import ksd_from_matrices, stein_direction_from_matrices
from .tracing import _refuse_half_precision_once
from .updates import (
    NonFiniteUpdateError,
    UpdateTransaction,
    _all_finite,
    _optimiser_description,
    _snapshot,
    deferred_interrupt,
    register_params,
    unregister_params,
)

__all__ = [
    "AmortizedSVGD",
    "KernelWarning",
    "NonFiniteDatasetWarning",
    "NonFiniteUpdateError",
    "TrainingWarning",
    "default_optim",
    "refine",
    "stein_update",
]

DEFAULT_NUM_STEPS = 1500
DEFAULT_LR = (1e-2, 1e-3)  # ClippedAdam's learning rate, decayed geometrically from the first to the second over a run
AUTO_POLISH = HMC(steps=10, leapfrog=5)  # what run() adds to the post-processing of a guide whose draws collapsed


class NonFiniteDatasetWarning(UserWarning):
    """Datasets were left out of an amortized training step because their log joint was not finite."""


def default_optim(num_steps: int = DEFAULT_NUM_STEPS) -> pyro.optim.ClippedAdam:
    """The default optimiser of :class:`AmortizedSVGD`: ``ClippedAdam`` with its learning rate decayed
    geometrically from 1e-2 to 1e-3 over ``num_steps`` steps (and on at 1e-3 times that rate per further
    ``num_steps``)."""
    num_steps = _int_at_least(num_steps, "num_steps", 1)
    lr0, lr1 = DEFAULT_LR
    return pyro.optim.ClippedAdam({"lr": lr0, "lrd": (lr1 / lr0) ** (1 / num_steps)})


class KernelWarning(UserWarning):
    """The kernel gave non-finite values (e.g. a custom profile's second derivative), so the step's KSD is NaN."""


class _ChoiceOption(_CheckedOption):
    """An :class:`AmortizedSVGD` option that takes one of a few values (compared by type and value), checked whenever
    it is set (``svgd.<name> = value``), with an error naming the option."""

    def __init__(self, choices: tuple, expected: str, error: type[Exception]):
        self.choices, self.expected, self.error = choices, expected, error

    def check(self, value):
        if not any(type(value) is type(c) and value == c for c in self.choices):
            raise self.error(f"svgd.{self.name} must be {self.expected}, got {value!r}")
        return value


class _IntOption(_CheckedOption):
    """An option held as an ``int`` >= ``lo``, checked (and converted, e.g. from ``numpy.int64``) whenever it is
    set, in the constructor or later as ``svgd.<name> = value``, with an error naming the option."""

    def __init__(self, lo: int, expected: str | None = None, owner: str = "svgd"):
        self.lo, self.expected, self.owner = lo, expected, owner

    def check(self, value) -> int:
        return _int_at_least(value, f"{self.owner}.{self.name}", self.lo, self.expected)


@contextmanager
def _fitted_standardization(guide: AmortizedSteinGuide, datasets: Sequence[Dataset]) -> Iterator[None]:
    """Fit the guide's encoder standardisation on ``datasets`` for the block that follows (the first training
    step): if the block fails, the buffers are restored and the fit is left pending, so a failed first step
    leaves no trace and the next batch is fitted afresh."""
    saved = {name: b.clone() for name, b in guide.named_buffers()}
    guide.fit_standardization(datasets)
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for name, b in guide.named_buffers():
                b.copy_(saved[name])
        guide.encoding.standardization_pending = True
        raise


def _is_step_count(value) -> bool:
    """Whether a leading positional argument of :meth:`AmortizedSVGD.run` is the deprecated step count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_parts(model, guide, optim, kernel) -> None:
    """Type errors naming the argument, for :class:`AmortizedSVGD`'s model, guide, optimiser and kernel."""
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if not isinstance(guide, AmortizedSteinGuide):
        raise TypeError(f"guide must be a pyro_stein.AmortizedSteinGuide, got {type(guide).__name__}")
    if optim is not None and not isinstance(optim, PyroOptim):
        raise TypeError(
            f"optim must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam({{'lr': 1e-3}}) or "
            f"pyro.optim.ClippedAdam(...)), got {type(optim).__name__}"
        )
    if kernel is not None and not isinstance(kernel, RadialKernel):
        raise TypeError(f"kernel must be a pyro_stein RadialKernel (e.g. RBFKernel()), got {type(kernel).__name__}")


def _batches(datasets, batch_size: int, args: tuple, kwargs: dict) -> Iterator:
    """The batches of :meth:`AmortizedSVGD.run`'s ``datasets`` (a collection, a stream or an iterator of batches)."""
    if args or kwargs:
        raise ValueError("pass either datasets=... or the model's *args/**kwargs to run(), not both")
    _dataset_sequence(datasets)
    batch_size = _check_batch_size(batch_size)
    if isinstance(datasets, PriorPredictiveStream):
        return datasets.batches(batch_size)
    if isinstance(datasets, Iterator):
        return datasets
    return iterate_batches(datasets, batch_size)


def _after_training(
    guide: AmortizedSteinGuide, history, single: bool, evaluate, calibrate: bool, check_health: bool, args, kwargs
) -> list[str]:
    """The end of :meth:`AmortizedSVGD.run`: the health checks' messages (``check_health``) and, for a guide fitted
    to one dataset (``single``), the collapse check, the calibration (``calibrate``) and the HMC check of the
    calibrated draws (either check adds :data:`AUTO_POLISH` to the guide's post-processing unless it has a polish),
    none changing the random stream of later training."""
    problems = _history_problems(history) if check_health else []
    if check_health and single:  # judged on the trained sampler, before calibrate() corrects its moments
        collapse = collapse_problem(guide, evaluate)
        if collapse:  # the draws fail Stein's identity
            problems.append(_polish_from_now_on(guide, collapse))
    if calibrate and single:
        rng = pyro.util.get_rng_state()  # the calibration must not change the random stream of later training
        try:
            guide.calibrate(*args, **kwargs)
        finally:
            pyro.util.set_rng_state(rng)
    if check_health and single and not guide.postprocess:  # judged on the final sampler, calibrated
        shift = hmc_shift_problem(guide, evaluate)
        if shift:
            problems.append(_polish_from_now_on(guide, shift))
    return problems


def _polish_from_now_on(guide: AmortizedSteinGuide, problem: str) -> str:
    """Add :data:`AUTO_POLISH` to the guide's post-processing, unless the user chose a polish, and say so after the
    health check's ``problem``."""
    if not guide.add_polish(AUTO_POLISH):
        return problem
    return (
        f"{problem} From now on sample_posterior polishes this guide's draws with {AUTO_POLISH.steps} HMC steps of "
        f"{AUTO_POLISH.leapfrog} leapfrogs (guide.postprocess = [] turns it off)."
    )


def _why_not_finite(log_density: ModelLogDensity, z: Tensor, d: Dataset, plates: dict) -> str:
    """Why the log density or score of dataset ``d`` is not finite at particles ``z``: a checked evaluation names the
    offending particle's sites (only for a message)."""
    try:
        log_density.log_density_and_score(z.detach(), d.args, d.kwargs, plates)
    except NonFiniteLogJointError as e:
        return str(e)
    return "the score is not finite at a particle"


def _kernel_problems(km: KernelMatrices) -> list[str]:
    """Which of the kernel matrices (value, first and second derivative) hold non-finite values."""
    return [
        name
        for name, t in (("k", km.k), ("dk (first derivative)", km.dk), ("d2k (second derivative)", km.d2k))
        if not bool(torch.isfinite(t).all())
    ]


# ------------------------------------------------------------------------------------------ the step's maths
def stein_update(
    z: Tensor,
    score: Tensor,
    kernel: RadialKernel,
    leave_one_out: bool = True,
    variance: bool = False,
    frame_moments: tuple[Tensor, Tensor] | None = None,
    adaptive: bool = False,
) -> tuple[Tensor, Tensor, KernelMatrices, tuple[Tensor, Tensor] | None]:
    """The Stein direction at particles ``z`` (``(n, D)``, or ``(B, n, D)``: one set per dataset) with scores
    ``score``: ``(phi, KSD^2, kernel matrices, adaptive frame moments)``.

    ``adaptive``: the direction in the particles' own affine frame (:func:`~pyro_stein.frames.adaptive_frame`, from
    ``frame_moments`` and ``z``), mapped back (affine invariant). ``variance``: each dataset's direction times its
    particles' per-coordinate variance (each dataset moves in units of its own posterior sd)."""
    moments = None
    if adaptive:
        loc, scale, moments = adaptive_frame(z, frame_moments)
        z = torch.linalg.solve_triangular(scale, (z - loc).T, upper=False).T  # L^{-1} (z - m)
        score = score @ scale  # L^T grad_z log p
    km = kernel.matrices(z)
    phi = stein_direction_from_matrices(z, score, km, leave_one_out)
    stat = ksd_from_matrices(z, score, km)
    if adaptive:
        phi = phi @ scale.T  # L phi_u: the direction for z
    if variance:
        phi = phi * z.var(-2, keepdim=True)
    return phi, stat, km, moments


def surrogate_loss(z: Tensor, phi: Tensor, stat: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """``(loss, mean KSD^2, datasets used)``: the loss ``-mean <z, stopgrad(phi)>`` whose gradient moves the
    sampler's weights along ``sum_i (d z_i / d eta)^T phi_i``; with ``keep`` (``(B,)`` bool), the datasets left out
    contribute nothing and the means are over the others."""
    if keep is None:
        return -(z * phi).sum(-1).mean(), stat.mean().detach(), (z.shape[0] if z.dim() == 3 else 1)
    used = int(keep.sum())
    stat = (torch.where(keep, stat, torch.zeros_like(stat)).sum() / used).detach()
    per_dataset = (z * phi).sum(-1).mean(-1)
    return -torch.where(keep, per_dataset, torch.zeros_like(per_dataset)).sum() / used, stat, used


class AmortizedSVGD:
    """Amortized Stein variational gradient descent (Wang & Liu 2016, Algorithm 1).

    Each step draws ``num_particles`` fresh particles ``z_i = f(xi_i)`` from the guide's sampler,
    evaluates the model's unconstrained log joint and its score at all of them (one batched pass
    where the model allows), computes the Stein direction ``phi`` with the kernel, and moves the
    sampler's weights along ``sum_i (d z_i / d eta)^T phi(z_i)`` by minimising the surrogate
    ``-mean_i <z_i, stopgrad(phi_i)>`` with ``optim``.

    The direction is leave-one-out by default (see :mod:`pyro_stein.stein`): particles are i.i.d.
    draws of the sampler every step, so dropping the ``j = i`` term makes ``phi`` an unbiased
    estimate of the population Stein direction and removes SVGD's variance collapse in moderate
    dimension.

    For amortized guides, :meth:`step_batch` takes a batch of datasets; every dataset gets its
    own particle set and its own kernel (particles of different datasets never interact).

    Example::

        guide = AmortizedSteinGuide(model)
        svgd = AmortizedSVGD(model, guide, pyro.optim.ClippedAdam({"lr": 3e-3, "lrd": 0.999}))
        history = svgd.run(X, y, num_steps=2000)

    :param callable model: the Pyro model.
    :param AmortizedSteinGuide guide: the guide to train.
    :param PyroOptim optim: a Pyro optimiser wrapper, e.g. ``pyro.optim.Adam({"lr": 1e-3})``.
    :param RadialKernel kernel: default :class:`~pyro_stein.RBFKernel` (median heuristic).
    :param int num_particles: particles per dataset per step (at least 2).
    :param bool leave_one_out: use the leave-one-out Stein direction (default ``True``).
    :param str precondition: ``"variance"`` multiplies each dataset's direction by its particles'
        per-coordinate variance (detached), so every dataset contributes in units of its own
        posterior sd; without it, datasets with concentrated posteriors (large scores) dominate
        the shared weights of an amortized guide. A positive diagonal rescaling keeps the fixed
        point (``phi = 0`` for every dataset), but it can stall a coordinate whose particles have
        collapsed (its update shrinks with its variance); if training collapses a scale parameter,
        use ``None``. ``"auto"`` (default): on for amortized guides without ``whiten`` (a Laplace
        frame already puts every dataset in units of its own posterior sd).
    :param bool record_graph: once :meth:`step` has seen the same data tensors 20 times in a row,
        record the model's batched log density and score as a graph of tensor operations (a CUDA
        graph on a GPU) and replay it from then on: most of the Python cost of running the model
        goes away (on a GPU, a few ms per step). It applies to vectorized models without
        subsampled plates trained on one dataset, and switches itself off for models it should not
        record (data-dependent Python control flow or shapes, ``pyro.param`` sites, arguments that
        are not dense tensors or plain values); see :mod:`pyro_stein.graphs`. Every 50th replay is
        checked against the model, with a :class:`~pyro_stein.graphs.RecordedGraphWarning` on a
        difference; set ``False`` for a model that reads state other than its arguments (e.g. a
        global reassigned between steps), which the replays between two checks would not see.

    References:

    [1] D. Wang, Q. Liu, "Learning to Draw Samples: With Application to Amortized MLE for
        Generative Adversarial Learning", arXiv:1611.01722, 2016.
    """

    num_particles = _IntOption(2, "an int >= 2 (the Stein direction needs pairs)", owner="svgd")
    leave_one_out = _ChoiceOption((True, False), "True or False", TypeError)
    precondition = _ChoiceOption(("auto", "variance", None), "'auto', 'variance' or None", ValueError)
    record_graph = _ChoiceOption((True, False), "True or False", TypeError)

    def __init__(
        self,
        model,
        guide: AmortizedSteinGuide,
        optim: PyroOptim | None = None,
        kernel: RadialKernel | None = None,
        num_particles: int = 64,
        leave_one_out: bool = True,
        precondition: str | None = "auto",
        record_graph: bool = True,
    ):
        _check_parts(model, guide, optim, kernel)
        self._default_optim = optim is None
        self.model, self.guide = model, guide
        self.optim = default_optim() if optim is None else optim
        self.kernel = RBFKernel() if kernel is None else kernel
        # checked, here and when set later (see the class attributes)
        self.num_particles, self.leave_one_out = num_particles, leave_one_out
        self.precondition, self.record_graph = precondition, record_graph
        self.num_steps = 0
        self.num_dropped_datasets = 0  # datasets left out of a step for a non-finite log joint (see _drop_nonfinite)
        self._warned_nonfinite = False
        self._warned_kernel = False
        self._last_kernel_matrices = None  # of the last step, to say why its KSD was not finite
        self._num_used = 0
        self._log_density: ModelLogDensity | None = None
        self._dataset_of = LastDataset()  # step(*args) on the same data: one Dataset, its cached features reused
        self._frame_moments: tuple[Tensor, Tensor] | None = None  # the adaptive frame's running mean and covariance

    # ------------------------------------------------------------------ core update
    def _plates_for(self, d: Dataset) -> dict[str, Tensor]:
        """Subsample indices for this step: drawn once, shared by every particle of the dataset."""
        if not self.guide.subsample_plates:
            return {}
        model = self.guide.inference_model
        tr = poutine.block(poutine.trace(poutine.condition(model, self.guide.init_values())).get_trace)(
            *d.args, **d.kwargs
        )
        return {name: tr.nodes[name]["value"] for name in self.guide.subsample_plates if name in tr.nodes}

    def _scores(self, z: Tensor, datasets: Sequence[Dataset], plates: Sequence[dict]) -> tuple[Tensor, Tensor]:
        """Log densities and scores at ``z``: ``(n,)``, ``(n, D)`` for one dataset, checked (a non-finite value
        raises naming the sites); ``(B, n)``, ``(B, n, D)`` for a batch, unchecked (see :meth:`_drop_nonfinite`)."""
        ld = self._log_density
        zd = z.detach()
        if zd.dim() == 2:
            d = datasets[0]
            return ld.log_density_and_score(zd, d.args, d.kwargs, plates[0])
        return ld.log_density_and_score_batch(zd, datasets, plates, check=False)

    def _drop_nonfinite(
        self, z: Tensor, lp: Tensor, score: Tensor, datasets: Sequence[Dataset], plates: Sequence[dict]
    ) -> Tensor | None:
        """Which datasets of a batch have a finite log density and score at all their particles (``(B,)`` bool),
        ``None`` when all do.

        A dataset with a non-finite log density or score at some particle (e.g. a scale overflowing in a
        rarely seen corner of the data) is left out of this step, with a :class:`NonFiniteDatasetWarning`
        the first time; when every dataset of the batch is non-finite the step raises
        :class:`~pyro_stein.logjoint.NonFiniteLogJointError` naming the sites, parameters unchanged.
        """
        if all_finite(lp, score):
            return None
        finite = finite_sets(lp, score)
        if bool(finite.all()):  # the sum overflowed
            return None
        first = int((~finite).nonzero()[0, 0])
        dropped = int((~finite).sum())
        why = lambda: _why_not_finite(self._log_density, z[first], datasets[first], plates[first])  # noqa: E731
        if dropped == len(datasets):
            raise NonFiniteLogJointError(f"every dataset of this batch is non-finite; dataset {first}: {why()}")
        self.num_dropped_datasets += dropped
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"step {self.num_steps}: {dropped} of {len(datasets)} datasets left out of this step because "
                f"the log joint is not finite at some of their particles (dataset {first}: {why()}). Training goes on; "
                "further ones are counted in AmortizedSVGD.num_dropped_datasets without a warning. If that count "
                "keeps growing, lower the learning rate.",
                NonFiniteDatasetWarning,
                stacklevel=4,
            )
        return finite

    def _update(self, datasets: Sequence[Dataset]) -> Tensor:
        """One update on a batch of datasets; returns the KSD (see :meth:`_move`). The first update of a fresh
        amortized guide fits its standardisation on this batch, undone if the update fails."""
        guide = self.guide
        for i, d in enumerate(datasets):
            _refuse_half_precision_once(d, i if len(datasets) > 1 else None)
        guide.setup(*datasets[0].args, **datasets[0].kwargs)
        if not guide.amortized:  # one dataset, checked once: latent shapes of the data the guide was set up with
            guide.check_dataset(datasets[0])
        if self._log_density is None:
            # the guide's own model: the user's, or it with a funnel's sites non-centred (see AmortizedSteinGuide)
            self._log_density = ModelLogDensity(
                guide.inference_model, guide.sites, guide.vectorize, record_graph=self.record_graph
            )
        params = register_params(guide, guide.param_prefix)
        with ExitStack() as stack:
            if guide.standardization_pending:
                stack.enter_context(_fitted_standardization(guide, datasets))
            self.before_update(datasets)
            self._reduced = False
            try:
                return self._move(guide, params, datasets)
            except Exception:
                if not self._reduced:
                    self.step_failed()
                raise

    def before_update(self, datasets: Sequence[Dataset]) -> None:
        """A hook called before each update, after the guide is set up (and, on the first update of a fresh
        amortized guide, after its standardisation is fitted on ``datasets``). Does nothing here;
        :class:`~pyro_stein.distributed.DistributedAmortizedSVGD` broadcasts rank 0's parameters before the first."""

    def reduce_gradients(self, params: list[Tensor], num_datasets: int) -> list[Tensor]:
        """A hook called after the backward pass, just before the optimiser step (inside its all-or-nothing
        transaction): ``params`` have gradients computed from ``num_datasets`` datasets; returns the parameters to
        update. Returns ``params`` here; :class:`~pyro_stein.distributed.DistributedAmortizedSVGD` averages the
        gradients over processes."""
        return params

    def step_failed(self) -> None:
        """A hook called when an update raises before :meth:`reduce_gradients` was reached (e.g. a non-finite log
        joint); the error is raised after it. Does nothing here; a data-parallel driver lets the other processes
        know."""

    def _log_density_and_score(self, x: Tensor, datasets: Sequence[Dataset]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The log densities and scores at the particles ``x``, and which datasets of a batch are kept (``None``:
        all; see :meth:`_drop_nonfinite`), the scores of the others zeroed."""
        plates = [self._plates_for(d) for d in datasets]
        lp, raw = self._scores(x, datasets, plates)
        keep = self._drop_nonfinite(x, lp, raw, datasets, plates) if raw.dim() == 3 else None
        if keep is not None:
            raw = torch.where(keep[:, None, None], raw, torch.zeros_like(raw))
        return lp, raw, keep

    def _move(self, guide: AmortizedSteinGuide, params: list[Tensor], datasets: Sequence[Dataset]) -> Tensor:
        """The update as a pipeline: the datasets' frames and encodings, the particles, the log density and score at
        them, the Stein direction, the optimiser step. Returns the particles' KSD (mean over the datasets used)."""
        frame = guide.frames(datasets) if guide.per_dataset_frames else None  # per-dataset frames: amortized only
        if guide.amortized:
            z = guide.draw_whitened(self.num_particles, guide.contexts(datasets, frame))  # (B, n, D)
        else:
            if len(datasets) != 1:
                raise ValueError("a non-amortized guide trains on one dataset; build the guide with amortized=True")
            z = guide.draw_whitened(self.num_particles)  # (n, D)
        # the sampler's outputs; without a frame they are the unconstrained latents themselves
        lp, raw, keep = self._log_density_and_score(guide.unwhiten(z.detach(), frame), datasets)
        variance = self.precondition == "variance" or (
            self.precondition == "auto" and guide.amortized and guide.whiten is None
        )
        phi, stat, km, moments = stein_update(
            z.detach(),
            guide.whiten_score(raw, frame),
            self.kernel,
            self.leave_one_out,
            variance,
            self._frame_moments,
            adaptive=guide.adaptive_frame and not guide.amortized,
        )
        self._last_kernel_matrices = km
        loss, stat, self._num_used = surrogate_loss(z, phi, stat, keep)
        for p in params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        if not torch.stack([torch.isfinite(g).all() for g in grads]).all():  # one host sync, not one per parameter
            if keep is not None and not bool(keep.all()):
                # a left-out dataset's particles can be infinite (its encoder's inputs overflow), and its zero weight
                # in the loss then puts 0 * inf = nan into the shared weights' gradients: the step on the kept alone
                return self._move(guide, params, [d for d, k in zip(datasets, keep.tolist()) if k])
            bad = [n for n, p in guide.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            for p in params:
                p.grad = None
            raise NonFiniteLogJointError(
                f"non-finite gradient for guide parameters {bad}; the parameters were not updated"
            )
        self._apply_update(guide, params)
        if moments is not None:  # the adaptive frame's moments, kept only once the step has succeeded
            self._frame_moments = moments
        return stat

    # counters that an undone optimiser step restores (a subclass may add its own)
    _step_counters: tuple[str, ...] = ("num_steps",)

    def _apply_update(self, guide: AmortizedSteinGuide, params: list[Tensor]) -> None:
        """The optimiser step, all or nothing: a Ctrl-C during it is held until it has finished (every parameter
        at step k + 1), and an exception inside it, or non-finite parameters after it, undo it (every parameter
        and its optimiser state at step k; :class:`NonFiniteUpdateError` naming the optimiser and learning rate)."""
        with deferred_interrupt():
            update = UpdateTransaction(self.optim, params)
            counters = {k: self.__dict__[k] for k in self._step_counters if k in self.__dict__}
            try:
                self._reduced = True
                self.optim(self.reduce_gradients([p for p in params if p.grad is not None], self._num_used))
                if not _all_finite(params):
                    names = {p: n for n, p in guide.named_parameters()}
                    bad = [names.get(p, "?") for p in params if not bool(torch.isfinite(p).all())]
                    raise NonFiniteUpdateError(
                        f"the optimiser step of {_optimiser_description(self.optim, params)} made guide parameters "
                        f"{bad} NaN or infinite; the step was undone (parameters and optimiser state as before it). "
                        "Lower the learning rate (it must be finite; e.g. pyro.optim.Adam({'lr': 1e-3}))"
                    )
            except BaseException:
                update.rollback()
                self.__dict__.update(counters)
                raise
            finally:
                for p in params:
                    p.grad = None
            self.num_steps += 1

    def _checked_ksd(self, stat: Tensor) -> float:
        """The step's KSD as a float; the first time it is not finite because of the kernel's own values (a custom
        kernel's profile or its derivatives NaN or infinite at some pairs), a :class:`KernelWarning` says so (the
        update itself used the kernel and its first derivative, and was finite, or it would have raised)."""
        value = float(stat)
        km = self._last_kernel_matrices
        if not math.isfinite(value) and not self._warned_kernel and km is not None:
            bad = _kernel_problems(km)
            if bad:
                self._warned_kernel = True
                warnings.warn(
                    f"step {self.num_steps - 1}: the KSD this step returns is {value} because the kernel "
                    f"{self.kernel!r} gives non-finite values of {', '.join(bad)} at some particle pairs: check its "
                    "profile(). The parameters were updated with finite values; further non-finite KSDs are not "
                    "warned about.",
                    KernelWarning,
                    stacklevel=3,
                )
        return value

    def step(self, *args, **kwargs) -> float:
        """One update on the dataset given by the model's ``*args, **kwargs``.

        :returns: the kernelized Stein discrepancy ``KSD^2`` (U-statistic, see
            :func:`pyro_stein.ksd`) of this step's particles under the posterior, before the
            update: a noisy, reference-free measure of fit that should fall towards zero.
        :raises NonFiniteLogJointError: (a ``ValueError``) naming the offending sites when the
            log joint or its gradient is not finite; the guide's parameters are left unchanged.
        :raises NonFiniteUpdateError: (a ``ValueError``) naming the optimiser and its learning rate
            when the optimiser step made parameters non-finite; the step is undone (parameters and
            optimiser state as before it). The update is all or nothing: a ``KeyboardInterrupt``
            during it leaves every parameter at the previous step or every one at the new one.
        """
        return self._checked_ksd(self._update([self._dataset_of(args, kwargs)]))

    def step_batch(self, datasets: Sequence[Any]) -> float:
        """One update over a batch of datasets (amortized guides); returns the mean ``KSD^2``.

        A dataset whose log joint or score is not finite at some of its particles is left out of
        this update (a :class:`NonFiniteDatasetWarning` the first time, then counted in
        ``num_dropped_datasets``); the others train as usual. When every dataset of the batch is
        non-finite it raises :class:`~pyro_stein.logjoint.NonFiniteLogJointError` naming the sites,
        the guide's parameters unchanged.
        """
        return self._checked_ksd(self._update(dataset_batch(datasets, "step_batch")))

    def run(
        self,
        *args,
        num_steps: int | None = None,
        datasets: Iterable | PriorPredictiveStream | None = None,
        batch_size: int = 8,
        progress_bar: bool = True,
        calibrate: bool = True,
        check_health: bool = True,
        **kwargs,
    ) -> list[float]:
        """Train and return the per-step diagnostic (see :meth:`step`): ``svgd.run(*model_args, **model_kwargs)``.

        :param int num_steps: updates to run (default 1500). With the default optimiser, its learning rate decays
            from 1e-2 to 1e-3 over the steps of the first ``run``.
        :param datasets: for amortized training: a finite collection of datasets (cycled in
            shuffled batches), a :class:`~pyro_stein.data.PriorPredictiveStream`, or an iterator
            yielding lists of datasets. Leave ``None`` to train on ``*args, **kwargs``.
        :param int batch_size: datasets per step when ``datasets`` is a collection or stream.
        :param bool progress_bar: show a tqdm bar.
        :param bool calibrate: at the end, for a guide fitted to one dataset, fold a Stein moment correction into
            the guide (:meth:`AmortizedSteinGuide.calibrate`: 4,000 draws, up to 3 batched model evaluations), so that
            every later draw comes out corrected at no extra cost.
        :param bool check_health: at the end, raise a :class:`TrainingWarning` when the run diverged, when its Stein
            discrepancy had not settled, or (a guide fitted to one dataset) when the draws' spread has collapsed
            below the posterior's (measured with Stein's identity ``E[s (z - m)^T] = -I`` at 2,000 draws: one batched
            model evaluation); then, unless its ``postprocess`` has an MCMC polish, the guide's ``sample_posterior``
            polishes its draws with ``HMC(steps=10, leapfrog=5)`` from then on (:meth:`AmortizedSteinGuide.add_polish`).
        """
        if num_steps is None and args and _is_step_count(args[0]):
            warnings.warn(
                f"run({args[0]}, ...) with the number of steps first is deprecated: pass it by keyword, "
                f"run(*model_args, num_steps={args[0]}); a leading int is then a model argument",
                FutureWarning,
                stacklevel=2,
            )
            num_steps, args = args[0], args[1:]
        num_steps = DEFAULT_NUM_STEPS if num_steps is None else _int_at_least(num_steps, "num_steps", 0)
        if self._default_optim and self.num_steps == 0 and num_steps > 0:  # the schedule spans this run
            self.optim = default_optim(num_steps)
        batches = None if datasets is None else _batches(datasets, batch_size, args, kwargs)
        history = []
        with tqdm(total=num_steps, disable=not progress_bar, desc="AmortizedSVGD") as bar:
            for _ in range(num_steps):
                loss = self.step(*args, **kwargs) if batches is None else self.step_batch(next(batches))
                history.append(loss)
                bar.set_postfix(ksd=f"{loss:.3g}", refresh=False)
                bar.update()
        single = batches is None and not self.guide.amortized and bool(history)

        def evaluate(z):  # the log density and score at draws of the one dataset, on all its data
            with self.guide.full_data():
                return self._log_density.log_density_and_score(z, args, kwargs, check=False)

        problems = _after_training(self.guide, history, single, evaluate, calibrate, check_health, args, kwargs)
        for message in problems:
            warnings.warn(message, TrainingWarning, stacklevel=2)
        return history

    def get_state(self) -> dict:
        """The optimiser state, keyed by parameter name (see :meth:`set_state`): a snapshot (tensors copied),
        which later steps do not change."""
        state = {
            "optim": _snapshot(self.optim.get_state()),
            "num_steps": self.num_steps,
            "num_dropped_datasets": self.num_dropped_datasets,
        }
        if self._frame_moments is not None:  # the adaptive frame's running moments (see _adaptive_frame)
            state["frame_moments"] = [m.detach().clone() for m in self._frame_moments]
        return state

    def set_state(self, state: dict) -> None:
        """Restore optimiser state saved by :meth:`get_state` (applied lazily on the next step). The state is
        copied: later steps do not change ``state``."""
        self.optim.set_state(_snapshot(state["optim"]))
        self.num_steps = int(state.get("num_steps", 0))
        self.num_dropped_datasets = int(state.get("num_dropped_datasets", 0))
        moments = state.get("frame_moments")
        self._frame_moments = None if moments is None else (moments[0].clone(), moments[1].clone())


def refine(
    guide: AmortizedSteinGuide,
    num_steps: int,
    *args,
    optim: PyroOptim | None = None,
    num_particles: int = 64,
    kernel: RadialKernel | None = None,
    precondition: str | None = "auto",
    progress_bar: bool = False,
    **kwargs,
) -> AmortizedSteinGuide:
    """Semi-amortized refinement: fine-tune a copy of an amortized guide on one dataset.

    Starts from the amortized weights (not from scratch) and runs ``num_steps`` of
    :class:`AmortizedSVGD` on the dataset ``(*args, **kwargs)``; the original guide is untouched.
    The copy stays amortized, so call it (or its ``sample_posterior``) with the same dataset.
    ``optim`` (default ``Adam(lr=1e-3)``), ``num_particles``, ``kernel`` and ``precondition`` are
    passed to :class:`AmortizedSVGD` (use the settings the guide was trained with).

    :returns: the refined copy.
    """
    if not isinstance(guide, AmortizedSteinGuide):
        raise TypeError(f"refine needs an AmortizedSteinGuide, got {type(guide).__name__}")
    model = guide.model
    guide.setup(*args, **kwargs)
    refined = guide.copy()
    refined.param_prefix = f"{guide.param_prefix}_refined{id(refined)}"
    optim = optim or pyro.optim.Adam({"lr": 1e-3})
    try:
        AmortizedSVGD(model, refined, optim, kernel=kernel, num_particles=num_particles, precondition=precondition).run(
            *args, num_steps=num_steps, progress_bar=progress_bar, check_health=False, **kwargs
        )
    finally:  # one refine per dataset must not pile copies up in Pyro's param store
        unregister_params(refined.param_prefix)
    return refined
