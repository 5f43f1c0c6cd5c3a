"""Amortization across datasets: encoder, batching, per-dataset kernels, errors, accuracy, refinement."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD, Dataset, PriorPredictiveStream, RBFKernel, refine
from pyro_stein.data import collate_features
from pyro_stein.diagnostics import guide_ksd, sbc
from pyro_stein.nn import DeepSetEncoder

from .conftest import tensor


def mean_model(n, y=None):
    """mu ~ N(0, 1); y_i ~ N(mu, 1), i = 1..n. Posterior N(sum y / (n + 1), 1 / (n + 1))."""
    mu = pyro.sample("mu", dist.Normal(tensor(0.0), tensor(1.0)))
    with pyro.plate("obs", n):
        return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def regression_model(x, y=None):
    """beta ~ N(0, 1); y_i ~ N(beta x_i, 1). Posterior precision 1 + sum x^2, mean sum x y / precision."""
    beta = pyro.sample("beta", dist.Normal(tensor(0.0), tensor(1.0)))
    with pyro.plate("obs", len(x)):
        return pyro.sample("y", dist.Normal(beta * x, 1.0), obs=y)


def make_mean_args():
    return Dataset(int(torch.randint(5, 51, ())))


def make_regression_args():
    n = int(torch.randint(5, 51, ()))
    scale = torch.rand(()) * 2
    return Dataset(scale * torch.randn(n, dtype=tensor(0.0).dtype, device=tensor(0.0).device))


def exact_mean(d):
    y, n = d.kwargs["y"], d.args[0]
    return y.sum() / (n + 1), (1.0 / (n + 1)) ** 0.5


def exact_regression(d):
    x, y = d.args[0], d.kwargs["y"]
    prec = 1 + x.pow(2).sum()
    return (x * y).sum() / prec, prec.rsqrt()


def train(model, make_args, steps, site, batch_size=8, num_particles=32):
    pyro.set_rng_seed(0)
    stream = PriorPredictiveStream(model, make_args, obs_kwargs={"y": "y"})
    guide = AmortizedSteinGuide(model, amortized=True)
    first = stream.sample()
    guide.setup(*first.args, **first.kwargs)
    optim = pyro.optim.ClippedAdam({"lr": 3e-3, "lrd": 0.1 ** (1 / steps)})
    svgd = AmortizedSVGD(model, guide, optim, num_particles=num_particles)
    svgd.run(steps, datasets=stream, batch_size=batch_size, progress_bar=False)
    return guide, stream


@pytest.mark.parametrize(
    "model, make_args, exact, site",
    [(mean_model, make_mean_args, exact_mean, "mu"), (regression_model, make_regression_args, exact_regression, "beta")],
    ids=["gaussian-mean", "regression-with-covariates"],
)
def test_amortized_accuracy_on_held_out_datasets(model, make_args, exact, site):
    """20 held-out datasets of 5-50 observations: means within 0.2 posterior sd and sds within 20%
    of the exact posterior (4,000 draws each: MC s.e. 0.016 sd for the mean, 0.011 for the sd ratio)."""
    guide, stream = train(model, make_args, 1500, site)
    pyro.set_rng_seed(123)
    held_out = [stream.sample() for _ in range(20)]
    batch = guide.sample_posterior_batch(4000, held_out)[site]
    assert batch.shape == (20, 4000)
    worst_mean = worst_sd = 0.0
    for d, draws in zip(held_out, batch):
        m, s = exact(d)
        worst_mean = max(worst_mean, abs((draws.mean() - m) / s).item())
        worst_sd = max(worst_sd, abs(draws.std() / s - 1).item())
    assert worst_mean < 0.2, f"worst |mean error| {worst_mean:.3f} posterior sd, target < 0.2 (MC s.e. 0.016)"
    assert worst_sd < 0.2, f"worst |sd ratio - 1| {worst_sd:.3f}, target < 0.2 (MC s.e. 0.011)"
    # the single-dataset path agrees with the batched one
    d = held_out[0]
    single = guide.sample_posterior(4000, *d.args, **d.kwargs)[site]
    m, s = exact(d)
    assert abs((single.mean() - m) / s) < 0.2


def test_encoder_is_permutation_invariant_and_mask_aware():
    torch.manual_seed(0)
    enc = DeepSetEncoder(3, output_dim=8).to(tensor(0.0))
    x = torch.randn(1, 10, 3).to(tensor(0.0))
    perm = x[:, torch.randperm(10)]
    assert torch.allclose(enc(x), enc(perm))
    # a short dataset padded into a batch with a longer one encodes as it does alone
    short = torch.randn(4, 3).to(x)
    batch = collate_features([short, x[0]])
    assert batch.features.shape == (2, 10, 3) and batch.mask[0].sum() == 4
    assert torch.allclose(enc(batch.features, batch.mask)[0], enc(short.unsqueeze(0))[0])
    # padding values are ignored
    batch.features[0, 4:] = 1e6
    assert torch.allclose(enc(batch.features, batch.mask)[0], enc(short.unsqueeze(0))[0])


def test_per_dataset_kernels_never_mix_particles():
    """Each dataset gets its own (n x n) kernel: the kernel sees particles shaped (B, n, D)."""
    seen = []

    class RecordingKernel(RBFKernel):
        def matrices(self, z):
            seen.append(tuple(z.shape))
            return super().matrices(z)

    pyro.set_rng_seed(0)
    stream = PriorPredictiveStream(mean_model, make_mean_args, {"y": "y"})
    guide = AmortizedSteinGuide(mean_model, amortized=True)
    svgd = AmortizedSVGD(mean_model, guide, pyro.optim.Adam({"lr": 1e-3}), kernel=RecordingKernel(), num_particles=6)
    svgd.step_batch([stream.sample() for _ in range(3)])
    assert seen == [(3, 6, 1)]


def test_malformed_datasets_get_clear_errors():
    pyro.set_rng_seed(0)
    stream = PriorPredictiveStream(regression_model, make_regression_args, {"y": "y"})
    guide = AmortizedSteinGuide(regression_model, amortized=True)
    d = stream.sample()
    guide.setup(*d.args, **d.kwargs)
    x2 = torch.randn(7, 2).to(tensor(0.0))
    with pytest.raises(ValueError, match="width"):
        guide.sample_posterior(10, x2, y=torch.zeros(7).to(x2))
    with pytest.raises(ValueError, match="empty"):
        collate_features([torch.zeros(0, 2)])
    with pytest.raises(ValueError, match="same feature width"):
        collate_features([torch.zeros(3, 2), torch.zeros(3, 1)])
    with pytest.raises(TypeError, match="Dataset"):
        AmortizedSVGD(regression_model, guide, pyro.optim.Adam({"lr": 1e-3})).step_batch([42])
    with pytest.raises(ValueError, match="amortized"):
        AmortizedSteinGuide(regression_model).sample_posterior_batch(3, [d])


def test_refine_starts_from_amortized_weights_and_leaves_original_alone():
    guide, stream = train(mean_model, make_mean_args, 300, "mu")
    d = stream.sample()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    refined = refine(guide, 0, *d.args, **d.kwargs)
    assert all(torch.equal(before[k], v) for k, v in refined.state_dict().items()), "0 steps must copy the weights"
    refined = refine(guide, 20, *d.args, optim=pyro.optim.Adam({"lr": 1e-3}), **d.kwargs)
    assert all(torch.equal(before[k], v) for k, v in guide.state_dict().items()), "the original guide changed"
    assert any(not torch.equal(before[k], v) for k, v in refined.state_dict().items())
    assert guide.model is not None and refined.sample_posterior(5, *d.args, **d.kwargs)["mu"].shape == (5,)


def test_ksd_flags_out_of_distribution_datasets():
    """Trained on 5-50 observations around prior draws of mu, the guide fits an in-distribution
    dataset better (smaller KSD) than one with mu far outside the prior and 2,000 observations."""
    guide, stream = train(mean_model, make_mean_args, 600, "mu")
    pyro.set_rng_seed(5)
    inside = [stream.sample() for _ in range(5)]
    ksd_in = max(guide_ksd(guide, *d.args, **d.kwargs) for d in inside)
    far = Dataset(2000, y=8.0 + torch.randn(2000).to(tensor(0.0)))
    ksd_out = guide_ksd(guide, *far.args, **far.kwargs)
    assert ksd_out > 10 * max(ksd_in, 1e-3), (ksd_in, ksd_out)


def test_sbc_ranks_shape_and_rough_uniformity():
    guide, stream = train(mean_model, make_mean_args, 600, "mu")
    pyro.set_rng_seed(7)
    ranks = sbc(guide, stream.sample_with_latents, num_datasets=200, num_samples=49)["mu"]
    assert ranks.shape == (200,) and ranks.min() >= 0 and ranks.max() <= 49
    # a calibrated posterior gives ranks with mean 24.5 and sd ~14.4; 200 datasets: s.e. of the mean ~1.0
    assert abs(ranks.double().mean() - 24.5) < 4.0, "mean rank more than 4 s.e. from uniform"
