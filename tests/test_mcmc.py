"""Tests for the MALA and HMC polish of a population of draws (pyro_stein.mcmc)."""

import math

import pytest
import torch

try:  # tests/ as a package or as a plain rootdir
    from tests.conftest import DEVICE, DTYPE
except ImportError:
    from conftest import DEVICE, DTYPE

from pyro_stein.mcmc import hmc_polish, mala_polish

# (kernel, its name in messages, steps for the convergence test): MALA, and HMC with 5 leapfrogs per step
KERNELS = [
    pytest.param(mala_polish, "MALA", 200, id="mala"),
    pytest.param(lambda z, f, n, **kw: hmc_polish(z, f, n, 5, **kw), "HMC(5 leapfrogs)", 40, id="hmc"),
]

B, S2 = 0.5, 0.5  # banana: z1 ~ N(0, 1), z2 | z1 ~ N(B z1^2, S2^2)


def banana(z):
    r = z[:, 1] - B * z[:, 0] ** 2
    lp = -0.5 * z[:, 0] ** 2 - 0.5 * r**2 / S2**2
    score = torch.stack([-z[:, 0] + 2 * B * z[:, 0] * r / S2**2, -r / S2**2], -1)
    return lp, score


def banana_draws(n, seed):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, generator=g, dtype=torch.float64)
    z2 = B * z1**2 + S2 * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([z1, z2], -1).to(device=DEVICE, dtype=DTYPE)


def _moment_z(draws, mean, var):
    """|mean error| and |variance error| in units of their Monte Carlo standard errors (i.i.d. draws)."""
    n = draws.shape[0]
    c = draws - mean
    m4 = (c**4).mean(0)
    z_mean = (draws.mean(0) - mean).abs() / (var / n).sqrt()
    z_var = (c.pow(2).mean(0) - var).abs() / ((m4 - var**2).clamp_min(1e-30) / n).sqrt()
    return z_mean, z_var


@pytest.mark.parametrize("polish, name, _", KERNELS)
def test_polish_leaves_exact_draws_exact_on_a_curved_target(polish, name, _):
    """The Metropolis-Hastings ratio must include the proposal densities (MALA) or the momenta (HMC): a wrong
    ratio drifts exact draws."""
    torch.manual_seed(0)
    n = 4000
    z0 = banana_draws(n, seed=1)
    z, rates = polish(z0, banana, 20)
    assert rates.shape == (20,) and 0.3 < float(rates.mean()) < 0.95, f"acceptance {rates.tolist()}"
    assert (z != z0).any(-1).double().mean() > 0.8, "most draws must have moved for this test to mean anything"
    mean = torch.tensor([0.0, B], dtype=DTYPE, device=DEVICE)
    var = torch.tensor([1.0, S2**2 + 2 * B**2], dtype=DTYPE, device=DEVICE)
    z_mean, z_var = _moment_z(z, mean, var)
    assert z_mean.max() < 4.5 and z_var.max() < 4.5, (
        f"after 20 {name} steps from exact draws: mean errors {z_mean.tolist()} and variance errors {z_var.tolist()} "
        f"Monte Carlo standard errors ({n} independent chains); limit 4.5"
    )


@pytest.mark.parametrize("polish, name, steps", KERNELS)
def test_polish_converges_from_a_shifted_narrow_start_on_a_gaussian(polish, name, steps):
    torch.manual_seed(0)
    d, n = 4, 4000
    a = torch.tensor(
        [[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [0.3, -0.4, 0.5, 0], [0.1, 0.2, -0.3, 2.0]], dtype=DTYPE, device=DEVICE
    )
    cov = a @ a.T
    prec = torch.linalg.inv(cov)
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DTYPE, device=DEVICE)

    def gauss(z):
        r = z - mu
        return -0.5 * ((r @ prec) * r).sum(-1), -r @ prec

    start = mu + cov.diagonal().sqrt() + 0.5 * torch.randn(n, d, dtype=DTYPE, device=DEVICE) @ a.T
    z, _ = polish(start, gauss, steps)
    z_mean, z_var = _moment_z(z, mu, cov.diagonal())
    assert z_mean.max() < 4.5 and z_var.max() < 4.5, (
        f"{steps} {name} steps from a start 1 sd off with half the spread: mean errors {z_mean.tolist()} and variance "
        f"errors {z_var.tolist()} Monte Carlo standard errors ({n} chains); limit 4.5"
    )


@pytest.mark.parametrize(
    "polish, name, steps",
    [
        pytest.param(mala_polish, "MALA", 20, id="mala"),
        pytest.param(lambda z, f, n, **kw: hmc_polish(z, f, n, 3, **kw), "HMC(3 leapfrogs)", 10, id="hmc"),
    ],
)
def test_polish_does_not_depend_on_the_units_of_a_coordinate(polish, name, steps):
    """A Gaussian with sds (1, 1e-4) from a start twice too wide converges as one with sds (1, 1) does. The
    preconditioner's jitter was relative to the mean variance, which made the narrow coordinate's proposal 7x too
    wide: every step was rejected, and the first coordinate stayed 1.57x too wide (35 standard errors)."""
    torch.manual_seed(0)
    n = 4000
    sd = torch.tensor([1.0, 1e-4], dtype=DTYPE, device=DEVICE)

    def gauss(z):
        w = z / sd
        return -0.5 * w.square().sum(-1), -w / sd

    z, rates = polish(2 * sd * torch.randn(n, 2, dtype=DTYPE, device=DEVICE), gauss, steps)
    z_mean, z_var = _moment_z(z, torch.zeros_like(sd), sd.square())
    assert z_mean.max() < 4.5 and z_var.max() < 4.5, (
        f"{steps} {name} steps from a start twice too wide: mean errors {z_mean.tolist()} and variance errors "
        f"{z_var.tolist()} Monte Carlo standard errors ({n} chains; acceptance {rates.tolist()}); limit 4.5"
    )


@pytest.mark.parametrize("polish, name, _", KERNELS)
def test_polish_rejects_proposals_outside_the_support(polish, name, _):
    def half_line(z):  # log density of Exp(1) on z > 0, -inf elsewhere
        lp = torch.where(z[:, 0] > 0, -z[:, 0], torch.full_like(z[:, 0], -math.inf))
        return lp, -torch.ones_like(z)

    torch.manual_seed(0)
    z, _ = polish(torch.rand(500, 1, dtype=DTYPE, device=DEVICE) + 0.05, half_line, 30)
    assert (z > 0).all() and torch.isfinite(z).all()


@pytest.mark.parametrize("polish, name, _", KERNELS)
def test_polish_arguments(polish, name, _):
    z = torch.randn(10, 2, dtype=DTYPE, device=DEVICE)
    same, rates = polish(z, banana, 0)
    assert same is z and rates.numel() == 0
    with pytest.raises(ValueError, match=r"z must be a Tensor of draws with shape \(n, D\)"):
        polish(z[0], banana, 1)
    with pytest.raises(ValueError, match="num_steps must be an int >= 0"):
        polish(z, banana, -1)
    for bad in (1.0, None, "0.5", True):
        with pytest.raises(ValueError, match="target_accept must be a number in"):
            polish(z, banana, 1, target_accept=bad)
    with pytest.raises(TypeError, match="z must be a floating-point Tensor"):
        polish(torch.ones(10, 2, dtype=torch.long, device=DEVICE), banana, 1)
    with pytest.raises(ValueError, match=r"z must be a Tensor of draws with shape \(n, D\), D >= 1"):
        polish(z[:, :0], banana, 1)
    with pytest.raises(ValueError, match=r"log_density_and_score must return shapes \(10,\) and \(10, 2\)"):
        polish(z, lambda x: (x.sum(), x), 1)


@pytest.mark.parametrize("polish, name, _", KERNELS)
@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: torch.full((1, 2), 3.0), "z has 1 row"),
        (lambda: torch.full((8, 2), 3.0), "the 8 finite rows of z are all equal"),
        (lambda: torch.tensor([[0.0, 1.0], [math.inf, 0.0], [math.nan, 1.0]]), "only 1 of the 3 rows of z are finite"),
    ],
    ids=["one-draw", "identical", "one-finite"],
)
def test_polish_without_spread_raises(polish, name, _, make, what):
    """The preconditioner is the draws' covariance: a population without spread would leave every chain in place."""
    with pytest.raises(ValueError, match=rf"MCMC preconditioner is the covariance of the draws to polish, but {what}"):
        polish(make().to(device=DEVICE, dtype=DTYPE), banana, 3)


@pytest.mark.parametrize("polish, name, _", KERNELS)
def test_polish_preconditioner_ignores_non_finite_rows(polish, name, _):
    """One infinite row does not poison the preconditioner: the other chains still move (it stays where it is)."""
    torch.manual_seed(0)
    z = banana_draws(200, seed=1)
    z[0, 0] = math.inf
    out, rates = polish(z, banana, 5)
    moved = (out[1:] != z[1:]).any(-1).float().mean()
    assert moved > 0.5 and rates.max() > 0.3, f"{name}: {moved:.2f} of the finite chains moved, rates {rates.tolist()}"
    assert torch.equal(out[0], z[0])


@pytest.mark.parametrize("polish, name, _", KERNELS)
def test_polish_checks_the_callbacks_dtype(polish, name, _):
    z = torch.randn(10, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"must return the draws' dtype torch.float64, got torch.float32"):
        polish(z, lambda x: tuple(t.float() for t in banana(x)), 1)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_hmc_num_leapfrog_errors(bad):
    with pytest.raises(ValueError, match="num_leapfrog must be an int >= 1"):
        hmc_polish(torch.zeros(10, 2, dtype=DTYPE, device=DEVICE), banana, 1, bad)


@pytest.mark.parametrize("polish, name, _", KERNELS)
def test_polish_initial_saves_one_evaluation_and_changes_nothing(polish, name, _):
    calls = []

    def counted(x):
        calls.append(1)
        return banana(x)

    z0 = banana_draws(300, seed=2)
    torch.manual_seed(5)
    want, _ = polish(z0, counted, 3)
    fresh = len(calls)
    calls.clear()
    torch.manual_seed(5)
    got, _ = polish(z0, counted, 3, initial=banana(z0))
    assert torch.equal(got, want), f"{name}: passing the known log density and score at z changed the draws"
    assert len(calls) == fresh - 1, f"{name}: {len(calls)} evaluations with initial, {fresh} without"
    with pytest.raises(
        ValueError, match=r"initial must be a pair \(log density, score\) at z with shapes \(300,\) and \(300, 2\)"
    ):
        polish(z0, banana, 1, initial=(z0[:, 0], z0[:10]))
    with pytest.raises(ValueError, match="initial must be a pair .* got Tensor"):
        polish(z0, banana, 1, initial=z0)
    other = torch.float32 if DTYPE == torch.float64 else torch.float64
    with pytest.raises(ValueError, match=f"initial must be in the draws' dtype {DTYPE}"):
        polish(z0, banana, 1, initial=tuple(t.to(other) for t in banana(z0)))
