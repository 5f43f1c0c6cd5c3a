"""From a Pyro model to a batched log density (and score) on one unconstrained vector per particle.

The model is written for *one* draw of its latent variables, in ordinary Pyro style (it may use
``X @ beta``). :class:`ModelLogDensity` evaluates its log joint at many unconstrained points at
once with :func:`torch.func.vmap` (distribution validation off for that call), and falls back to
a loop over particles when the model cannot be vectorized (Python control flow on values,
``.item()``, in-place ops vmap rejects). Each particle is one row ``u`` of length ``D``: all latent
sites packed side by side, each mapped to its support by ``biject_to(site.support)``, and the log
density includes each bijection's ``log|det J|`` so that it is the density of ``u`` itself.
"""

from __future__ import annotations

import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.poutine.subsample_messenger import SubsampleMessenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Transform
from torch.utils._pytree import tree_flatten, tree_unflatten

from .graphs import GraphedLogDensity

__all__ = [
    "LatentSite",
    "ModelEvaluationError",
    "ModelLogDensity",
    "NonFiniteLogJointError",
    "VectorizationWarning",
    "all_finite",
    "latent_sites_from_trace",
    "pack",
    "top_level",
    "unpack",
]


class NonFiniteLogJointError(ValueError):
    """The model's log joint (or its gradient) is not finite at some particle."""


class ModelEvaluationError(ValueError):
    """The model raised an error while its log density was evaluated at the guide's latent values."""


_DTYPE_ERROR = re.compile(
    r"dtype|scalar type|expected .*(Float|Double|Half|BFloat16)|(Float|Double|Half) but found", re.IGNORECASE
)
_SHAPE_ERROR = re.compile(r"shape|size of tensor|must match the size|mat1 and mat2|broadcast|dimension", re.IGNORECASE)


def _evaluation_hint(error: Exception, u: Tensor) -> str:
    """What to check for an error the model raised when evaluated at the guide's values, by its kind: a dtype
    mismatch, a shape mismatch (data of another form than at setup), or the model's own error."""
    text = str(error)
    if isinstance(error, (RuntimeError, TypeError)) and _DTYPE_ERROR.search(text):
        return (
            f"It is a dtype mismatch: the guide's latent values are {u.dtype} (the dtype of the data the guide "
            "was set up with), and the model computes with tensors of another dtype (its constants, or data in "
            f"another precision). Make the model's tensors and all the data one dtype, e.g. .to({u.dtype})."
        )
    if isinstance(error, (RuntimeError, ValueError, IndexError)) and _SHAPE_ERROR.search(text):
        return (
            "It is a shape mismatch: if these arguments have another form than those the guide was set up with "
            "(e.g. another number of features or groups), the latent sites' shapes change and the data needs "
            "a new guide; otherwise check the model's shapes with these arguments."
        )
    return (
        "The error comes from the model itself (the chained traceback shows where): check the model with these "
        "arguments, e.g. by running it once under pyro.poutine.trace."
    )


class VectorizationWarning(UserWarning):
    """The model could not be evaluated for all particles at once; a slower loop is used."""


@dataclass
class LatentSite:
    """One latent sample site and its slice of the packed unconstrained vector.

    :ivar str name: site name.
    :ivar torch.Size shape: constrained value shape (plates included).
    :ivar torch.Size unconstrained_shape: shape of the unconstrained value.
    :ivar Transform transform: ``biject_to(support)``: unconstrained -> constrained.
    :ivar int offset: start of the site's slice in the packed vector.
    :ivar int event_dim: the site distribution's event dim.
    :ivar support: the site's support in the trace the packing was made from.
    """

    name: str
    shape: torch.Size
    unconstrained_shape: torch.Size
    transform: Transform
    offset: int
    event_dim: int
    cond_indep_stack: tuple = field(default=(), repr=False)
    support: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(torch.Size(self.unconstrained_shape).numel())


def latent_sites_from_trace(trace) -> list[LatentSite]:
    """The packing of a trace's unobserved sample sites into one unconstrained vector (trace order).

    Plate subsample sites are not latent and are skipped.
    """
    from .transforms import support_bijection

    sites, offset = [], 0
    for name, site in trace.iter_stochastic_nodes():
        if site_is_subsample(site):
            continue
        transform = support_bijection(site["fn"].support)
        ushape = transform.inv(site["value"].detach()).shape
        s = LatentSite(
            name,
            site["value"].shape,
            ushape,
            transform,
            offset,
            site["fn"].event_dim,
            site["cond_indep_stack"],
            site["fn"].support,
        )
        sites.append(s)
        offset += s.size
    return sites


def pack(values: dict[str, Tensor], sites: Sequence[LatentSite], batch_dims: int = 1) -> Tensor:
    """Inverse of :func:`unpack`: constrained values ``{name: (*batch, *shape)}`` -> ``(*batch, D)``."""
    parts = []
    for s in sites:
        v = values[s.name]
        batch = v.shape[:batch_dims]
        parts.append(s.transform.inv(v).reshape(batch + (-1,)))
    return torch.cat(parts, -1)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every element of ``tensors`` is finite, for the price of one sum each and one host-device sync.

    A sum is NaN or infinite whenever a term is; it can also overflow with every term finite, and
    then the answer is ``False`` too. So callers take ``False`` only as the cue to run their
    element-wise check (about six times dearer on a ``(1000, 32)`` score).
    """
    return bool(torch.isfinite(sum(t.sum() for t in tensors)))


def unpack(u: Tensor, sites: Sequence[LatentSite]) -> dict[str, tuple[Tensor, Tensor]]:
    """Split packed unconstrained vectors ``u`` of shape ``(..., D)`` into per-site values.

    :returns: ``{name: (unconstrained, constrained)}`` with shapes ``batch + site shape``.
    """
    batch = u.shape[:-1]
    out = {}
    for s in sites:
        uu = u[..., s.offset : s.offset + s.size].reshape(batch + s.unconstrained_shape)
        out[s.name] = (uu, s.transform(uu))
    return out


class _BernoulliLogitsLogProb(torch.autograd.Function):
    """``value * logits - softplus(logits)`` with the hand-derived backward ``g * (value - sigmoid(logits))``.

    Autograd's backward of the composite calls ``softplus_backward`` on the gradient of a sum, a
    stride-0 broadcast; on a GPU that kernel falls off the vectorised path and took 55 % of a
    logistic-regression step at 128 particles x 10^6 rows. ``generate_vmap_rule`` lets
    ``torch.func.vmap`` batch it like the composite.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, value: Tensor) -> Tensor:
        return value * logits - torch.nn.functional.softplus(logits)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, value = ctx.saved_tensors
        g_logits = (value - torch.sigmoid(logits)) * grad if ctx.needs_input_grad[0] else None
        g_value = logits * grad if ctx.needs_input_grad[1] else None
        return g_logits, g_value


# Per-particle logit count from which the custom Function beats the composite expression: its
# fixed Python cost (~1 ms per call under vmap) is repaid by the cheaper backward only on large
# arrays. Measured at 128 particles: CPU (1 thread) break-even between 10^3 and 10^4 rows; H100
# between 10^5 (composite 2.3 ms vs 3.6 ms) and 10^6 rows (9.9 ms vs 5.8 ms).
_FUSED_BERNOULLI_MIN_NUMEL = {"cpu": 4096}
_FUSED_BERNOULLI_MIN_NUMEL_DEFAULT = 262_144


def _bernoulli_log_prob(fn: Any, value: Tensor) -> Tensor:
    # Same value as torch's ``-binary_cross_entropy_with_logits`` (which Bernoulli.log_prob calls),
    # written with ops whose vmap batching rules are cheap: under torch.func.vmap the fused loss
    # and its backward are ~2.5x slower than this for a (particles x rows) logit matrix.
    logits, value = torch.distributions.utils.broadcast_all(fn.logits, value)
    big = _FUSED_BERNOULLI_MIN_NUMEL.get(logits.device.type, _FUSED_BERNOULLI_MIN_NUMEL_DEFAULT)
    if logits.numel() >= big:
        return _BernoulliLogitsLogProb.apply(logits, value)
    return _BernoulliLogitsLogProb.forward(logits, value)  # the same expression, differentiated by autograd


_FAST_LOG_PROB: dict[type, Callable[[Any, Tensor], Tensor]] = {
    torch.distributions.Bernoulli: _bernoulli_log_prob,
    pyro.distributions.Bernoulli: _bernoulli_log_prob,
}


def site_log_prob(fn: Any, value: Tensor) -> Tensor:
    """``fn.log_prob(value)``, through a vmap-friendly formula for the distributions that have one.

    Exact types only (subclasses may override ``log_prob``); ``Independent`` wrappers are unwrapped.
    """
    t = type(fn)
    if t in (torch.distributions.Independent, pyro.distributions.Independent):
        lp = site_log_prob(fn.base_dist, value)
        return sum_rightmost(lp, fn.reinterpreted_batch_ndims)
    fast = _FAST_LOG_PROB.get(t)
    return fast(fn, value) if fast is not None else fn.log_prob(value)


def trace_log_prob_sum(trace: Any) -> Tensor:
    """``trace.log_prob_sum()`` (scales and masks applied), using :func:`site_log_prob` per site."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        if site.get("args") or site.get("kwargs"):
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        else:
            lp = site_log_prob(site["fn"], site["value"])
        total = total + scale_and_mask(lp, site["scale"], site["mask"]).sum()
    return total


@contextmanager
def top_level() -> Iterator[None]:
    """Run Pyro code as if called outside every enclosing handler, e.g. to evaluate the model from inside a
    guide that :class:`~pyro.infer.Predictive` runs under its vectorizing plate.

    :func:`~pyro.poutine.block` is not enough there: an enclosing plate keeps its dim allocated, so
    the model's own plates would get other dims than when it is run on its own.
    """
    from pyro.poutine import runtime

    stack, dims = runtime._PYRO_STACK[:], runtime._DIM_ALLOCATOR._stack
    if not stack and not dims:
        yield
        return
    runtime._PYRO_STACK.clear()
    runtime._DIM_ALLOCATOR._stack = []
    try:
        yield
    finally:
        runtime._PYRO_STACK[:] = stack
        runtime._DIM_ALLOCATOR._stack = dims


# --- full-data evaluation of subsampled plates -------------------------------------------------
# ``poutine.condition(model, {plate: torch.arange(size)})`` is not enough: a plate created with
# ``subsample_size=k`` rejects an index tensor of another length ("subsample_size does not match
# len(subsample)"). So, while ``full_data()`` is active in the current thread, the plate's
# ``_subsample`` helper is called without ``subsample_size``/``subsample``: the plate then draws
# ``torch.arange(size)`` (on the plate's own device, or that of a given ``subsample``) and scales
# by ``size / size = 1``. Other threads are not affected.
_FULL_DATA = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL_SUBSAMPLE = SubsampleMessenger.__dict__.get("_subsample")  # a staticmethod in pyro-ppl 1.9


def _full_subsample(name, size=None, subsample_size=None, subsample=None, use_cuda=None, device=None):
    if getattr(_FULL_DATA, "depth", 0) and size is not None:
        if device is None and torch.is_tensor(subsample):
            device = subsample.device
        subsample_size = subsample = None
    return _ORIGINAL_SUBSAMPLE.__func__(name, size, subsample_size, subsample, use_cuda, device)


@contextmanager
def full_data():
    """Within this context every subsampled :func:`pyro.plate` uses all of its indices."""
    global _PATCH_USERS
    if not isinstance(_ORIGINAL_SUBSAMPLE, staticmethod):
        raise ValueError(
            "evaluating a model that subsamples a plate on all of its data (ArviZ export, the default "
            "dataset features) needs pyro.plate's SubsampleMessenger._subsample helper (pyro-ppl 1.9), "
            "which this Pyro version lacks; drop the plate's subsample_size"
        )
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            SubsampleMessenger._subsample = staticmethod(_full_subsample)
        _PATCH_USERS += 1
    _FULL_DATA.depth = getattr(_FULL_DATA, "depth", 0) + 1
    try:
        yield
    finally:
        _FULL_DATA.depth -= 1
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                SubsampleMessenger._subsample = _ORIGINAL_SUBSAMPLE


def site_mask(site: dict) -> Tensor | None:
    """Which entries of a sample site the model's log density keeps, as a bool tensor over the dimensions the masks
    cover (the site's batch shape, plus the event dimensions that ``.to_event(...)`` made of a masked distribution's
    batch dimensions), or ``None`` when nothing is masked.

    It combines ``poutine.mask`` (``site["mask"]``), a ``fn.mask(...)`` (e.g. ``obs_mask``'s) and a mask written inside
    ``.to_event(...)`` (an ``Independent`` wrapping a ``MaskedDistribution``)."""
    fn = site["fn"]
    masks = [] if site["mask"] is None or site["mask"] is True else [(site["mask"], fn.batch_shape)]
    while True:  # the masks of the wrapped distributions, each over its own (longer) batch shape
        if isinstance(fn, pyro.distributions.MaskedDistribution):
            if fn._mask is not True:
                masks.append((fn._mask, fn.batch_shape))
            fn = fn.base_dist
        elif isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        else:
            break
    if not masks:
        return None
    shape = max((s for _, s in masks), key=len)
    device = site["value"].device if isinstance(site.get("value"), Tensor) else None
    keep = None
    for mask, over in masks:
        m = torch.as_tensor(mask, device=device).expand(over)
        m = m.reshape(over + (1,) * (len(shape) - len(over))).expand(shape)
        keep = m if keep is None else keep & m
    return keep


def finite_sets(lp: Tensor, score: Tensor) -> Tensor:
    """Which particle sets ``(B,)`` have a finite log density ``(B, P)`` and score ``(B, P, D)`` at every particle."""
    return torch.isfinite(score).all(-1).all(-1) & torch.isfinite(lp).all(-1)


def _is_identity(transform: Transform) -> bool:
    """Whether ``transform`` is the identity (``biject_to`` of an unconstrained support), maybe made independent."""
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not transform.parts


def _is_deterministic(site: dict) -> bool:
    return site["type"] == "sample" and bool(site["infer"].get("_deterministic", False))


def masked_out_anchor(sites: Sequence[LatentSite], read_masked: dict | None, u: Tensor, trace) -> Tensor | None:
    """``-|u_k|^2 / 2`` summed over the unconstrained entries of latent sites that a mask removes from the
    model (``poutine.mask``, ``fn.mask``, e.g. the ``{name}_unobserved`` entries at observed positions
    that ``obs_mask`` creates).

    Those entries have no density at all, so without a term of their own they would drift without
    bound and swamp the kernel's bandwidth. A standard normal on them (in unconstrained space) makes
    the joint proper and leaves the posterior of everything else unchanged: the model never reads
    them. Their draws are that standard normal, mapped to the support. Masked-out entries that the
    model does read (a prior masked to make it flat, its value used by the likelihood) get nothing:
    their density is what the rest of the model says (``read_masked``: ``{site: bool mask of its entries}``, as
    :meth:`ModelLogDensity._probe_masked_reads` finds them). ``None`` when no latent is masked.
    """
    total = None
    for s in sites:
        node = trace.nodes.get(s.name)
        if node is None:
            continue
        mask = site_mask(node)
        if mask is None:
            continue
        uu = u[s.offset : s.offset + s.size].reshape(s.unconstrained_shape)
        off = (~mask.to(u.device)).reshape(mask.shape + (1,) * (uu.dim() - mask.dim())).to(u.dtype)
        read = (read_masked or {}).get(s.name)
        if read is not None:
            off = off * (~read).to(u.dtype)
        term = -0.5 * (off * uu.square()).sum()
        total = term if total is None else total + term
    return total


# ---- many particles ------------------------------------------------------------------


class ModelLogDensity:
    """Batched unnormalized log density of a Pyro model in unconstrained space.

    :param callable model: a Pyro model.
    :param sites: the latent sites and their packing (see :class:`LatentSite`).
    :param str vectorize: ``"auto"`` (try :func:`torch.func.vmap`, check it once against a loop,
        fall back to the loop with a :class:`VectorizationWarning`), ``"vmap"`` (vmap or fail) or
        ``"loop"`` (one particle at a time: slow, always correct).
    :param bool record_graph: let :meth:`log_density_and_score` replay a recorded graph (a CUDA
        graph on a GPU) when it is called again and again with the same arguments
        (:class:`~pyro_stein.graphs.GraphedLogDensity`; its ``status`` is ``self.graphs.status``).
        Only for vectorized models without subsampling.
    :param bool share_across_data: with ``record_graph``, tie each recording to the shapes of the
        arguments rather than to the data tensors themselves, so that one recording serves every
        dataset of the same shapes (``share_across_data`` of
        :class:`~pyro_stein.graphs.GraphedLogDensity`; keeps up to 64 shapes).
    """

    def __init__(
        self,
        model: Callable,
        sites: Sequence[LatentSite],
        vectorize: str = "auto",
        record_graph: bool = False,
        share_across_data: bool = False,
    ):
        if vectorize not in ("auto", "vmap", "loop"):
            raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop', got {vectorize!r}")
        if not isinstance(record_graph, bool):
            raise TypeError(f"record_graph must be True or False, got {record_graph!r}")
        if not isinstance(share_across_data, bool):
            raise TypeError(f"share_across_data must be True or False, got {share_across_data!r}")
        self.model = model
        self.sites = list(sites)
        self.vectorize = vectorize
        self._mode: str | None = None if vectorize == "auto" else vectorize
        self._stack_ok: bool | None = None  # one vmap pass over datasets too: None = not yet checked
        self.dim = sum(s.size for s in self.sites)
        self._by_name = {s.name: s for s in self.sites}
        self._identity = {s.name for s in self.sites if _is_identity(s.transform)}
        # masked-out latent entries that the model reads elsewhere get no standard normal (see masked_out_anchor);
        # found by one probe at the first evaluation (None: not probed yet)
        self._read_masked: dict[str, Tensor] | None = None
        # repeated calls with the same arguments: replayed from a recorded graph (see pyro_stein.graphs)
        self.graphs: GraphedLogDensity | None = self._new_graphs(share_across_data) if record_graph else None

    #: the most ``rows x elements of the largest tensor argument`` one evaluation handles: more particles are
    #: evaluated in chunks of equal size (the last padded with repeated rows), so that a model's intermediates of
    #: one value per particle and data row stay below this many elements each (2^25: 256 MB in float64)
    chunk_elements: int = 1 << 25
    #: on CPU, an evaluation of many particles is split further, into calls of about ``cpu_chunk_min_rows`` or more
    #: particles whose intermediates stay near ``cpu_chunk_elements`` elements each (2^18: 2 MB in float64, about a
    #: core's cache): a model on a thousand data rows evaluates 4,000 particles 4 to 7 times faster in such pieces
    cpu_chunk_elements: int = 1 << 18
    cpu_chunk_min_rows: int = 256

    def _chunk_rows(self, rows: int, args: tuple, kwargs: dict, device: torch.device | None = None) -> int:
        """How many particles one evaluation takes (``rows`` when the data are small enough to take them all);
        ``device``: the particles' device, for the smaller pieces on CPU."""
        size = max(_largest_tensor(args, kwargs.values()), 1)
        chunk = max(1, self.chunk_elements // size)
        if device is not None and device.type == "cpu":
            chunk = min(chunk, max(self.cpu_chunk_min_rows, self.cpu_chunk_elements // size))
        if chunk >= rows:
            return rows
        pieces = -(-rows // chunk)
        return -(-rows // pieces)  # chunks of (nearly) equal size: the last one wastes less than one chunk's rows

    def _new_graphs(self, share_across_data: bool) -> GraphedLogDensity:
        single, why_not = self._graph_callbacks()
        guard = _global_tensor_guard(self.model)
        if share_across_data:
            return GraphedLogDensity(single, why_not=why_not, share_across_data=True, max_recordings=64, guard=guard)
        return GraphedLogDensity(single, why_not=why_not, guard=guard)

    def __getstate__(self) -> dict:
        # recordings are not copied (copy.deepcopy, e.g. by refine, or pickling): the copy records its own, with
        # callbacks bound to itself
        state = self.__dict__.copy()
        graphs = state.pop("graphs")
        state["_graphs_shared"] = None if graphs is None else graphs.share_across_data
        return state

    def __setstate__(self, state: dict) -> None:
        shared = state.pop("_graphs_shared")
        self.__dict__.update(state)
        self.graphs = None if shared is None else self._new_graphs(shared)

    # ---- one particle --------------------------------------------------------------------
    def _condition_data(self, u: Tensor, plates: dict[str, Tensor]) -> tuple[dict, Tensor]:
        data = dict(plates)
        ladj = u.new_zeros(())
        for name, (uu, x) in unpack(u, self.sites).items():
            if name not in self._identity:  # log|det J| = 0: no ops to run and differentiate
                ladj = ladj + self._by_name[name].transform.log_abs_det_jacobian(uu, x).sum()
            data[name] = x
        return data, ladj

    def _trace(self, data: dict, args: tuple, kwargs: dict):
        with top_level():
            return poutine.trace(poutine.condition(self.model, data)).get_trace(*args, **kwargs)

    def _single_log_density(self, u: Tensor, args: tuple, kwargs: dict, plates: dict) -> Tensor:
        data, ladj = self._condition_data(u, plates)
        trace = self._trace(data, args, kwargs)
        lp = trace_log_prob_sum(trace) + ladj
        anchor = masked_out_anchor(self.sites, self._read_masked, u, trace)
        return lp if anchor is None else lp + anchor

    def _graph_callbacks(self) -> tuple[Callable, Callable]:
        """``single`` and ``why_not`` for :class:`GraphedLogDensity`, holding this object weakly (no reference
        cycle: the data and any recording are freed as soon as the log density is)."""
        ref = weakref.ref(self)

        def single(u: Tensor, args: tuple, kwargs: dict) -> Tensor:
            return ref()._single_log_density(u, args, kwargs, {})

        def why_not(u: Tensor, args: tuple, kwargs: dict) -> str | None:
            me = ref()
            if me is None or me._mode != "vmap":
                return "the model is not evaluated with torch.func.vmap"
            with pyro.validation_enabled(False):
                data, _ = me._condition_data(u[0].detach(), {})
                trace = me._trace(data, args, kwargs)
            if any(site["type"] == "param" for site in trace.nodes.values()):
                return "the model has pyro.param/pyro.module sites, whose values can be replaced between calls"
            return None

        return single, why_not

    def _probe_masked_reads(self, u: Tensor, args: tuple, kwargs: dict) -> None:
        """Find the masked-out latent entries that other sites read (e.g. ``with poutine.mask(mask=False):`` around
        a prior, the flat-prior idiom, whose value the likelihood uses): the gradient of the model's log density
        (without Jacobians or anchor) at two points is non-zero there. Once, eagerly, before any evaluation."""
        self._read_masked = {}
        read = torch.zeros_like(u[0], dtype=torch.bool)
        try:
            with torch.enable_grad(), pyro.validation_enabled(False):
                for value in (0.0, 0.5):
                    v = torch.full_like(u[0], value).detach().requires_grad_(True)
                    data, _ = self._condition_data(v, {})
                    trace = self._trace(data, args, kwargs)
                    if not any(site_mask(trace.nodes[s.name]) is not None for s in self.sites if s.name in trace.nodes):
                        return  # no latent is masked: nothing to find
                    (g,) = torch.autograd.grad(trace_log_prob_sum(trace), v, allow_unused=True)
                    if g is not None:
                        read |= torch.isfinite(g) & (g != 0)
        except Exception:  # noqa: BLE001 - the evaluation itself will raise the model's error with context
            return
        self._read_masked = {
            s.name: read[s.offset : s.offset + s.size].reshape(s.unconstrained_shape)
            for s in self.sites
            if bool(read[s.offset : s.offset + s.size].any())
        }

    def _map(self, fn: Callable[[Tensor], Any], u: Tensor) -> Any:
        """Apply a one-particle function to every row of ``u`` (shape ``(P, D)``); an error the model raises
        comes back as a :class:`ModelEvaluationError` that says where to look (chained to the original)."""
        try:
            return self._map_unchecked(fn, u)
        except (NonFiniteLogJointError, ModelEvaluationError, Warning):  # a warning raised as an error stays itself
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with context
            layout = ", ".join(f"{s.name!r} {tuple(s.shape)}" for s in self.sites)
            raise ModelEvaluationError(
                f"the model raised {type(e).__name__} ({str(e).splitlines()[0] if str(e) else 'no message'}) when "
                f"evaluated at the guide's latent values (sites {layout}, dtype {u.dtype}). {_evaluation_hint(e, u)}"
            ) from e

    def _map_unchecked(self, fn: Callable[[Tensor], Any], u: Tensor) -> Any:
        if self._mode is None:
            self._mode = self._choose_mode(fn, u)
        if self._mode == "vmap":
            with pyro.validation_enabled(False):
                return torch.func.vmap(fn, randomness="same")(u)
        with pyro.validation_enabled(False):  # as under vmap: a value outside a support is -inf, not an error
            outs = [fn(row) for row in u.unbind(0)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs))
        return torch.stack(outs)

    def _choose_mode(self, fn: Callable, u: Tensor) -> str:
        probe = u[:2].detach()
        try:
            with pyro.validation_enabled(False):
                got = torch.func.vmap(fn, randomness="same")(probe)
        except Exception as e:  # noqa: BLE001 - any failure means: not vmappable, unless the loop fails too
            if self.vectorize == "vmap":
                raise
            for row in probe.unbind(0):  # the model's own error (e.g. data of the wrong shape): raised, mode unset
                fn(row)
            warnings.warn(
                f"the model could not be evaluated for all particles at once with torch.func.vmap "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); falling back to a "
                "loop over particles, which is correct but slower. Pass vectorize='loop' to silence this.",
                VectorizationWarning,
                stacklevel=4,
            )
            return "loop"
        with pyro.validation_enabled(False):  # as under vmap: a value outside a support is -inf, not an error
            want = [fn(row) for row in probe.unbind(0)]
        got = got if isinstance(got, tuple) else (got,)
        want = list(zip(*[w if isinstance(w, tuple) else (w,) for w in want]))
        for g, w in zip(got, want):
            w = torch.stack(w)
            if not torch.allclose(g, w, rtol=1e-4, atol=1e-6, equal_nan=True):
                warnings.warn(
                    "torch.func.vmap gave different values than a loop over particles for this model; "
                    "falling back to the loop. Pass vectorize='loop' to silence this.",
                    VectorizationWarning,
                    stacklevel=4,
                )
                return "loop"
        return "vmap"

    def log_density(
        self, u: Tensor, args: tuple = (), kwargs: dict | None = None, plates: dict | None = None
    ) -> Tensor:
        """Log joint + ``log|det J|`` at each row of ``u`` (shape ``(P, D)``) -> ``(P,)``.

        :param dict plates: subsample indices per subsampled plate name, fixed for all particles.
        """
        kwargs = kwargs or {}
        plates = plates or {}
        if self._read_masked is None:
            self._probe_masked_reads(u, args, kwargs)
        return self._map(lambda row: self._single_log_density(row, args, kwargs, plates), u)

    def log_density_and_score(
        self, u: Tensor, args: tuple = (), kwargs: dict | None = None, plates: dict | None = None, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Log density and its gradient (the score) at each row of ``u``; both detached.

        Many particles on large data are evaluated in chunks (see :attr:`chunk_elements`), so the
        peak memory of one call is that of ``chunk_elements / (elements of the largest tensor
        argument)`` particles, not of all of them.

        :param bool check: raise :class:`NonFiniteLogJointError` naming the offending sites when a
            value or gradient is not finite.
        """
        if u.dim() != 2 or u.shape[-1] != self.dim:
            raise ValueError(
                f"u must hold one packed unconstrained latent vector per row, shape (num_particles, {self.dim}) for "
                f"sites {[s.name for s in self.sites]}, got {tuple(u.shape)}"
            )
        rows = u.shape[0]
        chunk = self._chunk_rows(rows, args, kwargs or {}, u.device)
        if chunk < rows:
            padded = torch.cat([u, u[: (-rows) % chunk]]) if rows % chunk else u
            outs = [self.log_density_and_score(part, args, kwargs, plates, check) for part in padded.split(chunk)]
            return torch.cat([o[0] for o in outs])[:rows], torch.cat([o[1] for o in outs])[:rows]

        def eager() -> tuple[Tensor, Tensor]:
            v = u.detach().requires_grad_(True)
            with torch.enable_grad():
                lp = self.log_density(v, args, kwargs, plates)
                (score,) = torch.autograd.grad(lp.sum(), v)
            return lp.detach(), score

        if self.graphs is not None and self._mode != "loop" and not plates:  # the first call decides the mode
            lp, score = self.graphs(u.detach(), args, kwargs or {}, eager)
        else:
            lp, score = eager()
        if check and not all_finite(lp, score):
            bad = ~(torch.isfinite(lp) & torch.isfinite(score).all(-1))
            if bad.any():
                row = int(bad.nonzero()[0, 0])
                raise NonFiniteLogJointError(
                    self.describe_nonfinite(u[row].detach(), args, kwargs or {}, plates or {}, lp[row], score[row])
                )
        return lp, score

    def score_batch(
        self, z: Tensor, datasets: Sequence[Any], plates: Sequence[dict] | None = None, check: bool = True
    ) -> Tensor:
        """Scores ``(B, P, D)`` for particle sets ``z`` ``(B, P, D)``, one per dataset (``.args``/``.kwargs``).

        Datasets whose arguments have the same structure and tensor shapes (e.g. simulated with a
        fixed size, or padded with a mask) are evaluated in one :func:`torch.func.vmap` pass over
        datasets and particles; the first such call is checked against the loop over datasets, and
        a model that fails the check or cannot be vmapped over its data keeps the loop.
        """
        return self.log_density_and_score_batch(z, datasets, plates, check)[1]

    def log_density_and_score_batch(
        self, z: Tensor, datasets: Sequence[Any], plates: Sequence[dict] | None = None, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Log densities ``(B, P)`` and scores ``(B, P, D)``, one particle set per dataset (see :meth:`score_batch`)."""
        plates = list(plates) if plates is not None else [{}] * len(datasets)
        if self._read_masked is None and len(datasets):
            self._probe_masked_reads(z[0], datasets[0].args, datasets[0].kwargs)
        if (
            len(datasets) > 1
            and self._mode == "vmap"
            and self._stack_ok is not False
            and not any(plates)
            and all(
                self._chunk_rows(z.shape[-2] * len(datasets), d.args, d.kwargs) == z.shape[-2] * len(datasets)
                for d in datasets
            )
        ):  # one pass over all datasets' particles, within the chunk budget
            stacked = _stack_arguments(datasets)
            if stacked is not None:
                out = self._stacked_log_density_and_score(z, datasets, stacked, check)
                if out is not None:
                    return out
        outs = [
            self.log_density_and_score(zi, d.args, d.kwargs, pl, check=check) for zi, d, pl in zip(z, datasets, plates)
        ]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    def _stacked_log_density_and_score(
        self, z: Tensor, datasets: Sequence[Any], stacked: tuple, check: bool
    ) -> tuple[Tensor, Tensor] | None:
        spec, leaves, batched = stacked

        def one_dataset(ub: Tensor, *leaf_values):
            args, kwargs = tree_unflatten(list(leaf_values), spec)
            return torch.func.vmap(lambda row: self._single_log_density(row, args, kwargs, {}), randomness="same")(ub)

        in_dims = (0, *[0 if b else None for b in batched])
        u = z.detach().requires_grad_(True)
        try:
            with torch.enable_grad(), pyro.validation_enabled(False):
                lp = torch.func.vmap(one_dataset, in_dims=in_dims, randomness="same")(u, *leaves)
                (score,) = torch.autograd.grad(lp.sum(), u)
        except Exception:  # noqa: BLE001 - not vmappable over the data: keep the loop over datasets
            if self._stack_ok:
                raise
            self._stack_ok = False
            return None
        lp = lp.detach()
        if self._stack_ok is None:
            want = torch.stack(
                [self.log_density_and_score(z[b], d.args, d.kwargs, check=False)[1] for b, d in enumerate(datasets[:2])]
            )
            self._stack_ok = bool(torch.allclose(score[:2], want, rtol=1e-4, atol=1e-6, equal_nan=True))
            if not self._stack_ok:
                return None
        if check and not all_finite(lp, score):
            return None  # the loop names the offending dataset, particle and site
        return lp, score

    def describe_nonfinite(self, u: Tensor, args: tuple, kwargs: dict, plates: dict, lp: Tensor, score: Tensor) -> str:
        """A message naming the sites whose log density or gradient is not finite at ``u``."""
        culprits = []
        with pyro.validation_enabled(False), torch.enable_grad():
            u = u.clone().requires_grad_(True)
            data, _ = self._condition_data(u, plates)
            tr = self._trace(data, args, kwargs)
            for name, site in tr.nodes.items():
                if site["type"] != "sample" or _is_deterministic(site) or site_is_subsample(site):
                    continue
                try:
                    term = site_log_prob(site["fn"], site["value"])
                    term = scale_and_mask(term, site["scale"], site["mask"]).sum()
                except Exception as e:  # noqa: BLE001
                    culprits.append(f"{name!r} (log_prob raised {type(e).__name__}: {e})")
                    continue
                if not torch.isfinite(term):
                    moved = name in self._by_name and not bool(site["fn"].support.check(site["value"]).all())
                    culprits.append(
                        f"{name!r} (log_prob = {term.item()}"
                        + (
                            f"; its value lies outside its support {site['fn'].support} here, although the guide maps "
                            "into the support the site had at setup: the support depends on other latent values, which "
                            "the guide cannot follow. Reparameterise, e.g. u = a * Uniform(0, 1) instead of "
                            "Uniform(0, a))"
                            if moved
                            else ")"
                        )
                    )
                    continue
                if not term.requires_grad:
                    continue
                (grad,) = torch.autograd.grad(term, u, retain_graph=True, allow_unused=True)
                if grad is not None and not torch.isfinite(grad).all():
                    culprits.append(f"{name!r} (gradient not finite)")
            for name, (uu, x) in unpack(u, self.sites).items():
                s = self._by_name[name]
                if not torch.isfinite(x).all():
                    culprits.append(f"{name!r} (constrained value not finite: unconstrained value too large)")
                elif not torch.isfinite(s.transform.log_abs_det_jacobian(uu, x).sum()):
                    culprits.append(f"{name!r} (log|det J| of {type(s.transform).__name__} not finite)")
        where = ", ".join(culprits) if culprits else "no single site (check pyro.factor terms and custom code)"
        return (
            f"the model's log joint is not finite (log density = {lp.item()}, "
            f"score finite = {bool(torch.isfinite(score).all())}) at a particle; offending site(s): {where}. "
            "Check the model's supports and data, start from a better init_loc_fn, or lower the learning rate."
        )

    def deterministic(
        self, u: Tensor, names: Sequence[str], args: tuple = (), kwargs: dict | None = None
    ) -> dict[str, Tensor]:
        """Values of the named ``pyro.deterministic`` sites at each row of ``u``."""
        if not names:
            return {}
        kwargs = kwargs or {}

        def fn(row):
            data, _ = self._condition_data(row, {})
            tr = self._trace(data, args, kwargs)
            return tuple(tr.nodes[n]["value"] for n in names)

        if self._mode is None:  # the log density, not this function, decides between vmap and the loop
            self.log_density(u[:2], args, kwargs)
        out = self._map(fn, u)
        return dict(zip(names, out))


def _global_tensor_guard(model: Callable) -> Callable[[], tuple] | None:
    """``() -> token`` of the global tensors the model function names (their identities), for
    :class:`~pyro_stein.graphs.GraphedLogDensity`: a global reassigned between calls (``X = new_X``) changes the token,
    so a recording made with the old one is not replayed. Only globals named in the model function's own code are
    seen (not those read by functions it calls, nor tensors held by other objects); ``None`` when there are none."""
    fn = getattr(model, "__func__", model)
    code, names_of = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or not isinstance(names_of, dict):
        return None
    names = tuple(n for n in code.co_names if isinstance(names_of.get(n), Tensor))
    if not names:
        return None
    return lambda: tuple(id(names_of.get(n)) for n in names)


def _largest_tensor(*groups) -> int:
    """The number of elements of the largest tensor in the given argument groups (nested in tuples, lists and
    dicts), at least 1."""
    largest = 1
    stack = [v for group in groups for v in group]
    while stack:
        v = stack.pop()
        if isinstance(v, Tensor):
            largest = max(largest, v.numel())
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return largest


def _stack_arguments(datasets: Sequence[Any]) -> tuple[Any, list, list[bool]] | None:
    """The datasets' arguments as one batch: ``(treespec, leaves, batched)``, or ``None`` when they differ
    in structure, tensor shape, dtype or device, or in a non-tensor value. Tensors shared by every
    dataset (the same object) are passed once, unbatched."""
    flat = [tree_flatten((tuple(d.args), dict(d.kwargs))) for d in datasets]
    spec = flat[0][1]
    if any(f[1] != spec for f in flat[1:]):
        return None
    leaves, batched = [], []
    for column in zip(*[f[0] for f in flat]):
        first = column[0]
        shared = all(c is first for c in column) or (
            not isinstance(first, Tensor) and all(type(c) is type(first) and _same_value(c, first) for c in column)
        )
        if shared:
            leaves.append(first)
            batched.append(False)
            continue
        if not all(
            isinstance(c, Tensor) and c.shape == first.shape and c.dtype == first.dtype and c.device == first.device
            for c in column
        ):
            return None  # differing non-tensors, or tensors that cannot be stacked
        leaves.append(torch.stack(column))
        batched.append(True)
    return spec, leaves, batched


def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays, whose == is elementwise
        return False
