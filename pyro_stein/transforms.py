"""Bijections from unconstrained space to supports that ``torch.distributions.biject_to`` lacks.

:func:`support_bijection` is ``biject_to`` plus bijections for ``lower_cholesky`` and
``positive_definite`` supports (torch registers only non-bijective ``transform_to`` maps for
them, which would leave unused, score-free coordinates in the packed latent vector). It does
not modify torch's global registry.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import Transform, biject_to

__all__ = ["LowerCholeskyBijection", "PositiveDefiniteBijection", "support_bijection"]


def _side(m: int) -> int:
    n = int(round((math.sqrt(8 * m + 1) - 1) / 2))
    if n * (n + 1) // 2 != m:
        raise ValueError(f"a vector of length {m} is not the lower triangle of a square matrix")
    return n


class LowerCholeskyBijection(Transform):
    """``R^{n(n+1)/2}`` -> lower-triangular matrices with positive diagonal (diagonal via ``exp``)."""

    domain = constraints.real_vector
    codomain = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other):
        return isinstance(other, LowerCholeskyBijection)

    def _call(self, x: Tensor) -> Tensor:
        n = _side(x.shape[-1])
        idx = torch.tril_indices(n, n, device=x.device)
        L = x.new_zeros(x.shape[:-1] + (n, n))
        L[..., idx[0], idx[1]] = x
        d = torch.arange(n, device=x.device)
        return L.diagonal_scatter(L[..., d, d].exp(), dim1=-2, dim2=-1)

    def _inverse(self, y: Tensor) -> Tensor:
        n = y.shape[-1]
        d = torch.arange(n, device=y.device)
        y = y.diagonal_scatter(y[..., d, d].log(), dim1=-2, dim2=-1)
        idx = torch.tril_indices(n, n, device=y.device)
        return y[..., idx[0], idx[1]]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        n = y.shape[-1]
        d = torch.arange(n, device=y.device)
        return y[..., d, d].log().sum(-1)

    def forward_shape(self, shape):
        return torch.Size(shape[:-1]) + (_side(shape[-1]),) * 2

    def inverse_shape(self, shape):
        n = shape[-1]
        return torch.Size(shape[:-2]) + (n * (n + 1) // 2,)


class PositiveDefiniteBijection(Transform):
    """``R^{n(n+1)/2}`` -> positive-definite matrices, ``x -> L L^T`` with ``L`` from
    :class:`LowerCholeskyBijection`."""

    domain = constraints.real_vector
    codomain = constraints.positive_definite
    bijective = True

    def __init__(self, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self._chol = LowerCholeskyBijection()

    def with_cache(self, cache_size: int = 1) -> PositiveDefiniteBijection:
        return self if self._cache_size == cache_size else PositiveDefiniteBijection(cache_size)

    def __eq__(self, other):
        return isinstance(other, PositiveDefiniteBijection)

    def _call(self, x: Tensor) -> Tensor:
        L = self._chol(x)
        return L @ L.transpose(-1, -2)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._chol.inv(torch.linalg.cholesky(y))

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        L = self._chol(x)
        n = L.shape[-1]
        d = torch.arange(n, device=x.device)
        # x -> L contributes sum log L_ii; L -> L L^T contributes n log 2 + sum_i (n - i) log L_ii (0-based i)
        powers = (n - d + 1).to(x.dtype)
        return n * math.log(2.0) + (powers * L[..., d, d].log()).sum(-1)

    def forward_shape(self, shape):
        return self._chol.forward_shape(shape)

    def inverse_shape(self, shape):
        return self._chol.inverse_shape(shape)


def support_bijection(support) -> Transform:
    """``biject_to(support)``, with bijections for ``lower_cholesky`` and ``positive_definite`` added.

    :raises NotImplementedError: when no bijection to the support is known.
    """
    if isinstance(support, constraints.independent):
        base = support_bijection(support.base_constraint)
        if isinstance(base, (LowerCholeskyBijection, PositiveDefiniteBijection)):
            raise NotImplementedError(f"independent batches of {support.base_constraint} are not supported")
        return biject_to(support)
    if type(support) is type(constraints.lower_cholesky):
        return LowerCholeskyBijection()
    if type(support) is type(constraints.positive_definite):
        return PositiveDefiniteBijection()
    return biject_to(support)
