"""AmortizedSteinGuide and AmortizedSVGD: Pyro integration, supports, plates and error handling."""

import math
import re
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Predictive

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD, ModelParameterWarning, NonFiniteLogJointError, RBFKernel
from pyro_stein.logjoint import ModelEvaluationError, VectorizationWarning

from .conftest import tensor


def regression_model(X, y=None):
    D = X.shape[-1]
    scale = pyro.sample("scale", dist.HalfNormal(tensor(1.0)))
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(D), scale).to_event(1))
    pyro.deterministic("norm", beta.pow(2).sum(-1).sqrt())
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Bernoulli(logits=X @ beta), obs=y)


def data(n=30, d=3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64).to(tensor(0.0))
    y = (X.sum(-1) > 0).to(X)
    return X, y


def trained(model, *args, steps=50, **kw):
    guide = AmortizedSteinGuide(model, **kw)
    svgd = AmortizedSVGD(model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=16)
    # short runs for the guide's mechanics, not its accuracy: the end-of-run checks would rightly find the draws off
    svgd.run(*args, num_steps=steps, progress_bar=False, check_health=False)
    return guide, svgd


def broadcasting_model(X, y=None):
    """The same model written to broadcast over leading sample dims (needed for parallel=True)."""
    D = X.shape[-1]
    scale = pyro.sample("scale", dist.HalfNormal(tensor(1.0)))
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(D), scale.unsqueeze(-1)).to_event(1))
    pyro.deterministic("norm", beta.pow(2).sum(-1).sqrt())
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Bernoulli(logits=(X * beta.unsqueeze(-2)).sum(-1)), obs=y)


@pytest.mark.parametrize(
    "model, parallel", [(regression_model, False), (broadcasting_model, False), (broadcasting_model, True)]
)
def test_predictive_shapes_match_autonormal(model, parallel):
    """Predictive(model, guide=...) gives the same site shapes as with Pyro's AutoNormal."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    X, y = data()
    guide, _ = trained(model, X, y)
    auto = AutoNormal(model)
    SVI(model, auto, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(X, y)
    ours = Predictive(model, guide=guide, num_samples=7, parallel=parallel)(X)
    theirs = Predictive(model, guide=auto, num_samples=7, parallel=parallel)(X)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    beta = ours["beta"].reshape(7, 3)
    assert torch.allclose(ours["norm"].reshape(7), beta.pow(2).sum(-1).sqrt())
    assert ours["y"].shape == (7, 30)


def test_trace_and_replay_work_as_with_autoguides():
    X, y = data()
    guide, _ = trained(regression_model, X, y)
    tr = poutine.trace(guide).get_trace(X, y)
    assert {"scale", "beta"} <= set(tr.stochastic_nodes)
    model_tr = poutine.trace(poutine.replay(regression_model, trace=tr)).get_trace(X, y)
    assert torch.equal(model_tr.nodes["beta"]["value"], tr.nodes["beta"]["value"])
    assert torch.isfinite(model_tr.log_prob_sum())


def test_sample_posterior_median_quantiles():
    X, y = data()
    guide, _ = trained(regression_model, X, y)
    s = guide.sample_posterior(100, X, y)
    assert set(s) == {"scale", "beta", "norm"}
    assert s["beta"].shape == (100, 3) and s["scale"].shape == (100,) and s["norm"].shape == (100,)
    assert (s["scale"] > 0).all()
    q = guide.quantiles([0.1, 0.5, 0.9], X, y)
    assert q["beta"].shape == (3, 3) and (q["beta"][0] <= q["beta"][2]).all()
    assert guide.median(X, y)["scale"].shape == ()
    with pytest.raises(ValueError, match="num_samples"):
        guide.sample_posterior(0, X, y)


def test_median_and_quantiles_stay_in_the_support():
    """Quantiles are taken in unconstrained space and mapped, so a simplex or a Cholesky factor stays one (element-wise
    medians of simplex draws do not sum to 1); for element-wise supports they are the constrained quantiles."""

    def model():
        p = pyro.sample("p", dist.Dirichlet(tensor(torch.ones(3))))
        L = pyro.sample("L", dist.LKJCholesky(3, tensor(1.0)))
        s = pyro.sample("s", dist.LogNormal(tensor(0.0), tensor(1.0)))
        return p, L, s

    guide = AmortizedSteinGuide(model, init_scale=1.0, num_summary_samples=501)
    med = guide.median()
    for name in ("p", "L"):
        support = guide.log_density.sites[[x.name for x in guide.sites].index(name)].transform.codomain
        assert bool(support.check(med[name]).all()), f"median of {name!r} is outside its support: {med[name]}"
    torch.manual_seed(0)
    q = guide.quantiles([0.1, 0.9])["s"]
    torch.manual_seed(0)
    draws = guide.sample_posterior(501)["s"]
    assert torch.allclose(q, torch.quantile(draws, tensor([0.1, 0.9])))


def test_default_sampler_starts_gaussian_at_init():
    X, y = data()
    guide = AmortizedSteinGuide(regression_model, init_scale=0.1, whiten=None).setup(X, y)
    z = guide.draw(20_000)
    # At step 0 the sampler is loc + 0.1 * noise exactly (the residual MLP's last layer is zero).
    assert torch.allclose(z.std(0), torch.full_like(z[0], 0.1), rtol=0.05)


def test_conditional_sampler_gives_the_same_draws_for_shared_and_per_draw_contexts():
    """The sampler evaluates its context heads once per context ((B, 1, C) for B datasets' draws) instead of once
    per draw: the draws must equal those of the same context repeated for every draw, and of one unbatched context."""
    from pyro_stein.nn import GaussianResidualSampler

    torch.manual_seed(0)
    like = tensor(0.0)
    sampler = GaussianResidualSampler(5, context_dim=3).to(like)
    with torch.no_grad():
        for p in sampler.parameters():  # the context heads start at zero: make them matter
            p.normal_(0.0, 0.3)
    noise, ctx = torch.randn(4, 7, 5).to(like), torch.randn(4, 3).to(like)
    shared = sampler(noise, ctx.unsqueeze(-2))
    per_draw = sampler(noise, ctx.unsqueeze(-2).expand(4, 7, 3))
    assert shared.shape == (4, 7, 5)
    tol = dict(rtol=1e-12, atol=1e-12) if like.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, per_draw, **tol)
    torch.testing.assert_close(sampler(noise[1], ctx[1]), per_draw[1], **tol)
    torch.testing.assert_close(sampler(noise[1, 0], ctx[1]), per_draw[1, 0], **tol)


@pytest.mark.parametrize(
    "prior",
    [
        lambda: dist.LogNormal(tensor(0.0), tensor(1.0)),
        lambda: dist.Beta(tensor(2.0), tensor(3.0)),
        lambda: dist.Dirichlet(tensor([1.0, 2.0, 3.0])),
        lambda: dist.LKJCholesky(3, tensor(2.0)),
        lambda: dist.Uniform(tensor(-1.0), tensor(2.0)),
        lambda: dist.ImproperUniform(constraints.ordered_vector, (), (3,)),
        lambda: dist.ImproperUniform(constraints.lower_cholesky, (), (2, 2)),
        lambda: dist.ImproperUniform(constraints.positive_definite, (), (2, 2)),
    ],
)
def test_constrained_supports_train_and_stay_in_support(prior):
    def model():
        x = pyro.sample("x", prior())
        pyro.factor("soft", -0.5 * x.pow(2).sum())  # makes improper priors proper

    guide, _ = trained(model, steps=30)
    s = guide.sample_posterior(200)["x"]
    support = prior().support
    assert torch.isfinite(s).all()
    assert support.check(s).all()


def test_improper_uniform_regression_trains_without_nans():
    """Flat prior on beta: Pyro's autoguides cannot initialise this (their init samples the prior)."""
    X, _ = data(50, 2)
    yc = X @ tensor([1.0, -2.0]) + 0.3 * torch.randn(50, dtype=X.dtype, device=X.device)

    def model(X, y):
        beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (2,)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(tensor(2.5)))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)

    guide, _ = trained(model, X, yc, steps=400)
    beta = guide.sample_posterior(2000, X, yc)["beta"]
    ols = torch.linalg.lstsq(X, yc.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.isfinite(beta).all()
    assert (beta.mean(0) - ols).abs().max() < 0.2, "posterior mean under a flat prior should be near OLS"


@pytest.mark.filterwarnings("ignore::pyro_stein.infer.TrainingWarning")  # 300 steps: finite, not yet accurate
def test_eight_schools_funnel_trains_without_nans():
    y = tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

    def model(sigma, y):
        mu = pyro.sample("mu", dist.Normal(tensor(0.0), tensor(5.0)))
        tau = pyro.sample("tau", dist.HalfCauchy(tensor(5.0)))
        with pyro.plate("school", len(y)):
            theta_trans = pyro.sample("theta_trans", dist.Normal(tensor(0.0), tensor(1.0)))
            theta = pyro.deterministic("theta", mu + tau * theta_trans)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    guide, _ = trained(model, sigma, y, steps=300)
    s = guide.sample_posterior(500, sigma, y)
    assert all(torch.isfinite(v).all() for v in s.values())
    assert s["theta"].shape == (500, 8)


def test_subsampled_plate_is_scaled_and_shared_by_particles():
    """With subsample_size the log joint is the unbiased, scaled minibatch estimate, and every
    particle of a step sees the same minibatch."""
    y = torch.arange(10).to(tensor(0.0))

    def model(y, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(tensor(0.0), tensor(10.0)))
        with pyro.plate("data", len(y), subsample_size=subsample_size) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    guide = AmortizedSteinGuide(model).setup(y, 5)
    assert guide.subsample_plates == {"data": (10, 5)}
    svgd = AmortizedSVGD(model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4)
    svgd.step(y, 5)
    ld = svgd._log_density
    u = tensor([[1.0], [1.0]])
    pyro.set_rng_seed(3)
    lp = ld.log_density(u, (y, 5))
    assert lp[0] == lp[1], "both particles must see the same minibatch"
    full = ld.log_density(u[:1], (y, None))[0]
    mean_est = torch.stack([ld.log_density(u[:1], (y, 5))[0] for _ in range(400)]).mean()
    prior = dist.Normal(tensor(0.0), tensor(10.0)).log_prob(tensor(1.0))
    # the minibatch estimate is unbiased: its mean over 400 draws matches the full log joint
    per_draw_sd = torch.stack([ld.log_density(u[:1], (y, 5))[0] for _ in range(100)]).std()
    se = per_draw_sd / math.sqrt(400)
    assert (mean_est - full).abs() < 5 * se, (
        f"minibatch log joint biased by {(mean_est - full).item():.3f} (5 s.e. = {5 * se:.3f})"
    )
    assert full - prior < 0
    with pytest.raises(ValueError, match=r"whiten='laplace' needs the full-data log density, .*whiten='auto'"):
        AmortizedSteinGuide(model, whiten="laplace").setup(y, 5)


def test_non_vectorizable_model_falls_back_to_loop_with_same_values():
    y = tensor([0.5, 1.5])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(tensor(0.0), tensor(1.0)))
        if mu.item() > 100:  # data-dependent Python control flow: not vmappable
            raise RuntimeError
        pyro.sample("y", dist.Normal(mu, 1.0).expand([2]).to_event(1), obs=y)

    guide = AmortizedSteinGuide(model).setup(y)
    svgd = AmortizedSVGD(model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4)
    with pytest.warns(VectorizationWarning, match="loop"):
        svgd.step(y)
    u = tensor([[0.3], [-1.0]])
    lp = svgd._log_density.log_density(u, (y,))
    exact = dist.Normal(u.new_tensor(0.0), 1.0).log_prob(u[:, 0]) + dist.Normal(u, 1.0).log_prob(y).sum(-1)
    assert torch.allclose(lp, exact)


def test_data_of_the_wrong_shape_raises_the_models_error_and_keeps_vectorization():
    """A first evaluation that fails both under vmap and in the loop is the model's own error (here data of the
    wrong shape): it is raised, with no VectorizationWarning, and the next evaluation is still vectorized."""
    X, y = data()
    guide = AmortizedSteinGuide(regression_model).setup(X, y)
    from pyro_stein.logjoint import ModelLogDensity

    ld = ModelLogDensity(regression_model, guide.sites)
    u = torch.randn(5, guide.latent_dim, dtype=X.dtype, device=X.device)
    wide = torch.cat([X, X], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorizationWarning)
        with pytest.raises(ModelEvaluationError, match=r"'beta' \(3,\).*another number of features") as err:
            ld.log_density(u, (wide, y))
        assert isinstance(err.value.__cause__, RuntimeError), "chained to the model's own error"
        assert ld._mode is None, "a failed first evaluation must not choose the loop"
        ld.log_density(u, (X, y))
    assert ld._mode == "vmap"


def test_a_vectorization_warning_turned_error_is_not_reported_as_a_model_error():
    y = tensor([0.5, 1.5])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(tensor(0.0), tensor(1.0)))
        if mu.item() > 100:  # not vmappable
            raise RuntimeError
        pyro.sample("y", dist.Normal(mu, 1.0).expand([2]).to_event(1), obs=y)

    guide = AmortizedSteinGuide(model).setup(y)
    from pyro_stein.logjoint import ModelLogDensity

    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorizationWarning)
        with pytest.raises(VectorizationWarning):
            ModelLogDensity(model, guide.sites).log_density(tensor([[0.3], [-1.0]]), (y,))


def test_vmap_and_loop_agree_on_a_matrix_model():
    X, y = data()
    guide = AmortizedSteinGuide(regression_model).setup(X, y)
    from pyro_stein.logjoint import ModelLogDensity

    u = torch.randn(5, guide.latent_dim, dtype=X.dtype, device=X.device)
    a = ModelLogDensity(regression_model, guide.sites, "vmap").log_density_and_score(u, (X, y))
    b = ModelLogDensity(regression_model, guide.sites, "loop").log_density_and_score(u, (X, y))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_log_density_includes_log_jacobian():
    def model():
        pyro.sample("x", dist.Gamma(tensor(3.0), tensor(1.0)))

    guide = AmortizedSteinGuide(model).setup()
    from pyro_stein.logjoint import ModelLogDensity

    u = tensor([[0.2], [1.1]])
    lp = ModelLogDensity(model, guide.sites).log_density(u)
    exact = dist.Gamma(tensor(3.0), tensor(1.0)).log_prob(u.exp()).squeeze(-1) + u.squeeze(-1)
    assert torch.allclose(lp, exact)


# ---------------------------------------------------------------------------- errors
def test_discrete_latent_site_error_names_site():
    def model():
        pyro.sample("k", dist.Categorical(tensor([0.3, 0.7])))

    with pytest.raises(
        ValueError, match=r"'k' is discrete .*does not enumerate. Sum it out of the model by hand"
    ) as err:
        AmortizedSteinGuide(model).setup()
    assert "config_enumerate" not in str(err.value), "enumeration does not help: the message must not suggest it"


def test_a_support_that_depends_on_another_latent_is_named_in_the_error():
    def model():
        a = pyro.sample("a", dist.LogNormal(tensor(0.0), tensor(1.0)))
        pyro.sample("u", dist.Uniform(tensor(0.0), a))

    guide = AmortizedSteinGuide(model).setup()
    from pyro_stein.logjoint import ModelLogDensity

    ld = ModelLogDensity(model, guide.sites)
    u = tensor([[-3.0, 2.0]])  # a = e^-3, u mapped into (0, a_init = 1): outside (0, a)
    lp, score = ld.log_density_and_score(u, check=False)
    msg = ld.describe_nonfinite(u[0], (), {}, {}, lp[0], score[0])
    assert "'u' (log_prob = -inf; its value lies outside its support" in msg and "Reparameterise" in msg


def test_model_parameters_are_flagged_and_left_alone():
    def model():
        shift = pyro.param("shift", tensor(0.5))
        pyro.sample("x", dist.Normal(shift, tensor(1.0)))

    pyro.clear_param_store()
    with pytest.warns(ModelParameterWarning, match=r"\['shift'\].*keep their current values"):
        guide = AmortizedSteinGuide(model).setup()
    assert guide.reparam_sites == [], "a loc that is a pyro.param, not a latent, is no funnel"
    AmortizedSVGD(model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4).step()
    assert float(pyro.param("shift").detach()) == 0.5


@pytest.mark.parametrize("n", [np.int64(7), torch.tensor(7), 7])
def test_num_samples_accepts_any_integer_type(n):
    guide = AmortizedSteinGuide(lambda: pyro.sample("x", dist.Normal(tensor(0.0), tensor(1.0)))).setup()
    assert guide.sample_posterior(n)["x"].shape == (7,)


@pytest.mark.parametrize("n", [0, -2, 2.0, True, torch.tensor(2.5), "3"])
def test_num_samples_rejects_non_integers(n):
    guide = AmortizedSteinGuide(lambda: pyro.sample("x", dist.Normal(tensor(0.0), tensor(1.0)))).setup()
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        guide.sample_posterior(n)


def test_support_without_bijection_error_names_site():
    def model():
        pyro.sample("cov", dist.ImproperUniform(constraints.positive_semidefinite, (), (2, 2)))

    with pytest.raises(ValueError, match=r"'cov'.*no bijection"):
        AmortizedSteinGuide(model).setup()


def test_bad_driver_arguments():
    X, y = data()
    guide = AmortizedSteinGuide(regression_model)
    with pytest.raises(TypeError, match="PyroOptim"):
        AmortizedSVGD(regression_model, guide, torch.optim.Adam)
    with pytest.raises(ValueError, match="num_particles"):
        AmortizedSVGD(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=1)
    with pytest.raises(TypeError, match="kernel"):
        AmortizedSVGD(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}), kernel=lambda x: x)
    with pytest.raises(TypeError, match="AmortizedSteinGuide"):
        AmortizedSVGD(regression_model, object(), pyro.optim.Adam({"lr": 1e-2}))
    with pytest.raises(TypeError, match="nn.Module"):
        AmortizedSteinGuide(regression_model, sampler=lambda e: e)
    with pytest.raises(TypeError, match="leave_one_out must be True or False, got 'no'"):
        AmortizedSVGD(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}), leave_one_out="no")
    svgd = AmortizedSVGD(regression_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4)
    for bad in (True, -1, 2.5):
        with pytest.raises(ValueError, match=rf"num_steps must be an int >= 0, got {bad}"):
            svgd.run(X, y, num_steps=bad, progress_bar=False)
    assert len(svgd.run(X, y, num_steps=np.int64(2), progress_bar=False)) == 2, "numpy integers are integers"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"encoder": 3, "amortized": True}, TypeError, "encoder must be a torch.nn.Module"),
        ({"amortized": "yes"}, TypeError, "amortized must be True, False or an Amortization(...), got 'yes'"),
        ({"create_plates": 3}, TypeError, "create_plates must be a callable"),
        ({"init_scale": "a"}, TypeError, "init_scale must be a positive number, got 'a'"),
        ({"init_scale": 0.0}, ValueError, "init_scale must be positive"),
        ({"context_dim": 2.7}, ValueError, "context_dim must be an int >= 1, got 2.7"),
        ({"context_dim": 0}, ValueError, "context_dim must be an int >= 1, got 0"),
        ({"num_summary_samples": 0}, ValueError, "num_summary_samples must be an int >= 1, got 0"),
    ],
    ids=[
        "encoder",
        "amortized",
        "create_plates",
        "init_scale-type",
        "init_scale-value",
        "context_dim-float",
        "context_dim-zero",
        "num_summary_samples",
    ],
)
def test_bad_guide_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        AmortizedSteinGuide(regression_model, **kwargs)


def test_custom_sampler_with_wrong_dim_is_rejected():
    X, y = data()

    class Tiny(torch.nn.Module):
        noise_dim, latent_dim = 2, 2

        def forward(self, noise, context=None):
            return noise

    with pytest.raises(ValueError, match="pack into 4"):
        AmortizedSteinGuide(regression_model, sampler=Tiny()).setup(X, y)


def test_custom_sampler_on_the_wrong_device_or_dtype_is_rejected():
    from pyro_stein.nn import GaussianResidualSampler

    X, y = data()
    other = torch.float32 if X.dtype == torch.float64 else torch.float64
    sampler = GaussianResidualSampler(4).to(device=X.device, dtype=other)
    with pytest.raises(ValueError, match=r"sampler passed to AmortizedSteinGuide .* sampler\.to\(device="):
        AmortizedSteinGuide(regression_model, sampler=sampler).setup(X, y)
    # placed like the model's values, it is accepted as is
    guide = AmortizedSteinGuide(regression_model, sampler=sampler.to(X)).setup(X, y)
    assert guide.sampler is sampler


def test_non_finite_log_joint_names_site_and_leaves_params_unchanged():
    y = tensor([1.0, 2.0])

    def model(y, bad=False):
        mu = pyro.sample("mu", dist.Normal(tensor(0.0), tensor(1.0)))
        scale = pyro.sample("scale", dist.HalfNormal(tensor(1.0)))
        pyro.sample("y", dist.Normal(mu, scale * (0.0 if bad else 1.0)).expand([2]).to_event(1), obs=y)

    guide, svgd = trained(model, y, steps=3)
    before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    with pytest.raises(NonFiniteLogJointError, match="'y'") as err:
        svgd.step(y, True)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "'y' (log_prob = nan)" in msg or "'y' (log_prob = -inf)" in msg or "'y' (gradient not finite)" in msg, msg
    assert "raised" not in msg, f"the diagnosis itself failed: {msg}"
    after = guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters changed by a failed step"


def test_kernel_choice_is_used():
    X, y = data()
    guide = AmortizedSteinGuide(regression_model)
    svgd = AmortizedSVGD(
        regression_model, guide, pyro.optim.Adam({"lr": 1e-2}), kernel=RBFKernel(bandwidth_factor=2.0), num_particles=8
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(svgd.step(X, y))


# ---------------------------------------------------------------- frames of concentrated posteriors
def linear_gaussian_model(X, y=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)


def _concentrated_linear_data():
    """200 rows, noise sd 0.01, covariate scales 1, 10, 0.1: posterior sds 7e-4, 7e-5, 7e-3 under N(0, I)."""
    g = torch.Generator().manual_seed(0)
    X = (
        torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
    ).to(tensor(0.0))
    y = X @ tensor([1.0, -2.0, 0.5]) + 0.01 * torch.randn(200, generator=g, dtype=torch.float64).to(X)
    cov = torch.linalg.inv(torch.eye(3, dtype=X.dtype, device=X.device) + X.T @ X / 1e-4)
    return X, y, cov @ X.T @ y / 1e-4, cov


def concentrated_model(X, y=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w, 0.01), obs=y)


@pytest.mark.skipif(tensor(0.0).dtype != torch.float64, reason="posterior sds of 7e-5 need float64")
def test_whiten_laplace_frame_is_exact_for_a_gaussian_posterior():
    X, y, mean, cov = _concentrated_linear_data()
    guide = AmortizedSteinGuide(concentrated_model, whiten="laplace").setup(X, y)
    # a Gaussian posterior: the Laplace frame is the posterior itself, so the untrained sampler draws from it
    torch.testing.assert_close(guide.whiten_loc, mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(guide.whiten_scale @ guide.whiten_scale.T, cov, rtol=1e-6, atol=0)
    n = 20_000
    w = guide.sample_posterior(n, X, y)["w"]
    err = (w.mean(0) - mean).abs() / cov.diagonal().sqrt()
    assert (err < 5 / math.sqrt(n)).all(), (
        f"mean errors {err.tolist()} sd exceed 5 Monte Carlo s.e. ({5 / math.sqrt(n):.3f})"
    )
    pw = Predictive(concentrated_model, guide=guide, num_samples=500)(X)["w"]  # forward() goes through the frame too
    assert pw.shape == (500, 1, 3) and ((pw.mean(0)[0] - mean).abs() / cov.diagonal().sqrt()).max() < 5 / math.sqrt(500)


@pytest.mark.skipif(tensor(0.0).dtype != torch.float64, reason="posterior sds of 7e-5 need float64")
def test_whiten_laplace_trains_where_the_raw_frame_fails():
    """Posterior sds 7e-5 to 7e-3 under an N(0, I) prior: 300 steps in the raw unconstrained frame end many sds off;
    in the Laplace frame the trained sampler stays within the project's accuracy targets (0.2 sd, 20 %)."""
    X, y, mean, cov = _concentrated_linear_data()
    sd = cov.diagonal().sqrt()
    errs, ratios = {}, {}
    for whiten in ("laplace", None):
        pyro.set_rng_seed(0)
        guide = AmortizedSteinGuide(concentrated_model, whiten=whiten)
        AmortizedSVGD(concentrated_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=32).run(
            X,
            y,
            num_steps=300,
            progress_bar=False,
            check_health=False,  # the trained sampler itself, unpolished
        )
        w = guide.sample_posterior(4000, X, y)["w"]
        errs[whiten], ratios[whiten] = ((w.mean(0) - mean).abs() / sd).max(), w.std(0) / sd
    assert errs["laplace"] < 0.2 and ((ratios["laplace"] - 1).abs() < 0.2).all(), (
        f"whitened: mean error {errs['laplace']:.3f} sd (4000 draws: Monte Carlo s.e. 0.016), "
        f"sd ratios {ratios['laplace'].tolist()}"
    )
    assert errs[None] > 2, f"the raw frame was expected to fail here, mean error {errs[None]:.3f} sd"


def test_whiten_errors_and_persistence(tmp_path):
    with pytest.raises(ValueError, match=r"whiten must be one of \('auto', 'laplace', 'adaptive', None\), got 'pca'"):
        AmortizedSteinGuide(linear_gaussian_model, whiten="pca")
    with pytest.raises(ValueError, match="whiten='adaptive' is for non-amortized guides"):
        AmortizedSteinGuide(linear_gaussian_model, whiten="adaptive", amortized=True)

    def flat_model(x):
        pyro.sample("a", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("b", dist.ImproperUniform(constraints.real, (), ()))  # no mode in b

    with pytest.raises(ValueError, match="not positive definite"):
        AmortizedSteinGuide(flat_model, whiten="laplace").setup(tensor(0.0))

    def centred_model(X, y):  # log density unbounded as tau -> 0 with w = 0: L-BFGS overflows (float32)
        tau = pyro.sample("tau", dist.HalfNormal(X.new_tensor(1.0)))
        w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), tau).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    g = torch.Generator().manual_seed(0)
    Xc, yc = torch.randn(30, 3, generator=g), (torch.rand(30, generator=g) < 0.5).float()
    with pytest.raises(ValueError, match=r"whiten='laplace'.*whiten='auto'"):  # the search's own failure, explained
        AmortizedSteinGuide(centred_model, whiten="laplace").setup(Xc, yc)
    X, y = data(n=10, d=2)
    guide = AmortizedSteinGuide(linear_gaussian_model, whiten="laplace").setup(X, y)
    guide.save(tmp_path / "g.pt")
    loaded = AmortizedSteinGuide.load(tmp_path / "g.pt", linear_gaussian_model, X, y)
    assert loaded.whiten == "laplace"
    torch.testing.assert_close(loaded.whiten_scale, guide.whiten_scale, rtol=0, atol=0)
    torch.testing.assert_close(loaded.whiten_loc, guide.whiten_loc, rtol=0, atol=0)


@pytest.mark.parametrize("first", ["nan-data", "no-observations"])
def test_failed_first_setup_leaves_the_guide_unset(first):
    """A first call that fails (a malformed dataset) leaves nothing half-built: the next call with good arguments sets
    the guide up afresh (a partial setup made every later call fail, or baked the missing observations in as
    latents)."""
    X, y = data(n=20, d=2)
    guide = AmortizedSteinGuide(linear_gaussian_model, amortized=True)
    with pytest.raises(ValueError):
        if first == "nan-data":
            guide.sample_posterior(5, X, y=torch.where(torch.arange(20, device=y.device) == 3, torch.nan, y))
        else:
            guide.sample_posterior(5, X)
    assert guide.prototype_trace is None and guide.sampler is None and not list(guide.parameters())
    assert not any(name.startswith("whiten") or name.startswith("feature") for name, _ in guide.named_buffers())
    assert guide.sample_posterior(5, X, y)["w"].shape == (5, 2)
    assert [s.name for s in guide.sites] == ["w"], "the observed site must not have become a latent"
