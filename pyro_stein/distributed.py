"""Data-parallel amortized training with :mod:`torch.distributed` (one process per device).

Every rank draws its own batch of datasets (a disjoint shard of a collection, see
:func:`shard`, or a prior-predictive stream seeded per rank, see :func:`seed_rank`), computes the
per-dataset Stein directions locally, and then the gradients of the guide's sampler and encoder
are averaged over ranks with one ``all_reduce`` per step, weighted by the number of datasets each
rank used. Every rank then applies the same optimiser step to the same parameters, so the ranks
stay bit-identical; an update with ``K`` ranks of ``B`` datasets each is the update a single
process would make on the union of the ``K * B`` datasets.

Launch with ``torchrun`` (NCCL on GPUs, gloo on CPUs)::

    torchrun --nproc_per_node=2 tutorials/distributed_amortized.py --steps 2000

and in the script::

    ctx = init_distributed()                      # reads RANK / WORLD_SIZE / LOCAL_RANK; no-op without torchrun
    seed_rank(0)                                  # pyro.set_rng_seed(0 + rank): independent streams and noise
    guide = AmortizedSteinGuide(model, amortized=True)
    svgd = DistributedAmortizedSVGD(model, guide, pyro.optim.Adam({"lr": 3e-3}), num_particles=64)
    svgd.run(datasets=stream, num_steps=2000, batch_size=8)  # batch_size is per rank
    svgd.save_checkpoint("ckpt.pt")               # written by rank 0 only
    cleanup_distributed()

Why explicit collectives rather than :class:`torch.nn.parallel.DistributedDataParallel`: the
forward pass of the guide runs inside the driver in two pieces (``guide.encode`` then
``guide.draw``), the guide's own methods and :class:`~pyro_stein.construction.SamplerDistribution` read
attributes of ``guide.sampler`` (``noise_dim``, ``latent_dim``) that a DDP wrapper hides, and DDP
would rename every parameter (``sampler.module.*``), which changes the keys of ``state_dict``,
of the Pyro param store and of the optimiser state, so checkpoints would not load across world
sizes or into a plain guide. The networks are small, so DDP's bucketed overlap of communication
with the backward pass buys nothing here; one flat ``all_reduce`` per step is the same
arithmetic with none of those costs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import _int_at_least
from .data import Dataset, as_dataset
from .guide import AmortizedSteinGuide
from .infer import AmortizedSVGD
from .logjoint import NonFiniteLogJointError
from .updates import register_params

__all__ = [
    "DistributedAmortizedSVGD",
    "DistributedContext",
    "broadcast_module",
    "cleanup_distributed",
    "init_distributed",
    "load_checkpoint",
    "max_parameter_deviation",
    "seed_rank",
    "shard",
]


# ---------------------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device`` and the ``backend``.

    ``backend`` is ``None`` when no process group was started (a plain ``python script.py``).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs and writes checkpoints)."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return None if v in (None, "") else int(v)


def init_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> DistributedContext:
    """Start the process group from ``torchrun``'s environment and pick this rank's device.

    Without ``torchrun`` (``RANK``/``WORLD_SIZE`` unset) nothing is started and the context says
    world size 1, so the same script runs plainly with ``python script.py``. A process group the
    caller has already started (e.g. ``mp.spawn`` workers calling ``init_process_group``) gives the
    rank, world size and backend.

    :param str backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
    :param device: this rank's device; default ``cuda:LOCAL_RANK`` with NCCL, else CPU (with
        gloo on a CUDA machine, pass ``device="cuda"`` to get ``cuda:LOCAL_RANK``).
    :param timeout: collective timeout (seconds or a ``timedelta``); a rank that dies or stalls
        makes the others fail after this long instead of hanging (torch's default is 30 min).
    """
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():  # a group the caller started (e.g. mp.spawn): it has the say
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    if rank is None or world_size is None:
        if device is None:
            device = "cuda" if (backend == "nccl" and cuda) else "cpu"
        return DistributedContext(0, 1, 0, torch.device(device), None)
    local_rank = rank if local_rank is None else local_rank
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend='nccl' needs CUDA devices; use backend='gloo' on CPUs")
    if device is None:
        device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw: dict[str, Any] = {}
        if timeout is not None:
            kw["timeout"] = (
                timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))
            )
        if backend == "nccl":
            kw["device_id"] = device
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kw)
    return DistributedContext(rank, world_size, local_rank, device, backend)


def cleanup_distributed() -> None:
    """Destroy the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    on = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if on else 0
    if world_size is None:
        world_size = dist.get_world_size() if on else 1
    return rank, world_size


def shard(collection: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's disjoint share of a finite collection: ``collection[rank::world_size]``.

    The shards of all ranks partition the collection; with world size 1 it is the whole list.
    """
    rank, world_size = _rank_world(rank, world_size)
    world_size, rank = _int_at_least(world_size, "world_size", 1), _int_at_least(rank, "rank", 0)
    if rank >= world_size:
        raise ValueError(f"rank must be below world_size = {world_size}, got {rank}")
    items = list(collection)
    if len(items) < world_size:
        raise ValueError(
            f"a collection of {len(items)} datasets cannot be split over {world_size} ranks (one rank would get none)"
        )
    return items[rank::world_size]


def seed_rank(seed: int, rank: int | None = None) -> int:
    """Seed Python, NumPy and torch with ``seed + rank`` and return it.

    Every rank then draws different prior-predictive datasets (a
    :class:`~pyro_stein.PriorPredictiveStream` uses the global RNG) and different particle noise.
    The guide's initial weights need no common seed: :class:`DistributedAmortizedSVGD`
    broadcasts rank 0's before the first step.
    """
    rank, _ = _rank_world(rank, None)
    pyro.set_rng_seed(int(seed) + rank)
    return int(seed) + rank


# ---------------------------------------------------------------------------------------------- collectives
def _module_tensors(module: nn.Module) -> list[Tensor]:
    return [p.data for p in module.parameters()] + [b for b in module.buffers()]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers with rank ``src``'s (no-op without a group)."""
    if not _active():
        return
    tensors = _module_tensors(module)
    by_dtype: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def max_parameter_deviation(module: nn.Module) -> float:
    """Largest absolute difference between any rank's parameters and rank 0's (0.0 when in sync).

    A collective: every rank must call it. Returns the same value on every rank.
    """
    params = [p.detach().reshape(-1) for p in module.parameters()]
    if not params or not _active():
        return 0.0
    flat = torch.cat(params)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


# ---------------------------------------------------------------------------------------------- driver
class DistributedAmortizedSVGD(AmortizedSVGD):
    """:class:`~pyro_stein.AmortizedSVGD` with gradients averaged over ``torch.distributed`` ranks.

    Same constructor and methods as :class:`~pyro_stein.AmortizedSVGD`; without a process group
    (world size 1) it behaves exactly like it. With ``K`` ranks:

    * before the first update (after ``guide.setup``), rank 0's parameters *and buffers* (e.g.
      the encoder's feature standardisation, which setup fits on each rank's first dataset) are
      broadcast to all ranks;
    * each update, every rank runs the update of :class:`~pyro_stein.AmortizedSVGD` on its own datasets; just
      before the optimiser step (:meth:`reduce_gradients`) one ``all_reduce`` sums
      ``[B_r * grad_r, has_grad_r, B_r, failed_r]`` and the gradient used is ``sum_r B_r grad_r / sum_r B_r``
      (the single-process gradient on all ``sum_r B_r`` datasets). The returned ``KSD^2`` diagnostic is this
      rank's own;
    * if any rank fails (non-finite log joint or gradient), every rank raises and no rank
      updates, so the ranks neither diverge nor hang in a collective.

    ``batch_size`` in :meth:`run` is per rank; :attr:`datasets_seen` counts datasets over all ranks.
    Only rank 0 shows a progress bar. Give every rank the same ``num_steps``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.datasets_seen = 0
        self._synced = False
        self._synced_now = False  # whether this update broadcast the parameters (redone if it fails)
        self._weight = 0.0

    @property
    def rank(self) -> int:
        return _rank_world()[0]

    @property
    def world_size(self) -> int:
        return _rank_world()[1]

    def sync_parameters(self) -> None:
        """Broadcast rank 0's guide parameters and buffers to all ranks (done before the first step)."""
        broadcast_module(self.guide)
        self._synced = True

    # The base class's update runs the whole step; two hooks make it data-parallel. before_update broadcasts rank
    # 0's parameters and buffers before the first update (after each rank fitted the standardisation of a fresh
    # guide on its own batch). reduce_gradients, called just before the optimiser step, averages the gradients over
    # ranks with one all_reduce. A rank whose update raises before that (non-finite log joint or gradient) still
    # joins the step's all_reduce, flagged as failed (step_failed), so every rank raises together instead of the
    # others hanging in the collective.
    _step_counters = ("num_steps", "datasets_seen")

    def before_update(self, datasets: Sequence[Dataset]) -> None:
        self._weight = float(len(datasets))
        self._synced_now = not self._synced
        if not self._synced:
            self.sync_parameters()

    def step_failed(self) -> None:
        if _active():
            self._all_reduce_grads(failed=True)  # let the other ranks know, then raise here too
        if self._synced_now:
            self._synced = False  # the standardisation is fitted and broadcast again next time

    def _all_reduce_grads(self, failed: bool = False) -> tuple[float, list[Tensor]]:
        """Sum ``[B * grad, has_grad, B, failed]`` over ranks; returns (total B, params with a gradient)."""
        params = register_params(self.guide, self.guide.param_prefix)
        like = params[0]
        w = self._weight
        grads = [torch.zeros_like(p) if (failed or p.grad is None) else p.grad * w for p in params]
        has = [0.0 if (failed or p.grad is None) else 1.0 for p in params]
        flat = torch.cat(
            [g.reshape(-1) for g in grads]
            + [torch.tensor(has + [w, float(failed)], dtype=like.dtype, device=like.device)]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        total, num_failed = float(flat[-2]), int(flat[-1])
        if num_failed:
            for p in params:
                p.grad = None
            if failed:
                return total, []
            raise NonFiniteLogJointError(
                f"{num_failed} other rank(s) failed this step (see their error); no rank updated its parameters"
            )
        offset, with_grad = 0, []
        for k, p in enumerate(params):
            if flat[-2 - len(params) + k] > 0:
                p.grad = flat[offset : offset + p.numel()].view_as(p) / total
                with_grad.append(p)
            offset += p.numel()
        return total, with_grad

    def reduce_gradients(self, params: list[Tensor], num_datasets: int) -> list[Tensor]:
        """Average the gradients over ranks, weighted by the datasets in each rank's loss (those left out for
        non-finite values excluded); counts the datasets of all ranks in :attr:`datasets_seen`."""
        self._weight = float(num_datasets)
        if _active():
            total, params = self._all_reduce_grads()
        else:
            total = self._weight
        self.datasets_seen += int(round(total))
        return params

    def run(self, *args, progress_bar: bool = True, **kwargs) -> list[float]:
        """As :meth:`AmortizedSVGD.run`; ``batch_size`` is per rank and only rank 0 shows progress."""
        return super().run(*args, progress_bar=progress_bar and self.rank == 0, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def get_state(self) -> dict:
        state = super().get_state()
        state["datasets_seen"] = self.datasets_seen
        state["world_size"] = self.world_size
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.datasets_seen = int(state.get("datasets_seen", 0))

    def save_checkpoint(self, path: str | os.PathLike, **extra: Any) -> None:
        """Rank 0 writes ``{"guide": state_dict, "svgd": get_state(), "world_size", **extra}``; all ranks wait.

        A collective: call it on every rank. Load it, on any world size, with :func:`load_checkpoint`.
        The file holds tensors and plain values only (it is read back with ``weights_only=True``), so
        ``extra`` values must be tensors, numbers, strs, bools, ``None`` or dicts/lists/tuples of them
        (a ``TypeError`` naming the entry otherwise, before anything is written). The write is atomic:
        an interrupted save leaves the previous file at ``path``, if any, intact.
        """
        from ._io import atomic_torch_save, check_plain

        for key in ("format", "format_version", "guide", "svgd", "world_size"):
            if key in extra:
                raise ValueError(
                    f"save_checkpoint's extra entry {key!r} would overwrite the checkpoint's own; rename it"
                )
        check_plain(extra, "save_checkpoint's extra")
        if self.rank == 0:
            state = {
                "format": _CHECKPOINT_FORMAT,
                "format_version": _CHECKPOINT_VERSION,
                "guide": dict(self.guide.state_dict()),
                "svgd": self.get_state(),
                "world_size": self.world_size,
                **extra,
            }
            check_plain(state, "the checkpoint")
            atomic_torch_save(state, path)
        if _active():
            dist.barrier()


_CHECKPOINT_FORMAT = "pyro_stein.DistributedCheckpoint"
_CHECKPOINT_VERSION = 1


def _checked_checkpoint(path, state: Any, guide: AmortizedSteinGuide) -> None:
    """Check a loaded checkpoint before anything is changed: its format and version, the guide's tensors (names,
    shapes and dtype of ``guide``'s own, finite) and the optimiser state (finite, its counters ints >= 0).
    Raises :class:`~pyro_stein.CheckpointError` naming the file."""
    from ._io import CheckpointError, check_finite_tensors, check_format_version, check_tensor_dict

    if (
        not isinstance(state, dict)
        or not isinstance(state.get("guide"), dict)
        or not isinstance(state.get("svgd"), dict)
    ):
        raise CheckpointError(path, "is not a file written by DistributedAmortizedSVGD.save_checkpoint()")
    fmt = state.get("format", _CHECKPOINT_FORMAT)  # files written before the format was recorded lack it
    if fmt != _CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"has format {fmt!r}, not {_CHECKPOINT_FORMAT!r}")
    check_format_version(path, state.get("format_version", 1), _CHECKPOINT_VERSION)
    own = guide.state_dict(keep_vars=True)
    check_tensor_dict(
        path, state["guide"], "guide", integer_ok=lambda key: key in own and not own[key].is_floating_point()
    )
    got = {k: (tuple(v.shape), v.is_floating_point()) for k, v in state["guide"].items()}
    want = {k: (tuple(v.shape), v.is_floating_point()) for k, v in own.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise CheckpointError(
            path,
            f"its guide weights do not match this guide's (e.g. {diff} differ): load it into a "
            "guide built and set up as the one that was saved",
        )
    svgd = state["svgd"]
    for key in ("num_steps", "num_dropped_datasets", "datasets_seen"):
        v = svgd.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(path, f"svgd[{key!r}] = {v!r} is not an int >= 0: the file is corrupt or was altered")
    if not isinstance(svgd.get("optim", {}), dict):
        raise CheckpointError(path, "svgd['optim'] is not a dict of optimiser states: the file is corrupt")
    check_finite_tensors(path, svgd.get("optim", {}), "svgd['optim']")


def load_checkpoint(
    path: str | os.PathLike,
    guide: AmortizedSteinGuide,
    svgd: AmortizedSVGD | None = None,
    example: Any = None,
    map_location: Any = None,
) -> dict:
    """Restore a checkpoint written by :meth:`DistributedAmortizedSVGD.save_checkpoint` (every rank calls this).

    Works for any world size (the file holds one copy of the parameters and optimiser state,
    not one per rank). The guide must be set up, or given ``example`` (a
    :class:`~pyro_stein.Dataset` of the training form) to set it up with.

    The file is read with ``weights_only=True`` (no code runs) and checked before the guide or
    ``svgd`` is changed: a truncated or corrupt file, one from a newer version, weights of other
    names, shapes or dtypes than the guide's, or NaN/infinite values raise
    :class:`~pyro_stein.CheckpointError` (a ``ValueError``) naming the file.

    :returns: the whole checkpoint dict (with any ``extra`` entries saved alongside).
    """
    from ._io import load_weights_only

    if example is not None:
        ex = as_dataset(example)
        guide.setup(*ex.args, **ex.kwargs)
    if guide.prototype_trace is None:
        raise ValueError("set the guide up (guide.setup(*example_args)) or pass example=Dataset(...) before loading")
    state = load_weights_only(path, map_location)
    _checked_checkpoint(path, state, guide)
    guide.load_state_dict(state["guide"])
    if svgd is not None:
        svgd.set_state(state["svgd"])
        if isinstance(svgd, DistributedAmortizedSVGD):
            svgd._synced = (
                False  # re-broadcast before the next step (a no-op in effect: all ranks loaded the same file)
            )
    return state
