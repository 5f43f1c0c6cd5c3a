"""Tests for the SVGD direction and the kernelized Stein discrepancy (pyro_stein.stein)."""

import pytest
import torch

try:  # tests/ as a package or as a plain rootdir
    from tests.conftest import DEVICE, DTYPE
except ImportError:
    from conftest import DEVICE, DTYPE

from pyro_stein.kernels import IMQKernel, RBFKernel
from pyro_stein.stein import (
    ksd,
    ksd_from_matrices,
    stein_direction,
    stein_direction_from_matrices,
    stein_moment_correction,
    stein_moment_residual,
)

F64 = DTYPE == torch.float64
RTOL = 1e-10 if F64 else 1e-4
ATOL = 1e-12 if F64 else 1e-5

# kernel object and an independent, hand-written scalar version k(x, y; h) for autograd
KERNELS = {
    "rbf": (RBFKernel, lambda x, y, h: torch.exp(-((x - y) ** 2).sum() / h)),
    "imq": (IMQKernel, lambda x, y, h: (1.0 + ((x - y) ** 2).sum() / h) ** -0.5),
    "imq_b03_c2": (
        lambda **kw: IMQKernel(beta=-0.3, c=2.0, **kw),
        lambda x, y, h: (2.0 + ((x - y) ** 2).sum() / h) ** -0.3,
    ),
}


def randn(*shape, seed=0):
    """Reproducible normal draws (generated on CPU, then moved to the suite's device/dtype)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=DTYPE)


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# brute-force references
# ---------------------------------------------------------------------------------------------


def brute_direction(z, score, kfun, h, leave_one_out):
    """phi(z_i) = 1/m sum_{j in J_i} k(z_j, z_i) s_j + grad_{z_j} k(z_j, z_i), double loop + autograd."""
    n = z.shape[0]
    out = torch.zeros_like(z)
    for i in range(n):
        js = [j for j in range(n) if not (leave_one_out and j == i)]
        for j in js:
            zj = z[j].detach().clone().requires_grad_(True)
            k = kfun(zj, z[i].detach(), h)
            (gk,) = torch.autograd.grad(k, zj)
            out[i] += k.detach() * score[j] + gk
        out[i] /= len(js)
    return out


def stein_kernel(x, y, sx, sy, kfun, h):
    """u_p(x, y) = k sx.sy + sx.grad_y k + sy.grad_x k + tr(grad_x grad_y k), all through autograd."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    k = kfun(x, y, h)
    gx, gy = torch.autograd.grad(k, (x, y), create_graph=True)
    tr = sum(torch.autograd.grad(gx[a], y, retain_graph=True)[0][a] for a in range(x.shape[0]))
    return (k * (sx @ sy) + sx @ gy + sy @ gx + tr).detach()


def brute_ksd(z, score, kfun, h, ustat):
    n = z.shape[0]
    total = torch.zeros((), dtype=z.dtype, device=z.device)
    for i in range(n):
        for j in range(n):
            if ustat and i == j:
                continue
            total = total + stein_kernel(z[i], z[j], score[i], score[j], kfun, h)
    return total / (n * (n - 1) if ustat else n * n)


# ---------------------------------------------------------------------------------------------
# Stein direction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("bandwidth", [None, 1.3])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_direction_brute_force(name, bandwidth, leave_one_out):
    make, kfun = KERNELS[name]
    kern = make(bandwidth=bandwidth)
    z = randn(7, 3, seed=1)
    score = randn(7, 3, seed=2)  # arbitrary scores: the identity is algebraic
    h = kern.matrices(z).bandwidth
    phi = stein_direction(z, score, kern, leave_one_out=leave_one_out)
    assert phi.shape == z.shape
    close(phi, brute_direction(z, score, kfun, h, leave_one_out))
    close(stein_direction_from_matrices(z, score, kern.matrices(z), leave_one_out), phi)


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("name", ["rbf", "imq"])
def test_direction_batched(name, leave_one_out):
    kern = KERNELS[name][0]()
    z = randn(3, 6, 2, seed=3) * torch.tensor([0.2, 1.0, 5.0], dtype=DTYPE, device=DEVICE)[:, None, None]
    score = -z
    phi = stein_direction(z, score, kern, leave_one_out)
    assert phi.shape == (3, 6, 2)
    for b in range(3):
        close(phi[b], stein_direction(z[b], score[b], kern, leave_one_out))
    # two batch dimensions
    z2 = z.reshape(1, 3, 6, 2).expand(2, 3, 6, 2).contiguous()
    close(stein_direction(z2, -z2, kern, leave_one_out)[1], phi)
    # no cross-batch mixing: perturbing batch 1 (values and scores) leaves batch 0 untouched
    zp, sp = z.clone(), score.clone()
    zp[1] += 10.0 * randn(6, 2, seed=4)
    sp[1] = randn(6, 2, seed=5)
    phip = stein_direction(zp, sp, kern, leave_one_out)
    assert torch.equal(phip[0], phi[0]) and torch.equal(phip[2], phi[2])
    assert not torch.allclose(phip[1], phi[1])


def test_direction_treats_inputs_as_constants():
    z = randn(5, 2, seed=6).requires_grad_(True)
    phi = stein_direction(z, -z, RBFKernel())
    assert not phi.requires_grad
    assert not ksd(z, -z, RBFKernel()).requires_grad


def test_direction_one_particle_without_leave_one_out():
    z, s = randn(1, 3, seed=7), randn(1, 3, seed=8)
    close(stein_direction(z, s, RBFKernel(), leave_one_out=False), s)  # k(z, z) = 1, no repulsion


def test_direction_identical_particles():
    z = torch.full((5, 2), 0.7, dtype=DTYPE, device=DEVICE)
    s = randn(5, 2, seed=9)
    for loo in (True, False):
        phi = stein_direction(z, s, RBFKernel(), leave_one_out=loo)
        assert torch.isfinite(phi).all()
        expected = (s.sum(0) - s) / 4 if loo else s.mean(0).expand(5, 2)
        close(phi, expected)


# ---------------------------------------------------------------------------------------------
# KSD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ustat", [True, False])
@pytest.mark.parametrize("bandwidth", [None, 0.9])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_ksd_brute_force(name, bandwidth, ustat):
    make, kfun = KERNELS[name]
    kern = make(bandwidth=bandwidth)
    z = randn(6, 3, seed=10)
    score = randn(6, 3, seed=11)
    h = kern.matrices(z).bandwidth
    val = ksd(z, score, kern, ustat=ustat)
    assert val.shape == ()
    close(val, brute_ksd(z, score, kfun, h, ustat))
    close(ksd_from_matrices(z, score, kern.matrices(z), ustat), val)


@pytest.mark.parametrize("ustat", [True, False])
def test_ksd_batched(ustat):
    kern = IMQKernel()
    z = randn(2, 3, 8, 2, seed=12)
    score = randn(2, 3, 8, 2, seed=13)
    val = ksd(z, score, kern, ustat)
    assert val.shape == (2, 3)
    for a in range(2):
        for b in range(3):
            close(val[a, b], ksd(z[a, b], score[a, b], kern, ustat))
    zp = z.clone()
    zp[1, 2] *= 3.0
    valp = ksd(zp, score, kern, ustat)
    assert torch.equal(valp[0], val[0]) and torch.equal(valp[1, :2], val[1, :2])


def test_ksd_u_v_relation():
    """V = ((n - 1) U + mean_i u_ii) / n."""
    kern = RBFKernel()
    z, s = randn(9, 2, seed=14), randn(9, 2, seed=15)
    u, v = ksd(z, s, kern, True), ksd(z, s, kern, False)
    km = kern.matrices(z)
    # u_ii = k(0) |s_i|^2 - 2 D dk(0) for a radial kernel
    uii = km.k.diagonal() * (s * s).sum(-1) - 2 * 2 * km.dk.diagonal()
    close(v, (8 * u + uii.mean()) / 9)


@pytest.mark.parametrize("name", ["rbf", "imq"])
def test_ksd_zero_for_target_positive_for_shift(name):
    """Standard normal draws with score -z: KSD^2 ~ 0 within a few empirical standard errors."""
    kern = KERNELS[name][0]()
    R, n, D = 12, 500, 2
    z = randn(R, n, D, seed=16)
    km = kern.matrices(z)  # shared by the U- and V-statistic (ksd = ksd_from_matrices(kernel.matrices))
    u = ksd_from_matrices(z, -z, km, ustat=True)  # R independent estimates
    v = ksd_from_matrices(z, -z, km, ustat=False)
    assert u.shape == (R,)
    sd = u[1:].std()  # standard error of a single n = 500 estimate, estimated from replicates 1..R-1
    assert abs(u[0]) < 6 * sd, (
        f"|KSD^2| = {float(abs(u[0])):.3g} vs empirical SE {float(sd):.3g} from {R - 1} replicates"
    )
    se_mean = u.std() / R**0.5
    assert abs(u.mean()) < 5 * se_mean, (
        f"mean KSD^2 over {R} replicates {float(u.mean()):.3g} vs its empirical SE {float(se_mean):.3g}"
    )
    assert (v >= -1e-12).all(), "the V-statistic is a squared RKHS norm"
    # a shifted sample (mean 1 in each coordinate) scored against N(0, I): clearly positive
    zs = z[0] + 1.0
    us = ksd(zs, -zs, kern, ustat=True)
    assert us > 10 * sd, f"shifted KSD^2 = {float(us):.3g} not >> empirical null SE {float(sd):.3g}"
    # also a scale mismatch (sd 2 instead of 1)
    zw = 2.0 * z[0]
    assert ksd(zw, -zw, kern) > 10 * sd


@pytest.mark.parametrize("name", ["rbf", "imq"])
def test_population_direction_fixed_point(name):
    """At q = p (1-D standard normal) the leave-one-out direction at any fixed point z* is an unbiased
    estimate of E_{z~p}[k(z, z*) s(z) + d/dz k(z, z*)] = 0 (Stein's identity); the full sum is biased
    by k(z*, z*) s(z*) / n."""
    kern = KERNELS[name][0](bandwidth=1.0)  # fixed bandwidth: the identity needs a draw-independent kernel
    points = torch.tensor([-2.0, -0.5, 0.0, 1.0, 2.0], dtype=DTYPE, device=DEVICE)
    P, B, n = len(points), 4000, 8
    z = randn(P, B, n, 1, seed=17)
    z[:, :, 0, 0] = points[:, None]  # particle 0 is z*, particles 1..n-1 are fresh draws
    phi = stein_direction(z, -z, kern, leave_one_out=True)[:, :, 0, 0]  # (P, B)
    mean, se = phi.mean(1), phi.std(1) / B**0.5
    assert (mean.abs() < 5 * se).all(), f"leave-one-out mean {mean.tolist()} vs Monte Carlo SE {se.tolist()}"
    full = stein_direction(z, -z, kern, leave_one_out=False)[:, :, 0, 0]
    bias = -points / n  # k(z*, z*) = 1 for both kernels (c = 1)
    mean_f, se_f = full.mean(1), full.std(1) / B**0.5
    assert ((mean_f - bias).abs() < 5 * se_f).all(), f"full-sum mean {mean_f.tolist()} vs bias {bias.tolist()}"
    assert (mean_f[[0, -1]].abs() > 10 * se_f[[0, -1]]).all(), "the j = i self-term bias must be detectable"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [stein_direction, ksd])
def test_score_shape_mismatch(fn):
    z = randn(5, 2, seed=18)
    with pytest.raises(ValueError, match="score shape"):
        fn(z, randn(5, 3), RBFKernel())
    with pytest.raises(ValueError, match="score shape"):
        fn(z, randn(2, 5, 2), RBFKernel())
    with pytest.raises(ValueError, match="score shape"):
        fn(z, z.t(), RBFKernel())


@pytest.mark.parametrize("fn", [stein_direction, ksd])
def test_vector_particles_rejected(fn):
    z = randn(5)
    with pytest.raises(ValueError, match="shape"):
        fn(z, -z, RBFKernel())


def test_one_particle_leave_one_out_raises():
    z = randn(1, 3, seed=19)
    with pytest.raises(ValueError, match="at least 2"):
        stein_direction(z, -z, RBFKernel())
    with pytest.raises(ValueError, match="at least 2"):
        stein_direction(randn(4, 1, 3), randn(4, 1, 3), IMQKernel(), leave_one_out=True)
    with pytest.raises(ValueError, match="at least 2"):
        ksd(z, -z, RBFKernel(), ustat=True)
    v = ksd(z, -z, RBFKernel(), ustat=False)  # the V-statistic is defined for one draw: u(z, z)
    close(v, (z * z).sum() + 2 * 3)  # k(0)|s|^2 - 2 D dk(0) with h = 1: |z|^2 + 2 D


# ---------------------------------------------------------------- Stein moment correction
def _gaussian_target(d, seed):
    a = randn(d, d, seed=seed)
    cov = a @ a.T + 0.5 * torch.eye(d, dtype=DTYPE, device=DEVICE)
    return 3.0 * randn(d, seed=seed + 1), cov


@pytest.mark.parametrize("affine", [True, False])
def test_moment_correction_exact_for_gaussian_target(affine):
    d, n = 5, 400
    mu, cov = _gaussian_target(d, 3)
    prec = torch.linalg.inv(cov)
    if affine:  # any q: here a badly placed, badly scaled, rotated Gaussian
        z = randn(n, d, seed=5) @ (0.3 * randn(d, d, seed=6)).T + mu + 2.0
    else:  # the location step trusts q's covariance: give q the target's covariance (as sample moments)
        z = randn(n, d, seed=5)
        z = z - z.mean(0)
        z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T @ torch.linalg.cholesky(cov).T + mu - 1.0
    out, ok = stein_moment_correction(z, -(z - mu) @ prec, affine=affine)
    tol = 1e-8 if F64 else 1e-3
    assert bool(ok) == affine
    assert torch.allclose(out.mean(0), mu, atol=tol, rtol=0), f"mean {out.mean(0)} vs {mu}"
    assert torch.allclose(torch.cov(out.T), cov, atol=tol * 10, rtol=0), "covariance not matched exactly"


def test_moment_correction_is_identity_at_the_target_up_to_monte_carlo_error():
    # p(x) = prod_j exp(x_j - e^{x_j}) (log of Exp(1) variables: skewed, not Gaussian); q = p
    n, d = 20000, 4
    g = torch.Generator().manual_seed(11)
    x = torch.empty(n, d).exponential_(generator=g).log().to(DTYPE).to(DEVICE)
    out, ok = stein_moment_correction(x, 1.0 - x.exp())
    # the shift is Cov_p times the mean score: per coordinate its sd is Var(x) * sd(score) / sqrt(n)
    # = (pi^2 / 6) * 1 / sqrt(n); the covariance map differs from I by O(1 / sqrt(n)) as well
    se = (torch.pi**2 / 6) / n**0.5
    assert bool(ok)
    moved = (out.mean(0) - x.mean(0)).abs().max()
    assert moved < 5 * se, f"mean moved by {moved:.4f}, more than 5 Monte Carlo s.e. ({5 * se:.4f}) at q = p"
    ratio = out.std(0) / x.std(0)
    assert (ratio - 1).abs().max() < 5 * 2**0.5 / n**0.5 * 3, (
        f"sds changed by {ratio} at q = p (MC s.e. ~{2**0.5 / n**0.5:.3f})"
    )


def test_moment_correction_batches_independently():
    mu, cov = _gaussian_target(3, 7)
    z = randn(2, 300, 3, seed=8)
    s = -(z - mu) @ torch.linalg.inv(cov)
    s[1] = -z[1]  # second dataset: a standard normal target
    out, _ = stein_moment_correction(z, s)
    for b in range(2):
        alone, _ = stein_moment_correction(z[b], s[b])
        assert torch.allclose(out[b], alone, rtol=RTOL, atol=ATOL * 1e3)


def test_moment_correction_rejects_non_finite_draws_and_non_tensors():
    """One infinite draw made every corrected draw NaN, silently."""
    z = randn(200, 2, seed=9)
    z[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"z and score must be finite, but 1 draw\(s\) are not"):
        stein_moment_correction(z, torch.where(torch.isfinite(z), -z, torch.zeros_like(z)))
    with pytest.raises(TypeError, match="z and score must be Tensors, got list and list"):
        stein_moment_correction([[0.0, 1.0]], [[0.0, 1.0]])


def test_moment_correction_falls_back_when_precision_not_positive_definite():
    z = randn(200, 2, seed=9)
    out, ok = stein_moment_correction(z, z.clone())  # score of exp(+|z|^2 / 2): no positive-definite precision
    assert not bool(ok)
    zc = z - z.mean(0)
    # location step only (z + Cov_q g), shape kept
    assert torch.allclose(out - out.mean(0), zc, rtol=RTOL, atol=ATOL * 1e3)


def test_moment_correction_falls_back_per_element_when_the_draws_covariance_is_singular():
    """A batch element whose draws have a constant coordinate gets the location step alone (``ok`` False); the
    others are corrected as if alone, rather than the whole batch failing in the solve."""
    z = randn(2, 300, 3, seed=10)
    z[1, :, 2] = 0.5
    s = -z
    out, ok = stein_moment_correction(z, s)
    assert ok.tolist() == [True, False]
    alone, _ = stein_moment_correction(z[0], s[0])
    assert torch.allclose(out[0], alone, rtol=RTOL, atol=ATOL * 1e3)
    g = s[1].mean(0)
    zc = z[1] - z[1].mean(0)
    assert torch.allclose(out[1], z[1] + g @ (zc.T @ zc / 299), rtol=RTOL, atol=ATOL * 1e3), (
        "location step: z + Cov_q g"
    )


def test_moment_correction_errors():
    z = randn(4, 6, seed=1)
    with pytest.raises(ValueError, match="more draws than dimensions"):
        stein_moment_correction(z, z)
    with pytest.raises(ValueError, match="at least 2 draws"):
        stein_moment_correction(z[:1], z[:1], affine=False)
    with pytest.raises(ValueError, match=r"stein_moment_residual needs at least 2 draws \(a covariance\), got 1"):
        stein_moment_residual(z[:1], z[:1])


def test_moment_residual_small_at_target_and_zero_after_exact_correction():
    mu, cov = _gaussian_target(3, 12)
    prec = torch.linalg.inv(cov)
    n = 20000
    exact = randn(n, 3, seed=13) @ torch.linalg.cholesky(cov).T + mu
    at_target = stein_moment_residual(exact, -(exact - mu) @ prec)
    # each of the D + D^2 terms is a squared mean of n i.i.d. O(1) terms: O(1 / n) each
    assert at_target < 50 * 12 / n, f"residual {at_target:.2e} for exact draws (expected O(D(D+1)/n) = {12 / n:.1e})"
    off = 0.5 * randn(n, 3, seed=14) + mu + 1.0
    before = stein_moment_residual(off, -(off - mu) @ prec)
    fixed, _ = stein_moment_correction(off, -(off - mu) @ prec)
    after = stein_moment_residual(fixed, -(fixed - mu) @ prec)
    assert before > 1.0 and after < (1e-12 if F64 else 1e-4), (before, after)


@pytest.mark.parametrize("r", [1.0, 0.4])
def test_stein_identity_eigenvalues_are_the_squared_spread_ratio(r):
    """A correlated 3-D Gaussian target, draws of the same shape scaled by r about the mean: every eigenvalue is r^2
    (Monte Carlo error about 2 sqrt(D / n) = 0.035 relative at 10,000 draws; tolerance 0.1 relative)."""
    from pyro_stein.stein import stein_identity_eigenvalues

    g = torch.Generator().manual_seed(0)
    a = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [-1.0, 0.3, 0.1]])
    cov = a @ a.T
    mean = torch.tensor([1.0, -2.0, 0.5])
    z = mean + r * torch.randn(10_000, 3, generator=g) @ a.T
    score = -(z - mean) @ torch.linalg.inv(cov)
    ev = stein_identity_eigenvalues(z, score)
    assert torch.allclose(ev, torch.full_like(ev, r**2), rtol=0.1), f"eigenvalues {ev.tolist()}, expected {r**2}"
    with pytest.raises(ValueError, match="n > D"):
        stein_identity_eigenvalues(z[:3], score[:3])
