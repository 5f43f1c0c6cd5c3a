"""Datasets: default per-observation features, prior predictive streams, batching."""

import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_stein import Dataset, PriorPredictiveStream
from pyro_stein.data import default_dataset_fn, iterate_batches

from .conftest import tensor


def two_covariate_model(X, Z, y=None):
    """y_i ~ N(x_i w + z_i v, 0.5): two covariate matrices of different widths."""
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    v = pyro.sample("v", dist.Normal(Z.new_zeros(Z.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("obs", dist.Normal(X @ w + Z @ v, 0.5), obs=y)


def reversed_signature_model(Z, X, y=None):
    """The same model, its covariates declared in the other order."""
    return two_covariate_model(X, Z, y)


def var_keyword_model(y=None, **covariates):
    """Covariates only through ``**kwargs``: no declared order, so they are sorted by name."""
    return two_covariate_model(covariates["X"], covariates["Z"], y)


class UnreadableSignatureModel:
    """A callable whose signature ``inspect.signature`` cannot read: keywords are sorted by name."""

    __signature__ = "not a signature"

    def __call__(self, *args, **kwargs):
        return two_covariate_model(*args, **kwargs)


def regression_model(X, y=None):
    """sigma ~ HalfNormal(1), w ~ N(0, I); y_i ~ N(x_i w, sigma)."""
    sigma = pyro.sample("sigma", dist.HalfNormal(tensor(1.0)))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("obs", dist.Normal(X @ w, sigma), obs=y)


def covariates(n=6):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 2, generator=g).to(tensor(0.0))
    Z = (5 + torch.randn(n, 3, generator=g)).to(tensor(0.0))
    y = torch.randn(n, generator=g).to(tensor(0.0))
    return X, Z, y


TWO_COVARIATE_LATENTS = {"w": tensor([1.0, -1.0]), "v": tensor([0.5, 2.0, 0.0])}


@pytest.mark.parametrize(
    "model, first",
    [
        (two_covariate_model, "X"),
        (reversed_signature_model, "Z"),
        (var_keyword_model, "X"),
        (UnreadableSignatureModel(), "X"),
    ],
    ids=["signature", "reversed-signature", "var-keyword", "unreadable-signature"],
)
@pytest.mark.parametrize(
    "form",
    ["X=,Z=,y=", "Z=,X=,y=", "y=,Z=,X=", "positional"],
)
def test_default_features_column_order_ignores_keyword_order(model, first, form):
    X, Z, y = covariates()
    named = {"X": X, "Z": Z}
    if form == "positional":
        if model is var_keyword_model:
            pytest.skip("takes its covariates by keyword only")
        args, kwargs = tuple(named[k] for k in (first, "XZ".replace(first, ""))), {"y": y}
    else:
        args, kwargs = (), {k: {"X": X, "Z": Z, "y": y}[k] for k in form.replace("=", "").split(",")}
    feats = default_dataset_fn(model, TWO_COVARIATE_LATENTS, args, kwargs)
    second = "XZ".replace(first, "")
    expected = torch.cat([y.unsqueeze(-1), named[first], named[second]], -1)
    assert feats.shape == (6, 6)
    assert torch.equal(feats, expected)


@pytest.mark.parametrize(
    "make_dataset, original",
    [
        (lambda X, y: ((X[:0],), {"y": y[:0]}), "ZeroDivisionError"),  # empty dataset: a plate of size 0
        (lambda X, y: ((torch.cat([X, X], -1),), {"y": y}), "RuntimeError"),  # 6 covariates, w has 3
        (lambda X, y: ((X.tolist(),), {"y": y}), "AttributeError"),  # a list instead of a tensor
    ],
    ids=["empty", "wider-covariates", "not-a-tensor"],
)
def test_default_features_model_failure_is_explained(make_dataset, original):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(10, 3, generator=g).to(tensor(0.0)), torch.randn(10, generator=g).to(tensor(0.0))
    args, kwargs = make_dataset(X, y)
    latents = {"sigma": tensor(1.0), "w": tensor([1.0, 0.0, -1.0])}
    with pytest.raises(
        ValueError, match=rf"model failed on this dataset while its observations were being read \({original}"
    ) as info:
        default_dataset_fn(regression_model, latents, args, kwargs)
    assert "check the dataset" in str(info.value) and "empty" in str(info.value)
    assert type(info.value.__cause__).__name__ == original


def test_default_features_explicit_errors_kept():
    with pytest.raises(ValueError, match="no observed sites"):
        default_dataset_fn(regression_model, {"sigma": tensor(1.0), "w": tensor([1.0])}, (tensor([[1.0], [2.0]]),), {})


@pytest.mark.parametrize(
    "extra, appended",
    [
        (lambda n: tensor([1.0, 2.0, 3.0]), False),  # a 1-D prior-parameter vector of another length
        (lambda n: torch.ones(n + 1, 2, dtype=tensor(0.0).dtype), False),  # a matrix with another row count
        (lambda n: torch.arange(n), False),  # an integer tensor (e.g. group indices)
        (lambda n: torch.ones(n, dtype=tensor(0.0).dtype), True),  # one row per observation: a covariate
        (lambda n: torch.ones(n, 2, dtype=tensor(0.0).dtype), True),
    ],
    ids=["prior-vector", "other-row-count", "integer", "vector-covariate", "matrix-covariate"],
)
@pytest.mark.parametrize("n", [1, 4])
def test_default_features_covariate_rule(extra, appended, n):
    """Floating tensors with first dim == N are covariates, only when N > 1; other tensors are left alone."""

    def model(X, extra, y=None):
        return regression_model(X, y)

    X, y = tensor(torch.ones(n, 1)), tensor(torch.zeros(n))
    e = extra(n).to(X.device)
    feats = default_dataset_fn(model, {"sigma": tensor(1.0), "w": tensor([1.0])}, (X, e), {"y": y})
    width = 1 + (1 + (e.reshape(n, -1).shape[1] if appended else 0) if n > 1 else 0)
    assert feats.shape == (n, width)


def mvn_model(y=None):
    """y_i ~ N(mu, I_3), one 3-vector per observation (an event dim inside the plate)."""
    mu = pyro.sample("mu", dist.Normal(tensor(torch.zeros(3)), 1.0).to_event(1))
    with pyro.plate("obs_plate", 7):
        pyro.sample("y", dist.MultivariateNormal(mu, tensor(torch.eye(3))), obs=y)


def nested_event_model(y=None):
    """The plate of observations outside an inner plate of 2, each value a 3-vector: (7, 2, 3)."""
    mu = pyro.sample("mu", dist.Normal(tensor(torch.zeros(3)), 1.0).to_event(1))
    with pyro.plate("obs_plate", 7, dim=-2), pyro.plate("inner", 2, dim=-1):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


@pytest.mark.parametrize(
    "model, shape", [(mvn_model, (7, 3)), (nested_event_model, (7, 2, 3))], ids=["mvn", "nested-to_event"]
)
def test_default_features_observations_with_event_dims(model, shape):
    """The plate's axis is counted left of the site's event dims: one row per observation, never transposed."""
    y = tensor(torch.arange(float(torch.tensor(shape).prod())).reshape(shape))
    feats = default_dataset_fn(model, {"mu": tensor(torch.zeros(3))}, (), {"y": y})
    assert feats.shape == (7, y[0].numel()), (
        f"expected one row per observation (7, {y[0].numel()}), got {tuple(feats.shape)}"
    )
    assert torch.equal(feats, y.reshape(7, -1)), "row i must hold observation i's values"


def subsampled_regression_model(X, y=None):
    """regression_model with its plate of observations subsampled (10 rows per call)."""
    sigma = pyro.sample("sigma", dist.HalfNormal(tensor(1.0)))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=10) as idx:
        return pyro.sample("obs", dist.Normal(X[idx] @ w, sigma), obs=None if y is None else y[idx])


def test_default_features_read_a_subsampled_plate_whole():
    """The features of a model that subsamples its observations are those of the full data, the same on every call
    (not a fresh random minibatch of 10 rows, with the covariates dropped for their row count)."""
    X, _, y = covariates(n=40)
    latents = {"sigma": tensor(1.0), "w": tensor([1.0, 0.0])}
    full = default_dataset_fn(regression_model, latents, (X,), {"y": y})
    sub = default_dataset_fn(subsampled_regression_model, latents, (X,), {"y": y})
    assert full.shape == (40, 3) and torch.equal(sub, full)


def padded_model(X, y, keep):
    """regression_model on rows padded to a fixed count, the padding masked out with poutine.mask."""
    sigma = pyro.sample("sigma", dist.HalfNormal(tensor(1.0)))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]), pyro.poutine.mask(mask=keep):
        return pyro.sample("obs", dist.Normal(X @ w, sigma), obs=y)


def dist_masked_model(X, y, keep):
    """The same with the mask on the distribution (``dist.mask``)."""
    sigma = pyro.sample("sigma", dist.HalfNormal(tensor(1.0)))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("obs", dist.Normal(X @ w, sigma).mask(keep), obs=y)


def event_masked_model(X, y, keep):
    """The same with each observation a vector of one entry, the mask written inside ``.to_event(1)``."""
    sigma = pyro.sample("sigma", dist.HalfNormal(tensor(1.0)))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("obs", dist.Normal((X @ w)[:, None], sigma).mask(keep[:, None]).to_event(1), obs=y[:, None])


@pytest.mark.parametrize(
    "model",
    [padded_model, dist_masked_model, event_masked_model],
    ids=["poutine.mask", "dist.mask", "dist.mask inside to_event"],
)
def test_default_features_leave_out_masked_rows(model):
    """Rows that a mask removes from the log density are not observations: a padded dataset has the features of
    the unpadded one (the padding rows were encoded as observations)."""
    X, _, y = covariates(n=6)
    pad = 4
    Xp = torch.cat([X, torch.zeros(pad, X.shape[1], dtype=X.dtype, device=X.device)])
    yp = torch.cat([y, torch.zeros(pad, dtype=y.dtype, device=y.device)])
    keep = torch.arange(6 + pad, device=X.device) < 6
    latents = {"sigma": tensor(1.0), "w": tensor([1.0, 0.0])}
    unpadded = default_dataset_fn(regression_model, latents, (X,), {"y": y})
    assert torch.equal(default_dataset_fn(model, latents, (Xp, yp, keep), {}), unpadded)


def test_default_features_keep_rows_another_site_observes():
    """A row masked in one observed site but observed in another stays (it was dropped, losing the other site's
    data); the masked entry, here a NaN placeholder for a missing value, reads as 0."""

    def model(y1, y2, m1):
        mu = pyro.sample("mu", dist.Normal(tensor(0.0), 1.0))
        with pyro.plate("N", y1.shape[0]):
            pyro.sample("a", dist.Normal(mu, 1.0).mask(m1), obs=y1)
            pyro.sample("b", dist.Normal(mu, 1.0), obs=y2)

    y1, y2 = tensor([1.0, float("nan"), 3.0, 4.0]), tensor([10.0, 20.0, 30.0, 40.0])
    m1 = torch.tensor([True, False, True, False], device=y1.device)
    feats = default_dataset_fn(model, {"mu": tensor(0.0)}, (y1.nan_to_num(2.0), y2, m1), {})
    expected = tensor([[1.0, 10.0], [0.0, 20.0], [3.0, 30.0], [0.0, 40.0]])
    assert torch.equal(feats, expected)
    # a NaN placeholder is masked out of the log density, and so out of the features
    assert torch.equal(default_dataset_fn(model, {"mu": tensor(0.0)}, (y1, y2, m1), {}), expected)


def test_stream_latents_are_the_latent_sites_only():
    """sample_with_latents gave the plate's index site ('data') as a latent too, which sbc then rejects."""
    pyro.set_rng_seed(0)
    stream = PriorPredictiveStream(
        regression_model, lambda: Dataset(torch.randn(8, 3).to(tensor(0.0))), obs_kwargs={"obs": "y"}
    )
    _, latents = stream.sample_with_latents()
    assert sorted(latents) == ["sigma", "w"]


def test_stream_rejects_make_args_that_pass_the_observations():
    """make_args returning y= would make the stream hand back those fixed observations with fresh latents."""
    y = torch.zeros(8).to(tensor(0.0))
    stream = PriorPredictiveStream(
        regression_model, lambda: Dataset(torch.randn(8, 3).to(y), y=y), obs_kwargs={"obs": "y"}
    )
    with pytest.raises(
        ValueError, match="'obs' is already observed in the arguments make_args returned.*leave the observations out"
    ):
        stream.sample()


@pytest.mark.parametrize(
    "model, obs_kwargs, match",
    [
        (None, {"obs": "y"}, "model must be a callable"),
        (regression_model, "y", "obs_kwargs must be a dict mapping"),
        (regression_model, ["y"], "obs_kwargs must be a dict mapping"),
        (regression_model, {"obs": 3}, "obs_kwargs must be a dict mapping"),
    ],
)
def test_stream_checks_its_arguments(model, obs_kwargs, match):
    with pytest.raises(TypeError, match=match):
        PriorPredictiveStream(model, lambda: Dataset(torch.randn(8, 3)), obs_kwargs=obs_kwargs)


@pytest.mark.parametrize("site", ["sigma", "w"])
def test_stream_rejects_latent_obs_site(site):
    pyro.set_rng_seed(0)
    stream = PriorPredictiveStream(
        regression_model, lambda: Dataset(torch.randn(8, 3).to(tensor(0.0))), obs_kwargs={site: "y"}
    )
    with pytest.raises(
        ValueError,
        match=rf"'{site}' is a latent \(unobserved\) site of the model even with y= set"
        r".*observed site whose obs=.*'obs'",
    ):
        stream.sample()


def test_stream_checks_obs_sites_once_without_changing_the_draws():
    calls = []

    def counted(X, y=None):
        calls.append(y is None)
        return regression_model(X, y)

    make = lambda: Dataset(torch.randn(8, 3).to(tensor(0.0)))  # noqa: E731
    stream = PriorPredictiveStream(counted, make, obs_kwargs={"obs": "y"})
    pyro.set_rng_seed(0)
    (d1, l1), (d2, _) = stream.sample_with_latents(), stream.sample_with_latents()
    assert calls == [True, False, True]  # one checking run, on the first sample only
    assert (
        {"sigma", "w"} <= set(l1)
        and "obs" not in l1
        and d1.kwargs["y"].shape == (8,)
        and not torch.equal(d1.kwargs["y"], d2.kwargs["y"])
    )

    unchecked = PriorPredictiveStream(counted, make, obs_kwargs={"obs": "y"})
    unchecked._checked = True
    pyro.set_rng_seed(0)
    (e1, _), (e2, _) = unchecked.sample_with_latents(), unchecked.sample_with_latents()
    assert torch.equal(d1.kwargs["y"], e1.kwargs["y"]) and torch.equal(d2.kwargs["y"], e2.kwargs["y"])


BAD_BATCH_SIZES = [
    (0, ValueError),
    (-1, ValueError),
    (1.5, TypeError),
    (2.0, TypeError),
    (True, TypeError),
    ("4", TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize("batch_size, error", BAD_BATCH_SIZES)
def test_iterate_batches_validates_batch_size(batch_size, error):
    with pytest.raises(error, match=rf"batch_size must be an int >= 1.*got {re.escape(repr(batch_size))}"):
        iterate_batches([Dataset(tensor([1.0]))], batch_size)


@pytest.mark.parametrize("batch_size, error", BAD_BATCH_SIZES)
def test_stream_batches_validates_batch_size(batch_size, error):
    stream = PriorPredictiveStream(
        regression_model, lambda: Dataset(torch.randn(4, 2).to(tensor(0.0))), obs_kwargs={"obs": "y"}
    )
    with pytest.raises(error, match=rf"batch_size must be an int >= 1.*got {re.escape(repr(batch_size))}"):
        stream.batches(batch_size)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 7])
def test_iterate_batches_cycles_in_full_batches(batch_size):
    """Every batch is full (the whole collection when it is smaller) and holds distinct datasets; over 2 * 3 * 5 * 7
    batches' worth of passes every dataset is used equally often."""
    items = [Dataset(tensor([float(i)])) for i in range(5)]
    batches = iterate_batches(items, batch_size)
    size = min(batch_size, 5)
    drawn = [[int(d.args[0]) for d in next(batches)] for _ in range(5 * 42 // size)]
    assert all(len(b) == size and len(set(b)) == size for b in drawn), drawn
    assert torch.bincount(torch.tensor(sum(drawn, [])), minlength=5).tolist() == [42] * 5
    stream = PriorPredictiveStream(
        regression_model, lambda: Dataset(torch.randn(4, 2).to(tensor(0.0))), obs_kwargs={"obs": "y"}
    )
    assert len(next(stream.batches(batch_size))) == batch_size


def test_dataset_cache_is_emptied_when_its_tensors_change():
    X, y = tensor(torch.ones(3, 1)), tensor(torch.zeros(3))
    d = Dataset(X, y=y)
    d.cache["k"] = 1
    assert d.cache == {"k": 1}, "unchanged data keep the cache"
    y.add_(1.0)
    assert d.cache == {}, "an in-place change empties it"
    d.cache["k"] = 2
    d.kwargs["y"] = y.clone()
    assert d.cache == {}, "a replaced argument empties it"
