"""Importance weights of draws with a density: Pareto-smoothed importance sampling, its k-hat, resampling and
the log evidence.

Given the log weights ``log w_i = log p(z_i) - log q(z_i)`` of draws ``z_i ~ q`` against an unnormalized target
``p`` (a model's log joint), this module gives

* :func:`psis`: Pareto-smoothed log weights and the shape ``k-hat`` of the generalized Pareto distribution fitted to
  the largest weights (Vehtari et al. 2015/2024), the algorithm of ArviZ's ``psislw`` and of the ``loo`` R package;
* :func:`pareto_khat`: ``k-hat`` alone, a calibrated reliability score of ``q`` as an approximation of ``p`` (Yao et
  al. 2018): below 0.5 the importance-sampling estimates converge fast; up to 0.7 they are usable; above 0.7 ``q``
  misses mass of ``p`` (a mode, a tail) and neither ``q`` nor the reweighted draws should be trusted;
* :func:`importance_resample`: draws resampled with their smoothed weights (sampling importance resampling);
* :func:`log_evidence`: the estimate ``log mean w`` of the log normalizing constant of ``p``, with a standard error;
* :func:`importance_masses`: the posterior mass of each of a few regions (the modes of a multimodal posterior), with
  Monte Carlo standard errors.

All functions take log weights of shape ``(..., n)``: one set of ``n`` draws per leading index (e.g. one per
dataset of an amortized guide).

References:

[1] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance Sampling", JMLR 25, 2024.
[2] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational Inference", ICML 2018.
[3] J. Zhang, M. Stephens, "A New and Efficient Estimation Method for the Generalized Pareto Distribution",
    Technometrics 51, 2009.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "KHAT_GOOD",
    "KHAT_OK",
    "ImportanceResult",
    "ess",
    "importance_masses",
    "importance_resample",
    "log_evidence",
    "pareto_khat",
    "psis",
]

#: k-hat below this: the importance-sampling estimates converge at the Monte Carlo rate
KHAT_GOOD = 0.5
#: k-hat above this: the approximation misses mass of the target; do not trust it, nor its reweighted draws
KHAT_OK = 0.7


class ImportanceResult(NamedTuple):
    """What :func:`pyro_stein.diagnostics.importance_diagnostics` returns, per dataset (leading shape ``(...)``)."""

    log_weights: Tensor  #: raw log weights ``log p - log q`` ``(..., n)``
    smoothed_log_weights: Tensor  #: Pareto-smoothed and normalized (``logsumexp = 0``) ``(..., n)``
    khat: Tensor  #: Pareto k-hat ``(...)``
    log_evidence: Tensor  #: ``log mean w`` ``(...)``
    log_evidence_se: Tensor  #: its delta-method standard error ``(...)``
    ess: Tensor  #: effective sample size of the smoothed weights ``(...)``


def _tail_length(n: int) -> int:
    return int(math.ceil(min(0.2 * n, 3 * math.sqrt(n))))


def _gpdfit(x: np.ndarray) -> tuple[float, float]:
    """Zhang & Stephens' estimate of the generalized Pareto ``(k, sigma)`` of sorted positive exceedances ``x``,
    with ArviZ's weakly informative prior on ``k`` (shrinking it towards 0.5 by ``10`` pseudo-observations)."""
    n = len(x)
    m = 30 + int(n**0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    b /= 3 * x[int(n / 4 + 0.5) - 1]
    b += 1 / x[-1]
    k = np.log1p(-b[:, None] * x).mean(axis=1)
    len_scale = n * (np.log(-(b / k)) - k - 1)
    weights = 1 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    weights, b = weights[keep], b[keep]
    weights /= weights.sum()
    b_post = float(np.sum(b * weights))
    k_post = float(np.log1p(-b_post * x).mean())
    sigma = -k_post / b_post
    k_post = (n * k_post + 10 * 0.5) / (n + 10)
    return k_post, sigma


def _gpinv(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return np.full_like(p, np.nan)
    if abs(k) < np.finfo(float).eps:
        return -np.log1p(-p) * sigma
    return np.expm1(-k * np.log1p(-p)) / k * sigma


#: log weights whose range is below this are equal to numerical precision (an exact proposal): no tail to fit
_EQUAL_WEIGHTS = 1e-6


def _psis_1d(lw: np.ndarray) -> tuple[np.ndarray, float]:
    x = lw - lw.max()
    n = len(x)
    if -x.min() < _EQUAL_WEIGHTS:  # the weights are bounded (constant): the best case, k = -inf
        return np.full(n, -math.log(n)), -math.inf
    order = np.argsort(x)
    cutoff = max(x[order[-_tail_length(n) - 1]], np.log(np.finfo(float).tiny))
    tail = np.flatnonzero(x > cutoff)
    k = math.inf
    if len(tail) > 4:
        tail_order = np.argsort(x[tail])
        exceed = np.exp(x[tail][tail_order]) - math.exp(cutoff)
        k, sigma = _gpdfit(exceed)
        if math.isfinite(k):
            quantiles = np.arange(0.5, len(tail)) / len(tail)
            x[tail[tail_order]] = np.log(_gpinv(quantiles, k, sigma) + math.exp(cutoff))
            x[x > 0] = 0
    x = x - np.logaddexp.reduce(x)
    return x, k


def _checked(log_weights) -> Tensor:
    lw = torch.as_tensor(log_weights)
    if not lw.is_floating_point():
        lw = lw.double()
    if lw.dim() == 0 or lw.shape[-1] < 2:
        raise ValueError(f"log_weights must have shape (..., n) with n >= 2 draws, got {tuple(lw.shape)}")
    if torch.isnan(lw).any():
        raise ValueError("log_weights contain NaN; drop the draws whose log density could not be evaluated")
    return lw


def psis(log_weights) -> tuple[Tensor, Tensor]:
    """Pareto-smoothed importance sampling of the log weights ``(..., n)`` along the last dimension.

    The largest ``M = ceil(min(n / 5, 3 sqrt(n)))`` weights of each set are replaced by the expected order statistics
    of a generalized Pareto distribution fitted to them (Zhang & Stephens, with ArviZ's prior on ``k``), capped at the
    largest raw weight, and the weights are normalized. Independent draws are assumed (a relative efficiency of 1).
    A weight of ``-inf`` (a draw outside the target's support) stays at ``-inf``. Weights equal to numerical
    precision (log weights spanning less than ``1e-6``: the proposal is the target up to its normalization) have
    ``k-hat = -inf`` (bounded weights) rather than a fit to rounding noise.

    :param log_weights: ``log p(z_i) - log q(z_i)``, ``(..., n)``.
    :returns: ``(smoothed log weights (..., n) with logsumexp 0, k-hat (...))``; k-hat is ``inf`` when fewer than 5
        draws fall in the tail (too few draws, or all but a few weights are ``-inf``).
    """
    lw = _checked(log_weights)
    flat = lw.detach().reshape(-1, lw.shape[-1]).cpu().double().numpy()
    out = np.empty_like(flat)
    khat = np.empty(flat.shape[0])
    for i, row in enumerate(flat):
        finite = np.isfinite(row)
        if not finite.any() or (np.isposinf(row)).any():
            out[i], khat[i] = np.full_like(row, np.nan), math.inf
            continue
        smoothed = np.full_like(row, -np.inf)
        if finite.sum() >= 2:
            smoothed[finite], khat[i] = _psis_1d(row[finite].copy())
        else:  # one draw carries all the weight
            smoothed[finite], khat[i] = 0.0, math.inf
        out[i] = smoothed
    kw = {"dtype": lw.dtype, "device": lw.device}
    return torch.as_tensor(out, **kw).reshape(lw.shape), torch.as_tensor(khat, **kw).reshape(lw.shape[:-1])


def pareto_khat(log_weights) -> Tensor:
    """The Pareto ``k-hat`` of the log weights ``(..., n)`` (see :func:`psis`): a reliability score of the proposal.

    ``<= 0.5``: good; ``0.5 - 0.7``: usable with care; ``> 0.7``: the proposal misses part of the target (its draws and
    any importance-sampling estimate from them are unreliable). Use ``n >= 1000`` draws for a stable estimate."""
    return psis(log_weights)[1]


def log_evidence(log_weights) -> tuple[Tensor, Tensor]:
    """The importance-sampling estimate ``log (1/n sum_i w_i)`` of the log normalizing constant of the target, and its
    delta-method standard error ``sd(w) / (sqrt(n) mean(w))``, along the last dimension.

    Unbiased for ``Z`` (not for ``log Z``, which it underestimates on average); trust it only where :func:`pareto_khat`
    is at most 0.7: beyond, the variance of the weights is infinite and the standard error means nothing.

    :returns: ``(log Z (...), standard error (...))``.
    """
    lw = _checked(log_weights)
    n = lw.shape[-1]
    log_z = torch.logsumexp(lw, -1) - math.log(n)
    w = torch.exp(lw - log_z.unsqueeze(-1))  # weights relative to their mean
    se = w.std(-1) / math.sqrt(n)
    return log_z, se


def importance_masses(labels, log_weights, num_regions: int) -> tuple[Tensor, Tensor]:
    """The target's mass in each of ``num_regions`` regions from weighted draws, with Monte Carlo standard errors.

    ``labels[i]`` is the region (an int in ``0..num_regions-1``, e.g. the mode nearest the draw) of the draw whose log
    weight is ``log_weights[i]``. The estimate is the self-normalized importance-sampling one,
    ``m_k = sum_i W_i 1[label_i = k]`` with ``W`` the normalized weights (pass the :func:`psis` weights to smooth
    them), and its standard error the delta-method one, ``sqrt(sum_i W_i^2 (1[label_i = k] - m_k)^2)`` (with equal
    weights: the binomial ``sqrt(m_k (1 - m_k) / n)``). Self-normalization biases ``m_k`` by ``O(1/n)``, well below
    the standard error for ``n`` in the thousands. Both assume independent draws and a finite variance of the
    weights: trust them only where :func:`pareto_khat` is at most 0.7. A region no draw reaches gets mass 0 with
    standard error 0: the estimate cannot see what the proposal misses.

    :param labels: integer tensor ``(n,)``.
    :param log_weights: ``(n,)`` log weights (any normalization); ``None`` for equal weights (plain draws).
    :returns: ``(masses (num_regions,), standard errors (num_regions,))``.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape (n,), got {labels.dtype} {tuple(labels.shape)}")
    num_regions = int(num_regions)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_regions):
        raise ValueError(f"labels must lie in 0..{num_regions - 1}")
    if log_weights is None:
        w = torch.full(labels.shape, 1.0 / labels.shape[0], dtype=torch.float64, device=labels.device)
    else:
        lw = _checked(log_weights).detach().double()
        if lw.shape != labels.shape:
            raise ValueError(
                f"log_weights of shape {tuple(lw.shape)} do not match labels of shape {tuple(labels.shape)}"
            )
        w = torch.exp(lw - torch.logsumexp(lw, -1))
    onehot = torch.nn.functional.one_hot(labels.long(), num_regions).to(w)  # (n, K)
    masses = w @ onehot
    se = torch.sqrt(((w * w).unsqueeze(-1) * (onehot - masses) ** 2).sum(0))
    return masses, se


def ess(smoothed_log_weights: Tensor) -> Tensor:
    """Effective sample size ``1 / sum_i w_i^2`` of normalized log weights ``(..., n)``."""
    return 1.0 / torch.exp(torch.logsumexp(2 * smoothed_log_weights, -1))


def importance_resample(
    samples, log_weights, num_samples: int | None = None, smooth: bool = True, generator: torch.Generator | None = None
):
    """Resample draws in proportion to their (Pareto-smoothed) importance weights, with replacement.

    :param samples: a Tensor ``(n, ...)`` or a dict ``{site: Tensor[n, ...]}`` of one set of draws; or, for log
        weights of shape ``(B, n)``, tensors ``(B, n, ...)`` (one set per dataset).
    :param log_weights: ``(n,)`` or ``(B, n)``.
    :param int num_samples: draws to return per set (default ``n``).
    :param bool smooth: resample with the :func:`psis` weights (default) rather than the raw ones.
    :returns: the resampled draws in the structure of ``samples``.
    """
    lw = _checked(log_weights)
    if lw.dim() > 2:
        raise ValueError(f"log_weights must have shape (n,) or (B, n), got {tuple(lw.shape)}")
    n = lw.shape[-1]
    num = n if num_samples is None else int(num_samples)
    if num < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    lw = psis(lw)[0] if smooth else lw - torch.logsumexp(lw, -1, keepdim=True)
    probs = torch.exp(lw.detach()).reshape(-1, n)
    if not torch.isfinite(probs).all():
        raise ValueError("the weights could not be normalized (no finite log weight in a set)")
    idx = torch.multinomial(probs.cpu().double(), num, replacement=True, generator=generator).to(lw.device)

    def take(x: Tensor) -> Tensor:
        if lw.dim() == 1:
            if x.shape[0] != n:
                raise ValueError(f"samples hold {x.shape[0]} draws but there are {n} log weights")
            return x[idx[0]]
        if x.shape[:2] != lw.shape:
            raise ValueError(
                f"samples of shape {tuple(x.shape)} do not start with the log weights' shape {tuple(lw.shape)}"
            )
        return torch.stack([x[b, idx[b]] for b in range(x.shape[0])])

    if isinstance(samples, dict):
        return {k: take(v) for k, v in samples.items()}
    return take(samples)
