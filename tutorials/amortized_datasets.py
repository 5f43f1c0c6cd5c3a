"""Amortized inference across datasets: train once, then get posteriors for new datasets in one pass.

Run: ``python tutorials/amortized_datasets.py`` (a few minutes on one CPU core). With the
environment variable ``CI`` set it runs a smoke version (few steps, under a minute). Figures and
``summary.txt`` (a copy of the printout) go to ``--out DIR`` if given, else to
``pyro_stein_tutorials/amortized_datasets/`` under the system's temporary folder (``.../ci/...``
in the smoke version).

The model family is the simplest one with a known answer, the Gaussian mean:

    mu  ~ Normal(0, 1)
    y_i ~ Normal(mu, 1),   i = 1..n,   n uniform in 5..50

whose exact posterior is ``Normal(sum(y) / (n + 1), 1 / (n + 1))`` (variance). That exact
posterior is the reference throughout; NUTS appears only in the timing comparison.

An *amortized* ``AmortizedSteinGuide`` conditions its neural sampler on a permutation-invariant
(DeepSets) encoding of the dataset, so one trained network serves every dataset of the family:

1. train it once on datasets simulated from the model's prior predictive
   (``PriorPredictiveStream`` + ``AmortizedSVGD``);
2. draw posteriors for 20 unseen datasets in one batched call and compare them with the exact
   posteriors (mean error in posterior sds, sd ratio);
3. flag datasets the guide handles badly with a reference-free signal, the kernelized Stein
   discrepancy of its draws (``guide_ksd``), including two deliberately out-of-distribution ones;
4. fine-tune ("refine") a copy of the guide on the worst-flagged dataset;
5. compare the per-dataset cost with running NUTS on each dataset.

Honesty note: the library's accuracy target is |mean error| < 0.2 posterior sd and sd within 20 %
of the exact one, for every held-out dataset. The raw amortized sampler does not reach it on every
training run (on the CI-sized family of ``tests/test_amortized.py``, 7 of 8 training seeds do); the
script prints whether this run met it.
Step 2b repeats step 2 with ``postprocess=[MomentCorrection(rounds=2)]`` (two rounds of the Stein moment correction,
one batched score evaluation each). For this Gaussian family that correction is exact by
construction, so 2b shows the mechanics and the cost, not a hard case; the non-Gaussian evidence
is the Gamma-Poisson test in ``tests/test_amortized.py`` and the benchmarks' C2ST table.
"""

from __future__ import annotations

import importlib
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _common import CI, output_dir  # noqa: E402  (tutorials/_common.py)
from pyro.infer import MCMC, NUTS  # noqa: E402

from pyro_stein import (  # noqa: E402
    Amortization,
    AmortizedSteinGuide,
    AmortizedSVGD,
    Dataset,
    MomentCorrection,
    PriorPredictiveStream,
    refine,
)
from pyro_stein.diagnostics import guide_ksd  # noqa: E402

# ---------------------------------------------------------------------------- settings


OUT = output_dir("amortized_datasets", __doc__.splitlines()[0])

TRAIN_STEPS = 30 if CI else 1500  # AmortizedSVGD steps
BATCH_SIZE = 8  # datasets per step
NUM_PARTICLES = 32  # particles per dataset per step
NUM_HELD_OUT = 20  # unseen datasets to evaluate on
NUM_DRAWS = 4000  # posterior draws per held-out dataset (MC s.e.: 0.016 sd for the mean, 0.011 for the sd ratio)
REFINE_STEPS = 10 if CI else 300
NUM_TIMED = 3  # datasets for the amortized-vs-NUTS timing
TIMED_DRAWS = 1000
NUTS_WARMUP = 20 if CI else 500
NUTS_SAMPLES = 20 if CI else 1000
TARGET_MEAN, TARGET_SD = 0.2, 0.2  # |mean error| < 0.2 posterior sd, |sd ratio - 1| < 0.2
SEED = 0

LINES: list[str] = []


def log(msg: str = "") -> None:
    """Print and keep a copy for summary.txt."""
    print(msg, flush=True)
    LINES.append(msg)


# ---------------------------------------------------------------------------- model family
def model(n, y=None):
    """mu ~ N(0, 1); y_i ~ N(mu, 1), i = 1..n. An ordinary Pyro model: nothing amortization-specific."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), torch.tensor(1.0)))
    with pyro.plate("obs", n):
        return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def make_args() -> Dataset:
    """The model's arguments *without* the observations: only the dataset size varies here.
    ``PriorPredictiveStream`` runs the model forward and fills in ``y``."""
    return Dataset(int(torch.randint(5, 51, ())))


def exact_posterior(d: Dataset) -> tuple[float, float]:
    """Mean and sd of the exact posterior N(sum y / (n + 1), 1 / (n + 1))."""
    n, y = d.args[0], d.kwargs["y"]
    return float(y.sum() / (n + 1)), float((1.0 / (n + 1)) ** 0.5)


def errors(draws: torch.Tensor, d: Dataset) -> tuple[float, float]:
    """(mean error in exact posterior sds, sd ratio) of draws of mu for dataset d."""
    m, s = exact_posterior(d)
    return float((draws.mean() - m) / s), float(draws.std() / s)


def nuts_draws(d: Dataset) -> torch.Tensor:
    mcmc = MCMC(NUTS(model), num_samples=NUTS_SAMPLES, warmup_steps=NUTS_WARMUP, disable_progbar=True)
    mcmc.run(*d.args, **d.kwargs)
    return mcmc.get_samples()["mu"]


# ---------------------------------------------------------------------------- main
def main():
    t_start = time.perf_counter()
    torch.set_default_dtype(torch.float64)
    OUT.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(SEED)
    log(f"Gaussian-mean family, n uniform in 5..50; mode = {'CI smoke' if CI else 'full'}")
    # The first torch optimiser in a process imports torch._dynamo (several seconds): do it untimed.
    importlib.import_module("torch._dynamo")

    # ------------------------------------------------------------ 1. train once on simulated datasets
    # The stream simulates (n, y) pairs from the prior predictive; obs_kwargs says that the model's
    # observed site "y" goes back in as the keyword argument y=... .
    stream = PriorPredictiveStream(model, make_args, obs_kwargs={"y": "y"})
    # amortized=True: the sampler takes a DeepSets encoding of the dataset as context. By default
    # the encoder sees one row per plate element: here the single column y_i. mean_features=True
    # (the default without a frame; written out here) also hands the sampler the mean of y
    # unchanged: this posterior's mean, sum(y) / (n + 1), is linear in it, and a linear path
    # extrapolates to datasets at the edge of the prior, where the encoder's MLPs alone bend
    # (without it, an earlier run's worst dataset was 0.13 sd off and one dataset's sd collapsed;
    # see the design notes).
    guide = AmortizedSteinGuide(model, amortized=Amortization(mean_features=True))
    first = stream.sample()
    guide.setup(*first.args, **first.kwargs)  # build the networks from one example dataset
    optim = pyro.optim.ClippedAdam({"lr": 3e-3, "lrd": 0.1 ** (1 / TRAIN_STEPS)})  # lr decays 10x over training
    svgd = AmortizedSVGD(model, guide, optim, num_particles=NUM_PARTICLES)
    t0 = time.perf_counter()
    history = svgd.run(datasets=stream, batch_size=BATCH_SIZE, num_steps=TRAIN_STEPS, progress_bar=False)
    train_s = time.perf_counter() - t0
    grad_evals = TRAIN_STEPS * BATCH_SIZE * NUM_PARTICLES
    log(
        f"\n1. training: {TRAIN_STEPS} steps x {BATCH_SIZE} datasets x {NUM_PARTICLES} particles = "
        f"{grad_evals:,} gradient evaluations of the log joint, {train_s:.1f} s wall"
    )

    # ------------------------------------------------------------ 2. twenty unseen datasets, one call
    pyro.set_rng_seed(SEED + 123)
    held_out = [stream.sample() for _ in range(NUM_HELD_OUT)]
    t0 = time.perf_counter()
    with torch.no_grad():
        batch = guide.sample_posterior_batch(NUM_DRAWS, held_out)["mu"]  # (20, NUM_DRAWS)
    batch_s = time.perf_counter() - t0
    log(
        f"\n2. {NUM_HELD_OUT} unseen datasets: {NUM_DRAWS} draws each in one sample_posterior_batch call, "
        f"{batch_s * 1e3:.1f} ms"
    )
    log(f"   {'#':>3}{'n':>5}{'exact mean':>12}{'exact sd':>10}{'mean err (sd)':>15}{'sd ratio':>10}")
    rows = []
    for i, (d, draws) in enumerate(zip(held_out, batch)):
        m, s = exact_posterior(d)
        err, ratio = errors(draws, d)
        rows.append((d.args[0], err, ratio))
        log(f"   {i:>3}{d.args[0]:>5}{m:>12.3f}{s:>10.3f}{err:>15.3f}{ratio:>10.3f}")
    worst_err = max(abs(r[1]) for r in rows)
    worst_ratio = max(rows, key=lambda r: abs(r[2] - 1))[2]
    met = worst_err < TARGET_MEAN and abs(worst_ratio - 1) < TARGET_SD
    log(f"   worst |mean error| = {worst_err:.3f} posterior sd (target < {TARGET_MEAN}; MC s.e. 0.016)")
    log(
        f"   worst sd ratio     = {worst_ratio:.3f} "
        f"(target within {1 - TARGET_SD:.1f}..{1 + TARGET_SD:.1f}; MC s.e. 0.011)"
    )
    # how far outside the target the worst dataset is, in units of the Monte Carlo noise of the check
    miss = max(worst_err - TARGET_MEAN, abs(worst_ratio - 1) - TARGET_SD)
    log(
        f"   accuracy target met on all {NUM_HELD_OUT} datasets: {'yes' if met else 'NO'}"
        + ("" if met else f" (missed by {miss:.3f}; a known shortfall of the amortized guide)")
    )

    # ------------------------------------------------------------ 2b. the same, with the moment correction
    # Each round evaluates the model's score at the draws once and moves each dataset's draws by
    # one affine map (pyro_stein.MomentCorrection); the weights are not touched.
    t0 = time.perf_counter()
    with torch.no_grad():
        corrected = guide.sample_posterior_batch(NUM_DRAWS, held_out, postprocess=[MomentCorrection(rounds=2)])["mu"]
    corr_s = time.perf_counter() - t0
    crows = [(d.args[0],) + errors(draws, d) for d, draws in zip(held_out, corrected)]
    c_err = max(abs(r[1]) for r in crows)
    c_ratio = max(crows, key=lambda r: abs(r[2] - 1))[2]
    log(f"\n2b. the same 20 datasets with 2 moment-correction rounds: {corr_s * 1e3:.1f} ms for the batch")
    log(
        f"   worst |mean error| = {c_err:.3f} posterior sd, worst sd ratio = {c_ratio:.3f} "
        f"(exact for a Gaussian posterior up to MC error; target met: "
        f"{'yes' if c_err < TARGET_MEAN and abs(c_ratio - 1) < TARGET_SD else 'NO'})"
    )

    # ------------------------------------------------------------ 3. reference-free flags: KSD
    # guide_ksd scores the guide's draws for one dataset against the model's score (no exact
    # posterior needed). Two datasets unlike anything seen in training should stand out:
    #   * n = 2000 observations (training saw at most 50): the posterior is ~6x narrower;
    #   * mu = 6 (six prior sds out): the encoder never saw data centred there.
    pyro.set_rng_seed(SEED + 7)
    ood = {
        "OOD n=2000": Dataset(2000, y=0.5 + torch.randn(2000)),
        "OOD mu=6": Dataset(30, y=6.0 + torch.randn(30)),
    }
    named = [(f"#{i} (n={d.args[0]})", d) for i, d in enumerate(held_out)] + list(ood.items())
    ksds = {name: guide_ksd(guide, *d.args, **d.kwargs) for name, d in named}
    order = sorted(ksds, key=ksds.get, reverse=True)
    log("\n3. KSD^2 of the guide's draws (500 each, IMQ kernel), largest first:")
    for name in order[:6]:
        log(f"   {name:<16}{ksds[name]:>12.4g}")
    max_in = max(v for k, v in ksds.items() if k not in ood)
    median_in = statistics.median(v for k, v in ksds.items() if k not in ood)
    log(f"   ... largest in-distribution KSD^2 {max_in:.4g}, median {median_in:.4g}")
    top2 = set(order[:2])
    log(f"   the two OOD datasets have the two largest KSDs: {'yes' if top2 == set(ood) else 'NO'}")
    for name, d in ood.items():
        err, ratio = errors(guide.sample_posterior(NUM_DRAWS, *d.args, **d.kwargs)["mu"], d)
        log(f"   {name}: mean error {err:.2f} sd, sd ratio {ratio:.2f} (checked against the exact posterior)")

    # ------------------------------------------------------------ 4. refine the worst-flagged dataset
    # refine() fine-tunes a *copy* of the guide on one dataset, starting from the amortized weights;
    # the shared guide is left untouched.
    worst_name = order[0]
    wd = dict(named)[worst_name]
    before = errors(guide.sample_posterior(NUM_DRAWS, *wd.args, **wd.kwargs)["mu"], wd)
    t0 = time.perf_counter()
    refined = refine(guide, REFINE_STEPS, *wd.args, optim=pyro.optim.Adam({"lr": 1e-3}), **wd.kwargs)
    refine_s = time.perf_counter() - t0
    after = errors(refined.sample_posterior(NUM_DRAWS, *wd.args, **wd.kwargs)["mu"], wd)
    ksd_after = guide_ksd(refined, *wd.args, **wd.kwargs)
    log(f"\n4. refine the worst-flagged dataset ({worst_name}), {REFINE_STEPS} steps, {refine_s:.1f} s:")
    log(f"   before: mean error {before[0]:>7.3f} sd, sd ratio {before[1]:.3f}, KSD^2 {ksds[worst_name]:.4g}")
    log(f"   after:  mean error {after[0]:>7.3f} sd, sd ratio {after[1]:.3f}, KSD^2 {ksd_after:.4g}")

    # ------------------------------------------------------------ 5. cost per dataset: amortized vs NUTS
    amort_t, corr_t, nuts_t, nuts_err = [], [], [], []
    for d in held_out[:NUM_TIMED]:
        # each timed call on a new copy of the data: the guide reuses what it computed for the argument objects
        # it saw last, and the time asked for is that of a new dataset
        first, second = d.map_tensors(torch.clone), d.map_tensors(torch.clone)
        t0 = time.perf_counter()
        with torch.no_grad():
            guide.sample_posterior(TIMED_DRAWS, *first.args, **first.kwargs)
        amort_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            guide.sample_posterior(TIMED_DRAWS, *second.args, postprocess=[MomentCorrection(rounds=2)], **second.kwargs)
        corr_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        draws = nuts_draws(d)
        nuts_t.append(time.perf_counter() - t0)
        nuts_err.append(errors(draws, d))
    a_med, n_med = statistics.median(amort_t), statistics.median(nuts_t)
    log(f"\n5. wall time per dataset, median of {NUM_TIMED}:")
    log(f"   amortized guide, {TIMED_DRAWS} draws:               {a_med * 1e3:8.1f} ms")
    c_med = statistics.median(corr_t)
    log(f"   amortized guide + moment correction (2 rounds):  {c_med * 1e3:8.1f} ms")
    log(f"   NUTS, {NUTS_WARMUP} warmup + {NUTS_SAMPLES} draws:            {n_med * 1e3:8.1f} ms")
    log(f"   ratio NUTS / (amortized + correction): {n_med / c_med:,.0f}x")
    log(
        f"   ratio NUTS / amortized: {n_med / a_med:,.0f}x  (training cost {train_s:.0f} s is paid once; "
        f"break-even after ~{train_s / max(n_med - a_med, 1e-9):.0f} datasets)"
    )
    log("   NUTS accuracy on these: " + ", ".join(f"mean err {e:.3f} sd / sd ratio {r:.3f}" for e, r in nuts_err))

    # ------------------------------------------------------------ figure
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ns = [r[0] for r in rows]
    ax = axes[0]
    ax.axhspan(1 - TARGET_SD, 1 + TARGET_SD, color="0.9", label="target")
    ax.scatter(ns, [r[2] for r in rows], color="C0")
    ax.axhline(1, color="k", lw=0.8)
    ax.set(xlabel="n (observations)", ylabel="sd / exact sd", title="posterior sd ratio")
    ax.legend(loc="best", fontsize=8)
    ax = axes[1]
    ax.axhspan(-TARGET_MEAN, TARGET_MEAN, color="0.9", label="target")
    ax.scatter(ns, [r[1] for r in rows], color="C1")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="n (observations)", ylabel="(mean - exact) / exact sd", title="posterior mean error")
    ax.legend(loc="best", fontsize=8)
    ax = axes[2]
    names = list(ksds)
    # KSD^2 is an unbiased (U-statistic) estimate, so a near-perfect fit can come out slightly
    # negative: a symmetric log scale shows those as small bars around 0
    ax.bar(range(len(names)), [ksds[k] for k in names], color=["C3" if k in ood else "C0" for k in names])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([k.split(" (")[0] if k not in ood else k for k in names], rotation=90, fontsize=7)
    ax.set(ylabel="KSD$^2$ (symlog scale)", title="KSD flags (red: out of distribution)")
    fig.tight_layout()
    fig.savefig(OUT / "amortized_datasets.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history)
    ax.set(xlabel="step", ylabel="training diagnostic", title="AmortizedSVGD training", yscale="symlog")
    fig.tight_layout()
    fig.savefig(OUT / "training.png", dpi=120)
    plt.close(fig)

    log(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    (OUT / "summary.txt").write_text("\n".join(LINES) + "\n")
    print(f"\nfigures and summary written to {OUT}")


if __name__ == "__main__":
    main()
