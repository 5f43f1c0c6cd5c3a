"""Neural samplers ``z = f(noise [, context])`` and permutation-invariant dataset encoders.

A sampler is any :class:`torch.nn.Module` whose ``forward(noise, context=None)`` maps noise of
shape ``(..., noise_dim)`` (and, for amortized guides, a dataset encoding of shape
``(..., context_dim)``) to points of shape ``(..., latent_dim)``; it must expose ``noise_dim``.
The default, :class:`GaussianResidualSampler`, is an affine map plus a residual MLP whose last
layer starts at zero, so at step 0 it draws from a Gaussian ``N(loc, init_scale^2 I)`` and
training is stable from the first step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._checks import _int_at_least

__all__ = ["DeepSetEncoder", "GaussianResidualSampler", "mlp"]


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, zero_last: bool = False) -> nn.Sequential:
    """A SiLU MLP with ``num_layers`` hidden layers; optionally a zero-initialised output layer."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(d, hidden_dim), nn.SiLU()]
        d = hidden_dim
    last = nn.Linear(d, out_dim)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class GaussianResidualSampler(nn.Module):
    """``z = loc(c) + A(c) xi + MLP([xi, c])`` with ``xi ~ N(0, I)``.

    Unconditional (``context_dim = 0``): ``loc`` and ``A`` are free parameters. Conditional:
    ``loc(c) = loc + head(c)`` and ``A(c) = diag(exp(s(c))) (A + tril(T(c)))`` (``T`` only when
    ``latent_dim <= max_amortized_tril``), so a dataset's encoding moves, rescales and rotates the
    draws. All context heads and the residual MLP's output layer start at zero.

    :param int latent_dim: output dimension ``D``.
    :param int noise_dim: noise dimension (default ``D``, needed to cover full-rank posteriors).
    :param int context_dim: dataset-encoding dimension (0: unconditional).
    :param int hidden_dim: residual MLP width (default ``max(64, 2 D)``, capped at 512).
    :param int num_layers: hidden layers in the residual MLP.
    :param Tensor init_loc: initial ``loc`` (default zeros); sets device and dtype.
    :param float init_scale: initial scale of the affine map (default 0.1, as AutoNormal's).
    :param str affine: ``"full"`` (dense ``D x noise_dim`` matrix), ``"diag"`` (a scale vector;
        needs ``noise_dim == D``) or ``"auto"`` (full up to ``D = 512``).
    """

    def __init__(
        self,
        latent_dim: int,
        noise_dim: int | None = None,
        context_dim: int = 0,
        hidden_dim: int | None = None,
        num_layers: int = 2,
        init_loc: Tensor | None = None,
        init_scale: float = 0.1,
        affine: str = "auto",
        max_amortized_tril: int = 64,
    ):
        super().__init__()
        latent_dim = _int_at_least(latent_dim, "latent_dim", 1, "a positive int")
        num_layers = _int_at_least(num_layers, "num_layers", 1, "a positive int")
        context_dim = _int_at_least(context_dim, "context_dim", 0, "a non-negative int")
        if noise_dim is not None:
            noise_dim = _int_at_least(noise_dim, "noise_dim", 1, "a positive int or None")
        if hidden_dim is not None:
            hidden_dim = _int_at_least(hidden_dim, "hidden_dim", 1, "a positive int or None")
        max_amortized_tril = _int_at_least(max_amortized_tril, "max_amortized_tril", 0, "a non-negative int")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        if affine not in ("auto", "full", "diag"):
            raise ValueError(f"affine must be 'auto', 'full' or 'diag', got {affine!r}")
        D = latent_dim
        hidden_dim = hidden_dim or min(512, max(64, 2 * D))
        self.config = {
            "latent_dim": D,
            "noise_dim": noise_dim,
            "context_dim": context_dim,
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "init_scale": init_scale,
            "affine": affine,
            "max_amortized_tril": max_amortized_tril,
        }
        self.latent_dim = D
        self.noise_dim = D if noise_dim is None else int(noise_dim)
        self.context_dim = context_dim
        if affine == "auto":
            affine = "full" if D <= 512 else "diag"
        if affine == "diag" and self.noise_dim != D:
            raise ValueError(f"affine='diag' needs noise_dim == latent_dim ({D}), got noise_dim={self.noise_dim}")
        self.affine = affine
        kw = {} if init_loc is None else {"dtype": init_loc.dtype, "device": init_loc.device}
        loc = torch.zeros(D, **kw) if init_loc is None else init_loc.detach().clone().reshape(D)
        self.loc = nn.Parameter(loc)
        if affine == "full":
            self.scale = nn.Parameter(init_scale * torch.eye(D, self.noise_dim, **kw))
        else:
            self.scale = nn.Parameter(torch.full((D,), math.log(init_scale), **kw))
        self.residual = mlp(self.noise_dim + context_dim, hidden_dim, D, num_layers, zero_last=True).to(**kw)
        self.amortized_tril = context_dim > 0 and affine == "full" and D <= max_amortized_tril
        if context_dim:
            n_heads = D + D + (D * (D + 1) // 2 if self.amortized_tril else 0)
            self.context_head = mlp(context_dim, hidden_dim, n_heads, 1, zero_last=True).to(**kw)
            self.register_buffer("_tril_idx", torch.tril_indices(D, D, device=loc.device), persistent=False)

    def _affine(self, noise: Tensor) -> Tensor:
        if self.affine == "full":
            return noise @ self.scale.T
        return noise * self.scale.exp()

    def forward(self, noise: Tensor, context: Tensor | None = None) -> Tensor:
        """Map noise ``(..., noise_dim)`` (and context ``(..., context_dim)``) to ``(..., latent_dim)``."""
        if noise.shape[-1] != self.noise_dim:
            raise ValueError(f"noise must have last dim {self.noise_dim}, got shape {tuple(noise.shape)}")
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("this sampler is unconditional (context_dim=0) but a context was given")
            return self.loc + self._affine(noise) + self.residual(noise)
        if context is None or context.shape[-1] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this sampler needs a context of last dim {self.context_dim}, got {got}")
        # the heads depend on the context only: evaluated once per context (e.g. (B, 1, C) for B datasets' draws
        # (B, n, noise_dim)), not once per draw, then broadcast
        D = self.latent_dim
        heads = self.context_head(context)
        loc = self.loc + heads[..., :D]
        log_s = heads[..., D : 2 * D]
        if self.affine == "full":
            A = self.scale
            if self.amortized_tril:
                T = heads.new_zeros(heads.shape[:-1] + (D, D))
                T[..., self._tril_idx[0], self._tril_idx[1]] = heads[..., 2 * D :]
                A = A + T  # context shape + (D, noise_dim)
                shared = context.dim() == 1 or (context.dim() == noise.dim() and context.shape[-2] == 1)
                if shared:  # one matrix for all the draws of a context
                    lin = noise @ (A if context.dim() == 1 else A.squeeze(-3)).transpose(-1, -2)
                else:  # a context per draw
                    lin = (A @ noise.unsqueeze(-1)).squeeze(-1)
            else:
                lin = noise @ A.T
        else:
            lin = noise * self.scale.exp()
        z = loc + log_s.exp() * lin
        return z + self.residual(torch.cat([noise, context.expand(noise.shape[:-1] + context.shape[-1:])], -1))


SQUASH_THRESHOLD = 10.0  # standardised features beyond it are outliers: DeepSetEncoder(squash=True) squashes them


def squash_outliers(x: Tensor, threshold: float = SQUASH_THRESHOLD) -> Tensor:
    """``x`` on ``[-t, t]``; beyond, ``sign(x) (t + log(1 + |x| - t))``: continuous, with slope 1 at ``+-t``, then
    logarithmic, so that an outlier of ``10^6`` standard deviations maps to about 24, not to ``10^6``."""
    excess = (x.abs() - threshold).clamp(min=0)  # clamped: the unselected branch's gradient stays finite
    return torch.where(excess > 0, x.sign() * (threshold + torch.log1p(excess)), x)


class DeepSetEncoder(nn.Module):
    """Permutation-invariant encoder of a dataset: ``[rho([mean_i phi(x_i), log n]), log n]``, or with
    ``mean_features=True`` ``[rho([mean_i phi(x_i), log n]), mean_i x_i, log n]``.

    Accepts a batch of datasets of different sizes padded to a common length with a boolean
    ``mask`` (``True`` for real observations). Features are standardised with fixed statistics
    (:meth:`set_standardization`, called by the guide on its first training batch) so the
    encoder sees inputs of unit scale whatever the data's units. With ``squash=True`` (the guide's default encoder)
    standardised values beyond ``+-10`` are squashed logarithmically (:func:`squash_outliers`), so that an outlying
    observation, such as a draw of a heavy-tailed likelihood, moves the encoding by the log of its size.

    :param int feature_dim: width of one observation's feature vector.
    :param int output_dim: dimension of the dataset encoding.
    :param int hidden_dim: width of ``phi`` and ``rho``.
    :param int num_layers: hidden layers of ``phi`` and ``rho``.
    :param bool mean_features: also pass the mean of the standardised features ``mean_i x_i``
        through, unchanged (``F`` of the ``output_dim`` coordinates; ``rho`` gives the other
        ``output_dim - F - 1``). A posterior whose location is linear in a feature mean (a Gaussian
        or Poisson mean, a proportion) then reaches the sampler along a linear path, which
        extrapolates to datasets at the edge of the training range where ``rho`` alone bends.
    :param bool squash: squash standardised features beyond ``+-10`` (default ``False``; the guide builds its
        default encoder with ``True``, and encoders saved before this option existed load with ``False``, as they
        were trained).

    References: M. Zaheer et al., "Deep Sets", NeurIPS 2017.
    """

    def __init__(
        self,
        feature_dim: int,
        output_dim: int = 32,
        hidden_dim: int = 128,
        num_layers: int = 2,
        mean_features: bool = False,
        squash: bool = False,
    ):
        super().__init__()
        feature_dim = _int_at_least(feature_dim, "feature_dim", 1, "a positive int")
        if not isinstance(squash, bool):
            raise TypeError(f"squash must be a bool, got {type(squash).__name__}")
        passed = feature_dim + 1 if mean_features else 1  # coordinates passed through: the feature means, log n
        output_dim = _int_at_least(
            output_dim,
            "output_dim",
            passed + 1,
            f"an int >= {passed + 1} (the last coordinate is log n"
            + (f", the {feature_dim} before it the feature means" if mean_features else "")
            + ")",
        )
        hidden_dim = _int_at_least(hidden_dim, "hidden_dim", 1, "a positive int")
        num_layers = _int_at_least(num_layers, "num_layers", 1, "a positive int")
        self.config = {
            "feature_dim": feature_dim,
            "output_dim": output_dim,
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "mean_features": bool(mean_features),
            "squash": squash,
        }
        self.feature_dim = feature_dim
        self.output_dim = output_dim
        self.mean_features = bool(mean_features)
        self.squash = squash
        self.phi = mlp(feature_dim, hidden_dim, hidden_dim, num_layers)
        # the last context coordinate is log n itself: dataset size is the main driver of posterior
        # concentration, and passing it through lets the sampler's heads scale draws by it directly
        self.rho = mlp(hidden_dim + 1, hidden_dim, output_dim - passed, num_layers)
        self.register_buffer("feature_loc", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))

    @torch.no_grad()
    def set_standardization(self, features: Tensor, mask: Tensor | None = None) -> None:
        """Fix the per-feature location and scale from example features ``(B, N, F)``."""
        x = features.reshape(-1, features.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1)]
        self.feature_loc.copy_(x.mean(0))
        sd = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
        self.feature_scale.copy_(torch.where(sd > 0, sd, torch.ones_like(sd)))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode datasets ``(..., N, F)`` with optional ``mask`` ``(..., N)`` -> ``(..., output_dim)``."""
        if features.dim() < 2 or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"dataset features must have shape (..., num_observations, {self.feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        if features.dtype != self.feature_loc.dtype:
            raise ValueError(
                f"dataset features are {features.dtype} but the encoder is {self.feature_loc.dtype}; "
                "convert one to the other (e.g. encoder.to(features.dtype))"
            )
        if mask is None:
            mask = torch.ones(features.shape[:-1], dtype=torch.bool, device=features.device)
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != features.shape[:-1]:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(features.shape[:-1])} (True for real "
                f"observations), got {got}"
            )
        count = mask.sum(-1, keepdim=True).to(features.dtype)
        if (count == 0).any():
            raise ValueError("a dataset has no observations (empty dataset); every dataset needs at least one")
        real = mask.unsqueeze(-1)
        # padding rows are zeroed before the networks see them: a NaN there would reach no output but would make
        # the gradients of phi NaN (0 * NaN in the backward pass)
        x = torch.where(real, (features - self.feature_loc) / self.feature_scale, torch.zeros_like(features))

        def mean(v: Tensor) -> Tensor:  # over the real rows; padding may hold anything, even NaN
            return torch.where(real, v, torch.zeros_like(v)).sum(-2) / count

        if self.squash:
            x = squash_outliers(x)
        parts = [self.rho(torch.cat([mean(self.phi(x)), count.log()], -1))]
        if self.mean_features:
            parts.append(mean(x))
        return torch.cat([*parts, count.log()], -1)
