"""The amortized Stein guide: a Pyro autoguide whose draws come from a neural sampler.

The guide is the autoguide contract and a thin shell over its components: model tracing
(:mod:`pyro_stein.tracing`), the frame (:class:`~pyro_stein.frames.Frame`), network construction
(:mod:`pyro_stein.construction`), the dataset encoding of an amortized guide
(:class:`~pyro_stein.amortization.DatasetEncoding`), post-processing of draws (:mod:`pyro_stein.postprocess`) and
persistence (:mod:`pyro_stein.persistence`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from torch import Tensor, nn

from . import postprocess as _post
from ._checks import _int_at_least
from ._legacy import AmortizationAttribute, PostprocessAttribute, constructor_options, legacy_values_of
from .amortization import Amortization, DatasetEncoding, read_features
from .amortization import size_groups as _size_groups  # noqa: F401 - the name of earlier versions
from .construction import SamplerDistribution, build_encoder, build_sampler
from .data import Dataset, DatasetFeatures, LastDataset, _dataset_sequence, as_dataset
from .frames import Frame, Reparametrise, hierarchical_normal_sites, laplace_frame, unwhiten, whiten_score
from .logjoint import ModelLogDensity, VectorizationWarning, full_data, latent_sites_from_trace, pack, unpack
from .persistence import GuideOptions, Restore, load_guide, save_guide
from .postprocess import PostProcess, Targets
from .tracing import (
    ModelParameterWarning,
    _first_tensor,
    _refuse_half_precision,
    _refuse_half_precision_once,
    check_dataset_shapes,
    check_saved_supports,
    check_sites,
    checked_init,
    conditioned_trace,
    init_to_mean_or_feasible,
    model_structure,
    warn_model_parameters,
)

__all__ = ["AmortizedSteinGuide", "ModelParameterWarning", "SamplerDistribution", "init_to_mean_or_feasible"]

_CACHE_TOKENS = itertools.count()
FrameTensors = tuple[Tensor, Tensor]


def _num_samples(num_samples, arg: str = "num_samples") -> int:
    """``num_samples`` as an ``int`` >= 1 (see :func:`_int_at_least`)."""
    return _int_at_least(num_samples, arg, 1, "a positive int")


class _On:
    """``guide.<name>``: an attribute of one of the guide's components (``options`` are replaced, being frozen)."""

    def __init__(self, component: str, attr: str | None = None, settable: bool = True):
        self.component, self.attr, self.settable = component, attr, settable

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.attr = name, self.attr or name

    def __get__(self, guide, objtype=None):
        return self if guide is None else getattr(getattr(guide, self.component), self.attr)

    def __set__(self, guide, value) -> None:
        if not self.settable:
            raise AttributeError(f"guide.{self.name} is fixed when the guide is built")
        if self.component == "options":  # checked by GuideOptions
            guide.options = dataclasses.replace(guide.options, **{self.attr: value})
        else:
            setattr(getattr(guide, self.component), self.attr, value)


class AmortizedSteinGuide(AutoContinuous):
    """A Pyro guide whose posterior draws come from a neural sampler ``z = f(noise [, dataset encoding])``.

    All continuous latent sites are packed into one unconstrained vector per draw; each site is mapped to its
    support with ``support_bijection(support)``. The guide is trained with :class:`~pyro_stein.AmortizedSVGD`
    (amortized Stein variational gradient descent, Wang & Liu 2016), which needs only the model's unnormalized log
    joint, so the posterior need not be Gaussian. It can replace :class:`~pyro.infer.autoguide.AutoNormal`: it works
    with :class:`~pyro.infer.Predictive` (``parallel`` or not), ``poutine.trace`` and ``poutine.replay``.

    Usage::

        guide = AmortizedSteinGuide(model)
        AmortizedSVGD(model, guide).run(X, y)
        samples = guide.sample_posterior(1000, X, y)
        polished = guide.sample_posterior(1000, X, y, postprocess=[MomentCorrection(), HMC(steps=10, leapfrog=5)])

        # one guide for every dataset of a family: a posterior for a new dataset in one forward pass
        guide = AmortizedSteinGuide(model, amortized=Amortization(context_dim=16), whiten="laplace")
        AmortizedSVGD(model, guide).run(datasets=PriorPredictiveStream(model, make_args, {"y": "y"}))
        samples = guide.sample_posterior_batch(1000, new_datasets)

    **Precision**: the guide computes in the dtype of the model's values, float32 or float64 (float64 where the
    posterior is concentrated). Half-precision data is refused with a ``TypeError`` naming the argument.

    :param callable model: a Pyro model with continuous latent sites.
    :param nn.Module sampler: a custom sampler mapping noise ``(..., noise_dim)`` (and a context ``(..., C)`` in
        amortized mode) to ``(..., latent_dim)``, exposing ``noise_dim`` and ``latent_dim``. Default:
        :class:`~pyro_stein.nn.GaussianResidualSampler`.
    :param callable init_loc_fn: per-site initialisation (default: prior mean if finite, else a feasible point;
        never samples).
    :param float init_scale: initial spread of the default sampler in unconstrained space (relative to the frame's
        sds with a frame).
    :param str whiten: the frame the sampler works in (see :mod:`pyro_stein.frames` and the frames guide).
        ``"auto"`` (default): the Laplace frame where the posterior has a proper mode (from the full data of a model
        that subsamples); where it has none and the model has centred hierarchical ``Normal`` sites, those are
        non-centred (``LocScaleReparam``, :attr:`reparam_sites`) and the Laplace frame is taken there; otherwise an
        adaptive affine frame from the particles (:attr:`frame_fallback_reason` says why). ``"laplace"``: the
        Laplace frame ``z = m + L u`` (``m`` the mode, ``L L^T`` the inverse Hessian there), an error without a
        proper mode; for an amortized guide, each dataset's own (:meth:`frames`), whose summary the sampler also
        sees. ``"adaptive"``: the particles' own moving affine frame. ``None``: no frame. Amortized guides take
        ``"laplace"`` or ``None`` (``"auto"`` is ``None``).
    :param amortized: ``True`` or an :class:`~pyro_stein.Amortization` (the dataset encoding's options):
        condition the sampler on a permutation-invariant encoding of the dataset in the model's arguments.
    :param postprocess: the default post-processing of :meth:`sample_posterior` and :meth:`sample_posterior_batch`
        (a list of steps such as :class:`~pyro_stein.MomentCorrection` and :class:`~pyro_stein.HMC`; default none);
        also :attr:`postprocess`, settable.
    :param str vectorize: how the model's log joint is evaluated over particles, see
        :class:`~pyro_stein.logjoint.ModelLogDensity`.
    :param int num_summary_samples: draws used by :meth:`median` and :meth:`quantiles`.
    :param callable create_plates: as for Pyro's autoguides.
    :param bool record_graph: when the guide evaluates the model itself (frame searches, post-processing), replay a
        graph recorded once per shape of the arguments (after 20 calls with the same shapes) instead of running the
        model under vmap; models whose Python reads the data's values are not recorded. See
        :mod:`pyro_stein.graphs` (``guide.log_density.graphs.status``); the training step's own evaluations record
        separately (``record_graph`` of :class:`~pyro_stein.AmortizedSVGD`).

    Earlier versions' options ``moment_correction``, ``correction_samples``, ``mcmc_steps``, ``mcmc_leapfrog``
    (now ``postprocess``) and ``dataset_fn``, ``encoder``, ``context_dim``, ``mean_features``,
    ``laplace_evaluations`` (now :class:`~pyro_stein.Amortization`) still work, with a ``FutureWarning``.

    References:

    [1] D. Wang, Q. Liu, "Learning to Draw Samples: With Application to Amortized MLE for
        Generative Adversarial Learning", arXiv:1611.01722, 2016.
    [2] Q. Liu, D. Wang, "Stein Variational Gradient Descent", NeurIPS 2016.
    """

    init_scale = _On("options", settable=False)
    vectorize = _On("options", settable=False)
    num_summary_samples = _On("options")
    record_graph = _On("options")
    frame_request = _On("frame", "request", settable=False)
    whiten = _On("frame")
    adaptive_frame = _On("frame", "adaptive")
    frame_fallback_reason = _On("frame", "fallback_reason", settable=False)
    reparam_sites = _On("frame", settable=False)
    # the options of earlier versions (FutureWarning)
    moment_correction = PostprocessAttribute()
    correction_samples = PostprocessAttribute()
    mcmc_steps = PostprocessAttribute()
    mcmc_leapfrog = PostprocessAttribute()
    dataset_fn = AmortizationAttribute()
    context_dim = AmortizationAttribute()
    laplace_evaluations = AmortizationAttribute()

    def __init__(
        self,
        model: Callable,
        *,
        sampler: nn.Module | None = None,
        init_loc_fn: Callable | None = None,
        init_scale: float = 0.1,
        whiten: str | None = "auto",
        amortized: bool | Amortization = False,
        postprocess: Sequence[PostProcess] | None = None,
        vectorize: str = "auto",
        num_summary_samples: int = 1000,
        create_plates: Callable | None = None,
        record_graph: bool = True,
        **deprecated_options,
    ):
        if sampler is not None and not isinstance(sampler, nn.Module):
            raise TypeError(f"sampler must be a torch.nn.Module, got {type(sampler).__name__}")
        if not isinstance(amortized, (bool, Amortization)):
            raise TypeError(f"amortized must be True, False or an Amortization(...), got {amortized!r}")
        if create_plates is not None and not callable(create_plates):
            raise TypeError(
                "create_plates must be a callable (*args, **kwargs) -> plates, or None, "
                f"got {type(create_plates).__name__}"
            )
        amortization, old_steps, old_values = constructor_options(deprecated_options, amortized, postprocess)
        options = GuideOptions(init_scale, vectorize, num_summary_samples, record_graph, postprocess or old_steps)
        frame = Frame(whiten, amortized is not False)
        self._init_fn = init_to_mean_or_feasible() if init_loc_fn is None else init_loc_fn
        super().__init__(model, init_loc_fn=self._init_fn)
        self.options, self.frame = options, frame
        self.amortized = amortized is not False
        self._amortization = amortization
        self._legacy_postprocess = old_values  # what the options of earlier versions said, when they were used
        self._raw_model = (model,)  # (self._model, Pyro's, is the model under the initialisation)
        self._user_model = model
        self._reparam_frames: dict = {}
        if create_plates is not None:
            self.create_plates = create_plates
        # a user's networks are submodules from the start (their weights' names in a state dict and Pyro's param store)
        self._user_sampler = sampler
        self._user_encoder = amortization.encoder if self.amortized else None
        self.sampler: nn.Module | None = None
        self.encoder: nn.Module | None = None
        self.encoding: DatasetEncoding | None = None  # an amortized guide's, from setup
        self.sites: list = []
        self.subsample_plates: dict[str, tuple[int, int]] = {}
        self.deterministic_names: list[str] = []
        self.num_calibrations = 0  # moment corrections folded into the frame (see calibrate)
        self._restore: Restore | None = None  # what a loaded guide's setup restores (see persistence)
        # what this guide caches on Dataset objects is keyed by this token: unique per guide for the process
        self._cache_token = next(_CACHE_TOKENS)
        self._dataset_of = LastDataset()  # calls with the same argument objects share one Dataset (and its caches)

    # ------------------------------------------------------------------ options
    @property
    def postprocess(self) -> tuple[PostProcess, ...]:
        """The default post-processing of :meth:`sample_posterior` (a tuple of steps; set a list, one step or
        ``None``). :meth:`AmortizedSVGD.run` adds an HMC polish when it finds the draws collapsed."""
        return self.options.postprocess

    @postprocess.setter
    def postprocess(self, steps) -> None:
        self.options = dataclasses.replace(self.options, postprocess=_post.steps_argument(steps))
        self._legacy_postprocess = None

    def add_polish(self, polish: PostProcess) -> bool:
        """Append an MCMC ``polish`` to :attr:`postprocess` unless it has one already; returns whether it did. The
        polish runs on as many draws as the steps before it."""
        steps = self.postprocess
        if any(_post.is_polish(s) for s in steps):
            return False
        draws = self._legacy_values()["correction_samples"] if steps or self._legacy_postprocess else None
        self.postprocess = (*steps, polish if draws is None else dataclasses.replace(polish, num_draws=draws))
        return True

    def _legacy_values(self) -> dict:
        return legacy_values_of(self.postprocess, self._legacy_postprocess)

    @property
    def amortization(self) -> Amortization | None:
        """The options of an amortized guide's dataset encoding (``None`` for a guide that is not amortized)."""
        return self._amortization if self.amortized else None

    def _set_amortization(self, config: Amortization) -> None:
        self._amortization = config
        if self.encoding is not None:
            self.encoding.config = config

    @property
    def mean_features(self) -> bool:
        """Whether the default encoder passes the feature means to the sampler (see :class:`Amortization`)."""
        return self.amortized and self._amortization.resolved_mean_features(self.frame.whiten)

    @property
    def per_dataset_frames(self) -> bool:
        """Whether each dataset gets its own Laplace frame (``whiten="laplace"`` with ``amortized``)."""
        return self.whiten is not None and self.amortized

    @property
    def inference_model(self) -> Callable:
        """The model the guide's latent sites belong to: the user's, or it with :attr:`reparam_sites` non-centred."""
        return self._raw_model[0]

    @property
    def standardization_pending(self) -> bool:
        """Whether the encoder's standardisation is still to be fitted on a first training batch."""
        return self.encoding is not None and self.encoding.standardization_pending

    @property
    def num_unconverged_frames(self) -> int:
        """Datasets whose frame search did not converge (amortized ``whiten="laplace"``)."""
        return 0 if self.encoding is None else self.encoding.num_unconverged_frames

    # ------------------------------------------------------------------ setup
    def setup(self, *args, **kwargs) -> AmortizedSteinGuide:
        """Trace the model once with example arguments and build the networks.

        Calling the guide, :meth:`sample_posterior` or a training step does this automatically; call it yourself
        to create the parameters eagerly, e.g. ``AmortizedSteinGuide(model).setup(*example_args)`` before
        :meth:`load_state_dict`."""
        if self.prototype_trace is None:
            _refuse_half_precision(args, kwargs)  # later datasets are checked once each (see check_dataset)
            self._setup_prototype(*args, **kwargs)
        return self

    def _setup_prototype(self, *args, **kwargs):
        """Trace the model and build the networks, all or nothing: on failure (e.g. a malformed first dataset) the
        guide is left unset-up, so a later call with good arguments sets it up afresh."""
        registered = {name: set(getattr(self, name)) for name in ("_modules", "_buffers", "_parameters")}

        def undo():
            for name, keys in registered.items():
                table = getattr(self, name)
                for key in set(table) - keys:
                    del table[key]
            self.prototype_trace = self.sampler = self.encoder = self.encoding = None
            self.sites, self.subsample_plates, self.deterministic_names = [], {}, []

        try:
            try:
                self._build_prototype(*args, **kwargs)
            except Reparametrise as r:  # whiten="auto" found no mode: set up again with the funnel's sites non-centred
                undo()
                self._use_reparam(r.sites, r.reason)
                self._build_prototype(*args, **kwargs)
        except BaseException:
            undo()
            self._use_reparam([], None)
            raise

    def _use_reparam(self, sites: Sequence[str], reason: str | None) -> None:
        self.frame.use_reparam(sites, reason)
        self._model = self._raw_model = (self.frame.reparametrised(self._user_model),)

    def _build_prototype(self, *args, **kwargs):
        if isinstance(self._init_fn, init_to_mean_or_feasible):
            self._init_fn.like = _first_tensor([args, kwargs])
        super(AutoContinuous, self)._setup_prototype(*args, **kwargs)  # AutoGuide: trace the model, collect plates
        check_sites(self.prototype_trace)
        self.sites = latent_sites_from_trace(self.prototype_trace)
        self._unconstrained_shapes = {s.name: s.unconstrained_shape for s in self.sites}
        self._cond_indep_stacks = {s.name: s.cond_indep_stack for s in self.sites}
        self._transforms = {s.name: s.transform for s in self.sites}
        layout = [[s.name, list(s.shape), list(s.unconstrained_shape)] for s in self.sites]
        restore = self._restore
        if restore is not None and layout != restore.sites:
            self.prototype_trace = None
            raise ValueError(
                f"the model's latent sites {layout} do not match the saved guide's {restore.sites}: load it with the "
                "same model and example arguments of the same shapes"
            )
        if restore is not None:
            device = next((v.device for v in self.init_values().values()), None)  # where the bijections' tensors are
            check_saved_supports(self.sites, restore.site_kinds, restore.site_probes, restore.path, device)
        self.latent_dim = sum(s.size for s in self.sites)
        if self.latent_dim == 0:
            raise ValueError("the model has no latent sample sites; there is nothing to infer")
        # the prototype trace hides observed and subsample sites (pyro.deterministic sites are observed): trace again
        structure = model_structure(
            conditioned_trace(self.inference_model, self.init_values(), args, kwargs), self.reparam_sites
        )
        self.subsample_plates, self.deterministic_names, self._reparam_frames, params = structure
        warn_model_parameters(params, stacklevel=4)
        self.log_density = ModelLogDensity(
            self.inference_model, self.sites, self.vectorize, record_graph=self.record_graph, share_across_data=True
        )
        init_loc = pack(self.init_values(), self.sites, batch_dims=0)
        if not torch.isfinite(init_loc).all():
            bad = [s.name for s in self.sites if not torch.isfinite(init_loc[s.offset : s.offset + s.size]).all()]
            raise ValueError(
                f"the initial value of site(s) {bad} is not finite in unconstrained space; pass a different init_loc_fn"
            )

        def evaluate(x: Tensor) -> tuple[Tensor, Tensor]:
            with self.full_data(), poutine.block():
                return self.log_density.log_density_and_score(x, args, kwargs, check=False)

        with warnings.catch_warnings():  # the driver reports a model that does not vectorise, at its first step
            warnings.simplefilter("ignore", VectorizationWarning)
            self._build_networks(checked_init(evaluate, init_loc), args, kwargs)

    def _laplace_frame(self, init_loc: Tensor, args, kwargs) -> FrameTensors:
        if self.frame_request == "laplace":
            self._require_full_data("whiten='laplace'", "use whiten='auto' (which evaluates the full data) or None")

        def neg_log_p(x: Tensor) -> Tensor:
            with self.full_data():
                return -self.log_density.log_density(x.unsqueeze(0), args, kwargs)[0]

        return laplace_frame(neg_log_p, init_loc)

    def _build_networks(self, init_loc: Tensor, args, kwargs) -> None:
        restore = self._restore
        fixed = self.frame.fit(
            init_loc,
            self.amortized,
            restore is not None,
            lambda: self._laplace_frame(init_loc, args, kwargs),
            lambda: [] if self.reparam_sites else self._funnel_sites(args, kwargs),
        )
        if self.per_dataset_frames or fixed is not None:
            init_loc = torch.zeros_like(init_loc)  # the sampler starts at the frame's (each dataset's) Laplace approx.
        if fixed is not None:
            self.register_buffer("whiten_loc", fixed[0])
            self.register_buffer("whiten_scale", fixed[1])
        context_dim, note = 0, ""
        if self.amortized:
            self.encoding = DatasetEncoding(
                self._amortization,
                self._cache_token,
                self.inference_model,
                self.sites,
                self.init_values,
                self.log_density,
                self.per_dataset_frames,
                squash_frame_summary=True if restore is None else restore.frame_summary_squash,
            )
            feats = self.encoding.read(self._dataset_of(args, kwargs))
            config = self._amortization
            self.encoder, pending = build_encoder(
                config.encoder,
                None if restore is None else restore.encoder,
                feats,
                config.context_dim,
                self.mean_features,
                init_loc,
            )
            self.encoding.feature_dim = feats.features.shape[-1]
            context_dim = int(getattr(self.encoder, "output_dim", config.context_dim))
            note = f"the dataset encoding ({context_dim})"
            if self.per_dataset_frames:
                summary_dim = 2 * self.latent_dim  # the frame summary (see DatasetEncoding.encode)
                self.register_buffer("frame_summary_loc", init_loc.new_zeros(summary_dim))
                self.register_buffer("frame_summary_scale", init_loc.new_ones(summary_dim))
                context_dim, note = (
                    context_dim + summary_dim,
                    f"{note} + {summary_dim} (the frame summary of whiten='laplace')",
                )
                pending = True  # fitted on the first training batch (AmortizedSVGD)
            self.encoding.standardization_pending = pending
        self.sampler = build_sampler(
            self._user_sampler,
            None if restore is None else restore.sampler,
            self.sites,
            context_dim,
            init_loc,
            self.init_scale if self.whiten is None else 1.0,
            note,
        )

    def _funnel_sites(self, args, kwargs) -> list[str]:
        return hierarchical_normal_sites(self.inference_model, self.init_values(), args, kwargs, self.full_data)

    def _require_full_data(self, feature: str, fix: str) -> None:
        if self.subsample_plates:
            raise ValueError(
                f"{feature} needs the full-data log density, but the model subsamples plates "
                f"{sorted(self.subsample_plates)}; {fix} or do not subsample"
            )

    def full_data(self):
        """A context in which the model's subsampled plates (if any) use all of their data."""
        return full_data() if self.subsample_plates else nullcontext()

    def init_values(self) -> dict[str, Tensor]:
        """The latent sites' initial values (of the set-up trace), in the networks' dtype and device once they
        exist (after ``.to()``)."""
        if self.prototype_trace is None:
            return {}
        like = self._like() if self.sampler is not None else None
        return {
            n: s["value"].detach()
            if like is None or not s["value"].is_floating_point()
            else s["value"].detach().to(dtype=like.dtype, device=like.device)
            for n, s in self.prototype_trace.iter_stochastic_nodes()
        }

    def check_dataset(self, dataset: Dataset, position: int | None = None) -> None:
        """Refuse, once per :class:`~pyro_stein.data.Dataset`, a dataset the guide's draws would not fit: one with
        half-precision tensors, or one that gives a latent site another shape than the guide was set up with."""
        key = ("checked", self._cache_token)
        if dataset.cache.get(key):
            return
        _refuse_half_precision_once(dataset, position)
        if self.prototype_trace is not None:
            like = self._like() if self.sampler is not None else None
            check_dataset_shapes(self.inference_model, self.sites, like, dataset, position)
        dataset.cache[key] = True

    # ------------------------------------------------------------------ frames and datasets
    def _frame(self, frame: FrameTensors | None) -> FrameTensors:
        if frame is not None:
            return frame
        if self.per_dataset_frames:
            raise ValueError(
                "an amortized guide with whiten='laplace' needs the dataset's frame: pass frame=guide.frames(datasets)"
            )
        return self.whiten_loc, self.whiten_scale

    def unwhiten(self, u: Tensor, frame: FrameTensors | None = None) -> Tensor:
        """Map the sampler's outputs to unconstrained latents: ``m + u L^T`` (identity without a frame).

        :param frame: ``(m, L)`` from :meth:`frames` for an amortized guide (shapes ``(B, D)``, ``(B, D, D)`` for
            ``u`` of shape ``(B, n, D)``, or one dataset's ``(D,)``, ``(D, D)``)."""
        return u if self.whiten is None else unwhiten(u, *self._frame(frame))

    def whiten_score(self, score: Tensor, frame: FrameTensors | None = None) -> Tensor:
        """The score with respect to the sampler's outputs ``u``: ``L^T grad_z log p`` (rows)."""
        return score if self.whiten is None else whiten_score(score, self._frame(frame)[1])

    def frames(self, datasets: Sequence) -> FrameTensors:
        """Per-dataset Laplace frames ``(m (B, D), L (B, D, D))`` of an amortized guide with ``whiten="laplace"``
        (see :meth:`DatasetEncoding.frames <pyro_stein.amortization.DatasetEncoding.frames>`; cached on each
        :class:`~pyro_stein.data.Dataset`)."""
        if not self.per_dataset_frames:
            raise ValueError("frames() is for amortized guides with whiten='laplace'")
        self._require_full_data("whiten='laplace'", "use whiten=None")
        return self.encoding.frames(datasets)

    def frame_of(self, *args, **kwargs) -> FrameTensors | None:
        """The frame ``(m (D,), L (D, D))`` of the dataset ``(*args, **kwargs)`` for :meth:`draw` (amortized guides
        with ``whiten="laplace"``); ``None`` for other guides (their frame, if any, is part of the guide)."""
        return self._frame_of_dataset(self._dataset_of(args, kwargs))

    def _frame_of_dataset(self, dataset: Dataset) -> FrameTensors | None:
        if not self.per_dataset_frames:
            return None
        loc, scale = self.frames([dataset])  # cached on `dataset`
        return loc[0], scale[0]

    def dataset_features(self, *args, **kwargs) -> DatasetFeatures:
        """Per-observation features of the dataset in ``(*args, **kwargs)``, shape ``(1, N, F)`` with a mask."""
        if self.encoding is not None:
            return self.encoding.read(self._dataset_of(args, kwargs))
        dataset = self._dataset_of(args, kwargs)
        return read_features(self._amortization.dataset_fn, self.inference_model, self.init_values(), dataset)

    def fit_standardization(self, datasets: Sequence) -> None:
        """Refit the default encoder's per-feature standardisation (and, with per-dataset frames, the frame
        summary's) on a batch of datasets; :class:`~pyro_stein.AmortizedSVGD` calls it once, on the first batch of
        a freshly built guide. A user-supplied encoder is left alone."""
        if self.encoding is None:
            return
        datasets = [as_dataset(d) for d in datasets]
        if self.per_dataset_frames:
            self._require_full_data("whiten='laplace'", "use whiten=None")
        encoder = self.encoder if self._amortization.encoder is None else None
        self.encoding.fit_standardization(encoder, self._summary_stats(), datasets, self._like())

    def _summary_stats(self) -> FrameTensors | None:
        return (self.frame_summary_loc, self.frame_summary_scale) if self.per_dataset_frames else None

    def encode(self, features: DatasetFeatures, frame: FrameTensors | None = None) -> Tensor:
        """The sampler's contexts ``(B, C)`` for collated datasets (with per-dataset frames, pass their ``frame``
        from :meth:`frames`)."""
        return self.encoding.encode(self.encoder, self._summary_stats(), features, frame)

    def contexts(self, datasets: Sequence[Dataset], frame: FrameTensors | None = None) -> Tensor:
        """:meth:`encode` of :class:`~pyro_stein.data.Dataset` objects, their features cached on them."""
        return self.encoding.contexts(self.encoder, self._summary_stats(), datasets, self._like(), frame)

    def context(self, *args, **kwargs) -> Tensor | None:
        """The sampler's context for one dataset (``None`` for a guide that is not amortized)."""
        return self.context_and_frame(*args, **kwargs)[0]

    def context_and_frame(self, *args, **kwargs) -> tuple[Tensor | None, FrameTensors | None]:
        """:meth:`context` and :meth:`frame_of` of one dataset, its frame found once: what :meth:`draw` takes."""
        return self._context_and_frame(self._dataset_of(args, kwargs))

    def _context_and_frame(self, dataset: Dataset):
        self.check_dataset(dataset)
        frame = self._frame_of_dataset(dataset)
        if not self.amortized:
            return None, frame
        return self.contexts([dataset], None if frame is None else (frame[0][None], frame[1][None]))[0], frame

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """As :meth:`torch.nn.Module.state_dict`, but a snapshot: the tensors are copies, which later training steps
        do not change (``keep_vars=True`` still gives the live parameters)."""
        before = set(destination) if destination is not None else set()
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not keep_vars:
            for k in [k for k in out if k not in before]:
                out[k] = out[k].clone()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.encoding is not None:
            self.encoding.standardization_pending = False  # the loaded buffers hold the trained standardisation
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def copy(self) -> AmortizedSteinGuide:
        """A deep copy of the guide (weights, caches' key and options; see :func:`~pyro_stein.refine`)."""
        model = self.model
        out = copy.deepcopy(self)  # AutoGuide.__getstate__ drops the model reference: restore it on both
        self._model = out._model = (model,)
        return out

    @property
    def param_prefix(self) -> str:
        """The prefix of the guide's parameter names in Pyro's param store (``prefix$$$sampler.loc``, ...); a copy
        that trains beside the original needs its own."""
        return self._pyro_name

    @param_prefix.setter
    def param_prefix(self, prefix: str) -> None:
        if not isinstance(prefix, str) or "$$$" in prefix:
            raise ValueError(f"param_prefix must be a str without '$$$', got {prefix!r}")
        self._pyro_name = prefix

    # ------------------------------------------------------------------ sampling
    def _like(self) -> Tensor:
        return next(self.sampler.parameters())

    def draw(self, num_samples: int, context: Tensor | None = None, frame: FrameTensors | None = None) -> Tensor:
        """Unconstrained draws ``(num_samples, D)``, or ``(B, num_samples, D)`` for a batch of contexts ``(B, C)``;
        differentiable with respect to the networks' parameters. ``frame``: the datasets' :meth:`frames`."""
        return self.unwhiten(self.draw_whitened(num_samples, context), frame)

    def draw_whitened(self, num_samples: int, context: Tensor | None = None) -> Tensor:
        """The sampler's own outputs ``u`` (what the Stein direction moves); :meth:`draw` is ``unwhiten(u)``."""
        like = self._like()
        if context is not None and context.dim() == 2:
            noise = torch.randn(
                context.shape[0], num_samples, self.sampler.noise_dim, dtype=like.dtype, device=like.device
            )
            return self.sampler(noise, context.unsqueeze(-2))
        noise = torch.randn(num_samples, self.sampler.noise_dim, dtype=like.dtype, device=like.device)
        return self.sampler(noise, context)

    def get_posterior(self, *args, **kwargs) -> SamplerDistribution:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        output_map = None
        context, frame = self.context_and_frame(*args, **kwargs)
        if self.per_dataset_frames:
            output_map = lambda u: self.unwhiten(u, frame)  # noqa: E731
        elif self.whiten is not None:
            output_map = self.unwhiten
        return SamplerDistribution(self.sampler, context, self._like(), output_map=output_map)

    def _targets(self, datasets: Sequence[Dataset]) -> Targets:
        """The datasets' posteriors as post-processing evaluates them (a model that subsamples: all its data)."""

        def batch(x):
            with self.full_data():
                return self.log_density.log_density_and_score_batch(x, datasets, check=False)

        def one(x, d):
            with self.full_data():
                lp, score = self.log_density.log_density_and_score(x, d.args, d.kwargs, check=False)
            return lp.to(x.dtype), score.to(x.dtype)  # a model may compute in another precision than its draws

        return Targets(batch, [lambda x, d=d: one(x, d) for d in datasets])

    @torch.no_grad()
    def calibrate(self, *args, **kwargs) -> AmortizedSteinGuide:
        """Fold a Stein correction of the mean into the guide, once: every later draw (``sample_posterior``,
        ``forward`` and so :class:`~pyro.infer.Predictive`, ``median``) comes out corrected at no extra cost.

        Draws 4,000 samples for the dataset ``(*args, **kwargs)`` and applies up to 2 rounds of the location step of
        the moment correction, kept only if it also lowers the kernelized Stein discrepancy of 1,000 of the draws
        (:func:`~pyro_stein.postprocess.calibration_shift`); the shift is composed with the guide's frame (a guide
        without one gets it as its frame, ``whiten == "affine"``). :meth:`AmortizedSVGD.run` calls it at the end of
        training a guide on one dataset. Not for amortized guides (use a :class:`~pyro_stein.MomentCorrection`)."""
        if self.amortized:
            raise ValueError(
                "calibrate() folds one dataset's correction into the guide; an amortized guide corrects each dataset's "
                "draws when they are made: sample with postprocess=[MomentCorrection()] instead"
            )
        self.setup(*args, **kwargs)
        z = self.draw(_post.CALIBRATION_SAMPLES).detach()
        shift = _post.calibration_shift(z, self._targets([self._dataset_of(args, kwargs)]))
        if shift is None:
            return self
        if self.whiten is None:
            self.register_buffer("whiten_loc", shift)
            self.register_buffer("whiten_scale", torch.eye(shift.shape[0], dtype=shift.dtype, device=shift.device))
            self.whiten = "affine"
        else:
            self.whiten_loc.add_(shift)
        self.num_calibrations += 1
        return self

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, postprocess=None, **kwargs) -> dict[str, Tensor]:
        """Draw ``num_samples`` posterior samples of every latent and ``pyro.deterministic`` site.

        :param postprocess: post-processing steps for this call (default :attr:`postprocess`; ``[]``: none).
        :returns: ``{site: Tensor[num_samples, *site_shape]}`` in constrained space.
        """
        z = self._posterior_draws(_num_samples(num_samples), args, kwargs, postprocess)
        out = self._unpack_constrained(z)
        out.update(self.log_density.deterministic(z, self.deterministic_names, args, kwargs))
        return out

    def _posterior_draws(self, num_samples: int, args: tuple, kwargs: dict, postprocess=None) -> Tensor:
        """The unconstrained draws ``(num_samples, D)`` behind :meth:`sample_posterior`."""
        self.setup(*args, **kwargs)
        steps = self.postprocess if postprocess is None else _post.steps_argument(postprocess)
        data = [self._dataset_of(args, kwargs)]
        z = self.draw(_post.population(num_samples, steps), *self._context_and_frame(data[0]))
        return _post.apply(steps, z.unsqueeze(0), self._targets(data))[0, :num_samples]

    @torch.no_grad()
    def sample_posterior_batch(self, num_samples: int, datasets: Sequence, postprocess=None) -> dict[str, Tensor]:
        """Posterior draws for many datasets in one forward pass (amortized guides).

        :param datasets: a sequence of :class:`~pyro_stein.data.Dataset` (or argument tuples).
        :param postprocess: post-processing steps for this call (default :attr:`postprocess`).
        :returns: ``{site: Tensor[num_datasets, num_samples, *site_shape]}`` for latent sites.
        """
        if not self.amortized:
            raise ValueError("sample_posterior_batch needs an amortized guide (amortized=True)")
        num_samples = _num_samples(num_samples)
        steps = self.postprocess if postprocess is None else _post.steps_argument(postprocess)
        datasets = [as_dataset(d) for d in _dataset_sequence(datasets)]
        if not datasets:
            raise ValueError("datasets is empty")
        self.setup(*datasets[0].args, **datasets[0].kwargs)
        for i, d in enumerate(datasets):
            self.check_dataset(d, i)
        frame = self.frames(datasets) if self.per_dataset_frames else None
        z = self.draw(_post.population(num_samples, steps), self.contexts(datasets, frame), frame)
        return self._unpack_constrained(_post.apply(steps, z, self._targets(datasets))[:, :num_samples])

    def _unpack_constrained(self, z: Tensor) -> dict[str, Tensor]:
        return {name: x for name, (_, x) in unpack(z, self.sites).items()}

    def sample_latent(self, *args, **kwargs):
        return pyro.sample(
            f"_{self._pyro_name}_latent", self.get_posterior(*args, **kwargs), infer={"is_auxiliary": True}
        )

    def forward(self, *args, **kwargs):
        """Sample every latent site (constrained) under the model's plates; returns ``{site: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for site, unconstrained_value in self._unpack_latent(latent):
            name = site["name"]
            transform = self._transforms[name]
            value = transform(unconstrained_value)
            log_density = transform.inv.log_abs_det_jacobian(value, unconstrained_value)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
            delta = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        if self._reparam_frames:  # the non-centred sites' original values, so that Predictive(model, guide) sees them
            flat = latent.reshape(-1, latent.shape[-1])
            values = self.log_density.deterministic(flat, list(self._reparam_frames), args, kwargs)
            for name, (stack_frames, event_dim) in self._reparam_frames.items():
                value = values[name].reshape(latent.shape[:-1] + values[name].shape[1:])
                with ExitStack() as stack:
                    for frame in stack_frames:
                        stack.enter_context(plates[frame.name])
                    result[name] = pyro.sample(name, dist.Delta(value, event_dim=event_dim))
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """Empirical posterior median of each latent site (from ``num_summary_samples`` draws)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, Tensor]:
        """Empirical posterior quantiles ``{site: Tensor[len(quantiles), *site_shape]}``, taken coordinate-wise in
        the unconstrained space and mapped to each site's support, as Pyro's ``AutoContinuous`` does."""
        self.setup(*args, **kwargs)
        like = self._like()
        q = torch.as_tensor(quantiles, dtype=like.dtype, device=like.device).reshape(-1)
        if ((q < 0) | (q > 1)).any():
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
        z = self._posterior_draws(self.num_summary_samples, args, kwargs)
        out = self._unpack_constrained(torch.quantile(z.to(like.dtype), q, dim=0))
        if self.reparam_sites:  # quantiles of the computed, non-centred sites' original values, taken directly
            for name, v in self.log_density.deterministic(z, self.reparam_sites, args, kwargs).items():
                out[name] = torch.quantile(v.to(like.dtype), q, dim=0)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save weights, options and library version (no pickled code) to ``path``, atomically.

        The file holds tensors and plain values only (read back with ``weights_only=True``): the networks' weights
        and buffers, the options that are values (:class:`~pyro_stein.persistence.GuideOptions`, the frame, the
        :class:`~pyro_stein.Amortization`'s values), the latent sites' initial values, shapes, supports and
        bijections. Options that are code (a custom ``sampler`` or ``encoder``, ``dataset_fn``, ``create_plates``)
        are recorded as given, and :meth:`load` asks for them again."""
        save_guide(self, path)

    @classmethod
    def load(
        cls,
        path,
        model,
        *args,
        map_location=None,
        sampler=None,
        encoder=None,
        dataset_fn=None,
        create_plates=None,
        **kwargs,
    ):
        """Rebuild a guide saved with :meth:`save` for ``model``, set up with example ``*args, **kwargs`` (the
        model's arguments only: the guide's options come from the file).

        The file is read with ``weights_only=True`` (no code runs) and checked before any network is built: a file
        that is corrupt, holds non-finite values or tensors of another dtype, has a configuration out of range or
        inconsistent with its weights, comes from a newer pyro_stein, or whose latent sites differ from the model's
        in name, shape, support or bijection, raises :class:`~pyro_stein.CheckpointError` naming the file. Files of
        earlier versions load. The restored guide draws what the saved one drew at the same seed. Options that are
        code are passed again: ``sampler``/``encoder`` (an instance of the saved class, when the guide had a custom
        one), ``dataset_fn`` and ``create_plates``. ``map_location`` is passed to :func:`torch.load`; the rebuilt
        guide lives on the device of the example arguments."""
        return load_guide(cls, path, model, args, kwargs, map_location, sampler, encoder, dataset_fn, create_plates)
