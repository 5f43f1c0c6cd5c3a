"""Replaying a model's batched log density and score from a recorded graph.

Evaluating a Pyro model under :func:`torch.func.vmap` costs milliseconds of Python per call (the
model runs, Pyro's handlers trace it, vmap batches each op, autograd records and replays the
backward), often more than the arithmetic itself. When the training loop calls the log density
again and again with the same arguments, that Python does the same thing every time.
:class:`GraphedLogDensity` records it once:

1. :func:`torch.fx.experimental.proxy_tensor.make_fx` traces ``u -> (log density, score)`` into a
   flat graph of tensor operations, backward included. Python numbers inside the model
   (``Normal(0., 1.)``) become constants; data-dependent Python control flow (``if y.sum() > 0``,
   ``.item()``) makes the trace fail, and the function is then never recorded.
2. On a GPU, :class:`torch.cuda.CUDAGraph` captures one run of that graph; each later call copies
   the new particles into the graph's input buffer and replays it with a single launch. Elsewhere
   the traced graph itself is called (on a CPU about half the cost of the model's own evaluation
   for small models).

A recording is tied to the arguments it was made with: the same tensor objects (held, so their
memory cannot be reused) at the same version (an in-place change to the data is seen, since the
graph reads their memory, and it bumps the version, which triggers a new recording), the same
particle shape and the same non-tensor values. Arguments of other types (modules, custom objects)
switch recording off for that log density, as does a failed trace or capture, or a first replay
that disagrees with the ordinary evaluation. Recording waits until the same arguments come back
``min_calls`` times in a row, so one-off evaluations never pay for it (a trace takes about 0.1-0.3 s,
plus about 2 s the first time in a process), and stops after ``max_recordings`` recordings
(arguments that change every call, e.g. a new copy of the data each step, would only pay the
recording cost).

The model must be a function of its latent values and its arguments: a model that reads state
elsewhere (a global that is reassigned between calls, parameters replaced in the param store)
would replay stale values. Pass ``record_graph=False`` to :class:`~pyro_stein.AmortizedSVGD` for
such models. A CUDA graph keeps its intermediate buffers allocated between calls (for logistic
regression with 10^6 rows and 128 particles, about 2 GB).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable

import pyro
import torch
from torch import Tensor

__all__ = ["GraphedLogDensity"]

_STATIC_TYPES = (numbers.Number, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _signature(u: Tensor, args: tuple, kwargs: dict) -> tuple[Any, list[Tensor]] | None:
    """A hashable description of a call (tensors by shape/dtype/device/strides, other values by
    value) and the list of its tensors; ``None`` when an argument has a type that cannot be compared
    safely."""
    tensors: list[Tensor] = []

    def walk(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            tensors.append(obj)
            return ("tensor", tuple(obj.shape), tuple(obj.stride()), obj.dtype, obj.device)
        if isinstance(obj, (tuple, list)):
            return (type(obj).__name__,) + tuple(walk(o) for o in obj)
        if isinstance(obj, dict):
            return ("dict",) + tuple((k, walk(v)) for k, v in obj.items())
        if isinstance(obj, _STATIC_TYPES):
            return obj
        raise TypeError(type(obj).__name__)

    try:
        key = (walk(u), walk(tuple(args)), walk(dict(kwargs)))
        hash(key)
    except TypeError:
        return None
    return key, tensors


# Operations that wait for the GPU (their output's size or value is needed on the host): a CUDA graph
# cannot capture them. A capture that fails half-way can leave the device's random-number generator
# in capture mode, so such graphs are screened out beforehand (see _capture_hazard).
_SYNCING_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::is_nonzero", "aten::equal", "aten::allclose", "aten::bincount", "aten::histc",
    "aten::repeat_interleave", "aten::_assert_async", "aten::masked_scatter", "aten::index_put", "aten::index_put_",
    "aten::_linalg_check_errors",
}


def _capture_hazard(traced: torch.fx.GraphModule, u: Tensor) -> str | None:
    """Why the traced graph cannot be captured as a CUDA graph on ``u.device`` (``None`` when it can):
    an operation that synchronises with the host, indexing with a boolean mask, or a copy from host
    memory (a constant made on the CPU and moved to the GPU). Found by running the graph once,
    looking at each operation's inputs and outputs, with CUDA's synchronisation check set to raise
    (which also catches operations that wait for the device inside their own implementation, e.g.
    linear-algebra routines that check their result)."""
    device = u.device
    found: list[str] = []

    class Screen(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op != "call_function" or found:
                return out
            name = getattr(getattr(n.target, "_schema", None), "name", str(n.target))
            args = [a for a in torch.utils._pytree.tree_leaves((self.map_nodes_to_values(n.args, n), self.map_nodes_to_values(n.kwargs, n))) if isinstance(a, Tensor)]
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, Tensor)]
            if name in _SYNCING_OPS:
                found.append(f"{name} waits for the device")
            elif name.startswith("aten::index") and any(a.dtype == torch.bool for a in args[1:]):
                found.append(f"{name} with a boolean mask waits for the device")
            elif any(o.device == device for o in outs) and any(a.device != device and (a.dim() > 0 or "copy" in name or name.startswith("aten::to")) for a in args):
                found.append(f"{name} copies a tensor from {next(a.device for a in args if a.device != device)} to {device}")
            return out

    on_gpu = device.type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if on_gpu else 0
    try:
        with warnings.catch_warnings():  # setting the mode warns that it is a prototype feature
            warnings.simplefilter("ignore")
            if on_gpu:
                torch.cuda.set_sync_debug_mode("error")
            with torch.no_grad():
                Screen(traced).run(u)
    except RuntimeError as e:
        found.append(f"an operation waits for the device ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    finally:
        if on_gpu:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.cuda.set_sync_debug_mode(previous)
    return found[0] if found else None


class _Recording:
    """One traced graph (and, on a GPU, its CUDA graph) for one call signature."""

    def __init__(self, fn: Callable[[Tensor], tuple[Tensor, Tensor]], u: Tensor, key: Any, tensors: list[Tensor]):
        from torch.fx.experimental.proxy_tensor import make_fx

        self.key = key
        self.tensors = tensors[1:]  # the arguments' tensors (the first is u itself), held
        self.versions = [t._version for t in self.tensors]
        with pyro.validation_enabled(False):
            self.traced = make_fx(fn)(u.detach())
        self.graph = None
        self.hazard = _capture_hazard(self.traced, u.detach()) if u.device.type == "cuda" else None
        if u.device.type == "cuda" and self.hazard is None:
            self.static_u = u.detach().clone()
            stream = torch.cuda.current_stream(u.device)
            side = torch.cuda.Stream(device=u.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):  # warm-up off the capturing stream (library handles, workspaces)
                self.traced(self.static_u)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.traced(self.static_u)
            self.graph = graph

    def matches(self, key: Any, tensors: list[Tensor]) -> bool:
        return (
            key == self.key
            and all(a is b for a, b in zip(tensors[1:], self.tensors))
            and all(t._version == v for t, v in zip(self.tensors, self.versions))
        )

    def __call__(self, u: Tensor) -> tuple[Tensor, Tensor]:
        if self.graph is None:
            return self.traced(u.detach())
        self.static_u.copy_(u.detach())
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


def _close(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> bool:
    """Agreement up to rounding (summation order differs between the traced and the eager run)."""
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False
        finite = w[torch.isfinite(w)]  # an infinite log density at some particle must not make every value "close"
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        if not torch.allclose(g, w, rtol=1e-3, atol=1e-3 * scale + 1e-6, equal_nan=True):
            return False
    return True


class GraphedLogDensity:
    """Calls of ``eager()`` (returning ``(log density, score)`` at ``u``) replaced by a recorded graph
    once the same arguments keep coming back (see the module docstring).

    :param callable single: ``single(row, args, kwargs)``: the log density at one unconstrained
        vector ``row`` (a scalar tensor); it is traced under ``vmap(grad_and_value(...))``.
    :param int min_calls: record at the ``min_calls``-th consecutive call with the same arguments.
    :param int max_recordings: recordings allowed before graphs are switched off.
    :param callable can_record: checked before recording (e.g. whether the model was found vectorizable).

    ``status`` says what happens: ``"waiting"``, ``"replaying"`` (on a GPU, possibly without a CUDA
    graph, when the traced graph waits for the device or copies host memory; the status says which
    operation) or ``"off: <reason>"``.
    """

    def __init__(
        self,
        single: Callable[[Tensor, tuple, dict], Tensor],
        min_calls: int = 20,
        max_recordings: int = 4,
        can_record: Callable[[], bool] = lambda: True,
    ):
        self.single = single
        self.can_record = can_record
        self.min_calls = min_calls
        self.max_recordings = max_recordings
        self.status = "waiting"
        self.num_recordings = 0
        self._recording: _Recording | None = None
        self._pending: _Recording | tuple[Any, list[Tensor], list[int]] | None = None
        self._pending_calls = 0

    def _off(self, reason: str) -> None:
        self.status = f"off: {reason}"
        self._recording = self._pending = None

    def __call__(self, u: Tensor, args: tuple, kwargs: dict, eager: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if self.status.startswith("off") or u.dim() != 2:
            return eager()
        sig = _signature(u, args, kwargs)
        if sig is None:
            self._off("an argument is neither a tensor nor a plain value (number, string, None, dtype, device)")
            return eager()
        key, tensors = sig
        rec = self._recording
        if rec is not None and rec.matches(key, tensors):
            return rec(u)
        # arguments not seen last time: count consecutive calls with these before recording
        pend = self._pending
        same = (
            pend is not None
            and pend[0] == key
            and all(a is b for a, b in zip(tensors[1:], pend[1]))
            and all(t._version == v for t, v in zip(pend[1], pend[2]))
        )
        self._pending_calls = self._pending_calls + 1 if same else 1
        want = eager()  # errors (and non-finite values, checked by the caller) surface from the ordinary run
        if not same:
            self._pending = (key, tensors[1:], [t._version for t in tensors[1:]])
        if self._pending_calls < self.min_calls:
            return want
        if not self.can_record():
            self._off("the model is not evaluated with torch.func.vmap")
            return want
        if self.num_recordings >= self.max_recordings:
            self._off(f"the arguments changed after {self.num_recordings} recordings (a new data tensor every call?)")
            return want
        self.num_recordings += 1
        self._pending, self._pending_calls = None, 0
        single = self.single

        def fn(v: Tensor) -> tuple[Tensor, Tensor]:
            score, lp = torch.func.vmap(torch.func.grad_and_value(lambda r: single(r, args, kwargs)), randomness="same")(v)
            return lp, score

        try:
            rec = _Recording(fn, u, key, tensors)
            got = rec(u)
        except Exception as e:  # noqa: BLE001 - any failure only means: no graph for this model
            self._off(f"recording failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return want
        if not _close(got, tuple(w.detach() for w in want)):
            self._off("the recorded graph disagreed with the model's own evaluation")
            return want
        self._recording = rec
        self.status = "replaying" if rec.hazard is None else f"replaying the traced graph, without a CUDA graph: {rec.hazard}"
        return want
