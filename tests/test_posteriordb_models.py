"""The Pyro translations of the reference posteriors (benchmarks.models), checked against their reference draws.

Without Stan, a translation is checked by the Stein identity. Let ``u`` be the model's latent variables mapped to
unconstrained space (the library's packing) and ``s(u) = grad_u log p(u | data)`` the score of the model's log density
there, Jacobian of the map included. Under the exact posterior, and for any posterior with tails light enough,

* ``E[s(u)] = 0`` and
* ``E[s(u) (u - E u)^T] = -I`` (integration by parts).

Both expectations are estimated over the posterior's 10,000 reference draws (10 NUTS chains of 1,000). A wrong prior,
likelihood, transformed-data column or support, or a missing Jacobian, moves the model's posterior away from the one
the draws come from and makes these averages differ from 0 and -I by more than Monte Carlo error. Each average is
divided by its Monte Carlo standard error ``sd / sqrt(ESS)``, the effective sample size taken over the 10 chains
(``pyro.ops.stats.effective_sample_size``), and must lie within 5 standard errors. Negative controls show that the
check fails for a wrong prior and for a dropped Jacobian.
"""

import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value
from pyro.ops.stats import effective_sample_size
from pyro.poutine.util import prune_subsample_sites

from pyro_stein.logjoint import ModelLogDensity, latent_sites_from_trace, pack

# benchmarks/ is not part of the installed package: import it from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import models
from benchmarks.models import (
    BASEBALL,
    BASEBALL_HITS,
    EIGHT_SCHOOLS_CENTERED,
    POSTERIORDB_NAMES,
    REFERENCE_NAMES,
    baseball_model,
    load_baseball,
    load_reference,
)

NUM_CHAINS = 10  # the reference draws are 10 chains of 1,000, concatenated chain by chain
Z_TOL = 5.0  # in Monte Carlo standard errors


def _beta(d):
    return [f"beta[{i}]" for i in range(1, d + 1)]


EXPECTED_NAMES = {
    "eight_schools-eight_schools_noncentered": [f"theta[{i}]" for i in range(1, 9)] + ["mu", "tau"],
    "sblrc-blr": _beta(5) + ["sigma"],
    "kidiq-kidscore_interaction": _beta(4) + ["sigma"],
    "arK-arK": ["alpha"] + _beta(5) + ["sigma"],
    "gp_pois_regr-gp_regr": ["rho", "alpha", "sigma"],
    "arma-arma11": ["mu", "phi", "theta", "sigma"],
    "earnings-earn_height": _beta(2) + ["sigma"],
    "kidiq-kidscore_momiq": _beta(2) + ["sigma"],
    "mesquite-mesquite": _beta(7) + ["sigma"],
    "nes1996-nes": _beta(9) + ["sigma"],
    "sblri-blr": _beta(5) + ["sigma"],
    "kidiq_with_mom_work-kidscore_interaction_c2": _beta(4) + ["sigma"],
    "hmm_example-hmm_example": ["theta1[1]", "theta1[2]", "theta2[1]", "theta2[2]", "mu[1]", "mu[2]"],
    "bball_drive_event_0-hmm_drive_0": [
        "theta1[1]",
        "theta1[2]",
        "theta2[1]",
        "theta2[2]",
        "phi[1]",
        "phi[2]",
        "lambda[1]",
        "lambda[2]",
    ],
    EIGHT_SCHOOLS_CENTERED: [f"theta[{i}]" for i in range(1, 9)] + ["mu", "tau"],
}


@pytest.fixture(autouse=True)
def _point_at_shared_data(shared_data, monkeypatch):
    monkeypatch.setenv("PYRO_STEIN_SHARED_DATA", str(shared_data))


def _latent_sites(model, args, kwargs, values):
    """The packing of the model's latent sites, traced with the latents set to ``values`` (no ``.sample()`` call)."""
    tr = poutine.block(poutine.trace(InitMessenger(init_to_value(values=values))(model)).get_trace)(*args, **kwargs)
    return latent_sites_from_trace(prune_subsample_sites(tr))


_CACHE: dict = {}


@dataclass
class _Scored:
    u: torch.Tensor  # the reference draws in unconstrained space, (num_draws, D)
    lp: torch.Tensor  # the model's log density there (Jacobian included)
    score: torch.Tensor  # its gradient
    ld: ModelLogDensity


def _scores(name, device) -> _Scored:
    """The model's log density and score at all reference draws, in unconstrained space."""
    key = (name, str(device))
    if key not in _CACHE:
        ref = load_reference(name, device=device)
        sites = _latent_sites(ref.model, ref.args, ref.kwargs, {k: v[0] for k, v in ref.draws.items()})
        u = pack({s.name: ref.draws[s.name] for s in sites}, sites)
        ld = ModelLogDensity(ref.model, sites)
        parts = [ld.log_density_and_score(c, ref.args, ref.kwargs, check=False) for c in u.split(1000)]
        lp, score = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        _CACHE[key] = _Scored(u, lp, score, ld)
    return _CACHE[key]


def _mc_z(stat):
    """Each column's mean over the draws ``stat[num_draws, k]``, in Monte Carlo standard errors ``sd / sqrt(ESS)``."""
    n = stat.shape[0]
    assert n % NUM_CHAINS == 0
    chains = stat.reshape(NUM_CHAINS, n // NUM_CHAINS, -1)
    # a few columns at a time: pyro's estimate holds a (draws/2)^2 x columns tensor
    ess = torch.cat([effective_sample_size(c, chain_dim=0, sample_dim=1) for c in chains.split(8, dim=-1)])
    return stat.mean(0) / (stat.std(0) / ess.sqrt()), ess


def _mean_score_z(score):
    return _mc_z(score)


def _score_cov_z(u, score):
    """``E[s (u - mean)^T] + I`` per entry, in Monte Carlo standard errors."""
    d = u.shape[-1]
    prod = score[:, :, None] * (u - u.mean(0))[:, None, :]
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    return _mc_z((prod + eye).reshape(u.shape[0], d * d))


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_loads_with_stan_names_and_site_shapes(name, device):
    ref = load_reference(name, device=device)
    assert ref.param_names == EXPECTED_NAMES[name]
    flat = ref.flat_draws()
    assert flat.shape == (10000, len(EXPECTED_NAMES[name])) and flat.dtype == torch.float64
    trace = poutine.trace(poutine.condition(ref.model, data={k: v[0] for k, v in ref.draws.items()})).get_trace(
        *ref.args, **ref.kwargs
    )
    for site, value in ref.draws.items():
        assert trace.nodes[site]["value"].shape == value.shape[1:], site


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_log_density_finite_and_vectorized(name, device):
    sc = _scores(name, device)
    u, lp, score, ld = sc.u, sc.lp, sc.score, sc.ld
    assert ld._mode == "vmap", f"{name}: the model is not evaluated with torch.func.vmap"
    assert u.shape == (10000, ld.dim)
    assert torch.isfinite(lp).all(), (
        f"{name}: log density not finite at {int((~torch.isfinite(lp)).sum())} reference draws"
    )
    assert torch.isfinite(score).all(), f"{name}: score not finite at some reference draws"
    # every latent coordinate is read by the model: no coordinate has a score that is zero at every draw
    assert (score.abs().amax(0) > 0).all(), f"{name}: some latent coordinates do not enter the log density"


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_mean_score_vanishes_at_reference_draws(name, device):
    """Stein identity ``E[s(u)] = 0`` under the reference posterior, with Monte Carlo error as the tolerance."""
    sc = _scores(name, device)
    u, score = sc.u, sc.score
    z, ess = _mean_score_z(score)
    coords = [f"u[{i}]" for i in range(u.shape[-1])]
    worst = int(z.abs().argmax())
    assert z.abs().max() < Z_TOL, (
        f"{name}: mean score of the translated model at the reference draws is {float(z[worst]):.2f} Monte Carlo "
        f"standard errors (sd/sqrt(ESS), ESS {float(ess[worst]):.0f}) from 0 at unconstrained coordinate "
        f"{coords[worst]}; tolerance {Z_TOL} is Monte Carlo error based; all z: {[round(float(x), 2) for x in z]}. "
        "The translation (priors, likelihood, supports) does not match the reference posterior."
    )


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_score_covariance_identity_at_reference_draws(name, device):
    """Stein identity ``E[s(u) (u - mean)^T] = -I``: it also sees errors in scale (a variance read as a standard
    deviation, a missing data column's spread), with Monte Carlo error as the tolerance."""
    sc = _scores(name, device)
    u, score = sc.u, sc.score
    z, ess = _score_cov_z(u, score)
    d = u.shape[-1]
    worst = int(z.abs().argmax())
    assert z.abs().max() < Z_TOL, (
        f"{name}: E[score (u - mean)^T] + I at entry {divmod(worst, d)} is {float(z[worst]):.2f} Monte Carlo standard "
        f"errors (sd/sqrt(ESS), ESS {float(ess[worst]):.0f}) from 0; tolerance {Z_TOL} is Monte Carlo error based."
    )


# --------------------------------------------------------------------------------------------------
# the check has power: a wrong prior or a dropped Jacobian fails it
# --------------------------------------------------------------------------------------------------


def _schools_tau_halfcauchy_1(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(1.0)))  # the model says HalfCauchy(5)
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_check_detects_a_wrong_prior(device):
    ref = load_reference(EIGHT_SCHOOLS_CENTERED, device=device)
    sites = _latent_sites(_schools_tau_halfcauchy_1, ref.args, ref.kwargs, {k: v[0] for k, v in ref.draws.items()})
    u = pack({s.name: ref.draws[s.name] for s in sites}, sites)
    _, score = ModelLogDensity(_schools_tau_halfcauchy_1, sites).log_density_and_score(u, ref.args, ref.kwargs)
    z, _ = _mean_score_z(score)
    assert z.abs().max() > 2 * Z_TOL, (
        f"a HalfCauchy(1) prior on tau went unnoticed (max |z| {float(z.abs().max()):.2f})"
    )


@pytest.mark.parametrize("name", [EIGHT_SCHOOLS_CENTERED, "hmm_example-hmm_example", "bball_drive_event_0-hmm_drive_0"])
def test_check_detects_a_dropped_jacobian(name, device):
    """The score of the log joint alone (no ``log|det J|`` of the maps to the supports: log for tau, stick-breaking
    for the simplexes, the ordered map) fails the check. (In the regressions with hundreds of rows a dropped Jacobian
    of sigma moves the posterior by far less than a posterior sd, and the check cannot see it.)"""
    sc = _scores(name, device)
    u, score, ld = sc.u, sc.score, sc.ld
    v = u.detach().requires_grad_(True)
    ladj = sum(s.transform.log_abs_det_jacobian(*_split(v, s)).sum() for s in ld.sites)
    (g,) = torch.autograd.grad(ladj, v)
    z, _ = _mean_score_z(score - g)
    assert z.abs().max() > 2 * Z_TOL, f"{name}: a dropped Jacobian went unnoticed (max |z| {float(z.abs().max()):.2f})"


def _split(v, site):
    uu = v[:, site.offset : site.offset + site.size].reshape((v.shape[0],) + site.unconstrained_shape)
    return uu, site.transform(uu)


# --------------------------------------------------------------------------------------------------
# pieces of the translations checked on their own
# --------------------------------------------------------------------------------------------------


def test_hmm_forward_algorithm_matches_enumeration():
    """The forward recursion equals the sum over all state paths (no initial-state term, as in the Stan programs)."""
    g = torch.Generator().manual_seed(0)
    K, N = 2, 7
    log_trans = torch.log_softmax(torch.randn(K, K, generator=g, dtype=torch.float64), -1)
    log_emit = torch.randn(N, K, generator=g, dtype=torch.float64)
    paths = torch.tensor(list(itertools.product(range(K), repeat=N)))
    t = torch.arange(N)
    path_lp = log_emit[t, paths].sum(-1) + log_trans[paths[:, :-1], paths[:, 1:]].sum(-1)
    assert torch.allclose(models._hmm_log_marginal(log_trans, log_emit), torch.logsumexp(path_lp, 0), rtol=1e-12)


def test_nes_age_dummies_and_c2_centering(device):
    """Stan's transformed data: nes's age-group dummies and kidscore_interaction_c2's centred columns."""
    ref = load_reference("nes1996-nes", device=device)
    age = ref.args[2]
    beta = torch.zeros(9, dtype=torch.float64, device=device)
    beta[3:6] = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)  # age30_44, age45_64, age65up
    tr = poutine.trace(poutine.condition(ref.model, data={"beta": beta, "sigma": beta.new_tensor(1.0)})).get_trace(
        *ref.args, **ref.kwargs
    )
    want = torch.zeros_like(age)
    for k, b in ((2, 1.0), (3, 10.0), (4, 100.0)):
        want[age == k] = b
    assert torch.equal(tr.nodes["partyid7"]["fn"].loc, want)
    ref = load_reference("kidiq_with_mom_work-kidscore_interaction_c2", device=device)
    mom_hs, mom_iq = ref.args
    beta = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, device=device)
    tr = poutine.trace(poutine.condition(ref.model, data={"beta": beta, "sigma": beta.new_tensor(1.0)})).get_trace(
        *ref.args, **ref.kwargs
    )
    want = 1 + 2 * (mom_hs - 0.5) + 3 * (mom_iq - 100) + 4 * (mom_hs - 0.5) * (mom_iq - 100)
    assert torch.allclose(tr.nodes["kid_score"]["fn"].loc, want)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid names"):
        load_reference("nope")
    with pytest.raises(ValueError, match="K must be 2"):
        models._POSTERIORDB_MODELS["hmm_example-hmm_example"]({"K": 3, "y": [1.0]}, torch.as_tensor)
    with pytest.raises(ValueError, match="needs the observations y"):
        models.hmm_example(None)
    with pytest.raises(TypeError, match="num_samples"):
        load_baseball(num_samples=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        load_baseball(warmup_steps=-1)


# --------------------------------------------------------------------------------------------------
# Pyro's baseball example: no published reference (load_baseball computes one with NUTS; not run long here)
# --------------------------------------------------------------------------------------------------


def test_baseball_model_and_data(device):
    model, args, kwargs = baseball_model(device=device)
    (at_bats,), hits = args, kwargs["hits"]
    assert hits.shape == at_bats.shape == (18,) and hits.dtype == torch.float64
    assert torch.equal(at_bats, torch.full_like(at_bats, 45.0))
    assert int(hits.sum()) == 215 and hits.tolist() == sorted(hits.tolist(), reverse=True) == list(BASEBALL_HITS)
    # the log joint, against the formula written out
    g = torch.Generator().manual_seed(1)
    loc, scale = torch.tensor(-1.2, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    alpha = -1 + 0.3 * torch.randn(18, generator=g, dtype=torch.float64)
    values = {"loc": loc, "scale": scale, "alpha": alpha}
    tr = poutine.trace(poutine.condition(model, data={k: v.to(device) for k, v in values.items()})).get_trace(
        *args, **kwargs
    )
    h = hits.cpu()
    want = (
        -0.5 * (loc + 1) ** 2
        - 0.5 * math.log(2 * math.pi)
        + math.log(2 / math.pi)
        - torch.log1p(scale**2)
        + (-0.5 * ((alpha - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum()
        + (
            torch.lgamma(torch.tensor(46.0, dtype=torch.float64))
            - torch.lgamma(h + 1)
            - torch.lgamma(46 - h)
            + h * torch.nn.functional.logsigmoid(alpha)
            + (45 - h) * torch.nn.functional.logsigmoid(-alpha)
        ).sum()
    )
    assert torch.allclose(tr.log_prob_sum().cpu(), want, rtol=1e-12)


def test_baseball_reference_by_short_nuts(device):
    ref = load_baseball(num_samples=15, warmup_steps=15, device=device)
    assert ref.name == BASEBALL and ref.param_names == ["loc", "scale"] + [f"alpha[{i}]" for i in range(1, 19)]
    flat = ref.flat_draws()
    assert flat.shape == (15, 20) and torch.isfinite(flat).all() and (ref.draws["scale"] > 0).all()


def test_registered_names():
    assert set(REFERENCE_NAMES) == set(POSTERIORDB_NAMES) | {EIGHT_SCHOOLS_CENTERED}
    assert len(POSTERIORDB_NAMES) == 14 and set(EXPECTED_NAMES) == set(REFERENCE_NAMES)
