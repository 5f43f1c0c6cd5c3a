"""Samplers with a density: change of variables, inverses, normalization, and the guide-level importance weights."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_stein import Amortization, AmortizedSteinGuide, AmortizedSVGD
from pyro_stein.data import Dataset
from pyro_stein.diagnostics import draws_and_log_densities, importance_diagnostics, importance_sample_posterior
from pyro_stein.flows import FlowSampler, MixtureSampler, SymmetrizedSampler, standard_normal_log_prob


def _randomized(sampler, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sampler


@pytest.mark.parametrize("D,C", [(1, 0), (2, 0), (3, 2), (4, 3)])
def test_flow_density_is_the_change_of_variables(D, C):
    torch.manual_seed(0)
    f = _randomized(FlowSampler(D, context_dim=C, num_layers=3, bins=6, bound=3.0, init_scale=0.7))
    noise = 1.5 * torch.randn(6, D)  # some rows outside the splines' interval
    ctx = torch.randn(6, C) if C else None
    with torch.no_grad():
        z, log_q = f.sample_and_log_prob(noise, ctx)
    for i in range(6):
        ci = None if ctx is None else ctx[i]
        J = torch.autograd.functional.jacobian(lambda x, ci=ci: f(x, ci), noise[i])
        ref = standard_normal_log_prob(noise[i]) - torch.linalg.slogdet(J)[1]
        assert float(log_q[i]) == pytest.approx(float(ref.detach()), abs=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(
            f.log_prob(z, ctx), log_q, atol=1e-6, rtol=0
        )  # through the inverse  # through the inverse


def test_flow_starts_at_its_affine_map_and_broadcasts_contexts():
    L = torch.tensor([[0.5, 0.0], [0.3, 2.0]])
    loc = torch.tensor([1.0, -1.0])
    f = FlowSampler(2, context_dim=3, init_loc=loc, init_scale=L)
    noise = torch.randn(50, 2)
    z, log_q = f.sample_and_log_prob(noise, torch.randn(50, 3))
    torch.testing.assert_close(z, loc + noise @ L.T)
    torch.testing.assert_close(log_q, dist.MultivariateNormal(loc, scale_tril=L).log_prob(z))
    assert f(torch.randn(4, 7, 2), torch.randn(4, 1, 3)).shape == (4, 7, 2)
    assert f.log_prob(torch.randn(4, 7, 2), torch.randn(4, 1, 3)).shape == (4, 7)
    with pytest.raises(ValueError, match="lower triangular"):
        FlowSampler(2, init_scale=torch.ones(2, 2))
    with pytest.raises(ValueError, match="context"):
        f(noise)


def test_flow_at_init_is_its_affine_map_up_to_the_ends_of_the_spline_interval():
    """Every spline at zero parameters is the identity on the whole interval, outer bins included (Pyro's spline
    puts a derivative of 1 - min_derivative at the interval's ends unless the minimum is added outside it), so the
    map is exactly the affine one and its log density exactly Gaussian, also for noise near and beyond the ends."""
    f = FlowSampler(2, init_scale=0.3, bound=5.0)
    g = torch.linspace(-6.0, 6.0, 241)
    noise = torch.cartesian_prod(g, g.flip(0))
    z, log_q = f.sample_and_log_prob(noise)
    torch.testing.assert_close(z, 0.3 * noise)
    torch.testing.assert_close(log_q, dist.Normal(0.0, 0.3).log_prob(z).sum(-1))


def _grid_mass(log_prob, half=14.0, n=281):
    g = torch.linspace(-half, half, n)
    pts = torch.cartesian_prod(g, g)
    with torch.no_grad():
        return float(log_prob(pts).exp().sum()) * (2 * half / (n - 1)) ** 2


def test_mixture_and_symmetrized_samplers_are_normalized_densities():
    torch.manual_seed(0)
    comps = [
        _randomized(FlowSampler(2, init_loc=torch.tensor([s, 0.0]), seed=i), 0.1, i) for i, s in enumerate((-3, 3))
    ]
    mix = MixtureSampler(comps, torch.tensor([0.0, math.log(3.0)]))
    assert _grid_mass(mix.log_prob) == pytest.approx(1.0, abs=2e-3)
    z, log_q = mix.sample_and_log_prob(torch.randn(20000, 3))
    assert float((z[:, 0] > 0).double().mean()) == pytest.approx(0.75, abs=0.02)
    torch.testing.assert_close(log_q, mix.log_prob(z))
    sym = SymmetrizedSampler(_randomized(FlowSampler(2, init_loc=torch.tensor([3.0, 1.0])), 0.1), [([1, 0], [-1, -1])])
    assert _grid_mass(sym.log_prob) == pytest.approx(1.0, abs=2e-3)
    z = sym(torch.randn(20000, 3))
    # z -> -swap(z) flips the sign of z0 + z1: half of the draws on each side
    assert float((z.sum(-1) > 0).double().mean()) == pytest.approx(0.5, abs=0.02)
    with torch.no_grad():
        torch.testing.assert_close(sym.log_prob(z[:5]), sym.log_prob(-z[:5].flip(-1)))
    sym.symmetrize = False  # the base alone
    assert float((sym(torch.randn(2000, 3))[:, 0] > 0).double().mean()) > 0.95
    with pytest.raises(ValueError, match="closed"):
        SymmetrizedSampler(FlowSampler(3), [([1, 2, 0], [1, 1, 1])])  # a 3-cycle without its square


def _normal_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.3))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, s).to_event(1), obs=y)


def _conjugate_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def _conjugate_log_evidence(y):
    n = y.shape[0]
    cov = torch.eye(n) + 4.0 * torch.ones(n, n)
    return float(sum(dist.MultivariateNormal(torch.zeros(n), cov).log_prob(y[:, j]) for j in range(2)))


@pytest.mark.parametrize("whiten", [None, "laplace"])
def test_guide_log_densities_give_the_exact_evidence_of_a_conjugate_model(whiten):
    y = torch.randn(10, 2) + torch.tensor([1.0, -2.0])
    guide = AmortizedSteinGuide(_conjugate_model, sampler=FlowSampler(2, init_scale=0.3), whiten=whiten)
    guide.setup(y)
    z, log_q, log_p = draws_and_log_densities(guide, 500, y)
    assert z.shape == (500, 2) and log_q.shape == log_p.shape == (500,)
    # log q against the Gaussian the flow starts as, mapped by the frame
    m, L = (guide.whiten_loc, guide.whiten_scale) if whiten else (torch.zeros(2), torch.eye(2))
    ref = dist.MultivariateNormal(m, scale_tril=torch.linalg.cholesky(L @ (0.09 * torch.eye(2)) @ L.T)).log_prob(z)
    torch.testing.assert_close(log_q, ref)
    if whiten:  # the Laplace frame of a Gaussian posterior is exact: with unit scale the weights are constant
        guide = AmortizedSteinGuide(_conjugate_model, sampler=FlowSampler(2), whiten="laplace")
        r = importance_diagnostics(guide, y, num_samples=1000)
        assert float(r.khat) < 0.5
        assert float(r.log_evidence) == pytest.approx(_conjugate_log_evidence(y), abs=1e-6)


def test_defensive_weights_estimate_the_exact_evidence_of_a_conjugate_model():
    """With the guide at the exact posterior (the Laplace frame of a Gaussian posterior), weights against
    ``0.8 q + 0.2 prior`` vary, but their mean still estimates the evidence without bias: within 4 of its own standard
    errors of the exact value, and with a small k-hat (the weights are bounded by ``Z / 0.8``)."""
    y = torch.randn(10, 2) + torch.tensor([1.0, -2.0])
    guide = AmortizedSteinGuide(_conjugate_model, sampler=FlowSampler(2), whiten="laplace")
    r = importance_diagnostics(guide, y, num_samples=4000, defensive=0.2)
    assert r.log_weights.shape == (4000,) and float(r.log_weights.std()) > 0
    exact, se = _conjugate_log_evidence(y), float(r.log_evidence_se)
    assert abs(float(r.log_evidence) - exact) < 4 * se, (
        f"{float(r.log_evidence):.5f} vs exact {exact:.5f} (s.e. {se:.5f})"
    )
    assert float(r.khat) < 0.5, float(r.khat)


def _regression_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal((X * w.unsqueeze(-2)).sum(-1), 1.0), obs=y)


def test_defensive_weights_in_a_correlated_laplace_frame():
    """A regression whose intercept and slope correlate: the Laplace frame's ``L = R^{-T}`` is upper triangular with a
    large off-diagonal term, and the prior draws must be whitened through it as it is (solving with it as if lower
    triangular put the evidence 10 standard errors off). The guide is the exact posterior, so the defensive estimate
    of the evidence must fall within 4 of its own standard errors of the exact value."""
    X = torch.stack([torch.ones(4), torch.tensor([3.0, 3.5, 4.0, 4.5])], -1)  # an intercept and an uncentred slope
    y = X @ torch.tensor([1.0, -0.5]) + torch.randn(4)
    guide = AmortizedSteinGuide(_regression_model, sampler=FlowSampler(2), whiten="laplace")
    r = importance_diagnostics(guide, X, y, num_samples=4000, defensive=0.5)
    L = guide.whiten_scale
    assert float(L[1, 0]) == 0 and abs(float(L[0, 1])) > 1, L
    exact = float(dist.MultivariateNormal(torch.zeros(4), torch.eye(4) + 4.0 * X @ X.T).log_prob(y))
    se = float(r.log_evidence_se)
    assert abs(float(r.log_evidence) - exact) < 4 * se, (
        f"{float(r.log_evidence):.5f} vs exact {exact:.5f} (s.e. {se:.5f})"
    )


def _uniform_model(y):
    theta = pyro.sample("theta", dist.Exponential(torch.tensor(1.0)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Uniform(torch.tensor(0.0), theta), obs=y)


def test_defensive_prior_draws_outside_the_data_support_get_zero_weight():
    """A prior draw of ``theta`` below the largest observation has likelihood 0: its weight is 0 (log weight -inf),
    not a NaN from the prior's density, and the other weights are finite."""
    y = torch.tensor([0.4, 1.1, 0.7])
    guide = AmortizedSteinGuide(_uniform_model, sampler=FlowSampler(1))
    with pyro.validation_enabled(False):  # Uniform's support depends on theta: the model is evaluated outside it
        r = importance_diagnostics(guide, y, num_samples=2000, defensive=0.5)
    lw = r.log_weights
    assert not torch.isnan(lw).any()
    assert (lw == -math.inf).any() and torch.isfinite(lw).sum() > 100, (lw == -math.inf).sum()


def test_trained_flow_guide_is_reliable_and_resamples():
    pyro.set_rng_seed(0)
    y = torch.randn(20, 2) * 0.7 + torch.tensor([1.0, -2.0])
    guide = AmortizedSteinGuide(_normal_model, sampler=FlowSampler(3, num_layers=2))
    svgd = AmortizedSVGD(_normal_model, guide, num_particles=32)
    svgd.run(y, num_steps=300)
    r = importance_diagnostics(guide, y, num_samples=2000)
    assert float(r.khat) < 0.7
    assert float(r.ess) > 200
    draws, khat = importance_sample_posterior(guide, 500, y)
    assert khat == pytest.approx(khat) and draws["mu"].shape == (500, 2) and draws["s"].shape == (500,)
    assert bool((draws["s"] > 0).all())
    torch.testing.assert_close(draws["mu"].mean(0), y.mean(0), atol=0.3, rtol=0)


def test_amortized_flow_guide_gives_per_dataset_weights():
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(
        _conjugate_model,
        amortized=Amortization(context_dim=4),
        whiten="laplace",
        sampler=FlowSampler(2, context_dim=4 + 4),
    )
    data = [Dataset(torch.randn(8, 2) + k) for k in range(3)]
    for d in data:  # at the start the flow is each dataset's Laplace approximation: exact for this model
        r = importance_diagnostics(guide, *d.args, num_samples=500)
        assert float(r.log_evidence) == pytest.approx(_conjugate_log_evidence(d.args[0]), abs=1e-6)


def test_a_sampler_without_a_density_is_refused():
    y = torch.randn(5, 2)
    guide = AmortizedSteinGuide(_conjugate_model)
    with pytest.raises(TypeError, match="no density"):
        importance_diagnostics(guide, y)
