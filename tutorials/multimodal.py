"""Multimodal posteriors: mode searches, a mixture of flows, Pareto k-hat and the log evidence.

Run: ``python tutorials/multimodal.py`` (about a minute on one CPU core). With the environment variable ``CI`` set it
runs a smoke version (few steps and draws). Figures and ``summary.txt`` go to ``--out DIR`` if given, else to
``pyro_stein_tutorials/multimodal/`` under the system's temporary folder (``.../ci/...`` in the smoke version).

The posterior of ``theta`` in ``y_ij ~ Normal(theta_j^2, 1)`` is sign-symmetric: four modes ``(+-a, +-b)`` of equal
mass. A sampler trained with the Stein direction from one start (the default guide, in the Laplace frame of one mode)
finds one of them. This tutorial

1. fits the default guide and a :class:`~pyro_stein.flows.FlowSampler` guide started at one mode: the flow's
   log-evidence estimate is ``log 4`` too low, and its Pareto k-hat may or may not flag it (k-hat cannot see a mode
   no draw reaches); weighing against the defensive mixture ``0.9 q + 0.1 prior`` (``defensive=0.1``) sends a tenth
   of the draws where the guide does not go, and those that land in a missed mode make k-hat rise;
2. searches for modes from 100 prior draws (:func:`~pyro_stein.modes.find_modes`), builds a mixture of one flow per
   mode, trains each with the Stein direction in its own frame (:func:`~pyro_stein.modes.fit_mixture`) and
   re-estimates the weights from importance weights;
3. reports the mass of each mode, k-hat, and the log evidence against the exact values (quadrature), and plots the
   draws;
4. amortizes over datasets: one :class:`~pyro_stein.flows.SymmetrizedSampler` guide for the whole family, and a
   table of k-hat per held-out dataset, for the base flow alone (one mode: k-hat against the defensive mixture flags
   every dataset) and for the symmetrized flow (every mode: k-hat small, masses a quarter each). That table is how
   to read k-hat per dataset: at most 0.7, use the draws (and reweight them if you like); above, do not trust that
   dataset's posterior, and refine the guide on it or fit it on its own.
"""

from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _common import CI, output_dir  # noqa: E402  (tutorials/_common.py)

from pyro_stein import Amortization, AmortizedSteinGuide, AmortizedSVGD  # noqa: E402
from pyro_stein.data import Dataset  # noqa: E402
from pyro_stein.diagnostics import draws_and_log_densities, importance_diagnostics  # noqa: E402
from pyro_stein.flows import FlowSampler, SymmetrizedSampler  # noqa: E402
from pyro_stein.importance import psis  # noqa: E402
from pyro_stein.modes import find_modes, fit_mixture, mixture_from_modes  # noqa: E402

OUT = output_dir("multimodal", __doc__.splitlines()[0])
STEPS = 20 if CI else 400  # training steps of each guide
DRAWS = 500 if CI else 4000  # draws for k-hat, the log evidence and the mode masses
TRAIN_DATASETS = 8 if CI else 128  # the amortized part's training datasets
AMORTIZED_STEPS = 20 if CI else 800


def model(y):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(theta**2, 1.0).to_event(1), obs=y)


def exact_log_evidence(y) -> float:
    """The posterior factorizes over the two coordinates: one quadrature each."""
    g = torch.linspace(-6.0, 6.0, 24001)
    total = 0.0
    for j in range(2):
        lp = dist.Normal(0.0, 2.0).log_prob(g) + dist.Normal(g[:, None] ** 2, 1.0).log_prob(y[:, j]).sum(-1)
        total += float(torch.logsumexp(lp, 0)) + math.log(float(g[1] - g[0]))
    return total


def orthant_masses(z, smoothed_log_weights) -> list[float]:
    idx = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    return torch.zeros(4).index_add_(0, idx, smoothed_log_weights.exp()).tolist()


def family_dataset() -> Dataset:
    """A dataset of the family: 20 observations, |theta_j| between 0.7 and 2."""
    theta = torch.empty(2).uniform_(0.7, 2.0) * torch.sign(torch.randn(2))
    return Dataset(theta**2 + torch.randn(20, 2))


def amortized_khat_table() -> list[str]:
    """Part 4: one guide for the family, k-hat per held-out dataset."""
    train = [family_dataset() for _ in range(TRAIN_DATASETS)]
    held_out = [family_dataset() for _ in range(5)]
    flips = [([0, 1], [s0, s1]) for s0 in (1, -1) for s1 in (1, -1) if (s0, s1) != (1, 1)]
    sampler = SymmetrizedSampler(FlowSampler(2, context_dim=16 + 2, num_layers=2), flips)  # + 2 data means
    guide = AmortizedSteinGuide(
        model, amortized=Amortization(context_dim=16, mean_features=True), sampler=sampler, whiten=None
    )
    sampler.symmetrize = False  # train the base flow: one mode per dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AmortizedSVGD(model, guide, num_particles=64).run(datasets=train, num_steps=AMORTIZED_STEPS, batch_size=16)
    lines = [
        "amortized over datasets, per held-out dataset (k-hat against 0.9 q + 0.1 prior; masses --, -+, +-, ++):",
        "dataset | sampler | k-hat | log evidence error | mode masses | read as",
    ]
    for i, d in enumerate(held_out):
        y = d.args[0]
        for name, symmetrize in (("base flow", False), ("symmetrized", True)):
            sampler.symmetrize = symmetrize
            r = importance_diagnostics(guide, y, num_samples=DRAWS, defensive=0.1)
            z, log_q, log_p = draws_and_log_densities(guide, DRAWS, y)
            masses = orthant_masses(z, psis(log_p - log_q)[0])
            verdict = "usable" if float(r.khat) <= 0.7 else "do not trust: refine or fit on its own"
            lines.append(
                f"{i} | {name} | {float(r.khat):.2f} | {float(r.log_evidence) - exact_log_evidence(y):+.3f} | "
                + ", ".join(f"{m:.2f}" for m in masses)
                + f" | {verdict}"
            )
    sampler.symmetrize = True
    return lines


def main() -> None:
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    y = torch.tensor([1.2, 1.5]) ** 2 + torch.randn(30, 2)
    log_z = exact_log_evidence(y)
    lines = [f"exact log evidence: {log_z:.3f}; exact mode masses: 0.25 each (sign symmetry)", ""]

    # mode searches from prior draws (used by part 2; part 1 starts from the best mode only)
    probe = AmortizedSteinGuide(model, whiten=None).setup(y)
    modes = find_modes(probe, y, num_starts=100, num_steps=300)

    # 1. one start: the default guide, and a flow started at the Laplace approximation of one mode
    default = AmortizedSteinGuide(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short run's health warnings
        AmortizedSVGD(model, default, num_particles=32).run(y, num_steps=STEPS)
    z_default = default.sample_posterior(DRAWS, y)["theta"]
    sampler = FlowSampler(2, num_layers=2, init_loc=modes.locs[0], init_scale=modes.scale_trils[0])
    flow = AmortizedSteinGuide(model, sampler=sampler, whiten=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AmortizedSVGD(model, flow, num_particles=32).run(y, num_steps=STEPS)
    r = importance_diagnostics(flow, y, num_samples=DRAWS)
    lines.append(
        f"flow from one mode: k-hat {float(r.khat):.2f}, log evidence {float(r.log_evidence):.3f} "
        f"(error {float(r.log_evidence) - log_z:+.3f}; log 4 = {math.log(4):.3f})"
    )
    r = importance_diagnostics(flow, y, num_samples=DRAWS, defensive=0.1)
    lines.append(f"flow from one mode, against 0.9 q + 0.1 prior: k-hat {float(r.khat):.2f}")

    # 2. a mixture of flows, one per mode found
    lines.append(f"mode searches: {modes.locs.shape[0]} modes found, starts per mode {modes.counts.tolist()}")
    mixture = AmortizedSteinGuide(model, sampler=mixture_from_modes(modes, num_layers=2), whiten=None)
    fit_mixture(mixture, y, num_steps=STEPS, num_particles=32)
    r = importance_diagnostics(mixture, y, num_samples=DRAWS)
    z, log_q, log_p = draws_and_log_densities(mixture, DRAWS, y)
    masses = orthant_masses(z, psis(log_p - log_q)[0])
    lines += [
        f"mixture of flows: k-hat {float(r.khat):.2f}, log evidence {float(r.log_evidence):.3f} "
        f"(error {float(r.log_evidence) - log_z:+.3f} +- {float(r.log_evidence_se):.3f}), ESS {float(r.ess):.0f}",
        "mode masses (--, -+, +-, ++): " + ", ".join(f"{m:.3f}" for m in masses),
        "mixture of flows, against 0.9 q + 0.1 prior: k-hat "
        f"{float(importance_diagnostics(mixture, y, num_samples=DRAWS, defensive=0.1).khat):.2f}",
    ]
    lines += ["", *amortized_khat_table()]
    text = "\n".join(lines)
    print(text)
    (OUT / "summary.txt").write_text(text + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharex=True, sharey=True)
    axes[0].scatter(*z_default[:1000].T, s=2, alpha=0.4)
    axes[0].set_title("default guide (one start)")
    axes[1].scatter(*z[:1000].T, s=2, alpha=0.4, color="C1")
    axes[1].set_title("mixture of flows from mode searches")
    for ax in axes:
        ax.set_xlabel("theta_1")
    axes[0].set_ylabel("theta_2")
    fig.tight_layout()
    fig.savefig(OUT / "draws.png", dpi=110)


if __name__ == "__main__":
    main()
