"""Tests for the ArviZ export (pyro_stein.arviz)."""

import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_stein import Dataset, MomentCorrection
from pyro_stein.arviz import to_inference_data, to_inference_data_batch

from .conftest import DEVICE, DTYPE

az = pytest.importorskip("arviz")

J, K = 8, 4
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
Z = [[1.2, 0.4], [2.0, 1.1], [0.3, 1.9], [1.5, 0.8]]


def model(sigma, y=None, z=None):
    """Eight schools plus a second observed site with an event dimension."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(sigma.new_tensor(5.0)))
    with pyro.plate("school", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.deterministic("delta", theta - mu)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
    with pyro.plate("extra", K):
        loc = mu[..., None].expand(mu.shape + (2,))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1), obs=z)


def unvectorizable_model(sigma, y=None, z=None):
    """Same density, but ``.expand([2])`` breaks an extra outer batch dimension."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(sigma.new_tensor(5.0)))
    with pyro.plate("school", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
    with pyro.plate("extra", K):
        pyro.sample("z", dist.Normal(mu, 1.0).expand([2]).to_event(1), obs=z)


def _t(x):
    return torch.tensor(x, dtype=DTYPE, device=DEVICE)


@pytest.fixture(scope="module")
def fitted():
    """AutoNormal fitted once per module (its parameters live in the module, so they survive
    the per-test param-store reset)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        data = dict(sigma=_t(SIGMA), y=_t(Y), z=_t(Z))
        guide = AutoNormal(model, init_scale=0.1)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        for _ in range(150):
            svi.step(**data)
    finally:
        torch.set_default_dtype(old)
    return guide, data


def _export(fitted, **kw):
    guide, data = fitted
    kw.setdefault("num_samples", 40)
    return to_inference_data(guide, model, data["sigma"], y=data["y"], z=data["z"], **kw)


def _groups(idata):
    return set(idata.groups()) if hasattr(idata, "groups") else set(idata.children)


def _attrs(idata):
    return dict(idata["posterior"].attrs)


def test_groups_shapes_and_plate_dims(fitted):
    idata = _export(fitted, num_chains=2)
    assert _groups(idata) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    post = idata["posterior"]
    assert set(post.data_vars) == {"mu", "tau", "theta", "delta"}
    assert post["mu"].dims == ("chain", "draw") and post["mu"].shape == (2, 40)
    assert post["theta"].dims == ("chain", "draw", "school") and post["theta"].shape == (2, 40, 8)
    assert post["delta"].dims == ("chain", "draw", "school")
    # theta - mu in the model's dtype: rounding of a difference, bounded by eps times the operands' size
    eps = np.finfo(post["theta"].dtype).eps
    np.testing.assert_allclose(
        post["delta"],
        post["theta"] - post["mu"],
        rtol=0,
        atol=4 * eps * float(abs(post["theta"]).max() + abs(post["mu"]).max()),
    )
    assert (post["tau"] > 0).all()

    pp, ll = idata["posterior_predictive"], idata["log_likelihood"]
    assert set(pp.data_vars) == set(ll.data_vars) == {"y", "z"}
    assert pp["y"].dims == ("chain", "draw", "school")
    assert pp["z"].dims == ("chain", "draw", "extra", "z_dim_1") and pp["z"].shape == (2, 40, 4, 2)
    assert ll["y"].shape == (2, 40, 8) and ll["z"].dims == ("chain", "draw", "extra")
    assert np.isfinite(ll["y"]).all() and np.isfinite(ll["z"]).all()
    # simulated data differ from draw to draw (they are not the observations)
    assert float(pp["y"].std(("chain", "draw")).min()) > 1.0

    obs = idata["observed_data"]
    np.testing.assert_array_equal(obs["y"], np.asarray(Y, dtype=obs["y"].dtype))  # the data as given, in its dtype
    np.testing.assert_array_equal(obs["z"], np.asarray(Z, dtype=obs["z"].dtype))
    assert obs["z"].dims == ("extra", "z_dim_1")
    assert idata["sample_stats"]["lp"].shape == (2, 40)

    attrs = _attrs(idata)
    assert attrs["inference_library"] == "pyro"
    assert attrs["inference_library_version"] == pyro.__version__
    assert attrs["inference_method"] == "AutoNormal"
    assert attrs["torch_version"] == torch.__version__
    assert isinstance(attrs["pyro_stein_version"], str) and attrs["pyro_stein_version"]


def test_log_likelihood_and_lp_match_hand_computation(fitted):
    idata = _export(fitted, num_chains=2, num_samples=10)
    _, data = fitted
    post = idata["posterior"]
    for c, d in [(0, 0), (1, 7)]:
        mu = _t(post["mu"].values[c, d])
        tau = _t(post["tau"].values[c, d])
        theta = _t(post["theta"].values[c, d])
        ll_y = dist.Normal(theta, data["sigma"]).log_prob(data["y"])
        ll_z = dist.Normal(mu, 1.0).log_prob(data["z"]).sum(-1)
        np.testing.assert_allclose(idata["log_likelihood"]["y"].values[c, d], ll_y.cpu(), rtol=1e-6)
        np.testing.assert_allclose(idata["log_likelihood"]["z"].values[c, d], ll_z.cpu(), rtol=1e-6)
        lp = (
            dist.Normal(mu.new_tensor(0.0), 5.0).log_prob(mu)
            + dist.HalfNormal(tau.new_tensor(5.0)).log_prob(tau)
            + dist.Normal(mu, tau).log_prob(theta).sum()
            + ll_y.sum()
            + ll_z.sum()
        )
        np.testing.assert_allclose(idata["sample_stats"]["lp"].values[c, d], lp.cpu(), rtol=1e-6)


def test_user_coords_and_dims_override(fitted):
    names = [f"s{i}" for i in range(J)]
    idata = _export(
        fitted,
        coords={"school": names, "pair": ["a", "b", "c", "d"]},
        dims={"z": ["pair", "component"], "delta": ["school_delta"]},
        constant_data={"sigma": fitted[1]["sigma"]},
    )
    assert list(idata["posterior"]["theta"].coords["school"].values) == names
    assert idata["posterior"]["delta"].dims == ("chain", "draw", "school_delta")
    assert idata["observed_data"]["z"].dims == ("pair", "component")
    assert idata["log_likelihood"]["z"].dims == ("chain", "draw", "pair")
    assert list(idata["log_likelihood"]["z"].coords["pair"].values) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(idata["constant_data"]["sigma"], SIGMA)


# A briefly trained AutoNormal can give loo/waic reliability warnings; they are not at issue.
@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto:UserWarning")
@pytest.mark.filterwarnings("ignore:For one or more samples the posterior variance:UserWarning")
def test_summary_loo_waic_run(fitted):
    idata = _export(fitted, num_chains=2, num_samples=100)
    summary = az.summary(idata)
    assert {"mu", "tau", "theta[0]", "delta[7]"} <= set(summary.index)
    assert np.isfinite(summary["r_hat"]).all()
    loo = az.loo(idata, var_name="y")
    assert np.isfinite(loo["elpd_loo"]) and loo["n_data_points"] == J
    if hasattr(az, "waic"):  # ArviZ 1.x dropped WAIC
        waic = az.waic(idata, var_name="z")
        assert np.isfinite(waic["elpd_waic"]) and waic["n_data_points"] == K


def test_netcdf_round_trip(fitted, tmp_path):
    pytest.importorskip("h5netcdf")
    idata = _export(fitted, num_chains=2, coords={"school": list("abcdefgh")})
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path), engine="h5netcdf")
    back = az.from_netcdf(str(path), engine="h5netcdf")
    assert _groups(back) == _groups(idata)
    for group in _groups(idata):
        for name, var in idata[group].data_vars.items():
            np.testing.assert_array_equal(back[group][name].values, var.values)
            assert back[group][name].dims == var.dims
    assert list(back["posterior"]["theta"].coords["school"].values) == list("abcdefgh")
    assert _attrs(back)["inference_method"] == "AutoNormal"


def test_num_chains_are_independent_batches(fitted):
    pyro.set_rng_seed(1)
    idata = _export(fitted, num_chains=3, num_samples=200)
    post = idata["posterior"]
    assert post.sizes["chain"] == 3 and post.sizes["draw"] == 200
    assert not np.allclose(post["mu"].values[0], post["mu"].values[1])
    # i.i.d. draws: R-hat ~ 1 and bulk ESS ~ number of draws
    assert float(az.rhat(post)["mu"]) < 1.05
    assert float(az.ess(post)["mu"]) > 300


def test_fallback_to_loop_for_unvectorizable_model(fitted):
    guide, data = fitted
    args = (data["sigma"],)
    kwargs = dict(y=data["y"], z=data["z"], num_samples=5, num_chains=2)
    with pytest.raises(RuntimeError):
        to_inference_data(guide, unvectorizable_model, *args, parallel=True, **kwargs)
    for parallel in (None, False):
        idata = to_inference_data(guide, unvectorizable_model, *args, parallel=parallel, **kwargs)
        post, ll = idata["posterior"], idata["log_likelihood"]
        assert post["theta"].shape == (2, 5, 8)
        assert idata["posterior_predictive"]["z"].shape == (2, 5, 4, 2)
        mu = _t(post["mu"].values[1, 3])
        expected = dist.Normal(mu, 1.0).log_prob(data["z"]).sum(-1)
        np.testing.assert_allclose(ll["z"].values[1, 3], expected.cpu(), rtol=1e-6)


class _FixedDraws:
    """A guide with fixed draws, through the ``sample_posterior`` fast path."""

    def __init__(self, draws):
        self.draws = draws

    def __call__(self, *args, **kwargs):  # pragma: no cover - never called by the export
        raise AssertionError("the export should use sample_posterior")

    def sample_posterior(self, num_samples, *args, **kwargs):
        return {k: v[:num_samples] for k, v in self.draws.items()}


def test_default_export_loops_when_the_model_mixes_draws_under_the_plate():
    """``w.sum()`` is right for one draw; under the draws plate it sums every draw's weights and raises nothing,
    so the vectorised export gave each draw the same total (and wrong likelihoods). The default compares with the
    loop at two draws and falls back to it; the values are then the hand-computed ones."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, generator=g).to(DEVICE, DTYPE), torch.randn(5, generator=g).to(DEVICE, DTYPE)

    def summing_model(y):
        w = pyro.sample("w", dist.Normal(y.new_zeros(3), 1.0).to_event(1))
        pyro.deterministic("w_total", w.sum())
        with pyro.plate("N", 5):
            pyro.sample("y", dist.Normal(w.sum() + x, 1.0), obs=y)

    w = torch.randn(4, 3, generator=g).to(DEVICE, DTYPE)
    idata = to_inference_data(_FixedDraws({"w": w}), summing_model, y, num_samples=4, posterior_predictive=False)
    total = w.sum(-1)
    ll = dist.Normal(total[:, None] + x, 1.0).log_prob(y)
    np.testing.assert_allclose(idata["posterior"]["w_total"].values[0], total.cpu(), rtol=1e-6)
    np.testing.assert_allclose(idata["log_likelihood"]["y"].values[0], ll.cpu(), rtol=1e-6)
    lp = dist.Normal(0.0, 1.0).log_prob(w).sum(-1) + ll.sum(-1)
    np.testing.assert_allclose(idata["sample_stats"]["lp"].values[0], lp.cpu(), rtol=1e-6)


def test_a_deterministic_site_with_event_dims_gets_its_plate_dim():
    """``pyro.deterministic(..., event_dim=1)`` in a plate of 3 with 3-vectors: the plate is axis 0 (it was named on
    the event axis, the sizes being equal)."""

    def vector_model(y):
        with pyro.plate("group", 3):
            a = pyro.sample("a", dist.Normal(y.new_zeros(()), 1.0))
            pyro.deterministic("abc", torch.stack([a, 2 * a, 3 * a], -1), event_dim=1)
            pyro.sample("y", dist.Normal(a, 1.0), obs=y)

    y = torch.zeros(3, device=DEVICE, dtype=DTYPE)
    a = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    idata = to_inference_data(_FixedDraws({"a": a}), vector_model, y, num_samples=5)
    assert idata["posterior"]["abc"].dims == ("chain", "draw", "group", "abc_dim_1")
    np.testing.assert_allclose(idata["posterior"]["abc"].values[0, :, :, 2], 3 * a.cpu(), rtol=1e-12)


def test_optional_groups_and_no_observations(fitted):
    idata = _export(fitted, log_likelihood=False, posterior_predictive=False)
    assert _groups(idata) == {"posterior", "sample_stats", "observed_data"}
    guide, data = fitted
    prior_only = to_inference_data(guide, model, data["sigma"], num_samples=5)
    assert _groups(prior_only) == {"posterior", "sample_stats"}


class _FakeAmortizedGuide:
    """A guide whose ``sample_posterior`` draws depend on the dataset (like an amortized
    guide); it has no ``__call__`` body usable by Predictive, so the fast path must be used."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):  # pragma: no cover - never called by the export
        raise AssertionError("the export should use sample_posterior")

    def sample_posterior(self, num_samples, sigma, y=None, z=None):
        self.calls += 1
        mu = y.mean() + 0.01 * torch.randn(num_samples, dtype=y.dtype, device=y.device)
        tau = torch.ones(num_samples, dtype=y.dtype, device=y.device)
        theta = mu[:, None] + 0.1 * torch.randn(num_samples, J, dtype=y.dtype, device=y.device)
        return {"mu": mu, "tau": tau, "theta": theta}


def test_batch_export_with_sample_posterior_fast_path():
    guide = _FakeAmortizedGuide()
    sigma = _t(SIGMA)
    # a pyro_stein.Dataset and an (args, kwargs) pair are both accepted, and numpy integer counts
    datasets = [Dataset(sigma, y=_t(Y), z=_t(Z)), ((sigma,), {"y": _t(Y) + 100.0, "z": _t(Z)})]
    out = to_inference_data_batch(
        guide,
        model,
        datasets,
        num_samples=np.int64(10),
        num_chains=2,
        constant_data=[{"shift": np.array(0.0)}, {"shift": np.array(100.0)}],
    )
    assert isinstance(out, list) and len(out) == 2
    assert guide.calls == 4  # one sampler call per chain per dataset
    for i, idata in enumerate(out):
        assert _attrs(idata)["dataset_index"] == i
        assert _attrs(idata)["inference_method"] == "_FakeAmortizedGuide"
        assert idata["posterior"]["theta"].shape == (2, 10, 8)
        mean_y = float(np.mean(idata["observed_data"]["y"]))
        np.testing.assert_allclose(idata["posterior"]["mu"].mean(), mean_y, atol=0.1)
        np.testing.assert_allclose(idata["posterior"]["delta"].std(), 0.1, atol=0.05)
        assert idata["constant_data"]["shift"].values.ravel()[0] == 100.0 * i


def test_missing_arviz_raises_clear_import_error(fitted, monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r'pip install "pyro_stein\[arviz\]"'):
        _export(fitted)


def test_argument_validation(fitted):
    guide, data = fitted
    with pytest.raises(ValueError, match="num_samples"):
        _export(fitted, num_samples=0)
    with pytest.raises(TypeError, match="num_chains"):
        _export(fitted, num_chains=1.5)
    with pytest.raises(TypeError, match="dims"):
        _export(fitted, dims=["school"])
    with pytest.raises(TypeError, match="guide"):
        to_inference_data(None, model, data["sigma"])
    with pytest.raises(TypeError, match=r"datasets\[0\]"):
        to_inference_data_batch(guide, model, [(data["sigma"],)])
    with pytest.raises(TypeError, match="datasets"):
        to_inference_data_batch(guide, model, {"a": 1})
    with pytest.raises(TypeError, match="unknown option"):
        to_inference_data_batch(guide, model, [], num_sample=3)


def test_arviz_1x_calling_convention(fitted, monkeypatch):
    """ArviZ >= 1.0 takes ``from_dict(data: {group: {var: array}}, ..., attrs={group: {...}})``
    and returns a DataTree; check that branch with a stub module (ArviZ 1.x needs Python 3.12)."""
    calls = {}

    def from_dict(data, *, coords=None, dims=None, attrs=None, **kwargs):
        calls.update(data=data, coords=coords, dims=dims, attrs=attrs)
        return "datatree"

    stub = type(sys)("arviz")
    stub.from_dict = from_dict
    monkeypatch.setitem(sys.modules, "arviz", stub)
    assert _export(fitted, num_chains=2, coords={"school": list("abcdefgh")}) == "datatree"
    data = calls["data"]
    assert set(data) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    assert data["posterior"]["theta"].shape == (2, 40, 8)
    assert data["log_likelihood"]["z"].shape == (2, 40, 4)
    assert calls["dims"]["theta"] == ["school"]
    assert calls["coords"] == {"school": list("abcdefgh")}
    assert set(calls["attrs"]) == set(data) | {"/"}
    assert calls["attrs"]["/"]["inference_library"] == "pyro"
    assert calls["attrs"]["posterior"]["inference_method"] == "AutoNormal"


@pytest.mark.parametrize("parallel", [True, False])
def test_model_reusing_deterministic_value_in_plate(parallel):
    """posterior_predictive re-simulates data sites only; a pyro.deterministic value used inside a
    plate keeps its recomputed value (regression: it used to be re-sampled and broadcast)."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0], dtype=DTYPE, device=DEVICE)
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0], dtype=DTYPE, device=DEVICE)

    def model(sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=DTYPE, device=DEVICE), 5.0))
        with pyro.plate("school", 4):
            t = pyro.sample("t", dist.Normal(torch.tensor(0.0, dtype=DTYPE, device=DEVICE), 1.0))
            theta = pyro.deterministic("theta", mu + t)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(5):
        svi.step(sigma, y)
    idata = to_inference_data(guide, model, sigma, y=y, num_samples=20, num_chains=2, parallel=parallel)
    assert idata.posterior_predictive["y"].shape == (2, 20, 4)
    assert idata.posterior["theta"].shape == (2, 20, 4)


# --- subsampled plates: every group is computed on the full data ------------------------------

N_FULL, N_SUB = 60, 10


def _subsampled_model(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(y.new_tensor(2.0)))
    with pyro.plate("data", len(y), subsample_size=N_SUB, device=y.device) as idx:
        pyro.sample("y", dist.Normal(mu, sigma), obs=y[idx])


def _fit_subsampled(model, *args, steps=10):
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_scale=0.1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return guide


def _y_full():
    return 2.0 + torch.randn(N_FULL, generator=torch.Generator().manual_seed(3), dtype=DTYPE).to(DEVICE)


@pytest.mark.parametrize("parallel", [True, False])
def test_subsampled_plate_log_likelihood_and_lp_use_full_data(parallel):
    """Regression: the pointwise log-likelihood used to be computed on a random subsample of the
    rows (not those of observed_data) and lp was a rescaled minibatch estimate."""
    y = _y_full()
    guide = _fit_subsampled(_subsampled_model, y)
    idata = to_inference_data(guide, _subsampled_model, y, num_samples=6, num_chains=2, parallel=parallel)
    np.testing.assert_array_equal(idata["observed_data"]["y"].values, y.cpu().numpy())
    mu = torch.as_tensor(idata["posterior"]["mu"].values, dtype=DTYPE, device=DEVICE)
    sigma = torch.as_tensor(idata["posterior"]["sigma"].values, dtype=DTYPE, device=DEVICE)
    expected = dist.Normal(mu[..., None], sigma[..., None]).log_prob(y)  # (chain, draw, N_FULL)
    tol = dict(rtol=1e-12, atol=1e-12) if DTYPE == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    ll = idata["log_likelihood"]["y"]
    assert ll.dims == ("chain", "draw", "data") and ll.shape == (2, 6, N_FULL)
    np.testing.assert_allclose(ll.values, expected.cpu().numpy(), **tol)
    np.testing.assert_allclose(ll.values.sum(-1), expected.sum(-1).cpu().numpy(), **tol)
    lp = (
        dist.Normal(mu.new_tensor(0.0), 5.0).log_prob(mu)
        + dist.HalfNormal(mu.new_tensor(2.0)).log_prob(sigma)
        + expected.sum(-1)  # unscaled: the full-data log joint, not N/n times a minibatch
    )
    np.testing.assert_allclose(idata["sample_stats"]["lp"].values, lp.cpu().numpy(), **tol)


def test_subsampled_plate_groups_have_the_rows_of_observed_data():
    from pyro.poutine.subsample_messenger import SubsampleMessenger

    original = SubsampleMessenger.__dict__["_subsample"]
    y = _y_full()
    guide = _fit_subsampled(_subsampled_model, y)
    idata = to_inference_data(guide, _subsampled_model, y, num_samples=5)
    n_obs = idata["observed_data"].sizes["data"]
    assert n_obs == N_FULL
    assert idata["log_likelihood"].sizes["data"] == n_obs
    assert idata["posterior_predictive"]["y"].shape == (1, 5, n_obs)
    # the plate is patched for the export only: afterwards the model subsamples again
    assert SubsampleMessenger.__dict__["_subsample"] is original
    trace = pyro.poutine.trace(_subsampled_model).get_trace(y)
    assert trace.nodes["y"]["value"].shape == (N_SUB,)


def test_subsampled_plate_with_local_latents_and_presubsampled_data():
    y = _y_full()

    def local_model(y):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
        with pyro.plate("data", len(y), subsample_size=N_SUB, device=y.device) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])

    guide = _fit_subsampled(local_model, y, steps=3)
    idata = to_inference_data(guide, local_model, y, num_samples=4)
    assert idata["posterior"]["z"].shape == (1, 4, N_FULL)
    z = torch.as_tensor(idata["posterior"]["z"].values[0], dtype=DTYPE, device=DEVICE)
    np.testing.assert_allclose(
        idata["log_likelihood"]["y"].values[0], dist.Normal(z, 1.0).log_prob(y).cpu().numpy(), rtol=1e-6
    )

    def batch_model(y_batch, idx):  # only the minibatch is passed: no full data to evaluate
        mu = pyro.sample("mu", dist.Normal(y_batch.new_tensor(0.0), 5.0))
        with pyro.plate("data", N_FULL, subsample=idx):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y_batch)

    idx = torch.arange(N_SUB, device=DEVICE)
    guide = _fit_subsampled(batch_model, y[idx], idx, steps=1)
    with pytest.raises(ValueError, match="full data"):
        to_inference_data(guide, batch_model, y[idx], idx, num_samples=3)


def test_export_with_an_improper_uniform_prior():
    """The export reads the model's structure without sampling its priors, so an ImproperUniform site (which the
    guide supports) exports; its posterior draws and log-likelihood are those of the guide."""
    pytest.importorskip("arviz")
    from pyro_stein import AmortizedSteinGuide

    def flat_model(x):
        m = pyro.sample("m", dist.ImproperUniform(dist.constraints.real, (), ()))
        with pyro.plate("n", x.shape[0]):
            pyro.sample("x", dist.Normal(m, 1.0), obs=x)

    x = _t(np.linspace(-1.0, 3.0, 12))
    idata = to_inference_data(
        AmortizedSteinGuide(flat_model, postprocess=[MomentCorrection()]), flat_model, x, num_samples=200
    )
    assert idata["posterior"]["m"].shape == (1, 200)
    # one correction round makes the (Gaussian) posterior N(mean x, 1/12) exact from the untrained sampler
    np.testing.assert_allclose(float(idata["posterior"]["m"].mean()), float(x.mean()), atol=5 / np.sqrt(12 * 200))
    assert idata["log_likelihood"]["x"].shape == (1, 200, 12)


@pytest.mark.parametrize("r", [1.0, 0.3])
def test_stein_attributes_flag_draws_that_are_too_narrow(r):
    """Exact draws of a conjugate posterior (r = 1) against draws 0.3 times as wide: the Stein identity attributes
    are about 1 (Monte Carlo error about 0.06 at 1,000 draws in one dimension) and about 0.09."""
    y = _t([0.5, 1.5, -0.2, 0.9])

    def conjugate(y):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
        with pyro.plate("obs", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        pyro.sample("mu", dist.Normal(y.sum() / 5, r * 5**-0.5))

    pyro.set_rng_seed(0)
    attrs = _attrs(to_inference_data(guide, conjugate, y, num_samples=1000))
    low, high = attrs["stein_identity_min"], attrs["stein_identity_max"]
    if r == 1.0:
        assert 0.8 < low <= high < 1.2, (low, high)
        assert abs(attrs["stein_discrepancy"]) < 0.05
    else:
        assert high < 0.25, f"draws 0.3 times as wide must be flagged: {low}, {high}"


def test_a_guide_with_a_density_exports_its_pareto_khat_and_log_evidence():
    """A flow guide on a conjugate Gaussian model, initialised at its exact Laplace approximation (the posterior):
    every importance weight is the evidence, so k-hat is small and the log evidence is exact (to rounding)."""
    from pyro_stein import AmortizedSteinGuide
    from pyro_stein.flows import FlowSampler

    y = _t([0.5, 1.5, -0.2, 0.9])

    def conjugate(y):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
        with pyro.plate("obs", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = AmortizedSteinGuide(conjugate, sampler=FlowSampler(1).to(device=DEVICE, dtype=DTYPE)).setup(y)
    # the evidence: y ~ N(0, I + 1 1^T)
    cov = torch.eye(4, dtype=DTYPE, device=DEVICE) + 1.0
    exact = float(dist.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y))
    pyro.set_rng_seed(0)
    attrs = _attrs(to_inference_data(guide, conjugate, y, num_samples=200))
    tol = 1e-8 if DTYPE == torch.float64 else 1e-3
    assert abs(attrs["log_evidence"] - exact) < tol, (attrs["log_evidence"], exact)
    assert attrs["pareto_khat"] <= 0.7 and attrs["log_evidence_se"] < tol

    def plain(y):  # a guide without a density: no such attributes
        pyro.sample("mu", dist.Normal(y.sum() / 5, 5**-0.5))

    assert "pareto_khat" not in _attrs(to_inference_data(plain, conjugate, y, num_samples=50))
