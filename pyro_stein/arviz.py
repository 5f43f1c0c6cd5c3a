"""Export posterior draws of a Pyro guide to ArviZ.

The export works with *any* guide that works with :class:`pyro.infer.Predictive` (for example
:class:`~pyro.infer.autoguide.AutoNormal` or :class:`pyro_stein.AmortizedSteinGuide`). If the
guide has a ``sample_posterior(num_samples, *args, **kwargs)`` method returning a dict of
constrained draws with a leading sample dimension, it is used as a fast path for the latent
draws; otherwise the latents are drawn with :class:`~pyro.infer.Predictive`.

Everything else is computed from the *model* given each posterior draw:

* ``posterior``: every latent site (from the guide) and every :func:`pyro.deterministic` site
  (recomputed by the model), shaped ``(chain, draw, *site_shape)``;
* ``log_likelihood``: pointwise ``fn.log_prob(obs)`` of every observed site (without
  ``poutine.scale`` / mask factors), shaped ``(chain, draw, *batch_shape)``;
* ``posterior_predictive``: observed sites re-simulated by running the model under
  :func:`pyro.poutine.uncondition` with the latents conditioned on the draw. The model is still
  called with the real data, so code such as ``len(y)`` keeps working; if the model reuses the
  value returned by an observed ``pyro.sample`` later on (e.g. an autoregression) the simulated
  value is propagated, i.e. it is a full forward simulation;
* ``sample_stats``: ``lp``, the model's log joint density (scales and masks applied) per draw;
* ``observed_data`` and ``constant_data``.

**Subsampling.** All groups are computed on the *full* data: every subsampled
:func:`pyro.plate` (``subsample_size=...`` or ``subsample=...``) is evaluated at all of its
indices with scale 1, so ``log_likelihood``, ``posterior_predictive`` and ``observed_data`` have
the same rows, and ``lp`` is the full-data log joint (not a rescaled minibatch estimate). The
model must therefore be callable with the full data in its arguments (e.g. ``obs=y[idx]`` with
the full ``y``), which is how a plate's random ``subsample_size`` is normally used.

The model is evaluated once for all draws by wrapping it in an outermost :func:`pyro.plate`
over the draws (this needs correctly annotated batch dimensions, as ``Predictive(...,
parallel=True)`` does); with ``parallel=None`` the export falls back to a loop over draws when
vectorised evaluation fails or when its values at the first and last draws differ from the loop's
(a model written for one draw at a time can run under the plate and mix the draws).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from .data import Dataset
from .guide import _first_tensor, init_to_mean_or_feasible
from .logjoint import full_data

__all__ = ["to_inference_data", "to_inference_data_batch"]

_DRAWS_PLATE = "_pyro_stein_arviz_draws"


def _import_arviz():
    try:
        import arviz
    except ImportError as err:
        raise ImportError(
            "ArviZ export needs the optional dependency 'arviz'; install it with pip install \"pyro_stein[arviz]\""
        ) from err
    return arviz


def _pyro_stein_version() -> str:
    try:
        from pyro_stein import __version__

        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("pyro_stein")
    except Exception:
        return "unknown"


class _Site(NamedTuple):
    kind: str  # "latent", "deterministic", "observed" or "factor"
    shape: tuple  # value shape for one draw
    batch_ndim: int
    dims: list  # dimension names for one draw (plate names where known)
    value: Any  # observed value (observed sites)
    ll_shape: tuple  # shape of the pointwise log-likelihood (observed sites)


def _site_dims(name, shape, batch_ndim, frames):
    names = [f"{name}_dim_{i}" for i in range(len(shape))]
    for frame in frames:
        if frame.vectorized and not frame.name.startswith("_"):
            axis = batch_ndim + frame.dim
            if 0 <= axis < len(shape) and shape[axis] == frame.size:
                names[axis] = frame.name
    return names


def _subsampled_plates(trace):
    """``{plate name: full size}`` of the plates that use only part of their indices."""
    return {
        name: site["fn"].size
        for name, site in trace.nodes.items()
        if site_is_subsample(site) and site["value"].numel() < site["fn"].size
    }


def _model_structure(model, args, kwargs):
    """Classify the model's sample sites from one prior trace (on the full data, see
    :func:`~pyro_stein.logjoint.full_data`). Also returns whether the model subsamples plates."""
    # latent sites take a feasible value without .sample() (as the guide's initialisation), so that
    # ImproperUniform priors trace too; only shapes and observed values are read from this trace
    model = InitMessenger(init_to_mean_or_feasible(like=_first_tensor([args, kwargs])))(model)
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
        subsampled = _subsampled_plates(trace)
        if subsampled:
            try:
                with full_data():
                    trace = poutine.trace(model).get_trace(*args, **kwargs)
                    trace.compute_log_prob()  # e.g. observations of the subsample's size
            except Exception as err:
                raise ValueError(
                    f"the model subsamples the plate(s) {sorted(subsampled)}; the ArviZ export "
                    "evaluates it on the full data (every plate index), which failed. Pass the "
                    "full data to the model (e.g. obs=y[idx] with the full y)"
                ) from err
    trace = prune_subsample_sites(trace)
    sites, nesting = {}, 0
    for name, node in trace.nodes.items():
        if node["type"] != "sample":
            continue
        infer = node["infer"] or {}
        fn, value = node["fn"], node["value"]
        shape = tuple(value.shape)
        if infer.get("_deterministic"):
            # pyro.deterministic's default event_dim is the value's whole rank, which says nothing of its plates:
            # every dim may then be a plate's; a smaller event_dim given by the model fixes the batch rank
            kind, batch_ndim = "deterministic", len(shape) - fn.event_dim if fn.event_dim < len(shape) else len(shape)
        else:
            batch_ndim = len(fn.batch_shape)
            nesting = max(nesting, batch_ndim)
            if not node["is_observed"]:
                kind = "latent"
            elif infer.get("is_auxiliary"):
                kind = "factor"
            else:
                kind = "observed"
        for frame in node["cond_indep_stack"]:
            if frame.vectorized:
                nesting = max(nesting, -frame.dim)
        ll_shape = tuple(fn.log_prob(value).shape) if kind == "observed" else ()
        dims = _site_dims(name, shape, batch_ndim, node["cond_indep_stack"])
        sites[name] = _Site(kind, shape, batch_ndim, dims, value, ll_shape)
    return sites, nesting, bool(subsampled)


def _names(sites, kind):
    return [n for n, s in sites.items() if s.kind == kind]


def _draw_latents(guide, model, sites, num_samples, parallel, args, kwargs):
    """One batch of ``num_samples`` i.i.d. latent draws from the guide: ``{name: (S, *shape)}``."""
    latents = _names(sites, "latent")
    sample_posterior = getattr(guide, "sample_posterior", None)
    if callable(sample_posterior):
        out = sample_posterior(num_samples, *args, **kwargs)
        if isinstance(out, Mapping) and all(
            torch.is_tensor(out.get(n)) and out[n].shape[:1] == (num_samples,) for n in latents
        ):
            return {n: _to_draws(out[n], num_samples, sites[n].shape) for n in latents}

    def predictive(par):
        return Predictive(model, guide=guide, num_samples=num_samples, return_sites=latents, parallel=par)(
            *args, **kwargs
        )

    if parallel is None:
        try:
            out = predictive(True)
        except Exception:
            out = predictive(False)
    else:
        out = predictive(parallel)
    # Predictive pads draws to (S, 1, ..., *shape); strip the padding.
    return {n: _to_draws(out[n], num_samples, sites[n].shape) for n in latents}


def _to_draws(value, n, shape):
    """Reshape a vectorised value ``(n or 1, 1, ..., *shape)`` to ``(n, *shape)``."""
    k = len(shape)
    if value.dim() < k or tuple(value.shape[value.dim() - k :]) != shape:
        raise ValueError(f"unexpected vectorised shape {tuple(value.shape)} for {shape}")
    lead = value.shape[: value.dim() - k]
    size = math.prod(lead)
    if size not in (1, n) or sum(d != 1 for d in lead) > 1:
        raise ValueError(f"unexpected vectorised shape {tuple(value.shape)} for {shape}")
    return value.reshape((size,) + shape).expand((n,) + shape)


def _sum_per_draw(log_prob, n, nesting):
    if log_prob.dim() <= nesting:
        return log_prob.sum().expand(n)
    if log_prob.dim() > nesting + 1 or log_prob.shape[0] not in (1, n):
        raise ValueError(f"unexpected vectorised log-density shape {tuple(log_prob.shape)}")
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(n)


def _density_filter(sites):
    return lambda name, site: name in sites and sites[name].kind != "deterministic"


class _UnconditionSites(UnconditionMessenger):
    """``poutine.uncondition`` restricted to the named sites: the data sites are simulated while
    ``pyro.deterministic`` sites (observed, masked Deltas) keep their recomputed values."""

    def __init__(self, names):
        super().__init__()
        self.names = frozenset(names)

    def _pyro_sample(self, msg):
        if msg["name"] in self.names:
            super()._pyro_sample(msg)


def _evaluate_vectorized(model, sites, nesting, draws, n, predictive, args, kwargs):
    cond = {
        name: v.reshape((n,) + (1,) * (nesting - sites[name].batch_ndim) + tuple(v.shape[1:]))
        for name, v in draws.items()
    }
    plate = pyro.plate(_DRAWS_PLATE, n, dim=-nesting - 1)
    trace = poutine.trace(poutine.condition(plate(model), cond)).get_trace(*args, **kwargs)
    trace.compute_log_prob(_density_filter(sites))
    det, ll, pp, lp = {}, {}, {}, 0.0
    for name, site in sites.items():
        node = trace.nodes[name]
        if site.kind == "deterministic":
            det[name] = _to_draws(node["value"], n, site.shape)
            continue
        lp = lp + _sum_per_draw(node["log_prob"], n, nesting)
        if site.kind == "observed":
            ll[name] = _to_draws(node["fn"].log_prob(node["value"]), n, site.ll_shape)
    if predictive:
        sim_model = poutine.condition(plate(_UnconditionSites(_names(sites, "observed"))(model)), cond)
        sim = poutine.trace(sim_model).get_trace(*args, **kwargs)
        for name in _names(sites, "observed"):
            pp[name] = _to_draws(sim.nodes[name]["value"], n, sites[name].shape)
    return det, ll, pp, lp


def _evaluate_sequential(model, sites, draws, n, predictive, args, kwargs):
    det, ll, pp, lp = {}, {}, {}, []
    for i in range(n):
        cond = {name: v[i] for name, v in draws.items()}
        trace = poutine.trace(poutine.condition(model, cond)).get_trace(*args, **kwargs)
        trace.compute_log_prob(_density_filter(sites))
        total = 0.0
        for name, site in sites.items():
            node = trace.nodes[name]
            if site.kind == "deterministic":
                det.setdefault(name, []).append(node["value"])
                continue
            total = total + node["log_prob"].sum()
            if site.kind == "observed":
                ll.setdefault(name, []).append(node["fn"].log_prob(node["value"]))
        lp.append(total)
        if predictive:
            sim_model = poutine.condition(_UnconditionSites(_names(sites, "observed"))(model), cond)
            sim = poutine.trace(sim_model).get_trace(*args, **kwargs)
            for name in _names(sites, "observed"):
                pp.setdefault(name, []).append(sim.nodes[name]["value"])
    stack = lambda d: {k: torch.stack(v) for k, v in d.items()}  # noqa: E731
    return stack(det), stack(ll), stack(pp), torch.stack(lp)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    a, b = a.to(b.dtype), b
    same = (a - b).abs() <= tol * (1 + b.abs())
    return bool((same | (a.isnan() & b.isnan()) | (a == b)).all())


def _agrees_with_loop(model, sites, draws, n, vectorized, args, kwargs) -> bool:
    """Whether the vectorised evaluation gives the loop's values at the first and last draws: a model written for
    one draw at a time (``w.sum()`` over all of a site's dims, say) can run under the draws plate without error and
    mix the draws, which only this comparison catches."""
    idx = sorted({0, n - 1})
    det, ll, _, lp = vectorized
    sub = {name: v[idx] for name, v in draws.items()}
    det_l, ll_l, _, lp_l = _evaluate_sequential(model, sites, sub, len(idx), False, args, kwargs)
    pairs = [(lp[idx], lp_l)] + [(det[k][idx], det_l[k]) for k in det] + [(ll[k][idx], ll_l[k]) for k in ll]
    return all(a.shape == b.shape and _close(a, b) for a, b in pairs)


def _numpy(x, chains=None):
    x = x.detach()
    if chains is not None:
        x = x.reshape((chains, -1) + tuple(x.shape[1:]))
    return x.cpu().numpy()


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_mapping(value, name):
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")


def _export(
    guide,
    model,
    args,
    kwargs,
    *,
    num_samples,
    num_chains,
    coords,
    dims,
    constant_data,
    log_likelihood,
    posterior_predictive,
    parallel,
    stein_diagnostics=True,
    attrs=None,
):
    if not callable(guide):
        raise TypeError(f"guide must be a callable Pyro guide, got {type(guide).__name__}")
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    num_samples = _check_count(num_samples, "num_samples")
    num_chains = _check_count(num_chains, "num_chains")
    for value, name in ((coords, "coords"), (dims, "dims"), (constant_data, "constant_data")):
        _check_mapping(value, name)
    if parallel not in (None, True, False):
        raise TypeError(f"parallel must be None, True or False, got {parallel!r}")
    az = _import_arviz()

    sites, nesting, subsampled = _model_structure(model, args, kwargs)
    latents = _names(sites, "latent")
    if not latents:
        raise ValueError("model has no latent sample sites to export")
    with torch.no_grad(), full_data() if subsampled else contextlib.nullcontext():
        batches = [_draw_latents(guide, model, sites, num_samples, parallel, args, kwargs) for _ in range(num_chains)]
        draws = {name: torch.cat([b[name] for b in batches]) for name in latents}
        n = num_chains * num_samples
        for name in latents:
            if tuple(draws[name].shape[1:]) != sites[name].shape:
                raise ValueError(
                    f"guide draws for site {name!r} have shape {tuple(draws[name].shape[1:])}, "
                    f"the model's site has shape {sites[name].shape}"
                )
        predictive = posterior_predictive and bool(_names(sites, "observed"))
        det = ll = pp = lp = None
        if parallel is not False:
            try:
                det, ll, pp, lp = _evaluate_vectorized(model, sites, nesting, draws, n, predictive, args, kwargs)
            except Exception:
                if parallel:
                    raise
            if (
                lp is not None
                and parallel is None
                and not _agrees_with_loop(model, sites, draws, n, (det, ll, pp, lp), args, kwargs)
            ):
                det = ll = pp = lp = None  # the model mixes draws under the plate: evaluate it draw by draw
        if lp is None:
            det, ll, pp, lp = _evaluate_sequential(model, sites, draws, n, predictive, args, kwargs)

    c = num_chains
    groups = {
        "posterior": {k: _numpy(v, c) for k, v in {**draws, **det}.items()},
        "sample_stats": {"lp": _numpy(lp, c)},
    }
    observed = _names(sites, "observed")
    if observed:
        groups["observed_data"] = {k: _numpy(sites[k].value) for k in observed}
        if log_likelihood:
            groups["log_likelihood"] = {k: _numpy(v, c) for k, v in ll.items()}
        if predictive:
            groups["posterior_predictive"] = {k: _numpy(v, c) for k, v in pp.items()}
    if constant_data:
        groups["constant_data"] = {k: _numpy(v) if torch.is_tensor(v) else v for k, v in constant_data.items()}
    all_dims = {k: s.dims for k, s in sites.items() if s.kind != "factor" and s.dims}
    all_dims.update(dims or {})
    stein = {}
    if stein_diagnostics:  # model-aware fit diagnostics: R-hat of independent draws is about 1 even for a wrong fit
        from .diagnostics import stein_discrepancy, stein_identity_range

        k = min(n, _STEIN_DRAWS)
        sub = {name: draws[name][:k] for name in latents}
        with full_data() if subsampled else contextlib.nullcontext():
            low, high = stein_identity_range(model, sub, *args, max_samples=k, **kwargs)
            stein = {
                "stein_discrepancy": stein_discrepancy(model, sub, *args, max_samples=k, **kwargs),
                "stein_identity_min": low,
                "stein_identity_max": high,
            }
        stein.update(_importance_attrs(guide, args, kwargs, subsampled))
    all_attrs = {
        "inference_library": "pyro",
        "inference_library_version": str(pyro.__version__),
        "inference_method": type(guide).__name__,
        "torch_version": str(torch.__version__),
        "pyro_stein_version": _pyro_stein_version(),
        "num_chains": num_chains,
        "num_draws_per_chain": num_samples,
        **stein,
        **(attrs or {}),
    }
    # Like ArviZ's own converters, the attributes go on every group (and on the root).
    if "posterior" in inspect.signature(az.from_dict).parameters:  # ArviZ < 1.0
        idata = az.from_dict(**groups, coords=coords, dims=all_dims, attrs=all_attrs)
        for group in groups:
            idata[group].attrs.update(all_attrs)
        return idata
    # ArviZ >= 1.0: from_dict takes a dict of groups, attrs per group ("/" = root): a DataTree
    group_attrs = {"/": all_attrs, **{group: dict(all_attrs) for group in groups}}
    return az.from_dict(groups, coords=coords, dims=all_dims, attrs=group_attrs)


_STEIN_DRAWS = 1000  # draws the Stein diagnostics of an export are computed from
_IMPORTANCE_DRAWS = 10000  # draws the Pareto k-hat and log evidence of an export are computed from


def _importance_attrs(guide, args, kwargs, subsampled) -> dict:
    """``pareto_khat``, ``log_evidence`` and ``log_evidence_se`` of a guide whose sampler has a density (the samplers
    of :mod:`pyro_stein.flows`), from its own ``_IMPORTANCE_DRAWS`` draws; ``{}`` for other guides, and for a model
    that subsamples (the weights need the full-data log joint)."""
    sampler = getattr(guide, "sampler", None)
    if subsampled or not callable(getattr(sampler, "sample_and_log_prob", None)):
        return {}
    from .diagnostics import importance_diagnostics

    with torch.no_grad():
        result = importance_diagnostics(guide, *args, num_samples=_IMPORTANCE_DRAWS, **kwargs)
    return {
        "pareto_khat": float(result.khat),
        "log_evidence": float(result.log_evidence),
        "log_evidence_se": float(result.log_evidence_se),
    }


def to_inference_data(
    guide,
    model,
    *args,
    num_samples: int = 1000,
    num_chains: int = 1,
    coords: Mapping | None = None,
    dims: Mapping | None = None,
    constant_data: Mapping | None = None,
    log_likelihood: bool = True,
    posterior_predictive: bool = True,
    parallel: bool | None = None,
    stein_diagnostics: bool = True,
    **kwargs,
):
    """Draw from a fitted guide and convert the result to ArviZ's native container.

    Returns an ``arviz.InferenceData`` (ArviZ < 1.0) or an ``xarray.DataTree`` (ArviZ >= 1.0),
    built with ``arviz.from_dict``, with groups ``posterior``, ``sample_stats`` (``lp``, the
    model's log joint per draw), and, when the model has observed sites, ``log_likelihood``,
    ``posterior_predictive`` and ``observed_data``; plus ``constant_data`` if given. See the
    module docstring for how each group is computed. Dimensions of sites inside a vectorised
    :func:`pyro.plate` are named after the plate; other dimensions get ArviZ's default
    ``"<var>_dim_<i>"`` names. ``coords`` and ``dims`` override these, as in ArviZ.

    **Chains.** The guide draws i.i.d. samples, so there are no Markov chains. ``num_chains=C``
    draws ``C`` independent batches of ``num_samples`` draws each (one sampler call per batch),
    which makes R-hat and ESS diagnostics *of the sampler*: for a sound i.i.d. sampler R-hat is
    about 1 and the bulk ESS is about the total number of draws. R-hat above 1 or a low ESS
    flag a broken sampler, or one whose output depends on the batch it was drawn in.

    Example::

        import arviz as az
        from pyro_stein.arviz import to_inference_data

        idata = to_inference_data(guide, model, sigma, y=y, num_samples=500, num_chains=4,
                                  coords={"school": names})
        az.summary(idata)
        az.loo(idata, var_name="y")

    :param guide: a fitted Pyro guide that works with :class:`pyro.infer.Predictive`; a
        ``sample_posterior(num_samples, *args, **kwargs)`` method is used if it exists.
    :param model: the Pyro model the guide was fitted to.
    :param args: positional arguments of the model (and the guide), including the observed
        data; in amortized mode they select the dataset the draws are conditioned on.
    :param int num_samples: draws per chain.
    :param int num_chains: number of independent batches of draws (see above).
    :param dict coords: ArviZ coordinates, ``{dim_name: values}``.
    :param dict dims: ArviZ dimensions, ``{var_name: [dim_name, ...]}``; overrides plate names.
    :param dict constant_data: values stored in the ``constant_data`` group.
    :param bool log_likelihood: whether to add the ``log_likelihood`` group.
    :param bool posterior_predictive: whether to add the ``posterior_predictive`` group.
    :param parallel: ``True`` to evaluate the guide and model vectorised over draws, ``False``
        to loop over draws, ``None`` (default) to try vectorised first and loop when that fails or
        disagrees with the loop at the first and last draws.
    :param bool stein_diagnostics: add attributes that flag a wrong fit, from the model's score at up to 1,000
        draws: ``stein_discrepancy`` (``KSD^2``, IMQ kernel; near 0 for exact draws) and ``stein_identity_min`` /
        ``stein_identity_max``, the extreme eigenvalues of Stein's identity matrix in the draws' own whitened
        coordinates (both about 1 for draws of the posterior; below 0.25 the draws are too narrow in some
        direction, above 4 too wide; see :func:`pyro_stein.diagnostics.stein_identity_range`). Costs two batched
        evaluations of the model. A guide whose sampler has a density (:mod:`pyro_stein.flows`) also gets
        ``pareto_khat`` (the Pareto k-hat of the importance weights of 10,000 of its draws against the model's log
        joint: at most 0.7 the draws can be trusted; a calibrated reliability score, see
        :func:`pyro_stein.diagnostics.importance_diagnostics`), ``log_evidence`` and ``log_evidence_se`` (the
        importance-sampling estimate of ``log p(data)``, for model comparison). They are attributes, not
        ``sample_stats`` variables: one number per dataset, computed from the guide's own draws with their density.
    :param kwargs: keyword arguments of the model (and the guide). Names clashing with the
        parameters above cannot be passed; use :func:`to_inference_data_batch` for those.
    :returns: ``arviz.InferenceData`` or ``xarray.DataTree``.
    :raises ImportError: if ArviZ is not installed.
    """
    return _export(
        guide,
        model,
        args,
        kwargs,
        num_samples=num_samples,
        num_chains=num_chains,
        coords=coords,
        dims=dims,
        constant_data=constant_data,
        log_likelihood=log_likelihood,
        posterior_predictive=posterior_predictive,
        parallel=parallel,
        stein_diagnostics=stein_diagnostics,
    )


def to_inference_data_batch(guide, model, datasets: Sequence, **options) -> list:
    """Export one ArviZ container per dataset, e.g. for an amortized guide.

    Example::

        idatas = to_inference_data_batch(guide, model, [((x1,), {"y": y1}), ((x2,), {"y": y2})],
                                         num_samples=500)

    :param guide: a fitted (typically amortized) Pyro guide.
    :param model: the Pyro model.
    :param datasets: a list of :class:`~pyro_stein.Dataset` objects or ``(args, kwargs)`` pairs,
        one per dataset, passed to the model and guide as ``model(*args, **kwargs)``.
    :param options: keyword options of :func:`to_inference_data` (``num_samples``,
        ``num_chains``, ``coords``, ``dims``, ``log_likelihood``, ``posterior_predictive``,
        ``parallel``); ``constant_data`` may also be a list with one dict per dataset.
    :returns: a list with one ``InferenceData``/``DataTree`` per dataset, in order; each has
        the attribute ``dataset_index``.
    """
    if isinstance(datasets, (str, bytes)) or not isinstance(datasets, Sequence):
        raise TypeError("datasets must be a list of pyro_stein.Dataset objects or (args, kwargs) pairs")
    allowed = set(inspect.signature(to_inference_data).parameters) - {"guide", "model", "args"}
    allowed.discard("kwargs")
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unknown option(s) for to_inference_data_batch: {sorted(unknown)}")
    constant = options.pop("constant_data", None)
    if isinstance(constant, Sequence) and len(constant) != len(datasets):
        raise ValueError(f"constant_data has {len(constant)} entries but there are {len(datasets)} datasets")
    defaults = dict(
        num_samples=1000,
        num_chains=1,
        coords=None,
        dims=None,
        log_likelihood=True,
        posterior_predictive=True,
        parallel=None,
    )
    results = []
    for i, item in enumerate(datasets):
        if isinstance(item, Dataset):
            item = (item.args, item.kwargs)
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"datasets[{i}] must be a pyro_stein.Dataset or an (args, kwargs) pair, got {item!r:.80}")
        args, kwargs = item
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"datasets[{i}][0] (args) must be a tuple or list")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"datasets[{i}][1] (kwargs) must be a dict or None")
        const = constant[i] if isinstance(constant, Sequence) else constant
        results.append(
            _export(
                guide,
                model,
                tuple(args),
                dict(kwargs or {}),
                constant_data=const,
                attrs={"dataset_index": i},
                **{**defaults, **options},
            )
        )
    return results
