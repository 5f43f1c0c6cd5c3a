"""Network construction: the guide's sampler and dataset encoder, built for the traced model, and the implicit
distribution of the sampler's draws (the guide's auxiliary latent site)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import constraints

from .data import DatasetFeatures
from .logjoint import LatentSite
from .nn import DeepSetEncoder, GaussianResidualSampler

__all__ = ["SamplerDistribution", "build_encoder", "build_sampler"]


class SamplerDistribution(dist.TorchDistribution):
    """An implicit distribution: draws ``sampler(noise, context)``; it has no tractable density.

    Used for the guide's auxiliary latent site so that the guide works under plates added by
    :class:`~pyro.infer.Predictive` (``parallel=True``): each batch element gets its own draw.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        sampler: nn.Module,
        context: Tensor | None,
        like: Tensor,
        batch_shape=torch.Size(),
        output_map: Callable[[Tensor], Tensor] | None = None,
    ):
        self.sampler = sampler
        self.context = context
        self.like = like
        self.output_map = output_map
        super().__init__(torch.Size(batch_shape), torch.Size([sampler.latent_dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return SamplerDistribution(self.sampler, self.context, self.like, batch_shape, self.output_map)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        noise = torch.randn(shape + (self.sampler.noise_dim,), dtype=self.like.dtype, device=self.like.device)
        out = self.sampler(noise, self.context)
        return out if self.output_map is None else self.output_map(out)

    def log_prob(self, value):
        raise NotImplementedError(
            "AmortizedSteinGuide's sampler has no tractable density, so it cannot be trained with SVI/ELBO "
            "losses; train it with pyro_stein.AmortizedSVGD"
        )


def _check_module_placement(arg: str, module: nn.Module, like: Tensor) -> None:
    """A user-supplied network must live where the model's values live (the guide never moves it)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point() and (t.device != like.device or t.dtype != like.dtype):
            raise ValueError(
                f"the {arg} passed to AmortizedSteinGuide has tensors on {t.device} with dtype {t.dtype}, but the "
                f"model's latent values are on {like.device} with dtype {like.dtype}; move it first, e.g. "
                f"{arg}.to(device={str(like.device)!r}, dtype={like.dtype})"
            )


def build_encoder(
    user: nn.Module | None, saved: dict | None, feats: DatasetFeatures, context_dim: int, mean_features: bool, like
) -> tuple[nn.Module, bool]:
    """The guide's dataset encoder and whether its standardisation is still to be fitted on a training batch.

    ``user``: the user's encoder (checked to live where ``like`` does); otherwise a
    :class:`~pyro_stein.nn.DeepSetEncoder` for features ``feats`` of one example dataset, of width ``context_dim``
    (plus the feature means with ``mean_features``), or as ``saved`` (its config in a checkpoint)."""
    if user is not None:
        _check_module_placement("encoder", user, like)
        return user, False
    F = feats.features.shape[-1]
    cfg = saved or {  # the passed-through feature means widen it by F
        "feature_dim": F,
        "output_dim": context_dim + (F if mean_features else 0),
        "mean_features": mean_features,
    }
    encoder = DeepSetEncoder(**cfg)
    encoder.to(dtype=like.dtype, device=like.device)
    encoder.set_standardization(feats.features, feats.mask)
    return encoder, True  # refitted on the first training batch (AmortizedSVGD)


def build_sampler(
    user: nn.Module | None,
    saved: dict | None,
    sites: Sequence[LatentSite],
    context_dim: int,
    init_loc: Tensor,
    init_scale: float,
    context_note: str = "",
) -> nn.Module:
    """The guide's sampler: the user's (checked: its ``noise_dim``, ``latent_dim`` and ``context_dim`` fit, it
    lives where ``init_loc`` does), or a :class:`~pyro_stein.nn.GaussianResidualSampler` starting at
    ``init_loc + init_scale * noise`` (or as ``saved``, its config in a checkpoint). ``context_note`` says what the
    context is made of, for the error on a user's sampler of another context width."""
    latent_dim = sum(s.size for s in sites)
    if user is None:
        cfg = saved or {"latent_dim": latent_dim, "context_dim": context_dim, "init_scale": init_scale}
        return GaussianResidualSampler(**cfg, init_loc=init_loc)
    for attr in ("noise_dim", "latent_dim"):
        if not isinstance(getattr(user, attr, None), int):
            raise TypeError(f"a custom sampler must expose an int attribute {attr!r}")
    if user.latent_dim != latent_dim:
        raise ValueError(
            f"the sampler outputs {user.latent_dim} dims but the model's latent sites pack into "
            f"{latent_dim} unconstrained dims ({[(s.name, tuple(s.unconstrained_shape)) for s in sites]})"
        )
    expected = getattr(user, "context_dim", None)
    if isinstance(expected, int) and context_note and expected != context_dim:
        raise ValueError(
            f"the sampler takes a context of width {expected}, but this guide passes {context_note} = {context_dim}; "
            f"build the sampler with context_dim={context_dim}"
        )
    _check_module_placement("sampler", user, init_loc)
    return user
