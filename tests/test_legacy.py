"""The guide options of earlier versions: each still works, with a FutureWarning naming its new form."""

import numpy as np
import pyro
import pytest
import torch

from pyro_stein import HMC, MALA, Amortization, AmortizedSteinGuide, AmortizedSVGD, MomentCorrection
from pyro_stein.nn import DeepSetEncoder

from .conftest import tensor
from .test_guide import data, linear_gaussian_model


def mean_model(n, y=None):
    mu = pyro.sample("mu", pyro.distributions.Normal(tensor(0.0), tensor(1.0)))
    with pyro.plate("obs", n):
        return pyro.sample("y", pyro.distributions.Normal(mu, 1.0), obs=y)


@pytest.mark.parametrize(
    "kwargs, steps",
    [
        ({"moment_correction": 2}, (MomentCorrection(rounds=2),)),
        ({"moment_correction": 1, "correction_samples": 300}, (MomentCorrection(num_draws=300),)),
        ({"mcmc_steps": 3}, (MALA(steps=3),)),
        ({"mcmc_steps": 3, "mcmc_leapfrog": 4}, (HMC(steps=3, leapfrog=4),)),
        (
            {"moment_correction": 1, "correction_samples": 500, "mcmc_steps": 2, "mcmc_leapfrog": 5},
            (MomentCorrection(num_draws=500), HMC(steps=2, leapfrog=5, num_draws=500)),
        ),
        ({"mcmc_leapfrog": 4}, ()),
    ],
)
def test_old_post_processing_keywords_warn_and_become_steps(kwargs, steps):
    with pytest.warns(
        FutureWarning, match=r"AmortizedSteinGuide\(\w+=\.\.\.\) is deprecated.*(postprocess=|num_draws=)"
    ):
        guide = AmortizedSteinGuide(linear_gaussian_model, **kwargs)
    assert guide.postprocess == steps
    X, y = data(n=10, d=2)
    pyro.set_rng_seed(0)
    old = guide.sample_posterior(9, X, y)["w"]
    pyro.set_rng_seed(0)
    new = AmortizedSteinGuide(linear_gaussian_model, postprocess=steps).sample_posterior(9, X, y)["w"]
    assert torch.equal(old, new), "the old options draw what the steps they stand for draw"


def test_old_post_processing_attributes_read_and_set_the_steps(tmp_path):
    guide = AmortizedSteinGuide(linear_gaussian_model)
    with pytest.warns(FutureWarning, match=r"guide.mcmc_leapfrog is deprecated.*guide.postprocess = \[HMC"):
        guide.mcmc_leapfrog = 5  # remembered, though no step holds it yet
    with pytest.warns(FutureWarning, match="guide.mcmc_steps"):
        guide.mcmc_steps = 10
    assert guide.postprocess == (HMC(steps=10, leapfrog=5),)
    with pytest.warns(FutureWarning, match="guide.(moment_correction|correction_samples)"):
        guide.moment_correction, guide.correction_samples = 2, 400
    assert guide.postprocess == (MomentCorrection(rounds=2, num_draws=400), HMC(steps=10, leapfrog=5, num_draws=400))
    with pytest.warns(FutureWarning, match="is deprecated"):
        assert (guide.moment_correction, guide.correction_samples, guide.mcmc_steps, guide.mcmc_leapfrog) == (
            2,
            400,
            10,
            5,
        )
    guide.postprocess = [MALA(steps=4)]  # the new form: the old attributes describe it
    with pytest.warns(FutureWarning):
        assert (guide.moment_correction, guide.mcmc_steps, guide.mcmc_leapfrog) == (0, 4, 1)
    with pytest.warns(FutureWarning):
        guide.mcmc_steps = 0
    assert guide.postprocess == ()


@pytest.mark.parametrize(
    "option, bad",
    [
        ("moment_correction", -1),
        ("moment_correction", 1.5),
        ("correction_samples", 2.5),
        ("correction_samples", -5),
        ("mcmc_steps", "3"),
        ("mcmc_leapfrog", 0),
        ("laplace_evaluations", 0),
    ],
)
def test_old_options_are_checked_as_before(option, bad):
    """A bad value raises the error of earlier versions (before any warning), set as an attribute or passed."""
    guide = AmortizedSteinGuide(linear_gaussian_model)
    with pytest.warns(FutureWarning):
        before = getattr(guide, option)
    with pytest.raises(ValueError, match=rf"guide.{option} must be an int >= \d+"):
        setattr(guide, option, bad)
    with pytest.warns(FutureWarning):
        assert getattr(guide, option) == before
    with pytest.raises(ValueError, match=rf"{option} must be an int >= \d+"):
        AmortizedSteinGuide(linear_gaussian_model, **{option: bad})


def test_old_integer_options_of_any_integer_type_are_held_as_ints():
    X, y = data(n=10, d=2)
    with pytest.warns(FutureWarning):
        guide = AmortizedSteinGuide(
            linear_gaussian_model, mcmc_steps=np.int64(2), mcmc_leapfrog=np.int64(2), moment_correction=torch.tensor(1)
        ).setup(X, y)
        assert (guide.mcmc_steps, guide.mcmc_leapfrog, guide.moment_correction) == (2, 2, 1)
        assert all(type(v) is int for v in (guide.mcmc_steps, guide.mcmc_leapfrog, guide.moment_correction))
        guide.correction_samples = np.int32(50)
        assert type(guide.correction_samples) is int
    assert guide.sample_posterior(5, X, y)["w"].shape == (5, 2)


def test_old_amortization_keywords_warn_and_become_an_amortization():
    encoder = DeepSetEncoder(1, output_dim=8).to(tensor(0.0))
    fn = lambda n, y=None: y[:, None]  # noqa: E731
    with pytest.warns(
        FutureWarning, match=r"\((dataset_fn|encoder|laplace_evaluations)=\.\.\.\) is deprecated.*Amortization"
    ):
        guide = AmortizedSteinGuide(mean_model, amortized=True, dataset_fn=fn, encoder=encoder, laplace_evaluations=7)
    assert guide.amortization == Amortization(dataset_fn=fn, encoder=encoder, laplace_evaluations=7)
    with pytest.warns(FutureWarning, match=r"guide.laplace_evaluations.*guide.amortization.laplace_evaluations"):
        assert guide.laplace_evaluations == 7
    with pytest.warns(FutureWarning, match=r"setting guide.laplace_evaluations.*Amortization\(laplace_evaluations"):
        guide.laplace_evaluations = 9
    assert guide.amortization.laplace_evaluations == 9
    with pytest.warns(FutureWarning, match="context_dim"):
        assert AmortizedSteinGuide(mean_model, amortized=True, context_dim=6).amortization.context_dim == 6
    with pytest.warns(FutureWarning, match="mean_features"):
        assert not AmortizedSteinGuide(mean_model, amortized=True, mean_features=False).mean_features


def test_old_amortization_keywords_keep_their_errors():
    with pytest.raises(ValueError, match="an encoder was given but amortized=False"):
        AmortizedSteinGuide(mean_model, encoder=DeepSetEncoder(1, output_dim=8))
    with pytest.raises(ValueError, match="pass amortized=True"):
        AmortizedSteinGuide(mean_model, mean_features=True)
    with pytest.raises(ValueError, match=r"context_dim must be an int >= 1, got 0"):
        AmortizedSteinGuide(mean_model, amortized=True, context_dim=0)
    with pytest.raises(ValueError, match=r"inside Amortization\(\.\.\.\)"):
        AmortizedSteinGuide(mean_model, amortized=Amortization(), context_dim=4)
    with pytest.raises(ValueError, match="pass either postprocess"):
        AmortizedSteinGuide(mean_model, postprocess=[MALA()], mcmc_steps=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'mcmc_step'"):
        AmortizedSteinGuide(mean_model, mcmc_step=2)


def test_a_user_chosen_old_polish_is_left_alone_by_the_health_check():
    """``run`` adds its HMC polish only when the post-processing has none; a polish chosen with the old options
    counts, and the population the old ``correction_samples`` set is kept."""
    with pytest.warns(FutureWarning):
        guide = AmortizedSteinGuide(linear_gaussian_model, mcmc_steps=2, correction_samples=300)
    assert not guide.add_polish(HMC(steps=10, leapfrog=5)) and guide.postprocess == (MALA(steps=2, num_draws=300),)
    with pytest.warns(FutureWarning):
        guide = AmortizedSteinGuide(linear_gaussian_model, correction_samples=300)
    assert guide.add_polish(HMC(steps=10, leapfrog=5)) and guide.postprocess == (HMC(num_draws=300),)
    svgd = AmortizedSVGD(linear_gaussian_model, AmortizedSteinGuide(linear_gaussian_model))
    assert svgd.guide.add_polish(HMC()) and svgd.guide.postprocess == (HMC(),)


def test_mean_features_reads_without_a_warning_and_sets_with_one():
    guide = AmortizedSteinGuide(mean_model, amortized=True)
    assert guide.mean_features is True  # the default for an amortized guide without a frame
    with pytest.warns(FutureWarning, match=r"setting guide.mean_features.*Amortization\(mean_features"):
        guide.mean_features = False
    assert guide.mean_features is False and guide.amortization.mean_features is False
    assert AmortizedSteinGuide(mean_model).mean_features is False
