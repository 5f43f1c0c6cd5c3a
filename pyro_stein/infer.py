"""The Infer-style driver: amortized Stein variational gradient descent, shaped like :class:`pyro.infer.SVI`."""

from __future__ import annotations

import copy
import math
import numbers
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.optim import PyroOptim
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import _CheckedOption
from .data import (
    Dataset,
    LastDataset,
    PriorPredictiveStream,
    _check_batch_size,
    _dataset_sequence,
    as_dataset,
    iterate_batches,
)
from .guide import AmortizedSteinGuide, _int_at_least, _IntOption, _refuse_half_precision_once
from .kernels import RadialKernel, RBFKernel
from .logjoint import ModelLogDensity, NonFiniteLogJointError, all_finite, finite_sets
from .stein import ksd_from_matrices, stein_direction_from_matrices

__all__ = [
    "AmortizedSVGD",
    "KernelWarning",
    "NonFiniteDatasetWarning",
    "NonFiniteUpdateError",
    "TrainingWarning",
    "default_optim",
    "refine",
]

DEFAULT_NUM_STEPS = 1500
DEFAULT_LR = (1e-2, 1e-3)  # ClippedAdam's learning rate, decayed geometrically from the first to the second over a run
# the adaptive frame: an exponential moving average of the particles' mean and covariance, shrunk towards its diagonal
_FRAME_DECAY = 0.9
_FRAME_SHRINK = 0.1
# health checks at the end of run(): windows of the KSD history, and the collapse statistic's threshold
_HEALTH_WINDOWS = 10
_COLLAPSE_THRESHOLD = 0.25
_HEALTH_DRAWS = 2000
AUTO_POLISH = (10, 5)  # (mcmc_steps, mcmc_leapfrog) run() sets on a guide whose draws fail the collapse check
_HEALTH_MIN_STEPS = 200  # shorter runs are too noisy to judge from the KSD history


class NonFiniteDatasetWarning(UserWarning):
    """Datasets were left out of an amortized training step because their log joint was not finite."""


class TrainingWarning(UserWarning):
    """:meth:`AmortizedSVGD.run` ended in a state that should not be trusted: it diverged, the Stein discrepancy had
    not settled, or the draws' spread collapsed below the posterior's. The message says what to do."""


def default_optim(num_steps: int = DEFAULT_NUM_STEPS) -> pyro.optim.ClippedAdam:
    """The default optimiser of :class:`AmortizedSVGD`: ``ClippedAdam`` with its learning rate decayed
    geometrically from 1e-2 to 1e-3 over ``num_steps`` steps (and on at 1e-3 times that rate per further
    ``num_steps``)."""
    num_steps = _int_at_least(num_steps, "num_steps", 1)
    lr0, lr1 = DEFAULT_LR
    return pyro.optim.ClippedAdam({"lr": lr0, "lrd": (lr1 / lr0) ** (1 / num_steps)})


class KernelWarning(UserWarning):
    """The kernel gave non-finite values (e.g. a custom profile's second derivative), so the step's KSD is NaN."""


class NonFiniteUpdateError(ValueError):
    """An optimiser step made guide parameters NaN or infinite (e.g. an infinite learning rate); the step was undone."""


class _ChoiceOption(_CheckedOption):
    """An :class:`AmortizedSVGD` option that takes one of a few values (compared by type and value), checked whenever
    it is set (``svgd.<name> = value``), with an error naming the option."""

    def __init__(self, choices: tuple, expected: str, error: type[Exception]):
        self.choices, self.expected, self.error = choices, expected, error

    def check(self, value):
        if not any(type(value) is type(c) and value == c for c in self.choices):
            raise self.error(f"svgd.{self.name} must be {self.expected}, got {value!r}")
        return value


def _snapshot(obj):
    """A copy of nested dicts, lists and tuples with every tensor cloned (detached): later steps do not change it."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, then raise it as
    ``KeyboardInterrupt``: an optimiser step is never cut between two parameters. Only in the main thread, and
    only while SIGINT has Python's default handler (a handler of the caller's own is left alone)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def _torch_optimizer(obj):
    """The torch optimiser a PyroOptim keeps for a parameter (a scheduler's optimiser for a PyroLRScheduler)."""
    return obj if isinstance(obj, torch.optim.Optimizer) else getattr(obj, "optimizer", obj)


def _all_finite(params: Sequence[Tensor]) -> bool:
    """Whether every parameter is finite: one fused norm per parameter and one host sync; a non-finite norm (also
    from an overflow of large finite values) is confirmed element by element."""
    if not params:
        return True
    try:
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(list(params))).sum())):
            return True
    except (RuntimeError, TypeError):  # e.g. parameters on several devices
        pass
    return all(bool(torch.isfinite(p).all()) for p in params)


class _UpdateTransaction:
    """The parameters' values and the optimiser's state for them, taken before an optimiser step, so that a step
    that fails part-way (an exception, ``KeyboardInterrupt`` included) or leaves non-finite values is undone
    completely: every parameter and its optimiser state (moments, step counts, a decayed learning rate) back at
    step k, and optimisers created by the failed step forgotten.

    A torch optimiser keeps what a step changes in ``state[param]`` and in its ``param_groups``' hyperparameters
    (e.g. ClippedAdam's decayed learning rate); those are copied (tensors cloned), nothing else is."""

    def __init__(self, optim: PyroOptim, params: Sequence[Tensor]):
        self.optim = optim
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]
        self.states = {}
        for p in self.params:
            obj = optim.optim_objs.get(p)
            if obj is None:
                continue
            opt = _torch_optimizer(obj)
            state = opt.state.get(p)
            self.states[
                p
            ] = (  # hyperparameters are numbers, tuples or None: replaced by a step, never changed in place
                None
                if state is None
                else {
                    k: v.clone() if isinstance(v, Tensor) else _snapshot(v) if isinstance(v, (list, dict)) else v
                    for k, v in state.items()
                },
                [dict(group) for group in opt.param_groups],
            )
        self.waiting = dict(optim._state_waiting_to_be_consumed)

    def rollback(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)
        for p in self.params:
            if p in self.states:
                opt = _torch_optimizer(self.optim.optim_objs[p])
                state, groups = self.states[p]
                if state is None:
                    opt.state.pop(p, None)
                else:
                    opt.state[p] = state
                for group, saved in zip(opt.param_groups, groups):
                    group.update((k, v) for k, v in saved.items() if k != "params")
            elif p in self.optim.optim_objs:
                del self.optim.optim_objs[p]
                self.optim.grad_clip.pop(p, None)
        self.optim._state_waiting_to_be_consumed.clear()
        self.optim._state_waiting_to_be_consumed.update(self.waiting)


def _optimiser_description(optim: PyroOptim, params: Sequence[Tensor]) -> str:
    """``"Adam (lr=0.001)"``: the torch optimiser behind a PyroOptim and its learning rate, for messages."""
    for p in params:
        obj = optim.optim_objs.get(p)
        if obj is None:
            continue
        opt = _torch_optimizer(obj)
        groups = getattr(opt, "param_groups", None) or [{}]
        return f"{type(opt).__name__} (lr={groups[0].get('lr', '?')})"
    ctor = getattr(optim, "pt_optim_constructor", None)
    args = optim.pt_optim_args if isinstance(getattr(optim, "pt_optim_args", None), dict) else {}
    return f"{getattr(ctor, '__name__', type(optim).__name__)} (lr={args.get('lr', '?')})"


def _register_params(guide: AmortizedSteinGuide) -> list[Tensor]:
    """Name the guide's parameters in Pyro's param store (so PyroOptim state is keyed by name)."""
    store = pyro.get_param_store()
    params = []
    for name, p in guide.named_parameters():
        full = f"{guide._pyro_name}$$${name}"
        if store._params.get(full) is not p:
            store._params[full] = p
            store._param_to_name[p] = full
        params.append(p)
    return params


def _unregister_params(guide: AmortizedSteinGuide) -> None:
    """Remove the names :func:`_register_params` gave the guide's parameters (the guide keeps its weights)."""
    store = pyro.get_param_store()
    for name in [n for n in store._params if n.startswith(f"{guide._pyro_name}$$$")]:
        store._param_to_name.pop(store._params.pop(name), None)


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
        guide._standardization_pending = True
        raise


def _is_step_count(value) -> bool:
    """Whether a leading positional argument of :meth:`AmortizedSVGD.run` is the deprecated step count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _history_problems(history: Sequence[float]) -> list[str]:
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
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not isinstance(guide, AmortizedSteinGuide):
            raise TypeError(f"guide must be a pyro_stein.AmortizedSteinGuide, got {type(guide).__name__}")
        self._default_optim = optim is None
        optim = default_optim() if optim is None else optim
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam({{'lr': 1e-3}}) or "
                f"pyro.optim.ClippedAdam(...)), got {type(optim).__name__}"
            )
        kernel = RBFKernel() if kernel is None else kernel
        if not isinstance(kernel, RadialKernel):
            raise TypeError(f"kernel must be a pyro_stein RadialKernel (e.g. RBFKernel()), got {type(kernel).__name__}")
        self.model = model
        self.guide = guide
        self.optim = optim
        self.kernel = kernel
        self.num_particles = num_particles  # checked, here and when set later (see the class attribute)
        if not isinstance(leave_one_out, bool):
            raise TypeError(f"leave_one_out must be True or False, got {leave_one_out!r}")
        self.leave_one_out = leave_one_out
        if precondition not in ("auto", "variance", None):
            raise ValueError(f"precondition must be 'auto', 'variance' or None, got {precondition!r}")
        self.precondition = precondition
        if not isinstance(record_graph, bool):
            raise TypeError(f"record_graph must be True or False, got {record_graph!r}")
        self.record_graph = record_graph
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
        tr = poutine.block(poutine.trace(poutine.condition(model, self.guide._init_values())).get_trace)(
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

        def why() -> str:  # a checked evaluation names the offending particle's sites (only for a message)
            d = datasets[first]
            try:
                self._log_density.log_density_and_score(z[first].detach(), d.args, d.kwargs, plates[first])
            except NonFiniteLogJointError as e:
                return str(e)
            return "the score is not finite at a particle"

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
        guide = self.guide
        for i, d in enumerate(datasets):
            _refuse_half_precision_once(d, i if len(datasets) > 1 else None)
        guide.setup(*datasets[0].args, **datasets[0].kwargs)
        if not guide.amortized:  # one dataset, checked once: latent shapes of the data the guide was set up with
            guide._check_dataset(datasets[0])
        if self._log_density is None:
            # the guide's own model: the user's, or it with a funnel's sites non-centred (see AmortizedSteinGuide)
            self._log_density = ModelLogDensity(
                guide.inference_model, guide.sites, guide.vectorize, record_graph=self.record_graph
            )
        params = _register_params(guide)
        if not getattr(guide, "_standardization_pending", False):
            return self._move(guide, params, datasets)
        with _fitted_standardization(guide, datasets):
            return self._move(guide, params, datasets)

    def _move(self, guide: AmortizedSteinGuide, params: list[Tensor], datasets: Sequence[Dataset]) -> Tensor:
        """The update itself (see :meth:`_update`)."""
        frame = guide.frames(datasets) if guide.per_dataset_frames else None  # per-dataset frames: amortized only
        if guide.amortized:
            z = guide.draw_whitened(self.num_particles, guide._contexts(datasets, frame))  # (B, n, D)
        else:
            if len(datasets) != 1:
                raise ValueError("a non-amortized guide trains on one dataset; build the guide with amortized=True")
            z = guide.draw_whitened(self.num_particles)  # (n, D)
        # the sampler's outputs; without `whiten` they are the unconstrained latents themselves
        x = guide.unwhiten(z.detach(), frame)
        plates = [self._plates_for(d) for d in datasets]
        lp, raw = self._scores(x, datasets, plates)
        keep = self._drop_nonfinite(x, lp, raw, datasets, plates) if raw.dim() == 3 else None
        if keep is not None:
            raw = torch.where(keep[:, None, None], raw, torch.zeros_like(raw))
        score = guide.whiten_score(raw, frame)
        zd = z.detach()
        adaptive = guide.adaptive_frame and not guide.amortized
        if adaptive:  # the direction in the particles' own affine frame, mapped back (affine invariant)
            loc, scale, moments = self._adaptive_frame(zd)
            zd = torch.linalg.solve_triangular(scale, (zd - loc).T, upper=False).T  # L^{-1} (z - m)
            score = score @ scale  # L^T grad_z log p
        km = self.kernel.matrices(zd)
        self._last_kernel_matrices = km
        phi = stein_direction_from_matrices(zd, score, km, self.leave_one_out)
        stat = ksd_from_matrices(zd, score, km)
        if adaptive:
            phi = phi @ scale.T  # L phi_u: the direction for z
        if self.precondition == "variance" or (
            self.precondition == "auto" and guide.amortized and guide.whiten is None
        ):
            # per-dataset, per-coordinate scale: each dataset moves in units of its own posterior sd
            phi = phi * zd.var(-2, keepdim=True)
        if keep is None:
            self._num_used = len(datasets)
            stat = stat.mean().detach()
            loss = -(z * phi).sum(-1).mean()
        else:  # the datasets left out contribute nothing; the loss and KSD are means over the others
            self._num_used = int(keep.sum())
            stat = (torch.where(keep, stat, torch.zeros_like(stat)).sum() / self._num_used).detach()
            per_dataset = (z * phi).sum(-1).mean(-1)
            loss = -torch.where(keep, per_dataset, torch.zeros_like(per_dataset)).sum() / self._num_used
        for p in params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        if not torch.stack([torch.isfinite(g).all() for g in grads]).all():  # one host sync, not one per parameter
            bad = [n for n, p in guide.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            for p in params:
                p.grad = None
            raise NonFiniteLogJointError(
                f"non-finite gradient for guide parameters {bad}; the parameters were not updated"
            )
        self._apply_update(guide, params)
        if adaptive:  # kept only once the step has succeeded
            self._frame_moments = moments
        return stat

    def _apply_update(self, guide: AmortizedSteinGuide, params: list[Tensor]) -> None:
        """The optimiser step, all or nothing: a Ctrl-C during it is held until it has finished (every parameter
        at step k + 1), and an exception inside it, or non-finite parameters after it, undo it (every parameter
        and its optimiser state at step k; :class:`NonFiniteUpdateError` naming the optimiser and learning rate)."""
        optim = self.__dict__.get("_real_optim") or self.optim  # DistributedAmortizedSVGD wraps self.optim
        with _deferred_interrupt():
            update = _UpdateTransaction(optim, params)
            counters = {k: self.__dict__[k] for k in ("num_steps", "datasets_seen") if k in self.__dict__}
            try:
                self.optim([p for p in params if p.grad is not None])
                if not _all_finite(params):
                    names = {p: n for n, p in guide.named_parameters()}
                    bad = [names.get(p, "?") for p in params if not bool(torch.isfinite(p).all())]
                    raise NonFiniteUpdateError(
                        f"the optimiser step of {_optimiser_description(optim, params)} made guide parameters {bad} "
                        "NaN or infinite; the step was undone (parameters and optimiser state as before it). Lower "
                        "the learning rate (it must be finite; e.g. pyro.optim.Adam({'lr': 1e-3}))"
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
            bad = [
                name
                for name, t in (("k", km.k), ("dk (first derivative)", km.dk), ("d2k (second derivative)", km.d2k))
                if not bool(torch.isfinite(t).all())
            ]
            if bad:
                self._warned_kernel = True
                warnings.warn(
                    f"step {self.num_steps - 1}: the KSD this step returns is {value} because the kernel {self.kernel!r} "
                    f"gives non-finite values of {', '.join(bad)} at some particle pairs: check its profile(). The "
                    "parameters were updated with finite values; further non-finite KSDs are not warned about.",
                    KernelWarning,
                    stacklevel=3,
                )
        return value

    def _adaptive_frame(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """``(m, L, moments)``, ``L`` lower triangular: the frame of a guide with an adaptive frame, from a moving average of the
        particles' mean and covariance (shrunk towards its diagonal), updated with this step's particles ``z``.

        The Stein direction is computed on ``u = L^{-1} (z - m)`` with the score ``L^T grad_z log p`` and mapped back
        as ``L phi(u)``: the same fixed point (the posterior), but a step that scales with the particles' own spread
        and correlation, so that badly scaled and strongly correlated posteriors train as well as whitened ones."""
        mean = z.mean(0)
        centred = z - mean
        cov = centred.T @ centred / max(1, z.shape[0] - 1)
        if self._frame_moments is None or self._frame_moments[0].shape != mean.shape:
            moments = (mean, cov)
        else:
            m0, c0 = self._frame_moments
            a = _FRAME_DECAY
            moments = (a * m0 + (1 - a) * mean, a * c0 + (1 - a) * cov)
        loc, cov = moments
        diag = cov.diagonal()
        shrunk = (1 - _FRAME_SHRINK) * cov + _FRAME_SHRINK * torch.diag(diag)
        floor = torch.finfo(z.dtype).eps * diag.abs().max().clamp_min(torch.finfo(z.dtype).tiny)
        shrunk = shrunk + torch.diag(torch.full_like(diag, float(floor)))
        chol, info = torch.linalg.cholesky_ex(shrunk)
        if info != 0:  # numerically not positive definite: the diagonal alone
            chol = torch.diag(diag.clamp_min(float(floor)).sqrt())
        return loc, chol, moments  # the moments are kept (self._frame_moments) only once the step succeeds

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
        datasets = [as_dataset(d) for d in _dataset_sequence(datasets)]
        if not datasets:
            raise ValueError("step_batch needs at least one dataset")
        return self._checked_ksd(self._update(datasets))

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
            below the posterior's (then, unless ``guide.mcmc_steps`` was set, the guide's ``sample_posterior``
            polishes its draws with 10 HMC steps of 5 leapfrogs from then on) (measured with Stein's identity ``E[s (z - m)^T] = -I`` at 2,000 draws: one batched model
            evaluation).
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
        batches: Iterator | None = None
        if datasets is not None:
            if args or kwargs:
                raise ValueError("pass either datasets=... or the model's *args/**kwargs to run(), not both")
            _dataset_sequence(datasets)
            batch_size = _check_batch_size(batch_size)
            if isinstance(datasets, PriorPredictiveStream):
                batches = datasets.batches(batch_size)
            elif isinstance(datasets, Iterator):
                batches = datasets
            else:
                batches = iterate_batches(datasets, batch_size)
        history = []
        with tqdm(total=num_steps, disable=not progress_bar, desc="AmortizedSVGD") as bar:
            for _ in range(num_steps):
                loss = self.step(*args, **kwargs) if batches is None else self.step_batch(next(batches))
                history.append(loss)
                bar.set_postfix(ksd=f"{loss:.3g}", refresh=False)
                bar.update()
        single = batches is None and not self.guide.amortized and bool(history)
        problems = _history_problems(history) if check_health else []
        if check_health and single:  # judged on the trained sampler, before calibrate() corrects its moments
            collapse = self._collapse_problem(args, kwargs)
            if collapse:
                guide = self.guide
                if guide.mcmc_steps == 0:  # the draws fail Stein's identity: polish them unless the user chose
                    guide.mcmc_steps, guide.mcmc_leapfrog = AUTO_POLISH
                    collapse += (
                        f" From now on sample_posterior polishes this guide's draws with {AUTO_POLISH[0]} "
                        f"HMC steps of {AUTO_POLISH[1]} leapfrogs (guide.mcmc_steps = 0 turns it off)."
                    )
                problems.append(collapse)
        if calibrate and single:
            rng = pyro.util.get_rng_state()  # the calibration must not change the random stream of later training
            try:
                self.guide.calibrate(*args, **kwargs)
            finally:
                pyro.util.set_rng_state(rng)
        for message in problems:
            warnings.warn(message, TrainingWarning, stacklevel=2)
        return history

    @torch.no_grad()
    def _collapse_problem(self, args: tuple, kwargs: dict) -> str | None:
        """A message when the guide's draws are far narrower than the posterior in some direction, else ``None``.

        For any distribution ``p`` (with tails that vanish), ``E_p[s (z - m)^T] = -I`` (Stein's identity, ``s`` the
        score). In the draws' own whitened coordinates ``u = L^{-1} (z - m)`` (``L L^T`` their covariance, score
        ``L^T s``), ``M = -E[s_u u^T]`` is ``I`` at the posterior; for a Gaussian posterior and draws narrower by a
        factor ``r`` along a direction, ``M`` has the eigenvalue ``r^2`` there. An eigenvalue of its symmetric part
        below 0.25 (``r`` below about 0.5; Monte Carlo noise at 2,000 draws is a few hundredths per eigenvalue in 10
        dimensions) flags a collapse; affine invariant, so correlated posteriors are judged like independent ones.
        """
        guide = self.guide
        rng = pyro.util.get_rng_state()  # the check must not change the random stream of the training that follows
        try:
            z = guide.draw(_HEALTH_DRAWS)
            with guide._full_data():
                lp, score = self._log_density.log_density_and_score(z, args, kwargs, check=False)
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
        names = sorted(
            {
                s.name
                for s in guide.sites
                for i in (direction > 0.3 * direction.max()).nonzero().flatten().tolist()
                if s.offset <= i < s.offset + s.size
            }
        )
        return (
            f"the guide's draws are narrower than the posterior along a direction of site(s) {names}: Stein's "
            f"identity gives a squared sd ratio of about {float(evals[0]):.2g} there (1 at the posterior). For a "
            "centred hierarchical model (a funnel), a non-centred parameterisation "
            "(pyro.infer.reparam.LocScaleReparam) trains better; otherwise train longer or use more particles. "
            "The calibration at the end of run() corrects the draws' mean, not their spread."
        )

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
    refined = copy.deepcopy(guide)  # AutoGuide.__getstate__ drops the model reference: restore it on both
    guide._model = (model,)
    refined._model = (model,)
    refined._pyro_name = f"{guide._pyro_name}_refined{id(refined)}"
    optim = optim or pyro.optim.Adam({"lr": 1e-3})
    try:
        AmortizedSVGD(model, refined, optim, kernel=kernel, num_particles=num_particles, precondition=precondition).run(
            *args, num_steps=num_steps, progress_bar=progress_bar, check_health=False, **kwargs
        )
    finally:  # one refine per dataset must not pile copies up in Pyro's param store
        _unregister_params(refined)
    return refined
