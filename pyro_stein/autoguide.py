"""The autoguide contract of a guide whose draws come from a sampler network, ``z = m + L f(noise, context)``.

:class:`SamplerGuide` is what such a guide does as a Pyro autoguide (``forward`` under the model's plates, the
auxiliary latent site, ``median``, ``quantiles``), its frame's maps and its draws; the guide of this library,
:class:`~pyro_stein.AmortizedSteinGuide`, adds how the sampler is set up, conditioned, post-processed and saved.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import ExitStack, nullcontext

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from torch import Tensor

from .frames import unwhiten, whiten, whiten_score
from .logjoint import full_data, unpack

__all__ = ["SamplerGuide"]

FrameTensors = tuple[Tensor, Tensor]


class _On:
    """``guide.<name>``: an attribute of one of the guide's components (``options`` are replaced, being frozen)."""

    def __init__(self, component: str, attr: str | None = None, settable: bool = True):
        self.component, self.attr, self.settable = component, attr, settable

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.attr = name, self.attr or name

    def __get__(self, guide, objtype=None):
        return self if guide is None else getattr(getattr(guide, self.component), self.attr)

    def __set__(self, guide, value) -> None:
        if not self.settable:
            raise AttributeError(f"guide.{self.name} is fixed when the guide is built")
        if self.component == "options":  # checked by GuideOptions
            guide.options = dataclasses.replace(guide.options, **{self.attr: value})
        else:
            setattr(getattr(guide, self.component), self.attr, value)


class SamplerGuide(AutoContinuous):
    """A Pyro autoguide whose draws come from a sampler network (``self.sampler``, exposing ``noise_dim``), mapped
    to the unconstrained latents by a frame (``self.frame``: :class:`~pyro_stein.frames.Frame`; its ``m``, ``L`` in
    the buffers ``whiten_loc``, ``whiten_scale``, or per dataset).

    A subclass sets up ``sampler``, ``sites``, ``log_density``, ``subsample_plates`` and the non-centred sites
    (``_reparam_frames``), and defines ``setup``, ``get_posterior`` and ``_posterior_draws(num_samples, args,
    kwargs)`` (the unconstrained draws behind ``median`` and ``quantiles``).
    """

    frame_request = _On("frame", "request", settable=False)
    whiten = _On("frame")
    adaptive_frame = _On("frame", "adaptive")
    frame_fallback_reason = _On("frame", "fallback_reason", settable=False)
    reparam_sites = _On("frame", settable=False)

    def full_data(self):
        """A context in which the model's subsampled plates (if any) use all of their data."""
        return full_data() if self.subsample_plates else nullcontext()

    def init_values(self) -> dict[str, Tensor]:
        """The latent sites' initial values (of the set-up trace), in the networks' dtype and device once they
        exist (after ``.to()``)."""
        if self.prototype_trace is None:
            return {}
        like = self._like() if self.sampler is not None else None
        return {
            n: s["value"].detach()
            if like is None or not s["value"].is_floating_point()
            else s["value"].detach().to(dtype=like.dtype, device=like.device)
            for n, s in self.prototype_trace.iter_stochastic_nodes()
        }

    def _frame(self, frame: FrameTensors | None) -> FrameTensors:
        if frame is not None:
            return frame
        if self.per_dataset_frames:
            raise ValueError(
                "an amortized guide with whiten='laplace' needs the dataset's frame: pass frame=guide.frames(datasets)"
            )
        return self.whiten_loc, self.whiten_scale

    def unwhiten(self, u: Tensor, frame: FrameTensors | None = None) -> Tensor:
        """Map the sampler's outputs to unconstrained latents: ``m + u L^T`` (identity without a frame).

        :param frame: ``(m, L)`` from :meth:`frames` for an amortized guide (shapes ``(B, D)``, ``(B, D, D)`` for
            ``u`` of shape ``(B, n, D)``, or one dataset's ``(D,)``, ``(D, D)``)."""
        return u if self.whiten is None else unwhiten(u, *self._frame(frame))

    def whiten_latents(self, z: Tensor, frame: FrameTensors | None = None) -> Tensor:
        """The sampler's outputs that :meth:`unwhiten` maps to the unconstrained latents ``z``: ``L^{-1} (z - m)``
        (identity without a frame), for ``frame`` as in :meth:`unwhiten`."""
        return z if self.whiten is None else whiten(z, *self._frame(frame))

    def whiten_score(self, score: Tensor, frame: FrameTensors | None = None) -> Tensor:
        """The score with respect to the sampler's outputs ``u``: ``L^T grad_z log p`` (rows)."""
        return score if self.whiten is None else whiten_score(score, self._frame(frame)[1])

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """As :meth:`torch.nn.Module.state_dict`, but a snapshot: the tensors are copies, which later training steps
        do not change (``keep_vars=True`` still gives the live parameters)."""
        before = set(destination) if destination is not None else set()
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not keep_vars:
            for k in [k for k in out if k not in before]:
                out[k] = out[k].clone()
        return out

    def copy(self) -> SamplerGuide:
        """A deep copy of the guide (weights, caches' key and options; see :func:`~pyro_stein.refine`)."""
        model = self.model
        out = copy.deepcopy(self)  # AutoGuide.__getstate__ drops the model reference: restore it on both
        self._model = out._model = (model,)
        return out

    @property
    def param_prefix(self) -> str:
        """The prefix of the guide's parameter names in Pyro's param store (``prefix$$$sampler.loc``, ...); a copy
        that trains beside the original needs its own."""
        return self._pyro_name

    @param_prefix.setter
    def param_prefix(self, prefix: str) -> None:
        if not isinstance(prefix, str) or "$$$" in prefix:
            raise ValueError(f"param_prefix must be a str without '$$$', got {prefix!r}")
        self._pyro_name = prefix

    def _like(self) -> Tensor:
        return next(self.sampler.parameters())

    def draw(self, num_samples: int, context: Tensor | None = None, frame: FrameTensors | None = None) -> Tensor:
        """Unconstrained draws ``(num_samples, D)``, or ``(B, num_samples, D)`` for a batch of contexts ``(B, C)``;
        differentiable with respect to the networks' parameters. ``frame``: the datasets' :meth:`frames`."""
        return self.unwhiten(self.draw_whitened(num_samples, context), frame)

    def draw_whitened(self, num_samples: int, context: Tensor | None = None) -> Tensor:
        """The sampler's own outputs ``u`` (what the Stein direction moves); :meth:`draw` is ``unwhiten(u)``."""
        like = self._like()
        if context is not None and context.dim() == 2:
            noise = torch.randn(
                context.shape[0], num_samples, self.sampler.noise_dim, dtype=like.dtype, device=like.device
            )
            return self.sampler(noise, context.unsqueeze(-2))
        noise = torch.randn(num_samples, self.sampler.noise_dim, dtype=like.dtype, device=like.device)
        return self.sampler(noise, context)

    def _unpack_constrained(self, z: Tensor) -> dict[str, Tensor]:
        return {name: x for name, (_, x) in unpack(z, self.sites).items()}

    def sample_latent(self, *args, **kwargs):
        return pyro.sample(
            f"_{self._pyro_name}_latent", self.get_posterior(*args, **kwargs), infer={"is_auxiliary": True}
        )

    def forward(self, *args, **kwargs):
        """Sample every latent site (constrained) under the model's plates; returns ``{site: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for site, unconstrained_value in self._unpack_latent(latent):
            name = site["name"]
            transform = self._transforms[name]
            value = transform(unconstrained_value)
            log_density = transform.inv.log_abs_det_jacobian(value, unconstrained_value)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
            delta = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        if self._reparam_frames:  # the non-centred sites' original values, so that Predictive(model, guide) sees them
            flat = latent.reshape(-1, latent.shape[-1])
            values = self.log_density.deterministic(flat, list(self._reparam_frames), args, kwargs)
            for name, (stack_frames, event_dim) in self._reparam_frames.items():
                value = values[name].reshape(latent.shape[:-1] + values[name].shape[1:])
                with ExitStack() as stack:
                    for frame in stack_frames:
                        stack.enter_context(plates[frame.name])
                    result[name] = pyro.sample(name, dist.Delta(value, event_dim=event_dim))
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """Empirical posterior median of each latent site (from ``num_summary_samples`` draws)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, Tensor]:
        """Empirical posterior quantiles ``{site: Tensor[len(quantiles), *site_shape]}``, taken coordinate-wise in
        the unconstrained space and mapped to each site's support, as Pyro's ``AutoContinuous`` does."""
        self.setup(*args, **kwargs)
        like = self._like()
        q = torch.as_tensor(quantiles, dtype=like.dtype, device=like.device).reshape(-1)
        if ((q < 0) | (q > 1)).any():
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
        z = self._posterior_draws(self.num_summary_samples, args, kwargs)
        out = self._unpack_constrained(torch.quantile(z.to(like.dtype), q, dim=0))
        if self.reparam_sites:  # quantiles of the computed, non-centred sites' original values, taken directly
            for name, v in self.log_density.deterministic(z, self.reparam_sites, args, kwargs).items():
                out[name] = torch.quantile(v.to(like.dtype), q, dim=0)
        return out
