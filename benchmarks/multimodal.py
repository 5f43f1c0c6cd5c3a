"""Multimodal and non-Gaussian targets: mode discovery, C2ST, mode masses, log evidence and Pareto k-hat.

``python -m benchmarks.multimodal [--smoke] [--only gmm25,funnel,manywell,symmetric,mixture] [--out DIR]`` (or
``python -m benchmarks --only multimodal``); with the environment variable ``CI`` set the smoke configuration is the
default. Writes ``multimodal.json`` and ``multimodal.md`` (``multimodal_smoke.*`` in the smoke configuration); the
results of parts not run are kept from the existing JSON file. The smoke configuration skips the peers.

Targets (exact draws and exact log evidence known):

* ``gmm25``: the 2-D mixture of 25 Gaussians (means on the grid ``{-10, -5, 0, 5, 10}^2``, variance 0.3, equal
  weights; Sendera et al. 2024), ``log Z = 0``.
* ``funnel``: Neal's funnel in 10 dimensions, ``v ~ N(0, 3^2)``, ``x_i | v ~ N(0, e^v)`` (9 of them), written as the
  Pyro model it is, ``log Z = 0``; C2ST on ``(v, x_1)``.
* ``manywell``: Many-Well in 32 dimensions, ``log p(x) = sum_{i=1}^{16} -x_{2i-1}^4 + 6 x_{2i-1}^2 + 0.5 x_{2i-1}
  - 0.5 x_{2i}^2`` (``2^16`` modes), exact ``log Z`` by quadrature.
* ``symmetric``: an amortized family with sign-symmetric modes, ``theta ~ N(0, 2^2 I_2)``, ``y_ij ~ N(theta_j^2, 1)``
  (four modes ``(+-a, +-b)`` per dataset); exact posteriors and orthant masses by quadrature per coordinate.
* ``mixture3``: a Gaussian mixture model with unknown means, ``mu_k ~ N(0, 3^2)``, ``y_i ~ 1/3 sum_k N(mu_k, 1)``
  (``k = 1, 2, 3``; 60 points around -2.5, 0 and 2.5): the posterior is invariant under relabelling the ``mu_k``, so
  it has ``3! = 6`` label-switched modes of mass 1/6 each; written with and without the ordering constraint
  ``mu_1 < mu_2 < mu_3`` (an ordered prior, ``OrderedTransform`` in the guide's space). Exact draws and ``log Z`` on a
  grid over the ordered cells.

The first three are written as ``x ~ N(0, s0^2 I)`` plus ``pyro.factor(log p(x) - log N(x; 0, s0^2 I))``, so the
posterior is the target and the evidence its normalizing constant. Methods: ``pyro_stein`` rows as named; Pyro's
``AutoNormal`` and ``AutoIAFNormal`` (SVI, Trace_ELBO; log Z by importance sampling with their densities) and NUTS
(no density: no log Z, no k-hat). Mode masses are self-normalized estimates from the Pareto-smoothed importance weights
of the guide's draws (``importance_masses``; 40,000 draws for the ``pyro_stein`` rows, 2,000 for the autoguides) with
their Monte Carlo standard errors, or the draws' counts (NUTS; correlated draws: no standard error). C2ST:
``benchmarks.metrics.c2st`` with ``early_stopping=True`` (not sbibm's exact definition), 1,000 draws (quick
configuration) against as many exact draws; NUTS's 500 draws (250 on Many-Well) without early stopping (with so few the
early-stopped classifier can stop before it learns). The pyro_stein rows are scored on PSIS-resampled draws
(``importance_sample_posterior``) and on the sampler's raw draws.

k-hat of every fit with a density is computed twice: from the same 2,000 draws as the log evidence (``khat``, with
``khat_defensive`` against the defensive mixture with the prior), and from ``khat_draws`` further draws (10,000 in the
quick configuration, the amortized path's sampling budget per dataset, and above the ~2,200 draws for which 0.7 is
the right threshold, Vehtari et al. 2024): ``khat_large_sample`` and ``khat_defensive_large_sample``, each on a random
stream of its own, so that the other measurements do not depend on them. The report gives the detector's confusion
table for both.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
import warnings
from functools import partial
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to

from benchmarks.metrics import quiet_c2st as _c2st
from pyro_stein import Amortization, AmortizedSteinGuide, AmortizedSVGD
from pyro_stein.data import Dataset
from pyro_stein.diagnostics import draws_and_log_densities, importance_diagnostics
from pyro_stein.flows import FlowSampler, SymmetrizedSampler
from pyro_stein.importance import importance_masses, importance_resample, log_evidence, psis
from pyro_stein.infer import default_optim
from pyro_stein.modes import Tempered, anneal, elbo_refine, find_modes, fit_mixture, mixture_from_modes

CONFIG = {
    "smoke": {
        "draws": 300,
        "gmm_starts": 60,
        "gmm_steps": 5,
        "anneal_steps": 5,
        "funnel_steps": 5,
        "mw_steps": 5,
        "mw_refine_steps": 5,
        "svi_steps": 5,
        "nuts": (20, 20),
        "sym_train": 4,
        "sym_steps": 5,
        "sym_test": 2,
        "mass_draws": 2000,
        "khat_draws": 600,
        "gmm_search_steps": 30,
        "mix_steps": 5,
        "mix_starts": 8,
        "mix_grid": 0.2,
        "mix_refine_steps": 5,
        "peers": False,
    },
    "quick": {
        "draws": 1000,
        "gmm_starts": 200,
        "gmm_steps": 200,
        "anneal_steps": 1500,
        "funnel_steps": 800,
        "mw_steps": 800,
        "mw_refine_steps": 6000,
        "svi_steps": 1500,
        "nuts": (300, 500),
        "sym_train": 128,
        "sym_steps": 800,
        "sym_test": 10,
        "mass_draws": 40000,
        "khat_draws": 10000,
        "gmm_search_steps": 300,
        "mix_steps": 800,
        "mix_starts": 40,
        "mix_grid": 0.05,
        "mix_refine_steps": 4000,
        "peers": True,
    },
}
KHAT_OK = 0.7
DEFENSIVE = 0.1  # the prior's share of the draws for the defensive k-hat of this library's guides


def _factor_model(logp, D: int, s0: float):
    def model():
        prior = dist.Normal(torch.zeros(D), s0 * torch.ones(D)).to_event(1)
        x = pyro.sample("x", prior)
        pyro.factor("target", logp(x) - prior.log_prob(x))

    return model


# ---------------------------------------------------------------------------------------------- targets
GRID = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0])


def gmm25_means() -> torch.Tensor:
    return torch.cartesian_prod(GRID, GRID)


def gmm25_logp(x):
    comp = dist.Normal(gmm25_means().to(x), math.sqrt(0.3)).to_event(1)
    return torch.logsumexp(comp.log_prob(x.unsqueeze(-2)), -1) - math.log(25)


def gmm25_exact(n):
    k = torch.randint(25, (n,))
    return gmm25_means()[k] + math.sqrt(0.3) * torch.randn(n, 2)


def funnel_model():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), torch.exp(v / 2)).to_event(1))


def funnel_exact(n):
    v = 3 * torch.randn(n)
    return torch.cat([v[:, None], torch.randn(n, 9) * torch.exp(v / 2)[:, None]], -1)


def manywell_logp(x):
    a, b = x[..., 0::2], x[..., 1::2]
    return (-(a**4) + 6 * a**2 + 0.5 * a - 0.5 * b**2).sum(-1)


def _double_well_grid():
    g = torch.linspace(-4.0, 4.0, 200001, dtype=torch.float64)
    return g, -(g**4) + 6 * g**2 + 0.5 * g


def manywell_log_z(D=32):
    g, lp = _double_well_grid()
    log_z1 = float(torch.logsumexp(lp, 0) + math.log(g[1] - g[0]))
    return (D // 2) * (log_z1 + 0.5 * math.log(2 * math.pi))


def _grid_sample(g, lp, n):
    w = torch.exp(lp - lp.max())
    return g[torch.multinomial(w, n, replacement=True)] + (g[1] - g[0]) * (torch.rand(n, dtype=g.dtype) - 0.5)


def manywell_exact(n, D=32):
    g, lp = _double_well_grid()
    out = torch.randn(n, D, dtype=torch.float64)
    for i in range(0, D, 2):
        out[:, i] = _grid_sample(g, lp, n)
    return out


# ---------------------------------------------------------------------------------------------- helpers
def _autoguide_fit(model, kind: str, steps: int):
    pyro.clear_param_store()
    guide = (
        pyro.infer.autoguide.AutoNormal(model)
        if kind == "AutoNormal"
        else pyro.infer.autoguide.AutoIAFNormal(model, num_transforms=2, hidden_dim=[32])
    )
    svi = pyro.infer.SVI(
        model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)}), pyro.infer.Trace_ELBO()
    )
    for _ in range(steps):
        svi.step()
    return guide


@torch.no_grad()
def _autoguide_draws(model, guide, n, names):
    """Draws and log importance weights of a Pyro autoguide (one trace per draw)."""
    rows, lw = [], []
    for _ in range(n):
        gt = pyro.poutine.trace(guide).get_trace()
        mt = pyro.poutine.trace(pyro.poutine.replay(model, trace=gt)).get_trace()
        rows.append(torch.cat([gt.nodes[s]["value"].reshape(-1) for s in names]))
        lw.append(float(mt.log_prob_sum() - gt.log_prob_sum()))
    return torch.stack(rows), torch.tensor(lw)


def _nuts(model, warmup, samples, names):
    mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run()
    s = mcmc.get_samples()
    return torch.cat([s[k].reshape(samples, -1) for k in names], -1)


def _gmm_labels(z):
    """The mode of each draw: the nearest of the 25 means."""
    return torch.cdist(z.double(), gmm25_means().double()).argmin(-1)


def _mass_fields(labels, log_w, truth, independent=True) -> dict:
    """Mode masses (self-normalized importance weights, or counts when ``log_w`` is None), their Monte Carlo standard
    errors (``independent``: the draws are independent; not for MCMC), modes found by the raw draws (10 % of a mode's
    true mass), and the largest relative error with the standard error of that mode's estimate."""
    m, se = importance_masses(labels, log_w, truth.shape[0])
    raw = importance_masses(labels, None, truth.shape[0])[0]
    rel = (m - truth).abs() / truth
    worst = int(rel.argmax())
    out = {
        "masses": [round(float(v), 4) for v in m],
        "modes_found": int((raw > 0.1 * truth).sum()),
        "max_mass_rel_error": float(rel.max()),
        "mass_draws": int(labels.shape[0]),
    }
    if independent:
        out["masses_se"] = [round(float(v), 4) for v in se]
        out["max_mass_rel_error_se"] = float(se[worst] / truth[worst])
        out["max_mass_rel_se"] = float((se / truth).max())
    if log_w is not None:
        out["max_mass_rel_error_unweighted"] = float(((raw - truth).abs() / truth).max())
    return out


@torch.no_grad()
def _many_draws(guide, num, args=(), chunk=10000):
    """``num`` draws of a guide with a density and their log importance weights, drawn in chunks."""
    zs, lws = [], []
    for i in range(0, num, chunk):
        z, log_q, log_p = draws_and_log_densities(guide, min(chunk, num - i), *args)
        zs.append(z)
        lws.append(log_p - log_q)
    return torch.cat(zs), torch.cat(lws)


def _rounded(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def _row(method, **kw):
    return {"method": method, **_rounded(kw)}


def _stein_row(
    method,
    guide,
    exact,
    n,
    cfg,
    args=(),
    coords=None,
    regions=None,
    log_z_true=None,
    seconds=None,
    values=None,
    identified=None,
):
    """A fit with a density: k-hat, C2ST, log evidence on ``2 n`` draws; with ``regions = (labels_fn, true masses)``
    the mode masses from ``cfg["mass_draws"]`` further draws. ``values`` maps the packed draws to the space of
    ``exact`` (default: the identity); ``identified = (fn, exact draws)`` adds C2ST in the space ``fn`` maps to."""
    z, log_q, log_p = draws_and_log_densities(guide, 2 * n, *args)
    z = z.detach() if values is None else values(z.detach())
    lw = log_p - log_q
    khat = psis(lw)[1]
    log_z, se = log_evidence(lw)
    resampled = importance_resample(z, lw, n)
    sel = (lambda a: a) if coords is None else (lambda a: a[:, coords])
    row = _row(
        method,
        khat=float(khat),
        khat_defensive=_defensive_khat(guide, 2 * n, *args),
        **_large_sample_khats(guide, cfg, *args),
        c2st_psis=_c2st(sel(exact), sel(resampled)),
        c2st_raw=_c2st(sel(exact), sel(z[:n])),
        seconds=seconds,
    )
    if identified is not None:
        fn, ref = identified
        row["c2st_id_psis"], row["c2st_id_raw"] = _c2st(ref, fn(resampled)), _c2st(ref, fn(z[:n]))
        row = _rounded(row)
    if log_z_true is not None:
        row["log_z"], row["log_z_se"], row["log_z_error"] = float(log_z), float(se), float(log_z) - log_z_true
    if regions is not None:
        labels_fn, truth = regions
        zm, lwm = _many_draws(guide, cfg["mass_draws"], args)
        zm = zm if values is None else values(zm)
        smoothed, khat_m = psis(lwm)
        row.update(_rounded({**_mass_fields(labels_fn(zm), smoothed, truth), "khat_mass_draws": float(khat_m)}))
    return row


# ---------------------------------------------------------------------------------------------- parts
def run_gmm25(cfg):
    n = cfg["draws"]
    model = _factor_model(gmm25_logp, 2, 8.0)
    exact = gmm25_exact(n)
    regions = (_gmm_labels, torch.full((25,), 1 / 25, dtype=torch.float64))
    rows = []
    t = time.perf_counter()
    probe = AmortizedSteinGuide(model, whiten=None).setup()
    modes = find_modes(probe, num_starts=cfg["gmm_starts"], num_steps=cfg["gmm_search_steps"])
    guide = AmortizedSteinGuide(model, sampler=mixture_from_modes(modes, num_layers=2), whiten=None)
    fit_mixture(guide, num_steps=cfg["gmm_steps"], num_particles=32)
    seconds = time.perf_counter() - t
    rows.append(
        _stein_row(
            f"pyro_stein mixture of {modes.locs.shape[0]} mode searches (FlowSampler each)",
            guide,
            exact,
            n,
            cfg,
            regions=regions,
            log_z_true=0.0,
            seconds=seconds,
        )
    )
    t = time.perf_counter()
    tempered = Tempered(model)
    sampler = FlowSampler(2, num_layers=4, bins=16, bound=4.0, init_scale=8.0)
    guide = AmortizedSteinGuide(tempered, sampler=sampler, whiten=None, record_graph=False)
    svgd = AmortizedSVGD(tempered, guide, default_optim(cfg["anneal_steps"]), num_particles=256, record_graph=False)
    anneal(svgd, tempered, num_steps=cfg["anneal_steps"], anneal_fraction=0.8)
    rows.append(
        _stein_row(
            "pyro_stein annealed FlowSampler",
            guide,
            exact,
            n,
            cfg,
            regions=regions,
            log_z_true=0.0,
            seconds=time.perf_counter() - t,
        )
    )
    rows += _peers(model, exact, n, cfg, ["x"], regions=regions, log_z_true=0.0)
    return {"target": "gmm25", "rows": rows}


def _peers(model, exact, n, cfg, names, regions=None, log_z_true=None, coords=None):
    """Pyro's AutoNormal, AutoIAFNormal (masses from their ``2 n`` weighted draws) and NUTS (masses from counts)."""
    rows = []
    if not cfg["peers"]:
        return rows
    sel = (lambda a: a) if coords is None else (lambda a: a[:, coords])
    for kind in ("AutoNormal", "AutoIAFNormal"):
        t = time.perf_counter()
        g = _autoguide_fit(model, kind, cfg["svi_steps"])
        z, lw = _autoguide_draws(model, g, 2 * n, names)
        smoothed, khat = psis(lw)
        log_z, se = log_evidence(lw)
        row = _row(
            kind,
            khat=float(khat),
            c2st_psis=_c2st(sel(exact), sel(importance_resample(z, lw, n))),
            c2st_raw=_c2st(sel(exact), sel(z[:n])),
            seconds=time.perf_counter() - t,
        )
        # after the timing: the fit's seconds do not include this diagnostic's draws
        khat_large = _on_own_stream(lambda g=g: float(psis(_autoguide_draws(model, g, cfg["khat_draws"], names)[1])[1]))
        row["khat_large_sample"] = round(khat_large, 4)
        if log_z_true is not None:
            row["log_z"], row["log_z_se"], row["log_z_error"] = float(log_z), float(se), float(log_z) - log_z_true
        if regions is not None:
            row.update(_rounded(_mass_fields(regions[0](z), smoothed, regions[1])))
        rows.append(row)
    t = time.perf_counter()
    warm, num = cfg["nuts"]
    z = _nuts(model, warm, num, names)
    # as many exact draws as NUTS draws: with unequal classes C2ST's floor is the majority share, not 0.5
    seconds = time.perf_counter() - t
    row = _row("NUTS (1 chain)", c2st_raw=_c2st(sel(exact[: len(z)]), sel(z), early_stopping=False), seconds=seconds)
    if regions is not None:
        row.update(_rounded(_mass_fields(regions[0](z), None, regions[1], independent=False)))
    rows.append(row)
    return rows


def run_funnel(cfg):
    n = cfg["draws"]
    exact = funnel_exact(n)
    rows = []
    t = time.perf_counter()
    guide = AmortizedSteinGuide(funnel_model, sampler=FlowSampler(10, num_layers=4))
    AmortizedSVGD(funnel_model, guide, default_optim(cfg["funnel_steps"]), num_particles=64).run(
        num_steps=cfg["funnel_steps"]
    )
    # whiten="auto" finds the funnel's proper mode (far out at v = -40.5) and its centred sites, compares the Laplace
    # approximations of the model as written and non-centred by their ELBOs, and keeps the non-centred one; the draws
    # below are read back through the model either way
    z, log_q, log_p = draws_and_log_densities(guide, 2 * n)
    lw = log_p - log_q
    smoothed, khat = psis(lw)
    log_z, se = log_evidence(lw)
    values = guide.log_density.deterministic(z, ["v", "x"], (), {})
    vx = torch.cat([values["v"].reshape(-1, 1), values["x"].reshape(-1, 9)], -1)
    rows.append(
        _row(
            "pyro_stein FlowSampler (whiten='auto')",
            khat=float(khat),
            khat_defensive=_defensive_khat(guide, 2 * n),
            **_large_sample_khats(guide, cfg),
            c2st_psis=_c2st(exact[:, :2], importance_resample(vx, lw, n)[:, :2]),
            c2st_raw=_c2st(exact[:, :2], vx[:n, :2]),
            log_z=float(log_z),
            log_z_se=float(se),
            log_z_error=float(log_z),
            reparam_sites=list(guide.reparam_sites),
            seconds=time.perf_counter() - t,
        )
    )
    t = time.perf_counter()
    plain = AmortizedSteinGuide(funnel_model)  # no options: the default sampler (no density), driver defaults
    AmortizedSVGD(funnel_model, plain).run(num_steps=cfg["funnel_steps"], progress_bar=False)
    s = plain.sample_posterior(n)
    vx = torch.cat([s["v"].reshape(-1, 1), s["x"].reshape(-1, 9)], -1)
    rows.append(
        _row(
            f"AmortizedSteinGuide (default options, {cfg['funnel_steps']} steps)",
            c2st_raw=_c2st(exact[:, :2], vx[:, :2]),
            reparam_sites=list(plain.reparam_sites),
            seconds=time.perf_counter() - t,
        )
    )
    rows += _peers(funnel_model, exact, n, cfg, ["v", "x"], log_z_true=0.0, coords=[0, 1])
    return {"target": "funnel10", "rows": rows}


def run_manywell(cfg):
    n, D = cfg["draws"], 32
    log_z_true = manywell_log_z(D)
    exact = manywell_exact(n, D)
    model = _factor_model(manywell_logp, D, 2.0)
    rows = []
    for name, annealed, refine in (
        ("pyro_stein FlowSampler (Laplace frame, one mode)", False, False),
        ("pyro_stein annealed FlowSampler", True, False),
        ("pyro_stein annealed FlowSampler (4 layers, 16 bins) + elbo_refine", True, True),
    ):
        t = time.perf_counter()
        m = Tempered(model) if annealed else model
        size = dict(num_layers=4, bins=16) if refine else dict(num_layers=2, bins=8)
        sampler = FlowSampler(D, **size, init_scale=2.0 if annealed else 1.0)
        guide = AmortizedSteinGuide(
            m, sampler=sampler, whiten=None if annealed else "laplace", record_graph=not annealed
        )
        svgd = AmortizedSVGD(m, guide, default_optim(cfg["mw_steps"]), num_particles=128, record_graph=not annealed)
        if annealed:
            anneal(svgd, m, num_steps=cfg["mw_steps"], anneal_fraction=0.7)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                svgd.run(num_steps=cfg["mw_steps"])
        if refine:  # the masses of the wells annealing found: maximise the ELBO on the flow's density
            elbo_refine(guide, num_steps=cfg["mw_refine_steps"])
        row = _stein_row(name, guide, exact, n, cfg, log_z_true=log_z_true, seconds=time.perf_counter() - t)
        z, _, _ = draws_and_log_densities(guide, n)
        row["left_well_fraction"] = round(float((z[:, 0::2] < 0).double().mean()), 4)
        rows.append(row)
    rows += _peers(
        model, exact, n, {**cfg, "nuts": (cfg["nuts"][0] // 2, cfg["nuts"][1] // 2)}, ["x"], log_z_true=log_z_true
    )
    truth = float((exact[:, 0::2] < 0).double().mean())
    return {
        "target": "manywell32",
        "log_z_true": round(log_z_true, 4),
        "left_well_fraction_true": round(truth, 4),
        "rows": rows,
    }


# the amortized sign-symmetric family
def sym_model(y):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(theta**2, 1.0).to_event(1), obs=y)


def sym_dataset(n_obs=20):
    theta = torch.empty(2).uniform_(0.7, 2.0) * torch.sign(torch.randn(2))
    return Dataset(theta**2 + torch.randn(n_obs, 2))


def _sym_grid(y):
    g = torch.linspace(-5.0, 5.0, 20001, dtype=torch.float64)
    lps = []
    for j in range(2):
        lp = dist.Normal(0.0, 2.0).log_prob(g) + dist.Normal(g[:, None] ** 2, 1.0).log_prob(y[:, j].double()).sum(-1)
        lps.append(lp)
    return g, lps


def sym_exact(y, n):
    g, lps = _sym_grid(y)
    return torch.stack([_grid_sample(g, lp, n) for lp in lps], -1)


def sym_log_z(y):
    g, lps = _sym_grid(y)
    dg = float(g[1] - g[0])
    return sum(float(torch.logsumexp(lp, 0)) + math.log(dg) for lp in lps)


def _orthant_labels(z):
    """The orthant of each draw: ``2 [theta_1 > 0] + [theta_2 > 0]``."""
    return (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()


def sym_orthant_masses(y):
    """The exact orthant masses of the sign-symmetric posterior, in :func:`_orthant_labels`' order: the posterior
    factorises over the two coordinates, and each coordinate's mass above 0 comes from its grid (the grid point at 0
    split evenly); by the sign symmetry every mass is 1/4 up to the grid's rounding."""
    g, lps = _sym_grid(y)
    pos = []
    for lp in lps:
        w = torch.exp(lp - lp.max())
        pos.append(float((w[g > 0].sum() + 0.5 * w[g == 0].sum()) / w.sum()))
    p1, p2 = pos
    return torch.tensor([(1 - p1) * (1 - p2), (1 - p1) * p2, p1 * (1 - p2), p1 * p2], dtype=torch.float64)


def run_symmetric(cfg):
    n = cfg["draws"]
    train = [sym_dataset() for _ in range(cfg["sym_train"])]
    test = [sym_dataset() for _ in range(cfg["sym_test"])]
    group = [([0, 1], [s0, s1]) for s0 in (1, -1) for s1 in (1, -1) if (s0, s1) != (1, 1)]
    context_dim = 16
    base = FlowSampler(2, context_dim=context_dim + 2, num_layers=2)  # + the 2 passed-through feature means
    sampler = SymmetrizedSampler(base, group)
    guide = AmortizedSteinGuide(
        sym_model, amortized=Amortization(context_dim=context_dim, mean_features=True), whiten=None, sampler=sampler
    )
    svgd = AmortizedSVGD(sym_model, guide, default_optim(cfg["sym_steps"]), num_particles=64)
    t = time.perf_counter()
    sampler.symmetrize = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svgd.run(datasets=train, num_steps=cfg["sym_steps"], batch_size=min(16, len(train)))
    seconds = time.perf_counter() - t
    per_dataset = []
    for i, d in enumerate(test):
        y = d.args[0]
        exact = sym_exact(y, n)
        log_z_true = sym_log_z(y)
        truth = sym_orthant_masses(y)
        for variant, symmetrize in (("base flow", False), ("symmetrized flow", True)):
            sampler.symmetrize = symmetrize
            z, log_q, log_p = draws_and_log_densities(guide, 2 * n, y)
            lw = log_p - log_q
            row = {
                "dataset": i,
                "variant": variant,
                "khat": float(psis(lw)[1]),
                "c2st_raw": _c2st(exact, z[:n], seed=i),
                "c2st_psis": _c2st(exact, importance_resample(z, lw, n), seed=i),
                "log_z_error": float(log_evidence(lw)[0]) - log_z_true,
                "khat_defensive": _defensive_khat(guide, 2 * n, y),
                **_large_sample_khats(guide, cfg, y),
            }
            zm, lwm = _many_draws(guide, cfg["mass_draws"], (y,))
            row.update(_mass_fields(_orthant_labels(zm), psis(lwm)[0], truth))
            row["modes_true"] = 4
            per_dataset.append(_rounded(row))
    sampler.symmetrize = True
    return {"target": "symmetric", "train_seconds": round(seconds, 1), "per_dataset": per_dataset}


# the Gaussian mixture model with unknown means: K! label-switched modes
MIX_K = 3
MIX_MEANS = (-2.5, 0.0, 2.5)
MIX_PRIOR_SD = 3.0
MIX_N = 60
MIX_PERMS = list(itertools.permutations(range(MIX_K)))
MIX_BOX = 4.5  # the exact posterior's grid covers [-MIX_BOX, MIX_BOX]^K (the data lie within about +-4.5)


class OrderedIIDNormal(dist.TorchDistribution):
    """``k`` independent ``N(0, scale^2)`` draws, sorted: density ``k! prod_i N(x_i; 0, scale^2)`` on
    ``x_1 < ... < x_k``. Its support is ``constraints.ordered_vector``, so a guide works in the unconstrained space of
    ``OrderedTransform``."""

    arg_constraints = {}
    support = constraints.ordered_vector

    def __init__(self, scale: float, k: int, validate_args=None):
        self.scale, self.k = float(scale), int(k)
        super().__init__(torch.Size(), torch.Size([self.k]), validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        return (self.scale * torch.randn(torch.Size(sample_shape) + self.event_shape)).sort(-1).values

    def log_prob(self, x):
        return dist.Normal(0.0, self.scale).log_prob(x).sum(-1) + math.lgamma(self.k + 1)


def _mix_likelihood(mu, y):
    with pyro.plate("data", y.shape[0]):
        comps = dist.Normal(mu, 1.0)
        pyro.sample("y", dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(MIX_K)), comps), obs=y)


def mix_model(y):
    """``mu_k ~ N(0, 3^2)`` (k = 1..3), ``y_i ~ sum_k 1/3 N(mu_k, 1)``: invariant under relabelling the ``mu_k``."""
    _mix_likelihood(pyro.sample("mu", dist.Normal(torch.zeros(MIX_K), MIX_PRIOR_SD).to_event(1)), y)


def mix_model_ordered(y):
    """The same model with the ordering constraint ``mu_1 < mu_2 < mu_3`` (the same posterior up to labels)."""
    _mix_likelihood(pyro.sample("mu", OrderedIIDNormal(MIX_PRIOR_SD, MIX_K)), y)


def mix_data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor(MIX_MEANS, dtype=torch.float64)
    return means[torch.arange(MIX_N) % MIX_K] + torch.randn(MIX_N, generator=g, dtype=torch.float64)


def mix_exact_grid(y, step: float):
    """The exact posterior on the ordered cells ``mu_1 < mu_2 < mu_3`` of a grid of width ``step`` over the box (the
    other orderings are its relabellings): ``(cell centres (M, K), log p (M,), log Z)`` with ``Z`` the evidence of the
    unordered model (``K!`` times the ordered region's integral)."""
    g = torch.arange(-MIX_BOX, MIX_BOX + step / 2, step, dtype=torch.float64)
    dens = torch.exp(dist.Normal(g[:, None], 1.0).log_prob(y.double()))  # (G, n): N(y_i; g_j, 1)
    idx = torch.combinations(torch.arange(len(g)), MIX_K)
    lps = []
    for c in idx.split(50000):
        lik = torch.log(dens[c].sum(1) / MIX_K).sum(-1)
        lps.append(lik + dist.Normal(0.0, MIX_PRIOR_SD).log_prob(g[c]).sum(-1))
    lp = torch.cat(lps)
    log_z = float(torch.logsumexp(lp, 0)) + MIX_K * math.log(step) + math.lgamma(MIX_K + 1)
    return g[idx], lp, log_z


def mix_exact(cells, lp, n: int, step: float):
    """Exact draws: ``(sorted (n, K), randomly relabelled (n, K))``."""
    i = torch.multinomial(torch.exp(lp - lp.max()), n, replacement=True)
    ordered = (cells[i] + step * (torch.rand(n, MIX_K, dtype=cells.dtype) - 0.5)).sort(-1).values
    return ordered, _relabel(ordered)


def _relabel(z):
    """Each row's labels permuted at random."""
    return torch.gather(z, -1, torch.argsort(torch.rand(z.shape, dtype=torch.float64), -1).to(z.device))


def _ordering_labels(z):
    """The label-switched mode of each draw: the index in ``MIX_PERMS`` of the permutation that sorts it."""
    powers = MIX_K ** torch.arange(MIX_K)
    table = torch.full((MIX_K**MIX_K,), -1, dtype=torch.long)
    for j, perm in enumerate(MIX_PERMS):
        table[int((torch.tensor(perm) * powers).sum())] = j
    return table[(torch.argsort(z, -1) * powers).sum(-1)]


def _sorted(z):
    return z.sort(-1).values


def run_mixture(cfg):
    n, steps = cfg["draws"], cfg["mix_steps"]
    y = mix_data()
    t = time.perf_counter()
    cells, lp, log_z_true = mix_exact_grid(y, cfg["mix_grid"])
    exact_sorted, exact = mix_exact(cells, lp, n, cfg["mix_grid"])
    grid_seconds = time.perf_counter() - t
    num_modes = len(MIX_PERMS)
    regions = (_ordering_labels, torch.full((num_modes,), 1 / num_modes, dtype=torch.float64))
    identified = (_sorted, exact_sorted)
    to_ordered = biject_to(constraints.ordered_vector)
    rows = []

    def fit(model, guide):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short runs' health warnings
            AmortizedSVGD(model, guide, default_optim(steps), num_particles=64).run(y, num_steps=steps)

    # (a) the default guide
    t = time.perf_counter()
    guide = AmortizedSteinGuide(mix_model)
    fit(mix_model, guide)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        z = guide.sample_posterior(max(n, cfg["mass_draws"]), y)["mu"]
    row = _row(
        "pyro_stein default guide",
        c2st_raw=_c2st(exact, z[:n]),
        c2st_id_raw=_c2st(exact_sorted, _sorted(z[:n])),
        seconds=seconds,
    )
    rows.append({**row, **_rounded(_mass_fields(_ordering_labels(z), None, regions[1]))})

    # a FlowSampler in the Laplace frame of one mode
    t = time.perf_counter()
    guide = AmortizedSteinGuide(mix_model, sampler=FlowSampler(MIX_K, num_layers=2))
    fit(mix_model, guide)
    kw = {"args": (y,), "regions": regions, "log_z_true": log_z_true, "identified": identified}

    def stein_row(name, guide, seconds):  # a fit with a density on the unordered model, with its mode masses
        rows.append(_stein_row(name, guide, exact, n, cfg, seconds=seconds, **kw))

    stein_row("pyro_stein FlowSampler (Laplace frame, one mode)", guide, time.perf_counter() - t)

    # mode searches: one mode starts (b), all of them make (d)
    t = time.perf_counter()
    probe = AmortizedSteinGuide(mix_model, whiten=None).setup(y)
    modes = find_modes(probe, y, num_starts=cfg["mix_starts"], num_steps=cfg["gmm_search_steps"])
    search_seconds = time.perf_counter() - t

    # (b) a FlowSampler at the best mode, averaged over the K! relabellings
    t = time.perf_counter()
    group = [(perm, [1.0] * MIX_K) for perm in MIX_PERMS[1:]]
    base = FlowSampler(MIX_K, num_layers=2, init_loc=modes.locs[0], init_scale=modes.scale_trils[0])
    sampler = SymmetrizedSampler(base, group)
    guide = AmortizedSteinGuide(mix_model, sampler=sampler, whiten=None)
    sampler.symmetrize = False  # train the base alone, in its mode
    fit(mix_model, guide)
    sampler.symmetrize = True
    stein_row(
        f"pyro_stein SymmetrizedSampler ({num_modes} relabellings of a FlowSampler)",
        guide,
        search_seconds + time.perf_counter() - t,
    )

    # (d) a mixture of one FlowSampler per mode found
    t = time.perf_counter()
    guide = AmortizedSteinGuide(mix_model, sampler=mixture_from_modes(modes, num_layers=2), whiten=None)
    fit_mixture(guide, y, num_steps=max(2, steps // 2), num_particles=32)
    stein_row(
        f"pyro_stein mixture of {modes.locs.shape[0]} mode searches (FlowSampler each)",
        guide,
        search_seconds + time.perf_counter() - t,
    )

    # (c) the ordering constraint: one mode; the draws relabelled at random for the unordered comparison
    t = time.perf_counter()
    guide = AmortizedSteinGuide(mix_model_ordered)
    fit(mix_model_ordered, guide)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        z = guide.sample_posterior(n, y)["mu"]
    rows.append(
        _row(
            "pyro_stein default guide, ordered model",
            c2st_raw=_c2st(exact, _relabel(z)),
            c2st_id_raw=_c2st(exact_sorted, z),
            seconds=seconds,
        )
    )
    t = time.perf_counter()
    guide = AmortizedSteinGuide(mix_model_ordered, sampler=FlowSampler(MIX_K, num_layers=2))
    fit(mix_model_ordered, guide)
    rows.append(
        _stein_row(
            "pyro_stein FlowSampler, ordered model",
            guide,
            exact,
            n,
            cfg,
            seconds=time.perf_counter() - t,
            args=(y,),
            log_z_true=log_z_true,
            identified=identified,
            values=lambda u: _relabel(to_ordered(u)),
        )
    )
    if cfg["peers"]:
        warm, num = cfg["nuts"]
        for name, model in (("NUTS (1 chain)", mix_model), ("NUTS (1 chain), ordered model", mix_model_ordered)):
            t = time.perf_counter()
            mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=num, warmup_steps=warm, disable_progbar=True)
            mcmc.run(y)
            z = mcmc.get_samples()["mu"]
            m = len(z)  # as many exact draws as NUTS draws (balanced classes)
            seconds = time.perf_counter() - t
            zz = z if model is mix_model else _relabel(z)
            row = _row(name, c2st_raw=_c2st(exact[:m], zz, early_stopping=False), seconds=seconds)
            row["c2st_id_raw"] = round(_c2st(exact_sorted[:m], _sorted(z), early_stopping=False), 4)
            if model is mix_model:
                row.update(_rounded(_mass_fields(_ordering_labels(z), None, regions[1], independent=False)))
            rows.append(row)
    return {
        "target": "mixture3",
        "log_z_true": round(log_z_true, 4),
        "modes_true": num_modes,
        "modes_from_searches": int(modes.locs.shape[0]),
        "exact_grid_step": cfg["mix_grid"],
        "exact_grid_seconds": round(grid_seconds, 1),
        "rows": rows,
    }


def mix_amortized_dataset():
    """A dataset of the mixture family: means ``c + (-d, 0, d)``, ``c ~ U(-0.5, 0.5)``, ``d ~ U(2, 3)``."""
    c, d = float(torch.rand(()) - 0.5), float(2 + torch.rand(()))
    means = torch.tensor([c - d, c, c + d], dtype=torch.float64)
    return Dataset(means[torch.arange(MIX_N) % MIX_K] + torch.randn(MIX_N, dtype=torch.float64))


def run_mixture_amortized(cfg):
    """The mixture model amortized over datasets: a SymmetrizedSampler over the relabellings (unordered model) and a
    FlowSampler on the ordered model, scored per held-out dataset against its exact posterior."""
    n, steps = cfg["draws"], cfg["sym_steps"]
    train = [mix_amortized_dataset() for _ in range(cfg["sym_train"])]
    test = [mix_amortized_dataset() for _ in range(cfg["sym_test"])]
    context_dim = 16
    group = [(perm, [1.0] * MIX_K) for perm in MIX_PERMS[1:]]
    num_modes = len(MIX_PERMS)
    truth = torch.full((num_modes,), 1 / num_modes, dtype=torch.float64)
    to_ordered = biject_to(constraints.ordered_vector)
    fits = {}
    for variant, model in (("symmetrized flow", mix_model), ("ordered model, flow", mix_model_ordered)):
        # the ordered model has one mode: each dataset's Laplace frame (its summary, loc and the scale's diagonal, is
        # passed to the sampler too); the symmetrized flow must act on the relabellings of the latents (no frame)
        whiten = None if model is mix_model else "laplace"
        extra = 1 + (0 if whiten is None else 2 * MIX_K)  # the passed-through data mean (+ the frame summary)
        base = FlowSampler(MIX_K, context_dim=context_dim + extra, num_layers=2)
        sampler = SymmetrizedSampler(base, group) if model is mix_model else base
        amortization = Amortization(context_dim=context_dim, mean_features=True)
        guide = AmortizedSteinGuide(model, amortized=amortization, whiten=whiten, sampler=sampler)
        svgd = AmortizedSVGD(model, guide, default_optim(steps), num_particles=64)
        t = time.perf_counter()
        if model is mix_model:
            sampler.symmetrize = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            svgd.run(datasets=train, num_steps=steps, batch_size=min(16, len(train)))
        if model is mix_model:
            sampler.symmetrize = True
        fits[variant] = (guide, model, time.perf_counter() - t)
    # the ordered model's flow refined on the ELBO over the same datasets: the Stein direction leaves it too narrow
    guide, model, seconds = fits["ordered model, flow"]
    refined = guide.copy()
    refined.param_prefix = f"{guide.param_prefix}_elbo"
    t = time.perf_counter()
    steps = cfg["mix_refine_steps"]
    _on_own_stream(
        lambda: elbo_refine(refined, datasets=train, num_steps=steps, batch_size=16, num_samples=64, lr=2e-3)
    )
    fits["ordered model, flow + elbo_refine"] = (refined, model, seconds + time.perf_counter() - t)
    per_dataset = []
    for i, d in enumerate(test):
        y = d.args[0]
        cells, lp, log_z_true = mix_exact_grid(y, cfg["mix_grid"])
        exact_sorted, exact = mix_exact(cells, lp, n, cfg["mix_grid"])
        exact_sd = _on_own_stream(partial(mix_exact, cells, lp, 2 * cfg["khat_draws"], cfg["mix_grid"]))[0].std(0)
        for variant, (guide, model, _) in fits.items():
            z, log_q, log_p = draws_and_log_densities(guide, 2 * n, y)
            z = z.detach() if model is mix_model else _relabel(to_ordered(z.detach()))
            lw = log_p - log_q
            resampled = importance_resample(z, lw, n)
            row = {
                "dataset": i,
                "variant": variant,
                "khat": float(psis(lw)[1]),
                "c2st_raw": _c2st(exact, z[:n], seed=i),
                "c2st_psis": _c2st(exact, resampled, seed=i),
                "c2st_id_psis": _c2st(exact_sorted, _sorted(resampled), seed=i),
                "log_z_error": float(log_evidence(lw)[0]) - log_z_true,
                "khat_defensive": _defensive_khat(guide, 2 * n, y),
                **_large_sample_khats(guide, cfg, y),
                "sd_ratio_min": _sd_ratio_min(guide, model, cfg["khat_draws"], y, exact_sd),
            }
            if model is mix_model:
                zm, lwm = _many_draws(guide, cfg["mass_draws"], (y,))
                fields = _mass_fields(_ordering_labels(zm), psis(lwm)[0], truth)
                row.update({k: v for k, v in fields.items() if k != "masses_se"})
                row["modes_true"] = num_modes
            per_dataset.append(_rounded(row))
    return {
        "target": "mixture3_amortized",
        "train_datasets": len(train),
        "train_seconds": {k: round(v[2], 1) for k, v in fits.items()},
        "per_dataset": per_dataset,
    }


def _sd_ratio_min(guide, model, num: int, y, exact_sd) -> float:
    """The smallest ratio, over the sorted coordinates (the posterior up to labels), of the sd of ``num`` draws to
    the exact sd (below 1: the guide is too narrow), on a random stream of its own (:func:`_on_own_stream`)."""
    z = _on_own_stream(lambda: _many_draws(guide, num, (y,))[0])
    z = z if model is mix_model else biject_to(constraints.ordered_vector)(z)
    return float((_sorted(z).std(0) / exact_sd).min())


def _on_own_stream(fn):
    """``fn()`` on a random stream of its own: the global one is restored, so the other measurements do not depend
    on it."""
    rng = pyro.util.get_rng_state()
    try:
        return fn()
    finally:
        pyro.util.set_rng_state(rng)


def _large_sample_khats(guide, cfg, *args) -> dict:
    """k-hat of the guide's own weights and of the defensive mixture's (:data:`DEFENSIVE`), each from
    ``cfg["khat_draws"]`` draws, on a random stream of its own (:func:`_on_own_stream`)."""
    num = cfg["khat_draws"]
    return {
        "khat_large_sample": _on_own_stream(lambda: float(psis(_many_draws(guide, num, args)[1])[1])),
        "khat_defensive_large_sample": _defensive_khat(guide, num, *args),
    }


def _defensive_khat(guide, num_samples: int, *args) -> float:
    """k-hat of the guide's weights against the defensive mixture with the prior (:data:`DEFENSIVE` of the draws),
    on a random stream of its own (:func:`_on_own_stream`)."""
    return _on_own_stream(
        lambda: float(importance_diagnostics(guide, *args, num_samples=num_samples, defensive=DEFENSIVE).khat)
    )


def _confusion(pairs) -> dict:
    good = [p for p in pairs if p[2] <= 0.55]
    bad = [p for p in pairs if p[2] >= 0.7]
    return {
        "pairs": pairs,
        "good_total": len(good),
        "good_khat_ok": sum(p[3] <= KHAT_OK for p in good),
        "bad_total": len(bad),
        "bad_khat_high": sum(p[3] > KHAT_OK for p in bad),
        "middle_total": len(pairs) - len(good) - len(bad),
    }


def khat_confusion(results):
    """Pairs (C2ST of the raw draws, k-hat) of every fit with a density, and the detector's confusion table; under
    ``"defensive"``, the same for the fits scored with the defensive mixture too, for both k-hats; under
    ``"large_sample"``, all of it again with the k-hats from ``khat_draws`` draws."""
    keys = {"": ("khat", "khat_defensive"), "large_sample": ("khat_large_sample", "khat_defensive_large_sample")}
    out = {}
    for label, (own_key, def_key) in keys.items():
        pairs, plain, defensive = [], [], []
        for res in results:
            fits = [(r["method"], r) for r in res.get("rows", []) if own_key in r]
            fits += [(f"{r['variant']} #{r['dataset']}", r) for r in res.get("per_dataset", []) if own_key in r]
            for name, r in fits:
                pairs.append((res["target"], name, r["c2st_raw"], r[own_key]))
                if def_key in r:
                    plain.append(pairs[-1])
                    defensive.append(pairs[-1][:3] + (r[def_key],))
        table = _confusion(pairs)
        if defensive:
            table["defensive"] = {"own_draws": _confusion(plain), "defensive_mixture": _confusion(defensive)}
        if not label:
            out.update(table)
        elif pairs:
            out[label] = table
    return out


PARTS = {
    "gmm25": run_gmm25,
    "funnel": run_funnel,
    "manywell": run_manywell,
    "symmetric": run_symmetric,
    "mixture": run_mixture,
    "mixture_amortized": run_mixture_amortized,
}


NOTES = {
    "gmm25": (
        "Mode masses: self-normalized Pareto-smoothed importance weights of `mass_draws` draws (counts for NUTS), "
        "each draw assigned to the nearest mean; true mass 0.04 each. `max_mass_rel_error` is the largest of the 25 "
        "relative errors `|m_k - 0.04| / 0.04`, with the Monte Carlo standard error of that mode's estimate (delta "
        "method; none for NUTS, whose draws are correlated)."
    ),
    "symmetric": (
        "Exact orthant masses by quadrature per coordinate (a quarter each, by the sign symmetry); masses from "
        "`mass_draws` weighted draws per dataset, the largest relative error with its Monte Carlo standard error; "
        "a mode is found when the raw draws give it at least 10 % of its true mass."
    ),
    "mixture3_amortized": (
        "The mixture model amortized over datasets with means `c + (-d, 0, d)`, `c ~ U(-0.5, 0.5)`, `d ~ U(2, 3)`, 60 "
        "points each; held-out datasets scored against their exact posteriors (grid). Masses from `mass_draws` "
        "weighted draws per dataset; the ordered model's draws relabelled at random for `c2st_raw`/`c2st_psis`. "
        "`elbo_refine`: the ordered model's Stein-trained flow refined on the ELBO over the training datasets "
        "(`mix_refine_steps` steps of 16 datasets and 64 draws each, learning rate 2e-3); its training time includes "
        "the Stein training. The sd ratio: the smallest, over the sorted coordinates, of the draws' sd over the exact "
        "sd (`khat_draws` draws each)."
    ),
    "mixture3": (
        "`y_i ~ 1/3 sum_k N(mu_k, 1)`, 60 points around -2.5, 0, 2.5, `mu_k ~ N(0, 3^2)`: 6 label-switched modes of "
        "mass 1/6 each (a mode = the ordering of the `mu_k`). Exact reference and log Z on a grid. `c2st_*`: in the "
        "unordered space (the ordered model's draws relabelled at random); `c2st_id_*`: the draws sorted, against "
        "the sorted exact draws (the posterior up to labels). The ordered model has one mode by construction "
        "(no masses). Masses as for gmm25."
    ),
}


def _cell(r: dict, c: str) -> str:
    v = r.get(c, "")
    if c == "max_mass_rel_error" and "max_mass_rel_error_se" in r:
        return f"{v:.3f} ± {r['max_mass_rel_error_se']:.3f}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2g}"
    return str(v)


def _confusion_lines(c: dict) -> list[str]:
    lines = [
        "| | k-hat <= 0.7 | k-hat > 0.7 |",
        "|---|---|---|",
        f"| good fits (C2ST <= 0.55): {c['good_total']} | {c['good_khat_ok']} | "
        f"{c['good_total'] - c['good_khat_ok']} |",
        f"| bad fits (C2ST >= 0.7): {c['bad_total']} | {c['bad_total'] - c['bad_khat_high']} | {c['bad_khat_high']} |",
        "",
        f"Fits in between (0.55 < C2ST < 0.7): {c['middle_total']}.",
        "",
    ]
    if "defensive" in c:
        lines += [
            f"This library's guides (every fit above but the peers'), k-hat of the guide's own draws against k-hat "
            f"of the defensive mixture with the prior ({DEFENSIVE:g} of the draws; "
            f"`importance_diagnostics(..., defensive={DEFENSIVE:g})`):",
            "",
            "| | own draws: k-hat <= 0.7 | own draws: k-hat > 0.7 | defensive: k-hat <= 0.7 | defensive: k-hat > 0.7 |",
            "|---|---|---|---|---|",
        ]
        own, dfn = c["defensive"]["own_draws"], c["defensive"]["defensive_mixture"]
        lines += [
            f"| good fits (C2ST <= 0.55): {own['good_total']} | {own['good_khat_ok']} | "
            f"{own['good_total'] - own['good_khat_ok']} | {dfn['good_khat_ok']} | "
            f"{dfn['good_total'] - dfn['good_khat_ok']} |",
            f"| bad fits (C2ST >= 0.7): {own['bad_total']} | {own['bad_total'] - own['bad_khat_high']} | "
            f"{own['bad_khat_high']} | {dfn['bad_total'] - dfn['bad_khat_high']} | {dfn['bad_khat_high']} |",
            "",
            f"Fits in between: {own['middle_total']}.",
            "",
        ]
    return lines


def report(out: dict) -> str:
    lines = ["# Multimodal targets", "", f"Configuration: `{out['mode']}`; draws per fit: {out['draws']}.", ""]
    for res in out["results"]:
        lines += [f"## {res['target']}", ""]
        if res["target"] in NOTES:
            lines += [NOTES[res["target"]], ""]
        if "rows" in res:
            extra = {k: v for k, v in res.items() if k not in ("rows", "target")}
            if extra:
                lines += [", ".join(f"{k} = {v}" for k, v in extra.items()), ""]
            cols = ["method", "c2st_raw", "c2st_psis", "c2st_id_raw", "c2st_id_psis", "khat", "khat_large_sample"]
            cols += ["log_z_error"]
            cols += ["log_z_se", "modes_found", "max_mass_rel_error", "mass_draws", "left_well_fraction", "seconds"]
            cols = [c for c in cols if any(c in r for r in res["rows"])]
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in res["rows"]:
                lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
        else:
            lines += [f"training: {res['train_seconds']} s", ""]
            for variant in dict.fromkeys(r["variant"] for r in res["per_dataset"]):
                rs = [r for r in res["per_dataset"] if r["variant"] == variant]

                def med(k, rs=rs):
                    return sorted(r[k] for r in rs)[len(rs) // 2]

                parts = []
                if "modes_found" in rs[0]:
                    all_modes = sum(r["modes_found"] == r["modes_true"] for r in rs)
                    within = sum(r["max_mass_rel_error"] <= 0.2 for r in rs)
                    worst = max(rs, key=lambda r: r["max_mass_rel_error"])
                    se = f" ± {worst['max_mass_rel_error_se']}" if "max_mass_rel_error_se" in worst else ""
                    parts.append(
                        f"every mode found on {all_modes}/{len(rs)} held-out datasets; masses within 20% on "
                        f"{within}/{len(rs)} (largest relative error {worst['max_mass_rel_error']}{se})"
                    )
                parts.append(f"median C2ST raw {med('c2st_raw')}, PSIS {med('c2st_psis')}")
                if "c2st_id_psis" in rs[0]:
                    parts.append(f"up to labels (sorted) {med('c2st_id_psis')}")
                parts.append(f"median k-hat {med('khat')}")
                if "khat_large_sample" in rs[0]:
                    parts.append(f"from {out.get('khat_draws')} draws {med('khat_large_sample')}")
                parts.append(f"median log Z error {med('log_z_error')}")
                if "sd_ratio_min" in rs[0]:
                    lo = min(r["sd_ratio_min"] for r in rs)
                    parts.append(f"smallest sd ratio (draws / exact) median {med('sd_ratio_min')}, min {lo}")
                lines.append(f"- {variant}: " + "; ".join(parts))
        lines.append("")
    c = out["khat_confusion"]
    lines += ["## k-hat as a detector", "", f"k-hat from {2 * out['draws']} draws per fit:", ""]
    lines += _confusion_lines(c)
    if "large_sample" in c:
        lines += [f"k-hat from {out.get('khat_draws')} draws per fit (each on a random stream of its own):", ""]
        lines += _confusion_lines(c["large_sample"])
    return "\n".join(lines)


def run(mode: str, out, only: str | None = None, seed: int = 0) -> dict:
    """Run the parts ``only`` (default all) in the ``smoke`` or ``quick`` configuration (``full`` runs ``quick``) and
    write ``multimodal[_smoke].json`` and ``.md`` into ``out``. The results of parts not run are kept from an existing
    JSON file of the same configuration."""
    mode = "smoke" if mode == "smoke" else "quick"
    cfg = CONFIG[mode]
    parts = [s.strip() for s in (only or ",".join(PARTS)).split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {bad}; choose from {list(PARTS)}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if mode == "smoke" else ""
    path = outdir / f"multimodal{suffix}.json"
    kept = {}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("mode") == mode:
            kept = {r["target"]: r for r in old["results"]}
    new = {}
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for part in parts:
            pyro.set_rng_seed(seed)
            pyro.clear_param_store()
            t = time.perf_counter()
            res = PARTS[part](cfg)
            new[res["target"]] = res
            print(f"{part}: {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        torch.set_default_dtype(dtype)
    order = ["gmm25", "funnel10", "manywell32", "symmetric", "mixture3", "mixture3_amortized"]
    merged = {**kept, **new}
    results = [merged[k] for k in order if k in merged] + [v for k, v in merged.items() if k not in order]
    result = {
        "mode": mode,
        "draws": cfg["draws"],
        "khat_draws": cfg["khat_draws"],
        "results": results,
        "khat_confusion": khat_confusion(results),
    }
    path.write_text(json.dumps(result, indent=1))
    (outdir / f"multimodal{suffix}.md").write_text(report(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multimodal", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", default=bool(os.environ.get("CI")))
    p.add_argument("--only", default=",".join(PARTS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        result = run("smoke" if a.smoke else "quick", a.out, only=a.only, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
