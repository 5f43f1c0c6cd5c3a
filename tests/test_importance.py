"""Pareto-smoothed importance sampling, k-hat, resampling and the log evidence."""

import math

import pytest
import torch

from pyro_stein.importance import ess, importance_masses, importance_resample, log_evidence, pareto_khat, psis


def _gaussian_log_weights(sd_target: float, n: int, seed: int = 0, loc_target: float = 0.0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    lw = torch.distributions.Normal(loc_target, sd_target).log_prob(x) - torch.distributions.Normal(0.0, 1.0).log_prob(
        x
    )
    return x, lw


@pytest.mark.parametrize("sd", [0.8, 1.3, 2.0, 3.0])
def test_psis_matches_arviz(sd):
    az = pytest.importorskip("arviz")
    _, lw = _gaussian_log_weights(sd, 3000, seed=1)
    smoothed, khat = psis(lw)
    ref_lw, ref_k = az.psislw(lw.numpy().copy())
    assert float(khat) == pytest.approx(float(ref_k), abs=1e-10)
    torch.testing.assert_close(smoothed, torch.as_tensor(ref_lw), atol=1e-10, rtol=0)
    assert float(torch.logsumexp(smoothed, 0)) == pytest.approx(0.0, abs=1e-10)


def test_khat_of_gaussian_proposals_follows_the_tail_index():
    # a N(0, 1) proposal for a N(0, s^2) target: the weights have a Pareto tail of shape k = 1 - 1/s^2
    good = [float(pareto_khat(_gaussian_log_weights(0.8, 10000, seed)[1])) for seed in range(3)]
    assert max(good) < 0.5  # bounded weights
    bad = [float(pareto_khat(_gaussian_log_weights(4.0, 10000, seed)[1])) for seed in range(3)]
    assert min(bad) > 0.7  # k = 0.94: the proposal misses the target's tails
    mid = [float(pareto_khat(_gaussian_log_weights(math.sqrt(2), 10000, seed)[1])) for seed in range(3)]
    assert all(0.3 < k < 0.75 for k in mid)  # k = 0.5


def test_exact_proposal_has_bounded_weights_and_exact_evidence():
    lw = torch.full((1000,), -2.5, dtype=torch.float64) + 1e-12 * torch.randn(1000, dtype=torch.float64)
    smoothed, khat = psis(lw)
    assert float(khat) == -math.inf
    torch.testing.assert_close(smoothed, torch.full_like(lw, -math.log(1000)))
    log_z, se = log_evidence(lw)
    assert float(log_z) == pytest.approx(-2.5, abs=1e-9)
    assert float(se) < 1e-9


def test_log_evidence_of_a_gaussian():
    # unnormalized target exp(-x^2 / (2 * 1.5^2)): Z = sqrt(2 pi) 1.5; proposal N(0, 2^2)
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(20000, generator=g, dtype=torch.float64)
    lw = -0.5 * (x / 1.5) ** 2 - torch.distributions.Normal(0.0, 2.0).log_prob(x)
    log_z, se = log_evidence(lw)
    exact = math.log(math.sqrt(2 * math.pi) * 1.5)
    assert abs(float(log_z) - exact) < 4 * float(se)
    assert float(se) < 0.01
    assert float(pareto_khat(lw)) < 0.5


def test_batched_and_resampling():
    x, lw = _gaussian_log_weights(1.0, 4000, seed=3, loc_target=1.0)
    lw2 = torch.stack([lw, lw.flip(0)])
    smoothed, khat = psis(lw2)
    assert smoothed.shape == (2, 4000) and khat.shape == (2,)
    assert float(khat[0]) == pytest.approx(float(pareto_khat(lw)))
    assert ess(smoothed).shape == (2,)
    g = torch.Generator().manual_seed(0)
    r = importance_resample(x, lw, 4000, generator=g)
    assert float(r.mean()) == pytest.approx(1.0, abs=0.1)
    rb = importance_resample(torch.stack([x, x.flip(0)]), lw2, 100)
    assert rb.shape == (2, 100)
    d = importance_resample({"a": x, "b": 2 * x}, lw, 50)
    torch.testing.assert_close(d["b"], 2 * d["a"])


def test_infinite_and_invalid_weights():
    _, lw = _gaussian_log_weights(0.9, 500)
    lw[:10] = -math.inf  # draws outside the target's support
    smoothed, khat = psis(lw)
    assert torch.isinf(smoothed[:10]).all() and math.isfinite(float(khat))
    with pytest.raises(ValueError, match="NaN"):
        psis(torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="n >= 2"):
        psis(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="draws"):
        importance_resample(torch.zeros(3), torch.zeros(4))


def test_importance_masses_match_the_truth_within_their_standard_errors():
    # proposal N(0, 1.5^2), target N(0.5, 1): the mass left of 0 is Phi(-0.5) = 0.3085
    g = torch.Generator().manual_seed(3)
    n = 20000
    x = 1.5 * torch.randn(n, generator=g, dtype=torch.float64)
    lw = torch.distributions.Normal(0.5, 1.0).log_prob(x) - torch.distributions.Normal(0.0, 1.5).log_prob(x)
    labels = (x > 0).long()
    masses, se = importance_masses(labels, psis(lw)[0], 2)
    truth = torch.tensor([0.3085375387, 1 - 0.3085375387], dtype=torch.float64)
    assert float(masses.sum()) == pytest.approx(1.0, abs=1e-12)
    assert ((masses - truth).abs() < 4 * se).all()
    assert (se > 0.002).all() and (se < 0.01).all()
    # equal weights: the binomial standard error; an empty region has mass 0 and standard error 0
    masses, se = importance_masses(torch.tensor([0, 0, 0, 2]), None, 3)
    torch.testing.assert_close(masses, torch.tensor([0.75, 0.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(se, torch.tensor([(0.75 * 0.25 / 4) ** 0.5, 0.0, (0.75 * 0.25 / 4) ** 0.5]).double())
    with pytest.raises(ValueError, match="labels must lie"):
        importance_masses(torch.tensor([0, 3]), None, 3)
