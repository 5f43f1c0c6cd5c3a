"""Radial kernels for Stein variational methods.

Every kernel here is *radial*: ``k(x, y) = f(||x - y||^2 / h)`` for a profile ``f`` and a
bandwidth ``h > 0``. The SVGD direction and the kernelized Stein discrepancy only need the
``n x n`` matrices of ``k`` and of its first two derivatives with respect to the squared
distance ``r^2``, because

.. math::

    \\nabla_x k(x, y) = 2\\,\\partial_{r^2} k\\,(x - y),

so the repulsive term ``sum_j grad_{z_j} k(z_j, z_i)`` is a matrix product with ``Z``. No
``n x n x D`` tensor is ever built.

All functions accept a leading batch shape: ``z`` has shape ``(..., n, D)`` and every matrix
has shape ``(..., n, n)``, so many datasets' particle sets are handled in one call with
one kernel *per* dataset (particles of different datasets never interact).

Adding a kernel: subclass :class:`RadialKernel` and implement :meth:`RadialKernel.profile`
(``f``, ``f'``, ``f''`` of the scaled squared distance ``u = r^2 / h``); optionally override
:meth:`RadialKernel.bandwidth`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "IMQKernel",
    "KernelMatrices",
    "RBFKernel",
    "RadialKernel",
    "median_bandwidth",
    "pairwise_sqdist",
]


class KernelMatrices(NamedTuple):
    """Kernel values and derivatives on a particle set.

    :ivar Tensor k: ``k(z_i, z_j)``, shape ``(..., n, n)``.
    :ivar Tensor dk: ``d k / d(r^2)`` at each pair, shape ``(..., n, n)``.
    :ivar Tensor d2k: ``d^2 k / d(r^2)^2`` at each pair, shape ``(..., n, n)``.
    :ivar Tensor sqdist: squared distances ``r^2_ij``, shape ``(..., n, n)``.
    :ivar Tensor bandwidth: the bandwidth ``h`` used, shape ``(...)``.
    """

    k: Tensor
    dk: Tensor
    d2k: Tensor
    sqdist: Tensor
    bandwidth: Tensor


def pairwise_sqdist(z: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``z``.

    :param Tensor z: particles, shape ``(..., n, D)``.
    :returns: ``(..., n, n)`` matrix with an exactly zero diagonal, clamped at zero.
    """
    sq = z.pow(2).sum(-1)
    d2 = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (z @ z.transpose(-1, -2))
    d2 = d2.clamp_min(0.0)
    n = z.shape[-2]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    return d2.masked_fill(eye, 0.0)


def median_bandwidth(sqdist: Tensor, exclude_diagonal: bool = True) -> Tensor:
    """The median heuristic ``h = median(r^2) / log(n + 1)`` (Liu & Wang, 2016).

    The median is ``torch.median``'s (the lower of the two middle values for an even count).
    Edge cases: with one particle there is no pair, and when all particles coincide the
    median is zero; in both cases ``h = 1`` (any positive value gives the same direction,
    since the repulsive term vanishes when all distances are zero).

    :param Tensor sqdist: ``(..., n, n)`` squared distances.
    :param bool exclude_diagonal: take the median over ``i != j`` pairs only.
    :returns: bandwidths of shape ``(...)``, detached from the graph.
    """
    n = sqdist.shape[-1]
    sqdist = sqdist.detach()
    if n < 2:
        return sqdist.new_ones(sqdist.shape[:-2])
    if exclude_diagonal:
        off = ~torch.eye(n, dtype=torch.bool, device=sqdist.device)
        values = sqdist[..., off]
    else:
        values = sqdist.reshape(sqdist.shape[:-2] + (sqdist.shape[-2] * n,))
    med = values.median(-1).values
    h = med / math.log(n + 1)
    return torch.where(h > 0, h, torch.ones_like(h))


class RadialKernel:
    """Base class of kernels ``k(x, y) = f(||x - y||^2 / h)``.

    :param bandwidth: a fixed bandwidth ``h`` (float), or ``None`` for the median heuristic
        :func:`median_bandwidth` recomputed on every particle set.
    :param float bandwidth_factor: multiplies the bandwidth (heuristic or fixed).
    """

    def __init__(self, bandwidth: float | None = None, bandwidth_factor: float = 1.0):
        if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive number or None, got {bandwidth!r}")
        if not (isinstance(bandwidth_factor, (int, float)) and bandwidth_factor > 0):
            raise ValueError(f"bandwidth_factor must be a positive number, got {bandwidth_factor!r}")
        self.fixed_bandwidth = None if bandwidth is None else float(bandwidth)
        self.bandwidth_factor = float(bandwidth_factor)

    def profile(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f(u), f'(u), f''(u))`` of the scaled squared distance ``u = r^2 / h``."""
        raise NotImplementedError

    def bandwidth(self, sqdist: Tensor) -> Tensor:
        """The bandwidth for a particle set, shape ``sqdist.shape[:-2]``."""
        if self.fixed_bandwidth is not None:
            h = sqdist.new_full(sqdist.shape[:-2], self.fixed_bandwidth)
        else:
            h = median_bandwidth(sqdist)
        return h * self.bandwidth_factor

    def matrices(self, z: Tensor) -> KernelMatrices:
        """Kernel matrix and its ``r^2``-derivatives on the particles ``z`` of shape ``(..., n, D)``.

        The bandwidth is treated as a constant (it is detached).
        """
        if z.dim() < 2:
            raise ValueError(f"particles must have shape (..., n, D), got {tuple(z.shape)}")
        sqdist = pairwise_sqdist(z)
        h = self.bandwidth(sqdist)
        hh = h[..., None, None]
        f, df, d2f = self.profile(sqdist / hh)
        return KernelMatrices(f, df / hh, d2f / hh**2, sqdist, h)

    def __call__(self, x: Tensor, y: Tensor | None = None, bandwidth: Tensor | float | None = None) -> Tensor:
        """Evaluate ``k(x_i, y_j)``; ``y`` defaults to ``x``.

        :param bandwidth: overrides the kernel's own bandwidth rule (``bandwidth_factor`` is not applied to it).
        """
        y = x if y is None else y
        sqdist = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
        if bandwidth is None:
            if y is x:
                bandwidth = self.bandwidth(pairwise_sqdist(x))
            elif self.fixed_bandwidth is not None:
                bandwidth = self.fixed_bandwidth * self.bandwidth_factor
            else:  # cross pairs: every (x_i, y_j) is a genuine pair, none is a self-pair
                bandwidth = median_bandwidth(sqdist, exclude_diagonal=False) * self.bandwidth_factor
        h = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device)
        if h.dim() > 0:
            h = h[..., None, None]
        return self.profile(sqdist / h)[0]

    def __repr__(self) -> str:
        bw = "median" if self.fixed_bandwidth is None else self.fixed_bandwidth
        return f"{type(self).__name__}(bandwidth={bw}, bandwidth_factor={self.bandwidth_factor})"


class RBFKernel(RadialKernel):
    """Gaussian kernel ``k(x, y) = exp(-||x - y||^2 / h)``.

    With ``bandwidth=None`` (default) ``h`` follows the median heuristic of Liu & Wang (2016),
    scaled by ``bandwidth_factor``.
    """

    def profile(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f = torch.exp(-u)
        return f, -f, f


class IMQKernel(RadialKernel):
    """Inverse multi-quadric kernel ``k(x, y) = (c + ||x - y||^2 / h)^beta`` with ``beta < 0``.

    Heavy-tailed: its KSD controls convergence in distribution (Gorham & Mackey, 2017).

    :param float beta: exponent in ``(-1, 0)``; default ``-1/2``.
    :param float c: offset, default ``1``.
    """

    def __init__(
        self, bandwidth: float | None = None, bandwidth_factor: float = 1.0, beta: float = -0.5, c: float = 1.0
    ):
        super().__init__(bandwidth, bandwidth_factor)
        if not -1.0 < beta < 0.0:
            raise ValueError(f"IMQKernel beta must lie in (-1, 0), got {beta!r}")
        if not c > 0:
            raise ValueError(f"IMQKernel c must be positive, got {c!r}")
        self.beta = float(beta)
        self.c = float(c)

    def profile(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        base = self.c + u
        b = self.beta
        f = base.pow(b)
        return f, b * base.pow(b - 1.0), b * (b - 1.0) * base.pow(b - 2.0)
