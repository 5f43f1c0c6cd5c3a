"""Model tracing: initial values, the checks of a model's latent sites, and of each dataset against them.

What :class:`~pyro_stein.AmortizedSteinGuide` learns from tracing the model once with example arguments (its
latent sites, subsampled plates, ``pyro.deterministic`` sites) and how it checks later datasets and saved guides
against that trace. Functions of the model, its trace and the sites only: the guide calls them at set-up and
when it first meets a dataset.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .data import Dataset
from .logjoint import LatentSite, full_data, top_level
from .transforms import support_bijection

__all__ = ["ModelParameterWarning", "ModelStructure", "init_to_mean_or_feasible"]

# a starting point whose score exceeds this (in any unconstrained coordinate) is treated as a singular point
_EXTREME_SCORE = 1e6


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


def _has_tensor_bounds(support) -> bool:
    """Whether a support has bounds held in tensors (which may come from the data), e.g. ``Uniform(0, hi)``'s."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return any(isinstance(getattr(support, k, None), Tensor) for k in ("lower_bound", "upper_bound"))


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


def conditioned_trace(model: Callable, values: dict, args: tuple, kwargs: dict):
    """The trace of ``model(*args, **kwargs)`` with its latent sites at ``values`` (hidden from outer handlers)."""
    return poutine.block(poutine.trace(poutine.condition(model, values)).get_trace)(*args, **kwargs)


def require_full_data(subsample_plates: dict, feature: str, fix: str) -> None:
    """Raise a ``ValueError`` saying that ``feature`` needs the full-data log density when the model subsamples."""
    if subsample_plates:
        raise ValueError(
            f"{feature} needs the full-data log density, but the model subsamples plates "
            f"{sorted(subsample_plates)}; {fix} or do not subsample"
        )


def check_sites(trace) -> None:
    """Refuse a model the guide cannot handle: a discrete latent site, a latent site in a subsampled plate, or a
    support with no bijection to real space (a ``ValueError`` naming the site and saying what to do)."""
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


class ModelStructure(NamedTuple):
    """What a full trace of the model (observed and subsample sites included) says about it.

    :ivar dict subsample_plates: ``{plate: (size, subsample_size)}`` of the plates that subsample.
    :ivar list deterministic_names: ``pyro.deterministic`` sites and non-centred (reparametrised) sites, whose
        values :meth:`~pyro_stein.AmortizedSteinGuide.sample_posterior` computes from the latents.
    :ivar dict reparam_frames: ``{site: (cond_indep_stack, event_dim)}`` of the non-centred sites.
    :ivar list params: names of ``pyro.param`` sites (not fitted by the guide).
    """

    subsample_plates: dict
    deterministic_names: list
    reparam_frames: dict
    params: list


def model_structure(full, reparam_sites: Sequence[str]) -> ModelStructure:
    """:class:`ModelStructure` of a full trace ``full`` of the model."""
    return ModelStructure(
        subsample_plates={
            name: (site["fn"].size, site["fn"].subsample_size)
            for name, site in full.nodes.items()
            if site_is_subsample(site)
            and site["fn"].subsample_size is not None
            and site["fn"].subsample_size < site["fn"].size
        },
        deterministic_names=[
            n
            for n, s in full.nodes.items()
            if s["type"] == "sample" and (s["infer"].get("_deterministic") or n in reparam_sites)
        ],
        reparam_frames={
            n: (full.nodes[n]["cond_indep_stack"], full.nodes[n]["fn"].event_dim)
            for n in reparam_sites
            if n in full.nodes
        },
        params=[n for n, site in full.nodes.items() if site["type"] == "param"],
    )


def warn_model_parameters(params: Sequence[str], stacklevel: int) -> None:
    """A :class:`ModelParameterWarning` naming the model's ``pyro.param`` sites, if any."""
    if params:
        warnings.warn(
            f"the model has pyro.param site(s) {list(params)}: AmortizedSVGD fits the guide only, so they keep their "
            "current values (inference is conditional on them). Fit them first (e.g. SVI with AutoNormal), "
            "or make them latent sample sites with a prior.",
            ModelParameterWarning,
            stacklevel=stacklevel + 1,
        )


def checked_init(evaluate: Callable[[Tensor], tuple[Tensor, Tensor]], init_loc: Tensor) -> Tensor:
    """``init_loc``, or a point near it when the log joint or its score is not finite or extreme there.

    A prior mean can be a singular point of the likelihood (a degenerate covariance, a rate of zero), where the
    score is huge or undefined; training started there swings wildly. Candidates at growing distances (0.1 to 2
    in unconstrained space, 16 each, from a generator seeded for reproducibility) are tried and the finite,
    non-extreme one with the highest log joint is used. ``evaluate(points (n, D))`` gives the log joint and score."""

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
    noise = torch.randn(scales.shape[0], init_loc.shape[0], generator=gen, dtype=init_loc.dtype, device=init_loc.device)
    candidates = init_loc + scales[:, None] * noise
    try:
        lp, score = evaluate(candidates)
    except (ValueError, RuntimeError):
        return init_loc
    good = ok(lp, score)
    if not bool(good.any()):
        return init_loc
    return candidates[torch.where(good, lp, torch.full_like(lp, -float("inf"))).argmax()]


def check_saved_supports(sites: Sequence[LatentSite], kinds, probes, path, device=None) -> None:
    """When loading a checkpoint: every latent site has the saved support and bijection (structure and values at
    fixed points), else a :class:`~pyro_stein.CheckpointError` naming the site (the same weights would mean other
    values, e.g. ``LogNormal`` replaced by ``Normal``). ``kinds``/``probes`` ``None``: a file from before supports
    were saved, nothing to compare with. ``device``: where the bijections' tensors live."""
    from ._io import CheckpointError

    if kinds is None or probes is None:
        return
    saved = {k[0]: tuple(k[1:]) for k in kinds}
    for site in sites:
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


def check_dataset_shapes(
    model: Callable, sites: Sequence[LatentSite], like: Tensor | None, dataset: Dataset, position: int | None
) -> None:
    """Refuse a dataset that gives a latent site another shape than ``sites`` have (e.g. a regression's
    coefficients for data with another number of columns), whose draws would silently keep the old shape. One
    model trace, its latents at feasible initial values (in ``like``'s dtype and device)."""
    init = init_to_mean_or_feasible(like=like)
    try:
        with top_level(), full_data(), pyro.validation_enabled(False):
            tr = poutine.block(poutine.trace(InitMessenger(init)(model)).get_trace)(*dataset.args, **dataset.kwargs)
    except Exception:  # noqa: BLE001 - the model's own error comes with its own message when it is evaluated
        return
    shapes = {name: tuple(site["value"].shape) for name, site in tr.iter_stochastic_nodes()}
    for site in sites:
        got = shapes.get(site.name)
        if got is not None and got != tuple(site.shape):
            which = "the dataset" if position is None else f"dataset {position}"
            raise ValueError(
                f"{which} gives latent site {site.name!r} shape {got}, but the guide was set up with shape "
                f"{tuple(site.shape)}: its draws would keep the old shape. A guide's latent sites keep "
                "the shapes of the data it was set up with (e.g. the number of features or groups); "
                "build and train a new guide for data of this form"
            )


def check_supports(model: Callable, sites: Sequence[LatentSite], values: dict, like: Tensor, dataset, position) -> None:
    """Raise when a latent site's support for this dataset differs from the one in ``sites``.

    Every dataset's draws go through the bijections of the setup trace; a support whose bounds come from the
    data (``Uniform(0, y.max())``) would put another dataset's draws outside its support, silently. Only sites
    whose support has tensor bounds are checked (one model trace, its latents at ``values``)."""
    bounded = [x for x in sites if _has_tensor_bounds(x.support)]
    if not bounded:
        return
    with top_level(), full_data(), pyro.validation_enabled(False):
        tr = conditioned_trace(model, values, dataset.args, dataset.kwargs)
    for site in bounded:
        node = tr.nodes.get(site.name)
        if node is None:
            continue
        new = node["fn"].support
        try:
            fresh = support_bijection(new)
            probe = torch.linspace(-2.0, 2.0, site.size, dtype=like.dtype, device=like.device).reshape(
                site.unconstrained_shape
            )
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
