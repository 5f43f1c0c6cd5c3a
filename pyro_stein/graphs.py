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
   the traced graph itself is called (on a CPU, 25-35 % cheaper than the model's own evaluation
   on the benchmark models).

A recording is tied to the arguments it was made with: the same tensor objects (held, so their
memory cannot be reused) at the same version (an in-place change to the data is seen, since the
graph reads their memory, and it bumps the version, which triggers a new recording), the same
particle shape and the same non-tensor values (compared with their types: ``1``, ``1.0`` and
``True`` differ, as do ``0.0`` and ``-0.0``). Recording waits until the same arguments come back
``min_calls`` times in a row, so one-off evaluations never pay for it (a trace takes about 0.1-0.3 s,
more the first time in a process), and stops after ``max_recordings`` recordings (arguments that
change every call, e.g. a new copy of the data each step, would only pay the recording cost).

Nothing is recorded (``status`` says why) for arguments other than dense tensors and plain values
(modules, custom objects, sparse tensors), for models with ``pyro.param``/``pyro.module`` sites
(their values can be replaced between calls), for graphs whose shapes depend on the data's values
(boolean-mask selection, ``nonzero``, ``unique``: a write that bypasses the version counter, e.g.
through a NumPy view, would otherwise meet frozen shapes), or when the trace fails or its first
replay disagrees with the model's own evaluation. A replay that raises falls back to the model's
own evaluation (which raises the model's error), and every ``verify_every``-th replay is compared
with it: a difference means the model reads state other than its arguments (a global reassigned
between calls, a module switched between ``train()`` and ``eval()``), and recording is switched off
with a :class:`RecordedGraphWarning`. A global tensor that the model function names itself and that is
reassigned between calls (``X = new_X``) is seen at once: the identities of those globals are part of what a
recording is tied to. Other such state (a global read by a function the model calls, a tensor held by another
object) is only seen by the checks, and between two of them a replay can be stale, so pass
``record_graph=False`` to :class:`~pyro_stein.AmortizedSVGD` for models that read such state. A
CUDA graph keeps its intermediate buffers allocated between calls (for logistic regression with
10^6 rows and 128 particles, each particles-by-rows intermediate takes 512 MB in float32).

With ``share_across_data=True`` (what :class:`~pyro_stein.AmortizedSteinGuide` uses when it draws for
new datasets), a recording is instead tied to the *shapes* of the arguments: the data tensors are
inputs of the traced graph, so one recording serves every dataset with the same shapes, dtypes and
plain values (e.g. every new dataset with the same number of groups). The trace then runs on fake
tensors that have no values, so a model whose Python control flow reads the data's values
(``if y.sum() > 0``, ``.item()``) cannot be traced and is never recorded, rather than recorded with
one dataset's branch; other tensors the model reads (a prior's tensor bounds, which the guide's
bijections hold since setup, or a global) are constants of the recording, as in the recordings
above. A shape is recorded once it has come back ``min_calls`` times (not necessarily
in a row); up to ``max_recordings`` shapes are kept, the least recently used dropped first. A
recording dropped before it was replayed ``min_calls`` times cost more than it saved; once
``max_recordings`` recordings have been dropped that way (datasets whose shapes rarely repeat, e.g.
a new number of rows each time), recording is switched off, so such data are not traced over and
over. These
recordings replay the traced graph (no CUDA graph: its inputs would have to be copied every call),
simplified first: constants are computed once and operations that return an earlier value exactly
(``x + 0``, ``x * 1``, a reshape back to an earlier shape; the traced backward pass has many) are
bypassed, which on the CPU takes family (b) of the amortization benchmark from 150 graph nodes to 94
and a replay at 1,000 draws from 2.4 to 1.6 ms.
"""

from __future__ import annotations

import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from torch import Tensor

__all__ = ["GraphedLogDensity", "RecordedGraphWarning"]

_PLAIN_TYPES = (numbers.Number, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class RecordedGraphWarning(UserWarning):
    """A recorded log density stopped matching the model's own evaluation; recording was switched off."""


@dataclass(frozen=True, eq=False)
class _Call:
    """What a recording is tied to: a hashable ``key`` (tensors by shape/dtype/device/strides, other values
    by type and value), the arguments' tensors (held, so their memory cannot be reused) and their versions."""

    key: Any
    tensors: tuple[Tensor, ...]
    versions: tuple[int, ...]

    def same(self, other: _Call | None) -> bool:
        return (
            other is not None
            and self.key == other.key
            and all(a is b for a, b in zip(self.tensors, other.tensors))
            and self.versions == other.versions
        )


def _signature(u: Tensor, args: tuple, kwargs: dict, token: Any = None) -> _Call | None:
    """The :class:`_Call` of ``(u, args, kwargs)``; ``None`` when an argument cannot be compared safely
    (other types, sparse or inference-mode tensors). ``token``: a hashable summary of state the model reads
    besides its arguments (see ``guard`` of :class:`GraphedLogDensity`), part of the key."""
    tensors: list[Tensor] = []

    def walk(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            if obj.layout != torch.strided:
                raise TypeError(f"{obj.layout} tensor")
            tensors.append(obj)
            return ("tensor", tuple(obj.shape), tuple(obj.stride()), obj.dtype, obj.device)
        if isinstance(obj, (tuple, list)):
            return (type(obj).__name__,) + tuple(walk(o) for o in obj)
        if isinstance(obj, dict):
            return ("dict",) + tuple((k, walk(v)) for k, v in obj.items())
        if isinstance(obj, _PLAIN_TYPES):
            return (type(obj), repr(obj))  # 1, 1.0 and True (or 0.0 and -0.0) are different arguments
        raise TypeError(type(obj).__name__)

    try:
        key = (walk(u), walk(tuple(args)), walk(dict(kwargs)), token)
        hash(key)
        held = tuple(tensors[1:])  # u (the first) is copied into the recording's input, not held
        return _Call(key, held, tuple(t._version for t in held))
    except (TypeError, RuntimeError):  # RuntimeError: e.g. inference tensors have no version counter
        return None


# Operations whose output's shape depends on the values of their input: a trace freezes that shape.
_VALUE_SHAPED_OPS = {
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
    "aten::bincount",
    "aten::repeat_interleave",
    "aten::_local_scalar_dense",
    "aten::item",
}
# Operations that wait for the GPU (a value is needed on the host): a CUDA graph cannot capture them. A
# capture that fails half-way can leave the device's random-number generator in capture mode, so such
# graphs are screened out beforehand (see _screen).
_SYNCING_OPS = _VALUE_SHAPED_OPS | {
    "aten::is_nonzero",
    "aten::equal",
    "aten::allclose",
    "aten::histc",
    "aten::_assert_async",
    "aten::masked_scatter",
    "aten::index_put",
    "aten::index_put_",
    "aten::_linalg_check_errors",
}


def _screen(traced: torch.fx.GraphModule, u: Tensor, *data: Tensor) -> tuple[str | None, str | None]:
    """Run the traced graph once at ``u`` and look at every operation: ``(frozen, hazard)``.

    ``frozen`` says why the graph must not be replayed at all (an output shape that depends on the
    data's values, e.g. boolean-mask selection), ``hazard`` why it cannot be captured as a CUDA
    graph on ``u.device`` (an operation that synchronises with the host, or a copy from host memory,
    e.g. a constant made on the CPU and moved to the GPU); ``None`` when there is none. On a GPU the
    run uses CUDA's synchronisation check set to raise, which also catches operations that wait for
    the device inside their own implementation (e.g. linear-algebra routines checking their result).
    """
    device = u.device
    on_gpu = device.type == "cuda"
    found: dict[str, str] = {}

    class Screen(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op != "call_function":
                return super().run_node(n)
            name = getattr(getattr(n.target, "_schema", None), "name", str(n.target))
            leaves = torch.utils._pytree.tree_leaves(
                (self.map_nodes_to_values(n.args, n), self.map_nodes_to_values(n.kwargs, n))
            )
            args = [a for a in leaves if isinstance(a, Tensor)]
            masked = name.startswith("aten::index") and any(a.dtype == torch.bool for a in args[1:])
            if name in _VALUE_SHAPED_OPS or (masked and name == "aten::index"):
                found.setdefault("frozen", f"{name}{' with a boolean mask' if masked else ''}")
            if on_gpu and (name in _SYNCING_OPS or masked):
                found.setdefault("hazard", f"{name}{' with a boolean mask' if masked else ''} waits for the device")
            out = super().run_node(n)
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, Tensor)]
            moved = [
                a for a in args if a.device != device and (a.dim() > 0 or "copy" in name or name.startswith("aten::to"))
            ]
            if on_gpu and moved and any(o.device == device for o in outs):
                found.setdefault("hazard", f"{name} copies a tensor from {moved[0].device} to {device}")
            return out

    previous = torch.cuda.get_sync_debug_mode() if on_gpu else 0
    try:
        with warnings.catch_warnings():  # setting the mode warns that it is a prototype feature
            warnings.simplefilter("ignore")
            if on_gpu:
                torch.cuda.set_sync_debug_mode("error")
            with torch.no_grad():
                Screen(traced).run(u, *data)
    except RuntimeError as e:
        found.setdefault(
            "hazard", f"an operation waits for the device ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        )
    finally:
        if on_gpu:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.cuda.set_sync_debug_mode(previous)
    return found.get("frozen"), found.get("hazard")


class _Recording:
    """One traced graph (and, on a GPU, its CUDA graph) for one call signature."""

    def __init__(self, fn: Callable[[Tensor], tuple[Tensor, Tensor]], u: Tensor, call: _Call):
        from torch.fx.experimental.proxy_tensor import make_fx

        self.call = call
        with pyro.validation_enabled(False):
            self.traced = make_fx(fn)(u.detach())
        self.graph = None
        self.frozen, self.hazard = _screen(self.traced, u.detach())
        if u.device.type == "cuda" and self.frozen is None and self.hazard is None:
            self.static_u = u.detach().clone()
            stream = torch.cuda.current_stream(u.device)
            side = torch.cuda.Stream(device=u.device)
            side.wait_stream(stream)
            with torch.no_grad():
                with torch.cuda.stream(side):  # warm-up off the capturing stream (library handles, workspaces)
                    self.traced(self.static_u)
                stream.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.outputs = self.traced(self.static_u)
            self.graph = graph

    def __call__(self, u: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():  # values only: parameters the model reads must not collect gradients
            if self.graph is None:
                return tuple(o.detach() for o in self.traced(u.detach()))
            self.static_u.copy_(u.detach())
            self.graph.replay()
            return tuple(o.clone() for o in self.outputs)


def _with_tensors(obj: Any, tensors: Any) -> Any:
    """``obj`` (arguments as walked by :func:`_signature`) with its tensors replaced, in order, by those of the
    iterator ``tensors``."""
    if isinstance(obj, Tensor):
        return next(tensors)
    if isinstance(obj, (tuple, list)) and not isinstance(obj, torch.Size):
        items = [_with_tensors(o, tensors) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # named tuples take fields
    if isinstance(obj, dict):
        return type(obj)((k, _with_tensors(v, tensors)) for k, v in obj.items())
    return obj


_ALIASES = ("aten::detach", "aten::lift_fresh_copy", "aten::alias")
# operations whose value depends only on their input's shape, dtype and device (the shapes are fixed in a recording)
_SHAPE_ONLY = (
    "aten::ones_like",
    "aten::zeros_like",
    "aten::full_like",
    "aten::new_zeros",
    "aten::new_ones",
    "aten::new_full",
)
# operations that keep the row-major order of their input's elements (when they keep their number too)
_REORDERLESS = (
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::slice",
    "aten::sum",
)
# x op c == x exactly when every element of the constant c is (0 or 1); the key is (schema, which operand is c)
_NEUTRAL = {
    ("aten::add", 1): 0,
    ("aten::add", 0): 0,
    ("aten::sub", 1): 0,
    ("aten::mul", 1): 1,
    ("aten::mul", 0): 1,
    ("aten::div", 1): 1,
    ("aten::pow", 1): 1,
}


def _name(node: torch.fx.Node) -> str:
    """The schema name of a traced operation (``aten::add`` for ``aten.add.Tensor``)."""
    schema = getattr(node.target, "_schema", None)
    return schema.name if schema is not None else str(node.target)


def _meta(node: Any) -> Tensor | None:
    """The tensor a traced node stands for (its fake value), if known."""
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, Tensor) else None


def _keeps_order(n: torch.fx.Node) -> bool:
    """``n`` rearranges nothing: same elements in the same row-major order as its input (only the shape may differ)."""
    name, src, out = _name(n), _meta(n.args[0]) if n.args else None, _meta(n)
    if name not in _REORDERLESS or src is None or out is None or src.dtype != out.dtype or src.numel() != out.numel():
        return False
    if name == "aten::sum":  # a sum over dimensions of size 1 only, with no dtype change
        dims = n.args[1] if len(n.args) > 1 else None
        return dims is not None and len(n.args) <= 3 and not n.kwargs and all(src.shape[d] == 1 for d in dims)
    return True


def _same_value(n: torch.fx.Node, const: dict) -> Any:
    """An earlier node or input holding exactly ``n``'s value (same shape and dtype), or ``None``; ``const``:
    the values of the graph's constant nodes."""
    name, out = _name(n), _meta(n)
    # alpha scales the operand; rounding_mode makes x / 1 round (floor(x) is not x)
    if out is None or n.kwargs.get("alpha", 1) != 1 or n.kwargs.get("rounding_mode") is not None:
        return None
    if name == "aten::neg":
        inner = n.args[0]
        if isinstance(inner, torch.fx.Node) and inner.op == "call_function" and _name(inner) == "aten::neg":
            return inner.args[0]
    if _keeps_order(n):  # a chain of reshapes that comes back to an earlier shape
        src = n.args[0]
        while True:
            m = _meta(src)
            if m is not None and m.shape == out.shape:
                return src
            if not (isinstance(src, torch.fx.Node) and src.op == "call_function" and _keeps_order(src)):
                return None
            src = src.args[0]
    for i, operand in enumerate(n.args[:2]):
        neutral = _NEUTRAL.get((name, i))
        other = n.args[1 - i] if len(n.args) >= 2 else None
        if neutral is None or not isinstance(other, torch.fx.Node) or _meta(other) is None:
            continue
        if _meta(other).shape != out.shape or _meta(other).dtype != out.dtype:
            continue
        value = const.get(operand, operand)
        if isinstance(value, bool) or not isinstance(value, (numbers.Number, Tensor)):
            continue
        if bool((value == neutral).all()) if isinstance(value, Tensor) else value == neutral:
            return other
    return None


def _simplify(gm: torch.fx.GraphModule) -> None:
    """Simplify a traced graph in place, for graphs without in-place operations:

    - operations that read no input (constants the model builds on every call, e.g. ``Normal(0., 5.)``'s
      tensors) or only their input's shape (``ones_like``, ``new_zeros``) are computed once and stored;
    - aliases (``detach``, ``lift_fresh_copy``) are bypassed;
    - operations whose result equals an earlier value exactly are bypassed: ``x + 0``, ``x * 1``, ``x / 1``,
      ``x ** 1``, ``-(-x)``, and reshapes (``view``, ``unsqueeze``, a sum over a dimension of size 1, ...)
      that come back to an earlier shape; the backward pass of a traced log density has many of these.

    Random operations are never folded."""
    graph = gm.graph
    schemas = {n: getattr(n.target, "_schema", None) for n in graph.nodes if n.op == "call_function"}
    if any(sc is None or sc.is_mutable for sc in schemas.values()):
        return  # in-place writes (or ops we cannot inspect): a folded constant could be overwritten
    const: dict = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            const[n] = getattr(gm, n.target)
        elif n.op != "call_function" or torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()):
            continue
        elif all(a in const for a in n.all_input_nodes):
            const[n] = n.target(*torch.fx.node.map_arg(n.args, const.get), **torch.fx.node.map_arg(n.kwargs, const.get))
        elif schemas[n].name in _SHAPE_ONLY and _meta(n.args[0]) is not None and n.all_input_nodes == [n.args[0]]:
            like = _meta(n.args[0])
            stand_in = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
            const[n] = n.target(stand_in, *n.args[1:], **n.kwargs)
    count = 0
    for n in list(graph.nodes):
        if n.op == "call_function" and n in const and isinstance(const[n], Tensor) and n.users:
            name = f"_folded_{count}"
            count += 1
            gm.register_buffer(name, const[n])
            with graph.inserting_before(n):
                folded = graph.get_attr(name)
            folded.meta["val"] = const[n]
            const[folded] = const[n]
            n.replace_all_uses_with(folded)
        elif n.op == "call_function" and schemas[n].name in _ALIASES:
            n.replace_all_uses_with(n.args[0])
    graph.eliminate_dead_code()
    for n in list(graph.nodes):
        if n.op == "call_function" and n.users:
            same = _same_value(n, const)
            if same is not None:
                n.replace_all_uses_with(same)
    graph.eliminate_dead_code()
    gm.recompile()


class _SharedRecording:
    """One traced graph ``(u, *data tensors) -> (log density, score)``, for any data of the recorded shapes.

    Traced on fake tensors (no values), so Python that reads the data's values fails the trace
    instead of freezing one dataset's branch into the graph; then simplified (:func:`_simplify`).
    """

    def __init__(self, fn: Callable[..., tuple[Tensor, Tensor]], u: Tensor, data: tuple[Tensor, ...]):
        from torch.fx.experimental.proxy_tensor import make_fx

        # real tensors other than the inputs (a prior's tensor bounds, held by the guide's bijections since setup)
        # are constants of the graph, as they are of every evaluation
        with pyro.validation_enabled(False):
            self.traced = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(u.detach(), *data)
        _simplify(self.traced)
        self.frozen, _ = _screen(self.traced, u.detach(), *data)
        # outputs that share memory with an input or a stored constant (a bypassed x * 1, a folded constant) are
        # copied on every call: the caller owns what it gets back, and may write to it
        with torch.no_grad():
            outputs = self.traced(u.detach(), *data)
        held = {t.untyped_storage().data_ptr() for t in (u, *data, *self.traced.buffers())}
        self.copied = tuple(o.untyped_storage().data_ptr() in held for o in outputs)
        self.replays = 0  # counted by GraphedLogDensity, which decides when a recording has paid for itself

    def __call__(self, u: Tensor, data: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            outputs = self.traced(u.detach(), *data)
            return tuple(o.clone() if copy else o.detach() for o, copy in zip(outputs, self.copied))


def _close(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> bool:
    """Agreement up to rounding (summation order differs between the traced and the eager run).

    Each element may differ by ``1e-3`` of itself plus an absolute allowance. For a log density the allowance is
    ``1e-3`` of its largest finite value over the particles; for a score it is, per coordinate, the smaller of that
    (over all coordinates) and ``1e-2`` of the coordinate's own largest value plus ``1e-5`` of the overall one: a
    coordinate on a small scale is checked on its own scale, not hidden by a large one, while rounding in sums
    that cancel keeps some room. Infinite values only need to be equal."""
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False
        size = torch.where(torch.isfinite(w), w.abs(), torch.zeros_like(w))
        overall = size.amax() if w.numel() else size.new_zeros(())
        allowance = 1e-3 * overall
        if w.dim() > 1 and w.numel():
            own = size.amax(dim=tuple(range(w.dim() - 1)), keepdim=True)
            allowance = torch.minimum(allowance, 1e-2 * own + 1e-5 * overall)
        ok = ((g - w).abs() <= 1e-3 * w.abs() + allowance + 1e-6) | (g == w) | (g.isnan() & w.isnan())
        if not bool(ok.all()):
            return False
    return True


class GraphedLogDensity:
    """Calls of ``eager()`` (returning ``(log density, score)`` at ``u``) replaced by a recorded graph
    once the same arguments keep coming back (see the module docstring).

    :param callable single: ``single(row, args, kwargs)``: the log density at one unconstrained
        vector ``row`` (a scalar tensor); it is traced under ``vmap(grad_and_value(...))``.
    :param int min_calls: record at the ``min_calls``-th consecutive call with the same arguments.
    :param int max_recordings: recordings allowed before graphs are switched off.
    :param int verify_every: compare every ``verify_every``-th replay with ``eager()``.
    :param callable why_not: ``why_not(u, args, kwargs)``: a reason not to record (e.g. the model was
        not found vectorizable, or has parameter sites), or ``None``; asked once, before recording.
    :param callable guard: ``() -> token``, a hashable summary of state the model reads besides its
        arguments (e.g. the identities of the global tensors the model names): part of what a recording is
        tied to, so that a reassigned global is seen at the next call instead of at the next check.
    :param bool share_across_data: tie recordings to the arguments' shapes rather than to the tensors
        themselves (the data become inputs of the graph; see the module docstring). Then ``min_calls``
        counts the calls with the same shapes (in any order), and ``max_recordings`` is the number
        of shapes kept (least recently used dropped first).

    ``status`` says what happens: ``"waiting"``, ``"replaying"`` (on a GPU, possibly without a CUDA
    graph, when the traced graph waits for the device or copies host memory; the status says which
    operation) or ``"off: <reason>"``.
    """

    def __init__(
        self,
        single: Callable[[Tensor, tuple, dict], Tensor],
        min_calls: int = 20,
        max_recordings: int = 4,
        verify_every: int = 50,
        why_not: Callable[[Tensor, tuple, dict], str | None] = lambda u, args, kwargs: None,
        share_across_data: bool = False,
        guard: Callable[[], Any] | None = None,
    ):
        self.single = single
        self.guard = guard
        self.share_across_data = share_across_data
        self._shared: OrderedDict[Any, _SharedRecording] = OrderedDict()  # by shape key, least recently used first
        self._counts: dict[Any, int] = {}  # calls per shape key not yet recorded
        self.num_wasted = 0  # shared recordings dropped before min_calls replays
        self.why_not = why_not
        self.min_calls = min_calls
        self.max_recordings = max_recordings
        self.verify_every = verify_every
        self.status = "waiting"
        self.num_recordings = 0
        self._recording: _Recording | None = None
        self._replays = 0
        self._pending: _Call | None = None
        self._pending_calls = 0

    def _off(self, reason: str) -> None:
        self.status = f"off: {reason}"
        self._recording = self._pending = None
        self._shared.clear()
        self._counts.clear()

    def _replay(
        self, rec: Callable[[Tensor], tuple[Tensor, Tensor]], u: Tensor, eager: Callable[[], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        try:
            got = rec(u)
        except Exception as e:  # noqa: BLE001 - the model's own evaluation raises the model's error (or works)
            self._off(f"a replay raised {type(e).__name__}")
            return eager()
        self._replays += 1
        if self._replays % self.verify_every:
            return got
        want = eager()
        if not _close(got, want):
            self._off("a replay stopped matching the model's own evaluation")
            warnings.warn(
                "the recorded log density no longer matches the model's own evaluation: the model reads state "
                "other than its latent values and arguments (a global reassigned between steps, parameters "
                "replaced, a module switched between train() and eval()?). Recording is switched off; the steps "
                f"since the last check (at most {self.verify_every - 1}) used the recording. Pass "
                "record_graph=False to AmortizedSVGD (training) or AmortizedSteinGuide (drawing for new datasets) "
                "for this model.",
                RecordedGraphWarning,
                stacklevel=5,
            )
        return want

    def __call__(
        self, u: Tensor, args: tuple, kwargs: dict, eager: Callable[[], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        if self.status.startswith("off") or u.dim() != 2:
            return eager()
        call = _signature(u, args, kwargs, None if self.guard is None else self.guard())
        if call is None:
            self._off("an argument is neither a dense tensor nor a plain value (number, string, None, dtype, device)")
            return eager()
        if self.share_across_data:
            return self._call_shared(call, u, args, kwargs, eager)
        rec = self._recording
        if rec is not None and call.same(rec.call):
            return self._replay(rec, u, eager)
        # arguments not seen last time: count consecutive calls with these before recording
        same = call.same(self._pending)
        self._pending_calls = self._pending_calls + 1 if same else 1
        want = eager()  # errors (and non-finite values, checked by the caller) surface from the ordinary run
        if not same:
            self._pending = call
        if self._pending_calls < self.min_calls:
            return want
        reason = self.why_not(u, args, kwargs)
        if reason is not None:
            self._off(reason)
            return want
        if self.num_recordings >= self.max_recordings:
            self._off(f"the arguments changed after {self.num_recordings} recordings (a new data tensor every call?)")
            return want
        self.num_recordings += 1
        self._pending, self._pending_calls = None, 0
        single = self.single

        def fn(v: Tensor) -> tuple[Tensor, Tensor]:  # the data are constants of the graph (tied to these tensors)
            score, lp = torch.func.vmap(
                torch.func.grad_and_value(lambda r: single(r, args, kwargs)), randomness="same"
            )(v)
            return lp, score

        rec = self._checked(lambda: _Recording(fn, u, call), lambda r: r(u), want)
        if rec is None:
            return want
        self._recording, self._replays = rec, 0
        self.status = (
            "replaying" if rec.hazard is None else f"replaying the traced graph, without a CUDA graph: {rec.hazard}"
        )
        return want

    def _checked(
        self,
        build: Callable[[], Any],
        first: Callable[[Any], tuple[Tensor, Tensor]],
        want: tuple[Tensor, Tensor],
        hint: str = "",
    ) -> Any:
        """A recording from ``build()`` whose first replay ``first(recording)`` agrees with the model's ``want``;
        ``None``, with recording switched off and the reason in ``status``, if it cannot be built or used."""
        try:
            rec = build()
            if rec.frozen is not None:
                self._off(
                    f"the model's shapes depend on the data's values ({rec.frozen}); a recording would freeze them"
                )
                return None
            got = first(rec)
        except Exception as e:  # noqa: BLE001 - any failure only means: no graph for this model
            text = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
            reads_values = "DataDependent" in type(e).__name__ or "data-dependent" in str(e).lower()
            self._off(f"recording failed ({type(e).__name__}: {text}){hint if reads_values else ''}")
            return None
        if not _close(got, tuple(w.detach() for w in want)):
            self._off("the recorded graph disagreed with the model's own evaluation")
            return None
        return rec

    def _call_shared(
        self, call: _Call, u: Tensor, args: tuple, kwargs: dict, eager: Callable[[], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        data = call.tensors
        rec = self._shared.get(call.key)
        if rec is not None:
            self._shared.move_to_end(call.key)
            rec.replays += 1
            return self._replay(lambda v: rec(v, data), u, eager)
        if len(self._counts) > 64 * max(self.max_recordings, 1):  # shapes that never come back: forget the counts
            self._counts.clear()
        calls = self._counts[call.key] = self._counts.get(call.key, 0) + 1
        want = eager()  # errors (and non-finite values, checked by the caller) surface from the ordinary run
        if calls < self.min_calls:
            return want
        reason = self.why_not(u, args, kwargs)
        if reason is not None:
            self._off(reason)
            return want
        del self._counts[call.key]
        single = self.single

        def fn(v: Tensor, *tensors: Tensor) -> tuple[Tensor, Tensor]:  # the data are inputs of the graph
            a, k = _with_tensors((tuple(args), dict(kwargs)), iter(tensors))
            score, lp = torch.func.vmap(torch.func.grad_and_value(lambda r: single(r, a, k)), randomness="same")(v)
            return lp, score

        rec = self._checked(
            lambda: _SharedRecording(fn, u, data),
            lambda r: r(u, data),
            want,
            ": the model's Python reads its data's values (if, .item()), so it cannot be recorded for "
            "all data of a shape",
        )
        if rec is None:
            return want
        self.num_recordings += 1
        self._shared[call.key] = rec
        self.status = "replaying"
        while len(self._shared) > self.max_recordings:
            _, dropped = self._shared.popitem(last=False)
            self.num_wasted += dropped.replays < self.min_calls
        if self.num_wasted >= max(self.max_recordings, 1):
            self._off(
                f"the arguments' shapes rarely repeat: {self.num_wasted} recordings were dropped before "
                f"{self.min_calls} replays each, so recording costs more than it saves"
            )
        return want
