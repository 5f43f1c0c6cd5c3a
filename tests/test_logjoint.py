"""The model -> batched log density layer: per-site log-prob fast paths and scales/masks."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_stein.logjoint import ModelLogDensity, all_finite, latent_sites_from_trace, site_log_prob, trace_log_prob_sum

from .conftest import DEVICE, DTYPE

TOL = 50 * torch.finfo(DTYPE).eps  # same maths, different op order: rounding only


def randn(*shape):
    return torch.randn(*shape, dtype=DTYPE, device=DEVICE)


def _bernoulli_case(name):
    torch.manual_seed(0)
    logits = 8.0 * randn(4, 5)
    value = torch.bernoulli(torch.full_like(logits, 0.5))
    return value, {
        "logits": lambda: dist.Bernoulli(logits=logits),
        "probs": lambda: dist.Bernoulli(probs=torch.sigmoid(logits)),
        "torch": lambda: torch.distributions.Bernoulli(logits=logits),
        "independent": lambda: dist.Bernoulli(logits=logits).to_event(1),
        "broadcast value": lambda: dist.Bernoulli(logits=logits[0]),
        "masked": lambda: dist.Bernoulli(logits=logits).mask(value > 0),
    }[name]()


@pytest.mark.parametrize(
    "support, identity",
    [
        (dist.constraints.real, True),
        (dist.constraints.real_vector, True),
        (dist.constraints.independent(dist.constraints.real, 2), True),
        (dist.constraints.positive, False),
        (dist.constraints.simplex, False),
        (dist.constraints.interval(0.0, 1.0), False),
        (dist.constraints.independent(dist.constraints.positive, 1), False),
        (dist.constraints.lower_cholesky, False),
    ],
)
def test_identity_bijections_are_recognised(support, identity):
    """Sites whose bijection is the identity skip the log|det J| term, which must then be exactly zero."""
    from pyro_stein.logjoint import _is_identity
    from pyro_stein.transforms import support_bijection

    t = support_bijection(support)
    assert _is_identity(t) == identity
    if identity:
        x = randn(3, 4)
        assert torch.equal(t(x), x) and torch.equal(
            t.log_abs_det_jacobian(x, x), torch.zeros_like(t.log_abs_det_jacobian(x, x))
        )


@pytest.mark.parametrize("support", [dist.constraints.lower_cholesky, dist.constraints.positive_definite])
def test_bijections_with_cache_cache_their_inverse(support):
    """Pyro calls transform.with_cache() (e.g. in TransformedDistribution): the bijection with a cache returns the
    input it mapped from when inverted, and maps as the one without."""
    from pyro_stein.transforms import support_bijection

    t = support_bijection(support)
    cached = t.with_cache(1)
    assert cached.with_cache(1) is cached and cached._cache_size == 1
    x = randn(2, 6)
    y = cached(x)
    torch.testing.assert_close(y, t(x), rtol=0, atol=0)
    assert cached.inv(y) is x


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("how", ["obs_mask", "fn.mask", "fn.mask inside to_event"])
def test_latent_entries_a_mask_removes_get_a_standard_normal(how, vectorize):
    """obs_mask makes a latent 'y_unobserved' whose entries at observed positions have no density; they get
    -u^2/2 each (and only they), so the log density is the masked model's plus an independent N(0, 1). The same
    for a mask written inside ``.to_event(1)``, where the masked dimension is an event dimension of the site."""
    y = randn(5)
    m = torch.tensor([True, False, True, True, False], device=y.device)

    def model():
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 10.0))
        if how == "fn.mask inside to_event":
            pyro.sample("y_unobserved", dist.Normal(mu, 1.0).expand([5]).mask(~m).to_event(1))
            pyro.sample("y_observed", dist.Normal(mu, 1.0).expand([5]).mask(m).to_event(1), obs=y)
            return
        with pyro.plate("n", 5):
            if how == "obs_mask":
                pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=m)
            else:
                pyro.sample("y_unobserved", dist.Normal(mu, 1.0).expand([5]).mask(~m))
                pyro.sample("y_observed", dist.Normal(mu, 1.0).mask(m), obs=y)

    ld = ModelLogDensity(model, latent_sites_from_trace(poutine.trace(model).get_trace()), vectorize)
    assert [s.name for s in ld.sites] == ["mu", "y_unobserved"]
    u = randn(4, 6).requires_grad_(True)
    mu, yu = u[:, :1], u[:, 1:]
    exact = (
        dist.Normal(0.0, 10.0).log_prob(mu[:, 0])
        + (dist.Normal(mu, 1.0).log_prob(y) * m).sum(-1)
        + (dist.Normal(mu, 1.0).log_prob(yu) * ~m).sum(-1)
        - 0.5 * (yu.square() * m).sum(-1)
    )
    (exact_score,) = torch.autograd.grad(exact.sum(), u)
    lp, score = ld.log_density_and_score(u.detach())
    assert torch.allclose(lp, exact.detach(), rtol=TOL, atol=TOL) and torch.allclose(
        score, exact_score, rtol=TOL, atol=TOL
    )


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_a_masked_out_prior_that_the_model_reads_gets_no_standard_normal(vectorize):
    """The flat-prior idiom, a prior masked out with poutine.mask whose value the likelihood uses: its density is the
    likelihood's alone (a standard normal added there shifted this posterior mean by 1.4 sd)."""
    y = randn(6) + 4.0

    def model():
        with poutine.mask(mask=False):
            mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
        with pyro.plate("n", 6):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    ld = ModelLogDensity(model, latent_sites_from_trace(poutine.trace(model).get_trace()), vectorize)
    u = randn(4, 1).requires_grad_(True)
    exact = dist.Normal(u, 1.0).log_prob(y).sum(-1)
    (exact_score,) = torch.autograd.grad(exact.sum(), u)
    lp, score = ld.log_density_and_score(u.detach())
    assert torch.allclose(lp, exact.detach(), rtol=TOL, atol=TOL) and torch.allclose(
        score, exact_score, rtol=TOL, atol=TOL
    )


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf"), "overflow"])
def test_all_finite_is_false_whenever_an_element_is_not_finite(bad):
    """The one-sum check says True only when every element is finite; an overflowing sum of finite values
    says False (callers then run the element-wise check), never the reverse."""
    lp, score = randn(7), randn(7, 3)
    if bad == "overflow":
        big = torch.finfo(DTYPE).max / 2
        score[2] = big
        assert torch.isfinite(score).all() and not all_finite(lp, score)
        return
    if bad is not None:
        score[4, 1] = bad
    assert all_finite(lp, score) == (bad is None)
    assert all_finite(score.T, lp) == (bad is None)


@pytest.mark.parametrize("name", ["logits", "probs", "torch", "independent", "broadcast value", "masked"])
def test_site_log_prob_matches_log_prob(name):
    value, d = _bernoulli_case(name)
    got, want = site_log_prob(d, value), d.log_prob(value)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=TOL, atol=TOL), f"{name}: max diff {(got - want).abs().max()}"


def test_trace_log_prob_sum_matches_pyro_with_scale_and_mask():
    X = randn(30, 3)
    y = torch.bernoulli(torch.full_like(X[:, 0], 0.5))
    keep = torch.arange(30, device=DEVICE) % 3 > 0

    def model():
        w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
        with pyro.plate("data", 30, subsample_size=10, device=DEVICE) as idx, poutine.mask(mask=keep[idx]):
            pyro.sample("y", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])
        pyro.factor("f", -(w**2).sum())

    tr = poutine.trace(model).get_trace()
    assert torch.allclose(trace_log_prob_sum(tr), tr.log_prob_sum(), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("fused", [False, True], ids=["composite", "fused"])
def test_vmapped_bernoulli_density_and_score_match_loop(fused, monkeypatch):
    import pyro_stein.logjoint as lj

    # both code paths (the size switch picks one by the logits' size and device)
    monkeypatch.setattr(lj, "_FUSED_BERNOULLI_MIN_NUMEL", {DEVICE.type: 0 if fused else 10**12})
    X = randn(50, 4)
    y = torch.bernoulli(torch.full_like(X[:, 0], 0.3))

    def model(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(4), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    sites = latent_sites_from_trace(poutine.trace(model).get_trace(X, y))
    u = randn(7, 4)
    lp_v, s_v = ModelLogDensity(model, sites, vectorize="vmap").log_density_and_score(u, (X, y))
    lp_l, s_l = ModelLogDensity(model, sites, vectorize="loop").log_density_and_score(u, (X, y))
    assert torch.allclose(lp_v, lp_l, rtol=TOL, atol=TOL) and torch.allclose(s_v, s_l, rtol=TOL, atol=TOL)
    # and against the closed form
    logits = u @ X.T
    want = (y * logits - torch.nn.functional.softplus(logits)).sum(-1) + dist.Normal(u.new_tensor(0.0), 1.0).log_prob(
        u
    ).sum(-1)
    assert torch.allclose(lp_v, want, rtol=TOL, atol=TOL)
    want_score = (y - torch.sigmoid(logits)) @ X - u
    assert torch.allclose(s_v, want_score, rtol=TOL, atol=TOL)


def test_bernoulli_log_prob_function_gradients():
    """The hand-written backward of the fused Bernoulli log-prob: gradcheck (float64) for both
    inputs, and under vmap the same gradients as autograd of the composite expression."""
    from pyro_stein.logjoint import _BernoulliLogitsLogProb

    torch.manual_seed(0)
    logits = (3.0 * randn(3, 6)).double().requires_grad_(True)
    value = torch.rand(3, 6, dtype=torch.float64, device=DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(_BernoulliLogitsLogProb.apply, (logits, value))
    assert torch.autograd.gradgradcheck(_BernoulliLogitsLogProb.apply, (logits, value))

    w = randn(4, 5)  # 4 particles
    x, y = randn(7, 5), torch.bernoulli(torch.full((7,), 0.5, dtype=DTYPE, device=DEVICE))

    def fused(wi):
        return _BernoulliLogitsLogProb.apply(x @ wi, y).sum()

    def composite(wi):
        lg = x @ wi
        return (y * lg - torch.nn.functional.softplus(lg)).sum()

    got = torch.func.vmap(torch.func.grad(fused))(w)
    want = torch.func.vmap(torch.func.grad(composite))(w)
    assert torch.allclose(got, want, rtol=TOL, atol=TOL)


def _regression(X, y, prior_scale=1.0):
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[-1]), prior_scale).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)


def _branching_regression(X, y, prior_scale=1.0):
    """Python control flow on the data's values: vmappable over particles, not over datasets."""
    if float(y.sum()) > 0:
        prior_scale = 2.0 * prior_scale
    _regression(X, y, prior_scale)


def _loop_scores(ld, z, datasets):
    return torch.stack([ld.log_density_and_score(z[b], d.args, d.kwargs)[1] for b, d in enumerate(datasets)])


def _exact_regression_score(z, datasets, prior_scales):
    """Closed form: grad log p(beta | X, y) = X^T (y - X beta) - beta / prior_scale^2."""
    out = []
    for b, (d, sc) in enumerate(zip(datasets, prior_scales)):
        X, y = d.args[0], d.kwargs["y"]
        out.append((y - z[b] @ X.T) @ X - z[b] / sc**2)
    return torch.stack(out)


@pytest.mark.parametrize("model, stacked", [(_regression, True), (_branching_regression, False)])
def test_score_batch_one_pass_over_same_shaped_datasets(model, stacked):
    """Same-shaped datasets go through one vmap pass over datasets and particles; a model that
    cannot be vmapped over its data keeps the loop over datasets. Both give the exact score."""
    from pyro_stein.data import Dataset

    torch.manual_seed(0)
    datasets = [Dataset(randn(30, 3), y=randn(30) + 3.0 * (b % 2)) for b in range(4)]  # 2 branch both ways
    ld = ModelLogDensity(
        model, latent_sites_from_trace(poutine.trace(model).get_trace(*datasets[0].args, **datasets[0].kwargs))
    )
    z = randn(4, 6, 3)
    ld.score_batch(z, datasets)  # first call settles the particle vmap, second may stack
    got = ld.score_batch(z, datasets)
    assert ld._stack_ok is stacked
    scales = [2.0 if (model is _branching_regression and float(d.kwargs["y"].sum()) > 0) else 1.0 for d in datasets]
    want = _exact_regression_score(z, datasets, scales)
    assert torch.allclose(got, want, rtol=1e3 * TOL, atol=1e3 * TOL), f"max diff {(got - want).abs().max()}"


def test_score_batch_keeps_the_loop_for_ragged_datasets():
    from pyro_stein.data import Dataset

    torch.manual_seed(0)
    datasets = [Dataset(randn(20 + 5 * b, 3), y=randn(20 + 5 * b)) for b in range(3)]
    ld = ModelLogDensity(
        _regression,
        latent_sites_from_trace(poutine.trace(_regression).get_trace(*datasets[0].args, **datasets[0].kwargs)),
    )
    z = randn(3, 5, 3)
    for _ in range(2):
        got = ld.score_batch(z, datasets)
    assert ld._stack_ok is None, "ragged datasets must not be stacked"
    want = _exact_regression_score(z, datasets, [1.0] * 3)
    assert torch.allclose(got, want, rtol=1e3 * TOL, atol=1e3 * TOL)
    assert torch.allclose(_loop_scores(ld, z, datasets), got, rtol=TOL, atol=TOL)


def test_score_batch_stacks_datasets_that_share_non_tensor_arguments():
    """model(n, y, scale): the same int n and float scale in every dataset are passed through unbatched."""
    from pyro_stein.data import Dataset

    def mean_model(n, y=None, scale=1.0):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=DTYPE, device=DEVICE), scale))
        with pyro.plate("obs", n):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    torch.manual_seed(0)
    datasets = [Dataset(5, y=randn(5), scale=2.0) for _ in range(3)]
    ld = ModelLogDensity(
        mean_model,
        latent_sites_from_trace(poutine.trace(mean_model).get_trace(*datasets[0].args, **datasets[0].kwargs)),
    )
    z = randn(3, 4, 1)
    ld.score_batch(z, datasets)
    got = ld.score_batch(z, datasets)
    assert ld._stack_ok is True
    want = torch.stack([d.kwargs["y"].sum() - 5 * z[b] - z[b] / 4 for b, d in enumerate(datasets)])  # d/dmu log p
    assert torch.allclose(got, want, rtol=1e3 * TOL, atol=1e3 * TOL), f"max diff {(got - want).abs().max()}"


def _half_normal_scale_model(y):
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=y.dtype, device=y.device)))
    with pyro.plate("d", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_unchecked_evaluation_gives_non_finite_values_on_both_paths(vectorize):
    """check=False (the moment correction, the MCMC polish and the frame search) returns non-finite values for the
    caller to reject on the loop path too, as under vmap (Pyro's validation raised there)."""
    y = torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE, device=DEVICE)
    tr = poutine.trace(_half_normal_scale_model).get_trace(y)
    ld = ModelLogDensity(_half_normal_scale_model, latent_sites_from_trace(tr), vectorize=vectorize)
    u = torch.tensor([[0.0], [-1e4]], dtype=DTYPE, device=DEVICE)  # exp(-1e4) underflows to a zero scale
    with pyro.validation_enabled(True):
        lp, score = ld.log_density_and_score(u, (y,), {}, check=False)
    assert torch.isfinite(lp[0]) and not torch.isfinite(lp[1]), lp


class _PythonBranchNormal(dist.Normal):
    """A log_prob with Python control flow on values: torch.func.vmap cannot batch it."""

    def log_prob(self, value):
        lp = super().log_prob(value)
        return lp - 1.0 if bool((self.loc > 0).all()) else lp


def _branching_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype, device=y.device), 1.0))
    pyro.deterministic("mu2", 2 * mu)
    with pyro.plate("d", y.shape[0]):
        pyro.sample("y", _PythonBranchNormal(mu, 1.0), obs=y)


def test_particles_of_the_wrong_width_are_named():
    y = torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE, device=DEVICE)
    tr = poutine.trace(_half_normal_scale_model).get_trace(y)
    ld = ModelLogDensity(_half_normal_scale_model, latent_sites_from_trace(tr))
    for bad in (torch.zeros(2, 3), torch.zeros(4)):
        with pytest.raises(ValueError, match=r"shape \(num_particles, 1\) for sites \['s'\]"):
            ld.log_density_and_score(bad.to(DTYPE), (y,), {})


def test_the_log_density_chooses_the_evaluation_mode_even_when_a_deterministic_site_comes_first():
    """Asking for deterministic sites first must not fix vmap for a log density that cannot be vmapped."""
    from pyro_stein.logjoint import VectorizationWarning

    y = torch.linspace(-1.0, 1.0, 5, dtype=DTYPE, device=DEVICE)
    tr = poutine.trace(_branching_model).get_trace(y)
    ld = ModelLogDensity(_branching_model, latent_sites_from_trace(tr))
    u = torch.tensor([[0.5], [-0.5], [0.2]], dtype=DTYPE, device=DEVICE)
    with pytest.warns(VectorizationWarning):
        mu2 = ld.deterministic(u, ["mu2"], (y,), {})["mu2"]
    assert ld._mode == "loop" and torch.allclose(mu2, 2 * u[:, 0])
    lp, _ = ld.log_density_and_score(u, (y,), {})
    assert torch.isfinite(lp).all()
