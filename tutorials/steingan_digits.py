"""SteinGAN / amortized MLE on the 8x8 digits (Wang & Liu 2016, "Learning to Draw Samples").

Run: ``python tutorials/steingan_digits.py``. With the environment variable ``CI`` set it runs a
smoke version (a few steps, one seed). Figures and tables go to ``--out DIR`` if given, else to
``pyro_stein_tutorials/steingan_digits/`` under the system's temporary folder (``.../ci/...`` in
the smoke version).

Data: ``sklearn.datasets.load_digits`` (1797 images, integer pixels 0..16). Fixed split: a
``numpy.random.RandomState(0)`` permutation, first 1297 for training, last 500 for test. Pixels
are dequantized, ``(v + u) / 17`` with ``u ~ U(0, 1)`` drawn once with the same RandomState (so
the data have a proper continuous density on ``[0, 1]^64``), then standardized per pixel with
the training mean and standard deviation. Log-likelihoods are reported in nats per test
example in the standardized space; the ``[0, 1]`` (dequantized) density differs by the
constant ``-sum_d log sd_d`` (also reported).

Model: a Gaussian-Bernoulli RBM with 16 hidden units and fixed visible sd ``sigma = 0.7``,
so the test log-likelihood is exact (``2^16`` hidden states enumerated). Methods, each with
the same energy optimizer (Adam, lr 1e-3) and the same number of energy updates:

* amortized MLE (SteinGAN) with the kernel's repulsive term;
* the same without the repulsive term (the paper's ablation);
* CD-1, CD-10 and persistent CD-1;
* a reference: the same update with exact model samples as negatives (``rbm.sample``, by
  enumeration), i.e. the exact stochastic maximum-likelihood gradient. No method whose negative
  phase only approximates model samples can beat it in expectation at this budget.

The tutorial also measures how far the amortized-MLE sampler's draws are from the trained RBM:
the ratio of their total variance (sum of per-pixel variances) to the model's exact one.

Figures: samples of the amortized-MLE sampler next to real test digits, class-conditional
samples of a joint RBM ``p(x, y)`` with a class-conditional sampler, and a random walk in the
sampler's noise space (the paper's CelebA strip).

Last, the paper's quantitative test: SteinGAN against a GAN with the same class-conditional
generator. Each draws a large labelled sample; a classifier trained only on it is scored on the
real test split, next to the same classifier trained on the real training split (the ceiling)
and on 10 real images per class repeated ("duplicate"); plus a Fréchet distance and an
inception-style score in the features of a classifier trained on real digits, per-class sample
grids and a latent random walk of both generators. This part calls ``run`` of
``benchmarks/steingan_digits.py`` (``python -m benchmarks.steingan_digits``) with its full
configuration (5 seeds, 3000 updates each; its smoke configuration under ``CI``) and writes
``steingan_digits.json``, the table ``steingan_digits.md`` (generated from the JSON) and the
figures ``steingan_digits_samples.png`` and ``steingan_digits_latent_walk.png``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import CI, output_dir  # noqa: E402  (tutorials/_common.py)

from pyro_stein.ebm import AmortizedMLE, ContrastiveDivergence, GaussianBernoulliRBM, MLPSampler  # noqa: E402

# benchmarks/ is not part of the installed package: the classifier test is imported from the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import steingan_digits as classifier_test  # noqa: E402

OUT = output_dir("steingan_digits", __doc__.splitlines()[0])
STEPS = 30 if CI else 1500
COND_STEPS = 30 if CI else 2500
SEEDS = [0] if CI else [0, 1, 2]
SIGMA = 0.7
HIDDEN = 16
NOISE = 32
BATCH = 100
LR = 1e-3
EXACT = "exact-sample MLE (reference)"


def load_data():
    """The classifier test's split and standardisation (``classifier_test.load_data``), as float32/long tensors."""
    x_tr, y_tr, x_te, y_te, mu, sd = classifier_test.load_data()
    f, i = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a, dtype=torch.long))
    return f(x_tr), i(y_tr), f(x_te), i(y_te), mu, sd


def make_amle(rbm, repulsive, conditional=False):
    sampler = MLPSampler(NOISE, 64, hidden=(128, 128), num_classes=10 if conditional else None)
    return AmortizedMLE(
        rbm,
        sampler,
        torch.optim.Adam(rbm.parameters(), LR),
        torch.optim.Adam(sampler.parameters(), LR),
        noise_dim=NOISE,
        repulsive=repulsive,
        sampler_steps=2,
        compute_ksd=False,
    )


def train(method, seed, xtr, xte):
    torch.manual_seed(seed)
    rbm = GaussianBernoulliRBM(64, HIDDEN, sigma=SIGMA)
    opt = torch.optim.Adam(rbm.parameters(), LR)
    if method == "amortized MLE":
        driver = make_amle(rbm, True)
    elif method == "amortized MLE, no repulsion":
        driver = make_amle(rbm, False)
    else:
        k = {"CD-1": 1, "CD-10": 10, "PCD-1": 1, EXACT: 1}[method]
        driver = ContrastiveDivergence(rbm, opt, k=k, persistent=method.startswith("PCD"), exact=method == EXACT)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    driver.run(xtr, num_steps=STEPS, batch_size=BATCH, progress_bar=False, generator=gen)
    with torch.no_grad():
        ll = float(rbm.log_likelihood(xte).mean())
    return ll, time.time() - t0, driver


def to_images(x, mu, sd):
    return np.clip(x.detach().numpy() * sd + mu, 0, 1).reshape(-1, 8, 8)


def grid(ax, imgs, title, ncol=10):
    n = len(imgs)
    nrow = math.ceil(n / ncol)
    canvas = np.ones((nrow * 9 - 1, ncol * 9 - 1))
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        canvas[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = im
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")


def main():
    torch.set_num_threads(1)  # small models: one thread avoids OpenMP oversubscription on busy CPUs
    OUT.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte, mu, sd = load_data()
    log_jac = float(-np.log(sd).sum())
    methods = ["amortized MLE", "amortized MLE, no repulsion", "CD-1", "CD-10", "PCD-1", EXACT]
    results = {m: [] for m in methods}
    drivers = {}
    var_ratio = {m: [] for m in methods[:2]}
    for m in methods:
        for seed in SEEDS:
            ll, secs, drv = train(m, seed, xtr, xte)
            results[m].append(ll)
            drivers.setdefault(m, drv)
            extra = ""
            if m in var_ratio:  # sampler draws vs exact draws of the RBM it was trained against
                torch.manual_seed(seed)
                r = float(drv.sample(20_000).var(0).sum() / drv.energy.sample(20_000).var(0).sum())
                var_ratio[m].append(r)
                extra = f", sampler/model total variance {r:.2f}"
            print(f"{m:30s} seed {seed}: test LL {ll:.2f} nats ({secs:.0f}s){extra}", flush=True)

    rows = []
    for m in methods:
        v = np.array(results[m])
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
        rows.append({"method": m, "mean": float(v.mean()), "se": se, "per_seed": v.tolist()})
    summary = {
        "data": "sklearn digits 8x8, split RandomState(0) 1297 train / 500 test, dequantized (v+u)/17, "
        "standardized per pixel",
        "model": f"Gaussian-Bernoulli RBM, {HIDDEN} hidden, sigma={SIGMA}, exact log Z",
        "energy_updates": STEPS,
        "batch_size": BATCH,
        "energy_optimizer": f"Adam lr={LR}",
        "seeds": SEEDS,
        "log_jacobian_to_unit_interval_scale": log_jac,
        "results": rows,
        "sampler_over_model_total_variance": var_ratio,
    }
    (OUT / "loglik.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"Exact test log-likelihood (nats / example, standardized space; add {log_jac:.2f} for the [0,1] scale), "
        f"GB-RBM H={HIDDEN}, sigma={SIGMA}, {STEPS} energy updates, batch {BATCH}, {len(SEEDS)} seed(s), mean +- s.e.",
        "",
        "| method | test log-likelihood | per seed |",
        "|---|---|---|",
    ]
    for r in rows:
        se = "n/a" if r["se"] is None else f"{r['se']:.2f}"
        lines.append(f"| {r['method']} | {r['mean']:.2f} +- {se} | {', '.join(f'{v:.2f}' for v in r['per_seed'])} |")
    lines += [
        "",
        "Sampler draws' total variance / the trained RBM's (exact draws), per seed: "
        + "; ".join(f"{m}: {', '.join(f'{v:.2f}' for v in vs)}" for m, vs in var_ratio.items()),
    ]
    (OUT / "loglik.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    # samples next to real digits
    amle = drivers["amortized MLE"]
    norep = drivers["amortized MLE, no repulsion"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    grid(axes[0], to_images(xte[:50], mu, sd), "real test digits")
    grid(axes[1], to_images(amle.sample(50), mu, sd), "amortized MLE (SteinGAN) samples")
    grid(axes[2], to_images(norep.sample(50), mu, sd), "no repulsive term")
    fig.tight_layout()
    fig.savefig(OUT / "samples_vs_real.png", dpi=100)
    plt.close(fig)

    # class-conditional: joint RBM p(x, y) with a class-conditional sampler
    torch.manual_seed(0)
    jrbm = GaussianBernoulliRBM(64, HIDDEN, sigma=SIGMA, num_classes=10)
    cond = make_amle(jrbm, True, conditional=True)
    cond.run(
        xtr,
        num_steps=COND_STEPS,
        batch_size=BATCH,
        labels=ytr,
        progress_bar=not CI,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        jll = float(jrbm.log_likelihood(xte, yte).mean())
        acc = float(
            (torch.stack([-jrbm(xte, torch.full_like(yte, k)) for k in range(10)], -1).argmax(-1) == yte).float().mean()
        )
    labels = torch.arange(10).repeat_interleave(8)
    fig, ax = plt.subplots(figsize=(6, 8))
    grid(
        ax,
        to_images(cond.sample(80, labels=labels), mu, sd).reshape(10, 8, 8, 8).transpose(1, 0, 2, 3).reshape(80, 8, 8),
        "class-conditional samples (column = class 0..9)",
    )
    fig.tight_layout()
    fig.savefig(OUT / "class_conditional.png", dpi=100)
    plt.close(fig)

    # latent random walk: a smooth random walk in noise space for fixed classes
    g = torch.Generator().manual_seed(3)
    steps = 12
    rows_img = []
    for cls in (0, 3, 7):
        xi = torch.randn(NOISE, generator=g)
        walk = [xi]
        for _ in range(steps - 1):
            xi = 0.9 * xi + math.sqrt(1 - 0.81) * torch.randn(NOISE, generator=g)
            walk.append(xi)
        noise = torch.stack(walk)
        rows_img.append(to_images(cond.sample(steps, labels=torch.full((steps,), cls), noise=noise), mu, sd))
    # and an interpolation between two noise vectors for an unconditional sampler
    n0, n1 = torch.randn(NOISE, generator=g), torch.randn(NOISE, generator=g)
    t = torch.linspace(0, 1, steps).unsqueeze(-1)
    interp = torch.cos(t * math.pi / 2) * n0 + torch.sin(t * math.pi / 2) * n1
    rows_img.append(to_images(amle.sample(steps, noise=interp), mu, sd))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    grid(
        ax,
        np.concatenate(rows_img),
        "noise random walk (rows: class 0, 3, 7) and spherical interpolation (unconditional)",
        ncol=steps,
    )
    fig.tight_layout()
    fig.savefig(OUT / "latent_walk.png", dpi=100)
    plt.close(fig)

    summary["joint_model"] = {
        "test_log_p_x_y": jll,
        "test_accuracy_argmax_p_y_given_x": acc,
        "energy_updates": COND_STEPS,
    }
    (OUT / "loglik.json").write_text(json.dumps(summary, indent=2))
    print(f"joint RBM p(x, y): test log p(x, y) {jll:.2f}, classification accuracy {acc:.3f}")

    # the paper's classifier test, SteinGAN against a GAN: the benchmark's run, its table generated from its JSON
    result = classifier_test.run("smoke" if CI else "full", OUT)
    print(classifier_test.markdown(result))
    print(f"outputs in {OUT}")


if __name__ == "__main__":
    main()
