"""Multimodal and non-Gaussian targets: mode discovery, C2ST, mode masses, log evidence and Pareto k-hat.

``python -m benchmarks.multimodal [--smoke] [--only gmm25,funnel,manywell,symmetric] [--out DIR]``; with the environment
variable ``CI`` set the smoke configuration is the default. Writes ``multimodal.json`` and ``multimodal.md``.

Targets (exact draws and exact log evidence known):

* ``gmm25``: the 2-D mixture of 25 Gaussians (means on the grid ``{-10, -5, 0, 5, 10}^2``, variance 0.3, equal
  weights; Sendera et al. 2024), ``log Z = 0``.
* ``funnel``: Neal's funnel in 10 dimensions, ``v ~ N(0, 3^2)``, ``x_i | v ~ N(0, e^v)`` (9 of them), written as the
  Pyro model it is, ``log Z = 0``; C2ST on ``(v, x_1)``.
* ``manywell``: Many-Well in 32 dimensions, ``log p(x) = sum_{i=1}^{16} -x_{2i-1}^4 + 6 x_{2i-1}^2 + 0.5 x_{2i-1}
  - 0.5 x_{2i}^2`` (``2^16`` modes), exact ``log Z`` by quadrature.
* ``symmetric``: an amortized family with sign-symmetric modes, ``theta ~ N(0, 2^2 I_2)``, ``y_ij ~ N(theta_j^2, 1)``
  (four modes ``(+-a, +-b)`` per dataset); exact posteriors by quadrature per coordinate.

The first three are written as ``x ~ N(0, s0^2 I)`` plus ``pyro.factor(log p(x) - log N(x; 0, s0^2 I))``, so the
posterior is the target and the evidence its normalizing constant. Methods: ``pyro_stein`` rows as named; Pyro's
``AutoNormal`` and ``AutoIAFNormal`` (SVI, Trace_ELBO; log Z by importance sampling with their densities) and NUTS
(no density: no log Z, no k-hat). Mode masses come from the Pareto-smoothed importance weights of the guide's draws
(``pyro_stein`` rows and the autoguides) or from the draws' counts (NUTS). C2ST: ``benchmarks.metrics.c2st`` with
``early_stopping=True`` (not sbibm's exact definition), 1,000 draws (quick configuration) against as many exact
draws; the pyro_stein rows are scored on PSIS-resampled draws (``importance_sample_posterior``) and on the sampler's
raw draws.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from benchmarks.metrics import c2st
from pyro_stein import Amortization, AmortizedSteinGuide, AmortizedSVGD
from pyro_stein.data import Dataset
from pyro_stein.diagnostics import draws_and_log_densities
from pyro_stein.flows import FlowSampler, SymmetrizedSampler
from pyro_stein.importance import importance_resample, log_evidence, psis
from pyro_stein.infer import default_optim
from pyro_stein.modes import Tempered, anneal, find_modes, fit_mixture, mixture_from_modes

CONFIG = {
    "smoke": {
        "draws": 300,
        "gmm_starts": 60,
        "gmm_steps": 5,
        "anneal_steps": 5,
        "funnel_steps": 5,
        "mw_steps": 5,
        "svi_steps": 5,
        "nuts": (20, 20),
        "sym_train": 4,
        "sym_steps": 5,
        "sym_test": 2,
    },
    "quick": {
        "draws": 1000,
        "gmm_starts": 200,
        "gmm_steps": 200,
        "anneal_steps": 1500,
        "funnel_steps": 800,
        "mw_steps": 800,
        "svi_steps": 1500,
        "nuts": (300, 500),
        "sym_train": 128,
        "sym_steps": 800,
        "sym_test": 10,
    },
}
KHAT_OK = 0.7


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


def _c2st(ref, x, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(c2st(ref, x, seed=seed, early_stopping=True))


def _gmm_masses(z, log_w=None):
    """Mass of each of the 25 modes (draws assigned to the nearest mean), weighted by normalized log weights."""
    idx = torch.cdist(z.double(), gmm25_means().double()).argmin(-1)
    w = torch.full((z.shape[0],), 1.0 / z.shape[0], dtype=torch.float64) if log_w is None else log_w.double().exp()
    return torch.zeros(25, dtype=torch.float64).index_add_(0, idx, w)


def _row(method, **kw):
    return {"method": method, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()}}


def _stein_row(method, guide, exact, n, args=(), coords=None, masses=None, log_z_true=None, seconds=None):
    z, log_q, log_p = draws_and_log_densities(guide, 2 * n, *args)
    lw = log_p - log_q
    smoothed, khat = psis(lw)
    log_z, se = log_evidence(lw)
    resampled = importance_resample(z, lw, n)
    sel = (lambda a: a) if coords is None else (lambda a: a[:, coords])
    row = _row(
        method,
        khat=float(khat),
        c2st_psis=_c2st(sel(exact), sel(resampled)),
        c2st_raw=_c2st(sel(exact), sel(z[:n])),
        seconds=seconds,
    )
    if log_z_true is not None:
        row["log_z"], row["log_z_se"], row["log_z_error"] = float(log_z), float(se), float(log_z) - log_z_true
    if masses is not None:
        m = masses(z, smoothed)
        row["masses"] = [round(float(v), 4) for v in m]
        row["modes_found"] = int((masses(z) > 0.004).sum())  # draws of the sampler itself in the mode
    return row


# ---------------------------------------------------------------------------------------------- parts
def run_gmm25(cfg):
    n = cfg["draws"]
    model = _factor_model(gmm25_logp, 2, 8.0)
    exact = gmm25_exact(n)
    rows = []
    t = time.perf_counter()
    probe = AmortizedSteinGuide(model, whiten=None).setup()
    modes = find_modes(probe, num_starts=cfg["gmm_starts"], num_steps=300)
    guide = AmortizedSteinGuide(model, sampler=mixture_from_modes(modes, num_layers=2), whiten=None)
    fit_mixture(guide, num_steps=cfg["gmm_steps"], num_particles=32)
    rows.append(
        _stein_row(
            f"pyro_stein mixture of {modes.locs.shape[0]} mode searches (FlowSampler each)",
            guide,
            exact,
            n,
            masses=_gmm_masses,
            log_z_true=0.0,
            seconds=time.perf_counter() - t,
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
            masses=_gmm_masses,
            log_z_true=0.0,
            seconds=time.perf_counter() - t,
        )
    )
    rows += _peers(model, exact, n, cfg, ["x"], masses=_gmm_masses, log_z_true=0.0)
    for r in rows:
        m = r.get("masses")
        if m is not None:
            r["max_mass_rel_error"] = round(max(abs(v - 0.04) / 0.04 for v in m), 4)
    return {"target": "gmm25", "rows": rows}


def _peers(model, exact, n, cfg, names, masses=None, log_z_true=None, coords=None):
    rows = []
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
        if log_z_true is not None:
            row["log_z"], row["log_z_se"], row["log_z_error"] = float(log_z), float(se), float(log_z) - log_z_true
        if masses is not None:
            row["masses"] = [round(float(v), 4) for v in masses(z, smoothed)]
            row["modes_found"] = int((masses(z) > 0.004).sum())
        rows.append(row)
    t = time.perf_counter()
    warm, num = cfg["nuts"]
    z = _nuts(model, warm, num, names)
    row = _row("NUTS (1 chain)", c2st_raw=_c2st(sel(exact), sel(z)), seconds=time.perf_counter() - t)
    if masses is not None:
        row["masses"] = [round(float(v), 4) for v in masses(z)]
        row["modes_found"] = int((masses(z) > 0.004).sum())
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
    # whiten="auto" non-centres the funnel only when the posterior has no proper mode; with v ~ N(0, 3^2) it has one
    # (far out at v = -40.5), so the guide's frame is a Laplace approximation there: the draws below are read back
    # through the model either way
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
            c2st_psis=_c2st(exact[:, :2], importance_resample(vx, lw, n)[:, :2]),
            c2st_raw=_c2st(exact[:, :2], vx[:n, :2]),
            log_z=float(log_z),
            log_z_se=float(se),
            log_z_error=float(log_z),
            reparam_sites=list(guide.reparam_sites),
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
    for name, annealed in (
        ("pyro_stein FlowSampler (Laplace frame, one mode)", False),
        ("pyro_stein annealed FlowSampler", True),
    ):
        t = time.perf_counter()
        m = Tempered(model) if annealed else model
        sampler = FlowSampler(D, num_layers=2, bins=8, init_scale=2.0 if annealed else 1.0)
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
        row = _stein_row(name, guide, exact, n, log_z_true=log_z_true, seconds=time.perf_counter() - t)
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


def _orthant_masses(z, log_w=None):
    idx = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    w = torch.full((z.shape[0],), 1.0 / z.shape[0], dtype=torch.float64) if log_w is None else log_w.double().exp()
    return torch.zeros(4, dtype=torch.float64).index_add_(0, idx, w)


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
        truth = _orthant_masses(exact)
        for variant, symmetrize in (("base flow", False), ("symmetrized flow", True)):
            sampler.symmetrize = symmetrize
            z, log_q, log_p = draws_and_log_densities(guide, 2 * n, y)
            lw = log_p - log_q
            smoothed, khat = psis(lw)
            masses = _orthant_masses(z, smoothed)
            raw = _orthant_masses(z)
            per_dataset.append(
                {
                    "dataset": i,
                    "variant": variant,
                    "khat": round(float(khat), 4),
                    "c2st_raw": round(_c2st(exact, z[:n], seed=i), 4),
                    "c2st_psis": round(_c2st(exact, importance_resample(z, lw, n), seed=i), 4),
                    "modes_found": int((raw > 0.02).sum()),
                    "modes_true": int((truth > 0.02).sum()),
                    "max_mass_rel_error": round(float(((masses - truth).abs() / truth.clamp_min(1e-3)).max()), 4),
                    "log_z_error": round(float(log_evidence(lw)[0]) - log_z_true, 4),
                }
            )
    sampler.symmetrize = True
    return {"target": "symmetric", "train_seconds": round(seconds, 1), "per_dataset": per_dataset}


def khat_confusion(results):
    """Pairs (C2ST of the raw draws, k-hat) of every fit with a density, and the detector's confusion table."""
    pairs = []
    for res in results:
        for r in res.get("rows", []):
            if "khat" in r:
                pairs.append((res["target"], r["method"], r["c2st_raw"], r["khat"]))
        for r in res.get("per_dataset", []):
            pairs.append((res["target"], f"{r['variant']} #{r['dataset']}", r["c2st_raw"], r["khat"]))
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


PARTS = {"gmm25": run_gmm25, "funnel": run_funnel, "manywell": run_manywell, "symmetric": run_symmetric}


def report(out: dict) -> str:
    lines = ["# Multimodal targets", "", f"Configuration: `{out['mode']}`; draws per fit: {out['draws']}.", ""]
    for res in out["results"]:
        lines += [f"## {res['target']}", ""]
        if "rows" in res:
            extra = {k: v for k, v in res.items() if k not in ("rows", "target")}
            if extra:
                lines += [", ".join(f"{k} = {v}" for k, v in extra.items()), ""]
            cols = ["method", "c2st_raw", "c2st_psis", "khat", "log_z_error", "log_z_se", "modes_found"]
            cols += ["max_mass_rel_error", "left_well_fraction", "seconds"]
            cols = [c for c in cols if any(c in r for r in res["rows"])]
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in res["rows"]:
                lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
        else:
            lines += [f"training: {res['train_seconds']} s", ""]
            for variant in ("base flow", "symmetrized flow"):
                rs = [r for r in res["per_dataset"] if r["variant"] == variant]
                all_modes = sum(r["modes_found"] == r["modes_true"] for r in rs)
                within = sum(r["max_mass_rel_error"] <= 0.2 for r in rs)

                def med(k, rs=rs):
                    return sorted(r[k] for r in rs)[len(rs) // 2]

                lines.append(
                    f"- {variant}: every mode found on {all_modes}/{len(rs)} held-out datasets; masses within 20% on "
                    f"{within}/{len(rs)}; median C2ST raw {med('c2st_raw')}, PSIS {med('c2st_psis')}; median k-hat "
                    f"{med('khat')}; median log Z error {med('log_z_error')}"
                )
        lines.append("")
    c = out["khat_confusion"]
    lines += [
        "## k-hat as a detector",
        "",
        "| | k-hat <= 0.7 | k-hat > 0.7 |",
        "|---|---|---|",
        f"| good fits (C2ST <= 0.55): {c['good_total']} | {c['good_khat_ok']} | "
        f"{c['good_total'] - c['good_khat_ok']} |",
        f"| bad fits (C2ST >= 0.7): {c['bad_total']} | {c['bad_total'] - c['bad_khat_high']} | {c['bad_khat_high']} |",
        "",
        f"Fits in between (0.55 < C2ST < 0.7): {c['middle_total']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multimodal", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", default=bool(os.environ.get("CI")))
    p.add_argument("--only", default=",".join(PARTS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    mode = "smoke" if a.smoke else "quick"
    cfg = CONFIG[mode]
    torch.set_default_dtype(torch.float64)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    results = []
    for part in [s.strip() for s in a.only.split(",") if s.strip()]:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {list(PARTS)}")
        pyro.set_rng_seed(a.seed)
        pyro.clear_param_store()
        t = time.perf_counter()
        results.append(PARTS[part](cfg))
        print(f"{part}: {time.perf_counter() - t:.0f} s", flush=True)
    out = {"mode": mode, "draws": cfg["draws"], "results": results, "khat_confusion": khat_confusion(results)}
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if mode == "smoke" else ""
    (outdir / f"multimodal{suffix}.json").write_text(json.dumps(out, indent=1))
    (outdir / f"multimodal{suffix}.md").write_text(report(out))
    print(report(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
