"""Devices, dtypes, save/load, resume and reproducibility."""

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD, Dataset

from .conftest import DEVICE


def make_model(dtype, device=DEVICE):
    def model(y):
        lam = pyro.sample("lam", dist.Gamma(torch.tensor(3.0, dtype=dtype, device=device), 1.0))
        scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(1.0, dtype=dtype, device=device)))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(lam + 0 * scale), obs=y)

    return model


def y_data(dtype=torch.float64, device=DEVICE):
    return torch.tensor([2.0, 4.0, 3.0, 5.0, 1.0, 0.0, 3.0], dtype=dtype, device=device)


def train(model, y, steps, guide=None, state=None):
    guide = guide or AmortizedSteinGuide(model)
    svgd = AmortizedSVGD(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.999}), num_particles=16)
    if state is not None:
        svgd.set_state(state)
    # chunks of one training: the calibration and the health checks' polish that end a run would change the guide
    # between chunks
    svgd.run(y, num_steps=steps, progress_bar=False, calibrate=False, check_health=False)
    return guide, svgd


def params_of(guide):
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


def test_seeded_training_and_sampling_repeat_bit_for_bit():
    model, y = make_model(torch.float64), y_data()
    pyro.set_rng_seed(11)
    g1, _ = train(model, y, 30)
    s1 = g1.sample_posterior(50, y)
    pyro.clear_param_store()
    pyro.set_rng_seed(11)
    g2, _ = train(model, y, 30)
    s2 = g2.sample_posterior(50, y)
    p1, p2 = params_of(g1), params_of(g2)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_fresh_guide_load_state_dict_after_setup():
    model, y = make_model(torch.float64), y_data()
    pyro.set_rng_seed(0)
    g1, _ = train(model, y, 20)
    g2 = AmortizedSteinGuide(model).setup(y)  # the documented one-liner that creates the parameters
    g2.load_state_dict(g1.state_dict())
    pyro.set_rng_seed(1)
    a = g1.sample_posterior(10, y)["lam"]
    pyro.set_rng_seed(1)
    b = g2.sample_posterior(10, y)["lam"]
    assert torch.equal(a, b)


def test_save_load_round_trip_with_map_location(tmp_path):
    model, y = make_model(torch.float64), y_data()
    pyro.set_rng_seed(0)
    g1, _ = train(model, y, 20)
    g1.save(tmp_path / "guide.pt")
    g2 = AmortizedSteinGuide.load(tmp_path / "guide.pt", model, y, map_location="cpu")
    p1, p2 = params_of(g1), params_of(g2)
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k].cpu(), p2[k].cpu()) for k in p1)
    with pytest.raises(ValueError, match="do not match"):

        def other(y):
            pyro.sample("lam", dist.Gamma(torch.tensor(3.0, dtype=y.dtype, device=y.device), 1.0))

        AmortizedSteinGuide.load(tmp_path / "guide.pt", other, y)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by"):
        AmortizedSteinGuide.load(tmp_path / "other.pt", model, y)


def test_save_load_amortized_guide(tmp_path):
    def model(n, y=None):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64, device=DEVICE), 1.0))
        with pyro.plate("obs", n):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.randn(9, dtype=torch.float64, device=DEVICE)
    g1 = AmortizedSteinGuide(model, amortized=True).setup(9, y=y)
    g1.save(tmp_path / "a.pt")
    g2 = AmortizedSteinGuide.load(tmp_path / "a.pt", model, 9, y=y)
    pyro.set_rng_seed(2)
    a = g1.sample_posterior(5, 9, y=y)["mu"]
    pyro.set_rng_seed(2)
    b = g2.sample_posterior(5, 9, y=y)["mu"]
    assert torch.equal(a, b), "the encoder's standardisation buffers and weights must round-trip"


def test_resume_equals_uninterrupted_training(tmp_path):
    model, y = make_model(torch.float64), y_data()
    pyro.set_rng_seed(5)
    g_full, _ = train(model, y, 40)
    full = params_of(g_full)

    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    g_a, svgd_a = train(model, y, 25)
    g_a.save(tmp_path / "g.pt")
    torch.save({"optim": svgd_a.get_state(), "rng": pyro.util.get_rng_state()}, tmp_path / "state.pt")

    pyro.clear_param_store()
    ckpt = torch.load(tmp_path / "state.pt", weights_only=False)
    g_b = AmortizedSteinGuide.load(tmp_path / "g.pt", model, y)
    pyro.util.set_rng_state(ckpt["rng"])
    train(model, y, 15, guide=g_b, state=ckpt["optim"])
    resumed = params_of(g_b)
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resumed training diverged from uninterrupted training"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_data_and_both_are_accurate(dtype):
    """Gamma(3, 1) prior, Poisson data: exact posterior Gamma(3 + sum y, 1 + n). 20,000 draws give a
    MC s.e. of 0.007 sd on the mean, far below the 0.1 sd target, in either precision."""
    model, y = make_model(dtype), y_data(dtype)
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(model)
    AmortizedSVGD(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / 1500)}), num_particles=64).run(
        y, num_steps=1500, progress_bar=False
    )
    assert all(p.dtype == dtype for p in guide.parameters())
    lam = guide.sample_posterior(20_000, y)["lam"]
    assert lam.dtype == dtype and lam.device.type == DEVICE.type
    post = dist.Gamma(3.0 + y.sum().double(), 1.0 + len(y))
    err = abs(lam.double().mean() - post.mean) / post.stddev
    assert err < 0.1, f"{dtype}: mean error {err:.3f} sd (target 0.1, MC s.e. {1 / math.sqrt(20_000):.3f})"
    assert abs(lam.double().std() / post.stddev - 1) < 0.1


@pytest.mark.gpu
def test_move_trained_guide_between_cpu_and_gpu(tmp_path):
    model = make_model(torch.float64, "cpu")
    y = y_data(device="cpu")
    g, _ = train(model, y, 10)
    g.save(tmp_path / "g.pt")
    gpu_model = make_model(torch.float64, "cuda")
    g_gpu = AmortizedSteinGuide.load(tmp_path / "g.pt", gpu_model, y.cuda(), map_location="cuda")
    assert all(p.device.type == "cuda" for p in g_gpu.parameters())
    train(gpu_model, y.cuda(), 5, guide=g_gpu)
    g_gpu.save(tmp_path / "g2.pt")
    g_cpu = AmortizedSteinGuide.load(tmp_path / "g2.pt", model, y, map_location="cpu")
    assert g_cpu.sample_posterior(5, y)["lam"].device.type == "cpu"


# ------------------------------------------------------------------------------------------ files of format 2
FORMAT2 = Path(__file__).resolve().parent / "data"


def _format2_poisson_model(y):
    lam = pyro.sample("lam", dist.Gamma(torch.tensor(3.0, dtype=y.dtype, device=y.device), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Poisson(lam), obs=y)


def _format2_mean_model(n, y=None):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)))
    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, device=DEVICE)))
    with pyro.plate("obs", n):
        return pyro.sample("y", dist.Normal(mu, s), obs=y)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the stored draws were made on a CPU")
def test_guide_files_of_format_2_load_and_draw_what_they_drew():
    """Files written by the version before the post-processing steps (format 2, float64, on a CPU): a calibrated
    guide with moment_correction=1, correction_samples=300, mcmc_steps=2, mcmc_leapfrog=3, and an amortized
    whiten='laplace' guide with a custom encoder, laplace_evaluations=20 and moment_correction=1. Loaded, they hold
    those options as post-processing steps and draw exactly what the saved guides drew at the same seeds."""
    from pyro_stein import HMC, MomentCorrection
    from pyro_stein.nn import DeepSetEncoder

    expected = torch.load(FORMAT2 / "format2_expected_draws.pt", weights_only=True)
    y = torch.tensor([2.0, 4.0, 3.0, 5.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    g1 = AmortizedSteinGuide.load(FORMAT2 / "guide_format2.pt", _format2_poisson_model, y)
    assert g1.postprocess == (MomentCorrection(rounds=1, num_draws=300), HMC(steps=2, leapfrog=3, num_draws=300))
    assert g1.whiten == "affine"
    pyro.set_rng_seed(1)
    assert torch.equal(g1.sample_posterior(40, y)["lam"], expected["single"]["lam"])

    sets = [Dataset(*args, **kwargs) for args, kwargs in expected["sets"]]
    encoder = DeepSetEncoder(1, output_dim=4, hidden_dim=8).double()
    g2 = AmortizedSteinGuide.load(
        FORMAT2 / "amortized_guide_format2.pt", _format2_mean_model, *sets[0].args, encoder=encoder, **sets[0].kwargs
    )
    assert g2.amortization.laplace_evaluations == 20 and g2.amortization.encoder is encoder
    assert g2.postprocess == (MomentCorrection(rounds=1),)
    pyro.set_rng_seed(3)
    draws = g2.sample_posterior_batch(30, sets[:2])
    assert all(torch.equal(draws[k], expected["amortized"][k]) for k in ("mu", "s"))
