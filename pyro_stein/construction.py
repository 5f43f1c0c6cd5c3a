"""Set-up and network construction: :class:`GuideSetUp` traces the model and builds a guide's components, with the
sampler and dataset encoder of :func:`build_sampler` and :func:`build_encoder`; :class:`SamplerDistribution` is the
implicit distribution of the sampler's draws (the guide's auxiliary latent site)."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from torch import Tensor, nn
from torch.distributions import constraints

from .amortization import DatasetEncoding
from .data import DatasetFeatures
from .frames import Reparametrise, hierarchical_normal_sites, laplace_elbo, laplace_frame
from .logjoint import LatentSite, ModelLogDensity, VectorizationWarning, latent_sites_from_trace, pack
from .nn import DeepSetEncoder, GaussianResidualSampler
from .tracing import (
    _first_tensor,
    check_saved_supports,
    check_sites,
    checked_init,
    conditioned_trace,
    init_to_mean_or_feasible,
    model_structure,
    require_full_data,
    warn_model_parameters,
)

__all__ = ["GuideSetUp", "SamplerDistribution", "build_encoder", "build_sampler"]


class SamplerDistribution(dist.TorchDistribution):
    """An implicit distribution: draws ``sampler(noise, context)``; it has no tractable density.

    Used for the guide's auxiliary latent site so that the guide works under plates added by
    :class:`~pyro.infer.Predictive` (``parallel=True``): each batch element gets its own draw.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        sampler: nn.Module,
        context: Tensor | None,
        like: Tensor,
        batch_shape=torch.Size(),
        output_map: Callable[[Tensor], Tensor] | None = None,
    ):
        self.sampler = sampler
        self.context = context
        self.like = like
        self.output_map = output_map
        super().__init__(torch.Size(batch_shape), torch.Size([sampler.latent_dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return SamplerDistribution(self.sampler, self.context, self.like, batch_shape, self.output_map)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        noise = torch.randn(shape + (self.sampler.noise_dim,), dtype=self.like.dtype, device=self.like.device)
        out = self.sampler(noise, self.context)
        return out if self.output_map is None else self.output_map(out)

    def log_prob(self, value):
        raise NotImplementedError(
            "AmortizedSteinGuide's sampler has no tractable density, so it cannot be trained with SVI/ELBO "
            "losses; train it with pyro_stein.AmortizedSVGD"
        )


def _check_module_placement(arg: str, module: nn.Module, like: Tensor) -> None:
    """A user-supplied network must live where the model's values live (the guide never moves it)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point() and (t.device != like.device or t.dtype != like.dtype):
            raise ValueError(
                f"the {arg} passed to AmortizedSteinGuide has tensors on {t.device} with dtype {t.dtype}, but the "
                f"model's latent values are on {like.device} with dtype {like.dtype}; move it first, e.g. "
                f"{arg}.to(device={str(like.device)!r}, dtype={like.dtype})"
            )


def build_encoder(
    user: nn.Module | None, saved: dict | None, feats: DatasetFeatures, context_dim: int, mean_features: bool, like
) -> tuple[nn.Module, bool]:
    """The guide's dataset encoder and whether its standardisation is still to be fitted on a training batch.

    ``user``: the user's encoder (checked to live where ``like`` does); otherwise a
    :class:`~pyro_stein.nn.DeepSetEncoder` for features ``feats`` of one example dataset, of width ``context_dim``
    (plus the feature means with ``mean_features``), squashing outlying features, or as ``saved`` (its config in a
    checkpoint)."""
    if user is not None:
        _check_module_placement("encoder", user, like)
        return user, False
    F = feats.features.shape[-1]
    cfg = saved or {  # the passed-through feature means widen it by F
        "feature_dim": F,
        "output_dim": context_dim + (F if mean_features else 0),
        "mean_features": mean_features,
        "squash": True,
    }
    encoder = DeepSetEncoder(**cfg)
    encoder.to(dtype=like.dtype, device=like.device)
    encoder.set_standardization(feats.features, feats.mask)
    return encoder, True  # refitted on the first training batch (AmortizedSVGD)


def build_sampler(
    user: nn.Module | None,
    saved: dict | None,
    sites: Sequence[LatentSite],
    context_dim: int,
    init_loc: Tensor,
    init_scale: float,
    context_note: str = "",
) -> nn.Module:
    """The guide's sampler: the user's (checked: its ``noise_dim``, ``latent_dim`` and ``context_dim`` fit, it
    lives where ``init_loc`` does), or a :class:`~pyro_stein.nn.GaussianResidualSampler` starting at
    ``init_loc + init_scale * noise`` (or as ``saved``, its config in a checkpoint). ``context_note`` says what the
    context is made of, for the error on a user's sampler of another context width."""
    latent_dim = sum(s.size for s in sites)
    if user is None:
        cfg = saved or {"latent_dim": latent_dim, "context_dim": context_dim, "init_scale": init_scale}
        return GaussianResidualSampler(**cfg, init_loc=init_loc)
    for attr in ("noise_dim", "latent_dim"):
        if not isinstance(getattr(user, attr, None), int):
            raise TypeError(f"a custom sampler must expose an int attribute {attr!r}")
    if user.latent_dim != latent_dim:
        raise ValueError(
            f"the sampler outputs {user.latent_dim} dims but the model's latent sites pack into "
            f"{latent_dim} unconstrained dims ({[(s.name, tuple(s.unconstrained_shape)) for s in sites]})"
        )
    expected = getattr(user, "context_dim", None)
    if isinstance(expected, int) and context_note and expected != context_dim:
        raise ValueError(
            f"the sampler takes a context of width {expected}, but this guide passes {context_note} = {context_dim}; "
            f"build the sampler with context_dim={context_dim}"
        )
    _check_module_placement("sampler", user, init_loc)
    return user


class GuideSetUp:
    """Sets an :class:`~pyro_stein.AmortizedSteinGuide` up from example arguments (its builder): traces the model
    (:mod:`pyro_stein.tracing`), fits or restores the frame (:class:`~pyro_stein.frames.Frame`), and builds the
    dataset encoding (:class:`~pyro_stein.amortization.DatasetEncoding`), the encoder and the sampler; all or nothing.
    The guide's ``setup`` runs it once."""

    def __init__(self, guide):
        self.guide = guide

    def run(self, args: tuple, kwargs: dict) -> None:
        """Set the guide up with the example arguments, all or nothing: on failure (e.g. a malformed first dataset)
        the guide is left unset-up, so a later call with good arguments sets it up afresh."""
        g = self.guide
        registered = {name: set(getattr(g, name)) for name in ("_modules", "_buffers", "_parameters")}

        def undo():
            for name, keys in registered.items():
                table = getattr(g, name)
                for key in set(table) - keys:
                    del table[key]
            g.prototype_trace = g.sampler = g.encoder = g.encoding = None
            g.sites, g.subsample_plates, g.deterministic_names = [], {}, []

        try:
            for attempt in range(3):  # whiten="auto": the model's own parameterisation, non-centred, perhaps back
                try:
                    self.trace(args, kwargs)
                    break
                except Reparametrise as r:  # set up again with the funnel's sites non-centred (or centred again)
                    undo()
                    if attempt == 2:
                        raise RuntimeError(f"the automatic frame did not settle ({r.reason})") from None
                    g._use_reparam(r.sites, r.reason, r.keep_centred)
        except BaseException:
            undo()
            g._use_reparam([], None)
            raise

    def trace(self, args: tuple, kwargs: dict) -> None:
        """Trace the model: its latent sites (checked, and against a saved guide's), subsampled plates,
        deterministic sites and log density; then :meth:`networks` from a checked starting point."""
        g = self.guide
        if isinstance(g._init_fn, init_to_mean_or_feasible):
            g._init_fn.like = _first_tensor([args, kwargs])
        AutoGuide._setup_prototype(g, *args, **kwargs)  # trace the model under the initialisation, collect plates
        check_sites(g.prototype_trace)
        g.sites = latent_sites_from_trace(g.prototype_trace)
        g._unconstrained_shapes = {s.name: s.unconstrained_shape for s in g.sites}
        g._cond_indep_stacks = {s.name: s.cond_indep_stack for s in g.sites}
        g._transforms = {s.name: s.transform for s in g.sites}
        layout = [[s.name, list(s.shape), list(s.unconstrained_shape)] for s in g.sites]
        restore = g._restore
        if restore is not None and layout != restore.sites:
            g.prototype_trace = None
            raise ValueError(
                f"the model's latent sites {layout} do not match the saved guide's {restore.sites}: load it with the "
                "same model and example arguments of the same shapes"
            )
        if restore is not None:
            device = next((v.device for v in g.init_values().values()), None)  # where the bijections' tensors are
            check_saved_supports(g.sites, restore.site_kinds, restore.site_probes, restore.path, device)
        g.latent_dim = sum(s.size for s in g.sites)
        if g.latent_dim == 0:
            raise ValueError("the model has no latent sample sites; there is nothing to infer")
        # the prototype trace hides observed and subsample sites (pyro.deterministic sites are observed): trace again
        structure = model_structure(
            conditioned_trace(g.inference_model, g.init_values(), args, kwargs), g.reparam_sites
        )
        g.subsample_plates, g.deterministic_names, g._reparam_frames, params = structure
        warn_model_parameters(params, stacklevel=4)
        g.log_density = ModelLogDensity(
            g.inference_model, g.sites, g.vectorize, record_graph=g.record_graph, share_across_data=True
        )
        init_loc = pack(g.init_values(), g.sites, batch_dims=0)
        if not torch.isfinite(init_loc).all():
            bad = [s.name for s in g.sites if not torch.isfinite(init_loc[s.offset : s.offset + s.size]).all()]
            raise ValueError(
                f"the initial value of site(s) {bad} is not finite in unconstrained space; pass a different init_loc_fn"
            )

        def evaluate(x: Tensor) -> tuple[Tensor, Tensor]:
            with g.full_data(), poutine.block():
                return g.log_density.log_density_and_score(x, args, kwargs, check=False)

        with warnings.catch_warnings():  # the driver reports a model that does not vectorise, at its first step
            warnings.simplefilter("ignore", VectorizationWarning)
            self.networks(checked_init(evaluate, init_loc), args, kwargs)

    def _laplace_frame(self, init_loc: Tensor, args, kwargs) -> tuple[Tensor, Tensor]:
        g = self.guide
        if g.frame_request == "laplace":
            require_full_data(
                g.subsample_plates, "whiten='laplace'", "use whiten='auto' (which evaluates the full data) or None"
            )

        def neg_log_p(x: Tensor) -> Tensor:
            with g.full_data():
                return -g.log_density.log_density(x.unsqueeze(0), args, kwargs)[0]

        return laplace_frame(neg_log_p, init_loc)

    def _laplace_elbo(self, frame: tuple[Tensor, Tensor], args, kwargs) -> float:
        g = self.guide

        def log_p(x: Tensor) -> Tensor:
            with g.full_data(), poutine.block():
                return g.log_density.log_density(x, args, kwargs)

        return laplace_elbo(log_p, *frame)

    def networks(self, init_loc: Tensor, args: tuple, kwargs: dict) -> None:
        """Fit (or restore) the frame, then build the dataset encoding, the encoder and the sampler."""
        g = self.guide
        restore = g._restore
        fixed = g.frame.fit(
            init_loc,
            g.amortized,
            restore is not None,
            lambda: self._laplace_frame(init_loc, args, kwargs),
            lambda: [] if g.reparam_sites else self._funnel_sites(args, kwargs),
            lambda frame: self._laplace_elbo(frame, args, kwargs),
        )
        if g.per_dataset_frames or fixed is not None:
            init_loc = torch.zeros_like(init_loc)  # the sampler starts at the frame's (each dataset's) Laplace approx.
        if fixed is not None:
            g.register_buffer("whiten_loc", fixed[0])
            g.register_buffer("whiten_scale", fixed[1])
        context_dim, note = 0, ""
        if g.amortized:
            g.encoding = DatasetEncoding(
                g._amortization,
                g._cache_token,
                g.inference_model,
                g.sites,
                g.init_values,
                g.log_density,
                g.per_dataset_frames,
                squash_frame_summary=True if restore is None else restore.frame_summary_squash,
            )
            feats = g.encoding.read(g._dataset_of(args, kwargs))
            config = g._amortization
            g.encoder, pending = build_encoder(
                config.encoder,
                None if restore is None else restore.encoder,
                feats,
                config.context_dim,
                g.mean_features,
                init_loc,
            )
            g.encoding.feature_dim = feats.features.shape[-1]
            context_dim = int(getattr(g.encoder, "output_dim", config.context_dim))
            note = f"the dataset encoding ({context_dim})"
            if g.per_dataset_frames:
                summary_dim = 2 * g.latent_dim  # the frame summary (see DatasetEncoding.encode)
                g.register_buffer("frame_summary_loc", init_loc.new_zeros(summary_dim))
                g.register_buffer("frame_summary_scale", init_loc.new_ones(summary_dim))
                context_dim, note = (
                    context_dim + summary_dim,
                    f"{note} + {summary_dim} (the frame summary of whiten='laplace')",
                )
                pending = True  # fitted on the first training batch (AmortizedSVGD)
            g.encoding.standardization_pending = pending
        g.sampler = build_sampler(
            g._user_sampler,
            None if restore is None else restore.sampler,
            g.sites,
            context_dim,
            init_loc,
            g.init_scale if g.whiten is None else 1.0,
            note,
        )

    def _funnel_sites(self, args, kwargs) -> list[str]:
        g = self.guide
        return hierarchical_normal_sites(g.inference_model, g.init_values(), args, kwargs, g.full_data)
