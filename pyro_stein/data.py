"""Datasets for amortized guides: containers, per-observation features, collation with masks."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import pyro.poutine as poutine
import pyro.util
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .logjoint import full_data, site_mask, top_level

__all__ = [
    "Dataset",
    "DatasetFeatures",
    "PriorPredictiveStream",
    "as_dataset",
    "collate_features",
    "default_dataset_fn",
]


class Dataset:
    """The arguments of one call of the model: ``Dataset(*args, **kwargs)``.

    Example: ``Dataset(X, y=y)`` for ``model(X, y=None)``.
    """

    __slots__ = ("args", "kwargs", "_cache", "_cache_state")

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self._cache: dict = {}
        self._cache_state = self._tensor_state()

    def _tensor_state(self) -> tuple:
        """Which tensors the arguments are, and their in-place version counters."""
        leaves = tree_flatten((self.args, self.kwargs))[0]
        return tuple((id(t), t._version) for t in leaves if isinstance(t, Tensor))

    @property
    def cache(self) -> dict:
        """Per-guide data derived from the arguments (encoder features, Laplace frames); not part of the dataset.
        Emptied when an argument tensor is replaced or modified in place by a PyTorch operation (which bumps the
        tensor's version counter). Writes that PyTorch does not see, through a NumPy array sharing the memory
        (``torch.from_numpy``) or through ``.data``, do not empty it: after such a write pass new tensors."""
        state = self._tensor_state()
        if state != self._cache_state:
            self._cache, self._cache_state = {}, state
        return self._cache

    def __repr__(self) -> str:
        def fmt(v):
            return f"Tensor{tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)

        parts = [fmt(a) for a in self.args] + [f"{k}={fmt(v)}" for k, v in self.kwargs.items()]
        return f"Dataset({', '.join(parts)})"

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Dataset:
        """A copy with ``fn`` applied to every tensor argument (e.g. ``lambda t: t.to('cuda')``)."""
        conv = lambda v: fn(v) if isinstance(v, Tensor) else v  # noqa: E731
        return Dataset(*[conv(a) for a in self.args], **{k: conv(v) for k, v in self.kwargs.items()})


class LastDataset:
    """The :class:`Dataset` of the last arguments seen, returned again for the same argument objects, so what is
    cached on it (features, Laplace frames) is reused across calls with the same data; a new one otherwise.

    Arguments are compared by identity (tensors modified in place empty the Dataset's cache themselves); arguments
    with leaves other than tensors and immutable scalars always get a new Dataset. The memo holds the last
    arguments, so their ids are not reused while it does.
    """

    _IMMUTABLE = (Tensor, int, float, complex, str, bytes, bool, type(None))

    def __init__(self):
        self._last: tuple[list, Dataset] | None = None

    def __deepcopy__(self, memo) -> LastDataset:  # a copied guide or driver starts with an empty memo
        return LastDataset()

    def __getstate__(self) -> dict:  # pickling the owner does not pickle the last data
        return {"_last": None}

    def __call__(self, args: tuple, kwargs: dict) -> Dataset:
        leaves = tree_flatten((args, kwargs))[0]
        if not all(isinstance(x, self._IMMUTABLE) for x in leaves):
            return Dataset(*args, **kwargs)
        key = [id(x) for x in leaves]
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        d = Dataset(*args, **kwargs)
        self._last = (key, d)
        return d


def as_dataset(obj: Any) -> Dataset:
    """Coerce a :class:`Dataset`, a tuple of positional arguments, or a dict of keyword arguments."""
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, dict):
        return Dataset(**obj)
    if isinstance(obj, (tuple, list)):
        return Dataset(*obj)
    raise TypeError(
        f"a dataset must be a pyro_stein.Dataset(*args, **kwargs), a tuple of the model's positional arguments "
        f"or a dict of its keyword arguments; got {type(obj).__name__}"
    )


def _dataset_sequence(datasets: Any, arg: str = "datasets") -> Any:
    """``datasets`` itself, once it is known not to be a single dataset (a common slip)."""
    if isinstance(datasets, (Dataset, dict, Tensor)):
        raise TypeError(
            f"{arg} must be a sequence of datasets (each a Dataset, a tuple of the model's arguments or a dict of its "
            f"keyword arguments), got a single {type(datasets).__name__}: wrap it in a list"
        )
    return datasets


def dataset_batch(batch: Any, caller: str) -> list[Dataset]:
    """One batch of datasets as :class:`Dataset` objects; ``caller`` names the function in the error for an empty
    batch."""
    batch = [as_dataset(d) for d in _dataset_sequence(batch)]
    if not batch:
        raise ValueError(f"{caller} got an empty batch of datasets; it needs at least one dataset")
    return batch


class DatasetFeatures(NamedTuple):
    """Padded per-observation features ``(B, N_max, F)`` and a boolean mask ``(B, N_max)``."""

    features: Tensor
    mask: Tensor


def collate_features(items: Sequence[Tensor], start: int = 0) -> DatasetFeatures:
    """Pad per-dataset feature matrices ``(N_b, F)`` to a batch with a mask (no NaN padding).

    :param int start: the position of ``items[0]`` in the caller's batch (error messages use it).
    """
    if len(items) == 0:
        raise ValueError("no datasets to collate")
    mats = []
    for i, f in enumerate(items, start):
        if not isinstance(f, Tensor):
            raise TypeError(
                "dataset features must be a Tensor[num_observations, num_features], "
                f"got {type(f).__name__} (dataset {i})"
            )
        if f.dim() == 1:
            f = f.unsqueeze(-1)
        if f.dim() != 2:
            raise ValueError(
                f"dataset features must have shape (num_observations, num_features), got {tuple(f.shape)} (dataset {i})"
            )
        if f.shape[0] == 0:
            raise ValueError(f"dataset {i} is empty (0 observations); every dataset needs at least one observation")
        if f.shape[1] != mats[0].shape[1] if mats else False:
            raise ValueError(
                f"dataset {i} has {f.shape[1]} features per observation but dataset {start} has {mats[0].shape[1]}; "
                "all datasets must have the same feature width"
            )
        if not torch.isfinite(f).all():
            raise ValueError(
                f"dataset {i} has non-finite features (NaN/inf); use fewer observations instead of NaN padding"
            )
        mats.append(f)
    n_max = max(f.shape[0] for f in mats)
    ref = mats[0]
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    feats = torch.zeros(len(mats), n_max, ref.shape[1], dtype=dtype, device=ref.device)
    mask = torch.zeros(len(mats), n_max, dtype=torch.bool, device=ref.device)
    for b, f in enumerate(mats):
        feats[b, : f.shape[0]] = f.to(dtype)
        mask[b, : f.shape[0]] = True
    return DatasetFeatures(feats, mask)


def _observed_sites(trace, latent_names=()) -> list[dict]:
    out = []
    for site in trace.nodes.values():
        if site["type"] != "sample" or not site["is_observed"] or site["infer"].get("_deterministic"):
            continue
        if site["name"] in latent_names:  # conditioned latent, not data
            continue
        if type(site["fn"]).__name__ == "Unit":  # pyro.factor
            continue
        out.append(site)
    return out


def _ordered_arguments(model: Callable, args: tuple, kwargs: dict) -> list:
    """The model's arguments in a canonical order: positional ones as given, then keyword ones in
    the order of the model's signature, then keywords the signature does not name (e.g. taken by
    ``**kwargs``) sorted by name; all keywords sorted by name when the signature cannot be read."""
    try:
        params = list(inspect.signature(model).parameters)
    except (TypeError, ValueError):
        params = []
    rank = {name: i for i, name in enumerate(params)}
    keys = sorted(kwargs, key=lambda k: (0, rank[k], "") if k in rank else (1, 0, k))
    return list(args) + [kwargs[k] for k in keys]


def default_dataset_fn(
    model: Callable, latent_values: dict, args: tuple, kwargs: dict, one_row_covariates: bool = False
) -> Tensor:
    """Per-observation features read from the model: the default ``dataset_fn``.

    The model is run once with its latent sites fixed at ``latent_values``. Every observed site
    (not ``pyro.deterministic``, not ``pyro.factor``) contributes its value, one row per element
    of its outermost plate (a site outside any plate is one observation); all observed sites
    must have the same number of observations ``N``.

    Covariates: when ``N > 1``, every floating-point tensor argument whose first dim equals ``N``
    (other than an observed value itself) is appended, reshaped to ``(N, -1)``, so ``model(X, y)``
    gives rows ``[x_i, y_i]``. Tensor arguments of any other size (e.g. a vector of prior
    parameters, or a covariate matrix whose row count differs from ``N``), integer or boolean
    tensors, and all tensor arguments when ``N == 1`` are not encoded (a length-1 argument may
    as well be a parameter), unless ``one_row_covariates`` is set: then, when the observations lie
    in a plate, the arguments with one row are appended as for ``N > 1`` (the guide sets it for a
    one-row dataset whose features would otherwise lack the covariate columns the guide was set up
    with). Give the guide a ``dataset_fn`` if other arguments should inform the posterior.

    Column order does not depend on how the dataset was written: the observed sites come first
    (in the order the model visits them), then the covariates from the positional arguments in
    order, then from the keyword arguments in the order of the model's signature (keywords the
    signature does not name, e.g. taken by ``**kwargs``, after those, sorted by name; all
    keywords sorted by name when the signature cannot be read). So ``Dataset(X=X, Z=Z, y=y)``,
    ``Dataset(Z=Z, X=X, y=y)`` and ``Dataset(X, Z, y)`` give the same features for
    ``model(X, Z, y=None)``.

    :raises ValueError: when the model fails on the dataset, when observed sites disagree on the
        number of observations or when there is no observed site; pass ``dataset_fn`` to the
        guide instead in the last two cases.
    """
    try:
        # top_level: e.g. inside Predictive(parallel=True), the model's plates keep their own dims;
        # full_data: a subsampled plate of observations is read whole (not a fresh random minibatch)
        with top_level(), full_data():
            tr = poutine.block(poutine.trace(poutine.condition(model, latent_values)).get_trace)(*args, **kwargs)
    except Exception as e:
        raise ValueError(
            f"the model failed on this dataset while its observations were being read "
            f"({type(e).__name__}: {e}); check the dataset: it may be empty, or of a different form "
            "(shapes, number of covariates, dtype) than the training datasets"
        ) from e
    sites = _observed_sites(tr, latent_values)
    if not sites:
        raise ValueError(
            "the model has no observed sites in these arguments, so the default dataset_fn has no data to encode; "
            "pass the observations to the model, or give the guide a dataset_fn(*args, **kwargs) -> Tensor[N, F]"
        )
    cols, n_obs, observed, used, plated = [], None, [], None, False
    for site in sites:
        value = site["value"]
        observed.append(value)
        frames = [f for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
        # plate dims count from the right of the batch shape, left of the site's event dims
        batch_rank = value.dim() - site["fn"].event_dim
        rows = None
        if frames and batch_rank >= -min(f.dim for f in frames):
            outer = min(frames, key=lambda f: f.dim)
            d = batch_rank + outer.dim
            v = value.movedim(d, 0)
            v = v.reshape(v.shape[0], -1)
            keep = _entries_in_use(site, value, batch_rank, d)
            plated = True
            if keep is None:  # every row of this site is observed
                rows = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
            else:  # a row counts when any entry is observed; masked entries (maybe NaN placeholders) read as 0
                rows, v = keep.any(-1), torch.where(keep, v, torch.zeros_like(v))
        else:
            v = value.reshape(1, -1)
        if n_obs is not None and v.shape[0] != n_obs:
            raise ValueError(
                f"observed site {site['name']!r} has {v.shape[0]} observations but another observed site has {n_obs}; "
                "the default dataset_fn cannot line them up: "
                "give the guide a dataset_fn(*args, **kwargs) -> Tensor[N, F]"
            )
        n_obs = v.shape[0]
        cols.append(v)
        if rows is not None:
            used = rows if used is None else used | rows
    if n_obs > 1 or (one_row_covariates and plated):
        for a in _ordered_arguments(model, args, kwargs):
            if isinstance(a, Tensor) and a.is_floating_point() and a.dim() >= 1 and a.shape[0] == n_obs:
                # the observations themselves (also when the model indexes them, e.g. y[idx] in a subsampled plate,
                # or reshapes them, e.g. y[:, None] for a vector-valued site)
                if any(
                    a is o or (a.numel() == o.numel() and a.dtype == o.dtype and torch.equal(a.reshape(o.shape), o))
                    for o in observed
                ):
                    continue
                cols.append(a.reshape(n_obs, -1))
    dtype = next((c.dtype for c in cols if c.is_floating_point()), torch.get_default_dtype())
    feats = torch.cat([c.to(dtype) for c in cols], -1)
    return feats if used is None or bool(used.all()) else feats[used]


def _entries_in_use(site: dict, value: Tensor, batch_rank: int, axis: int) -> Tensor | None:
    """Which entries of an observed site's ``value`` a mask leaves in the model's log density (``poutine.mask``, a
    ``dist.mask``/``obs_mask``, also inside ``.to_event``), laid out as its feature rows: the plate ``axis`` first, the
    rest flattened. ``None`` when nothing is masked."""
    try:
        keep = site_mask(site)
        if keep is None:
            return None
        # the mask's dims past the distribution's batch shape are event dims that .to_event made of masked batch dims
        keep = keep.expand(value.shape[:batch_rank] + keep.shape[len(site["fn"].batch_shape) :])
        keep = keep.reshape(keep.shape + (1,) * (value.dim() - keep.dim())).expand(value.shape)
    except RuntimeError:  # a mask over more than the site's batch shape: not read, every entry kept
        return None
    return keep.movedim(axis, 0).reshape(value.shape[axis], -1)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(
            f"batch_size must be an int >= 1 (datasets per batch), got {batch_size!r} ({type(batch_size).__name__})"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (datasets per batch), got {batch_size!r}")
    return int(batch_size)


class PriorPredictiveStream:
    """An endless stream of datasets simulated from the model's prior predictive.

    Each dataset is made by ``make_args()`` (returning the model's arguments with the
    observations left out: a :class:`Dataset`, tuple or dict; it may randomise sizes and
    covariates), running the model forward and putting the simulated observed values back in
    as keyword arguments named by ``obs_kwargs`` (``{site_name: keyword}``).

    Example::

        def make_args():
            n = int(torch.randint(20, 501, ()))
            return Dataset(torch.randn(n, 5))
        stream = PriorPredictiveStream(model, make_args, obs_kwargs={"obs": "y"})

    On the first sample the model is run once more with the simulated keywords set, to check
    that every site named in ``obs_kwargs`` is then observed (a latent site named by mistake
    would otherwise feed its own draw to the model as data).

    :param callable model: the Pyro model.
    :param callable make_args: ``() -> Dataset`` of the unobserved arguments.
    :param dict obs_kwargs: maps observed site names to the model keyword that holds them.
    :raises ValueError: at the first sample, when a site of ``obs_kwargs`` is missing from the
        model or is not observed with its keyword set.
    """

    def __init__(self, model: Callable, make_args: Callable[[], Any], obs_kwargs: dict[str, str]):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not callable(make_args):
            raise TypeError("make_args must be a callable returning the model's arguments for one dataset")
        if not isinstance(obs_kwargs, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in obs_kwargs.items()
        ):
            raise TypeError(
                f"obs_kwargs must be a dict mapping observed site names to the model keywords that feed their obs= "
                f"(str -> str, e.g. {{'obs': 'y'}}), got {obs_kwargs!r}"
            )
        if not obs_kwargs:
            raise ValueError("obs_kwargs must map at least one observed site name to a model keyword")
        self.model = model
        self.make_args = make_args
        self.obs_kwargs = dict(obs_kwargs)
        self._checked = False  # obs_kwargs checked against the model (on the first sample)

    def sample(self) -> Dataset:
        """One simulated dataset."""
        return self.sample_with_latents()[0]

    def sample_with_latents(self) -> tuple[Dataset, dict[str, Tensor]]:
        """One simulated dataset and the latent values it was simulated from (for SBC)."""
        d = as_dataset(self.make_args())
        tr = poutine.trace(self.model).get_trace(*d.args, **d.kwargs)
        kwargs = dict(d.kwargs)
        for site, kw in self.obs_kwargs.items():
            if site not in tr.nodes:
                raise ValueError(f"obs_kwargs names site {site!r}, which the model does not have")
            if tr.nodes[site]["is_observed"]:
                raise ValueError(
                    f"site {site!r} is already observed in the arguments make_args returned (its {kw}= was passed?), "
                    "so the stream would hand back those fixed observations instead of a prior-predictive draw; "
                    "make_args must leave the observations out"
                )
            kwargs[kw] = tr.nodes[site]["value"].detach()
        latents = {
            name: site["value"].detach()
            for name, site in tr.iter_stochastic_nodes()
            if name not in self.obs_kwargs and not site_is_subsample(site)
        }  # no plates' index sites
        if not self._checked:
            self._check_observed(d.args, kwargs)
            self._checked = True
        return Dataset(*d.args, **kwargs), latents

    def _check_observed(self, args: tuple, kwargs: dict) -> None:
        """Every site named in ``obs_kwargs`` must be observed when the model gets the simulated keywords."""
        rng = pyro.util.get_rng_state()  # the check must not shift the stream's random numbers
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        try:
            with poutine.block():
                tr = poutine.trace(self.model).get_trace(*args, **kwargs)
        except Exception as e:
            raise ValueError(
                f"the model failed when given the simulated observations as keywords "
                f"({', '.join(f'{kw}= from site {s!r}' for s, kw in self.obs_kwargs.items())}): "
                f"{type(e).__name__}: {e}; obs_kwargs must map each observed site to the keyword that feeds its obs="
            ) from e
        finally:
            pyro.util.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        observed = [
            n
            for n, s in tr.nodes.items()
            if s["type"] == "sample" and s["is_observed"] and not s["infer"].get("_deterministic")
        ]
        for site, kw in self.obs_kwargs.items():
            node = tr.nodes.get(site)
            if node is not None and node["type"] == "sample" and node["is_observed"]:
                continue
            hint = f"observed sites: {', '.join(map(repr, observed))}" if observed else "the model has no observed site"
            raise ValueError(
                f"obs_kwargs maps site {site!r} to keyword {kw!r}, but {site!r} is a latent (unobserved) site of the "
                f"model even with {kw}= set, so its simulated draw would be passed as data; obs_kwargs must name the "
                f"observed site whose obs= the keyword {kw!r} feeds ({hint})"
            )

    def batches(self, batch_size: int) -> Iterator[list[Dataset]]:
        """Endless batches of ``batch_size`` datasets."""
        batch_size = _check_batch_size(batch_size)  # checked now, not at the first batch

        def gen():
            while True:
                yield [self.sample() for _ in range(batch_size)]

        return gen()

    def __iter__(self) -> Iterator[Dataset]:
        while True:
            yield self.sample()


def iterate_batches(datasets: Iterable, batch_size: int) -> Iterator[list[Dataset]]:
    """Cycle endlessly over a finite collection in shuffled batches of ``batch_size`` datasets (all of them when
    the collection is smaller).

    Every batch is full and holds distinct datasets: a batch that runs past the end of one shuffled pass is
    completed from the next pass, which takes those datasets last; so over any run of passes each dataset is
    used equally often, give or take one.

    :raises TypeError, ValueError: at the call, when ``batch_size`` is not an int >= 1 or the
        collection is empty.
    """
    batch_size = _check_batch_size(batch_size)
    items = [as_dataset(d) for d in datasets]
    if not items:
        raise ValueError("the dataset collection is empty")
    size = min(batch_size, len(items))

    def gen():
        queue: list[int] = []
        while True:
            if len(queue) < size:  # the next pass, with the datasets still queued from this one moved to its end
                perm = torch.randperm(len(items)).tolist()
                queued = set(queue)
                queue += [j for j in perm if j not in queued] + [j for j in perm if j in queued]
            batch, queue = queue[:size], queue[size:]
            yield [items[j] for j in batch]

    return gen()
