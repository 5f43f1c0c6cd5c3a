"""Exporting Pyro posteriors to ArviZ: eight schools with AutoNormal and AmortizedSteinGuide.

Run: ``python tutorials/arviz_export.py`` (a few minutes on one CPU core). With the environment
variable ``CI`` set it runs a smoke version (few steps and draws, well under a minute). Figures
and ``summary.txt`` go to ``--out DIR`` if given, else to ``pyro_stein_tutorials/arviz_export/``
under the system's temporary folder (``.../ci/...`` in the smoke version).

``pyro_stein.arviz.to_inference_data(guide, model, *args, **kwargs)`` turns *any* fitted Pyro
guide into ArviZ's native container, so the whole ArviZ toolbox (``summary``, ``plot_posterior``,
``plot_forest``, ``loo``, ``compare``, ...) works on variational posteriors exactly as it does on
MCMC output. This tutorial:

1. fits the classic eight-schools model (Rubin 1981; Gelman et al., *BDA3* sec. 5.5) twice: with
   Pyro's mean-field ``AutoNormal`` guide (SVI) and with ``AmortizedSteinGuide`` (amortized SVGD);
2. exports both to ArviZ with 4 "chains" each (independent batches of i.i.d. guide draws);
3. prints ``az.summary`` of the Stein posterior and saves a posterior plot and a forest plot
   comparing the two approximations (and NUTS, the reference);
4. runs PSIS-LOO on both exports and ``az.compare``;
5. prints the kernelized Stein discrepancy (KSD^2) of each method's draws under the model,
   a reference-free measure of how well the draws match the posterior, next to that of NUTS.

The model (non-centred parametrisation):

    mu          ~ Normal(0, 5)                  # population mean effect
    tau         ~ HalfCauchy(5)                 # between-school sd
    theta_tilde ~ Normal(0, 1),  j = 1..8       # standardized school effects
    theta_j     = mu + tau * theta_tilde_j      # pyro.deterministic: exported to the posterior
    y_j         ~ Normal(theta_j, sigma_j)      # observed effect, known standard error

The school-level sites live inside a ``pyro.plate("school", 8)``, so the export names their
dimension ``school``; passing ``coords={"school": [...]}`` labels it with the schools' names.
"""

from __future__ import annotations

import importlib
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _common import CI, output_dir  # noqa: E402  (tutorials/_common.py)
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD  # noqa: E402
from pyro_stein.arviz import to_inference_data  # noqa: E402
from pyro_stein.diagnostics import stein_discrepancy  # noqa: E402

# ---------------------------------------------------------------------------- settings


OUT = output_dir("arviz_export", __doc__.splitlines()[0])

SVI_STEPS = 200 if CI else 5000  # AutoNormal + Trace_ELBO
STEIN_STEPS = 100 if CI else 3000  # AmortizedSVGD
NUM_PARTICLES = 64  # particles per AmortizedSVGD step
NUM_CHAINS = 4  # independent batches of guide draws in the export
NUM_DRAWS = 100 if CI else 1000  # draws per chain
NUTS_WARMUP = 50 if CI else 1000  # NUTS is only the reference for the KSD and the forest plot
NUTS_SAMPLES = 50 if CI else 2000
KSD_DRAWS = 400 if CI else 2000  # draws scored by the KSD (its cost is quadratic in this)
SEED = 0

# ---------------------------------------------------------------------------- data and model
# Estimated effects of coaching on SAT-V scores in eight high schools and their standard errors.
SCHOOLS = [
    "Choate",
    "Deerfield",
    "Phillips Andover",
    "Phillips Exeter",
    "Hotchkiss",
    "Lawrenceville",
    "St. Paul's",
    "Mt. Hermon",
]
Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def model(sigma, y=None):
    """Non-centred eight schools, in plain Pyro; nothing in it is specific to pyro_stein."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=sigma.dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0 * torch.ones((), dtype=sigma.dtype)))
    with pyro.plate("school", sigma.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(torch.zeros((), dtype=sigma.dtype), 1.0))
        # A deterministic site: not a latent variable, but recomputed by the export from each draw
        # and stored in the posterior group next to mu, tau and theta_tilde.
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


# ---------------------------------------------------------------------------- the fits
def fit_autonormal(sigma, y):
    """Pyro's mean-field Gaussian guide trained by maximising the ELBO."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    guide = AutoNormal(model)
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": (1e-3 / 1e-2) ** (1 / SVI_STEPS)})
    svi = SVI(model, guide, optim, Trace_ELBO())
    for _ in range(SVI_STEPS):
        svi.step(sigma, y)
    return guide


def fit_stein(sigma, y):
    """The same model, AmortizedSteinGuide in place of AutoNormal, AmortizedSVGD in place of SVI."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    guide = AmortizedSteinGuide(model)
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": (1e-3 / 1e-2) ** (1 / STEIN_STEPS)})
    svgd = AmortizedSVGD(model, guide, optim, num_particles=NUM_PARTICLES)
    svgd.run(sigma, y, num_steps=STEIN_STEPS, progress_bar=False)
    return guide


def fit_nuts(sigma, y):
    pyro.set_rng_seed(SEED)
    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=NUTS_SAMPLES, warmup_steps=NUTS_WARMUP, disable_progbar=True)
    mcmc.run(sigma, y)
    return mcmc


def latent_draws(idata):
    """The latent sites of an export as {site: Tensor[chains * draws, *shape]}, for stein_discrepancy."""
    post = idata.posterior
    return {k: torch.as_tensor(post[k].values).reshape((-1,) + post[k].shape[2:]) for k in ("mu", "tau", "theta_tilde")}


# ---------------------------------------------------------------------------- main
def main():
    torch.set_default_dtype(torch.float64)
    OUT.mkdir(parents=True, exist_ok=True)
    sigma, y = torch.tensor(SIGMA), torch.tensor(Y)
    lines = []  # everything printed, also saved to summary.txt

    def say(text=""):
        print(text, flush=True)
        lines.append(str(text))

    say(f"eight schools, J = {len(Y)}; mode = {'CI smoke' if CI else 'full'}")
    # Constructing the first torch optimizer imports torch._dynamo (5-10 s); do it untimed.
    importlib.import_module("torch._dynamo")
    t_start = time.perf_counter()

    # -------------------------------------------------------------- fit
    t0 = time.perf_counter()
    auto = fit_autonormal(sigma, y)
    say(f"AutoNormal + SVI:           {SVI_STEPS} steps, {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    stein = fit_stein(sigma, y)
    say(
        f"AmortizedSteinGuide + SVGD: {STEIN_STEPS} steps x {NUM_PARTICLES} particles, {time.perf_counter() - t0:.1f} s"
    )

    # -------------------------------------------------------------- export
    # One call per guide. The model arguments come after (guide, model), exactly as they are
    # passed to the model. num_chains=4 draws 4 independent batches of NUM_DRAWS draws; since
    # the draws are i.i.d., R-hat ~ 1 and ESS ~ 4 * NUM_DRAWS are checks of the sampler itself.
    # `school` is the plate's name, so only its coordinate values need to be given.
    coords = {"school": SCHOOLS}
    t0 = time.perf_counter()
    pyro.set_rng_seed(SEED + 1)
    idata = {
        "AutoNormal": to_inference_data(
            auto, model, sigma, y, num_samples=NUM_DRAWS, num_chains=NUM_CHAINS, coords=coords
        ),
        "AmortizedStein": to_inference_data(
            stein, model, sigma, y, num_samples=NUM_DRAWS, num_chains=NUM_CHAINS, coords=coords
        ),
    }
    say(f"export: 2 x {NUM_CHAINS} chains x {NUM_DRAWS} draws, {time.perf_counter() - t0:.1f} s")
    say()
    say("groups of the Stein export: " + ", ".join(idata["AmortizedStein"].groups()))
    say(f"theta dims: {idata['AmortizedStein'].posterior['theta'].dims}")

    # -------------------------------------------------------------- summary
    say()
    say("az.summary of the AmortizedSteinGuide posterior:")
    summary = az.summary(idata["AmortizedStein"], var_names=["mu", "tau", "theta"], round_to=2)
    say(summary.to_string())

    # -------------------------------------------------------------- NUTS reference
    t0 = time.perf_counter()
    mcmc = fit_nuts(sigma, y)
    nuts = mcmc.get_samples()
    say()
    say(f"NUTS (reference): {NUTS_WARMUP} warmup + {NUTS_SAMPLES} draws, {time.perf_counter() - t0:.1f} s")
    # For the forest plot only. (az.from_pyro(mcmc) would convert the MCMC object directly, but
    # mcmc.get_samples() holds only the latent sites, so theta would be missing.)
    theta = nuts["mu"][:, None] + nuts["tau"][:, None] * nuts["theta_tilde"]
    # The pointwise log-likelihood is added by hand, so that NUTS's LOO can be printed for reference.
    log_lik = dist.Normal(theta, sigma).log_prob(y)
    idata_nuts = az.from_dict(
        posterior={k: v.numpy()[None] for k, v in {**nuts, "theta": theta}.items()},
        log_likelihood={"y": log_lik.numpy()[None]},
        observed_data={"y": y.numpy()},
        coords=coords,
        dims={"theta": ["school"], "theta_tilde": ["school"], "y": ["school"]},
    )
    for name in ("mu", "tau"):
        say(
            f"  {name:<4} mean (sd): "
            + ", ".join(
                f"{m} {float(d.posterior[name].mean()):.2f} ({float(d.posterior[name].std()):.2f})"
                for m, d in {**idata, "NUTS": idata_nuts}.items()
            )
        )

    # -------------------------------------------------------------- plots
    axes = az.plot_posterior(idata["AmortizedStein"], var_names=["mu", "tau", "theta"], hdi_prob=0.94)
    fig = np.ravel(axes)[0].figure
    fig.suptitle("eight schools: AmortizedSteinGuide posterior (94% HDI)")
    fig.savefig(OUT / "posterior_stein.png", dpi=80, bbox_inches="tight")
    plt.close(fig)

    axes = az.plot_forest(
        [idata["AutoNormal"], idata["AmortizedStein"], idata_nuts],
        model_names=["AutoNormal", "AmortizedStein", "NUTS"],
        var_names=["mu", "tau", "theta"],
        combined=True,
        hdi_prob=0.94,
        figsize=(7, 8),
    )
    fig = np.ravel(axes)[0].figure
    fig.suptitle("eight schools: 94% HDI of each approximation")
    fig.savefig(OUT / "forest.png", dpi=80, bbox_inches="tight")
    plt.close(fig)

    # -------------------------------------------------------------- LOO and compare
    # Both exports are the *same model*: LOO here compares two posterior approximations of one
    # model, so differences in elpd_loo reflect approximation quality (how well each guide
    # captures the posterior, e.g. the funnel in (tau, theta)), not a difference between models.
    # With only 8 observations, each of which pulls on its own school effect, some Pareto k
    # values are often above 0.7; ArviZ then warns that PSIS-LOO may be unreliable. The k values
    # are printed below instead, so the warning is silenced to keep the output tidy. NUTS's LOO
    # (from near-exact draws) is the value both approximations should reproduce: an approximation
    # can land above it too (e.g. one that shrinks all schools to a point), so the ranking in
    # az.compare is a ranking of predictive scores, not of accuracy; the KSD below measures that.
    say()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Pp]areto.*")
        warnings.filterwarnings("ignore", message=".*[Ee]stimated shape parameter.*")
        loo = {name: az.loo(d, pointwise=True) for name, d in {**idata, "NUTS (reference)": idata_nuts}.items()}
        comparison = az.compare(idata, ic="loo")
    for name, result in loo.items():
        k = np.asarray(result.pareto_k)
        say(
            f"LOO {name:<17} elpd_loo = {result.elpd_loo:8.2f} (se {result.se:.2f}), p_loo = {result.p_loo:5.2f}, "
            f"Pareto k max {k.max():.2f}, {int((k > 0.7).sum())} of {k.size} above 0.7"
        )
    say()
    say("az.compare (same model, two posterior approximations):")
    say(comparison.to_string())

    # -------------------------------------------------------------- KSD
    # KSD^2 of the draws under the model's posterior: near 0 for exact draws, larger for a worse
    # fit. It needs only the model's score, so it scores any draws, NUTS's included.
    say()
    say(f"kernelized Stein discrepancy KSD^2 of {KSD_DRAWS} draws (lower is better):")
    ksd = {
        name: stein_discrepancy(model, latent_draws(d), sigma, y, max_samples=KSD_DRAWS) for name, d in idata.items()
    }
    ksd["NUTS"] = stein_discrepancy(model, nuts, sigma, y, max_samples=KSD_DRAWS)
    for name, value in ksd.items():
        say(f"  {name:<15} {value:.4f}")

    say()
    say(f"total {time.perf_counter() - t_start:.1f} s; outputs in {OUT}")
    (OUT / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
