"""Reference-free posterior diagnostics: kernelized Stein discrepancy and simulation-based calibration.

* :func:`stein_discrepancy` scores *any* posterior draws (from a guide, NUTS, ...) against the
  model using only the model's score, so methods can be compared without a reference posterior.
* :func:`guide_ksd` is the per-dataset quality signal of an amortized guide: large values flag
  datasets the guide handles badly (e.g. out of its training distribution); refine those with
  :func:`pyro_stein.refine`.
* :func:`sbc` runs simulation-based calibration from the model's own prior predictive.
* :func:`importance_diagnostics` (guides whose sampler has a density, e.g. :class:`~pyro_stein.flows.FlowSampler`):
  the importance weights of the guide's draws against the model's log joint, their Pareto ``k-hat`` (a calibrated
  reliability score per dataset: above 0.7, do not trust the fit) and a log-evidence estimate;
  :func:`importance_sample_posterior` resamples the draws with their Pareto-smoothed weights.

KSD is computed in the model's *unconstrained* space (where the guide works), with the IMQ
kernel by default, whose KSD controls convergence in distribution (Gorham & Mackey, 2017).
Values are comparable between methods on the same model and dataset, not across models.

References:

[1] Q. Liu, J. Lee, M. Jordan, "A Kernelized Stein Discrepancy for Goodness-of-fit Tests", ICML 2016.
[2] J. Gorham, L. Mackey, "Measuring Sample Quality with Kernels", ICML 2017.
[3] S. Talts et al., "Validating Bayesian Inference Algorithms with Simulation-Based Calibration", 2018.
[4] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational Inference", ICML 2018.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from ._checks import _int_at_least
from .data import Dataset, as_dataset
from .importance import ImportanceResult, ess, importance_resample, log_evidence, psis
from .kernels import IMQKernel, RadialKernel
from .logjoint import ModelLogDensity, latent_sites_from_trace, pack, unpack
from .stein import ksd, stein_identity_eigenvalues
from .tracing import require_full_data

__all__ = [
    "draws_and_log_densities",
    "guide_ksd",
    "importance_diagnostics",
    "importance_sample_posterior",
    "plot_sbc",
    "sbc",
    "stein_discrepancy",
    "stein_identity_range",
]


def stein_discrepancy(
    model: Callable,
    samples: dict[str, Tensor],
    *args,
    kernel: RadialKernel | None = None,
    max_samples: int = 2000,
    **kwargs,
) -> float:
    """``KSD^2`` (U-statistic) of posterior draws under the model's posterior for ``(*args, **kwargs)``.

    :param callable model: the Pyro model.
    :param dict samples: ``{site: Tensor[S, *site_shape]}`` constrained draws of every latent site
        (extra keys such as deterministic sites are ignored), e.g. ``mcmc.get_samples()``.
    :raises ValueError: when a latent site is missing, its draws have another shape than the site
        (e.g. grouped by chain) or the sites hold different numbers of draws.
    :param RadialKernel kernel: default :class:`~pyro_stein.IMQKernel`.
    :param int max_samples: use at most this many draws (the cost is quadratic).
    :returns: the estimate (near 0 for exact draws; may be slightly negative).
    """
    u, score = _packed_draws_and_scores(model, samples, args, kwargs, max_samples)
    return float(ksd(u, score, kernel or IMQKernel()))


def _packed_draws_and_scores(model, samples, args, kwargs, max_samples) -> tuple[Tensor, Tensor]:
    """Up to ``max_samples`` draws packed in unconstrained space and the model's score there (checked as
    :func:`stein_discrepancy` documents)."""
    if not isinstance(samples, dict) or not samples:
        raise TypeError("samples must be a non-empty dict {site_name: Tensor[num_samples, *site_shape]}")
    from .guide import _int_at_least

    _int_at_least(max_samples, "max_samples", 2, "an int >= 2 (the U-statistic needs pairs of draws)")
    from .guide import _first_tensor, init_to_mean_or_feasible

    def latent_sites(init_fn):  # the latent sites of a trace whose latents take init_fn's values (no .sample())
        tr = poutine.block(poutine.trace(InitMessenger(init_fn)(model)).get_trace)(*args, **kwargs)
        return latent_sites_from_trace(prune_subsample_sites(tr))

    # their shapes from the guide's initial values, not from the samples, whose shapes are what is checked
    sites = latent_sites(init_to_mean_or_feasible(like=_first_tensor([args, kwargs])))
    missing = [s.name for s in sites if s.name not in samples]
    if missing:
        raise ValueError(f"samples lack the latent site(s) {missing}; pass draws of every latent site of the model")
    for site in sites:
        v = samples[site.name]
        if not isinstance(v, Tensor) or v.dim() == 0:
            raise TypeError(
                f"samples[{site.name!r}] must be a Tensor[num_samples, *site_shape], got "
                f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            )
        got = tuple(v.shape[1:])
        if got != tuple(site.shape):
            raise ValueError(
                f"samples[{site.name!r}] has draws of shape {got}, but the site's shape is {tuple(site.shape)}; pass "
                "Tensor[num_samples, *site_shape] (e.g. mcmc.get_samples(), not group_by_chain=True: flatten the "
                "chains)"
            )
    counts = {int(samples[s.name].shape[0]) for s in sites}
    if len(counts) > 1:
        raise ValueError(
            f"the latent sites' samples hold different numbers of draws {sorted(counts)}; pass the same draws of "
            "every site"
        )
    num = counts.pop()
    if num < 2:
        raise ValueError("stein_discrepancy needs at least 2 draws")
    # again at the first draw: the supports (and bijections) the log density packs the draws with
    sites = latent_sites(init_to_value(values={s.name: samples[s.name][0] for s in sites}))
    n = min(num, max_samples)
    u = pack({s.name: samples[s.name][:n] for s in sites}, sites)
    _, score = ModelLogDensity(model, sites).log_density_and_score(u, args, kwargs)
    return u, score


def stein_identity_range(
    model: Callable, samples: dict[str, Tensor], *args, max_samples: int = 2000, **kwargs
) -> tuple[float, float]:
    """The smallest and largest eigenvalue of Stein's identity matrix of posterior draws (see
    :func:`pyro_stein.stein.stein_identity_eigenvalues`): both about 1 for draws of the posterior; a value below
    0.25 says the draws are too narrow in some direction (by a factor of about 2 or more), above 4 too wide. Unlike
    R-hat of independent draws, it depends on the model, so it flags a wrong fit. Arguments as
    :func:`stein_discrepancy`; ``(nan, nan)`` when there are no more draws than unconstrained dimensions."""
    u, score = _packed_draws_and_scores(model, samples, args, kwargs, max_samples)
    if u.shape[0] <= u.shape[1]:
        return float("nan"), float("nan")
    ev = stein_identity_eigenvalues(u, score)
    return float(ev.min()), float(ev.max())


@torch.no_grad()
def guide_ksd(guide, *args, num_samples: int = 500, kernel: RadialKernel | None = None, **kwargs) -> float:
    """``KSD^2`` of a guide's draws for the dataset ``(*args, **kwargs)``: a reference-free fit signal.

    It scores the sampler's own draws, before any post-processing
    (:class:`~pyro_stein.MomentCorrection`, :class:`~pyro_stein.MALA`, :class:`~pyro_stein.HMC`),
    so it says how well the trained sampler handles this dataset (large: refine, or retrain on
    datasets like it); polished draws are usually closer to the posterior than it suggests.

    :param AmortizedSteinGuide guide: a (possibly amortized) guide.
    :param int num_samples: draws to score (at least 2: the estimate pairs distinct draws).
    """
    from .guide import _num_samples

    if _num_samples(num_samples) < 2:
        raise ValueError(f"num_samples must be at least 2 (the KSD pairs distinct draws), got {num_samples!r}")
    guide.setup(*args, **kwargs)
    z = guide.draw(num_samples, *guide.context_and_frame(*args, **kwargs))
    with torch.enable_grad():
        _, score = guide.log_density.log_density_and_score(z, args, kwargs)
    return float(ksd(z, score, kernel or IMQKernel()))


def _frame_log_det(guide, frame) -> Tensor | float:
    """``log|det L|`` of the guide's frame ``z = m + L u`` (0 without one)."""
    if guide.whiten is None:
        return 0.0
    scale = frame[1] if frame is not None else guide.whiten_scale
    return torch.linalg.slogdet(scale)[1]


@torch.no_grad()
def draws_and_log_densities(guide, num_samples: int, *args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """Draws of a guide for the dataset ``(*args, **kwargs)`` with their log density under the guide and the model.

    The guide's sampler must have a density: a ``sample_and_log_prob(noise, context)`` method (as the samplers of
    :mod:`pyro_stein.flows` have). Both densities are those of the packed unconstrained latents ``z`` (what
    ``guide.log_density`` evaluates: the model's log joint plus the log-Jacobians of the sites' bijections), the
    guide's including its frame ``z = m + L u`` (``- log|det L|``), so ``log_p - log_q`` are the importance weights of
    the draws and their log-mean-exp estimates the model's log evidence. The draws are the sampler's own, before any
    post-processing steps (:class:`~pyro_stein.MomentCorrection`, :class:`~pyro_stein.MALA`, :class:`~pyro_stein.HMC`,
    which have no density).

    :returns: ``(z (num_samples, D), log_q (num_samples,), log_p (num_samples,))``.
    """
    num_samples = _int_at_least(num_samples, "num_samples", 2, "an int >= 2")
    return _density_draws(guide, num_samples, args, kwargs)


def _require_density(guide) -> None:
    """Raise a ``TypeError`` unless the (set-up) guide's sampler has a density."""
    sampler = guide.sampler
    if not callable(getattr(sampler, "sample_and_log_prob", None)):
        raise TypeError(
            f"the guide's sampler ({type(sampler).__name__}) has no density (no sample_and_log_prob method); build the "
            "guide with a sampler from pyro_stein.flows, e.g. AmortizedSteinGuide(model, sampler=FlowSampler(D))"
        )


def _draws_with_density(guide, noise: Tensor, context: Tensor | None, frame) -> tuple[Tensor, Tensor]:
    """The unconstrained draws of a guide with a density for ``noise`` and their log density (the frame's Jacobian
    included), differentiable in the guide's parameters: noise ``(n, D)`` with one dataset's context and frame, or
    ``(B, n, D)`` with contexts ``(B, 1, C)`` and frames per dataset (``guide.frames``)."""
    u, log_q = guide.sampler.sample_and_log_prob(noise, context)
    log_det = _frame_log_det(guide, frame)
    if isinstance(log_det, Tensor) and log_det.dim():  # one per dataset
        log_det = log_det.unsqueeze(-1)
    return guide.unwhiten(u, frame), log_q - log_det


def _density_draws(guide, num_samples: int, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`draws_and_log_densities` with gradients: ``log_q`` and ``log_p`` are differentiable in the sampler's
    parameters (through the reparametrised draws)."""
    guide.setup(*args, **kwargs)
    require_full_data(guide.subsample_plates, "importance weighting", "pass the full data")
    _require_density(guide)
    sampler = guide.sampler
    context, frame = guide.context_and_frame(*args, **kwargs)
    like = next(sampler.parameters())
    noise = torch.randn(num_samples, sampler.noise_dim, dtype=like.dtype, device=like.device)
    z, log_q = _draws_with_density(guide, noise, context, frame)
    log_p = guide.log_density.log_density(z, args, kwargs)
    return z, log_q, log_p.to(log_q.dtype)


def importance_diagnostics(
    guide, *args, num_samples: int = 10000, defensive: float = 0.0, **kwargs
) -> ImportanceResult:
    """Importance-sampling diagnostics of a guide (with a density) on the dataset ``(*args, **kwargs)``.

    With ``defensive = a > 0`` the proposal is the defensive mixture ``r = (1 - a) q + a p0`` (Hesterberg 1995) of
    the guide ``q`` and the model's prior ``p0`` (its latent sites' priors, observed sites and ``pyro.factor``
    terms left out), in the guide's unconstrained space: ``round(a num_samples)`` of the draws come from the prior
    and every weight is ``p / r``. A prior draw that lands in a mode the guide never visits gets a weight far above
    the others, so ``k-hat`` can flag a missed mode, which the guide's own draws cannot show; the log evidence
    stays unbiased. It helps where the prior puts draws near the missed modes, which in many dimensions it rarely
    does.

    :param int num_samples: draws to weigh (default 10,000). k-hat is an estimate whose 0.7 threshold holds from
        about 2,200 draws (Vehtari et al. 2024); on the multimodal benchmark, 10,000 draws flag more of the fits that
        are wrong than 2,000 (12 of 17 against 8) and one more of 36 that are right (see the multimodal guide).
    :param float defensive: the prior's share of the draws, in ``[0, 1)`` (default 0: the guide's own draws).
    :returns: an :class:`~pyro_stein.importance.ImportanceResult`: the raw and Pareto-smoothed log weights of
        ``num_samples`` draws, the Pareto ``k-hat`` (``<= 0.7``: the draws can be trusted, and reweighted; ``> 0.7``:
        the guide misses part of the posterior, e.g. a mode), the log-evidence estimate ``log mean w`` with its
        standard error, and the effective sample size of the smoothed weights. Unlike the KSD, ``k-hat`` has a
        fixed scale: the same thresholds hold for every model and dataset.
    """
    if isinstance(defensive, bool) or not isinstance(defensive, (int, float)):
        raise TypeError(f"defensive must be a float in [0, 1), got {type(defensive).__name__}")
    if not 0.0 <= defensive < 1.0:
        raise ValueError(f"defensive must lie in [0, 1) (the prior's share of the draws), got {defensive!r}")
    num_samples = _int_at_least(num_samples, "num_samples", 2, "an int >= 2")
    num_prior = round(defensive * num_samples)
    if num_prior and num_samples - num_prior < 2:
        raise ValueError(
            f"defensive={defensive!r} leaves {num_samples - num_prior} of num_samples={num_samples} draws to the "
            "guide; lower defensive or raise num_samples"
        )
    if num_prior:
        lw = _defensive_log_weights(guide, num_samples, num_prior, args, kwargs)
    else:
        _, log_q, log_p = draws_and_log_densities(guide, num_samples, *args, **kwargs)
        lw = log_p - log_q
    smoothed, khat = psis(lw)
    log_z, se = log_evidence(lw)
    return ImportanceResult(lw, smoothed, khat, log_z, se, ess(smoothed))


@torch.no_grad()
def _defensive_log_weights(guide, num_samples: int, num_prior: int, args: tuple, kwargs: dict) -> Tensor:
    """``log p - log r`` of ``num_samples - num_prior`` guide draws and ``num_prior`` prior draws, ``r`` the
    defensive mixture of :func:`importance_diagnostics` with the prior's share ``num_prior / num_samples``."""
    z_q, log_q_q, log_p_q = draws_and_log_densities(guide, num_samples - num_prior, *args, **kwargs)
    with guide.full_data(), poutine.block():  # the model's prior: its latent sites drawn, its data kept
        traces = [poutine.trace(guide.inference_model).get_trace(*args, **kwargs) for _ in range(num_prior)]
    prior = {s.name: torch.stack([t.nodes[s.name]["value"].detach() for t in traces]) for s in guide.sites}
    z_0 = pack(prior, guide.sites).to(z_q)
    log_p_0 = guide.log_density.log_density(z_0, args, kwargs).to(z_q.dtype)
    # the guide's density at the prior draws (at its own draws it came with them): the sampler's at the whitened point
    context, frame = guide.context_and_frame(*args, **kwargs)
    log_q_0 = guide.sampler.log_prob(guide.whiten_latents(z_0, frame), context) - _frame_log_det(guide, frame)
    z, log_q = torch.cat([z_q, z_0]), torch.cat([log_q_q, log_q_0])
    # the prior's density: the model with its observed sites (likelihood and pyro.factor terms) hidden, so that a
    # likelihood of 0 (a prior draw outside the data's support) leaves the prior's density as it is
    prior_model = poutine.block(
        guide.inference_model, hide_fn=lambda msg: msg["type"] == "sample" and msg["is_observed"]
    )
    prior_density = ModelLogDensity(prior_model, guide.sites, guide.vectorize)
    log_p0 = prior_density.log_density(z, args, kwargs).to(z.dtype)
    share = num_prior / num_samples
    log_r = torch.logaddexp(math.log1p(-share) + log_q, math.log(share) + log_p0)
    return torch.cat([log_p_q, log_p_0]) - log_r


def importance_sample_posterior(
    guide, num_samples: int, *args, num_draws: int | None = None, **kwargs
) -> tuple[dict[str, Tensor], float]:
    """Posterior draws resampled from a guide's own draws with their Pareto-smoothed importance weights (PSIS).

    Where the guide's ``k-hat`` is at most 0.7, resampling removes most of its remaining error (wrong mode masses,
    tails too light or too heavy); above, it cannot add mass the guide does not have, and the ``k-hat`` returned says
    so.

    :param int num_samples: draws to return.
    :param int num_draws: guide draws to weight (default ``max(2000, 2 num_samples)``); resampling repeats draws, so
        take several times ``num_samples``.
    :returns: ``({site: Tensor[num_samples, *site_shape]}, k-hat)`` in constrained space.
    """
    num_samples = _int_at_least(num_samples, "num_samples", 1, "a positive int")
    num_draws = max(2000, 2 * num_samples) if num_draws is None else _int_at_least(num_draws, "num_draws", 2)
    z, log_q, log_p = draws_and_log_densities(guide, num_draws, *args, **kwargs)
    lw = log_p - log_q
    khat = float(psis(lw)[1])
    z = importance_resample(z, lw, num_samples)
    return {name: x for name, (_, x) in unpack(z, guide.sites).items()}, khat


def sbc(
    guide,
    simulate: Callable[[], tuple[Dataset, dict[str, Tensor]]],
    num_datasets: int = 100,
    num_samples: int = 99,
) -> dict[str, Tensor]:
    """Simulation-based calibration of an amortized guide from the model's prior predictive.

    For each of ``num_datasets`` simulated ``(dataset, true latent values)`` pairs, draws
    ``num_samples`` posterior samples and records, per scalar element of every latent site, the
    rank of the true value among them (``0..num_samples``). For a calibrated posterior the ranks
    are uniform.

    :param simulate: ``() -> (Dataset, {site: true value})``, e.g.
        :meth:`pyro_stein.PriorPredictiveStream.sample_with_latents`.
    :returns: ``{site: LongTensor[num_datasets, *site_shape]}`` of ranks.
    """
    from .guide import _int_at_least

    if not callable(simulate):
        raise TypeError("simulate must be a callable returning (Dataset, {site: true value})")
    num_datasets = _int_at_least(num_datasets, "num_datasets", 1)
    num_samples = _int_at_least(num_samples, "num_samples", 1)
    ranks: dict[str, list[Tensor]] = {}
    for i in range(num_datasets):
        dataset, truth = simulate()
        dataset = as_dataset(dataset)
        draws = guide.sample_posterior(num_samples, *dataset.args, **dataset.kwargs)
        unknown = sorted(set(truth) - set(draws))
        if unknown:
            raise ValueError(
                f"simulate returned true values of {unknown}, which are not among the guide's sites {sorted(draws)}; "
                "key the true values by the model's latent site names"
            )
        for name, value in truth.items():
            value = torch.as_tensor(value).to(draws[name])
            if value.shape != draws[name].shape[1:]:
                raise ValueError(
                    f"the true value of {name!r} has shape {tuple(value.shape)}, but the site's draws have shape "
                    f"{tuple(draws[name].shape[1:])}; simulate must return one value of each site per dataset"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"the true value of {name!r} for simulated dataset {i} is not finite "
                    f"({value.flatten()[:5].tolist()}"
                    f"{' ...' if value.numel() > 5 else ''}); a rank against NaN or infinity means nothing: check "
                    "simulate (e.g. a prior draw that overflowed)"
                )
            if draws[name].is_floating_point() and not bool(torch.isfinite(draws[name]).all()):
                raise ValueError(
                    f"the guide's draws of {name!r} for simulated dataset {i} are not all finite; a rank against them "
                    "means nothing: check the guide on that dataset (e.g. pyro_stein.diagnostics.guide_ksd)"
                )
            ranks.setdefault(name, []).append((draws[name] < value).sum(0))
    return {k: torch.stack(v) for k, v in ranks.items()}


def plot_sbc(ranks: dict[str, Tensor], num_samples: int, bins: int = 20, path: str | None = None):
    """Histogram the SBC ranks of each site (pooled over elements) with the uniform band.

    Rank ``r`` (an integer in ``0..num_samples``) goes to bin ``floor(r * bins / (num_samples + 1))``;
    when ``bins`` does not divide ``num_samples + 1`` the bins hold unequal numbers of ranks, and each
    bin's expected count and band follow its own share. The grey band is the central 99% range of a
    bin's count under uniformity (normal approximation).

    :param dict ranks: ``{site: integer ranks}`` as returned by :func:`sbc`.
    :param int num_samples: draws per rank (the ranks lie in ``0..num_samples``).
    :param int bins: histogram bins, between 1 and ``num_samples + 1``.
    :param str path: where to save the figure (optional; the format follows its extension, written atomically).
    :returns: the matplotlib figure (also saved to ``path`` if given).
    """
    import matplotlib.pyplot as plt

    from .guide import _int_at_least

    num_samples = _int_at_least(num_samples, "num_samples", 1, "the int >= 1 the ranks were computed with")
    bins = _int_at_least(bins, "bins", 1, f"an int between 1 and num_samples + 1 = {num_samples + 1}")
    if bins > num_samples + 1:
        raise ValueError(f"bins must be an int between 1 and num_samples + 1 = {num_samples + 1}, got {bins!r}")
    if not isinstance(ranks, dict) or not ranks:
        raise TypeError(
            f"ranks must be a non-empty dict {{site: integer ranks}} as sbc returns, got {type(ranks).__name__}"
        )
    for name, r in ranks.items():
        if not isinstance(r, Tensor) or r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
            raise TypeError(
                f"ranks[{name!r}] must be an integer Tensor (as sbc returns), got "
                f"{r.dtype if isinstance(r, Tensor) else type(r).__name__}"
            )
    levels = num_samples + 1
    share = torch.bincount(torch.arange(levels) * bins // levels, minlength=bins).double() / levels
    names = list(ranks)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = ranks[name].reshape(-1).cpu().long()
        if r.numel() and (r.min() < 0 or r.max() > num_samples):
            raise ValueError(
                f"ranks of {name!r} lie in {int(r.min())}..{int(r.max())}, outside 0..num_samples = "
                f"0..{num_samples}: pass the num_samples the ranks were computed with"
            )
        counts = torch.bincount(r * bins // levels, minlength=bins).double()
        expected = r.numel() * share
        half = 2.576 * (expected * (1 - share)).sqrt()
        ax.bar(
            torch.arange(bins).numpy(), (2 * half).numpy(), bottom=(expected - half).numpy(), width=1.0, color="0.85"
        )
        ax.bar(torch.arange(bins).numpy(), counts.numpy(), width=0.9, color="C0")
        ax.set_title(name)
        ax.set_xticks([])
    fig.tight_layout()
    if path is not None:  # written atomically: an interrupted save leaves the previous file intact
        from ._io import atomic_write

        ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format=ext or None))
    return fig
