"""Tests for the radial kernels (pyro_stein.kernels)."""

import math

import numpy as np
import pytest
import torch

try:  # tests/ as a package or as a plain rootdir
    from tests.conftest import DEVICE, DTYPE, tensor
except ImportError:
    from conftest import DEVICE, DTYPE, tensor

from pyro_stein.kernels import IMQKernel, KernelMatrices, RadialKernel, RBFKernel, median_bandwidth, pairwise_sqdist

F64 = DTYPE == torch.float64
RTOL = 1e-12 if F64 else 1e-5
ATOL = 1e-13 if F64 else 1e-6

KERNELS = {
    "rbf": lambda **kw: RBFKernel(**kw),
    "imq": lambda **kw: IMQKernel(**kw),
    "imq_b03_c2": lambda **kw: IMQKernel(beta=-0.3, c=2.0, **kw),
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    """Reproducible normal draws (generated on CPU, then moved to the suite's device/dtype)."""
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(device=DEVICE, dtype=DTYPE)


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# values against hand-derived numbers
# ---------------------------------------------------------------------------------------------

# x = (0, 0), y = (1, 2): r^2 = 5; with h = 2, u = r^2 / h = 2.5
HAND_VALUES = {
    # exp(-2.5)
    "rbf": 0.0820849986238988,
    # (1 + 2.5)^(-1/2) = 1 / sqrt(3.5)
    "imq": 0.5345224838248488,
    # (2 + 2.5)^(-0.3)
    "imq_b03_c2": 0.6368486695666434,
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_hand_values(name):
    kern = KERNELS[name](bandwidth=2.0)
    x = tensor([[0.0, 0.0], [1.0, 2.0]])
    expected_off = HAND_VALUES[name]
    expected_diag = {"rbf": 1.0, "imq": 1.0, "imq_b03_c2": 2.0**-0.3}[name]
    expected = tensor([[expected_diag, expected_off], [expected_off, expected_diag]])
    close(kern(x), expected)
    close(kern(x[:1], x[1:]), expected[:1, 1:])
    km = kern.matrices(x)
    close(km.k, expected)
    close(km.sqdist, tensor([[0.0, 5.0], [5.0, 0.0]]))
    close(km.bandwidth, tensor(2.0))
    # explicit bandwidth override of __call__: h = 5 -> u = 1
    k1 = {"rbf": math.exp(-1.0), "imq": 2.0**-0.5, "imq_b03_c2": 3.0**-0.3}[name]
    close(kern(x[:1], x[1:], bandwidth=5.0), tensor([[k1]]))


def test_hand_derivatives_rbf():
    # RBF: dk/dr^2 = -exp(-u)/h, d2k/d(r^2)^2 = exp(-u)/h^2 at u = 2.5, h = 2
    km = RBFKernel(bandwidth=2.0).matrices(tensor([[0.0, 0.0], [1.0, 2.0]]))
    close(km.dk[0, 1], tensor(-0.0820849986238988 / 2))
    close(km.d2k[0, 1], tensor(0.0820849986238988 / 4))
    close(km.dk[0, 0], tensor(-0.5))
    close(km.d2k[0, 0], tensor(0.25))


def test_hand_derivatives_imq():
    # IMQ(beta=-1/2, c=1): dk/dr^2 = -1/2 (1+u)^(-3/2) / h, d2k = 3/4 (1+u)^(-5/2) / h^2
    km = IMQKernel(bandwidth=2.0).matrices(tensor([[0.0, 0.0], [1.0, 2.0]]))
    close(km.dk[0, 1], tensor(-0.5 * 3.5**-1.5 / 2))
    close(km.d2k[0, 1], tensor(0.75 * 3.5**-2.5 / 4))


# ---------------------------------------------------------------------------------------------
# derivatives against autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_profile_derivatives_autograd(name):
    kern = KERNELS[name]()
    u = tensor([0.0, 1e-3, 0.3, 1.0, 2.5, 7.0, 40.0]).requires_grad_(True)
    f, df, d2f = kern.profile(u)
    (g1,) = torch.autograd.grad(f.sum(), u, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), u)
    close(df, g1.detach())
    close(d2f, g2)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_gradcheck_kernel_value(name):
    kern = KERNELS[name](bandwidth=1.7)
    x = randn(4, 3, seed=1).to(torch.float64).requires_grad_(True)
    y = randn(5, 3, seed=2).to(torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kern(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: kern(a), (x,))


@pytest.mark.parametrize("bandwidth", [None, 0.8])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_matrices_derivatives_autograd(name, bandwidth):
    """``dk`` and ``d2k`` are the first two derivatives of ``k`` w.r.t. ``r^2`` (bandwidth fixed)."""
    kern = KERNELS[name](bandwidth=bandwidth)
    z = randn(6, 3, seed=3)
    km = kern.matrices(z)
    h = km.bandwidth
    r2 = km.sqdist.clone().requires_grad_(True)
    f = kern.profile(r2 / h)[0]
    close(f.detach(), km.k)
    (g1,) = torch.autograd.grad(f.sum(), r2, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), r2)
    close(km.dk, g1.detach())
    close(km.d2k, g2)
    # and the chain rule through the coordinates: grad_{z_i} sum_j k_ij = sum_j 2 dk_ij (z_i - z_j) * 2
    # (each pair appears twice in the double sum); bandwidth held fixed via a fixed-bandwidth clone
    zg = z.clone().requires_grad_(True)
    kfix = KERNELS[name](bandwidth=float(h))
    (gz,) = torch.autograd.grad(kfix.matrices(zg).k.sum(), zg)
    expected = 4.0 * (km.dk.sum(-1, keepdim=True) * z - km.dk @ z)
    close(gz, expected, rtol=1e-10 if F64 else 1e-4, atol=1e-10 if F64 else 1e-5)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_matrices_agrees_with_call(name):
    kern = KERNELS[name]()
    z = randn(2, 7, 3, seed=4)
    close(kern.matrices(z).k, kern(z), rtol=1e-10 if F64 else 1e-5, atol=1e-12 if F64 else 1e-6)


# ---------------------------------------------------------------------------------------------
# pairwise distances and the median heuristic
# ---------------------------------------------------------------------------------------------


def test_pairwise_sqdist_brute_force():
    z = randn(3, 9, 4, seed=5) * 3.0 + 10.0  # offset makes the z z^T route cancel; still accurate
    d2 = pairwise_sqdist(z)
    assert d2.shape == (3, 9, 9)
    brute = torch.zeros_like(d2)
    for b in range(3):
        for i in range(9):
            for j in range(9):
                brute[b, i, j] = ((z[b, i] - z[b, j]) ** 2).sum()
    close(d2, brute, rtol=1e-9 if F64 else 1e-4, atol=1e-9 if F64 else 1e-2)
    diag = torch.diagonal(d2, dim1=-2, dim2=-1)
    assert torch.equal(diag, torch.zeros_like(diag)), "diagonal must be exactly zero"
    assert (d2 >= 0).all()
    assert torch.equal(d2, d2.transpose(-1, -2)), "must be exactly symmetric"


def test_pairwise_sqdist_duplicates_clamped():
    z = tensor([[1e4, -3e3, 7.0]] * 3 + [[1e4 + 1.0, -3e3, 7.0]])
    d2 = pairwise_sqdist(z)
    assert (d2 >= 0).all()
    assert torch.equal(torch.diagonal(d2), torch.zeros(4, dtype=DTYPE, device=DEVICE))


def test_median_bandwidth_hand():
    # 1-D points 0, 1, 3: off-diagonal r^2 = {1, 4, 9} (each twice); median 4; h = 4 / log(4)
    z = tensor([[0.0], [1.0], [3.0]])
    h = median_bandwidth(pairwise_sqdist(z))
    close(h, tensor(2.8853900817779268))
    close(RBFKernel().matrices(z).bandwidth, tensor(2.8853900817779268))


@pytest.mark.parametrize("n", [3, 6, 7])  # n(n-1)/2 distinct pairs odd: the median is unambiguous
def test_median_bandwidth_vs_numpy(n):
    z = randn(4, n, 2, seed=6)
    h = median_bandwidth(pairwise_sqdist(z))
    assert h.shape == (4,)
    zc = z.cpu().double().numpy()
    for b in range(4):
        off = [((zc[b, i] - zc[b, j]) ** 2).sum() for i in range(n) for j in range(n) if i != j]
        expected = np.median(off) / math.log(n + 1)
        assert abs(float(h[b]) - expected) <= (1e-10 if F64 else 1e-5) * expected


def test_median_bandwidth_detached():
    z = randn(5, 2, seed=7).requires_grad_(True)
    h = median_bandwidth(pairwise_sqdist(z))
    assert not h.requires_grad
    km = RBFKernel().matrices(z)
    assert not km.bandwidth.requires_grad


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_bandwidth_factor(name):
    z = randn(2, 8, 3, seed=8)
    h0 = KERNELS[name]().matrices(z).bandwidth
    km = KERNELS[name](bandwidth_factor=2.5).matrices(z)
    close(km.bandwidth, 2.5 * h0)
    close(km.k, KERNELS[name](bandwidth=1.0).profile(km.sqdist / (2.5 * h0)[..., None, None])[0])
    kf = KERNELS[name](bandwidth=0.5, bandwidth_factor=3.0).matrices(z)
    close(kf.bandwidth, tensor([1.5, 1.5]))
    close(kf.k, KERNELS[name](bandwidth=1.5).matrices(z).k)


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_one_particle(name):
    kern = KERNELS[name]()
    z = tensor([[0.3, -1.2, 4.0]])
    km = kern.matrices(z)
    for m in (km.k, km.dk, km.d2k, km.sqdist):
        assert m.shape == (1, 1)
        assert torch.isfinite(m).all()
    close(km.bandwidth, tensor(1.0))
    f, df, d2f = kern.profile(tensor(0.0))
    close(km.k[0, 0], f)
    close(km.dk[0, 0], df)
    close(km.d2k[0, 0], d2f)
    # batched one-particle sets
    kmb = kern.matrices(randn(3, 1, 2, seed=9))
    assert kmb.k.shape == (3, 1, 1)
    close(kmb.bandwidth, torch.ones(3, dtype=DTYPE, device=DEVICE))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_identical_particles(name):
    kern = KERNELS[name]()
    z = tensor([[1.5, -2.0]] * 5)
    km = kern.matrices(z)
    close(km.bandwidth, tensor(1.0))
    for m in km:
        assert torch.isfinite(m).all(), "no NaN/inf with zero median distance"
    f0 = kern.profile(tensor(0.0))[0]
    close(km.k, f0.expand(5, 5))
    close(kern(z), f0.expand(5, 5))
    # one degenerate batch next to a normal one: only the degenerate one falls back to h = 1
    zb = torch.stack([z, randn(5, 2, seed=10)])
    kmb = kern.matrices(zb)
    close(kmb.bandwidth[0], tensor(1.0))
    close(kmb.bandwidth[1], kern.matrices(zb[1]).bandwidth)


@pytest.mark.parametrize("bandwidth", [None, 0.7])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_batched_equals_per_batch(name, bandwidth):
    kern = KERNELS[name](bandwidth=bandwidth)
    z = randn(2, 3, 6, 4, seed=11) * tensor([0.1, 1.0, 10.0])[:, None, None]  # different scales
    km = kern.matrices(z)
    assert km.k.shape == (2, 3, 6, 6) and km.bandwidth.shape == (2, 3)
    kc = kern(z)
    for a in range(2):
        for b in range(3):
            kmi = kern.matrices(z[a, b])
            for field in KernelMatrices._fields:
                close(
                    getattr(km, field)[a, b],
                    getattr(kmi, field),
                    rtol=1e-10 if F64 else 1e-5,
                    atol=1e-12 if F64 else 1e-6,
                )
            close(kc[a, b], kern(z[a, b]), rtol=1e-10 if F64 else 1e-5, atol=1e-12 if F64 else 1e-6)


def test_call_cross_median_bandwidth():
    """Cross pairs (x_i, y_j) are all genuine pairs: the median runs over all n*m of them."""
    x, y = randn(4, 2, seed=13), randn(3, 2, seed=14)
    k = RBFKernel()(x, y)
    assert k.shape == (4, 3) and torch.isfinite(k).all()
    d2 = (x[:, None] - y[None]).pow(2).sum(-1)
    h = d2.reshape(-1).median() / math.log(3 + 1)
    close(k, torch.exp(-d2 / h), rtol=1e-10 if F64 else 1e-5, atol=0)


def test_radial_kernel_profile_abstract():
    with pytest.raises(NotImplementedError):
        RadialKernel(bandwidth=1.0).matrices(randn(3, 2))


def test_matrices_rejects_vector():
    with pytest.raises(ValueError, match="shape"):
        RBFKernel().matrices(tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: RBFKernel(bandwidth=0.0), "bandwidth"),
        (lambda: RBFKernel(bandwidth=-1.0), "bandwidth"),
        (lambda: RBFKernel(bandwidth=float("nan")), "bandwidth"),
        (lambda: RBFKernel(bandwidth="1.0"), "bandwidth"),
        (lambda: IMQKernel(bandwidth=-2.0), "bandwidth"),
        (lambda: RBFKernel(bandwidth_factor=0.0), "bandwidth_factor"),
        (lambda: RBFKernel(bandwidth_factor=-1.0), "bandwidth_factor"),
        (lambda: IMQKernel(bandwidth_factor=0.0), "bandwidth_factor"),
        (lambda: IMQKernel(beta=0.0), "beta"),
        (lambda: IMQKernel(beta=-1.0), "beta"),
        (lambda: IMQKernel(beta=0.5), "beta"),
        (lambda: IMQKernel(c=0.0), r"\bc\b"),
        (lambda: IMQKernel(c=-1.0), r"\bc\b"),
    ],
)
def test_bad_constructor_args(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_repr():
    assert "median" in repr(RBFKernel())
    assert "0.5" in repr(IMQKernel(bandwidth=0.5))


# ---------------------------------------------------------------------------------------------
# memory: no n x n x D tensor
# ---------------------------------------------------------------------------------------------


def _vm_kb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def test_no_n_by_n_by_d_tensor():
    """At n = 256, D = 2000 an n x n x D float64 tensor is ~1.05 GB; the peak growth must stay far below."""
    from pyro_stein.stein import ksd, stein_direction

    n, D = 256, 2000
    nnd_bytes = n * n * D * 8
    assert nnd_bytes > 1e9
    kern = IMQKernel()  # the memory layout is the same for every radial kernel
    z = torch.randn(n, D, generator=gen(12), dtype=torch.float64).to(device=DEVICE, dtype=DTYPE)
    score = -z

    def work(z=z, score=score):
        n, D = z.shape
        km = kern.matrices(z)
        phi = stein_direction(z, score, kern)
        k2 = ksd(z, score, kern)
        assert km.k.shape == (n, n) and phi.shape == (n, D) and torch.isfinite(k2)

    limit = 300 * 2**20
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_allocated() - base
    else:
        work(z[:, :8], score[:, :8])  # warm-up: one-off allocations (thread pools etc.) are not counted
        try:
            with open("/proc/self/clear_refs", "w") as fh:  # resets the peak RSS (VmHWM)
                fh.write("5")
            base = _vm_kb("VmRSS")
            work()
            growth = (_vm_kb("VmHWM") - base) * 1024
        except OSError:  # no procfs peak reset: fall back to the lifetime peak (a weaker check)
            import resource

            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            work()
            growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    assert growth < limit, (
        f"peak memory grew by {growth / 2**20:.0f} MiB (n x n x D would be {nnd_bytes / 2**20:.0f} MiB)"
    )
