"""Samplers with a tractable density: conditional neural-spline flows, mixtures and symmetrized samplers.

Each sampler here is a :class:`torch.nn.Module` that can replace the default sampler of
:class:`~pyro_stein.AmortizedSteinGuide` (``AmortizedSteinGuide(model, sampler=...)``): ``forward(noise, context=None)``
maps noise ``(..., noise_dim)`` (and a dataset encoding ``(..., context_dim)`` in amortized mode) to points
``(..., latent_dim)``, and it is trained with the Stein direction like any other sampler. Unlike the default sampler
they also give the density of their draws:

* ``sample_and_log_prob(noise, context=None) -> (z, log q(z))``: the draw and its log density by the change of
  variables (one pass, no inverse);
* ``log_prob(z, context=None)``: the log density of any point (through the inverse).

With a density, each posterior fit can be checked and corrected by importance sampling against the model's log joint:
see :func:`pyro_stein.diagnostics.importance_diagnostics` (Pareto k-hat, log evidence) and
:func:`pyro_stein.diagnostics.importance_sample_posterior` (PSIS resampling).

* :class:`FlowSampler`: ``z = loc(c) + L(c) T_K(...T_1(xi; c)...; c)``, ``xi ~ N(0, I)``, with monotonic
  rational-quadratic spline layers (Durkan et al. 2019): one element-wise layer, then coupling layers that
  transform half of the coordinates given the other half and the context. It starts as the affine map
  ``loc + L xi`` (every spline at the identity), so with a guide's Laplace frame it starts at the Laplace
  approximation, like the default sampler.
* :class:`MixtureSampler`: a finite mixture of samplers with fixed weights (the extra first noise coordinate picks the
  component); built from mode searches by :func:`pyro_stein.modes.mixture_from_modes`.
* :class:`SymmetrizedSampler`: a base sampler averaged over a known finite symmetry group of the posterior (sign
  flips, relabellings of a mixture's components): every symmetric copy of a mode gets the same mass.

References:

[1] C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, "Neural Spline Flows", NeurIPS 2019.
[2] D. Wang, Q. Liu, "Learning to Draw Samples: With Application to Amortized MLE for Generative Adversarial
    Learning", arXiv:1611.01722, 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions.transforms.spline import _monotonic_rational_spline
from torch import Tensor, nn

from ._checks import _int_at_least
from .nn import mlp

__all__ = ["FlowSampler", "MixtureSampler", "SymmetrizedSampler", "standard_normal_log_prob"]

_MIN_DERIVATIVE = 1e-3
# _MIN_DERIVATIVE + softplus(_D0) = 1: a spline whose raw parameters are all zero is the identity. The minimum is
# added here, not by Pyro's spline (which is passed 0): Pyro sets the derivative at the interval's two ends to
# 1 - its min_derivative, which would leave a spline at zero parameters 0.1 % off the identity in its outer bins and
# with a kink where it meets the identity tails
_D0 = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed over the last dimension."""
    return -0.5 * (x * x).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def _broadcast_context(x: Tensor, context: Tensor | None) -> Tensor | None:
    if context is None:
        return None
    shape = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return context.expand(shape + context.shape[-1:])


class _SplineLayer(nn.Module):
    """A rational-quadratic spline on the coordinates ``b`` given the coordinates ``a`` and the context."""

    def __init__(self, a: list[int], b: list[int], context_dim: int, hidden_dim: int, bins: int, bound: float):
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=torch.long), persistent=False)
        self.register_buffer("b", torch.tensor(b, dtype=torch.long), persistent=False)
        self.register_buffer("inverse_order", torch.argsort(torch.tensor(a + b, dtype=torch.long)), persistent=False)
        self.bins, self.bound, self.context_dim = bins, float(bound), context_dim
        out = len(b) * (3 * bins - 1)
        in_dim = len(a) + context_dim
        if in_dim:
            self.net = mlp(in_dim, hidden_dim, out, 2, zero_last=True)
        else:  # nothing to condition on: free parameters
            self.raw = nn.Parameter(torch.zeros(out))

    def _params(self, xa: Tensor, context: Tensor | None, batch: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        if hasattr(self, "net"):
            parts = [xa] if xa.shape[-1] else []
            if context is not None:
                parts.append(context)
            h = self.net(torch.cat(parts, -1) if len(parts) > 1 else parts[0])
        else:
            h = self.raw.expand(batch + self.raw.shape)
        h = h.reshape(h.shape[:-1] + (len(self.b), 3 * self.bins - 1))
        K = self.bins
        derivatives = _MIN_DERIVATIVE + F.softplus(h[..., 2 * K :] + _D0)
        return F.softmax(h[..., :K], -1), F.softmax(h[..., K : 2 * K], -1), derivatives

    def forward(self, x: Tensor, context: Tensor | None, inverse: bool = False) -> tuple[Tensor, Tensor]:
        xa, xb = x[..., self.a], x[..., self.b]
        w, h, d = self._params(xa, _broadcast_context(x, context), x.shape[:-1])
        yb, ld = _monotonic_rational_spline(xb, w, h, d, None, inverse=inverse, bound=self.bound, min_derivative=0.0)
        return torch.cat([xa, yb], -1)[..., self.inverse_order], ld.sum(-1)


class FlowSampler(nn.Module):
    """A conditional neural-spline flow ``z = loc(c) + L(c) T(xi; c)`` with ``xi ~ N(0, I)``.

    ``T`` is one element-wise spline layer (each coordinate's own monotone map: separable multimodality such as a
    double well per coordinate) followed by ``num_layers`` coupling layers, each transforming half of the coordinates
    (alternating halves, after a fixed random permutation) with splines whose knots an MLP computes from the other half
    and the context. Outside ``[-bound, bound]`` the splines are the identity. ``L`` is lower triangular with a
    positive diagonal; with a context, ``loc(c) = loc + head(c)`` and the diagonal of ``L`` is scaled by
    ``exp(s(c))``. Every context head and every spline starts at the identity, so the flow starts as
    ``N(init_loc, L0 L0^T)``.

    :param int latent_dim: dimension ``D`` (also the noise dimension).
    :param int context_dim: dataset-encoding dimension (0: unconditional).
    :param int num_layers: coupling layers (0: the element-wise layer only; always 0 for ``D = 1``).
    :param int hidden_dim: width of the conditioners' MLPs (default ``max(32, 4 D)``, capped at 256).
    :param int bins: spline segments per coordinate.
    :param float bound: half-width of the spline's interval, in units of the noise.
    :param Tensor init_loc: initial ``loc`` (default zeros); sets dtype and device.
    :param init_scale: initial ``L``: a number (``init_scale * I``) or a lower-triangular ``(D, D)`` tensor.
    :param int seed: seed of the fixed permutations between coupling layers.
    """

    def __init__(
        self,
        latent_dim: int,
        context_dim: int = 0,
        num_layers: int = 4,
        hidden_dim: int | None = None,
        bins: int = 8,
        bound: float = 5.0,
        init_loc: Tensor | None = None,
        init_scale: float | Tensor = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        D = _int_at_least(latent_dim, "latent_dim", 1, "a positive int")
        context_dim = _int_at_least(context_dim, "context_dim", 0, "a non-negative int")
        num_layers = _int_at_least(num_layers, "num_layers", 0, "a non-negative int")
        bins = _int_at_least(bins, "bins", 2, "an int >= 2")
        if not bound > 0:
            raise ValueError(f"bound must be positive, got {bound!r}")
        hidden_dim = hidden_dim or min(256, max(32, 4 * D))
        self.latent_dim = self.noise_dim = D
        self.context_dim = context_dim
        self.config = {
            "latent_dim": D,
            "context_dim": context_dim,
            "num_layers": num_layers,
            "hidden_dim": hidden_dim,
            "bins": bins,
            "bound": bound,
            "seed": seed,
        }
        kw = {} if init_loc is None else {"dtype": init_loc.dtype, "device": init_loc.device}
        layers = [_SplineLayer([], list(range(D)), context_dim, hidden_dim, bins, bound)]
        gen = torch.Generator().manual_seed(seed)
        for i in range(num_layers if D > 1 else 0):
            perm = torch.randperm(D, generator=gen).tolist()
            half = D // 2 if i % 2 == 0 else D - D // 2
            layers.append(_SplineLayer(perm[:half], perm[half:], context_dim, hidden_dim, bins, bound))
        self.layers = nn.ModuleList(layers).to(**kw)
        loc = torch.zeros(D, **kw) if init_loc is None else init_loc.detach().clone().reshape(D)
        self.loc = nn.Parameter(loc)
        if isinstance(init_scale, Tensor):
            L0 = init_scale.detach().to(loc).reshape(D, D)
            if not torch.equal(L0, L0.tril()) or not bool((L0.diagonal() > 0).all()):
                raise ValueError("init_scale must be lower triangular with a positive diagonal")
        else:
            if not init_scale > 0:
                raise ValueError(f"init_scale must be positive, got {init_scale!r}")
            L0 = float(init_scale) * torch.eye(D, **kw)
        self.log_diag = nn.Parameter(L0.diagonal().log())
        self.off_diag = nn.Parameter(L0.tril(-1))
        self.register_buffer("_strict", torch.ones(D, D, **kw).tril(-1), persistent=False)
        if context_dim:
            self.context_head = mlp(context_dim, hidden_dim, 2 * D, 1, zero_last=True).to(**kw)

    def _check(self, x: Tensor, context: Tensor | None, what: str) -> None:
        if x.shape[-1] != self.latent_dim:
            raise ValueError(f"{what} must have last dim {self.latent_dim}, got shape {tuple(x.shape)}")
        if self.context_dim == 0 and context is not None:
            raise ValueError("this sampler is unconditional (context_dim=0) but a context was given")
        if self.context_dim and (context is None or context.shape[-1] != self.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this sampler needs a context of last dim {self.context_dim}, got {got}")

    def _affine(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``loc``, ``L`` and ``log|det L|`` (with leading context dims when conditional)."""
        L = self.off_diag * self._strict
        if context is None:
            return self.loc, L + torch.diag_embed(self.log_diag.exp()), self.log_diag.sum()
        heads = self.context_head(context)
        D = self.latent_dim
        log_d = self.log_diag + heads[..., D:]
        L = (L + torch.diag_embed(self.log_diag.exp())) * heads[..., D:].exp().unsqueeze(-1)
        return self.loc + heads[..., :D], L, log_d.sum(-1)

    def sample_and_log_prob(self, noise: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The draws ``z`` ``(..., D)`` for the noise and their log density ``(...)``."""
        self._check(noise, context, "noise")
        x, log_det = noise, noise.new_zeros(())
        for layer in self.layers:
            x, ld = layer(x, context)
            log_det = log_det + ld
        loc, L, ld_affine = self._affine(context)
        z = loc + (L @ x.unsqueeze(-1)).squeeze(-1)
        return z, standard_normal_log_prob(noise) - log_det - ld_affine

    def forward(self, noise: Tensor, context: Tensor | None = None) -> Tensor:
        """Map noise ``(..., D)`` (and context ``(..., context_dim)``) to ``(..., D)``."""
        return self.sample_and_log_prob(noise, context)[0]

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log q(z | c)`` of points ``(..., D)`` through the inverse of the flow."""
        self._check(z, context, "z")
        loc, L, ld_affine = self._affine(context)
        L = L.expand(torch.broadcast_shapes(L.shape[:-2], z.shape[:-1]) + L.shape[-2:])
        x = torch.linalg.solve_triangular(L, (z - loc).unsqueeze(-1), upper=False).squeeze(-1)
        log_det = -ld_affine
        for layer in reversed(self.layers):
            x, ld = layer(x, context, inverse=True)
            log_det = log_det + ld
        return standard_normal_log_prob(x) + log_det


def _uniform_from_normal(noise: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(noise / math.sqrt(2)))


class MixtureSampler(nn.Module):
    """A mixture ``sum_k w_k q_k`` of samplers with a density, with fixed weights ``w`` (a buffer).

    The first noise coordinate picks the component (by its normal CDF against the cumulative weights), the others go
    to the component. The Stein direction moves each component's draws; the weights are no parameter (a draw's
    component does not move with them) but are re-estimated from importance weights, see
    :func:`pyro_stein.modes.reweight_mixture`.

    :param components: samplers with ``sample_and_log_prob`` and ``log_prob`` (e.g. :class:`FlowSampler`), all with
        the same ``latent_dim`` and ``context_dim``.
    :param Tensor log_weights: ``(K,)`` unnormalized log weights (default equal).
    """

    def __init__(self, components: Sequence[nn.Module], log_weights: Tensor | None = None):
        super().__init__()
        components = list(components)
        if not components:
            raise ValueError("a mixture needs at least one component")
        dims = {(c.latent_dim, getattr(c, "context_dim", 0)) for c in components}
        if len(dims) != 1:
            raise ValueError(f"the components have different (latent_dim, context_dim): {sorted(dims)}")
        self.components = nn.ModuleList(components)
        self.latent_dim, self.context_dim = dims.pop()
        self.noise_dim = 1 + max(c.noise_dim for c in components)
        like = next(self.components.parameters())
        lw = torch.zeros(len(components)) if log_weights is None else torch.as_tensor(log_weights).detach()
        if lw.shape != (len(components),):
            raise ValueError(f"log_weights must have shape ({len(components)},), got {tuple(lw.shape)}")
        self.register_buffer("log_weights", torch.log_softmax(lw.to(like), 0))

    def set_log_weights(self, log_weights: Tensor) -> None:
        """Replace the weights (normalized here)."""
        self.log_weights.copy_(torch.log_softmax(log_weights.detach().to(self.log_weights), 0))

    def component_of(self, noise: Tensor) -> Tensor:
        """The component index of each noise row ``(...)``."""
        cum = self.log_weights.exp().cumsum(0)
        cum = cum / cum[-1]
        return torch.searchsorted(cum, _uniform_from_normal(noise[..., 0]).contiguous()).clamp(max=len(cum) - 1)

    def sample_and_log_prob(self, noise: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if noise.shape[-1] != self.noise_dim:
            raise ValueError(f"noise must have last dim {self.noise_dim}, got shape {tuple(noise.shape)}")
        k = self.component_of(noise)
        z = noise.new_zeros(noise.shape[:-1] + (self.latent_dim,))
        for j, comp in enumerate(self.components):  # every component maps all rows (batched); each row keeps its own
            zj = comp.sample_and_log_prob(noise[..., 1 : 1 + comp.noise_dim], context)[0]
            z = torch.where((k == j).unsqueeze(-1), zj, z)
        return z, self.log_prob(z, context)

    def forward(self, noise: Tensor, context: Tensor | None = None) -> Tensor:
        if noise.shape[-1] != self.noise_dim:
            raise ValueError(f"noise must have last dim {self.noise_dim}, got shape {tuple(noise.shape)}")
        k = self.component_of(noise)
        z = noise.new_zeros(noise.shape[:-1] + (self.latent_dim,))
        for j, comp in enumerate(self.components):
            z = torch.where((k == j).unsqueeze(-1), comp(noise[..., 1 : 1 + comp.noise_dim], context), z)
        return z

    def component_log_probs(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log w_k + log q_k(z)`` of every component, ``(..., K)``."""
        return torch.stack([c.log_prob(z, context) for c in self.components], -1) + self.log_weights

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.logsumexp(self.component_log_probs(z, context), -1)


class SymmetrizedSampler(nn.Module):
    """``q(z) = 1/|G| sum_g q_base(g^{-1} z)``: a base sampler averaged over a finite group of signed permutations.

    For a posterior invariant under the group (the sign of a factor in ``y ~ a * b``, the labels of a mixture's
    components), every symmetric copy of what the base sampler finds gets the same mass, so the base sampler needs
    to find only one of them. The first noise coordinate picks the group element.

    Train the base sampler alone (``symmetrize = False``: the draws are the base's, the group element unused), then
    switch to ``symmetrize = True`` (the default) for the draws and their density: the Stein direction with one
    kernel over all symmetric copies at once would average scores across the modes, whereas the base alone settles
    on the mode(s) it starts near (see the multimodal guide)::

        sampler = SymmetrizedSampler(FlowSampler(D), group)
        sampler.symmetrize = False
        svgd.run(...)
        sampler.symmetrize = True

    :param nn.Module base: a sampler with ``sample_and_log_prob`` and ``log_prob``.
    :param group: the group's elements as ``(permutation, signs)`` pairs acting on the sampler's output
        ``z -> signs * z[permutation]`` (the identity need not be listed: it is added), e.g. for sign flips of the
        first coordinate of 2: ``[([0, 1], [-1, 1])]``. The list must be closed under composition (a group).
    """

    def __init__(self, base: nn.Module, group: Sequence[tuple[Sequence[int], Sequence[float]]]):
        super().__init__()
        self.base = base
        D = base.latent_dim
        self.latent_dim, self.context_dim = D, getattr(base, "context_dim", 0)
        self.noise_dim = 1 + base.noise_dim
        like = next(base.parameters())
        elements = [(tuple(range(D)), (1.0,) * D)]
        for perm, signs in group:
            perm, signs = tuple(int(i) for i in perm), tuple(float(s) for s in signs)
            if sorted(perm) != list(range(D)) or len(signs) != D or any(s not in (-1.0, 1.0) for s in signs):
                raise ValueError(f"a group element must be a permutation of range({D}) and {D} signs of +-1")
            if (perm, signs) not in elements:
                elements.append((perm, signs))
        self.symmetrize = True
        self.register_buffer("perms", torch.tensor([e[0] for e in elements], dtype=torch.long), persistent=False)
        self.register_buffer("signs", torch.tensor([e[1] for e in elements]).to(like), persistent=False)
        self.register_buffer("inverse_perms", torch.argsort(self.perms, -1), persistent=False)
        for p, s in zip(self.perms, self.signs):  # closure: g h is in the list for all g, h
            for p2, s2 in zip(self.perms, self.signs):
                comp_p, comp_s = p2[p], s2[p] * s
                if not any(torch.equal(comp_p, q) and torch.equal(comp_s, t) for q, t in zip(self.perms, self.signs)):
                    raise ValueError("the group elements are not closed under composition; list the whole group")

    @property
    def group_size(self) -> int:
        return self.perms.shape[0]

    def _apply(self, z: Tensor, g: Tensor) -> Tensor:
        """``signs_g * z[perm_g]`` for a group index per row."""
        perm = self.perms[g]
        return self.signs[g] * torch.gather(z, -1, perm.expand(z.shape))

    def forward(self, noise: Tensor, context: Tensor | None = None) -> Tensor:
        if noise.shape[-1] != self.noise_dim:
            raise ValueError(f"noise must have last dim {self.noise_dim}, got shape {tuple(noise.shape)}")
        z = self.base(noise[..., 1:], context)
        if not self.symmetrize:
            return z
        g = (_uniform_from_normal(noise[..., 0]) * self.group_size).long().clamp(max=self.group_size - 1)
        return self._apply(z, g)

    def sample_and_log_prob(self, noise: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self.symmetrize:
            return self.base.sample_and_log_prob(noise[..., 1:], context)
        z = self.forward(noise, context)
        return z, self.log_prob(z, context)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if not self.symmetrize:
            return self.base.log_prob(z, context)
        # g^{-1} z: (signs * z[perm])^{-1}: x[perm] = signs * z -> x = (signs * z)[inverse perm]
        parts = []
        for p, s in zip(self.inverse_perms, self.signs):
            parts.append(self.base.log_prob((s * z)[..., p], context))
        return torch.logsumexp(torch.stack(parts, -1), -1) - math.log(self.group_size)
