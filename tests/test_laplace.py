"""Tests for the batched score-only Newton search (pyro_stein.laplace)."""

import pytest
import torch

try:  # tests/ as a package or as a plain rootdir
    from tests.conftest import DEVICE, DTYPE
except ImportError:
    from conftest import DEVICE, DTYPE

from pyro_stein.laplace import hessian_stencil, laplace_frames, newton_direction

F64 = DTYPE == torch.float64
TOL = 1e-8 if F64 else 1e-3  # Newton decrement at which the tests' searches stop (distance to the mode in sds)


def t(x):
    return torch.as_tensor(x, dtype=DTYPE, device=DEVICE)


def batched(log_p):
    """``fn(index, points)`` for a per-dataset log density ``log_p(index, points) -> (B, P)`` (autograd score)."""

    def fn(idx, points):
        x = points.detach().requires_grad_(True)
        with torch.enable_grad():
            lp = log_p(idx, x)
            (score,) = torch.autograd.grad(lp.sum(), x)
        return lp.detach(), score

    return fn


def test_stencil_and_newton_direction_by_hand():
    z = t([[1.0, -2.0]])
    pts = hessian_stencil(z, step=0.5)
    want = t([[[1.0, -2.0], [1.5, -2.0], [1.0, -1.5], [0.5, -2.0], [1.0, -2.5]]])
    torch.testing.assert_close(pts, want, rtol=0, atol=0)
    # H = diag(4, -1) (a saddle of log p): the step uses |H| = diag(4, 1), so it climbs in both coordinates
    step, dec, abs_h = newton_direction(t([[2.0, 3.0]]), t([[[4.0, 0.0], [0.0, -1.0]]]))
    torch.testing.assert_close(step, t([[0.5, 3.0]]))
    torch.testing.assert_close(dec, t([(2.0**2 / 4 + 3.0**2 / 1) ** 0.5]))
    torch.testing.assert_close(abs_h, t([[[4.0, 0.0], [0.0, 1.0]]]))


def test_gaussian_targets_are_found_exactly():
    """log p = -(z - mu)^T P (z - mu) / 2, three datasets: the frame is (mu, P^{-1/2}) up to rounding."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    prec = t(a @ a.transpose(-1, -2) + 0.5 * torch.eye(4, dtype=torch.float64))
    mu = t(3 * torch.randn(3, 4, generator=g, dtype=torch.float64))

    def log_p(idx, x):
        r = x - mu[idx, None]
        return -0.5 * torch.einsum("bpi,bij,bpj->bp", r, prec[idx], r)

    frame = laplace_frames(batched(log_p), torch.zeros_like(mu))
    tol = dict(rtol=1e-7, atol=1e-7) if F64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(frame.loc, mu, **tol)
    torch.testing.assert_close(frame.scale @ frame.scale.transpose(-1, -2), torch.linalg.inv(prec), **tol)
    assert frame.converged.all()
    assert frame.num_evaluations == 2, "a quadratic needs one Newton step, and the evaluation there shows it converged"


def test_non_gaussian_modes_match_the_closed_form():
    """log p(u) = a u - b e^u (a log-Gamma density): mode log(a / b), curvature a; started 8 sds away."""
    a, b = t([2.0, 30.0, 500.0]), t([1.0, 0.1, 40.0])

    def log_p(idx, x):
        u = x[..., 0]
        return a[idx, None] * u - b[idx, None] * u.exp()

    start = (torch.log(a / b) + 8 / a.sqrt()).unsqueeze(-1)
    frame = laplace_frames(batched(log_p), start, tol=TOL)
    tol = dict(rtol=1e-5, atol=1e-5) if F64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(frame.loc[:, 0], torch.log(a / b), **tol)
    torch.testing.assert_close(frame.scale[:, 0, 0], a.rsqrt(), **tol)
    assert frame.converged.all()


def test_default_tolerance_ends_with_an_unevaluated_newton_step_close_to_the_mode():
    """With the default tol = 0.1 the search stops once the decrement is below 0.1 sd and takes that last Newton
    step unevaluated. For log p(u) = a u - b e^u the third derivative over the curvature^(3/2) is 1 / sqrt(a) at
    the mode, so Newton's quadratic convergence leaves the step within ~ dec^2 / (2 sqrt(a)) <= 0.0036 sd of the
    mode: bound tol^2 = 0.01 sd."""
    a, b = t([2.0, 30.0, 500.0]), t([1.0, 0.1, 40.0])

    def log_p(idx, x):
        u = x[..., 0]
        return a[idx, None] * u - b[idx, None] * u.exp()

    frame = laplace_frames(batched(log_p), (torch.log(a / b) + 8 / a.sqrt()).unsqueeze(-1))
    assert frame.converged.all()
    err = ((frame.loc[:, 0] - torch.log(a / b)) * a.sqrt()).abs()
    assert err.max() < 0.01, f"mode errors {err.tolist()} sd, bound 0.01 (tol^2)"


def test_far_from_the_mode_a_backtrack_costs_no_extra_evaluation():
    """log p(u) = -sqrt(1 + u^2) from u = 3: the Hessian is ~1 / |u|^3 there, so the Newton step is -30. The full
    step (to u = -27) lowers log p and the 0.2 step (to u = -3) does not raise it; the 0.04 step (to u = 1.8) does.
    All three lengths are evaluated in one call (3 stencils of 3 points), so after 2 evaluations the search stands
    at u = 1.8; it then converges to the mode u = 0 (curvature 1)."""
    sizes = []

    def log_p(idx, x):
        sizes.append(x.shape[1])
        return -torch.sqrt(1 + x[..., 0] ** 2)

    frame = laplace_frames(batched(log_p), t([[3.0]]), max_evaluations=2)
    assert frame.num_evaluations == 2 and sizes == [3, 9], f"{frame.num_evaluations} evaluations of {sizes} points"
    torch.testing.assert_close(frame.loc, t([[1.8]]), rtol=1e-4 if F64 else 1e-3, atol=0)
    assert not frame.converged.any()
    frame = laplace_frames(batched(log_p), t([[3.0]]), tol=TOL)
    assert frame.converged.all()
    torch.testing.assert_close(frame.loc, t([[0.0]]), rtol=0, atol=1e-6 if F64 else 1e-3)
    torch.testing.assert_close(frame.scale, t([[[1.0]]]), rtol=1e-4 if F64 else 1e-2, atol=0)


@pytest.mark.parametrize("y0", [30.0, 100.0, 1000.0])
def test_a_nearly_flat_direction_is_damped_instead_of_stalling_the_search(y0):
    """log p = -x^2 / 2 - sqrt(1 + y^2) - (x - y / y0)^2 / 2 from (2, y0): the curvature along y is ~1 / y0^3 there,
    so the Newton step runs off along y and every length of the ladder is rejected. Damping the direction
    (Levenberg-Marquardt) reaches the mode (0, 0) in at most 8 evaluations (5-8 measured); shortening the same
    direction instead (the search before the damping) needed 15-35."""

    def log_p(idx, x):
        return -0.5 * x[..., 0] ** 2 - torch.sqrt(1 + x[..., 1] ** 2) - 0.5 * (x[..., 0] - x[..., 1] / y0) ** 2

    frame = laplace_frames(batched(log_p), t([[2.0, y0]]))
    assert frame.converged.all() and frame.num_evaluations <= 8, f"{frame.num_evaluations} evaluations"
    # the mode is (0, 0); the default tol = 0.1 leaves it within ~tol^2 sds (sds ~0.6 and ~1 here)
    torch.testing.assert_close(frame.loc, t([[0.0, 0.0]]), rtol=0, atol=0.01)


def test_saddle_free_steps_leave_a_local_minimum_of_log_p():
    """log p = -(z1^2 - 1)^2 - z2^2 from z1 = 0.1 (log p convex there): the mode z1 = +1, curvature 8 and 2."""

    def log_p(idx, x):
        return -((x[..., 0] ** 2 - 1) ** 2) - x[..., 1] ** 2

    frame = laplace_frames(batched(log_p), t([[0.1, 0.5]]), tol=TOL)
    tol = dict(rtol=1e-6, atol=1e-6) if F64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(frame.loc, t([[1.0, 0.0]]), **tol)
    torch.testing.assert_close(frame.scale @ frame.scale.transpose(-1, -2), t([[[1 / 8, 0.0], [0.0, 1 / 2]]]), **tol)


@pytest.mark.parametrize("kind", ["minimum", "saddle"])
def test_a_stationary_point_that_is_not_a_mode_is_left(kind):
    """The search starts where the gradient is exactly zero but log p curves upwards, so the Newton step and its
    decrement vanish there: log p = -(z1^2 - 1)^2 (- z2^2 for the saddle, + z2^2 / 10 - z2^4 for the minimum's second
    coordinate pinned by a quartic) from the origin. The modes are z1 = +-1 (curvature 8), z2 = 0 (curvature 2), or
    z2 = +-sqrt(1 / 20) (curvature 2 / 5) for the minimum. It must find a mode, not report the origin as converged."""

    def log_p(idx, x):
        quad = -(x[..., 1] ** 2) if kind == "saddle" else x[..., 1] ** 2 / 10 - x[..., 1] ** 4
        return -((x[..., 0] ** 2 - 1) ** 2) + quad

    frame = laplace_frames(batched(log_p), t([[0.0, 0.0]]), tol=TOL)
    tol = dict(rtol=1e-6, atol=1e-6) if F64 else dict(rtol=1e-2, atol=1e-2)
    assert bool(frame.converged.all()), "the search stopped unconverged"
    z2, c2 = (0.0, 2.0) if kind == "saddle" else (frame.loc[0, 1].sign() * (1 / 20) ** 0.5, 2 / 5)
    torch.testing.assert_close(frame.loc.abs(), t([[1.0, abs(float(z2))]]), **tol)
    torch.testing.assert_close(frame.scale @ frame.scale.transpose(-1, -2), t([[[1 / 8, 0.0], [0.0, 1 / c2]]]), **tol)


def test_a_flat_stationary_point_is_not_reported_as_converged():
    """log p = +z^2 / 2 - z^4 / 4 has a minimum at 0; with evaluations for the first step only, the search cannot
    reach a mode (+-1) and must say so instead of reporting the minimum as converged."""

    def log_p(idx, x):
        return x[..., 0] ** 2 / 2 - x[..., 0] ** 4 / 4

    frame = laplace_frames(batched(log_p), t([[0.0]]), max_evaluations=1, tol=TOL)
    assert not bool(frame.converged.any())


def test_only_unconverged_datasets_are_evaluated_and_non_finite_steps_are_rejected():
    """Dataset 0 starts at its mode; dataset 1's log density is -inf beyond z = 2, where its full Newton step lands."""
    seen = []

    def log_p(idx, x):
        seen.append(idx.tolist())
        z = x[..., 0]
        out = []
        for row, i in zip(z, idx.tolist()):
            if i == 0:
                out.append(-0.5 * row**2)
            else:  # mode at 1.5, but steps past 2 are infeasible
                out.append(
                    torch.where(row < 2, -0.5 * (row - 1.5) ** 2 - 0.1 * row**4, -torch.inf * torch.ones_like(row))
                )
        return torch.stack(out)

    frame = laplace_frames(batched(log_p), t([[0.0], [-3.0]]), tol=TOL)
    assert seen[0] == [0, 1] and all(s == [1] for s in seen[1:]), f"evaluated {seen}"
    assert torch.isfinite(frame.loc).all() and frame.converged.all()
    # the mode of -(z - 1.5)^2 / 2 - z^4 / 10 solves z - 1.5 + 0.4 z^3 = 0
    z = frame.loc[1, 0]
    assert abs(float(z - 1.5 + 0.4 * z**3)) < (1e-6 if F64 else 1e-3)


def test_errors():
    def log_p(idx, x):
        return torch.where(x[..., 0] > 0, -x[..., 0], -torch.inf * torch.ones_like(x[..., 0]))

    with pytest.raises(ValueError, match=r"not finite at the starting point of dataset\(s\) \[1\]"):
        laplace_frames(batched(log_p), t([[1.0], [-1.0]]))
    with pytest.raises(ValueError, match="init must have shape"):
        laplace_frames(batched(log_p), t([1.0]))
    with pytest.raises(ValueError, match="max_evaluations"):
        laplace_frames(batched(log_p), t([[1.0]]), max_evaluations=0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tol must be a positive Newton decrement"):
            laplace_frames(batched(log_p), t([[1.0]]), tol=bad)
