"""Amortization across datasets: how an amortized guide reads, frames and encodes each dataset.

Usage::

    from pyro_stein import Amortization, AmortizedSteinGuide

    guide = AmortizedSteinGuide(model, amortized=True)  # the default encoding
    guide = AmortizedSteinGuide(model, amortized=Amortization(dataset_fn=rows, context_dim=16), whiten="laplace")

:class:`Amortization` holds the options (a frozen dataclass, checked when it is made); :class:`DatasetEncoding` is
the guide's component that applies them: each dataset's per-observation features (cached on its
:class:`~pyro_stein.data.Dataset`), its Laplace frame when the guide has per-dataset frames (a batched Newton search,
cached too), and the sampler's context, the encoder's output followed by a standardised summary of the frame.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro.poutine as poutine
import torch
from torch import Tensor, nn

from ._checks import _int_at_least
from .data import Dataset, DatasetFeatures, as_dataset, collate_features, default_dataset_fn
from .laplace import LaplaceFrameWarning, laplace_frames
from .logjoint import LatentSite, ModelLogDensity, pack
from .tracing import check_supports

__all__ = ["Amortization", "DatasetEncoding", "frame_summary", "read_features", "size_groups"]

FrameTensors = tuple[Tensor, Tensor]  # (m, L), one per dataset: (B, D), (B, D, D)


@dataclass(frozen=True)
class Amortization:
    """How an amortized :class:`~pyro_stein.AmortizedSteinGuide` conditions its sampler on the dataset
    (``AmortizedSteinGuide(model, amortized=Amortization(...))``; ``amortized=True`` is ``Amortization()``).

    :param callable dataset_fn: ``(*args, **kwargs) -> Tensor[num_observations, num_features]``: the rows the
        encoder reads from the model's arguments. Default: :func:`~pyro_stein.data.default_dataset_fn` (the model's
        observed sites and any tensor argument with one row per observation).
    :param nn.Module encoder: a custom set encoder ``(features (B, N, F), mask (B, N)) -> (B, C)`` exposing
        ``output_dim``. Default: :class:`~pyro_stein.nn.DeepSetEncoder`.
    :param int context_dim: the default encoder's learned encoding width (default 32).
    :param bool mean_features: the default encoder also passes the ``F`` standardised feature means to the sampler
        unchanged (encoding width ``context_dim + F``), so that a posterior location that is linear in a feature
        mean (a Gaussian mean, a rate, a proportion) extrapolates to datasets at the edge of the training range.
        Default ``None``: on for the default encoder without a frame (``whiten=None``), off otherwise (with
        ``whiten="laplace"`` each dataset's own frame already places the draws; pass ``True`` to have it anyway).
    :param int laplace_evaluations: cap on the model evaluations of each dataset's Newton search (``whiten="laplace"``;
        default 50). A dataset whose search reaches the cap (or stalls) keeps the best point found as its frame's
        centre; the first such dataset raises a :class:`~pyro_stein.laplace.LaplaceFrameWarning`, and all are counted
        in ``guide.num_unconverged_frames``.
    """

    dataset_fn: Callable | None = None
    encoder: nn.Module | None = None
    context_dim: int = 32
    mean_features: bool | None = None
    laplace_evaluations: int = 50

    def __post_init__(self):
        if self.dataset_fn is not None and not callable(self.dataset_fn):
            raise TypeError("dataset_fn must be a callable (*args, **kwargs) -> Tensor[num_observations, num_features]")
        if self.encoder is not None and not isinstance(self.encoder, nn.Module):
            raise TypeError(
                "encoder must be a torch.nn.Module (e.g. pyro_stein.nn.DeepSetEncoder), "
                f"got {type(self.encoder).__name__}"
            )
        object.__setattr__(self, "context_dim", _int_at_least(self.context_dim, "context_dim", 1))
        if self.mean_features is not None and not isinstance(self.mean_features, bool):
            raise TypeError(f"mean_features must be a bool or None (the default), got {self.mean_features!r}")
        if self.mean_features and self.encoder is not None:
            raise ValueError(
                "mean_features=True configures the default encoder; build your encoder with "
                "DeepSetEncoder(..., mean_features=True) instead"
            )
        evaluations = _int_at_least(self.laplace_evaluations, "laplace_evaluations", 1)
        object.__setattr__(self, "laplace_evaluations", evaluations)

    def resolved_mean_features(self, whiten: str | None) -> bool:
        """``mean_features``, its default (``None``) decided for a guide whose frame in use is ``whiten``."""
        if self.mean_features is None:  # on where it was measured to help: the default encoder without a frame
            return self.encoder is None and whiten is None
        return self.mean_features

    def to_dict(self) -> dict[str, Any]:
        """The options that are values, and whether the ones that are code were given (those are not saved)."""
        return {
            "context_dim": self.context_dim,
            "mean_features": self.mean_features,
            "laplace_evaluations": self.laplace_evaluations,
            "custom_dataset_fn": self.dataset_fn is not None,
            "custom_encoder": self.encoder is not None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], dataset_fn: Callable | None = None, encoder: nn.Module | None = None):
        """The config :meth:`to_dict` gave ``d``, with the code options passed again (a ``ValueError`` when ``d``
        says one was given and it is not)."""
        for name, given in (("dataset_fn", dataset_fn), ("encoder", encoder)):
            if d.get(f"custom_{name}") and given is None:
                raise ValueError(f"the amortization was saved with a custom {name}; pass it again as {name}=")
        return cls(
            dataset_fn=dataset_fn,
            encoder=encoder,
            context_dim=d.get("context_dim", 32),
            mean_features=d.get("mean_features"),
            laplace_evaluations=d.get("laplace_evaluations", 50),
        )


def size_groups(sizes: Sequence[int], slack: int = 4096) -> list[list[int]]:
    """Positions of datasets grouped by size for padding: in order of size, a dataset joins the current group
    unless padding the group to its size would make the group hold more than twice its real rows plus ``slack``
    (so similar sizes, and all small ones, share one group; a dataset far larger than the rest gets its own)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        n = sizes[i]
        if current and (len(current) + 1) * n > 2 * (total + n) + slack:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    groups.append(current)
    return groups


def frame_summary(frame: FrameTensors) -> Tensor:
    """The datasets' frames as the sampler sees them (before standardisation): the mode ``m`` and the log sds
    ``log sqrt(diag(L L^T))``, ``(B, 2 D)``."""
    loc, scale = frame
    return torch.cat([loc, 0.5 * scale.pow(2).sum(-1).log()], -1)


def read_features(
    dataset_fn: Callable | None,
    model: Callable,
    init_values: dict,
    dataset: Dataset,
    position: int | None = None,
    width: int | None = None,
) -> DatasetFeatures:
    """One dataset's per-observation features, ``(1, N, F)`` with a mask, from ``dataset_fn`` or else
    :func:`~pyro_stein.data.default_dataset_fn` (the model's latents at ``init_values``). ``width``: the feature
    width the guide was set up with (a ``ValueError`` for another); ``position``: what error messages call the
    dataset."""
    if dataset_fn is None:
        out = collate_features([default_dataset_fn(model, init_values, dataset.args, dataset.kwargs)], position or 0)
    else:
        out = collate_features([dataset_fn(*dataset.args, **dataset.kwargs)], start=position or 0)
    if dataset_fn is None and width is not None and out.features.shape[-1] != width and out.features.shape[-2] == 1:
        # one observation: the default reads no covariates unless asked (a length-1 argument may be a parameter);
        # ask when that gives the width the guide was set up with
        wider = collate_features(
            [default_dataset_fn(model, init_values, dataset.args, dataset.kwargs, one_row_covariates=True)],
            start=position or 0,
        )
        if wider.features.shape[-1] == width:
            out = wider
    if width is not None and out.features.shape[-1] != width:
        which = "the dataset's" if position is None else f"dataset {position}'s"
        raise ValueError(
            f"{which} per-observation features have width {out.features.shape[-1]}, but the guide was set up "
            f"with width {width}; pass a dataset of the same form as the training datasets"
        )
    return out


class DatasetEncoding:
    """What an amortized guide does with each dataset: a component of :class:`~pyro_stein.AmortizedSteinGuide`
    (``guide.encoding``), built when the guide is set up.

    It holds the feature width, the per-dataset frame searches' count of unconverged ones, and whether the
    standardisation of the encoder's input (and of the frame summary) is still to be fitted on a first training
    batch; what it computes for a dataset is cached on the :class:`~pyro_stein.data.Dataset` under the guide's
    ``token``. The networks (encoder, frame-summary statistics) are the guide's and are passed in.

    :param Amortization config: the options.
    :param int token: the guide's key for what it caches on datasets.
    :param callable model: the model the guide's latent sites belong to.
    :param list sites: the guide's latent sites.
    :param callable init_values: ``() -> {site: value}``, the guide's initial values (in its networks' dtype).
    :param ModelLogDensity log_density: the guide's own evaluations of the model.
    :param bool per_dataset_frames: each dataset gets a Laplace frame (``whiten="laplace"``).
    :param bool squash_frame_summary: pass the standardised frame summary through ``asinh`` (guides saved before
        that keep it linear).
    """

    def __init__(
        self,
        config: Amortization,
        token: int,
        model: Callable,
        sites: Sequence[LatentSite],
        init_values: Callable[[], dict],
        log_density: ModelLogDensity,
        per_dataset_frames: bool,
        squash_frame_summary: bool = True,
    ):
        self.config = config
        self.token = token
        self.model = model
        self.sites = list(sites)
        self.init_values = init_values
        self.log_density = log_density
        self.per_dataset_frames = per_dataset_frames
        self.squash_frame_summary = squash_frame_summary
        self.feature_dim: int | None = None
        self.standardization_pending = False
        self.num_unconverged_frames = 0  # datasets whose frame search did not converge (see frames)

    def read(self, dataset: Dataset, position: int | None = None) -> DatasetFeatures:
        """:func:`read_features` of one dataset (not cached)."""
        return read_features(
            self.config.dataset_fn, self.model, self.init_values(), dataset, position, self.feature_dim
        )

    def features(self, dataset: Dataset, like: Tensor, position: int = 0) -> Tensor:
        """One dataset's features ``(N, F)`` in ``like``'s dtype (cached on it), after checking that its latent
        sites' supports are the guide's; ``position`` (in its batch) is what error messages call it."""
        key = ("features", self.token)
        feats = dataset.cache.get(key)
        if feats is None:
            check_supports(self.model, self.sites, self.init_values(), like, dataset, position)
            f = self.read(dataset, position)
            feats = f.features[0, : int(f.mask[0].sum())]
            if feats.dtype != like.dtype:
                feats = feats.to(like.dtype)  # e.g. integer features, or a dataset_fn in another precision
            dataset.cache[key] = feats
        return feats

    def frames(self, datasets: Sequence) -> FrameTensors:
        """Per-dataset Laplace frames ``(m (B, D), L (B, D, D))``, found by :func:`~pyro_stein.laplace.laplace_frames`
        from the initial values for the datasets not seen before (cached on each
        :class:`~pyro_stein.data.Dataset`)."""
        datasets = [as_dataset(d) for d in datasets]
        key = ("laplace", self.token)
        todo = [i for i, d in enumerate(datasets) if key not in d.cache]
        if todo:
            init = pack(self.init_values(), self.sites, batch_dims=0).detach()
            pending = [datasets[i] for i in todo]

            def fn(idx: Tensor, points: Tensor):
                return self.log_density.log_density_and_score_batch(
                    points, [pending[i] for i in idx.tolist()], check=False
                )

            with poutine.block():  # called inside the guide (e.g. under Predictive): keep the model's sites private
                found = laplace_frames(
                    fn, init.expand(len(todo), -1).clone(), max_evaluations=self.config.laplace_evaluations
                )
            for j, i in enumerate(todo):
                datasets[i].cache[key] = (found.loc[j], found.scale[j])
            self._note_unconverged(found.converged, todo)
        got = [d.cache[key] for d in datasets]
        return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])

    def _note_unconverged(self, converged: Tensor, positions: list[int]) -> None:
        """Count datasets whose mode search did not converge (cap reached or stalled); warn the first time."""
        missed = (~converged).nonzero().flatten().tolist()
        if not missed:
            return
        first_time = self.num_unconverged_frames == 0
        self.num_unconverged_frames += len(missed)
        if first_time:
            warnings.warn(
                f"whiten='laplace': the mode search of {len(missed)} of {len(positions)} dataset(s) in this call (the "
                f"first at position {positions[missed[0]]}) did not converge (it reached laplace_evaluations="
                f"{self.config.laplace_evaluations} batched model evaluations, or stalled), so their frames are "
                "centred at the best point found, which may be far from the posterior (e.g. a hierarchical scale "
                "running to 0 in a centred parameterisation, whose log density has no proper mode). Raise "
                "laplace_evaluations, use a non-centred parameterisation, or use whiten=None. Further ones are "
                "counted in guide.num_unconverged_frames without a warning.",
                LaplaceFrameWarning,
                stacklevel=4,
            )

    def encode(
        self, encoder: nn.Module, summary_stats: FrameTensors | None, features: DatasetFeatures, frame=None
    ) -> Tensor:
        """The sampler's contexts ``(B, C)`` for collated datasets: their encodings, followed with per-dataset frames
        by the standardised (``summary_stats``: location and scale), ``asinh``-squashed :func:`frame_summary` of
        their ``frame``."""
        enc = encoder(features.features, features.mask)
        if not self.per_dataset_frames:
            return enc
        if frame is None:
            raise ValueError(
                "an amortized guide with whiten='laplace' conditions on each dataset's frame: "
                "pass frame=guide.frames(datasets)"
            )
        summary = (frame_summary(frame) - summary_stats[0]) / summary_stats[1]
        if self.squash_frame_summary:
            # asinh: ~linear within a few sds of the first training batch, logarithmic beyond, so that a frame unlike
            # that batch's (a coordinate that hardly varied in it) cannot feed the sampler an extreme context
            summary = torch.asinh(summary)
        return torch.cat([enc, summary], -1)

    def contexts(
        self, encoder: nn.Module, summary_stats, datasets: Sequence[Dataset], like: Tensor, frame=None
    ) -> Tensor:
        """:meth:`encode` of :class:`~pyro_stein.data.Dataset` objects (their features cached on them).

        Datasets of very different sizes are encoded in groups of similar sizes (see :func:`size_groups`), each
        padded only to its own largest, so one large dataset does not pad its small neighbours to its size: the
        encoder's input holds at most ``2 R + 4096`` rows per group for groups of ``R`` real rows."""
        feats = [self.features(d, like, i) for i, d in enumerate(datasets)]
        groups = size_groups([f.shape[0] for f in feats])
        if len(groups) == 1:
            return self.encode(encoder, summary_stats, collate_features(feats), frame)
        parts = [
            self.encode(
                encoder,
                summary_stats,
                collate_features([feats[i] for i in g]),
                None if frame is None else (frame[0][g], frame[1][g]),
            )
            for g in groups
        ]
        order = torch.tensor([i for g in groups for i in g], device=parts[0].device)
        return torch.cat(parts)[torch.argsort(order)]

    def fit_standardization(
        self, encoder: nn.Module | None, summary_stats, datasets: Sequence[Dataset], like: Tensor
    ) -> None:
        """Refit the default ``encoder``'s per-feature standardisation (``None``: a user's encoder, left alone) and,
        with per-dataset frames, the frame summary's statistics ``summary_stats`` (buffers, set in place) on a
        batch of datasets. A frame-summary coordinate that does not vary across the batch keeps scale 1."""
        self.standardization_pending = False
        if self.per_dataset_frames:
            summary = frame_summary(self.frames(datasets))
            loc = summary.mean(0)
            sd = summary.std(0) if summary.shape[0] > 1 else torch.zeros_like(loc)
            varies = sd > 1e-6 * loc.abs().clamp_min(1.0)
            summary_stats[0].copy_(loc)
            summary_stats[1].copy_(torch.where(varies, sd, torch.ones_like(sd)))
        if encoder is None:
            return
        feats = collate_features([self.features(d, like, i) for i, d in enumerate(datasets)])
        encoder.set_standardization(feats.features, feats.mask)
