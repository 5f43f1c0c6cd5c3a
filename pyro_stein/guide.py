"""The amortized Stein guide: a Pyro autoguide whose draws come from a neural sampler."""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import constraints

from ._checks import _CheckedOption, _int_at_least
from .data import Dataset, DatasetFeatures, LastDataset, _dataset_sequence, collate_features, default_dataset_fn
from .kernels import IMQKernel
from .laplace import LaplaceFrameWarning, laplace_frames
from .logjoint import (
    LatentSite,
    ModelLogDensity,
    VectorizationWarning,
    all_finite,
    finite_sets,
    full_data,
    latent_sites_from_trace,
    pack,
    top_level,
    unpack,
)
from .mcmc import hmc_polish, mala_polish
from .nn import DeepSetEncoder, GaussianResidualSampler
from .stein import ksd, stein_moment_correction, stein_moment_residual
from .transforms import support_bijection

__all__ = ["AmortizedSteinGuide", "ModelParameterWarning", "SamplerDistribution", "init_to_mean_or_feasible"]


_CACHE_TOKENS = itertools.count()

WHITEN_OPTIONS = ("auto", "laplace", "adaptive", None)
# a starting point whose score exceeds this (in any unconstrained coordinate) is treated as a singular point
_EXTREME_SCORE = 1e6
# the Laplace frame's centre must be a mode: the Newton step from it below this many frame sds
_MODE_TOLERANCE = 0.05
# calibrate(): draws and correction rounds of the Stein moment correction folded into the frame after training
_CALIBRATION_SAMPLES = 4000
_CALIBRATION_ROUNDS = 2
_CALIBRATION_KSD_DRAWS = 1000


def _first_tensor(obj) -> Tensor | None:
    if isinstance(obj, Tensor) and obj.is_floating_point():
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _inf_if_not_finite(x: Tensor) -> Tensor:
    """``x`` with every NaN or infinite entry set to ``+inf`` (a statistic that must never look small)."""
    return torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf")))


def _discrete_site_error(name: str, fn) -> ValueError:
    return ValueError(
        f"latent site {name!r} is discrete ({type(fn).__name__}); AmortizedSteinGuide handles continuous latents "
        "only, and does not enumerate. Sum it out of the model by hand (e.g. a mixture distribution such as "
        "MixtureSameFamily, or pyro.factor with a logsumexp over its values), or make it observed."
    )


def _tensors_in(value, where: str):
    """``(where, tensor)`` for every tensor in a model argument (nested in dicts, lists and tuples)."""
    if isinstance(value, Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, f"{where}[{i}]")


def _refuse_half_precision(args: tuple, kwargs: dict, position: int | None = None) -> None:
    """Half-precision (``float16``, ``bfloat16``) model arguments are refused with a ``TypeError`` naming the
    argument: the log density's score loses too much in them (a first step of NaN, a posterior sd far off)."""
    which = "the model's " if position is None else f"dataset {position}'s "
    named = [(f"{which}argument {i}", a) for i, a in enumerate(args)] + [
        (f"{which}argument {k!r}", v) for k, v in kwargs.items()
    ]
    for name, value in named:
        for where, t in _tensors_in(value, name):
            if t.dtype in (torch.float16, torch.bfloat16):
                raise TypeError(
                    f"{where} has dtype {t.dtype}: pyro_stein computes in float32 or float64 only (in half "
                    "precision the log density's score is too coarse: steps give NaN or a wrong posterior spread). "
                    "Convert it with .float() (or .double()), and keep the model's constants in that dtype too"
                )


def _refuse_half_precision_once(dataset: Dataset, position: int | None = None) -> None:
    """:func:`_refuse_half_precision` for a :class:`~pyro_stein.data.Dataset`, once (its arguments' dtypes cannot
    change in place)."""
    cache = dataset._cache  # not .cache: the dtypes cannot change in place, so no need to compare tensor versions
    if not cache.get("half_precision_checked"):
        _refuse_half_precision(dataset.args, dataset.kwargs, position)
        cache["half_precision_checked"] = True


def _size_groups(sizes: Sequence[int], slack: int = 4096) -> list[list[int]]:
    """Positions of datasets grouped by size for padding: in order of size, a dataset joins the current group
    unless padding the group to its size would make the group hold more than twice its real rows plus ``slack``
    (so similar sizes, and all small ones, share one group; a dataset far larger than the rest gets its own)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        n = sizes[i]
        if current and (len(current) + 1) * n > 2 * (total + n) + slack:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    groups.append(current)
    return groups


def _has_tensor_bounds(support) -> bool:
    """Whether a support has bounds held in tensors (which may come from the data), e.g. ``Uniform(0, hi)``'s."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return any(isinstance(getattr(support, k, None), Tensor) for k in ("lower_bound", "upper_bound"))


def _num_samples(num_samples, arg: str = "num_samples") -> int:
    """``num_samples`` as an ``int`` >= 1 (see :func:`_int_at_least`)."""
    return _int_at_least(num_samples, arg, 1, "a positive int")


_FORMAT_VERSION = 2  # of the file AmortizedSteinGuide.save writes; 2 adds init values and site supports
_GUIDE_OPTIONS = (
    "init_loc_fn",
    "init_scale",
    "amortized",
    "context_dim",
    "mean_features",
    "vectorize",
    "num_summary_samples",
    "moment_correction",
    "correction_samples",
    "whiten",
    "mcmc_steps",
    "laplace_evaluations",
    "mcmc_leapfrog",
    "record_graph",
)
_MAX_DIM = 1 << 20  # a bound on the sizes a checkpoint's configuration may state (checked against its weights too)
_MAX_DRAWS = 1 << 24


def _constraint_kind(c) -> str:
    """A constraint's structure as a string: its class and, for wrappers, those of what it wraps (no values)."""
    parts = []
    while True:
        name = type(c).__name__.lstrip("_")
        if hasattr(c, "reinterpreted_batch_ndims"):
            name += f"[{c.reinterpreted_batch_ndims}]"
        parts.append(name)
        if not hasattr(c, "base_constraint"):
            return "/".join(parts)
        c = c.base_constraint


def _transform_kind(t) -> str:
    """A transform's structure as a string (class names, composed parts in order)."""
    name = type(t).__name__
    if getattr(t, "parts", None):
        return f"{name}({', '.join(_transform_kind(p) for p in t.parts)})"
    if hasattr(t, "base_transform"):
        return f"{name}({_transform_kind(t.base_transform)})"
    return name


def _site_kind(site: LatentSite) -> tuple[str, str]:
    """``(support structure, bijection structure)`` of a latent site, as a checkpoint records them."""
    return _constraint_kind(site.support), _transform_kind(site.transform)


def _site_probe(site: LatentSite, dtype: torch.dtype, device=None) -> Tensor:
    """The site's bijection at fixed unconstrained points (``linspace(-2, 2)``), flattened: equal for two sites
    exactly when their supports map the same weights to the same values (e.g. ``Uniform(0, 1)`` vs ``(0, 2)``)."""
    probe = torch.linspace(-2.0, 2.0, site.size, dtype=dtype, device=device).reshape(site.unconstrained_shape)
    return site.transform(probe).detach().reshape(-1).clone()


def _refuse_guide_options(model, kwargs: dict) -> None:
    """``AmortizedSteinGuide.load``'s keywords go to the model: refuse a guide option among them (it comes from
    the file) unless the model itself takes an argument of that name."""
    import inspect

    given = [k for k in kwargs if k in _GUIDE_OPTIONS]
    if not given:
        return
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):
        params = {}
    given = [k for k in given if k not in params]
    if given:
        raise TypeError(
            f"AmortizedSteinGuide.load got the guide option(s) {given}: a guide's options are restored from the file "
            "(init_loc_fn as the initial values it gave); load's other keywords are the model's arguments. Drop "
            f"{given[0]}=..., or set a changeable option after loading (e.g. guide.num_summary_samples = 500)"
        )


def _checked_payload(path, payload) -> dict:
    """The configuration of a loaded :meth:`AmortizedSteinGuide.save` file, after checking the whole file: format and
    version, the configuration's types and ranges, the tensors (float32 or float64, one dtype, finite), and that
    the networks the configuration describes have exactly the file's weights' names and shapes (built on the
    ``meta`` device: nothing is allocated). Raises :class:`~pyro_stein.CheckpointError` naming the file."""
    from ._io import CheckpointError, check_tensor_dict, config_choice, config_float, config_int

    if not isinstance(payload, dict) or payload.get("format") != "pyro_stein.AmortizedSteinGuide":
        raise CheckpointError(path, "is not a file written by AmortizedSteinGuide.save()")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(path, f"has format_version {version!r}, not a positive int: the file is corrupt")
    if version > _FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"has format_version {version} (written by pyro_stein {payload.get('pyro_stein_version')!s}), but "
            f"this pyro_stein reads format_version {_FORMAT_VERSION} and older: upgrade pyro_stein to load it",
        )
    cfg = payload.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(path, "lacks its config dict: the file is corrupt")
    config_float(path, cfg, "init_scale", 0.0, 1e6)
    config_choice(path, cfg, "amortized", (True, False))
    for key in ("record_graph", "frame_context", "frame_summary_squash", "custom_dataset_fn", "custom_create_plates"):
        config_choice(path, cfg, key, (True, False), False)
    config_choice(path, cfg, "mean_features", (True, False, None), None)
    config_int(path, cfg, "context_dim", 1, _MAX_DIM)
    config_choice(path, cfg, "vectorize", ("auto", "vmap", "loop"))
    config_int(path, cfg, "num_summary_samples", 1, _MAX_DRAWS)
    config_int(path, cfg, "moment_correction", 0, 1000, 0)
    config_int(path, cfg, "correction_samples", 3, _MAX_DRAWS, 1000)
    config_int(path, cfg, "mcmc_steps", 0, 1 << 20, 0)
    config_int(path, cfg, "mcmc_leapfrog", 1, 1 << 12, 1)
    config_int(path, cfg, "laplace_evaluations", 1, 1 << 20, 50)
    config_choice(path, cfg, "whiten", (None, "laplace", "affine", "adaptive"), None)
    config_choice(path, cfg, "adaptive_frame", (True, False), False)
    reparam = cfg.get("reparam_sites", [])
    if not (isinstance(reparam, list) and all(isinstance(n, str) for n in reparam)):
        raise CheckpointError(
            path,
            f"config['reparam_sites'] = {reparam!r} is not a list of site names: the file is corrupt or was altered",
        )
    sites = cfg.get("sites")
    ok = (
        isinstance(sites, list)
        and sites
        and all(
            isinstance(x, list)
            and len(x) == 3
            and isinstance(x[0], str)
            and all(
                isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape)
                for shape in x[1:]
            )
            for x in sites
        )
    )
    if not ok:
        raise CheckpointError(
            path,
            f"config['sites'] = {sites!r} is not a list of [name, shape, unconstrained "
            "shape]: the file is corrupt or was altered",
        )
    latent_dim = sum(math.prod(x[2]) for x in sites)
    if latent_dim > _MAX_DIM:
        raise CheckpointError(path, f"its sites pack into {latent_dim} dims, more than {_MAX_DIM}: the file is corrupt")
    kinds = cfg.get("site_kinds")
    if version >= 2 and not (
        isinstance(kinds, list)
        and [k[0] for k in kinds if isinstance(k, list)] == [x[0] for x in sites]
        and all(len(k) == 3 and all(isinstance(v, str) for v in k) for k in kinds)
    ):
        raise CheckpointError(path, "config['site_kinds'] does not list the sites' supports: the file is corrupt")
    state = payload.get("state_dict")
    # a custom network's buffers may be integers (it is also registered as _user_sampler / _user_encoder)
    custom = tuple(
        f"{prefix}{part}." for part in ("sampler", "encoder") if cfg.get(part) is None for prefix in ("", "_user_")
    )
    dtype = check_tensor_dict(path, state, "state_dict", integer_ok=lambda key: key.startswith(custom))
    if version >= 2:
        saved = cfg.get("dtype")
        if dtype is not None and saved != str(dtype).replace("torch.", ""):
            raise CheckpointError(
                path, f"its tensors have dtype {dtype}, but its config says {saved!r}: the file was altered"
            )
        for key in ("init_values", "site_probes"):
            check_tensor_dict(path, payload.get(key), key)
        probes = payload["site_probes"]
        for name, shape, _ in sites:
            if name not in probes or probes[name].dim() != 1 or probes[name].numel() != math.prod(shape):
                raise CheckpointError(path, f"site_probes lacks a proper entry for site {name!r}: the file is corrupt")
    for part, net_cls, keys in (
        (
            "sampler",
            GaussianResidualSampler,
            (
                ("latent_dim", 1),
                ("noise_dim", 1),
                ("context_dim", 0),
                ("hidden_dim", 1),
                ("num_layers", 1),
                ("max_amortized_tril", 0),
            ),
        ),
        ("encoder", DeepSetEncoder, (("feature_dim", 1), ("output_dim", 1), ("hidden_dim", 1), ("num_layers", 1))),
    ):
        net = cfg.get(part)
        if net is None:  # a custom network (passed to load again), or an encoder-less guide
            if part == "sampler" and not isinstance(cfg.get("sampler_class"), str):
                raise CheckpointError(path, "config lacks both the sampler's configuration and its class name")
            continue
        if not isinstance(net, dict):
            raise CheckpointError(path, f"config[{part!r}] is a {type(net).__name__}, not a dict")
        for key, lo in keys:
            config_int(path, net, key, lo, _MAX_DIM, optional=key == "noise_dim")
        if part == "sampler":
            config_float(path, net, "init_scale", 0.0, 1e6)
            config_choice(path, net, "affine", ("auto", "full", "diag"))
            if net["latent_dim"] != latent_dim:
                raise CheckpointError(
                    path,
                    f"config['sampler']['latent_dim'] = {net['latent_dim']} but the sites pack "
                    f"into {latent_dim} dims: the file is corrupt or was altered",
                )
        else:
            config_choice(path, net, "mean_features", (True, False), False)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = {f"{part}.{k}": tuple(v.shape) for k, v in net_cls(**net).state_dict().items()}
        except (TypeError, ValueError) as e:
            raise CheckpointError(path, f"config[{part!r}] does not describe a {net_cls.__name__} ({e})") from None
        got = {k: tuple(v.shape) for k, v in state.items() if k.startswith(f"{part}.")}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
            raise CheckpointError(
                path,
                f"its weights do not match the {part} its config describes ({net}); e.g. {diff} differ: the "
                "file is corrupt or was altered",
            )
    return cfg


class _IntOption(_CheckedOption):
    """A guide option held as an ``int`` >= ``lo``, checked (and converted, e.g. from ``numpy.int64``) whenever it is
    set, in the constructor or later as ``guide.<name> = value``, with an error naming the option."""

    def __init__(self, lo: int, expected: str | None = None, owner: str = "guide"):
        self.lo, self.expected, self.owner = lo, expected, owner

    def check(self, value) -> int:
        return _int_at_least(value, f"{self.owner}.{self.name}", self.lo, self.expected)


class _Reparametrise(Exception):
    """Raised inside set-up when ``whiten="auto"`` finds no proper mode and the model has a funnel to non-centre."""

    def __init__(self, sites: list[str], reason: str):
        super().__init__(sites, reason)
        self.sites, self.reason = sites, reason


class ModelParameterWarning(UserWarning):
    """The model has ``pyro.param`` sites, which :class:`AmortizedSVGD` does not fit: they keep their values."""


class init_to_mean_or_feasible:
    """Initialise a site at its prior mean where that is finite and in the support, else at the
    image of zero under ``support_bijection(support)``. Never calls ``.sample()``, so sites with an
    :class:`~pyro.distributions.ImproperUniform` prior initialise.

    The feasible point takes its dtype and device from the distribution's parameters, or else
    from :attr:`like` (the guide sets it to a tensor from the model's arguments).
    """

    def __init__(self, like: Tensor | None = None):
        self.like = like

    def __call__(self, site: dict) -> Tensor:
        fn = site["fn"]
        if fn.support.is_discrete:
            raise _discrete_site_error(site["name"], fn)
        try:
            value = fn.mean.detach()
            if value.shape == fn.shape() and torch.isfinite(value).all() and fn.support.check(value).all():
                return value
        except (NotImplementedError, AttributeError, RuntimeError, ValueError):
            pass
        like = _first_tensor([getattr(fn, k, None) for k in getattr(fn, "arg_constraints", {})])
        like = self.like if like is None else like
        kw = {"dtype": torch.get_default_dtype()} if like is None else {"dtype": like.dtype, "device": like.device}
        try:
            transform = support_bijection(fn.support)
        except NotImplementedError as e:
            raise ValueError(
                f"latent site {site['name']!r} has support {fn.support}, which has no bijection to real space ({e}); "
                "reparametrise it (e.g. sample unconstrained values and map them onto the support in the model)"
            ) from None
        return transform(torch.zeros(transform.inverse_shape(fn.shape()), **kw)).detach()


class _init_to_saved(init_to_mean_or_feasible):
    """Initialise each site at a value saved in a checkpoint, in the dtype and device the model's own feasible
    point has (a site not saved, or saved with another shape, gets that feasible point)."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def __call__(self, site: dict) -> Tensor:
        ref = super().__call__(site)
        saved = self.values.get(site["name"])
        if isinstance(saved, Tensor) and saved.shape == ref.shape:
            return saved.to(dtype=ref.dtype, device=ref.device)
        return ref


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


class AmortizedSteinGuide(AutoContinuous):
    """A Pyro guide whose posterior draws come from a neural sampler ``z = f(noise [, dataset encoding])``.

    All continuous latent sites are packed into one unconstrained vector per draw (one row per
    particle); each site is mapped to its support with ``support_bijection(support)``. The guide is
    trained with :class:`~pyro_stein.AmortizedSVGD` (amortized Stein variational gradient
    descent, Wang & Liu 2016), which needs only the model's unnormalized log joint, so the
    posterior need not be Gaussian. It can replace :class:`~pyro.infer.autoguide.AutoNormal`
    in existing code: it works with :class:`~pyro.infer.Predictive` (``parallel`` or not),
    ``poutine.trace`` and ``poutine.replay``.

    **Amortized mode** (``amortized=True``): the sampler is conditioned on a permutation-invariant
    encoding of the dataset in the model's arguments, so one trained guide gives a posterior for
    a new dataset in one forward pass. What "the dataset" is comes from ``dataset_fn(*args,
    **kwargs) -> Tensor[num_observations, num_features]``; the default reads the model's observed
    sites and any tensor argument with one row per observation (see
    :func:`pyro_stein.data.default_dataset_fn`).

    Example::

        guide = AmortizedSteinGuide(model)
        svgd = AmortizedSVGD(model, guide, pyro.optim.Adam({"lr": 3e-3}), num_particles=64)
        svgd.run(X, y)
        samples = guide.sample_posterior(1000, X, y)

    **Precision**: the guide computes in the dtype of the model's values, float32 or float64
    (float64 where the posterior is concentrated). Half-precision data (``float16``,
    ``bfloat16``) is refused with a ``TypeError`` naming the argument: the score of the log
    density is too coarse in it (a step gives NaN, or training settles at a wrong spread).
    Convert it first, e.g. ``y.float()``.

    :param callable model: a Pyro model with continuous latent sites.
    :param nn.Module sampler: a custom sampler mapping noise ``(..., noise_dim)`` (and a context
        ``(..., context_dim)`` in amortized mode) to ``(..., latent_dim)``; it must expose
        ``noise_dim`` and ``latent_dim``. Default: :class:`~pyro_stein.nn.GaussianResidualSampler`.
    :param callable init_loc_fn: per-site initialisation (default: prior mean if finite, else a
        feasible point; never samples).
    :param float init_scale: initial spread of the default sampler in unconstrained space.
    :param bool amortized: condition the sampler on a dataset encoding.
    :param callable dataset_fn: ``(*args, **kwargs) -> Tensor[N, F]`` per-observation features.
    :param nn.Module encoder: a custom set encoder ``(features (B, N, F), mask (B, N)) -> (B, C)``
        exposing ``output_dim``. Default: :class:`~pyro_stein.nn.DeepSetEncoder`.
    :param int context_dim: dataset encoding width for the default encoder (its learned part).
    :param bool mean_features: the default encoder also passes the ``F`` standardised feature means
        to the sampler unchanged (:class:`~pyro_stein.nn.DeepSetEncoder` with ``mean_features=True``;
        encoding width ``context_dim + F``), so that a posterior location that is linear in a
        feature mean (a Gaussian mean, a rate, a proportion) extrapolates to datasets at the edge
        of the training range. Default ``None``: on for an amortized guide with the default encoder
        and no frame (``whiten=None``), off otherwise. With ``whiten="laplace"`` each dataset's own
        frame already places the draws, and the option is the user's (pass ``True``).
    :param str vectorize: how the model's log joint is evaluated over particles, see
        :class:`~pyro_stein.logjoint.ModelLogDensity`.
    :param int num_summary_samples: draws used by :meth:`median` and :meth:`quantiles`.
    :param int moment_correction: rounds of :func:`~pyro_stein.stein.stein_moment_correction`
        applied by :meth:`sample_posterior` and :meth:`sample_posterior_batch` (default 0: off).
        Each round evaluates the model's score at the draws once and moves them, by one affine
        map per dataset, towards satisfying ``E[s] = 0`` and ``E[s (z - m)^T] = -I``: exact for
        Gaussian posteriors, the identity (up to Monte Carlo error) when the guide is already
        exact. It removes most of an amortized guide's location and scale error on a new dataset
        at the cost of one batched score evaluation per round. Draws made by :meth:`forward` (and
        so by :class:`~pyro.infer.Predictive`) are not corrected.
    :param int correction_samples: the correction is estimated, and the MCMC polish below runs
        chains preconditioned by the covariance of, at least this many draws per dataset (default
        1000; more than ``2 D`` are needed for the covariance part of the correction, otherwise only
        the location is corrected); the first ``num_samples`` are returned.
    :param int mcmc_steps: preconditioned Metropolis-adjusted Langevin steps applied to the draws of
        :meth:`sample_posterior` and :meth:`sample_posterior_batch`, after the moment correction
        (default 0: off); see :func:`~pyro_stein.mcmc.mala_polish`. Each step leaves the posterior
        invariant, so it can only bring the draws' distribution closer to it (in total variation); it
        fixes the shape (skew, curvature, tails) that the affine correction cannot. Costs one batched
        evaluation of the log density and score per step; ``forward``/``Predictive`` draws are not polished.
    :param int mcmc_leapfrog: leapfrog steps per MCMC step (default 1: the MALA steps above). With
        ``L > 1`` each of the ``mcmc_steps`` steps is a Hamiltonian Monte Carlo step of ``L`` leapfrog
        steps (:func:`~pyro_stein.mcmc.hmc_polish`), costing ``L`` evaluations. A trajectory travels
        where MALA diffuses, but with few steps HMC has less room to tune its step size, so use it
        after ``moment_correction`` has fixed the draws' spread (see the post-processing guide for a
        comparison at equal cost).
    :param str whiten: ``"laplace"``: the sampler works in the whitened frame of a Laplace
        approximation, ``z = m + L u`` with ``m`` the posterior mode (L-BFGS from the initial
        values, at setup) and ``L L^T`` the inverse Hessian of ``-log p`` there; the sampler starts
        at ``u ~ N(0, I)`` (``init_scale`` is then relative to the Laplace sds) and the Stein
        direction and kernel are computed on ``u`` (score ``L^T grad_z log p``). For ill-conditioned,
        concentrated posteriors (sds differing by orders of magnitude), where a sampler in the raw
        unconstrained space can settle in a wrong self-consistent state. No subsampled plates; a
        non-amortized guide costs one mode search and ``D`` Hessian-vector products at setup. The
        KSD that :meth:`AmortizedSVGD.step` returns is then measured on ``u``.
        With ``amortized=True`` every dataset gets its own frame ``z = m_d + L_d u``, found when the
        dataset is first used (training step, :meth:`sample_posterior`, ``forward``) by a batched
        Newton search that needs only the log density and score (see
        :func:`~pyro_stein.laplace.laplace_frames`; typically 3-11 batched model evaluations, each of
        one to three stencils of ``2 D + 1`` points, per dataset) and cached on
        :class:`~pyro_stein.data.Dataset` objects. The sampler then only learns each posterior's
        departure from its Laplace approximation, in coordinates that mean the same for every
        dataset, instead of the whole data-to-posterior map; models whose posterior location swings
        with the data (regressions) need this (see the frames guide). The sampler's context is then the
        dataset encoding followed by a summary of the frame, the mode ``m_d`` and the log sds
        ``log sqrt(diag(L_d L_d^T))`` (``2 D`` numbers, standardised with fixed statistics of the
        first training batch, then passed through ``asinh``, so that a frame far outside that
        batch's range gives a large but not an extreme input): the posterior's departure from its
        Laplace approximation depends on where the mode lies (e.g. on a hierarchical scale), and
        the frame states that directly. A custom ``sampler`` must accept that wider context.
        ``None`` (default): no frame.
    :param int laplace_evaluations: cap on the model evaluations of the per-dataset Newton search
        (amortized ``whiten="laplace"``; default 50). A dataset whose search reaches the cap (or stalls)
        keeps the best point found as its frame's centre; the first such dataset raises a
        :class:`~pyro_stein.laplace.LaplaceFrameWarning`, and all are counted in
        ``guide.num_unconverged_frames``.
    :param bool record_graph: when the guide evaluates the model itself (the frame search, the
        moment correction and the MCMC polish of :meth:`sample_posterior`), replay a graph recorded
        once per shape of the arguments instead of running the model under vmap, once the same
        shapes have come back 20 times: for an amortized guide, every new dataset with the same
        number of observations (or groups) shares the recording, which costs 0.1-0.5 s once and
        makes each evaluation cheaper (on family (b) of the amortization benchmark, 1.6 ms instead
        of 4.3 ms at 1,000 draws on a CPU). Models whose Python reads the data's values are not
        recorded. Up to 64 shapes are kept; when datasets rarely share a shape (a new number of rows
        almost every time), recordings are dropped before they are reused, and after 64 such drops
        recording switches itself off: pass ``False`` to skip even those. Default ``True``; see
        :mod:`pyro_stein.graphs` (``guide.log_density.graphs.status`` says what happened). The
        frame searches during training go through these recordings too; the training step's own
        evaluations record separately (``record_graph`` of :class:`~pyro_stein.AmortizedSVGD`).

    References:

    [1] D. Wang, Q. Liu, "Learning to Draw Samples: With Application to Amortized MLE for
        Generative Adversarial Learning", arXiv:1611.01722, 2016.
    [2] Q. Liu, D. Wang, "Stein Variational Gradient Descent", NeurIPS 2016.
    """

    moment_correction = _IntOption(0)
    correction_samples = _IntOption(3)
    mcmc_steps = _IntOption(0)
    mcmc_leapfrog = _IntOption(1, "an int >= 1 (1: MALA steps)")
    laplace_evaluations = _IntOption(1)
    num_summary_samples = _IntOption(1)

    def __init__(
        self,
        model: Callable,
        *,
        sampler: nn.Module | None = None,
        init_loc_fn: Callable | None = None,
        init_scale: float = 0.1,
        amortized: bool = False,
        dataset_fn: Callable | None = None,
        encoder: nn.Module | None = None,
        context_dim: int = 32,
        mean_features: bool | None = None,
        vectorize: str = "auto",
        num_summary_samples: int = 1000,
        create_plates: Callable | None = None,
        moment_correction: int = 0,
        correction_samples: int = 1000,
        whiten: str | None = "auto",
        mcmc_steps: int = 0,
        laplace_evaluations: int = 50,
        mcmc_leapfrog: int = 1,
        record_graph: bool = True,
    ):
        if sampler is not None and not isinstance(sampler, nn.Module):
            raise TypeError(f"sampler must be a torch.nn.Module, got {type(sampler).__name__}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder must be a torch.nn.Module (e.g. pyro_stein.nn.DeepSetEncoder), got {type(encoder).__name__}"
            )
        if not isinstance(amortized, bool):
            raise TypeError(f"amortized must be True or False, got {amortized!r}")
        if create_plates is not None and not callable(create_plates):
            raise TypeError(
                f"create_plates must be a callable (*args, **kwargs) -> plates, or None, got {type(create_plates).__name__}"
            )
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real):
            raise TypeError(f"init_scale must be a positive number, got {init_scale!r}")
        if encoder is not None and not amortized:
            raise ValueError("an encoder was given but amortized=False; pass amortized=True to use it")
        if dataset_fn is not None and not callable(dataset_fn):
            raise TypeError("dataset_fn must be a callable (*args, **kwargs) -> Tensor[num_observations, num_features]")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        context_dim = _int_at_least(context_dim, "context_dim", 1)
        if whiten not in WHITEN_OPTIONS:
            raise ValueError(f"whiten must be one of {WHITEN_OPTIONS}, got {whiten!r}")
        if whiten == "adaptive" and amortized:
            raise ValueError(
                "whiten='adaptive' is for non-amortized guides; an amortized guide takes whiten='laplace' "
                "(a frame per dataset) or None"
            )
        if not isinstance(record_graph, bool):
            raise TypeError(f"record_graph must be True or False, got {record_graph!r}")
        self.record_graph = record_graph
        # checked and held as ints by their _IntOption descriptors, here and when set later; set through object's
        # __setattr__, as PyroModule's would reject a 0-d tensor value before its own __init__
        for name, value in (
            ("moment_correction", moment_correction),
            ("correction_samples", correction_samples),
            ("mcmc_steps", mcmc_steps),
            ("mcmc_leapfrog", mcmc_leapfrog),
            ("laplace_evaluations", laplace_evaluations),
            ("num_summary_samples", num_summary_samples),
        ):
            object.__setattr__(self, name, value)
        # what was asked for; `whiten` below is the frame in use ("laplace" or None), resolved at setup for "auto"
        self.frame_request = whiten
        self.whiten = "laplace" if whiten == "laplace" else None
        self.adaptive_frame = whiten == "adaptive"  # the driver's affine-invariant direction (see AmortizedSVGD)
        self.frame_fallback_reason: str | None = None  # why whiten="auto" did not use a Laplace frame
        self.num_calibrations = 0  # moment corrections folded into the frame (see calibrate)
        self.num_unconverged_frames = 0  # datasets whose frame search did not converge (see frames)
        self._init_fn = init_to_mean_or_feasible() if init_loc_fn is None else init_loc_fn
        super().__init__(model, init_loc_fn=self._init_fn)
        self._raw_model = (model,)
        self._user_model = model
        # whiten="auto" on a posterior with no proper mode: the latent Normal sites whose loc or scale depend on other
        # latents, non-centred with pyro.infer.reparam.LocScaleReparam (their draws are still returned, computed)
        self.reparam_sites: list[str] = []
        self._reparam_frames: dict = {}
        if create_plates is not None:
            self.create_plates = create_plates
        self.init_scale = float(init_scale)
        self.amortized = bool(amortized)
        self.dataset_fn = dataset_fn
        self.context_dim = int(context_dim)
        if mean_features is not None and not isinstance(mean_features, bool):
            raise TypeError(f"mean_features must be a bool or None (the default), got {mean_features!r}")
        if mean_features and not amortized:
            raise ValueError("mean_features=True is for the dataset encoder of an amortized guide; pass amortized=True")
        if mean_features and encoder is not None:
            raise ValueError(
                "mean_features=True configures the default encoder; build your encoder with "
                "DeepSetEncoder(..., mean_features=True) instead"
            )
        if mean_features is None:  # on where it was measured to help: the default encoder without a frame
            mean_features = bool(amortized) and encoder is None and self.whiten is None
        self.mean_features = mean_features
        self.vectorize = vectorize
        self._user_sampler = sampler
        self._user_encoder = encoder
        self.sampler: nn.Module | None = None
        self.encoder: nn.Module | None = None
        self.sites: list[LatentSite] = []
        self.subsample_plates: dict[str, tuple[int, int]] = {}
        self.deterministic_names: list[str] = []
        self._network_configs: dict = {}
        # what this guide caches on Dataset objects (features, Laplace frames) is keyed by this token: unique per
        # guide for the process (an id() could be reused after the guide is freed); copies (refine) share it
        self._cache_token = next(_CACHE_TOKENS)
        # calls with the same argument objects (Predictive's draws, repeated sample_posterior) share one Dataset, so
        # its features and Laplace frame are computed once
        self._dataset_of = LastDataset()
        # the standardised frame summary goes through asinh (see encode); guides saved before that keep it linear
        self._squash_frame_summary = True

    # ------------------------------------------------------------------ setup
    def setup(self, *args, **kwargs) -> AmortizedSteinGuide:
        """Trace the model once with example arguments and build the networks.

        Calling the guide, :meth:`sample_posterior` or a training step does this automatically;
        call it yourself to create the parameters eagerly, e.g. before :meth:`load_state_dict`::

            guide = AmortizedSteinGuide(model).setup(*example_args)
            guide.load_state_dict(state)
        """
        if self.prototype_trace is None:
            _refuse_half_precision(args, kwargs)  # later datasets are checked once each (see _check_dataset)
            self._setup_prototype(*args, **kwargs)
        return self

    def _setup_prototype(self, *args, **kwargs):
        """Trace the model and build the networks, all or nothing: when it fails (e.g. on a malformed first
        dataset), the guide is left unset-up, so a later call with good arguments sets it up afresh."""
        registered = {name: set(getattr(self, name)) for name in ("_modules", "_buffers", "_parameters")}

        def undo():
            for name, keys in registered.items():
                table = getattr(self, name)
                for key in set(table) - keys:
                    del table[key]
            self.prototype_trace = None
            self.sampler = self.encoder = None
            self.sites, self.subsample_plates, self.deterministic_names = [], {}, []

        try:
            try:
                self._build_prototype(*args, **kwargs)
            except _Reparametrise as r:  # whiten="auto" found no mode: set up again with the funnel's sites non-centred
                undo()
                self._use_reparam(r.sites, r.reason)
                self._build_prototype(*args, **kwargs)
        except BaseException:
            undo()
            self._use_reparam([], None)
            raise

    def _build_prototype(self, *args, **kwargs):
        if isinstance(self._init_fn, init_to_mean_or_feasible):
            self._init_fn.like = _first_tensor([args, kwargs])
        # AutoGuide: trace the model (with init values) and collect plate frames.
        super(AutoContinuous, self)._setup_prototype(*args, **kwargs)
        trace = self.prototype_trace
        self._check_sites(trace)
        self.sites = latent_sites_from_trace(trace)
        self._unconstrained_shapes = {s.name: s.unconstrained_shape for s in self.sites}
        self._cond_indep_stacks = {s.name: s.cond_indep_stack for s in self.sites}
        self._transforms = {s.name: s.transform for s in self.sites}
        offset = sum(s.size for s in self.sites)
        expected = self._network_configs.get("sites")
        layout = [[s.name, list(s.shape), list(s.unconstrained_shape)] for s in self.sites]
        if expected is not None and layout != expected:
            self.prototype_trace = None
            raise ValueError(
                f"the model's latent sites {layout} do not match the saved guide's {expected}: load it with the same "
                "model and example arguments of the same shapes"
            )
        self._check_saved_supports()
        self.latent_dim = offset
        if self.latent_dim == 0:
            raise ValueError("the model has no latent sample sites; there is nothing to infer")
        # the prototype trace hides observed and subsample sites (pyro.deterministic sites are observed): trace again
        full = poutine.block(poutine.trace(poutine.condition(self._raw_model[0], self._init_values())).get_trace)(
            *args, **kwargs
        )
        self.subsample_plates = {
            name: (site["fn"].size, site["fn"].subsample_size)
            for name, site in full.nodes.items()
            if site_is_subsample(site)
            and site["fn"].subsample_size is not None
            and site["fn"].subsample_size < site["fn"].size
        }
        self.deterministic_names = [
            n
            for n, s in full.nodes.items()
            if s["type"] == "sample" and (s["infer"].get("_deterministic") or n in self.reparam_sites)
        ]
        self._reparam_frames = {
            n: (full.nodes[n]["cond_indep_stack"], full.nodes[n]["fn"].event_dim)
            for n in self.reparam_sites
            if n in full.nodes
        }
        params = [n for n, site in full.nodes.items() if site["type"] == "param"]
        if params:
            warnings.warn(
                f"the model has pyro.param site(s) {params}: AmortizedSVGD fits the guide only, so they keep their "
                "current values (inference is conditional on them). Fit them first (e.g. SVI with AutoNormal), "
                "or make them latent sample sites with a prior.",
                ModelParameterWarning,
                stacklevel=3,
            )
        self.log_density = ModelLogDensity(
            self._raw_model[0], self.sites, self.vectorize, record_graph=self.record_graph, share_across_data=True
        )
        init_loc = pack(self._init_values(), self.sites, batch_dims=0)
        if not torch.isfinite(init_loc).all():
            bad = [s.name for s in self.sites if not torch.isfinite(init_loc[s.offset : s.offset + s.size]).all()]
            raise ValueError(
                f"the initial value of site(s) {bad} is not finite in unconstrained space; pass a different init_loc_fn"
            )
        with warnings.catch_warnings():  # the driver reports a model that does not vectorise, at its first step
            warnings.simplefilter("ignore", VectorizationWarning)
            self._build_networks(self._checked_init(init_loc, args, kwargs), args, kwargs)

    def _checked_init(self, init_loc: Tensor, args, kwargs) -> Tensor:
        """``init_loc``, or a point near it when the log joint or its score is not finite or extreme there.

        A prior mean can be a singular point of the likelihood (a degenerate covariance, a rate of zero), where the
        score is huge or undefined; training started there swings wildly. Candidates at growing distances (0.1 to 2
        in unconstrained space, 16 each, from a generator seeded for reproducibility) are tried and the finite,
        non-extreme one with the highest log joint is used."""

        def evaluate(x: Tensor) -> tuple[Tensor, Tensor]:
            with self._full_data(), poutine.block():
                return self.log_density.log_density_and_score(x, args, kwargs, check=False)

        def ok(lp: Tensor, score: Tensor) -> Tensor:
            return torch.isfinite(lp) & torch.isfinite(score).all(-1) & (score.abs().amax(-1) <= _EXTREME_SCORE)

        try:
            lp, score = evaluate(init_loc[None])
        except (ValueError, RuntimeError):  # the model's own error surfaces where it is clearer (training, sampling)
            return init_loc
        if bool(ok(lp, score)[0]):
            return init_loc
        gen = torch.Generator(device=init_loc.device).manual_seed(0)
        scales = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=init_loc.dtype, device=init_loc.device).repeat_interleave(16)
        noise = torch.randn(
            scales.shape[0], init_loc.shape[0], generator=gen, dtype=init_loc.dtype, device=init_loc.device
        )
        candidates = init_loc + scales[:, None] * noise
        try:
            lp, score = evaluate(candidates)
        except (ValueError, RuntimeError):
            return init_loc
        good = ok(lp, score)
        if not bool(good.any()):
            return init_loc
        return candidates[torch.where(good, lp, torch.full_like(lp, -float("inf"))).argmax()]

    @property
    def inference_model(self) -> Callable:
        """The model the guide's latent sites belong to: the user's model, or it with :attr:`reparam_sites`
        non-centred (``pyro.poutine.reparam`` with ``LocScaleReparam(centered=0)``)."""
        return self._raw_model[0]

    def _use_reparam(self, sites: Sequence[str], reason: str | None) -> None:
        from pyro.infer.reparam import LocScaleReparam

        self.reparam_sites = list(sites)
        model = self._user_model
        if self.reparam_sites:
            model = poutine.reparam(model, config={n: LocScaleReparam(centered=0.0) for n in self.reparam_sites})
        self._model = (model,)
        self._raw_model = (model,)
        self.frame_fallback_reason = (
            None
            if reason is None
            else (
                f"no proper mode in the model's own parameterisation ({reason}); its sites {self.reparam_sites} were "
                "non-centred (LocScaleReparam(centered=0.0))"
            )
        )

    def _hierarchical_normal_sites(self, args, kwargs) -> list[str]:
        """Latent Normal sites whose loc or scale depend on another latent site (the centred levels of a hierarchical
        model, whose log density has a funnel and no proper mode)."""
        values = {n: v.detach().clone().requires_grad_(v.is_floating_point()) for n, v in self._init_values().items()}
        with torch.enable_grad(), self._full_data(), pyro.validation_enabled(False):
            tr = poutine.block(poutine.trace(poutine.condition(self._raw_model[0], values)).get_trace)(*args, **kwargs)
        out = []
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or name not in values:
                continue
            fn = site["fn"]
            while isinstance(fn, torch.distributions.Independent):
                fn = fn.base_dist
            if type(fn) is dist.Normal and (fn.loc.requires_grad or fn.scale.requires_grad):
                out.append(name)
        return out

    def _check_saved_supports(self) -> None:
        """When loading a checkpoint: every latent site has the saved support and bijection (structure and values at
        fixed points), else a :class:`~pyro_stein.CheckpointError` naming the site (the same weights would mean other
        values, e.g. ``LogNormal`` replaced by ``Normal``)."""
        from ._io import CheckpointError

        kinds, probes = self._network_configs.get("site_kinds"), self._network_configs.get("site_probes")
        if kinds is None or probes is None:  # a file from before supports were saved: nothing to compare with
            return
        path = self._network_configs.get("path", "<checkpoint>")
        saved = {k[0]: tuple(k[1:]) for k in kinds}
        device = next((v.device for v in self._init_values().values()), None)  # where the bijections' tensors live
        for site in self.sites:
            now = _site_kind(site)
            probe = probes[site.name].cpu()
            try:
                got = _site_probe(site, probe.dtype, device).cpu()
                same_values = got.shape == probe.shape and bool(torch.allclose(got, probe, rtol=1e-4, atol=1e-6))
            except (RuntimeError, ValueError):
                same_values = False
            if now != saved[site.name] or not same_values:
                raise CheckpointError(
                    path,
                    f"latent site {site.name!r} has support {site.support} (bijection {now[1]}) in this model, "
                    f"but support {saved[site.name][0]} (bijection {saved[site.name][1]}) "
                    f"{'' if now != saved[site.name] else 'with other bounds '}in the saved guide: the saved weights "
                    "would give other values. Load it with the model it was trained with",
                )

    def _check_sites(self, trace) -> None:
        for name, site in trace.iter_stochastic_nodes():
            fn = site["fn"]
            if fn.support.is_discrete:
                raise _discrete_site_error(name, fn)
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.full_size is not None and frame.size < frame.full_size:
                    raise ValueError(
                        f"latent site {name!r} sits in the subsampled plate {frame.name!r} (size {frame.size} of "
                        f"{frame.full_size}); AmortizedSteinGuide supports subsampling of observations only. "
                        "Move local latents out of subsampled plates or do not subsample that plate."
                    )
            try:
                support_bijection(fn.support)
            except NotImplementedError as e:
                raise ValueError(
                    f"latent site {name!r} has support {fn.support} with no bijection to real space: {e}"
                ) from e

    def _laplace_frame(self, init_loc: Tensor, args, kwargs) -> tuple[Tensor, Tensor]:
        """``(m, L)``: the posterior mode in unconstrained space and ``L`` with ``L L^T = H^{-1}``.

        Raises a ``ValueError`` saying why when the posterior has no proper mode there: the search fails or runs off,
        the Hessian is not positive definite, or the Newton step from the point found is not small (an unbounded
        direction, as the scale of a centred hierarchical model running to 0)."""
        if self.frame_request == "laplace":
            self._require_full_data("whiten='laplace'", "use whiten='auto' (which evaluates the full data) or None")

        def neg_log_p(x: Tensor) -> Tensor:
            with self._full_data():
                return -self.log_density.log_density(x.unsqueeze(0), args, kwargs)[0]

        z = init_loc.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [z], max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=0.0
        )

        def closure():
            opt.zero_grad()
            loss = neg_log_p(z)
            loss.backward()
            return loss

        with torch.enable_grad():
            try:
                for _ in range(5):
                    opt.step(closure)
            except RuntimeError as e:  # e.g. an overflow inside L-BFGS when the log density grows without bound
                raise ValueError(
                    f"whiten='laplace': the mode search failed ({str(e).splitlines()[0]}); the posterior may have no "
                    "proper mode (e.g. a centred hierarchical model whose log density grows without bound as a scale "
                    "goes to 0): use a non-centred parameterisation or whiten='auto'"
                ) from e
            mode = z.detach()
            hess = torch.autograd.functional.hessian(neg_log_p, mode)
            grad = torch.autograd.functional.jacobian(neg_log_p, mode)
        if not (torch.isfinite(mode).all() and torch.isfinite(hess).all() and torch.isfinite(grad).all()):
            raise ValueError(
                "whiten='laplace': the mode search or the Hessian at the mode is not finite; use whiten='auto'"
            )
        chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T))
        if info != 0:
            raise ValueError(
                "whiten='laplace': the Hessian of -log p at the mode found is not positive definite (no proper mode, "
                "e.g. an improper or flat posterior direction); use whiten='auto'"
            )
        eye = torch.eye(mode.shape[0], dtype=mode.dtype, device=mode.device)
        scale = torch.linalg.solve_triangular(chol, eye, upper=False).T  # L = R^{-T}: L L^T = (R R^T)^{-1}
        newton = (grad @ scale).abs().max()  # the Newton step from the point found, in sds of the frame
        if not newton < _MODE_TOLERANCE:
            raise ValueError(
                f"whiten='laplace': the mode search stopped where the Newton step is still {float(newton):.3g} frame "
                "sds long, so the log density has no proper mode there (e.g. a scale running to 0 in a centred "
                "hierarchical model); use whiten='auto' or a non-centred parameterisation"
            )
        return mode, scale

    def _require_full_data(self, feature: str, fix: str, why: str = "") -> None:
        if self.subsample_plates:
            raise ValueError(
                f"{feature} needs the full-data log density{why}, but the model subsamples plates "
                f"{sorted(self.subsample_plates)}; {fix} or do not subsample"
            )

    def _full_data(self):
        """A context in which the model's subsampled plates (if any) use all of their data."""
        return full_data() if self.subsample_plates else nullcontext()

    @property
    def per_dataset_frames(self) -> bool:
        """Whether each dataset gets its own Laplace frame (``whiten="laplace"`` with ``amortized=True``)."""
        return self.whiten is not None and self.amortized

    def _frame(self, frame: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        if frame is not None:
            return frame
        if self.per_dataset_frames:
            raise ValueError(
                "an amortized guide with whiten='laplace' needs the dataset's frame: pass frame=guide.frames(datasets)"
            )
        return self.whiten_loc, self.whiten_scale

    def unwhiten(self, u: Tensor, frame: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Map the sampler's outputs to unconstrained latents: ``m + u L^T`` (identity without ``whiten``).

        :param frame: ``(m, L)`` from :meth:`frames` for an amortized guide (shapes ``(B, D)``,
            ``(B, D, D)`` for ``u`` of shape ``(B, n, D)``, or one dataset's ``(D,)``, ``(D, D)``).
        """
        if self.whiten is None:
            return u
        loc, scale = self._frame(frame)
        if loc.dim() == 1:  # one frame, any leading shape of u
            return loc + u @ scale.T
        return loc.unsqueeze(-2) + u @ scale.transpose(-1, -2)  # one frame per dataset, u (B, n, D)

    def whiten_score(self, score: Tensor, frame: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The score with respect to the sampler's outputs ``u``: ``L^T grad_z log p`` (rows)."""
        if self.whiten is None:
            return score
        return score @ self._frame(frame)[1]

    def frame_of(self, *args, **kwargs) -> tuple[Tensor, Tensor] | None:
        """The frame ``(m (D,), L (D, D))`` of the dataset ``(*args, **kwargs)`` for :meth:`draw` (amortized guides with
        ``whiten="laplace"``); ``None`` for other guides (their frame, if any, is part of the guide)."""
        return self._frame_of_dataset(self._dataset_of(args, kwargs))

    def _frame_of_dataset(self, dataset: Dataset) -> tuple[Tensor, Tensor] | None:
        if not self.per_dataset_frames:
            return None
        loc, scale = self.frames([dataset])  # cached on `dataset`
        return loc[0], scale[0]

    def frames(self, datasets: Sequence) -> tuple[Tensor, Tensor]:
        """Per-dataset Laplace frames ``(m (B, D), L (B, D, D))`` of an amortized guide with ``whiten="laplace"``.

        Found by :func:`~pyro_stein.laplace.laplace_frames` from the initial values, for the datasets
        not seen before (the result is cached on each :class:`~pyro_stein.data.Dataset`).
        """
        from .data import as_dataset

        if not self.per_dataset_frames:
            raise ValueError("frames() is for amortized guides with whiten='laplace'")
        self._require_full_data("whiten='laplace'", "use whiten=None")
        datasets = [as_dataset(d) for d in datasets]
        key = ("laplace", self._cache_token)
        todo = [i for i, d in enumerate(datasets) if key not in d.cache]
        if todo:
            init = pack(self._init_values(), self.sites, batch_dims=0).detach()
            pending = [datasets[i] for i in todo]

            def fn(idx: Tensor, points: Tensor):
                return self.log_density.log_density_and_score_batch(
                    points, [pending[i] for i in idx.tolist()], check=False
                )

            with poutine.block():  # called inside the guide (e.g. under Predictive): keep the model's sites private
                found = laplace_frames(fn, init.expand(len(todo), -1).clone(), max_evaluations=self.laplace_evaluations)
            for j, i in enumerate(todo):
                datasets[i].cache[key] = (found.loc[j], found.scale[j])
            self._note_unconverged(found.converged, todo)
        got = [d.cache[key] for d in datasets]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def _note_unconverged(self, converged: Tensor, positions: list[int]) -> None:
        """Count datasets whose mode search did not converge (cap reached or stalled); warn the first time (per guide)."""
        missed = (~converged).nonzero().flatten().tolist()
        if not missed:
            return
        first_time = self.num_unconverged_frames == 0
        self.num_unconverged_frames += len(missed)
        if first_time:
            warnings.warn(
                f"whiten='laplace': the mode search of {len(missed)} of {len(positions)} dataset(s) in this call (the "
                f"first at position {positions[missed[0]]}) did not converge (it reached laplace_evaluations="
                f"{self.laplace_evaluations} batched model evaluations, or stalled), so their frames are centred at "
                "the best point found, which may be far from the posterior (e.g. a hierarchical scale running to 0 in "
                "a centred parameterisation, whose log density has no proper mode). Raise laplace_evaluations, use a "
                "non-centred parameterisation, or use whiten=None. Further ones are counted in "
                "guide.num_unconverged_frames without a warning.",
                LaplaceFrameWarning,
                stacklevel=3,
            )

    def _build_networks(self, init_loc: Tensor, args, kwargs) -> None:
        context_dim = encoding_dim = summary_dim = 0
        if self.per_dataset_frames:
            init_loc = torch.zeros_like(init_loc)  # the sampler starts at each dataset's Laplace approximation
        elif not self.amortized and (self.whiten is not None or self.frame_request == "auto"):
            fresh = self._network_configs.get("sites") is None  # a fresh guide: fit the frame (load() restores it)
            if fresh and self.frame_request == "auto":
                try:
                    loc, scale = self._laplace_frame(init_loc, args, kwargs)
                    self.whiten, self.adaptive_frame = "laplace", False
                except ValueError as e:  # no proper mode: non-centre a funnel's sites, else an adaptive frame
                    funnel = [] if self.reparam_sites else self._hierarchical_normal_sites(args, kwargs)
                    if funnel:
                        raise _Reparametrise(funnel, str(e)) from None
                    self.whiten, self.adaptive_frame, self.frame_fallback_reason = None, True, str(e)
            elif fresh:
                loc, scale = self._laplace_frame(init_loc, args, kwargs)
            else:
                loc, scale = (
                    torch.zeros_like(init_loc),
                    torch.eye(init_loc.shape[0], dtype=init_loc.dtype, device=init_loc.device),
                )
            if self.whiten is not None:
                self.register_buffer("whiten_loc", loc)
                self.register_buffer("whiten_scale", scale)
                init_loc = torch.zeros_like(init_loc)
        if self.amortized:
            feats = self.dataset_features(*args, **kwargs)
            encoder = self._user_encoder
            if encoder is None:
                F = feats.features.shape[-1]
                cfg = self._network_configs.get("encoder") or {  # the passed-through feature means widen it by F
                    "feature_dim": F,
                    "output_dim": self.context_dim + (F if self.mean_features else 0),
                    "mean_features": self.mean_features,
                }
                encoder = DeepSetEncoder(**cfg)
                encoder.to(dtype=init_loc.dtype, device=init_loc.device)
                encoder.set_standardization(feats.features, feats.mask)
                self._standardization_pending = True  # refitted on the first training batch (AmortizedSVGD)
            else:
                _check_module_placement("encoder", encoder, init_loc)
            self.encoder = encoder
            self.feature_dim = feats.features.shape[-1]
            encoding_dim = int(getattr(encoder, "output_dim", self.context_dim))
            if self.per_dataset_frames:
                summary_dim = 2 * self.latent_dim  # the frame summary (see encode)
                kw = {"dtype": init_loc.dtype, "device": init_loc.device}
                self.register_buffer("frame_summary_loc", torch.zeros(summary_dim, **kw))
                self.register_buffer("frame_summary_scale", torch.ones(summary_dim, **kw))
                self._standardization_pending = True  # fitted on the first training batch (AmortizedSVGD)
            context_dim = encoding_dim + summary_dim
        sampler = self._user_sampler
        if sampler is None:
            cfg = self._network_configs.get("sampler") or {
                "latent_dim": self.latent_dim,
                "context_dim": context_dim,
                "init_scale": self.init_scale if self.whiten is None else 1.0,
            }
            sampler = GaussianResidualSampler(**cfg, init_loc=init_loc)
        else:
            for attr in ("noise_dim", "latent_dim"):
                if not isinstance(getattr(sampler, attr, None), int):
                    raise TypeError(f"a custom sampler must expose an int attribute {attr!r}")
            if sampler.latent_dim != self.latent_dim:
                raise ValueError(
                    f"the sampler outputs {sampler.latent_dim} dims but the model's latent sites pack into "
                    f"{self.latent_dim} unconstrained dims ({[(s.name, tuple(s.unconstrained_shape)) for s in self.sites]})"
                )
            expected = getattr(sampler, "context_dim", None)
            if isinstance(expected, int) and self.amortized and expected != context_dim:
                frame_note = f" + {summary_dim} (the frame summary of whiten='laplace')" if summary_dim else ""
                raise ValueError(
                    f"the sampler takes a context of width {expected}, but this guide passes the dataset encoding "
                    f"({encoding_dim}){frame_note} = {context_dim}; build the sampler with context_dim={context_dim}"
                )
            _check_module_placement("sampler", sampler, init_loc)
        self.sampler = sampler

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save weights, configuration and library version (no pickled code) to ``path``.

        The file holds tensors and plain values only (it is read back with ``weights_only=True``):
        the networks' weights and buffers, every constructor option that is a value (``init_scale``,
        ``amortized``, ``whiten``, ...), the initial values of the latent sites (what ``init_loc_fn``
        gave, so the restored guide starts its frame searches from the same point), and each latent
        site's shape, support and bijection, checked against the model on :meth:`load`.

        Options that are code are not saved: a custom ``sampler`` or ``encoder`` (saved by weights
        only), ``dataset_fn`` and ``create_plates``; the file records that they were given, and
        :meth:`load` asks for them again. The write is atomic: an interrupted save leaves the previous
        file at ``path``, if any, intact.
        """
        from . import __version__
        from ._io import atomic_torch_save

        if self.prototype_trace is None:
            raise ValueError(
                "the guide has no parameters yet: call guide.setup(*example_args) or train it before save()"
            )
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        dtype = self._like().dtype
        payload = {
            "format": "pyro_stein.AmortizedSteinGuide",
            "format_version": _FORMAT_VERSION,
            "pyro_stein_version": __version__,
            "config": {
                "init_scale": self.init_scale,
                "amortized": self.amortized,
                "context_dim": self.context_dim,
                "mean_features": self.mean_features,
                "vectorize": self.vectorize,
                "num_summary_samples": self.num_summary_samples,
                "moment_correction": self.moment_correction,
                "correction_samples": self.correction_samples,
                "mcmc_steps": self.mcmc_steps,
                "mcmc_leapfrog": self.mcmc_leapfrog,
                "whiten": self.whiten if self.whiten is not None or not self.adaptive_frame else "adaptive",
                "adaptive_frame": self.adaptive_frame,
                "reparam_sites": list(self.reparam_sites),
                "laplace_evaluations": self.laplace_evaluations,
                "record_graph": self.record_graph,
                "frame_context": self.per_dataset_frames,
                "frame_summary_squash": self._squash_frame_summary,
                "sites": [[s.name, list(s.shape), list(s.unconstrained_shape)] for s in self.sites],
                "site_kinds": [[s.name, *_site_kind(s)] for s in self.sites],
                "sampler": getattr(self.sampler, "config", None) if self._user_sampler is None else None,
                "encoder": getattr(self.encoder, "config", None)
                if self.amortized and self._user_encoder is None
                else None,
                "sampler_class": type(self.sampler).__name__,
                "custom_dataset_fn": self.dataset_fn is not None,
                "custom_create_plates": getattr(self, "create_plates", None) is not None,
                "dtype": str(dtype).replace("torch.", ""),
            },
            "init_values": {n: v.detach().clone() for n, v in self._init_values().items()},
            "site_probes": {s.name: _site_probe(s, dtype, self._like().device).cpu() for s in self.sites},
            "state_dict": state,
        }
        atomic_torch_save(payload, path)

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
        """Rebuild a guide saved with :meth:`save` for ``model``, set up with example ``*args, **kwargs``
        (the model's arguments only: the guide's options come from the file).

        The file is read with ``weights_only=True`` (no code runs) and checked before any network
        is built: a file that is truncated or corrupt, holds non-finite values or tensors of another
        dtype, has a configuration out of range or inconsistent with its weights, or was written
        by a newer version of pyro_stein raises :class:`~pyro_stein.CheckpointError` (a
        ``ValueError``) naming the file; so does a model whose latent sites differ from the saved
        ones in name, shape, support or bijection (e.g. ``LogNormal`` replaced by ``Normal``).

        The restored guide draws what the saved one drew at the same seed: it has the saved
        weights, options and initial values. Options that are code are passed again:
        ``sampler``/``encoder`` (an instance of the saved class, when the guide had a custom one),
        ``dataset_fn`` and ``create_plates`` (the same functions, when the guide had them).

        ``map_location`` is passed to :func:`torch.load` (e.g. ``"cpu"`` to load a GPU-trained guide
        on a CPU-only machine); the rebuilt guide lives on the device of the example arguments.
        """
        from ._io import CheckpointError, load_weights_only

        _refuse_guide_options(model, kwargs)
        payload = load_weights_only(path, map_location)
        cfg = _checked_payload(path, payload)
        if cfg["amortized"] and cfg.get("whiten") == "laplace" and not cfg.get("frame_context"):
            raise CheckpointError(
                path,
                f"holds an amortized whiten='laplace' guide saved by pyro_stein "
                f"{payload.get('pyro_stein_version')}, whose sampler did not see the frame summary that this version "
                "passes it; retrain the guide with this version",
            )
        if cfg["sampler"] is None and sampler is None:
            raise ValueError(
                f"the guide in {str(path)!r} was saved with a custom sampler ({cfg['sampler_class']}); "
                "pass sampler=<an instance of it> to load"
            )
        if cfg["amortized"] and cfg["encoder"] is None and encoder is None:
            raise ValueError(
                f"the guide in {str(path)!r} was saved with a custom encoder; pass encoder=<an instance of it> to load"
            )
        if cfg.get("custom_dataset_fn") and dataset_fn is None:
            raise ValueError(
                f"the guide in {str(path)!r} was saved with a custom dataset_fn; pass the same "
                "function as dataset_fn= to load"
            )
        if cfg.get("custom_create_plates") and create_plates is None:
            raise ValueError(
                f"the guide in {str(path)!r} was saved with a custom create_plates; pass the same "
                "function as create_plates= to load"
            )
        init_values = payload.get("init_values")
        guide = cls(
            model,
            sampler=sampler,
            encoder=encoder,
            dataset_fn=dataset_fn,
            create_plates=create_plates,
            init_loc_fn=None if init_values is None else _init_to_saved(init_values),
            init_scale=cfg["init_scale"],
            amortized=cfg["amortized"],
            context_dim=cfg["context_dim"],
            vectorize=cfg["vectorize"],
            mean_features=bool(cfg.get("mean_features", False)) and encoder is None,
            num_summary_samples=cfg["num_summary_samples"],
            moment_correction=cfg.get("moment_correction", 0),
            correction_samples=cfg.get("correction_samples", 1000),
            whiten="laplace" if cfg.get("whiten") == "affine" else cfg.get("whiten"),
            mcmc_steps=cfg.get("mcmc_steps", 0),
            mcmc_leapfrog=cfg.get("mcmc_leapfrog", 1),
            laplace_evaluations=cfg.get("laplace_evaluations", 50),
            record_graph=cfg.get("record_graph", True),
        )
        guide._network_configs = {
            "sampler": cfg["sampler"],
            "encoder": cfg["encoder"],
            "sites": cfg["sites"],
            "site_kinds": cfg.get("site_kinds"),
            "site_probes": payload.get("site_probes"),
            "path": path,
        }
        guide._squash_frame_summary = bool(cfg.get("frame_summary_squash", False))  # as it was trained
        if cfg.get("reparam_sites"):  # the funnel's sites were non-centred when it was set up
            guide._use_reparam(cfg["reparam_sites"], None)
        guide.setup(*args, **kwargs)
        own = guide.state_dict(keep_vars=True)
        for key, value in payload["state_dict"].items():
            if key in own and own[key].is_floating_point() != value.is_floating_point():
                raise CheckpointError(
                    path,
                    f"state_dict[{key!r}] has dtype {value.dtype}, but the guide's {key} has "
                    f"dtype {own[key].dtype}: the file is corrupt or was altered",
                )
        try:
            guide.load_state_dict(payload["state_dict"])
        except RuntimeError as e:  # a custom sampler/encoder whose weights differ from the saved ones
            raise CheckpointError(
                path,
                f"its weights do not fit the guide rebuilt for this model "
                f"({str(e).strip().splitlines()[0]}): pass the sampler/encoder it was saved "
                "with",
            ) from None
        if cfg.get("whiten") == "affine":  # a frame that calibrate() gave a guide without one
            guide.whiten = "affine"
        guide.adaptive_frame = bool(cfg.get("adaptive_frame", guide.adaptive_frame))
        return guide

    # ------------------------------------------------------------------ datasets
    def dataset_features(self, *args, **kwargs) -> DatasetFeatures:
        """Per-observation features of the dataset in ``(*args, **kwargs)``, shape ``(1, N, F)`` with a mask."""
        return self._dataset_features(self._dataset_of(args, kwargs))

    def _dataset_features(self, dataset: Dataset, position: int | None = None) -> DatasetFeatures:
        """:meth:`dataset_features`; errors call the dataset by its ``position`` in its batch when given."""
        fn = self.dataset_fn or (lambda *a, **k: default_dataset_fn(self._raw_model[0], self._init_values(), a, k))
        out = collate_features([fn(*dataset.args, **dataset.kwargs)], start=position or 0)
        width = getattr(self, "feature_dim", None)
        if (
            self.dataset_fn is None
            and width is not None
            and out.features.shape[-1] != width
            and out.features.shape[-2] == 1
        ):
            # one observation: the default reads no covariates unless asked (a length-1 argument may be a parameter);
            # ask when that gives the width the guide was set up with
            wider = collate_features(
                [
                    default_dataset_fn(
                        self._raw_model[0], self._init_values(), dataset.args, dataset.kwargs, one_row_covariates=True
                    )
                ],
                start=position or 0,
            )
            if wider.features.shape[-1] == width:
                out = wider
        if width is not None and out.features.shape[-1] != width:
            which = "the dataset's" if position is None else f"dataset {position}'s"
            raise ValueError(
                f"{which} per-observation features have width {out.features.shape[-1]}, but the guide was set up "
                f"with width {self.feature_dim}; pass a dataset of the same form as the training datasets"
            )
        return out

    def fit_standardization(self, datasets: Sequence) -> None:
        """Refit the default encoder's per-feature standardisation (and, with per-dataset frames, the frame
        summary's) on a batch of datasets.

        :class:`~pyro_stein.infer.AmortizedSVGD` calls it once, on its first batch, for a freshly
        built guide (setup fits it on a single example dataset, whose features may not vary in
        every column, e.g. padded positions); a loaded or already-trained guide keeps its own.
        A user-supplied encoder is left alone. A frame-summary coordinate that does not vary across
        the batch (e.g. a padded latent that keeps its prior) keeps scale 1.
        """
        self._standardization_pending = False
        if not self.amortized:
            return
        from .data import as_dataset

        datasets = [as_dataset(d) for d in datasets]
        if self.per_dataset_frames:
            summary = self._raw_frame_summary(self.frames(datasets))
            loc = summary.mean(0)
            sd = summary.std(0) if summary.shape[0] > 1 else torch.zeros_like(loc)
            varies = sd > 1e-6 * loc.abs().clamp_min(1.0)
            self.frame_summary_loc.copy_(loc)
            self.frame_summary_scale.copy_(torch.where(varies, sd, torch.ones_like(sd)))
        if self._user_encoder is not None:
            return
        feats = collate_features([self._features_of(d, i) for i, d in enumerate(datasets)])
        self.encoder.set_standardization(feats.features, feats.mask)

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
        self._standardization_pending = False  # the loaded buffers hold the trained standardisation
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _init_values(self) -> dict:
        """The prototype trace's latent values, in the networks' dtype and device once they exist (after ``.to()``)."""
        if self.prototype_trace is None:
            return {}
        like = self._like() if self.sampler is not None else None
        return {
            n: s["value"].detach()
            if like is None or not s["value"].is_floating_point()
            else s["value"].detach().to(dtype=like.dtype, device=like.device)
            for n, s in self.prototype_trace.iter_stochastic_nodes()
        }

    @staticmethod
    def _raw_frame_summary(frame: tuple[Tensor, Tensor]) -> Tensor:
        loc, scale = frame
        return torch.cat([loc, 0.5 * scale.pow(2).sum(-1).log()], -1)

    def encode(self, features: DatasetFeatures, frame: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The sampler's contexts ``(B, C)`` for collated datasets: their encodings, followed for an amortized
        guide with ``whiten="laplace"`` by the standardised, ``asinh``-squashed summary of their ``frame`` (from
        :meth:`frames`)."""
        enc = self.encoder(features.features, features.mask)
        if not self.per_dataset_frames:
            return enc
        if frame is None:
            raise ValueError(
                "an amortized guide with whiten='laplace' conditions on each dataset's frame: "
                "pass frame=guide.frames(datasets)"
            )
        summary = (self._raw_frame_summary(frame) - self.frame_summary_loc) / self.frame_summary_scale
        if self._squash_frame_summary:
            # asinh: ~linear within a few sds of the first training batch, logarithmic beyond, so that a frame unlike
            # that batch's (a coordinate that hardly varied in it) cannot feed the sampler an extreme context
            summary = torch.asinh(summary)
        return torch.cat([enc, summary], -1)

    def _contexts(self, datasets: Sequence[Dataset], frame: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """:meth:`encode` of :class:`~pyro_stein.data.Dataset` objects (their features cached on them).

        Datasets of very different sizes are encoded in groups of similar sizes (see :func:`_size_groups`), each
        padded only to its own largest, so one large dataset does not pad its small neighbours to its size: the
        encoder's input holds at most ``2 R + 4096`` rows per group for groups of ``R`` real rows."""
        feats = [self._features_of(d, i) for i, d in enumerate(datasets)]
        groups = _size_groups([f.shape[0] for f in feats])
        if len(groups) == 1:
            return self.encode(collate_features(feats), frame)
        parts = [
            self.encode(collate_features([feats[i] for i in g]), None if frame is None else (frame[0][g], frame[1][g]))
            for g in groups
        ]
        order = torch.tensor([i for g in groups for i in g], device=parts[0].device)
        return torch.cat(parts)[torch.argsort(order)]

    def context(self, *args, **kwargs) -> Tensor | None:
        """The sampler's context for one dataset (``None`` for a non-amortized guide)."""
        return self.context_and_frame(*args, **kwargs)[0]

    def context_and_frame(self, *args, **kwargs) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
        """:meth:`context` and :meth:`frame_of` of one dataset, its frame found once: what :meth:`draw` takes."""
        return self._context_and_frame(self._dataset_of(args, kwargs))

    def _context_and_frame(self, dataset: Dataset):
        self._check_dataset(dataset)
        frame = self._frame_of_dataset(dataset)
        if not self.amortized:
            return None, frame
        return self._contexts([dataset], None if frame is None else (frame[0][None], frame[1][None]))[0], frame

    # ------------------------------------------------------------------ sampling
    def _like(self) -> Tensor:
        return next(self.sampler.parameters())

    def draw(
        self, num_samples: int, context: Tensor | None = None, frame: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Unconstrained draws ``(num_samples, D)``, or ``(B, num_samples, D)`` for a batch of contexts ``(B, C)``.

        Differentiable with respect to the sampler's (and encoder's) parameters. ``frame``: the
        datasets' :meth:`frames` (amortized guides with ``whiten="laplace"``).
        """
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

    def _unpack_constrained(self, z: Tensor) -> dict[str, Tensor]:
        return {name: x for name, (_, x) in unpack(z, self.sites).items()}

    @torch.no_grad()
    def calibrate(self, *args, **kwargs) -> AmortizedSteinGuide:
        """Fold a Stein correction of the mean into the guide, once: every later draw (``sample_posterior``,
        ``forward`` and so :class:`~pyro.infer.Predictive`, ``median``) comes out corrected at no extra cost.

        Draws 4,000 samples for the dataset ``(*args, **kwargs)`` and applies up to 2 rounds of the location step of
        :func:`~pyro_stein.stein.stein_moment_correction` (``z + Cov_q E_q[s]``: a Newton step towards ``E[s] = 0``;
        a round is kept only if it brings the draws closer to the linear Stein identities). The shift is kept only if
        it also lowers the kernelized Stein discrepancy of 1,000 of the draws, and is then composed with the guide's
        frame (a guide without one gets it as its frame, ``whiten == "affine"``). Up to 5 batched model evaluations.
        The location step alone is used because the covariance step, exact for Gaussian posteriors, varied from one
        set of draws to the next on skewed ones. :meth:`AmortizedSVGD.run` calls it at the end of training a guide on
        one dataset; call it yourself after training with :meth:`AmortizedSVGD.step`. Not for amortized guides (use
        ``moment_correction``, which corrects each dataset's draws when they are made). A model that subsamples is
        evaluated on all of its data.
        """
        if self.amortized:
            raise ValueError(
                "calibrate() folds one dataset's correction into the guide; an amortized guide corrects "
                "each dataset's draws when they are made: set guide.moment_correction instead"
            )
        self.setup(*args, **kwargs)
        data = [self._dataset_of(args, kwargs)]
        z = self.draw(_CALIBRATION_SAMPLES).detach()
        moved, evaluated = self._correct(z.unsqueeze(0), data, z.shape[0], affine=False, rounds=_CALIBRATION_ROUNDS)
        moved = moved[0]
        if torch.equal(moved, z) or not torch.isfinite(moved).all():
            return self  # no round helped
        # kept only if it also lowers the kernelized Stein discrepancy (IMQ kernel) of 1,000 of the draws
        k = min(z.shape[0], _CALIBRATION_KSD_DRAWS)
        d = data[0]
        with self._full_data():
            _, before = self.log_density.log_density_and_score(z[:k], d.args, d.kwargs, check=False)
        after = evaluated[1][0, :k]  # the correction's own last evaluation, at the moved draws
        ksd_before = _inf_if_not_finite(ksd(z[:k], before.to(z.dtype), IMQKernel()))
        ksd_after = _inf_if_not_finite(ksd(moved[:k], after.to(z.dtype), IMQKernel()))
        if not bool(ksd_after < ksd_before):
            return self
        shift = (moved - z).mean(0)  # the location step moves every draw by the same vector
        if self.whiten is None:
            eye = torch.eye(shift.shape[0], dtype=shift.dtype, device=shift.device)
            self.register_buffer("whiten_loc", shift)
            self.register_buffer("whiten_scale", eye)
            self.whiten = "affine"
        else:
            self.whiten_loc.add_(shift)
        self.num_calibrations += 1
        return self

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, **kwargs) -> dict[str, Tensor]:
        """Draw ``num_samples`` posterior samples of every latent and ``pyro.deterministic`` site.

        :returns: ``{site: Tensor[num_samples, *site_shape]}`` in constrained space.
        """
        z = self._posterior_draws(_num_samples(num_samples), args, kwargs)
        out = self._unpack_constrained(z)
        out.update(self.log_density.deterministic(z, self.deterministic_names, args, kwargs))
        return out

    def _posterior_draws(self, num_samples: int, args: tuple, kwargs: dict) -> Tensor:
        """The unconstrained draws ``(num_samples, D)`` behind :meth:`sample_posterior`."""
        self.setup(*args, **kwargs)
        n, keep = self._population(num_samples)
        data = [self._dataset_of(args, kwargs)]
        z = self.draw(n, *self._context_and_frame(data[0]))  # one frame search, shared with _correct's dataset
        return self._polish(*self._correct(z.unsqueeze(0), data, keep), data)[0, :num_samples]

    @torch.no_grad()
    def sample_posterior_batch(self, num_samples: int, datasets: Sequence) -> dict[str, Tensor]:
        """Posterior draws for many datasets in one forward pass (amortized guides).

        :param datasets: a sequence of :class:`~pyro_stein.data.Dataset` (or argument tuples).
        :returns: ``{site: Tensor[num_datasets, num_samples, *site_shape]}`` for latent sites.
        """
        from .data import as_dataset

        if not self.amortized:
            raise ValueError("sample_posterior_batch needs an amortized guide (amortized=True)")
        num_samples = _num_samples(num_samples)
        datasets = [as_dataset(d) for d in _dataset_sequence(datasets)]
        if not datasets:
            raise ValueError("datasets is empty")
        self.setup(*datasets[0].args, **datasets[0].kwargs)
        for i, d in enumerate(datasets):
            self._check_dataset(d, i)
        n, keep = self._population(num_samples)
        frame = self.frames(datasets) if self.per_dataset_frames else None
        z = self.draw(n, self._contexts(datasets, frame), frame)
        z = self._polish(*self._correct(z, datasets, keep), datasets)[:, :num_samples]
        return self._unpack_constrained(z)

    def _population(self, num_samples: int) -> tuple[int, int]:
        """How many draws to make per dataset and how many of them to polish: at least
        ``correction_samples`` when the draws are corrected (the moment estimates) or polished (the MCMC
        preconditioner is their covariance), the first ``num_samples`` being returned."""
        n = max(num_samples, self.correction_samples) if self.moment_correction or self.mcmc_steps else num_samples
        return n, (n if self.mcmc_steps else num_samples)

    def _correct(
        self, z: Tensor, datasets: Sequence, keep: int, affine: bool = True, rounds: int | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """``moment_correction`` rounds of the Stein moment correction on draws ``z`` ``(B, n, D)``, one set
        per dataset (see the class doc).

        Returns the first ``keep`` draws of each set and, when a round ran, the log density and score
        at them (each dataset's from its last evaluation; ``None`` otherwise), so that :meth:`_polish`
        need not evaluate them again.

        A round is kept for a dataset only if it lowers :func:`~pyro_stein.stein.stein_moment_residual`
        (the distance from the two identities it targets, measured in the draws' own frame) or the
        kernelized Stein discrepancy of 200 of the draws (IMQ kernel). Each statistic alone misjudges
        some cases (the residual's frame shrinks with too-narrow draws; the 200-draw KSD is noisy near
        the posterior); a round that raises both, e.g. a linearisation far from the posterior that
        overshoots, is dropped, so the draws never end worse than the sampler's own by both measures.
        """
        rounds = self.moment_correction if rounds is None else rounds
        if not rounds:
            return z[:, :keep], None
        affine = z.shape[-2] > 2 * z.shape[-1] and affine

        def zero_unless(ok, s):  # the values of datasets that are not ok (not finite) replaced by zeros
            return torch.where(ok[:, None, None], s, torch.zeros_like(s))

        def score_and_residual(x):
            with self._full_data():  # a model that subsamples is corrected on all of its data
                lp, s = self.log_density.log_density_and_score_batch(x, datasets, check=False)
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
        return z[:, :keep], (lp[:, :keep].to(z.dtype), score[:, :keep].to(z.dtype))

    def _polish(self, z: Tensor, start: tuple[Tensor, Tensor] | None, datasets: Sequence) -> Tensor:
        """``mcmc_steps`` MALA (``mcmc_leapfrog == 1``) or HMC steps on each dataset's draws ``z``
        ``(B, n, D)`` (see :func:`~pyro_stein.mcmc.mala_polish` and :func:`~pyro_stein.mcmc.hmc_polish`),
        starting from the log density and score ``start`` at ``z`` when :meth:`_correct` has them."""
        if not self.mcmc_steps:
            return z
        leapfrog = self.mcmc_leapfrog
        out = []
        for i, (zi, d) in enumerate(zip(z, datasets)):

            def fn(x, d=d):  # a model that subsamples is polished on all of its data (exact Metropolis tests)
                with self._full_data():
                    lp, score = self.log_density.log_density_and_score(x, d.args, d.kwargs, check=False)
                return lp.to(x.dtype), score.to(x.dtype)  # a model may compute in another precision than its draws

            initial = None if start is None else (start[0][i], start[1][i])
            if leapfrog == 1:
                out.append(mala_polish(zi, fn, self.mcmc_steps, initial=initial)[0])
            else:
                out.append(hmc_polish(zi, fn, self.mcmc_steps, leapfrog, initial=initial)[0])
        return torch.stack(out)

    def _check_dataset(self, dataset: Dataset, position: int | None = None) -> None:
        """Refuse, once per :class:`~pyro_stein.data.Dataset`, a dataset the guide's draws would not fit: one with
        half-precision tensors, or one that gives a latent site another shape than the guide was set up with
        (e.g. a regression's coefficients for data with another number of columns), whose draws would silently
        keep the old shape. One model trace per new dataset (its latents at feasible initial values)."""
        key = ("checked", self._cache_token)
        if dataset.cache.get(key):
            return
        _refuse_half_precision_once(dataset, position)
        if self.prototype_trace is not None:
            init = init_to_mean_or_feasible(like=self._like() if self.sampler is not None else None)
            try:
                with top_level(), full_data(), pyro.validation_enabled(False):
                    tr = poutine.block(poutine.trace(InitMessenger(init)(self._raw_model[0])).get_trace)(
                        *dataset.args, **dataset.kwargs
                    )
            except Exception:  # noqa: BLE001 - the model's own error comes with its own message when it is evaluated
                tr = None
            if tr is not None:
                shapes = {name: tuple(site["value"].shape) for name, site in tr.iter_stochastic_nodes()}
                for site in self.sites:
                    got = shapes.get(site.name)
                    if got is not None and got != tuple(site.shape):
                        which = "the dataset" if position is None else f"dataset {position}"
                        raise ValueError(
                            f"{which} gives latent site {site.name!r} shape {got}, but the guide was set up with shape "
                            f"{tuple(site.shape)}: its draws would keep the old shape. A guide's latent sites keep "
                            "the shapes of the data it was set up with (e.g. the number of features or groups); "
                            "build and train a new guide for data of this form"
                        )
        dataset.cache[key] = True

    def _check_supports(self, dataset, position: int) -> None:
        """Raise when a latent site's support for this dataset differs from the one the guide was set up with.

        Every dataset's draws go through the bijections of the setup trace; a support whose bounds come from the
        data (``Uniform(0, y.max())``) would put another dataset's draws outside its support, silently. Only sites
        whose support has tensor bounds are checked (one model trace per new dataset)."""
        bounded = [x for x in self.sites if _has_tensor_bounds(x.support)]
        if not bounded:
            return
        with top_level(), full_data(), pyro.validation_enabled(False):
            tr = poutine.block(poutine.trace(poutine.condition(self._raw_model[0], self._init_values())).get_trace)(
                *dataset.args, **dataset.kwargs
            )
        for site in bounded:
            node = tr.nodes.get(site.name)
            if node is None:
                continue
            new = node["fn"].support
            try:
                fresh = support_bijection(new)
                probe = torch.linspace(
                    -2.0, 2.0, site.size, dtype=self._like().dtype, device=self._like().device
                ).reshape(site.unconstrained_shape)
                same = bool(torch.allclose(fresh(probe), site.transform(probe)))
            except (NotImplementedError, RuntimeError):  # a support of another kind or shape: not the same
                same = False
            if not same:
                raise ValueError(
                    f"latent site {site.name!r} has support {new} for dataset {position} but {site.support} "
                    "for the dataset the guide was set up with: an amortized guide maps every dataset's draws with "
                    "one bijection, so a support must not depend on the data. Write the site with a fixed support "
                    "and put the data in the model (e.g. theta = hi * pyro.sample('u', Uniform(0, 1)))"
                )

    def _features_of(self, dataset, position: int = 0) -> Tensor:
        """One dataset's features ``(N, F)`` in the networks' dtype (cached on it); ``position`` (in its batch)
        is what error messages call it."""
        key = ("features", self._cache_token)
        feats = dataset.cache.get(key)
        if feats is None:
            if self.amortized:
                self._check_supports(dataset, position)
            f = self._dataset_features(dataset, position)
            feats = f.features[0, : int(f.mask[0].sum())]
            if self.sampler is not None and feats.dtype != self._like().dtype:
                feats = feats.to(self._like().dtype)  # e.g. integer features, or a dataset_fn in another precision
            dataset.cache[key] = feats
        return feats

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
        """Empirical posterior quantiles: ``{site: Tensor[len(quantiles), *site_shape]}``.

        Taken coordinate-wise in the unconstrained space and mapped to each site's support, as Pyro's
        ``AutoContinuous`` does: the same as constrained quantiles for element-wise supports (positive,
        interval), and always inside the support for the others (a simplex, a Cholesky factor)."""
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
