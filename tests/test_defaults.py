"""The no-options path: the automatic frame, the funnel reparametrisation, the default polish, the starting-point
check, the driver's defaults and its health warnings."""

import math
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from torch.distributions import constraints

from pyro_stein import HMC, MALA, AmortizedSteinGuide, AmortizedSVGD, MomentCorrection
from pyro_stein.infer import DEFAULT_NUM_STEPS, TrainingWarning, _history_problems

from .conftest import DEVICE, tensor

DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "posteriordb" / "eight_schools-eight_schools_noncentered"
)
SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def conjugate_model(y, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 10.0))
    with pyro.plate("data", y.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal(mu, 2.0), obs=y[idx])


def conjugate_posterior(y):
    """The exact posterior of ``mu`` in :func:`conjugate_model`: ``(mean, sd)``."""
    prec = 1 / 10.0**2 + y.shape[0] / 2.0**2
    return (y.sum() / 2.0**2) / prec, prec**-0.5


def flat_model(x):
    pyro.sample("a", dist.Normal(x.new_zeros(()), 1.0))
    pyro.sample("b", dist.ImproperUniform(constraints.real, (), ()))  # no mode in b


def centred_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(sigma.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("J", sigma.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def schools_data():
    return tensor(SCHOOLS_SIGMA), tensor(SCHOOLS_Y)


# ---------------------------------------------------------------------------------------------------- frame choice
def test_auto_frame_is_laplace_where_the_posterior_has_a_mode():
    y = tensor([1.0, 2.0, 0.5, 3.0])
    guide = AmortizedSteinGuide(conjugate_model).setup(y)
    assert guide.frame_request == "auto" and guide.whiten == "laplace" and not guide.adaptive_frame
    assert guide.frame_fallback_reason is None and guide.reparam_sites == []
    mean, sd = conjugate_posterior(y)
    # a Gaussian posterior: the Laplace frame is exact (float64: to rounding; float32: the mode search's tolerance)
    tol = 1e-6 if y.dtype == torch.float64 else 1e-3
    assert abs(float(guide.whiten_loc[0]) - float(mean)) < tol * float(sd)
    assert abs(float(guide.whiten_scale[0, 0]) - float(sd)) < tol * float(sd)


def test_auto_frame_falls_back_to_an_adaptive_frame_without_a_mode():
    guide = AmortizedSteinGuide(flat_model).setup(tensor(0.0))
    assert guide.whiten is None and guide.adaptive_frame
    assert "not positive definite" in guide.frame_fallback_reason
    with pytest.raises(ValueError, match="not positive definite"):  # the explicit request still raises
        AmortizedSteinGuide(flat_model, whiten="laplace").setup(tensor(0.0))


def test_auto_frame_of_a_subsampled_model_uses_the_full_data():
    y = torch.linspace(-1.0, 3.0, 40, dtype=torch.get_default_dtype(), device=DEVICE)
    guide = AmortizedSteinGuide(conjugate_model).setup(y, 10)
    assert guide.subsample_plates == {"data": (40, 10)} and guide.whiten == "laplace"
    mean, sd = conjugate_posterior(y)
    tol = 1e-6 if y.dtype == torch.float64 else 1e-3
    assert abs(float(guide.whiten_loc[0]) - float(mean)) < tol * float(sd), "the frame is the full posterior's"


def test_auto_frame_non_centres_a_funnel():
    sigma, y = schools_data()
    guide = AmortizedSteinGuide(centred_schools).setup(sigma, y)
    assert guide.reparam_sites == ["theta"] and guide.whiten == "laplace"
    assert "theta_decentered" in [s.name for s in guide.sites]
    assert "no proper mode" in guide.frame_fallback_reason
    s = guide.sample_posterior(7, sigma, y)
    torch.testing.assert_close(s["theta"], s["mu"][:, None] + s["tau"][:, None] * s["theta_decentered"])
    pred = Predictive(centred_schools, guide=guide, num_samples=5)(sigma)
    assert pred["y"].shape == (5, 8) and pred["theta"].shape == (5, 8)
    q = guide.quantiles([0.25, 0.75], sigma, y)
    assert q["theta"].shape == (2, 8) and (q["theta"][0] < q["theta"][1]).all()


def test_set_up_again_non_centred_starts_from_the_initialisation():
    """The second set-up (non-centred) traces the model under the initialisation, as the first: its starting point
    is the prior mean, not a draw from the prior."""
    sigma, y = schools_data()
    guide = AmortizedSteinGuide(centred_schools).setup(sigma, y)
    assert guide.reparam_sites == ["theta"]
    init = guide.init_values()
    assert float(init["mu"]) == 0.0 and (init["theta_decentered"] == 0).all(), init


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data (posteriordb reference draws)")
def test_centred_funnel_trains_to_the_reference_posterior():
    """Centred eight schools with no options, against posteriordb's reference draws of the same posterior (10 chains
    of 1,000 NUTS draws). Targets: every mean within 0.2 posterior sd and every sd within 15 %; with 4,000
    independent draws the Monte Carlo s.e. of a mean is 0.016 sd and of an sd ratio about 1.1 %."""
    import json

    chains = json.loads((DATA / "reference_draws.json").read_text())
    ref = {k: torch.tensor([c[k] for c in chains], dtype=torch.float64).reshape(-1) for k in chains[0]}
    names = ["mu", "tau"] + [f"theta[{j}]" for j in range(1, 9)]
    ref = torch.stack([ref[n] for n in names], -1)
    sigma, y = schools_data()
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(centred_schools)
    AmortizedSVGD(centred_schools, guide).run(sigma, y, progress_bar=False)
    s = guide.sample_posterior(4000, sigma, y)
    draws = torch.cat([s["mu"][:, None], s["tau"][:, None], s["theta"]], -1).double().cpu()
    err = ((draws.mean(0) - ref.mean(0)).abs() / ref.std(0)).max()
    ratio = draws.std(0) / ref.std(0)
    assert err < 0.2, f"worst mean error {err:.3f} posterior sd (Monte Carlo s.e. 0.016)"
    assert ((ratio - 1).abs() < 0.15).all(), f"sd ratios {ratio.tolist()} (Monte Carlo s.e. about 0.011)"


def neals_funnel(dim: int = 9):
    v = pyro.sample("v", dist.Normal(tensor(0.0), 3.0))
    pyro.sample("x", dist.Normal(tensor([0.0] * dim), torch.exp(v / 2)).to_event(1))


def rich_hierarchy(y):
    """A centred hierarchical model with much data per group: its own parameterisation is the better one."""
    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(y.new_tensor(5.0)))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta.unsqueeze(-1), 0.3).to_event(1), obs=y)


def test_mode_search_backs_off_from_a_non_finite_log_density():
    """A line search that steps where the log density is not finite (here: beyond z = 3, as a model whose rate
    overflows) restarts from the best point with a shorter step and still finds the mode, log 3 in each coordinate
    of -sum(exp(z) - 3 z), with L L^T = H^{-1} = I / 3."""
    from pyro_stein.frames import laplace_frame

    tried_outside = []

    def neg_log_p(z):
        value = (z.exp() - 3 * z).sum()
        if (z > 3).any():
            tried_outside.append(1)
            return value * float("nan")
        return value

    mode, scale = laplace_frame(neg_log_p, tensor([-5.0, -5.0, -5.0]))
    assert tried_outside, "the case must make the search step outside the finite region"
    assert torch.allclose(mode, tensor([math.log(3.0)] * 3), atol=1e-6), mode
    assert torch.allclose(scale @ scale.T, tensor(torch.eye(3)) / 3, atol=1e-6), scale


def test_laplace_elbo_of_an_exact_gaussian_is_the_log_evidence():
    """For ``p(z) = Z N(z; m, S)`` and ``q = N(m, S)``, ``log p - log q = log Z`` at every draw: the estimate is
    exact."""
    from pyro_stein.frames import laplace_elbo

    loc = tensor([1.0, -2.0, 0.5])
    scale = torch.linalg.cholesky(tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]]))
    log_z = 3.7
    target = dist.MultivariateNormal(loc, scale_tril=scale)
    elbo = laplace_elbo(lambda z: target.log_prob(z) + log_z, loc, scale)
    tol = 1e-10 if loc.dtype == torch.float64 else 1e-4
    assert abs(elbo - log_z) < tol * 10, f"ELBO {elbo} against log Z {log_z}"
    assert laplace_elbo(lambda z: torch.full_like(z[:, 0], -math.inf), loc, scale) == -math.inf


def test_auto_frame_non_centres_a_funnel_whose_mode_is_degenerate():
    """Neal's funnel has a proper mode (v = -40.5, x = 0) far from its mass: the Laplace frame there has a far lower
    ELBO than the non-centred model's, whose posterior is exactly Gaussian."""
    guide = AmortizedSteinGuide(neals_funnel).setup()
    assert guide.reparam_sites == ["x"] and guide.whiten == "laplace"
    centred, noncentred = guide.frame.compared
    assert noncentred > centred + 100, (centred, noncentred)
    assert "higher evidence lower bound" in guide.frame_fallback_reason
    # non-centred, the posterior is N(0, 3^2) x N(0, I): the Laplace frame is exact
    tol = 1e-5 if guide.whiten_loc.dtype == torch.float64 else 1e-3
    assert guide.whiten_loc.abs().max() < tol
    torch.testing.assert_close(guide.whiten_scale.diagonal().abs(), tensor([3.0] + [1.0] * 9), atol=tol, rtol=tol)


def test_auto_frame_keeps_a_centred_model_whose_own_mode_fits_better():
    y = torch.linspace(-2.0, 3.0, 6, dtype=torch.get_default_dtype(), device=DEVICE)[:, None]
    y = y + 0.3 * torch.linspace(-1.0, 1.0, 40, dtype=y.dtype, device=DEVICE)
    guide = AmortizedSteinGuide(rich_hierarchy).setup(y)
    assert guide.reparam_sites == [] and guide.whiten == "laplace" and guide.frame_fallback_reason is None
    assert [s.name for s in guide.sites] == ["mu", "tau", "theta"]


def test_neals_funnel_trains_to_its_exact_posterior():
    """No options on Neal's funnel (10 dimensions): ``v ~ N(0, 3^2)`` exactly. With 4,000 independent draws the
    Monte Carlo s.e. of v's mean is 0.047 and of its sd about 0.034; tolerances are 4 s.e."""
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(neals_funnel)
    AmortizedSVGD(neals_funnel, guide).run(num_steps=500, progress_bar=False)
    s = guide.sample_posterior(4000)
    v, x1 = s["v"].double().cpu(), s["x"][:, 0].double().cpu()
    assert abs(float(v.mean())) < 4 * 0.047, f"mean of v {float(v.mean()):.3f} (exact 0, Monte Carlo s.e. 0.047)"
    assert abs(float(v.std()) - 3.0) < 4 * 0.034, f"sd of v {float(v.std()):.3f} (exact 3, Monte Carlo s.e. 0.034)"
    # x1 given v is N(0, e^v): its standardised form x1 e^{-v/2} is N(0, 1), independent of v
    r = x1 * torch.exp(-v / 2)
    assert abs(float(r.std()) - 1.0) < 4 * 0.011, f"sd of x1 e^(-v/2) {float(r.std()):.3f} (exact 1, s.e. 0.011)"


# ---------------------------------------------------------------------------------------------------- default polish
def test_run_calibrates_a_single_dataset_guide_and_sampling_is_raw():
    y = tensor([1.0, 2.0, 0.5, 3.0, -0.4, 2.2])
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(conjugate_model)
    assert guide.postprocess == (), "sample_posterior costs one forward pass"
    loc = None
    svgd = AmortizedSVGD(conjugate_model, guide)
    svgd.run(y, num_steps=300, progress_bar=False, calibrate=False, check_health=False)
    loc = guide.whiten_loc.clone()
    guide.calibrate(y)
    assert guide.num_calibrations in (0, 1)
    if guide.num_calibrations:
        assert not torch.equal(loc, guide.whiten_loc), "the shift is folded into the frame"
    torch.testing.assert_close(guide.whiten_scale, guide.whiten_scale)
    with pytest.raises(ValueError, match="amortized guide corrects each dataset's draws"):
        AmortizedSteinGuide(conjugate_model, amortized=True).calibrate(y)


def test_calibration_gives_a_frameless_guide_an_affine_frame(tmp_path):
    """A guide without a frame that is off in its mean gets the shift as its frame, which survives save/load."""
    y = tensor([1.0, 2.0, 0.5, 3.0, -0.4, 2.2])
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(conjugate_model, whiten=None, init_scale=0.5).setup(y)
    guide.calibrate(y)  # untrained: the sampler sits at the prior mean, far from the posterior's
    assert guide.whiten == "affine" and guide.num_calibrations == 1
    mean, sd = conjugate_posterior(y)
    mu = guide.sample_posterior(4000, y)["mu"]
    # each location step is a Newton step with the draws' variance v = 0.25 for the posterior's 1 / P: from the start
    # 0 it leaves (1 - v P)^2 of the distance to the exact mean after two rounds (the draws' variance and mean carry
    # Monte Carlo errors of 2 % and 0.008 at 4,000 draws, about 0.02 in the prediction)
    precision = 1 / sd**2
    predicted = mean * (1 - (1 - 0.25 * precision) ** 2)
    assert abs(float(mu.mean() - predicted)) < 0.05, f"mean {float(mu.mean()):.4f}, predicted {float(predicted):.4f}"
    guide.save(tmp_path / "g.pt")
    loaded = AmortizedSteinGuide.load(tmp_path / "g.pt", conjugate_model, y)
    assert loaded.whiten == "affine"
    torch.testing.assert_close(loaded.whiten_loc, guide.whiten_loc, rtol=0, atol=0)


def test_default_polish_after_minibatch_training_uses_the_full_data():
    """Trained on minibatches of 10 of 200 rows, then calibrated and polished (2 correction rounds, 2 HMC steps of 5
    leapfrogs) with the full data passed: both evaluate all rows, so the draws match the exact Gaussian posterior.
    4,000 draws: Monte Carlo s.e. of the mean 0.016 sd, of the sd about 1.1 %."""
    g = torch.Generator().manual_seed(0)
    y = (1.5 + 2.0 * torch.randn(200, generator=g)).to(device=DEVICE, dtype=torch.get_default_dtype())
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(conjugate_model, postprocess=[MomentCorrection(rounds=2), HMC(steps=2, leapfrog=5)])
    AmortizedSVGD(conjugate_model, guide).run(y, 10, num_steps=300, progress_bar=False, check_health=False)
    mean, sd = conjugate_posterior(y)
    mu = guide.sample_posterior(4000, y, 10)["mu"]
    assert abs(float(mu.mean() - mean)) / float(sd) < 0.1, f"mean {float(mu.mean()):.4f} vs exact {float(mean):.4f}"
    assert abs(float(mu.std()) / float(sd) - 1) < 0.1, f"sd {float(mu.std()):.4f} vs exact {float(sd):.4f}"


# ---------------------------------------------------------------------------------------------------- starting point
def test_a_singular_starting_point_is_moved_off():
    """At the prior mean s = 0 the likelihood's scale is 1e-6: log density about -1e12, score about 1e18."""
    y = tensor([0.3, -0.8, 1.1])

    def model(y):
        s = pyro.sample("s", dist.Normal(y.new_zeros(()), 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(0.0, (s + 1e-6).abs()), obs=y)

    guide = AmortizedSteinGuide(model, whiten=None, init_scale=1e-3).setup(y)
    z = guide.draw(64).detach()
    lp, score = guide.log_density.log_density_and_score(z, (y,), check=False)
    assert float(z.abs().min()) > 1e-2, "the sampler must start off the singular point s = 0"
    assert torch.isfinite(lp).all() and float(score.abs().max()) < 1e6


# ---------------------------------------------------------------------------------------------------- driver defaults
def test_driver_defaults_and_the_deprecated_step_count():
    y = tensor([1.0, 2.0, 0.5, 3.0])
    guide = AmortizedSteinGuide(conjugate_model)
    svgd = AmortizedSVGD(conjugate_model, guide)
    assert svgd.optim.pt_optim_constructor.__name__ == "ClippedAdam"
    with pytest.warns(FutureWarning, match=r"run\(\*model_args, num_steps=3\)"):
        assert len(svgd.run(3, y, progress_bar=False)) == 3
    assert DEFAULT_NUM_STEPS == 1500


def test_default_run_is_accurate_on_a_conjugate_posterior():
    """The no-options path, end to end, against the exact posterior (4,000 draws: Monte Carlo s.e. of the mean
    0.016 sd, of the sd about 1.1 %)."""
    y = tensor([1.0, 2.0, 0.5, 3.0, -0.4, 2.2])
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(conjugate_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)  # a healthy run says nothing
        AmortizedSVGD(conjugate_model, guide).run(y, progress_bar=False)
    mean, sd = conjugate_posterior(y)
    mu = guide.sample_posterior(4000, y)["mu"]
    assert abs(float(mu.mean() - mean)) / float(sd) < 0.1 and abs(float(mu.std()) / float(sd) - 1) < 0.1


# ---------------------------------------------------------------------------------------------------- health
def test_history_problems_flag_divergence_and_no_settling():
    healthy = [1.0 / (1 + k) + 0.01 for k in range(400)]
    assert _history_problems(healthy) == []
    assert "non-finite at step 7" in _history_problems([0.1] * 7 + [math.nan] + [0.1] * 300)[0]
    diverged = [0.01] * 300 + [50.0] * 100
    assert "diverged" in _history_problems(diverged)[0]
    moving = [0.01] * 320 + [0.05] * 40 + [0.2] * 40
    assert "not settled" in _history_problems(moving)[0]
    assert _history_problems([0.5] * 50) == [], "too short to judge"


def test_collapsed_draws_are_reported():
    """The centred funnel in its own parameterisation with no frame: the group scale collapses."""
    sigma, y = schools_data()
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(centred_schools, whiten=None)
    with pytest.warns(TrainingWarning, match=r"narrower than the posterior.*polishes this guide's draws"):
        AmortizedSVGD(centred_schools, guide).run(sigma, y, num_steps=600, progress_bar=False)
    assert guide.postprocess == (HMC(steps=10, leapfrog=5),), "a collapsed guide's draws are polished from then on"
    kept = AmortizedSteinGuide(centred_schools, whiten=None, postprocess=[MALA(steps=2)])
    pyro.set_rng_seed(0)
    with pytest.warns(TrainingWarning, match=r"narrower than the posterior"):
        AmortizedSVGD(centred_schools, kept).run(sigma, y, num_steps=600, progress_bar=False)
    assert kept.postprocess == (MALA(steps=2),), "a polish the user chose is left alone"


def skewed_model(shape):
    pyro.sample("x", dist.Gamma(shape, shape.new_tensor(1.0)))


def test_draws_that_hmc_moves_far_are_reported():
    """log x for x ~ Gamma(0.2, 1) is far from Gaussian: its mean is 1.6 Laplace sds below the mode and its sd 2.3
    times the Laplace sd. A guide trained for a few steps still draws near the Laplace approximation, which Stein's
    linear identities do not flag here; a few HMC steps move those draws far, and run() says so and polishes."""
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(skewed_model)
    with pytest.warns(TrainingWarning, match=r"HMC steps.*moved the guide's draws of site\(s\) \['x'\]"):
        AmortizedSVGD(skewed_model, guide).run(tensor(0.2), num_steps=3, progress_bar=False)
    assert guide.postprocess == (HMC(steps=10, leapfrog=5),)


def test_health_checks_leave_the_random_stream_alone():
    y = tensor([1.0, 2.0, 0.5, 3.0])
    states = []
    for check in (True, False):
        pyro.set_rng_seed(3)
        guide = AmortizedSteinGuide(conjugate_model)
        AmortizedSVGD(conjugate_model, guide).run(y, num_steps=5, progress_bar=False, check_health=check)
        states.append(torch.randn(3))
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)


def test_a_non_centred_guide_round_trips_through_save_and_load(tmp_path):
    sigma, y = schools_data()
    guide = AmortizedSteinGuide(centred_schools).setup(sigma, y)
    guide.save(tmp_path / "g.pt")
    loaded = AmortizedSteinGuide.load(tmp_path / "g.pt", centred_schools, sigma, y)
    assert loaded.reparam_sites == ["theta"] and loaded.whiten == "laplace"
    draws = []
    for g in (guide, loaded):
        pyro.set_rng_seed(4)
        draws.append(g.sample_posterior(5, sigma, y)["theta"])
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
