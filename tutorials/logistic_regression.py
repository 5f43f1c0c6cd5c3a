"""Bayesian logistic regression three ways: AutoNormal, AmortizedSteinGuide and NUTS.

Run: ``python tutorials/logistic_regression.py`` (2-5 minutes on one CPU core, most of it
NUTS). With the environment variable ``CI`` set it runs a smoke version (few steps, few NUTS
draws, under a minute). Figures and tables go to ``--out DIR`` if given, else to
``pyro_stein_tutorials/logistic_regression/`` under the system's temporary folder (``.../ci/...``
in the smoke version); the repository's copies are regenerated with
``--out tutorials/outputs/logistic_regression``.

The model is an ordinary Pyro model, written for one draw of its latent variables:

    tau ~ HalfCauchy(1)                  # global scale of the weights (a hyperprior)
    w_d ~ Normal(0, tau),  d = 1..D      # D = 8 standardized features
    b   ~ Normal(0, 5)                   # bias
    y_n ~ Bernoulli(logits = x_n . w + b)

on the Wisconsin breast-cancer data that ships with scikit-learn (569 tumours, label 1 =
benign), using 8 of its "mean ..." features, standardized. Several of these features are
strongly correlated (radius, concavity, concave points, compactness), so their weights are
correlated a posteriori, and the hyperprior makes the posterior of ``tau`` right-skewed: two
things a mean-field Gaussian guide cannot represent.

We fit it three ways and compare posterior means and standard deviations with NUTS:

1. ``AutoNormal`` + ``SVI(Trace_ELBO)``: Pyro's mean-field Gaussian baseline;
2. ``AmortizedSteinGuide`` + ``AmortizedSVGD``: draws come from a neural sampler trained with
   the Stein variational gradient (Wang & Liu 2016); the guide is a drop-in replacement for
   ``AutoNormal``: the same model, ``Predictive`` works unchanged;
3. NUTS (``pyro.infer.mcmc``), the reference.

Accuracy is reported in units of the NUTS posterior sd: ``|mean - mean_NUTS| / sd_NUTS`` (worst
parameter) and ``sd / sd_NUTS`` (the ratio furthest from 1). NUTS is itself a Monte Carlo
estimate, so the printout also gives the noise floor of these numbers.
"""

from __future__ import annotations

import importlib
import json
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.poutine as poutine  # noqa: E402
import torch  # noqa: E402
from _common import CI, output_dir  # noqa: E402  (tutorials/_common.py)
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from pyro.ops.stats import effective_sample_size  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD  # noqa: E402
from pyro_stein.infer import DEFAULT_NUM_STEPS

# ---------------------------------------------------------------------------- settings


OUT = output_dir("logistic_regression", __doc__.splitlines()[0])

SVI_STEPS = 100 if CI else 3000  # AutoNormal + Trace_ELBO
STEIN_STEPS = 100 if CI else DEFAULT_NUM_STEPS  # AmortizedSVGD: run()'s default outside the smoke mode
NUM_PARTICLES = 64  # particles per AmortizedSVGD step
NUTS_WARMUP = 30 if CI else 500
NUTS_SAMPLES = 30 if CI else 2000
NUM_DRAWS = 300 if CI else 4000  # posterior draws taken from each guide
SEED = 0

FEATURES = [
    "mean radius",
    "mean texture",
    "mean smoothness",
    "mean compactness",
    "mean concavity",
    "mean concave points",
    "mean symmetry",
    "mean fractal dimension",
]


# ---------------------------------------------------------------------------- data and model
def load_data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """8 standardized features of the breast-cancer data, labels as floats (1 = benign)."""
    data = load_breast_cancer()
    cols = [list(data.feature_names).index(f) for f in FEATURES]
    X = data.data[:, cols]
    X = (X - X.mean(0)) / X.std(0)
    return torch.tensor(X), torch.tensor(data.target, dtype=torch.float64), [f.replace("mean ", "") for f in FEATURES]


def model(X, y=None):
    """Hierarchical logistic regression, in plain Pyro. Nothing in it is specific to pyro_stein;
    AmortizedSVGD evaluates it at all particles at once (with torch.func.vmap)."""
    D = X.shape[-1]
    tau = pyro.sample("tau", dist.HalfCauchy(torch.ones((), dtype=X.dtype)))
    w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=X.dtype), tau).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=X.dtype), 5.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


# ---------------------------------------------------------------------------- the three fits
def fit_autonormal(X, y):
    """Pyro's mean-field Gaussian guide trained by maximising the ELBO."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    guide = AutoNormal(model)
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": (1e-3 / 1e-2) ** (1 / SVI_STEPS)})
    svi = SVI(model, guide, optim, Trace_ELBO())
    losses = [svi.step(X, y) for _ in range(SVI_STEPS)]
    return guide, losses


def fit_stein(X, y):
    """The same model, an AmortizedSteinGuide in place of AutoNormal, AmortizedSVGD in place of SVI."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    # no options: the guide picks its frame (here the Laplace frame: the posterior has a proper mode, and its
    # Laplace approximation fits better centred than with w non-centred), the driver its optimiser, learning-rate
    # schedule and number of steps, and run() ends by calibrating the guide
    guide = AmortizedSteinGuide(model)
    svgd = AmortizedSVGD(model, guide)
    # Each step returns the kernelized Stein discrepancy of that step's particles: a noisy,
    # reference-free measure of fit that should fall towards zero.
    ksd = svgd.run(X, y, num_steps=None if STEIN_STEPS == DEFAULT_NUM_STEPS else STEIN_STEPS, progress_bar=False)
    return guide, ksd


def fit_nuts(X, y):
    pyro.set_rng_seed(SEED)
    mcmc = MCMC(
        NUTS(model, jit_compile=True, ignore_jit_warnings=True),
        num_samples=NUTS_SAMPLES,
        warmup_steps=NUTS_WARMUP,
        disable_progbar=True,
    )
    mcmc.run(X, y)
    return mcmc


def guide_draws(guide, X, y):
    """NUM_DRAWS posterior draws from a guide, the same code for both guides: run the guide once
    under a batch plate and read its sites (for the Stein guide, ``guide.sample_posterior(S, X, y)``
    gives the same). ``pyro.infer.Predictive(model, guide=guide, num_samples=S)`` also works with
    either guide, e.g. for posterior predictive draws of ``y``."""
    pyro.set_rng_seed(SEED + 1)
    with torch.no_grad(), pyro.plate("draws", NUM_DRAWS, dim=-2):
        trace = poutine.trace(guide).get_trace(X, y)
    return {k: trace.nodes[k]["value"].reshape(NUM_DRAWS, -1) for k in ("tau", "w", "b")}


def flatten(samples, names):
    """{tau, w, b} -> (S, 2 + D) matrix with columns [tau, w_1..w_D, b]."""
    return torch.cat(
        [samples["tau"].reshape(-1, 1), samples["w"].reshape(len(samples["tau"]), -1), samples["b"].reshape(-1, 1)], 1
    )


# ---------------------------------------------------------------------------- main
def main():
    torch.set_default_dtype(torch.float64)
    OUT.mkdir(parents=True, exist_ok=True)
    X, y, short = load_data()
    params = ["tau"] + [f"w[{s}]" for s in short] + ["b"]
    print(f"breast cancer data: N = {X.shape[0]}, D = {X.shape[1]} features; mode = {'CI smoke' if CI else 'full'}")

    # Constructing the first torch optimizer in a process imports torch._dynamo (5-10 s); do it here,
    # untimed, so that whichever method runs first is not charged for it.
    importlib.import_module("torch._dynamo")

    # wall time on a shared machine depends on its load; process CPU time (all threads) much less
    results, times, cpu = {}, {}, {}

    t0, c0 = time.perf_counter(), time.process_time()
    auto, elbo = fit_autonormal(X, y)
    results["AutoNormal"] = flatten(guide_draws(auto, X, y), params)
    times["AutoNormal"], cpu["AutoNormal"] = time.perf_counter() - t0, time.process_time() - c0
    print(f"AutoNormal + SVI:            {SVI_STEPS} steps, {times['AutoNormal']:.1f} s")

    t0, c0 = time.perf_counter(), time.process_time()
    stein, ksd = fit_stein(X, y)
    results["AmortizedStein"] = flatten(guide_draws(stein, X, y), params)
    times["AmortizedStein"], cpu["AmortizedStein"] = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"AmortizedSteinGuide + SVGD:  {STEIN_STEPS} steps x {NUM_PARTICLES} particles, {times['AmortizedStein']:.1f} s"
    )

    t0, c0 = time.perf_counter(), time.process_time()
    mcmc = fit_nuts(X, y)
    results["NUTS"] = flatten(mcmc.get_samples(), params)
    times["NUTS"], cpu["NUTS"] = time.perf_counter() - t0, time.process_time() - c0
    ess = effective_sample_size(results["NUTS"].unsqueeze(0), chain_dim=0, sample_dim=1)
    print(
        f"NUTS:                        {NUTS_WARMUP} warmup + {NUTS_SAMPLES} draws, {times['NUTS']:.1f} s "
        f"(ESS min {ess.min():.0f}, median {ess.median():.0f})"
    )

    # -------------------------------------------------------------- posterior summary table
    ref = results["NUTS"]
    ref_mean, ref_sd = ref.mean(0), ref.std(0)
    methods = ["AutoNormal", "AmortizedStein", "NUTS"]
    lines = []
    head = f"{'parameter':<22}" + "".join(f"{m:>20}" for m in methods)
    lines += [head, f"{'':<22}" + "".join(f"{'mean':>11}{'sd':>9}" for _ in methods), "-" * len(head)]
    for i, p in enumerate(params):
        row = f"{p:<22}"
        for m in methods:
            s = results[m][:, i]
            row += f"{s.mean():>11.3f}{s.std():>9.3f}"
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(f"{'wall time (s)':<22}" + "".join(f"{times[m]:>20.1f}" for m in methods))
    lines.append(f"{'CPU time (s)':<22}" + "".join(f"{cpu[m]:>20.1f}" for m in methods))

    # -------------------------------------------------------------- accuracy against NUTS
    # Noise floor: with S guide draws and a NUTS effective sample size n_eff, a standardized mean
    # error has Monte Carlo s.e. about sqrt(1/S + 1/n_eff); an sd ratio about half that.
    floor = math.sqrt(1 / NUM_DRAWS + 1 / float(ess.min()))
    metrics = {}
    lines += [
        "",
        "accuracy vs NUTS, in NUTS posterior sds (0 and 1 are perfect):",
        f"{'':<16}{'worst |mean - mean_NUTS| / sd_NUTS':<38}{'worst sd / sd_NUTS':<32}{'all sd ratios':<14}",
    ]
    for m in ["AutoNormal", "AmortizedStein"]:
        z = (results[m].mean(0) - ref_mean).abs() / ref_sd
        r = results[m].std(0) / ref_sd
        k = int((r - 1).abs().argmax())
        metrics[m] = {
            "worst_std_mean_error": float(z.max()),
            "worst_std_mean_error_param": params[int(z.argmax())],
            "worst_sd_ratio": float(r[k]),
            "worst_sd_ratio_param": params[k],
            "sd_ratio_min": float(r.min()),
            "sd_ratio_max": float(r.max()),
            "wall_time_s": times[m],
            "cpu_time_s": cpu[m],
        }
        lines.append(
            f"{m:<16}{f'{z.max():.3f}  {params[int(z.argmax())]}':<38}{f'{r[k]:.3f}  {params[k]}':<32}"
            f"{r.min():.2f} .. {r.max():.2f}"
        )
    lines.append(
        f"(Monte Carlo noise floor of the mean errors ~ {floor:.3f}, of the sd ratios ~ {floor / math.sqrt(2):.3f})"
    )

    # skewness of tau: a Gaussian in log tau (AutoNormal) vs the sampler vs NUTS
    def skew(v):
        v = v - v.mean()
        return float((v**3).mean() / (v**2).mean() ** 1.5)

    lines += ["", "skewness of tau:      " + "   ".join(f"{m} {skew(results[m][:, 0]):.2f}" for m in methods)]
    lines += ["skewness of log tau:  " + "   ".join(f"{m} {skew(results[m][:, 0].log()):.2f}" for m in methods)]

    # the pair of weights with the strongest posterior correlation under NUTS
    W = ref[:, 1:-1]
    corr = torch.corrcoef(W.T)
    corr.fill_diagonal_(0)
    i, j = divmod(int(corr.abs().argmax()), corr.shape[0])
    pair = (1 + i, 1 + j)
    corr_of = {m: float(torch.corrcoef(results[m][:, list(pair)].T)[0, 1]) for m in methods}
    lines.append(
        f"posterior corr({params[pair[0]]}, {params[pair[1]]}):  "
        + "   ".join(f"{m} {corr_of[m]:+.2f}" for m in methods)
    )

    table = "\n".join(lines)
    print()
    print(table)
    (OUT / "summary.txt").write_text(table + "\n")
    metrics["NUTS"] = {
        "wall_time_s": times["NUTS"],
        "cpu_time_s": cpu["NUTS"],
        "ess_min": float(ess.min()),
        "ess_median": float(ess.median()),
    }
    metrics["settings"] = {
        "svi_steps": SVI_STEPS,
        "stein_steps": STEIN_STEPS,
        "num_particles": NUM_PARTICLES,
        "nuts_warmup": NUTS_WARMUP,
        "nuts_samples": NUTS_SAMPLES,
        "guide_draws": NUM_DRAWS,
        "ci": CI,
        "torch_threads": torch.get_num_threads(),
    }
    metrics["posterior"] = {
        m: {p: [float(results[m][:, k].mean()), float(results[m][:, k].std())] for k, p in enumerate(params)}
        for m in methods
    }
    (OUT / "summary.json").write_text(json.dumps(metrics, indent=2) + "\n")

    # -------------------------------------------------------------- figures
    colors = {"AutoNormal": "tab:orange", "AmortizedStein": "tab:blue", "NUTS": "black"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, transform, label in [(axes[0], lambda v: v, "tau"), (axes[1], torch.log, "log tau")]:
        vals = {m: transform(results[m][:, 0]).numpy() for m in methods}
        lo, hi = np.quantile(np.concatenate(list(vals.values())), [0.001, 0.995])
        bins = np.linspace(lo, hi, 50)
        for m in methods:
            ax.hist(
                vals[m],
                bins=bins,
                density=True,
                histtype="step",
                lw=1.8 if m == "NUTS" else 1.4,
                color=colors[m],
                label=m,
            )
        ax.set_xlabel(label)
        ax.set_yticks([])
    axes[0].legend(frameon=False)
    fig.suptitle("posterior of the weight scale tau (HalfCauchy(1) prior)")
    fig.tight_layout()
    fig.savefig(OUT / "tau_posterior.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
    a, b = pair
    for ax, m in zip(axes, ["AutoNormal", "AmortizedStein"]):
        n = min(2000, len(ref))
        ax.scatter(ref[:n, a], ref[:n, b], s=3, alpha=0.3, color="gray", label="NUTS")
        ax.scatter(results[m][:n, a], results[m][:n, b], s=3, alpha=0.3, color=colors[m], label=m)
        ax.set_title(f"{m} (corr {corr_of[m]:+.2f}) vs NUTS ({corr_of['NUTS']:+.2f})", fontsize=10)
        ax.set_xlabel(params[a])
        ax.legend(frameon=False, markerscale=4)
    axes[0].set_ylabel(params[b])
    fig.tight_layout()
    fig.savefig(OUT / "weights_scatter.png", dpi=120)
    plt.close(fig)

    def running_mean(v, k=50):
        v = np.asarray(v, dtype=float)
        k = max(1, min(k, len(v) // 5))
        return np.convolve(v, np.ones(k) / k, mode="valid")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, trace, m, title in [
        (axes[0], elbo, "AutoNormal", "AutoNormal: -ELBO (Trace_ELBO, 1 particle)"),
        (axes[1], ksd, "AmortizedStein", "AmortizedSVGD: KSD^2 of each step's particles"),
    ]:
        ax.plot(trace, color=colors[m], lw=0.4, alpha=0.3)
        smooth = running_mean(trace)
        ax.plot(
            np.arange(len(smooth)) + (len(trace) - len(smooth)) // 2,
            smooth,
            color=colors[m],
            lw=1.5,
            label="running mean",
        )
        ax.set(title=title, xlabel="step")
        ax.legend(frameon=False)
    axes[0].set_ylim(np.quantile(elbo, 0.002), np.quantile(elbo[len(elbo) // 20 :], 0.99))
    axes[1].set_yscale("symlog", linthresh=1e-2)
    fig.tight_layout()
    fig.savefig(OUT / "training.png", dpi=120)
    plt.close(fig)
    print(f"\nfigures and tables written to {OUT}")


if __name__ == "__main__":
    main()
