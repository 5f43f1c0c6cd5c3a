"""Part 1: time per AmortizedSVGD step against a hand-written log density and Pyro's SVGD / SVI."""

from __future__ import annotations

import cProfile
import functools
import io
import math
import pstats
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD

from .report import machine_info, median_time, write_json

DTYPE = torch.float32
HALF_CAUCHY_SCALE = 5.0


# ------------------------------------------------------------------ models
def logreg(X, y=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


_REPO_PREFIX = str(Path(__file__).resolve().parents[1]) + "/"


def logreg_broadcast(X, y=None):
    """Same model written for pyro.infer.SVGD's particle plate (w has shape (P, 1, D) there)."""
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


def hierarchical(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(HALF_CAUCHY_SCALE)))
    with pyro.plate("groups", sigma.shape[-1]):
        theta_trans = pyro.sample("theta_trans", dist.Normal(sigma.new_tensor(0.0), 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)


def _logreg_data(N: int, D: int, g: torch.Generator, device):
    X = torch.randn(N, D, generator=g, dtype=DTYPE)
    w = torch.randn(D, generator=g, dtype=DTYPE) * 0.5
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return (X.to(device),), {"y": y.to(device)}


def make_data(seed: int = 0, device: str = "cpu"):
    """``{case name: (model name, args, kwargs)}``; on a GPU also logistic regressions with large N."""
    g = torch.Generator().manual_seed(seed)
    cases = {"logreg": ("logreg",) + _logreg_data(1000, 20, g, device)}
    G = 50
    sigma = 5.0 + 10.0 * torch.rand(G, generator=g, dtype=DTYPE)
    theta = 3.0 + 4.0 * torch.randn(G, generator=g, dtype=DTYPE)
    yh = theta + sigma * torch.randn(G, generator=g, dtype=DTYPE)
    cases["hierarchical"] = ("hierarchical", (sigma.to(device),), {"y": yh.to(device)})
    if torch.device(device).type == "cuda":
        for N in (100_000, 1_000_000):
            cases[f"logreg N={N:,}"] = ("logreg",) + _logreg_data(N, 20, g, device)
    return cases


# ------------------------------------------------------------------ hand-written log densities
class HandLogReg:
    """Unconstrained log joint + analytic score of ``logreg`` for particles ``u`` (n, D)."""

    def __init__(self, sites):
        (self.site,) = sites

    def log_density_and_score(self, u, args, kwargs, plates=None, check=True):
        (X,), y = args, kwargs["y"]
        u = u.detach()
        logits = u @ X.T  # (n, N)
        lp = (
            (y * logits - F.softplus(logits)).sum(-1)
            - 0.5 * (u * u).sum(-1)
            - 0.5 * u.shape[-1] * math.log(2 * math.pi)
        )
        score = (y - torch.sigmoid(logits)) @ X - u
        return lp, score


class HandHierarchical:
    """Unconstrained log joint (tau = exp(u_tau), + log|J|) and analytic score of ``hierarchical``."""

    def __init__(self, sites):
        self.off = {s.name: (s.offset, s.size) for s in sites}

    def _split(self, u, name):
        o, n = self.off[name]
        return u[:, o : o + n]

    def log_density_and_score(self, u, args, kwargs, plates=None, check=True):
        (sigma,), y = args, kwargs["y"]
        u = u.detach()
        mu, ut, tt = self._split(u, "mu"), self._split(u, "tau"), self._split(u, "theta_trans")
        tau = ut.exp()
        s = HALF_CAUCHY_SCALE
        theta = mu + tau * tt
        r = (y - theta) / sigma**2  # (n, G)
        c = 0.5 * math.log(2 * math.pi)
        lp = (
            -0.5 * (mu / 5.0) ** 2
            - math.log(5.0)
            - c
            + math.log(2 / (math.pi * s))
            - torch.log1p((tau / s) ** 2)
            + ut
            + (-0.5 * tt**2 - c).sum(-1, keepdim=True)
            + (-0.5 * (y - theta) ** 2 / sigma**2 - sigma.log() - c).sum(-1, keepdim=True)
        ).squeeze(-1)
        score = torch.empty_like(u)
        o, _ = self.off["mu"]
        score[:, o : o + 1] = -mu / 25.0 + r.sum(-1, keepdim=True)
        o, _ = self.off["tau"]
        dtau = -2 * tau / (s**2 + tau**2) + (r * tt).sum(-1, keepdim=True)
        score[:, o : o + 1] = tau * dtau + 1.0
        o, n = self.off["theta_trans"]
        score[:, o : o + n] = -tt + tau * r
        return lp, score


HAND = {"logreg": HandLogReg, "hierarchical": HandHierarchical}
MODELS = {"logreg": logreg, "hierarchical": hierarchical}
PYRO_SVGD_MODELS = {"logreg": logreg_broadcast, "hierarchical": hierarchical}


def _optim(steps: int = 3000):
    return pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": (1e-3 / 1e-2) ** (1 / steps)})


def _ours(model, args, kwargs, n, seed=0, record_graph=True):
    pyro.set_rng_seed(seed)
    guide = AmortizedSteinGuide(model)
    svgd = AmortizedSVGD(model, guide, _optim(), num_particles=n, record_graph=record_graph)
    svgd.step(*args, **kwargs)  # set up
    return guide, svgd


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _record(svgd, args, kwargs, device) -> dict:
    """Steps until the log density is recorded (``record_graph``, the default; see pyro_stein.graphs), so that
    the timed blocks all replay it; returns the status and the one-off cost of the recording step."""
    times = []
    for _ in range(40):
        _sync(device)
        t = time.perf_counter()
        svgd.step(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t)
        if svgd._log_density.graphs.status != "waiting":
            break
    ordinary = sorted(times[:-1])[len(times[:-1]) // 2] if len(times) > 1 else float("nan")
    return {
        "status": svgd._log_density.graphs.status,
        "steps": len(times) + 1,  # + the set-up step
        "recording_step_s": times[-1],
        "ordinary_step_s": ordinary,
    }


def _breakdown(guide, svgd, svgd_eager, hand, args, kwargs, n, repeats):
    """Median seconds of each phase of one step (same tensors as the step uses)."""
    from pyro_stein.stein import ksd_from_matrices, stein_direction_from_matrices

    z = guide.draw(n)
    zd = z.detach()
    out = {}
    out["draw (forward)"] = median_time(lambda: guide.draw(n), repeats, 5)["median_s"]
    out["log_density_and_score (Pyro model, recorded graph)"] = median_time(
        lambda: svgd._log_density.log_density_and_score(zd, args, kwargs), repeats, 5
    )["median_s"]
    out["log_density_and_score (Pyro model, vmap, not recorded)"] = median_time(
        lambda: svgd_eager._log_density.log_density_and_score(zd, args, kwargs), repeats, 5
    )["median_s"]
    out["log_density_and_score (hand-written)"] = median_time(
        lambda: hand.log_density_and_score(zd, args, kwargs), repeats, 5
    )["median_s"]
    score = hand.log_density_and_score(zd, args, kwargs)[1]

    def kern():
        km = svgd.kernel.matrices(zd)
        stein_direction_from_matrices(zd, score, km, True)
        ksd_from_matrices(zd, score, km)

    out["kernel + Stein direction + KSD"] = median_time(kern, repeats, 5)["median_s"]

    def back():
        zz = guide.draw(n)
        loss = -(zz * score).sum(-1).mean()
        loss.backward()
        for p in guide.parameters():
            p.grad = None

    out["draw + backward"] = median_time(back, repeats, 5)["median_s"]
    return out


def _profile(model_name, args, kwargs, n, steps):
    guide, svgd = _ours(MODELS[model_name], args, kwargs, n)
    _record(svgd, args, kwargs, args[0].device)  # profile the recorded steps, not the one-off recording
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        svgd.step(*args, **kwargs)
    prof.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in st.stats.items():
        short = file.split("site-packages/")[-1].split(_REPO_PREFIX)[-1]  # package-relative, no machine path
        rows.append({"function": f"{short}:{line}({fn})", "ncalls": nc, "tottime": tt, "cumtime": ct})
    by_cum = sorted(rows, key=lambda r: -r["cumtime"])
    by_tot = sorted(rows, key=lambda r: -r["tottime"])
    return {"model": model_name, "steps": steps, "total_s": total, "top": by_cum[:10], "top_tottime": by_tot[:10]}


def run(mode: str, out: Path, device: str = "cpu") -> dict:
    """Time the step of each case on ``device``; writes ``step_cost.json`` (CPU) or ``step_cost_<type>.json``."""
    t_start = time.perf_counter()
    n = 128
    repeats, inner = {"smoke": (3, 2), "quick": (5, 5), "full": (15, 10)}[mode]
    dev = torch.device(device)
    data = make_data(device=device)
    result = {
        "mode": mode,
        "dtype": str(DTYPE),
        "num_particles": n,
        "device": str(dev),
        "models": {},
        "machine": machine_info(dev),
    }
    for name, (model_name, args, kwargs) in data.items():
        model = MODELS[model_name]
        hand_cls, psvgd_model = HAND[model_name], PYRO_SVGD_MODELS[model_name]
        guide, svgd = _ours(model, args, kwargs, n)
        recording = _record(svgd, args, kwargs, device)
        # the same without recording: every step runs the Pyro model under vmap
        _, svgd_eager = _ours(model, args, kwargs, n, record_graph=False)
        # (a): identical driver, sampler, kernel, Stein direction and optimizer; only the log density is hand-written
        guide_a, svgd_a = _ours(model, args, kwargs, n)
        hand = hand_cls(guide_a.sites)
        svgd_a._log_density = hand
        z = guide.draw(n).detach()
        lp_ref, sc_ref = svgd._log_density.log_density_and_score(z, args, kwargs)
        lp_h, sc_h = hand.log_density_and_score(z, args, kwargs)
        check = {
            "max_abs_logp_diff": float((lp_ref - lp_h).abs().max()),
            "max_rel_score_diff": float((sc_ref - sc_h).abs().max() / sc_ref.abs().max()),
        }
        # (b) pyro.infer.SVGD and (c) SVI
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        timings = {}
        timed = {"ours": svgd, "handwritten": svgd_a, "ours_not_recorded": svgd_eager}
        for key, driver in timed.items():
            timings[key] = median_time(functools.partial(driver.step, *args, **kwargs), repeats, inner)
        # interleave once more so that machine-load drift affects all alike; keep the medians of both rounds
        for key, driver in timed.items():
            again = median_time(functools.partial(driver.step, *args, **kwargs), repeats, inner, warmup=1)
            timings[key]["median_s"] = (timings[key]["median_s"] + again["median_s"]) / 2
        try:
            pyro.clear_param_store()
            psvgd = pyro.infer.SVGD(
                psvgd_model,
                pyro.infer.RBFSteinKernel(),
                pyro.optim.Adam({"lr": 1e-2}),
                num_particles=n,
                max_plate_nesting=1,
            )
            timings["pyro_svgd"] = median_time(functools.partial(psvgd.step, *args, **kwargs), repeats, inner)
        except Exception as e:  # noqa: BLE001
            timings["pyro_svgd"] = None
            result.setdefault("errors", []).append(f"pyro SVGD {name}: {type(e).__name__}: {e}")
        pyro.clear_param_store()
        svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        timings["svi_autonormal"] = median_time(functools.partial(svi.step, *args, **kwargs), repeats, inner)
        pyro.clear_param_store()
        result["models"][name] = {
            "latent_dim": guide.latent_dim,
            "timings": timings,
            "ratio_ours_over_handwritten": timings["ours"]["median_s"] / timings["handwritten"]["median_s"],
            "ratio_not_recorded_over_handwritten": timings["ours_not_recorded"]["median_s"]
            / timings["handwritten"]["median_s"],
            "recording": recording,
            "handwritten_check": check,
            "breakdown": _breakdown(guide, svgd, svgd_eager, hand, args, kwargs, n, repeats),
            "vectorize_mode": getattr(svgd._log_density, "_mode", None),
        }
    _, args, kwargs = data["logreg"]
    result["profile"] = _profile("logreg", args, kwargs, n, {"smoke": 5, "quick": 20, "full": 50}[mode])
    result["notes"] = (
        "Logistic regression: N = 1000 rows (on a GPU also 10^5 and 10^6 rows), D = 20, synthetic data; "
        "hierarchical: eight-schools-like non-centred model "
        "with 50 groups (D = 52). (a) is the same AmortizedSVGD driver (same sampler network, kernel, Stein "
        "direction, KSD diagnostic, optimizer) with `_log_density` replaced by a hand-written, vectorized torch log "
        "density with an analytic score; its agreement with the Pyro model is checked (`handwritten_check` in the "
        "JSON). (b) uses the same logistic model written with `(X * w).sum(-1)` because pyro.infer.SVGD's particle "
        "plate gives `w` the shape (P, 1, D), for which `X @ w` is wrong. Timings: ours, ours not recorded and (a) "
        f"are measured twice, interleaved, and the two medians averaged; {repeats} blocks of {inner} steps each. "
        "'ours' is the default driver, which records the model's log density and score as a graph after 20 steps on "
        "the same data and replays it (a CUDA graph on a GPU; `record_graph`, see pyro_stein.graphs); the timed "
        "blocks start after the recording, whose one-off cost is reported. 'ours, not recorded' is "
        "`record_graph=False`: the Pyro model runs under vmap every step."
    )
    result["wall_s"] = time.perf_counter() - t_start
    write_json(out, "step_cost" if dev.type == "cpu" else f"step_cost_{dev.type}", result)
    return result
