"""Reference posterior zoo (benchmarks.models) and accuracy metrics (benchmarks.metrics)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from pyro import poutine

# benchmarks/ is not part of the installed package: import it from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metrics import c2st, mmd_rbf, sd_ratio, standardized_mean_error
from benchmarks.models import (
    SBIBM_TASKS,
    bernoulli_glm_summary,
    data_dir,
    gaussian_linear_posterior,
    load_posteriordb,
    load_sbibm,
    sbibm_model,
)

EXPECTED_NAMES = {
    "eight_schools-eight_schools_noncentered": [f"theta[{i}]" for i in range(1, 9)] + ["mu", "tau"],
    "sblrc-blr": [f"beta[{i}]" for i in range(1, 6)] + ["sigma"],
    "kidiq-kidscore_interaction": [f"beta[{i}]" for i in range(1, 5)] + ["sigma"],
    "arK-arK": ["alpha"] + [f"beta[{i}]" for i in range(1, 6)] + ["sigma"],
    "gp_pois_regr-gp_regr": ["rho", "alpha", "sigma"],
}


def _log_joint(rp, i):
    draw = {k: v[i] for k, v in rp.draws.items()}
    trace = poutine.trace(poutine.condition(rp.model, data=draw)).get_trace(*rp.args, **rp.kwargs)
    return trace.log_prob_sum()


@pytest.fixture(autouse=True)
def _point_at_shared_data(shared_data, monkeypatch):
    monkeypatch.setenv("PYRO_STEIN_SHARED_DATA", str(shared_data))


@pytest.mark.parametrize("name", list(EXPECTED_NAMES))  # the others: tests/test_posteriordb_models.py
def test_posteriordb_loads_and_log_joint_finite(name):
    rp = load_posteriordb(name)
    assert rp.param_names == EXPECTED_NAMES[name]
    flat = rp.flat_draws()
    assert flat.shape == (10000, len(EXPECTED_NAMES[name]))
    assert flat.dtype == torch.float64
    for i in (0, 1234, 5000, 9999):
        assert torch.isfinite(_log_joint(rp, i)), f"{name}: log joint not finite at reference draw {i}"
    # the model's sites have exactly the reference draws' shapes
    trace = poutine.trace(poutine.condition(rp.model, data={k: v[0] for k, v in rp.draws.items()})).get_trace(
        *rp.args, **rp.kwargs
    )
    for site, value in rp.draws.items():
        assert trace.nodes[site]["value"].shape == value.shape[1:], site


def test_flatten_column_order():
    rp = load_posteriordb("eight_schools-eight_schools_noncentered")
    flat = rp.flat_draws()
    assert torch.equal(flat[:, :8], rp.draws["theta"])
    assert torch.equal(flat[:, 8], rp.draws["mu"]) and torch.equal(flat[:, 9], rp.draws["tau"])
    # theta_trans is the latent site; theta = mu + tau * theta_trans is recovered exactly
    rebuilt = rp.draws["mu"][:, None] + rp.draws["tau"][:, None] * rp.draws["theta_trans"]
    assert torch.allclose(rebuilt, rp.draws["theta"])
    with pytest.raises(ValueError, match="lack sites"):
        rp.flatten({"mu": rp.draws["mu"]})


def test_bad_names():
    with pytest.raises(ValueError, match="valid names"):
        load_posteriordb("nope")
    with pytest.raises(ValueError, match="valid tasks"):
        sbibm_model("nope")
    with pytest.raises(ValueError, match="1..10"):
        load_sbibm("gaussian_linear", 11)


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_STEIN_SHARED_DATA", str(tmp_path))
    assert data_dir() == tmp_path


@pytest.mark.parametrize("task", SBIBM_TASKS)
@pytest.mark.parametrize("num_observation", [1, 10])
def test_sbibm_loads_and_log_joint_finite(task, num_observation):
    rp = load_sbibm(task, num_observation)
    assert rp.param_names == [f"theta[{i}]" for i in range(1, 11)]
    assert rp.flat_draws().shape == (10000, 10)
    assert rp.kwargs["obs"].shape == ((10,) if task == "gaussian_linear" else (100,))
    for i in (0, 4321, 9999):
        assert torch.isfinite(_log_joint(rp, i))


@pytest.mark.parametrize("task", SBIBM_TASKS)
def test_sbibm_simulator(task):
    model = sbibm_model(task)
    trace = poutine.trace(model).get_trace()
    assert trace.nodes["theta"]["value"].shape == (10,)
    x = trace.nodes["x"]["value"]
    assert x.shape == ((10,) if task == "gaussian_linear" else (100,))
    if task == "bernoulli_glm":
        assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_bernoulli_glm_summary_matches_observation(shared_data):
    import numpy as np

    folder = shared_data / "sbibm" / "bernoulli_glm" / "num_observation_1"
    stats = torch.as_tensor(np.loadtxt(folder / "observation.csv", delimiter=",", skiprows=1))
    y = load_sbibm("bernoulli_glm", 1).kwargs["obs"]
    assert torch.allclose(bernoulli_glm_summary(y), stats, atol=1e-4)


@pytest.mark.parametrize("num_observation", [1, 5, 10])
def test_gaussian_linear_analytic_posterior(num_observation):
    rp = load_sbibm("gaussian_linear", num_observation)
    mean, cov = gaussian_linear_posterior(rp.kwargs["obs"])
    draws = rp.draws["theta"]
    n = draws.shape[0]
    sd = cov.diagonal().sqrt()
    # mean: standard error sd/sqrt(n) per coordinate
    z_mean = (draws.mean(0) - mean) / (sd / math.sqrt(n))
    assert z_mean.abs().max() < 5, f"sample mean off by {z_mean.abs().max():.2f} > 5 standard errors (n={n})"
    # covariance entries: for Gaussian draws se(cov_ij) = sqrt((s_ii s_jj + s_ij^2) / n)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    z_cov = (torch.cov(draws.T) - cov) / se_cov
    assert z_cov.abs().max() < 5, f"sample covariance off by {z_cov.abs().max():.2f} > 5 standard errors (n={n})"


def test_c2st_same_and_different():
    from threadpoolctl import threadpool_limits

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)
    # Early stopping keeps this fast: sbibm's exact definition (the default) runs all 1000 epochs per fold
    # on indistinguishable samples. One BLAS thread is faster for these tiny networks.
    with threadpool_limits(1):
        same = c2st(a, b, early_stopping=True)
        different = c2st(a, b + 4.0, early_stopping=True)
    assert 0.4 < same < 0.6, same
    assert different > 0.95, different


def test_moment_metrics_and_mmd():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(4000, 2, generator=g)
    approx = 2.0 * torch.randn(4000, 2, generator=g) + torch.tensor([1.0, 0.0])
    sme, ratio = standardized_mean_error(ref, approx), sd_ratio(ref, approx)
    assert sme.shape == ratio.shape == (2,)
    assert abs(sme[0] - 1.0) < 0.1 and sme[1] < 0.1
    assert torch.allclose(ratio, torch.full((2,), 2.0), atol=0.1)
    x, y = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g)
    assert abs(mmd_rbf(x, y)) < 0.02
    assert mmd_rbf(x, y + 2.0) > 0.3


def _schools_moments_dense(sigma, y, num_grid=40_001):
    """The same posterior moments by another route: a linear grid over tau, and for each tau the joint Gaussian
    of (mu, theta) conditioned on y with dense linear algebra (no conjugacy shortcuts)."""
    J = sigma.shape[0]
    tau = torch.linspace(1e-9, 60.0, num_grid, dtype=torch.float64)[:, None, None]
    # prior covariance of x = (mu, theta_1..J): Var mu = 25, Cov(theta_i, theta_j) = 25 + tau^2 [i == j]
    C = torch.full((J + 1, J + 1), 25.0, dtype=torch.float64) + tau**2 * torch.diag(
        torch.tensor([0.0] + [1.0] * J, dtype=torch.float64)
    )
    S = C[:, 1:, 1:] + torch.diag(sigma**2)  # y = theta + noise
    K = C[:, :, 1:] @ torch.linalg.inv(S)
    mean = (K @ y[:, None])[..., 0]
    var = torch.diagonal(C - K @ C[:, 1:, :], dim1=-2, dim2=-1)
    log_w = torch.distributions.MultivariateNormal(torch.zeros(J, dtype=torch.float64), S).log_prob(y)
    log_w = log_w - tau[:, 0, 0] ** 2 / 50.0
    w = torch.exp(log_w - log_w.max())
    w[0], w[-1] = w[0] / 2, w[-1] / 2
    w = (w / w.sum())[:, None]
    t = tau[:, 0]
    e, e_t = (w * mean).sum(0), (w * t).sum(0)
    sd = ((w * (var + mean**2)).sum(0) - e**2).sqrt()
    sd_t = ((w * t**2).sum(0) - e_t**2).sqrt()
    return torch.cat([e[:1], e_t, e[1:]]), torch.cat([sd[:1], sd_t, sd[1:]])


@pytest.mark.parametrize("J", [5, 12])
def test_schools_exact_moments_match_dense_quadrature(J):
    """Family (b)'s exact reference (benchmarks.amortized.schools_exact_moments: conjugate in mu and theta given tau,
    quadrature over log tau) agrees with a dense-Gaussian computation on a linear tau grid."""
    from benchmarks.amortized import schools_exact_moments

    g = torch.Generator().manual_seed(J)
    sigma = 5 + 15 * torch.rand(J, generator=g, dtype=torch.float64)
    y = 3.0 + 12.0 * torch.randn(J, generator=g, dtype=torch.float64)
    mean, sd = schools_exact_moments(sigma, y)
    mean_d, sd_d = _schools_moments_dense(sigma, y)
    assert mean.shape == (J + 2,) and sd.shape == (J + 2,)
    # both are deterministic quadratures; they differ by ~1e-6 sd (the dense one's linear-grid trapezoid error)
    assert ((mean - mean_d).abs() / sd).max() < 1e-5, "posterior means differ between the two quadratures"
    assert ((sd / sd_d) - 1).abs().max() < 1e-5, "posterior sds differ between the two quadratures"


def _logistic_moments_dense(X, y, num_t=300, num_w=81):
    """Posterior moments of ``(s, w)`` for benchmarks.amortized.logistic_model with ``k <= 2`` real columns, by a
    uniform grid over ``(log s, w_raw)`` (a Riemann sum; t in [-12, 2.5], each w_raw in [-7, 7])."""
    k = X.shape[1]
    t = torch.linspace(-12.0, 2.5, num_t, dtype=torch.float64)
    w1 = torch.linspace(-7.0, 7.0, num_w, dtype=torch.float64)
    w = torch.cartesian_prod(*([w1] * k)).reshape(-1, k)
    s = t.exp()[:, None, None]
    xw = w @ X.T  # (num_w^k, n)
    log_lik = torch.stack([(y * e - torch.nn.functional.softplus(e)).sum(-1) for e in s * xw])  # (num_t, num_w^k)
    log_p = -0.5 * s[..., 0] ** 2 + t[:, None] - 0.5 * (w**2).sum(-1) + log_lik
    p = torch.softmax(log_p.reshape(-1), 0).reshape(log_p.shape)
    flat = torch.cat([s.expand(-1, w.shape[0], 1), s * w[None]], -1)
    mean = (p[..., None] * flat).sum((0, 1))
    return mean, (p[..., None] * (flat - mean) ** 2).sum((0, 1)).sqrt()


@pytest.mark.parametrize("k,scale", [(1, 1.5), (2, 0.15), (2, 1.0)])
def test_logistic_reference_moments_match_dense_grid(k, scale):
    """Family (a)'s reference (benchmarks.amortized.logistic_reference_moments: importance sampling from a
    nested-Laplace proposal) agrees with a dense grid over the model's own coordinates, on datasets with one or two
    real columns (zero-padded like the benchmark's), including a small weight scale (a curved, funnel-like
    posterior)."""
    from benchmarks.amortized import logistic_reference_moments

    g = torch.Generator().manual_seed(k)
    n = 30
    X = torch.zeros(n, 4, dtype=torch.float64)
    X[:, :k] = torch.randn(n, k, generator=g, dtype=torch.float64)
    w = scale * torch.randn(k, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(X[:, :k] @ w), generator=g)
    mean, sd, ess = logistic_reference_moments(X, y, num_draws=200_000)
    mean_d, sd_d = _logistic_moments_dense(X[:, :k], y)
    assert mean.shape == (k + 1,) and sd.shape == (k + 1,)
    assert ess > 50_000, f"the proposal fits badly: ESS {ess:.0f} of 200,000"
    # Monte Carlo error of the importance-sampling estimate: ~1/sqrt(ESS) sd on each mean, ~1/sqrt(2 ESS) relative on
    # each sd (the weights' spread is in the ESS); 5 times that, with the grid's own error far smaller (< 5e-5)
    tol = 5 / math.sqrt(ess)
    err = ((mean - mean_d).abs() / sd_d).max()
    assert err < tol, f"means differ from the dense grid by {err:.4f} sd, above 5 Monte Carlo errors ({tol:.4f})"
    err = ((sd / sd_d) - 1).abs().max()
    assert err < tol, f"sds differ from the dense grid by {err:.4f} (relative), above 5 Monte Carlo errors ({tol:.4f})"
