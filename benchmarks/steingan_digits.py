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
inception-style score ``exp(E_x KL(p(y|x) || p(y)))`` with that network, and its agreement with
the generator's labels. Data: the split and preprocessing of ``tutorials/steingan_digits.py``
(``RandomState(0)``: 1297 train / 500 test; dequantized, standardized per pixel).
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
    """A small MLP classifier trained on the real training split: features (its hidden layer) and class probabilities."""

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


def quality(fnet: FeatureNet, x: np.ndarray, y: np.ndarray, ref_features: np.ndarray) -> dict[str, float]:
    x = np.clip(x, -50.0, 50.0)
    p = np.clip(fnet.proba(x), 1e-12, 1.0)
    py = p.mean(0)
    score = float(np.exp((p * (np.log(p) - np.log(py))).sum(1).mean()))
    return {
        "frechet": frechet_distance(fnet.features(x), ref_features),
        "inception_score": score,
        "label_agreement": float((p.argmax(1) == y).mean()),
    }


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se, "per_seed": v.tolist()}


def save_grids(drivers: dict, path: Path, mu: np.ndarray, sd: np.ndarray, xtr, ytr) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def canvas(imgs):  # imgs: (rows=8, cols=10, 8, 8)
        out = np.ones((8 * 9 - 1, 10 * 9 - 1))
        for r in range(imgs.shape[0]):
            for c in range(imgs.shape[1]):
                out[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = imgs[r, c]
        return out

    def img(x):
        return np.clip(x * sd + mu, 0, 1).reshape(-1, 8, 8)

    panels = {"real training digits": np.stack([img(xtr[ytr == k][:8]) for k in range(10)], 1)}
    torch.manual_seed(123)
    labels = torch.arange(10).repeat(8)
    for name, drv in drivers.items():
        panels[f"{name} samples"] = img(drv.sample(80, labels=labels).double().numpy()).reshape(8, 10, 8, 8)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4))
    for ax, (title, ims) in zip(np.atleast_1d(axes), panels.items()):
        ax.imshow(canvas(ims), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{title} (column = class)")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    ref = fnet.features(xte)
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
            qual[method].append(quality(fnet, x, y, ref))
            train_s[method].append(secs)
            keep.setdefault(method, drv)
            print(
                f"{method:9s} seed {seed}: test accuracy {acc[method][-1]:.3f}, Frechet {qual[method][-1]['frechet']:.2f}, "
                f"train {secs:.1f}s",
                flush=True,
            )
        rs = np.random.RandomState(seed)
        idx = np.concatenate(
            [rs.choice(np.flatnonzero(ytr == k), cfg["dup_per_class"], replace=False) for k in range(10)]
        )
        rep = np.resize(idx, n)  # the subset, repeated to the generated sample's size
        acc["duplicate"].append(classifier_accuracy(xtr[rep], ytr[rep], xte, yte))
        qual["duplicate"].append(quality(fnet, xtr[rep], ytr[rep], ref))
    real_acc = classifier_accuracy(xtr, ytr, xte, yte)
    real_q = quality(fnet, xtr, ytr, ref)
    rows = []
    for method in ("SteinGAN", "GAN", "duplicate"):
        row = {"method": method, "test_accuracy": _summary(acc[method])}
        for key in ("frechet", "inception_score", "label_agreement"):
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
    result = {
        "mode": mode,
        "data": "sklearn digits 8x8, split RandomState(0) 1297 train / 500 test, dequantized (v+u)/17, standardized per pixel",
        "generator": f"MLPSampler(noise {NOISE}, hidden {list(HIDDEN)}, class-conditional, 10 classes)",
        "energy": energy,
        "energy_l2": energy_l2,
        "steingan": (
            f"AmortizedMLE, MLPEnergy(64, hidden {list(HIDDEN)}, class-conditional, confinement 4), RBF kernel on pixels"
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
        "results": rows,
        "steingan_minus_gan_accuracy": _summary(diff),
        "wall_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
    }
    name = "steingan_digits" + ("" if energy == "mlp" else f"_{energy}") + (f"_l2_{energy_l2:g}" if energy_l2 else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    if mode != "smoke":
        save_grids(keep, out / f"{name}_samples.png", mu, sd, xtr, ytr)
    return result


def _fmt(s: dict, digits: int) -> str:
    return f"{s['mean']:.{digits}f}" + ("" if s["se"] is None else f" ± {s['se']:.{digits}f}")


def markdown(r: dict) -> str:
    lines = [
        f"Class-conditional generators on the 8x8 digits ({r['energy']} energy/discriminator, SteinGAN energy_l2 "
        f"{r.get('energy_l2', 0.0):g}), {r['updates']} updates, batch {r['batch_size']}, "
        f"{len(r['seeds'])} seed(s) {r['seeds']}, {r['num_generated']} generated labelled images per generator; "
        f"mean ± standard error over seeds. Wall time {r['wall_seconds']:.0f} s ({r['threads']} thread(s)).",
        "",
        "| training data of the classifier | real test accuracy | Fréchet distance | inception-style score | label agreement |",
        "|---|---|---|---|---|",
    ]
    for row in r["results"]:
        lines.append(
            f"| {row['method']} | {_fmt(row['test_accuracy'], 3)} | {_fmt(row['frechet'], 2)} | "
            f"{_fmt(row['inception_score'], 2)} | {_fmt(row['label_agreement'], 3)} |"
        )
    d = r["steingan_minus_gan_accuracy"]
    lines += ["", f"SteinGAN − GAN accuracy, paired by seed: {_fmt(d, 3)}."]
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
    a = p.parse_args(argv)
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
