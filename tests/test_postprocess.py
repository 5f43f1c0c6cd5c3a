"""Post-processing of draws: MomentCorrection, MALA and HMC steps, in sample_posterior and as the guide's default."""

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_stein import HMC, MALA, AmortizedSteinGuide, Dataset, MomentCorrection
from pyro_stein.postprocess import PostProcess

from .conftest import tensor
from .test_guide import data, linear_gaussian_model


def _gaussian_posterior(X, y):
    cov = torch.linalg.inv(torch.eye(X.shape[-1], dtype=X.dtype, device=X.device) + X.T @ X / 0.25)
    return cov @ X.T @ y / 0.25, cov


def test_moment_correction_makes_an_untrained_guide_exact_on_a_gaussian_posterior():
    X, _ = data(n=40, d=3)
    y = X @ tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(
        40, dtype=X.dtype, generator=torch.Generator().manual_seed(1)
    ).to(X)
    mean, cov = _gaussian_posterior(X, y)
    guide = AmortizedSteinGuide(linear_gaussian_model, whiten=None)
    # no training: the sampler is N(0, 0.1^2 I)
    w = guide.sample_posterior(2000, X, y, postprocess=[MomentCorrection(num_draws=2000)])["w"]
    # the posterior is Gaussian and the scores linear, so one round is exact up to rounding
    tol = 1e-8 if X.dtype == torch.float64 else 1e-3
    assert torch.allclose(w.mean(0), mean, atol=tol, rtol=0), f"{w.mean(0)} vs exact {mean}"
    assert torch.allclose(torch.cov(w.T), cov, atol=tol, rtol=0)
    w0 = guide.sample_posterior(2000, X, y)["w"]  # the guide's default: no post-processing
    assert ((w0.mean(0) - mean).abs() / cov.diagonal().sqrt()).max() > 10, "without the correction it is far off"


def test_the_guides_default_post_processing_is_used_saved_and_overridden(tmp_path):
    X, y = data(n=10, d=2)
    steps = [MomentCorrection(rounds=2, num_draws=300), HMC(steps=2, leapfrog=3, num_draws=300)]
    guide = AmortizedSteinGuide(linear_gaussian_model, postprocess=steps).setup(X, y)
    assert guide.postprocess == tuple(steps)
    guide.save(tmp_path / "g.pt")
    loaded = AmortizedSteinGuide.load(tmp_path / "g.pt", linear_gaussian_model, X, y)
    assert loaded.postprocess == tuple(steps)
    for g in (guide, loaded):  # the default, and the same steps passed explicitly, give the same draws
        pyro.set_rng_seed(0)
        a = g.sample_posterior(7, X, y)["w"]
        pyro.set_rng_seed(0)
        b = g.sample_posterior(7, X, y, postprocess=steps)["w"]
        assert a.shape == (7, 2) and torch.equal(a, b)
    pyro.set_rng_seed(0)
    raw = guide.sample_posterior(7, X, y, postprocess=[])["w"]  # none for this call
    pyro.set_rng_seed(0)
    guide.postprocess = None
    assert torch.equal(raw, guide.sample_posterior(7, X, y)["w"]) and guide.postprocess == ()
    guide.postprocess = MALA(steps=2)  # one step
    assert guide.postprocess == (MALA(steps=2),)


@pytest.mark.parametrize("polish", [MALA(steps=10, num_draws=2000), HMC(steps=3, leapfrog=4, num_draws=2000)])
def test_polish_keeps_exact_draws_exact_per_dataset_in_a_batch(polish):
    """Wiring of MALA and HMC: the (exact) corrected draws of each dataset are polished under that dataset's own
    posterior; polishing under another dataset's posterior would move them several sd."""
    g = torch.Generator().manual_seed(3)
    sets = []
    for n, w in ((40, [1.0, -2.0, 0.5]), (25, [-1.5, 0.0, 2.0])):
        X = torch.randn(n, 3, generator=g, dtype=torch.float64).to(tensor(0.0))
        sets.append(Dataset(X, y=X @ tensor(w) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64).to(X)))
    guide = AmortizedSteinGuide(linear_gaussian_model, amortized=True)
    torch.manual_seed(0)
    w = guide.sample_posterior_batch(2000, sets, postprocess=[MomentCorrection(num_draws=2000), polish])["w"]
    for i, d in enumerate(sets):
        mean, cov = _gaussian_posterior(d.args[0], d.kwargs["y"])
        sd = cov.diagonal().sqrt()
        z = ((w[i].mean(0) - mean).abs() / (sd / math.sqrt(2000))).max()
        ratio = w[i].std(0) / sd
        # i.i.d. chains: s.e. of the mean sd/sqrt(n); of the sd ratio ~ 1/sqrt(2n) = 0.016
        assert z < 5 and (ratio - 1).abs().max() < 5 / math.sqrt(2 * 2000), (
            f"dataset {i}: mean error {z:.2f} Monte Carlo s.e. (limit 5), sd ratios {ratio.tolist()} (limit 1 +- 0.079)"
        )
    torch.manual_seed(0)
    unpolished = guide.sample_posterior_batch(2000, sets, postprocess=[MomentCorrection(num_draws=2000)])["w"]
    assert not torch.equal(unpolished, w), "the polish had no effect"


@pytest.mark.parametrize("leapfrog", [1, 3], ids=["mala", "hmc"])
def test_polish_reuses_the_corrections_last_evaluation(leapfrog):
    """After a MomentCorrection the polish starts from the log density and score the correction already has:
    ``steps`` MALA steps cost exactly ``steps`` more model evaluations (HMC: ``steps * leapfrog``)."""
    X, y = data(n=30, d=2)
    guide = AmortizedSteinGuide(linear_gaussian_model).setup(X, y)
    ld = guide.log_density
    original, calls = ld.log_density_and_score, []

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    ld.log_density_and_score = counted
    counts = []
    for steps in (0, 4):
        polish = [] if not steps else [MALA(steps=steps)] if leapfrog == 1 else [HMC(steps=steps, leapfrog=leapfrog)]
        calls.clear()
        guide.sample_posterior(500, X, y, postprocess=[MomentCorrection(), *polish])
        counts.append(len(calls))
    assert counts[1] - counts[0] == 4 * leapfrog, f"model evaluations without / with the polish: {counts}"


@pytest.mark.parametrize("correction", [0, 1])
def test_small_requests_are_polished_within_a_full_population(correction):
    """The MCMC preconditioner is the covariance of the draws polished, so ``sample_posterior(k)`` with ``k`` below
    the steps' ``num_draws`` polishes ``num_draws`` draws and returns the first ``k`` (2 draws alone would give a
    degenerate preconditioner, 1 an error)."""
    X, y = data(n=30, d=2)
    steps = [MomentCorrection(num_draws=300)] * correction + [MALA(steps=3, num_draws=300)]
    guide = AmortizedSteinGuide(linear_gaussian_model, postprocess=steps).setup(X, y)
    draws = []
    for k in (1, 2, 300):
        torch.manual_seed(0)
        draws.append(guide.sample_posterior(k, X, y)["w"])
    assert [tuple(d.shape) for d in draws] == [(1, 2), (2, 2), (300, 2)]
    assert torch.equal(draws[0], draws[2][:1]) and torch.equal(draws[1], draws[2][:2])


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: MomentCorrection(rounds=0), ValueError, "MomentCorrection.rounds must be an int >= 1, got 0"),
        (lambda: MomentCorrection(rounds=1.5), ValueError, "MomentCorrection.rounds must be an int >= 1"),
        (lambda: MomentCorrection(num_draws=2), ValueError, "MomentCorrection.num_draws must be an int >= 3, got 2"),
        (lambda: MomentCorrection(covariance="yes"), TypeError, "MomentCorrection.covariance must be True or False"),
        (lambda: MALA(steps=0), ValueError, "MALA.steps must be an int >= 1, got 0"),
        (lambda: MALA(steps=True), ValueError, "MALA.steps must be an int >= 1"),
        (lambda: HMC(leapfrog=0), ValueError, "HMC.leapfrog must be an int >= 1, got 0"),
        (lambda: HMC(steps="3"), ValueError, "HMC.steps must be an int >= 1"),
    ],
)
def test_bad_step_options_are_refused_naming_them(make, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        make()


def test_bad_postprocess_arguments_are_refused():
    X, y = data(n=10, d=2)
    with pytest.raises(TypeError, match=r"postprocess must be a list of post-processing steps.*MomentCorrection"):
        AmortizedSteinGuide(linear_gaussian_model, postprocess=["MomentCorrection"])
    guide = AmortizedSteinGuide(linear_gaussian_model)
    with pytest.raises(TypeError, match="postprocess must be a list"):
        guide.postprocess = 3
    with pytest.raises(TypeError, match="postprocess must be a list"):
        guide.sample_posterior(5, X, y, postprocess=(MALA, 3))
    assert guide.postprocess == ()


def test_integer_options_of_any_integer_type_are_held_as_ints():
    """numpy and 0-d tensor integers are accepted and held as ints (the polish refuses other types)."""
    X, y = data(n=10, d=2)
    steps = (
        MomentCorrection(rounds=torch.tensor(1)),
        HMC(steps=np.int64(2), leapfrog=np.int64(2), num_draws=np.int32(50)),
    )
    assert all(type(getattr(s, f)) is int for s in steps for f in ("num_draws",))
    assert (steps[0].rounds, steps[1].steps, steps[1].leapfrog) == (1, 2, 2)
    assert all(type(v) is int for v in (steps[0].rounds, steps[1].steps, steps[1].leapfrog))
    guide = AmortizedSteinGuide(linear_gaussian_model, postprocess=steps).setup(X, y)
    assert guide.sample_posterior(5, X, y)["w"].shape == (5, 2)


def test_steps_serialise_and_refuse_unknown_ones():
    for step in (MomentCorrection(rounds=2, covariance=False), MALA(steps=4, num_draws=50), HMC(steps=1, leapfrog=7)):
        d = step.to_dict()
        assert d["name"] == type(step).__name__ and PostProcess.from_dict(d) == step
    with pytest.raises(ValueError, match="'name' one of"):
        PostProcess.from_dict({"name": "Langevin", "steps": 3})
    with pytest.raises(ValueError, match=r"MALA has no option\(s\) \['leapfrog'\]"):
        PostProcess.from_dict({"name": "MALA", "steps": 3, "leapfrog": 2})
