"""The amortized Stein guide: a Pyro autoguide whose draws come from a neural sampler.

The guide is the autoguide contract and a thin shell over its components: model tracing
(:mod:`pyro_stein.tracing`), the frame (:class:`~pyro_stein.frames.Frame`), network construction
(:mod:`pyro_stein.construction`), the dataset encoding of an amortized guide
(:class:`~pyro_stein.amortization.DatasetEncoding`), post-processing of draws (:mod:`pyro_stein.postprocess`) and
persistence (:mod:`pyro_stein.persistence`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import postprocess as _post
from ._checks import _int_at_least
from ._legacy import (
    AmortizationAttribute,
    MeanFeaturesAttribute,
    PostprocessAttribute,
    constructor_options,
    legacy_values_of,
)
from .amortization import Amortization, read_features
from .autoguide import SamplerGuide, _On
from .construction import GuideSetUp, SamplerDistribution
from .data import Dataset, DatasetFeatures, LastDataset, _dataset_sequence, as_dataset
from .frames import Frame
from .persistence import GuideOptions, Restore, load_guide, save_guide
from .postprocess import PostProcess, Targets
from .tracing import (
    ModelParameterWarning,
    _first_tensor,  # noqa: F401 - imported from here by diagnostics and arviz
    _refuse_half_precision,
    _refuse_half_precision_once,
    check_dataset_shapes,
    init_to_mean_or_feasible,
    require_full_data,
)

__all__ = ["AmortizedSteinGuide", "ModelParameterWarning", "SamplerDistribution", "init_to_mean_or_feasible"]

_CACHE_TOKENS = itertools.count()
FrameTensors = tuple[Tensor, Tensor]


def _num_samples(num_samples, arg: str = "num_samples") -> int:
    """``num_samples`` as an ``int`` >= 1 (see :func:`_int_at_least`)."""
    return _int_at_least(num_samples, arg, 1, "a positive int")


def _check_arguments(sampler, amortized, create_plates) -> None:
    """Type errors naming the argument, for :class:`AmortizedSteinGuide`'s ``sampler``, ``amortized`` and
    ``create_plates``."""
    if sampler is not None and not isinstance(sampler, nn.Module):
        raise TypeError(f"sampler must be a torch.nn.Module, got {type(sampler).__name__}")
    if not isinstance(amortized, (bool, Amortization)):
        raise TypeError(f"amortized must be True, False or an Amortization(...), got {amortized!r}")
    if create_plates is not None and not callable(create_plates):
        raise TypeError(
            f"create_plates must be a callable (*args, **kwargs) -> plates, or None, got {type(create_plates).__name__}"
        )


class AmortizedSteinGuide(SamplerGuide):
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
    :param str whiten: the frame the sampler works in (:class:`~pyro_stein.frames.Frame`, the frames guide):
        ``"auto"`` (default; the Laplace frame where the posterior has a proper mode, else a funnel's sites
        non-centred, else ``"adaptive"``), ``"laplace"`` (``z = m + L u`` at the mode; an amortized guide: each
        dataset's own, :meth:`frames`), ``"adaptive"`` (the particles' own moving affine frame) or ``None``.
    :param amortized: ``True`` or an :class:`~pyro_stein.Amortization` (the dataset encoding's options):
        condition the sampler on a permutation-invariant encoding of the dataset in the model's arguments.
    :param postprocess: the default post-processing of :meth:`sample_posterior` and :meth:`sample_posterior_batch`
        (a list of steps such as :class:`~pyro_stein.MomentCorrection` and :class:`~pyro_stein.HMC`; default none);
        also :attr:`postprocess`, settable.
    :param str vectorize: how the model's log joint is evaluated over particles, see
        :class:`~pyro_stein.logjoint.ModelLogDensity`.
    :param int num_summary_samples: draws used by :meth:`median` and :meth:`quantiles`.
    :param callable create_plates: as for Pyro's autoguides.
    :param bool record_graph: replay graphs recorded once per shape of the arguments for the guide's own model
        evaluations (frame searches, post-processing) instead of running the model under vmap; see
        :mod:`pyro_stein.graphs` (``guide.log_density.graphs.status``).

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
    # the options of earlier versions (FutureWarning)
    moment_correction = PostprocessAttribute()
    correction_samples = PostprocessAttribute()
    mcmc_steps = PostprocessAttribute()
    mcmc_leapfrog = PostprocessAttribute()
    dataset_fn = AmortizationAttribute()
    context_dim = AmortizationAttribute()
    laplace_evaluations = AmortizationAttribute()
    mean_features = MeanFeaturesAttribute()  # reading it does not warn

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
        _check_arguments(sampler, amortized, create_plates)
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
        # built by setup (the encoder and its DatasetEncoding for an amortized guide)
        self.sampler = self.encoder = self.encoding = None
        self.sites, self.subsample_plates, self.deterministic_names = [], {}, []
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
        GuideSetUp(self).run(args, kwargs)  # trace the model, build the components; all or nothing

    def _use_reparam(self, sites: Sequence[str], reason: str | None, keep_centred: bool = False) -> None:
        from pyro.infer.autoguide.initialization import InitMessenger

        self.frame.use_reparam(sites, reason, keep_centred)
        model = self.frame.reparametrised(self._user_model)
        self._raw_model = (model,)
        # Pyro's prototype trace runs self._model: under the initialisation, as AutoContinuous wraps the user's model
        # (unwrapped, the trace would draw the latents from the prior, at random, and move the random stream)
        self._model = (InitMessenger(self._init_fn)(model),)

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
    def frames(self, datasets: Sequence) -> FrameTensors:
        """Per-dataset Laplace frames ``(m (B, D), L (B, D, D))`` of an amortized guide with ``whiten="laplace"``
        (see :meth:`DatasetEncoding.frames <pyro_stein.amortization.DatasetEncoding.frames>`; cached on each
        :class:`~pyro_stein.data.Dataset`)."""
        if not self.per_dataset_frames:
            raise ValueError("frames() is for amortized guides with whiten='laplace'")
        require_full_data(self.subsample_plates, "whiten='laplace'", "use whiten=None")
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
            require_full_data(self.subsample_plates, "whiten='laplace'", "use whiten=None")
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

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.encoding is not None:
            self.encoding.standardization_pending = False  # the loaded buffers hold the trained standardisation
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ sampling
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
        return Targets.of(self.log_density, datasets, self.full_data)  # a model that subsamples: all its data

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
        model's arguments only: the options come from the file; the ones that are code, ``sampler``/``encoder`` (an
        instance of the saved class), ``dataset_fn`` and ``create_plates``, are passed again). It draws what the
        saved one drew at the same seed. The file is read with ``weights_only=True`` and checked before any network
        is built (:func:`~pyro_stein.persistence.checked_payload`); a bad file, or a model whose latent sites differ
        from the saved ones, raises :class:`~pyro_stein.CheckpointError` naming the file. Files of earlier versions
        load. ``map_location`` goes to :func:`torch.load`; the guide lives on the example arguments' device."""
        return load_guide(cls, path, model, args, kwargs, map_location, sampler, encoder, dataset_fn, create_plates)
