"""An amortized family with a heavy-tailed likelihood: regression with Cauchy noise, trained on the prior predictive.

``python -m benchmarks.heavy_tails [--smoke] [--seeds 0,1] [--only amortized,single] [--out DIR]`` (with the
environment variable ``CI`` set the smoke configuration is the default; a part not run keeps its results from the
existing JSON file). Writes ``heavy_tails.json`` and ``heavy_tails.md``
(``heavy_tails_smoke.*`` in the smoke configuration).

The family: ``theta = (a, b) ~ N(0, 2^2 I)``, ``y_i ~ Cauchy(a + b x_i, 0.2)`` at 8 fixed points ``x_i`` in
``[-1, 1]``. Its datasets hold outliers of any size (about one observation in 500 lies more than 60 units from
its line), which is what the encoder's input squash is for; its posteriors are close to Gaussian, with heavier tails.
Exact draws and the log evidence from a grid (a coarse grid finds where the mass is, a 600 x 600 grid covers it).

Each guide is trained on a ``PriorPredictiveStream`` (batches of 16 datasets, 64 particles, the default optimiser)
and scored on 10 held-out datasets. The guides: the default sampler and a ``FlowSampler`` in each dataset's Laplace
frame (``whiten="laplace"``), and the amortized guide's defaults (no frame). Scores: C2ST
(``benchmarks.metrics.c2st``, 1,000 draws against as many exact ones) of the raw draws and of the draws after the
``MomentCorrection`` and ``HMC`` post-processing steps (their defaults), with the median time of 10,000 draws per
dataset with ``HMC``. The guide's encoder is run with its outlier squash (the default) and without it
(``guide.encoder.squash = False`` after set-up). A training "diverged" when ``AmortizedSVGD.run`` warned so (its
KSD ended far above its best window). Part ``single``: the guide with no options, ``AmortizedSteinGuide(model)``
trained on each held-out dataset alone (``AmortizedSVGD.run`` with its defaults), for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro_stein import HMC, Amortization, AmortizedSteinGuide, AmortizedSVGD, MomentCorrection
from pyro_stein.data import Dataset, PriorPredictiveStream
from pyro_stein.diagnostics import importance_diagnostics
from pyro_stein.flows import FlowSampler
from pyro_stein.infer import TrainingWarning, default_optim

from .amortized import _timed
from .metrics import quiet_c2st
from .report import machine_info, write_json

N_OBS, NOISE, PRIOR_SD, CONTEXT = 8, 0.2, 2.0, 16
SAMPLERS = ("default", "FlowSampler", "default, no frame")  # the first two in each dataset's Laplace frame

CONFIG = {
    "smoke": {"steps": 20, "test": 2, "draws": 200, "timing_draws": 1000, "single_steps": 20},
    "quick": {"steps": 3000, "test": 10, "draws": 1000, "timing_draws": 10000},
}


def design(dtype=torch.float64) -> torch.Tensor:
    return torch.linspace(-1, 1, N_OBS, dtype=dtype)


def cauchy_regression(x, y=None):
    """``theta ~ N(0, 2^2 I_2)``, ``y_i ~ Cauchy(theta_1 + theta_2 x_i, 0.2)``."""
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(2), PRIOR_SD).to_event(1))
    with pyro.plate("obs", x.shape[0]):
        return pyro.sample("y", dist.Cauchy(theta[..., :1] + theta[..., 1:] * x, NOISE), obs=y)


def _log_joint(x, y, a, b):
    prior = dist.Normal(0.0, PRIOR_SD)
    lp = prior.log_prob(a) + prior.log_prob(b)
    for xi, yi in zip(x, y):
        lp = lp + dist.Cauchy(a + b * xi, NOISE).log_prob(yi)
    return lp


def exact(x, y, num: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """``num`` exact draws of ``theta`` and the log evidence, on a grid."""
    coarse = torch.arange(-12.0, 12.0, 0.05, dtype=x.dtype) + 0.025
    A, B = torch.meshgrid(coarse, coarse, indexing="ij")
    lp = _log_joint(x, y, A, B)
    keep = lp > lp.max() - 30  # the log density's range that holds the mass
    lo = torch.stack([A[keep].min(), B[keep].min()]) - 0.05
    hi = torch.stack([A[keep].max(), B[keep].max()]) + 0.05
    h = (hi - lo) / 600
    ga, gb = (lo[i] + h[i] * (torch.arange(600, dtype=x.dtype) + 0.5) for i in range(2))
    A, B = torch.meshgrid(ga, gb, indexing="ij")
    lp = _log_joint(x, y, A, B).reshape(-1)
    log_z = float(torch.logsumexp(lp, 0) + h.log().sum())
    idx = torch.multinomial(torch.softmax(lp, 0), num, replacement=True, generator=generator)
    jitter = (torch.rand(num, 2, generator=generator, dtype=x.dtype) - 0.5) * h
    return torch.stack([A.reshape(-1)[idx], B.reshape(-1)[idx]], -1) + jitter, log_z


def _guide(sampler: str):
    if sampler == "default, no frame":  # the amortized guide's default (whiten="auto" means no frame)
        return AmortizedSteinGuide(cauchy_regression, amortized=Amortization(context_dim=CONTEXT))
    if sampler == "FlowSampler":  # context: the encoding plus the frame summary (loc and log sds of 2 latents)
        return AmortizedSteinGuide(
            cauchy_regression,
            amortized=Amortization(context_dim=CONTEXT),
            whiten="laplace",
            sampler=FlowSampler(2, context_dim=CONTEXT + 4, num_layers=2),
        )
    return AmortizedSteinGuide(cauchy_regression, amortized=Amortization(context_dim=CONTEXT), whiten="laplace")


def _c2st(ref, z, seed):
    return round(quiet_c2st(ref, z, seed=seed), 4)


def _draw_new(guide, num: int, x, y):
    return guide.sample_posterior(num, x, y=y, postprocess=[HMC()])


def run_variant(sampler: str, squash: bool, seed: int, cfg: dict, test: list[Dataset], refs: list) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = design()
    stream = PriorPredictiveStream(cauchy_regression, lambda: Dataset(x), obs_kwargs={"y": "y"})
    guide = _guide(sampler)
    first = stream.sample()
    guide.setup(*first.args, **first.kwargs)
    guide.encoder.squash = squash
    svgd = AmortizedSVGD(cauchy_regression, guide, default_optim(cfg["steps"]), num_particles=64)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingWarning)
        history = svgd.run(datasets=stream, num_steps=cfg["steps"], batch_size=16, progress_bar=False)
    seconds = time.perf_counter() - t0
    diverged = any("diverged" in str(w.message) for w in caught if issubclass(w.category, TrainingWarning))
    rows = []
    n = cfg["draws"]
    for i, (d, (ref, log_z)) in enumerate(zip(test, refs)):
        y = d.kwargs["y"]
        row = {"dataset": i}
        for label, post in (("raw", None), ("moment", [MomentCorrection()]), ("hmc", [HMC()])):
            z = guide.sample_posterior(n, x, y=y, postprocess=post)["theta"]
            row[f"c2st_{label}"] = _c2st(ref, z, seed=i)
        # new copies per call, made before the timing: a guide reuses the frame of the argument objects it saw last
        copies = iter([(x.clone(), y.clone()) for _ in range(3)])
        _, seconds_hmc = _timed(lambda c=copies: _draw_new(guide, cfg["timing_draws"], *next(c)), 3)
        row["hmc_seconds"] = round(seconds_hmc, 4)
        if sampler == "FlowSampler":
            r = importance_diagnostics(guide, x, y=y)
            row["khat"] = round(float(r.khat), 3)
            row["log_z_error"] = round(float(r.log_evidence) - log_z, 4)
        rows.append(row)
    finite = [float(h) for h in history if math.isfinite(float(h))]
    return {
        "sampler": sampler,
        "squash": squash,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "diverged": diverged,
        "ksd_last_100_median": round(statistics.median(finite[-100:]), 4) if finite else None,
        "per_dataset": rows,
    }


def run_single(cfg: dict, test: list[Dataset], refs: list) -> dict:
    """The guide with no options fitted to each held-out dataset alone."""
    x = design()
    c2sts, seconds = [], []
    for i, (d, (ref, _)) in enumerate(zip(test, refs)):
        pyro.clear_param_store()
        pyro.set_rng_seed(i)
        guide = AmortizedSteinGuide(cauchy_regression)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrainingWarning)
            AmortizedSVGD(cauchy_regression, guide).run(
                x, y=d.kwargs["y"], num_steps=cfg.get("single_steps"), progress_bar=False
            )
        seconds.append(time.perf_counter() - t0)
        c2sts.append(_c2st(ref, guide.sample_posterior(cfg["draws"], x, y=d.kwargs["y"])["theta"], seed=i))
    return {"c2st": c2sts, "train_seconds_median": round(statistics.median(seconds), 1)}


def run(mode: str, seeds: list[int], parts=("amortized", "single"), previous: dict | None = None) -> dict:
    cfg = CONFIG[mode]
    pyro.set_rng_seed(12345)
    x = design()
    stream = PriorPredictiveStream(cauchy_regression, lambda: Dataset(x), obs_kwargs={"y": "y"})
    test = [stream.sample() for _ in range(cfg["test"])]
    gen = torch.Generator().manual_seed(0)
    refs = [exact(x, d.kwargs["y"], cfg["draws"], gen) for d in test]
    res = dict(previous or {}, mode=mode, machine=machine_info(), config=cfg)
    if "amortized" in parts:
        res["seeds"] = seeds
        res["results"] = [
            run_variant(sampler, squash, seed, cfg, test, refs)
            for sampler in SAMPLERS
            for squash in (True, False)
            for seed in seeds
        ]
    if "single" in parts:
        res["single_dataset"] = run_single(cfg, test, refs)
    return res


def _median(values):
    return round(statistics.median(values), 3)


def report(res: dict) -> str:
    lines = [
        "# Heavy-tailed likelihood: Cauchy-noise regression, amortized",
        "",
        "Generated by `python -m benchmarks.heavy_tails`; see the module docstring for the setup. "
        f"{res['config']['steps']} training steps on the prior predictive, {res['config']['test']} held-out "
        "datasets; C2ST median (worst) over them.",
        "",
        "| sampler | encoder squash | seed | diverged | train s | C2ST raw | C2ST moment | C2ST HMC | "
        f"s per {res['config']['timing_draws']:,} HMC draws |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.get("results", []):
        rows = r["per_dataset"]

        def col(key, rows=rows):
            v = [row[key] for row in rows]
            return f"{_median(v)} ({max(v):.3f})"

        lines.append(
            f"| {r['sampler']} | {'on' if r['squash'] else 'off'} | {r['seed']} | {'yes' if r['diverged'] else 'no'} "
            f"| {r['train_seconds']} | {col('c2st_raw')} | {col('c2st_moment')} | {col('c2st_hmc')} | "
            f"{_median([row['hmc_seconds'] for row in rows])} |"
        )
    single = res.get("single_dataset")
    if single:
        c = single["c2st"]
        lines += [
            "",
            f"The guide with no options fitted to each held-out dataset alone: C2ST median {_median(c)} "
            f"(worst {max(c):.3f}), {single['train_seconds_median']} s of training per dataset (median).",
        ]
    flows = [r for r in res.get("results", []) if r["sampler"] == "FlowSampler"]
    if flows:
        lines += ["", "FlowSampler's k-hat (10,000 draws) and log-evidence error per held-out dataset:", ""]
        for r in flows:
            k = ", ".join(f"{row['khat']:.2f}" for row in r["per_dataset"])
            e = ", ".join(f"{row['log_z_error']:.2f}" for row in r["per_dataset"])
            lines.append(f"- squash {'on' if r['squash'] else 'off'}, seed {r['seed']}: k-hat {k}; log Z error {e}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heavy_tails", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", default=bool(os.environ.get("CI")))
    p.add_argument("--seeds", default="0")
    p.add_argument("--only", default="amortized,single")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated ints, got {a.seeds!r}")
    parts = [s.strip() for s in a.only.split(",") if s.strip()]
    if not parts or any(s not in ("amortized", "single") for s in parts):
        p.error(f"--only takes a comma-separated subset of amortized,single, got {a.only!r}")
    mode = "smoke" if a.smoke else "quick"
    name = "heavy_tails_smoke" if mode == "smoke" else "heavy_tails"
    out = Path(a.out)
    previous = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else None
    res = run(mode, seeds, parts, previous)
    write_json(out, name, res)
    text = report(res)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
