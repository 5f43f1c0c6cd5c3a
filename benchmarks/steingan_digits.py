"""SteinGAN against a GAN on the paper's own test, on scikit-learn's 8x8 digits.

``python -m benchmarks.steingan_digits [--smoke] [--seeds 0,1,2] [--steps N] [--out DIR]``; with the
environment variable ``CI`` set the smoke configuration is the default.

The test (Wang & Liu 2016, CIFAR-10 experiment): train a class-conditional generator, draw a large
labelled sample from it, train a classifier *only* on that sample and measure its accuracy on the
real test split. Rows:

* ``SteinGAN``: :class:`~pyro_stein.ebm.AmortizedMLE` with a class-conditional
  :class:`~pyro_stein.ebm.MLPEnergy` ``E(x, y)`` and a class-conditional
  :class:`~pyro_stein.ebm.MLPSampler` (RBF kernel on the pixels, median bandwidth, block-diagonal
  by label);
* ``GAN``: :class:`~pyro_stein.gan.GAN` (non-saturating loss) with the *same* generator
  architecture and a discriminator that is the same network as the energy (``MLPEnergy``
  without the quadratic confinement; its output is the logit); same optimiser (Adam, same
  learning rate and betas), batch size and number of updates (one discriminator/energy update and
  one generator update per step);
* ``real``: the classifier on the real training split (the ceiling);
* ``duplicate``: the classifier on a small random subset of real training images (``dup_per_class``
  per class), repeated to the size of the generated sample.

``--energy autoencoder`` uses the paper's energy instead
(:class:`~pyro_stein.ebm.AutoencoderEnergy`, the kernel on its encoder's code) and the same
autoencoder network as the GAN's discriminator (``D = -E``); results go to
``steingan_digits_autoencoder.json``. ``--energy-l2 ALPHA`` adds ``AmortizedMLE``'s stabilizer
``ALPHA * (mean E(data)^2 + mean E(samples)^2)`` to SteinGAN's energy loss (the GAN is unchanged).

The classifier is scikit-learn's ``LogisticRegression`` (the same settings for every row).
Sample quality: the Fréchet distance between the generated sample and the real test split in the
hidden-layer features of an ``MLPClassifier`` trained on the real training split, an
inception-style score ``exp(E_x KL(p(y|x) || p(y)))`` with that network, its agreement with
the generator's labels, and the within-class spread: the total variance (sum of per-pixel
variances) of each class's images over that of the real test images of the class, averaged over
classes (1 = as varied as real digits; a generator that ignores its noise scores near 0). Figures:
per-class samples and a latent random walk of the first seed's generators. Data: the split and
preprocessing of ``tutorials/steingan_digits.py`` (``RandomState(0)``: 1297 train / 500 test;
dequantized, standardized per pixel).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pyro_stein.ebm import AmortizedMLE, AutoencoderEnergy, MLPEnergy, MLPSampler
from pyro_stein.gan import GAN

CONFIG = {
    "smoke": {"steps": 30, "seeds": [0], "num_generated": 2000, "dup_per_class": 10},
    "full": {"steps": 3000, "seeds": [0, 1, 2, 3, 4], "num_generated": 20000, "dup_per_class": 10},
}
NOISE, HIDDEN, BATCH, LR, BETAS = 32, (128, 128), 100, 1e-3, (0.5, 0.9)
NUM_CLASSES = 10
WALK_STEPS, WALK_RHO, WALK_SEED = 12, 0.9, 3  # the latent random-walk figure: steps, correlation, seed


def load_data():
    """Standardized dequantized digits: ``(x_train, y_train, x_test, y_test, mean, sd)`` (float64 numpy)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X, y = digits.data.astype(np.float64), digits.target
    rs = np.random.RandomState(0)
    perm = rs.permutation(len(X))
    Xd = (X + rs.uniform(size=X.shape)) / 17.0
    tr, te = perm[:1297], perm[1297:]
    mu, sd = Xd[tr].mean(0), Xd[tr].std(0)
    Z = (Xd - mu) / sd
    return Z[tr], y[tr], Z[te], y[te], mu, sd


def _models():
    sampler = MLPSampler(NOISE, 64, hidden=HIDDEN, num_classes=NUM_CLASSES)
    opt_s = torch.optim.Adam(sampler.parameters(), LR, betas=BETAS)
    return sampler, opt_s


class Negated(nn.Module):
    """``D(x, y) = -E(x, y)``: an energy network used as a discriminator (low energy = "looks like data")."""

    def __init__(self, energy: nn.Module):
        super().__init__()
        self.energy = energy

    def forward(self, x, y=None):
        return -(self.energy(x) if y is None else self.energy(x, y))


def _network(energy: str, confinement: float | None) -> nn.Module:
    if energy == "mlp":
        return MLPEnergy(64, hidden=HIDDEN, num_classes=NUM_CLASSES, confinement=confinement)
    if energy == "autoencoder":
        return AutoencoderEnergy((1, 8, 8), channels=16, code_dim=16, num_classes=NUM_CLASSES, confinement=confinement)
    raise ValueError(f"energy must be 'mlp' or 'autoencoder', got {energy!r}")


def train_generator(
    method: str, seed: int, xtr: np.ndarray, ytr: np.ndarray, steps: int, energy: str = "mlp", energy_l2: float = 0.0
):
    """Train ``method`` ("SteinGAN" or "GAN") from ``seed`` with the ``energy`` network ("mlp": the kernel on the
    pixels; "autoencoder": the paper's energy, the kernel on its code); returns ``(driver, seconds)``."""
    torch.manual_seed(seed)
    x = torch.tensor(xtr, dtype=torch.float32)
    y = torch.tensor(ytr, dtype=torch.long)
    sampler, opt_s = _models()
    if method == "SteinGAN":
        net = _network(energy, 4.0)
        driver = AmortizedMLE(
            net,
            sampler,
            torch.optim.Adam(net.parameters(), LR, betas=BETAS),
            opt_s,
            noise_dim=NOISE,
            compute_ksd=False,
            energy_l2=energy_l2,
            feature_fn=net.features if energy == "autoencoder" else None,
        )
    elif method == "GAN":
        net = Negated(_network(energy, None))
        driver = GAN(net, sampler, torch.optim.Adam(net.parameters(), LR, betas=BETAS), opt_s, noise_dim=NOISE)
    else:
        raise ValueError(f"method must be 'SteinGAN' or 'GAN', got {method!r}")
    t0 = time.perf_counter()
    driver.run(
        x,
        num_steps=steps,
        batch_size=BATCH,
        labels=y,
        progress_bar=False,
        generator=torch.Generator().manual_seed(seed),
    )
    return driver, time.perf_counter() - t0


def generate(driver, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled draws, classes balanced (``n // 10`` per class, the rest spread over the first classes)."""
    torch.manual_seed(10_000 + seed)
    labels = torch.arange(n) % NUM_CLASSES
    x = driver.sample(n, labels=labels)
    return x.double().numpy(), labels.numpy()


def classifier_accuracy(x: np.ndarray, y: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """Accuracy on the real test split of a LogisticRegression trained on ``(x, y)``."""
    from sklearn.linear_model import LogisticRegression

    x = np.clip(x, -50.0, 50.0)  # a diverged generator must not crash the solver; real data lie in about [-5, 30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the cap below is the same for every row
        clf = LogisticRegression(C=1.0, max_iter=500).fit(x, y)
    return float((clf.predict(xte) == yte).mean())


class FeatureNet:
    """A small MLP classifier trained on the real training split: features (its hidden layer) and class
    probabilities."""

    def __init__(self, xtr: np.ndarray, ytr: np.ndarray):
        from sklearn.neural_network import MLPClassifier

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500, random_state=0).fit(xtr, ytr)

    def features(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.net.coefs_[0] + self.net.intercepts_[0], 0.0)

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self.net.predict_proba(x)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """``||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})`` between Gaussian fits of two feature sets."""
    from scipy import linalg

    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # features that are zero on every image (dead ReLUs) make C1 C2 singular: harmless
        covmean = linalg.sqrtm(c1 @ c2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2.0 * covmean))


def class_variances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Total variance (sum of the per-pixel variances) of the images of each class, ``(10,)``."""
    return np.array([x[y == k].var(0).sum() for k in range(NUM_CLASSES)])


def quality(
    fnet: FeatureNet, x: np.ndarray, y: np.ndarray, ref_features: np.ndarray, ref_class_var: np.ndarray
) -> dict[str, float]:
    """Sample quality of labelled images ``(x, y)`` against the real test split (its features ``ref_features`` and
    per-class total variances ``ref_class_var``)."""
    x = np.clip(x, -50.0, 50.0)
    p = np.clip(fnet.proba(x), 1e-12, 1.0)
    py = p.mean(0)
    score = float(np.exp((p * (np.log(p) - np.log(py))).sum(1).mean()))
    return {
        "frechet": frechet_distance(fnet.features(x), ref_features),
        "inception_score": score,
        "label_agreement": float((p.argmax(1) == y).mean()),
        "class_spread": float((class_variances(x, y) / ref_class_var).mean()),
    }


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se, "per_seed": v.tolist()}


def _images(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Standardized draws back to ``[0, 1]`` pixels, ``(n, 8, 8)``."""
    return np.clip(x * sd + mu, 0, 1).reshape(-1, 8, 8)


def _canvas(imgs: np.ndarray) -> np.ndarray:
    """``(rows, cols, 8, 8)`` images on one canvas, one pixel of separator between them."""
    rows, cols = imgs.shape[:2]
    out = np.ones((rows * 9 - 1, cols * 9 - 1))
    for r in range(rows):
        for c in range(cols):
            out[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = imgs[r, c]
    return out


def _save_panels(panels: dict[str, np.ndarray], path: Path, width: float, height: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height))
    for ax, (title, ims) in zip(np.atleast_1d(axes), panels.items()):
        ax.imshow(_canvas(ims), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_grids(drivers: dict, path: Path, mu: np.ndarray, sd: np.ndarray, xtr, ytr) -> None:
    """Per-class samples of each generator next to real training digits: 8 rows, column = class."""
    panels = {
        "real training digits (column = class)": np.stack([_images(xtr[ytr == k][:8], mu, sd) for k in range(10)], 1)
    }
    torch.manual_seed(123)
    labels = torch.arange(10).repeat(8)
    for name, drv in drivers.items():
        x = drv.sample(80, labels=labels).double().numpy()
        panels[f"{name} samples (column = class)"] = _images(x, mu, sd).reshape(8, 10, 8, 8)
    _save_panels(panels, path, 5.0, 4.4)


def latent_walk(num_steps: int, noise_dim: int, seed: int, rho: float = WALK_RHO) -> torch.Tensor:
    """A random walk in the noise space, ``xi_{t+1} = rho xi_t + sqrt(1 - rho^2) eps_t``, started at
    ``xi_0 ~ N(0, I)``: every ``xi_t`` is a standard normal draw, consecutive ones are correlated by ``rho``.
    Returns ``(num_steps, noise_dim)``."""
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(noise_dim, generator=g)
    walk = [xi]
    for _ in range(num_steps - 1):
        xi = rho * xi + math.sqrt(1.0 - rho**2) * torch.randn(noise_dim, generator=g)
        walk.append(xi)
    return torch.stack(walk)


def save_latent_walk(drivers: dict, path: Path, mu: np.ndarray, sd: np.ndarray) -> None:
    """The paper's latent random walk: each generator's images along one walk in the noise space (columns), for
    every class (rows); the same walk for all classes and both generators."""
    noise = latent_walk(WALK_STEPS, NOISE, seed=WALK_SEED)
    panels = {}
    for name, drv in drivers.items():
        x = torch.cat([drv.sample(WALK_STEPS, labels=torch.full((WALK_STEPS,), k), noise=noise) for k in range(10)])
        panels[f"{name}: noise random walk (row = class)"] = _images(x.double().numpy(), mu, sd).reshape(
            10, WALK_STEPS, 8, 8
        )
    _save_panels(panels, path, 6.0, 5.6)


def run(
    mode: str,
    out: Path,
    seeds: list[int] | None = None,
    steps: int | None = None,
    num_generated: int | None = None,
    energy: str = "mlp",
    energy_l2: float = 0.0,
) -> dict:
    cfg = dict(CONFIG[mode])
    if seeds is not None:
        cfg["seeds"] = seeds
    if steps is not None:
        cfg["steps"] = steps
    if num_generated is not None:
        cfg["num_generated"] = num_generated
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte, mu, sd = load_data()
    fnet = FeatureNet(xtr, ytr)
    ref, ref_var = fnet.features(xte), class_variances(xte, yte)
    n = cfg["num_generated"]
    acc = {"SteinGAN": [], "GAN": [], "duplicate": []}
    qual = {"SteinGAN": [], "GAN": [], "duplicate": []}
    train_s = {"SteinGAN": [], "GAN": []}
    keep = {}
    for seed in cfg["seeds"]:
        for method in ("SteinGAN", "GAN"):
            drv, secs = train_generator(method, seed, xtr, ytr, cfg["steps"], energy, energy_l2)
            x, y = generate(drv, n, seed)
            acc[method].append(classifier_accuracy(x, y, xte, yte))
            qual[method].append(quality(fnet, x, y, ref, ref_var))
            train_s[method].append(secs)
            keep.setdefault(method, drv)
            print(
                f"{method:9s} seed {seed}: test accuracy {acc[method][-1]:.3f}, "
                f"Frechet {qual[method][-1]['frechet']:.2f}, train {secs:.1f}s",
                flush=True,
            )
        rs = np.random.RandomState(seed)
        idx = np.concatenate(
            [rs.choice(np.flatnonzero(ytr == k), cfg["dup_per_class"], replace=False) for k in range(10)]
        )
        rep = np.resize(idx, n)  # the subset, repeated to the generated sample's size
        acc["duplicate"].append(classifier_accuracy(xtr[rep], ytr[rep], xte, yte))
        qual["duplicate"].append(quality(fnet, xtr[rep], ytr[rep], ref, ref_var))
    real_acc = classifier_accuracy(xtr, ytr, xte, yte)
    real_q = quality(fnet, xtr, ytr, ref, ref_var)
    rows = []
    for method in ("SteinGAN", "GAN", "duplicate"):
        row = {"method": method, "test_accuracy": _summary(acc[method])}
        for key in ("frechet", "inception_score", "label_agreement", "class_spread"):
            row[key] = _summary([q[key] for q in qual[method]])
        if method in train_s:
            row["train_seconds"] = _summary(train_s[method])
        rows.append(row)
    rows.append(
        {
            "method": "real",
            "test_accuracy": {"mean": real_acc, "se": None, "per_seed": [real_acc]},
            **{k: {"mean": v, "se": None, "per_seed": [v]} for k, v in real_q.items()},
        }
    )
    a, b = rows[0]["test_accuracy"], rows[1]["test_accuracy"]
    diff = [u - v for u, v in zip(a["per_seed"], b["per_seed"])]
    name = "steingan_digits" + ("" if energy == "mlp" else f"_{energy}") + (f"_l2_{energy_l2:g}" if energy_l2 else "")
    figures = {"samples": f"{name}_samples.png", "latent_walk": f"{name}_latent_walk.png"}
    save_grids(keep, out / figures["samples"], mu, sd, xtr, ytr)
    save_latent_walk(keep, out / figures["latent_walk"], mu, sd)
    result = {
        "mode": mode,
        "data": "sklearn digits 8x8, split RandomState(0) 1297 train / 500 test, dequantized (v+u)/17, "
        "standardized per pixel",
        "generator": f"MLPSampler(noise {NOISE}, hidden {list(HIDDEN)}, class-conditional, 10 classes)",
        "energy": energy,
        "energy_l2": energy_l2,
        "steingan": (
            f"AmortizedMLE, MLPEnergy(64, hidden {list(HIDDEN)}, class-conditional, confinement 4), "
            "RBF kernel on pixels"
            if energy == "mlp"
            else "AmortizedMLE, AutoencoderEnergy((1, 8, 8), channels 16, code 16, class-conditional, confinement 4), "
            "RBF kernel on the encoder's code (feature_fn=energy.features)"
        )
        + ", median bandwidth, 1 sampler update per energy update"
        + (
            f", energy_l2={energy_l2} (alpha * (mean E(data)^2 + mean E(samples)^2) added to the energy's loss)"
            if energy_l2
            else ", energy_l2=0 (the exact contrastive loss)"
        ),
        "gan": "GAN (non-saturating), discriminator D = -E for the same network as the energy, without the confinement "
        f"({'MLPEnergy' if energy == 'mlp' else 'AutoencoderEnergy'})",
        "optimizer": f"Adam lr={LR} betas={BETAS} for both networks of both methods",
        "updates": cfg["steps"],
        "batch_size": BATCH,
        "seeds": cfg["seeds"],
        "num_generated": n,
        "dup_per_class": cfg["dup_per_class"],
        "classifier": "sklearn LogisticRegression(C=1, max_iter=500) on standardized pixels",
        "feature_net": "sklearn MLPClassifier(hidden 64, alpha 1e-3, random_state 0) on the real training split; "
        "Frechet distance in its ReLU features against the real test split (500 images)",
        "class_spread": "per class, total variance of the images over that of the real test images of the class "
        "(standardized pixels), averaged over the 10 classes",
        "results": rows,
        "steingan_minus_gan_accuracy": _summary(diff),
        "figures": {
            **figures,
            "drawn_by": f"the seed-{cfg['seeds'][0]} generators; the walk: rho={WALK_RHO}, {WALK_STEPS} steps, "
            f"seed {WALK_SEED}, the same noise for every class and both generators",
        },
        "wall_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    return result


def _fmt(s: dict, digits: int) -> str:
    return f"{s['mean']:.{digits}f}" + ("" if s["se"] is None else f" ± {s['se']:.{digits}f}")


def verdict(r: dict) -> str:
    """The paper's finding, judged from the numbers: SteinGAN's accuracy above the GAN's by more than the two
    standard errors together (``mean_S - mean_G > se_S + se_G``); the paired difference is reported with it."""
    rows = {row["method"]: row["test_accuracy"] for row in r["results"]}
    s, g, d = rows["SteinGAN"], rows["GAN"], r["steingan_minus_gan_accuracy"]
    paired = f"SteinGAN − GAN accuracy, paired by seed: {_fmt(d, 3)} ({len(d['per_seed'])} seed(s))."
    if s["se"] is None or g["se"] is None:
        return paired + " One seed: no standard errors, no verdict."
    gap, margin = s["mean"] - g["mean"], s["se"] + g["se"]
    if gap > margin:
        outcome = "higher than the GAN's by more than the standard errors: the paper's finding is reproduced"
    elif gap < -margin:
        outcome = "lower than the GAN's by more than the standard errors: the paper's finding is not reproduced"
    else:
        outcome = "within the standard errors of the GAN's: the paper's finding is not reproduced"
    return (
        f"{paired} SteinGAN's accuracy ({_fmt(s, 3)}) is {outcome} "
        f"(difference {gap:+.3f}, standard errors together {margin:.3f})."
    )


def markdown(r: dict) -> str:
    """The result table of a run, generated from its JSON (``--markdown-from`` regenerates it)."""
    machine = f"{r['threads']} thread(s)" + (f", {r['cpu_count']} CPU cores" if r.get("cpu_count") else "")
    lines = [
        f"Class-conditional generators on the 8x8 digits ({r['energy']} energy/discriminator, SteinGAN energy_l2 "
        f"{r.get('energy_l2', 0.0):g}), {r['updates']} updates, batch {r['batch_size']}, "
        f"{len(r['seeds'])} seed(s) {r['seeds']}, {r['num_generated']} generated labelled images per generator; "
        f"mean ± standard error over seeds. Wall time of the whole run {r['wall_seconds']:.0f} s ({machine}).",
        "",
        "| training data of the classifier | real test accuracy | Fréchet distance | inception-style score "
        "| label agreement | within-class spread | training time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        secs = _fmt(row["train_seconds"], 1) if "train_seconds" in row else "–"
        spread = _fmt(row["class_spread"], 2) if "class_spread" in row else "–"  # absent from older runs
        lines.append(
            f"| {row['method']} | {_fmt(row['test_accuracy'], 3)} | {_fmt(row['frechet'], 2)} | "
            f"{_fmt(row['inception_score'], 2)} | {_fmt(row['label_agreement'], 3)} | {spread} | {secs} |"
        )
    lines += ["", verdict(r)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.steingan_digits", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny configuration (also the default when CI is set)")
    p.add_argument("--full", action="store_true", help="the full configuration (default unless CI is set)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (overrides the mode's)")
    p.add_argument("--steps", type=int, default=None, help="updates per generator (overrides the mode's)")
    p.add_argument("--num-generated", type=int, default=None)
    p.add_argument(
        "--energy",
        choices=("mlp", "autoencoder"),
        default="mlp",
        help="energy / discriminator network (autoencoder: the paper's, kernel on its code)",
    )
    p.add_argument(
        "--energy-l2",
        type=float,
        default=0.0,
        help="SteinGAN's energy_l2 stabilizer (0: the exact contrastive loss); the output name gets _l2_<value>",
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument(
        "--markdown-from",
        metavar="JSON",
        default=None,
        help="only rewrite the Markdown table next to an existing result file from its numbers (no training)",
    )
    a = p.parse_args(argv)
    if a.markdown_from:
        src = Path(a.markdown_from)
        text = markdown(json.loads(src.read_text()))
        src.with_suffix(".md").write_text(text)
        print(text, end="")
        return 0
    mode = "smoke" if a.smoke or (os.environ.get("CI") and not a.full) else "full"
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
    r = run(
        mode,
        Path(a.out),
        seeds=seeds,
        steps=a.steps,
        num_generated=a.num_generated,
        energy=a.energy,
        energy_l2=a.energy_l2,
    )
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
