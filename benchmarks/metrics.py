"""Accuracy metrics comparing approximate draws with reference draws (``[num_draws, dim]`` matrices)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["c2st", "mmd_rbf", "sd_ratio", "standardized_mean_error"]

ArrayLike = torch.Tensor | np.ndarray


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t[:, None] if t.ndim == 1 else t


def c2st(
    reference: ArrayLike,
    approx: ArrayLike,
    seed: int = 0,
    n_folds: int = 5,
    max_samples: int = 10000,
    early_stopping: bool = False,
) -> float:
    """Classifier two-sample test accuracy after sbibm's definition (0.5: indistinguishable, 1: disjoint).

    Both samples are z-scored with the reference's mean and std; an MLP with two hidden layers of width
    ``10 * dim`` is trained to tell them apart and its ``n_folds``-fold (stratified, shuffled)
    cross-validated accuracy is returned. Two differences from sbibm's own ``c2st``: at most 1000
    adam iterations (sbibm: 10,000) and stratified folds (sbibm: plain ``KFold``). Samples larger than
    ``max_samples`` are subsampled (without replacement, seeded). Slow for 10,000 vs 10,000 draws: when the
    samples are close, adam keeps fitting noise and runs all 1000 epochs per fold. Use in benchmarks, not unit
    tests.

    :param reference: ``[n, dim]`` reference draws.
    :param approx: ``[m, dim]`` approximate draws.
    :param seed: seed of the subsampling, the fold split and the classifier.
    :param n_folds: number of cross-validation folds.
    :param max_samples: cap on the draws used from each sample.
    :param early_stopping: stop each fit on a 10% validation split (much faster; not sbibm's exact
        definition, so report which variant was used).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    X, Y = _as_numpy(reference), _as_numpy(approx)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"dimension mismatch: reference has {X.shape[1]} columns, approx {Y.shape[1]}")
    rng = np.random.default_rng(seed)
    if len(X) > max_samples:
        X = X[rng.choice(len(X), max_samples, replace=False)]
    if len(Y) > max_samples:
        Y = Y[rng.choice(len(Y), max_samples, replace=False)]
    mean, std = X.mean(0), X.std(0)
    std = np.where(std > 0, std, 1.0)
    data = np.concatenate([(X - mean) / std, (Y - mean) / std])
    target = np.concatenate([np.zeros(len(X)), np.ones(len(Y))])
    dim = X.shape[1]
    clf = MLPClassifier(
        hidden_layer_sizes=(10 * dim, 10 * dim),
        activation="relu",
        max_iter=1000,
        solver="adam",
        random_state=seed,
        early_stopping=early_stopping,
    )
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Indistinguishable samples give a noisy loss that may not meet adam's tolerance within max_iter;
        # the accuracy is still meaningful (this matches sbibm, which lets the warning pass).
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(clf, data, target, cv=cv, scoring="accuracy")
    return float(np.mean(scores))


def quiet_c2st(reference: ArrayLike, approx: ArrayLike, seed: int = 0, early_stopping: bool = True) -> float:
    """:func:`c2st` with every warning silenced (the benchmarks' scoring of many fits); ``early_stopping=False``
    for small draw counts: with 500 + 500 draws or fewer the early-stopped classifier can stop before it learns
    anything (0.5 for NUTS sitting in 1 of the 25 modes of the 25-Gaussian mixture)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(c2st(reference, approx, seed=seed, early_stopping=early_stopping))


def standardized_mean_error(reference: ArrayLike, approx: ArrayLike) -> torch.Tensor:
    """Per column ``|mean(approx) - mean(reference)| / sd(reference)``.

    :param reference: ``[n, dim]`` reference draws.
    :param approx: ``[m, dim]`` approximate draws.
    :returns: ``[dim]`` tensor.
    """
    R, A = _as_tensor(reference), _as_tensor(approx).to(_as_tensor(reference))
    return (A.mean(0) - R.mean(0)).abs() / R.std(0)


def sd_ratio(reference: ArrayLike, approx: ArrayLike) -> torch.Tensor:
    """Per column ``sd(approx) / sd(reference)`` (1 is ideal; < 1 means under-dispersed).

    :param reference: ``[n, dim]`` reference draws.
    :param approx: ``[m, dim]`` approximate draws.
    :returns: ``[dim]`` tensor.
    """
    R, A = _as_tensor(reference), _as_tensor(approx).to(_as_tensor(reference))
    return A.std(0) / R.std(0)


def worst_ratio(ratios: torch.Tensor) -> float:
    """The ratio farthest from 1 on a log scale (so 0.5 and 2 are equally bad), e.g. of :func:`sd_ratio`."""
    return float(ratios[ratios.log().abs().argmax()])


def mmd_rbf(x: ArrayLike, y: ArrayLike, bandwidth: float | None = None) -> float:
    """Unbiased squared maximum mean discrepancy with kernel ``exp(-|a-b|^2 / (2 h^2))``.

    Builds the full ``(n+m)^2`` kernel matrix: meant for small toy samples (a few thousand draws).

    :param x: ``[n, dim]`` sample (n >= 2).
    :param y: ``[m, dim]`` sample (m >= 2).
    :param bandwidth: ``h``; default: the median pairwise distance of the pooled sample.
    :returns: MMD^2 estimate (can be slightly negative when the distributions agree).
    """
    X, Y = _as_tensor(x), _as_tensor(y).to(_as_tensor(x))
    n, m = X.shape[0], Y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_rbf needs at least 2 draws per sample, got {n} and {m}")
    Z = torch.cat([X, Y])
    d2 = torch.cdist(Z, Z).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(n + m, dtype=torch.bool, device=Z.device)]
        bandwidth = off.sqrt().median().item()
    K = torch.exp(-d2 / (2 * bandwidth**2))
    kxx, kyy, kxy = K[:n, :n], K[n:, n:], K[:n, n:]
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )
