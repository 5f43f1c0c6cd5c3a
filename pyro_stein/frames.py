"""Frames: the affine map ``z = m + L u`` between the sampler's outputs ``u`` and the unconstrained latents ``z``.

A guide's sampler can work in the whitened frame of a Laplace approximation (``whiten="laplace"``), in the frame
of its own particles' moving moments (``whiten="adaptive"``, used by the driver), or in the raw unconstrained
space (``whiten=None``); ``whiten="auto"`` (the default) takes the Laplace frame where the posterior has a proper
mode, non-centres a funnel's sites where it has none, and falls back to the adaptive frame otherwise
(:class:`Frame`). The maths is in small functions: :func:`laplace_frame` (mode and ``L`` with ``L L^T = H^{-1}``),
:func:`unwhiten`, :func:`whiten_score` and :func:`adaptive_frame`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = [
    "WHITEN_OPTIONS",
    "Frame",
    "adaptive_frame",
    "laplace_elbo",
    "laplace_frame",
    "unwhiten",
    "whiten_score",
]

WHITEN_OPTIONS = ("auto", "laplace", "adaptive", None)
# the Laplace frame's centre must be a mode: the Newton step from it below this many frame sds
_MODE_TOLERANCE = 0.05
# the mode search: up to this many L-BFGS runs of 200 iterations; after a step to a non-finite log density it
# restarts from the best point with a first step 10 times shorter, down to _SEARCH_MIN_LR
_SEARCH_ROUNDS = 5
_SEARCH_MIN_LR = 1e-3
# the adaptive frame: an exponential moving average of the particles' mean and covariance, shrunk towards its diagonal
_FRAME_DECAY = 0.9
_FRAME_SHRINK = 0.1
# a centred model with a mode is non-centred only if that raises its Laplace approximation's ELBO by more than this
# (nats; the ELBO is estimated from _ELBO_DRAWS draws, whose Monte Carlo error is a few hundredths of a nat there)
_ELBO_MARGIN = 1.0
_ELBO_DRAWS = 256

FrameTensors = tuple[Tensor, Tensor]  # (m, L)


class _NonFinite(Exception):
    """The mode search's objective is not finite at the point tried."""


def unwhiten(u: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """``m + u L^T``: one frame (``loc (D,)``, ``scale (D, D)``) for any leading shape of ``u``, or one frame per
    dataset (``loc (B, D)``, ``scale (B, D, D)``) for ``u`` of shape ``(B, n, D)``."""
    if loc.dim() == 1:
        return loc + u @ scale.T
    return loc.unsqueeze(-2) + u @ scale.transpose(-1, -2)


def whiten(z: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """``L^{-1} (z - m)`` (rows): the inverse of :func:`unwhiten`, with the same shapes, for any invertible ``L`` (the
    Laplace frame's is upper triangular, an adaptive frame's lower)."""
    if loc.dim() > 1:
        loc = loc.unsqueeze(-2)
    return torch.linalg.solve(scale.transpose(-1, -2), z - loc, left=False)


def whiten_score(score: Tensor, scale: Tensor) -> Tensor:
    """The score with respect to ``u`` (rows): ``L^T grad_z log p``."""
    return score @ scale


def laplace_frame(neg_log_p: Callable[[Tensor], Tensor], init_loc: Tensor) -> FrameTensors:
    """``(m, L)``: the mode of ``exp(-neg_log_p)`` found by L-BFGS from ``init_loc``, and ``L`` with
    ``L L^T = H^{-1}`` (``H`` the Hessian of ``neg_log_p`` there).

    Raises a ``ValueError`` saying why when the posterior has no proper mode there: the search fails or runs off,
    the Hessian is not positive definite, or the Newton step from the point found is not small (an unbounded
    direction, as the scale of a centred hierarchical model running to 0)."""
    z = init_loc.detach().clone().requires_grad_(True)
    best = [math.inf, z.detach().clone()]  # the lowest finite value met, and where

    def closure():
        opt.zero_grad()
        loss = neg_log_p(z)
        if not torch.isfinite(loss.detach()):  # L-BFGS cannot recover from a non-finite value: back off instead
            raise _NonFinite
        loss.backward()
        value = float(loss.detach())
        if value < best[0]:
            best[0], best[1] = value, z.detach().clone()
        return loss

    with torch.enable_grad():
        try:
            lr, outer = 1.0, 0
            while outer < _SEARCH_ROUNDS:
                opt = torch.optim.LBFGS(
                    [z], lr=lr, max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=0.0
                )
                try:
                    for _ in range(_SEARCH_ROUNDS - outer):
                        opt.step(closure)
                        outer += 1
                except _NonFinite:  # a line search stepped where the log density is not finite: restart from the
                    with torch.no_grad():  # best point with a shorter first step, a few times at most
                        z.copy_(best[1])
                    if lr <= _SEARCH_MIN_LR:
                        break
                    lr, outer = lr / 10, outer + 1
        except RuntimeError as e:  # e.g. an overflow inside L-BFGS when the log density grows without bound
            raise ValueError(
                f"whiten='laplace': the mode search failed ({str(e).splitlines()[0]}); the posterior may have no "
                "proper mode (e.g. a centred hierarchical model whose log density grows without bound as a scale "
                "goes to 0): use a non-centred parameterisation or whiten='auto'"
            ) from e
        mode = z.detach()
        hess = torch.autograd.functional.hessian(neg_log_p, mode)
        grad = torch.autograd.functional.jacobian(neg_log_p, mode)
    if not (torch.isfinite(mode).all() and torch.isfinite(hess).all() and torch.isfinite(grad).all()):
        raise ValueError(
            "whiten='laplace': the mode search or the Hessian at the mode is not finite; use whiten='auto'"
        )
    chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T))
    if info != 0:
        raise ValueError(
            "whiten='laplace': the Hessian of -log p at the mode found is not positive definite (no proper mode, "
            "e.g. an improper or flat posterior direction); use whiten='auto'"
        )
    eye = torch.eye(mode.shape[0], dtype=mode.dtype, device=mode.device)
    scale = torch.linalg.solve_triangular(chol, eye, upper=False).T  # L = R^{-T}: L L^T = (R R^T)^{-1}
    newton = (grad @ scale).abs().max()  # the Newton step from the point found, in sds of the frame
    if not newton < _MODE_TOLERANCE:
        raise ValueError(
            f"whiten='laplace': the mode search stopped where the Newton step is still {float(newton):.3g} frame "
            "sds long, so the log density has no proper mode there (e.g. a scale running to 0 in a centred "
            "hierarchical model); use whiten='auto' or a non-centred parameterisation"
        )
    return mode, scale


def laplace_elbo(log_p: Callable[[Tensor], Tensor], loc: Tensor, scale: Tensor, num_draws: int = _ELBO_DRAWS) -> float:
    """The evidence lower bound ``E_q[log p(z) - log q(z)]`` of the Gaussian ``q = N(loc, L L^T)`` (``scale = L``),
    estimated from ``num_draws`` draws of ``q``; ``log_p`` maps draws ``(n, D)`` to log densities ``(n,)``.

    Any two parameterisations of one model bound the same log evidence, so the higher ELBO marks the Laplace
    approximation closer to its posterior (in KL). ``-inf`` when a draw has a non-finite log density. The draws are
    made with a fixed generator, on ``loc``'s device, so the estimate does not touch the global random stream."""
    d = loc.shape[0]
    gen = torch.Generator(device=loc.device).manual_seed(0)
    u = torch.randn(num_draws, d, generator=gen, dtype=loc.dtype, device=loc.device)
    lp = log_p(unwhiten(u, loc, scale))
    if not torch.isfinite(lp).all():
        return float("-inf")
    # E_q[log p - log q] with log q at the draws (not q's entropy in closed form): exact for a Gaussian p, whatever
    # the draws, and of lower variance near one
    log_q = -0.5 * (u * u).sum(-1) - 0.5 * d * math.log(2 * math.pi) - torch.linalg.slogdet(scale)[1]
    return float((lp.detach() - log_q).mean())  # detached: a model's pyro.param makes lp require grad


def adaptive_frame(z: Tensor, moments: FrameTensors | None) -> tuple[Tensor, Tensor, FrameTensors]:
    """``(m, L, moments)``, ``L`` lower triangular: the frame of a guide with an adaptive frame, from a moving average
    of the particles' mean and covariance (shrunk towards its diagonal), updated with this step's particles ``z``
    (``moments``: the previous step's, or ``None``).

    The Stein direction is computed on ``u = L^{-1} (z - m)`` with the score ``L^T grad_z log p`` and mapped back
    as ``L phi(u)``: the same fixed point (the posterior), but a step that scales with the particles' own spread
    and correlation, so that badly scaled and strongly correlated posteriors train as well as whitened ones."""
    mean = z.mean(0)
    centred = z - mean
    cov = centred.T @ centred / max(1, z.shape[0] - 1)
    if moments is None or moments[0].shape != mean.shape:
        moments = (mean, cov)
    else:
        m0, c0 = moments
        a = _FRAME_DECAY
        moments = (a * m0 + (1 - a) * mean, a * c0 + (1 - a) * cov)
    loc, cov = moments
    diag = cov.diagonal()
    shrunk = (1 - _FRAME_SHRINK) * cov + _FRAME_SHRINK * torch.diag(diag)
    floor = torch.finfo(z.dtype).eps * diag.abs().max().clamp_min(torch.finfo(z.dtype).tiny)
    shrunk = shrunk + torch.diag(torch.full_like(diag, float(floor)))
    chol, info = torch.linalg.cholesky_ex(shrunk)
    if info != 0:  # numerically not positive definite: the diagonal alone
        chol = torch.diag(diag.clamp_min(float(floor)).sqrt())
    return loc, chol, moments


def hierarchical_normal_sites(model: Callable, values: dict, args: tuple, kwargs: dict, context=nullcontext) -> list:
    """Latent Normal sites whose loc or scale depend on another latent site (the centred levels of a hierarchical
    model, whose log density has a funnel and no proper mode), traced with the latents at ``values`` inside
    ``context()`` (e.g. the full data of a model that subsamples)."""
    import pyro.poutine as poutine

    values = {n: v.detach().clone().requires_grad_(v.is_floating_point()) for n, v in values.items()}
    with torch.enable_grad(), context(), pyro.validation_enabled(False):
        tr = poutine.block(poutine.trace(poutine.condition(model, values)).get_trace)(*args, **kwargs)
    leaves = [v for v in values.values() if v.requires_grad]
    out = []
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or name not in values:
            continue
        fn = site["fn"]
        while isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        if type(fn) is not dist.Normal:
            continue
        # depends on another latent, not merely on a pyro.param (which also requires grad)
        params = [t.sum() for t in (fn.loc, fn.scale) if isinstance(t, Tensor) and t.requires_grad]
        if params and leaves:
            with torch.enable_grad():
                grads = torch.autograd.grad(params, leaves, allow_unused=True, retain_graph=True)
            if any(g is not None for g in grads):
                out.append(name)
    return out


class Reparametrise(Exception):
    """Raised inside set-up when ``whiten="auto"`` finds no proper mode and the model has a funnel to non-centre."""

    def __init__(self, sites: list[str], reason: str, keep_centred: bool = False):
        super().__init__(sites, reason)
        self.sites, self.reason, self.keep_centred = sites, reason, keep_centred


class Frame:
    """How a guide's frame was asked for and what it is: a component of
    :class:`~pyro_stein.AmortizedSteinGuide` (``guide.frame``); the frame's ``m`` and ``L`` are the guide's buffers
    ``whiten_loc`` and ``whiten_scale`` (amortized guides: each dataset's own, from
    :meth:`~pyro_stein.AmortizedSteinGuide.frames`).

    :param request: ``"auto"``, ``"laplace"``, ``"adaptive"`` or ``None`` (the guide's ``whiten``).
    :param bool amortized: whether the guide is amortized (it then takes ``"laplace"`` or ``None`` only; ``"auto"``
        means no frame).

    :ivar request: what was asked for.
    :ivar whiten: the fixed frame in use: ``"laplace"``, ``"affine"`` (the frame
        :meth:`~pyro_stein.AmortizedSteinGuide.calibrate` gives a guide without one) or ``None``.
    :ivar bool adaptive: the driver moves the particles in their own moving affine frame (:func:`adaptive_frame`).
    :ivar fallback_reason: why ``"auto"`` did not use a Laplace frame in the model's own parameterisation.
    :ivar list reparam_sites: the sites ``"auto"`` non-centred (``LocScaleReparam(centered=0)``).
    """

    def __init__(self, request: str | None = "auto", amortized: bool = False):
        if request not in WHITEN_OPTIONS:
            raise ValueError(f"whiten must be one of {WHITEN_OPTIONS}, got {request!r}")
        if request == "adaptive" and amortized:
            raise ValueError(
                "whiten='adaptive' is for non-amortized guides; an amortized guide takes whiten='laplace' "
                "(a frame per dataset) or None"
            )
        self.request = request
        self.whiten: str | None = "laplace" if request == "laplace" else None
        self.adaptive = request == "adaptive"
        self.fallback_reason: str | None = None
        self.reparam_sites: list[str] = []
        # a model with a mode and a funnel's sites: the centred Laplace frame and its ELBO, to compare with the
        # non-centred one
        self._centred: FrameTensors | None = None
        self._centred_elbo = float("-inf")
        self._keep_centred = False
        self.compared: tuple[float, float] | None = None  # (centred, non-centred) ELBOs when the non-centred won

    def __repr__(self) -> str:
        return f"Frame(request={self.request!r}, whiten={self.whiten!r}, adaptive={self.adaptive})"

    def use_reparam(self, sites: Sequence[str], reason: str | None, keep_centred: bool = False) -> None:
        """Record that ``sites`` are non-centred (``reason``: why there was no mode without it, or ``"compare"``
        while the two parameterisations' Laplace frames are compared); ``keep_centred``: the comparison kept the
        model's own parameterisation."""
        self.reparam_sites = list(sites)
        self._keep_centred = self._keep_centred or keep_centred
        if reason is None and not keep_centred:  # a set-up that failed: the next one chooses afresh
            self._centred, self._keep_centred, self.compared = None, False, None
        if reason is None or keep_centred:
            self.fallback_reason = None
        elif reason == "compare":
            self.fallback_reason = (
                f"the model's own parameterisation has a mode, but its sites {self.reparam_sites} non-centred "
                "(LocScaleReparam(centered=0.0)) give a Laplace approximation with a higher evidence lower bound"
            )
        else:
            self.fallback_reason = (
                f"no proper mode in the model's own parameterisation ({reason}); its sites {self.reparam_sites} were "
                "non-centred (LocScaleReparam(centered=0.0))"
            )

    def reparametrised(self, model: Callable) -> Callable:
        """``model`` with :attr:`reparam_sites` non-centred (``model`` itself when there are none)."""
        from pyro.infer.reparam import LocScaleReparam

        if not self.reparam_sites:
            return model
        return pyro.poutine.reparam(model, config={n: LocScaleReparam(centered=0.0) for n in self.reparam_sites})

    def fit(
        self,
        init_loc: Tensor,
        amortized: bool,
        restored: bool,
        laplace: Callable[[], FrameTensors],
        funnel: Callable[[], list],
        elbo: Callable[[FrameTensors], float] | None = None,
    ) -> FrameTensors | None:
        """The fixed frame ``(m, L)`` of a non-amortized guide at set-up, or ``None`` without one.

        ``laplace()`` fits the Laplace frame (a ``ValueError`` when there is no proper mode); for ``"auto"`` a
        failure tries ``funnel()`` (the sites to non-centre: then :class:`Reparametrise` is raised, for the guide to
        set up again) and else falls back to the adaptive frame. Where there is a mode but also a funnel's sites (a
        centred hierarchical model can have a mode at a degenerate scale, e.g. Neal's funnel), the model is set up
        non-centred as well and the parameterisation whose Laplace approximation has the higher evidence lower
        bound ``elbo(frame)`` is kept. A ``restored`` guide (loaded from a file) gets a placeholder frame that its
        saved buffers replace."""
        if amortized or not (self.whiten is not None or self.request == "auto"):
            return None
        if restored:
            if self.whiten is None:
                return None
            loc = torch.zeros_like(init_loc)
            return loc, torch.eye(init_loc.shape[0], dtype=init_loc.dtype, device=init_loc.device)
        if self.request != "auto":
            return laplace()
        if self._keep_centred and self._centred is not None:  # back from the comparison: the frame found before
            frame, self._centred = self._centred, None
            self.whiten, self.adaptive = "laplace", False
            return frame
        try:
            frame = laplace()
        except ValueError as e:  # no proper mode: non-centre a funnel's sites, else an adaptive frame
            if self._centred is not None:  # the centred model had a mode, the non-centred one has none
                raise Reparametrise([], "the non-centred model has no proper mode", keep_centred=True) from None
            sites = [] if self.reparam_sites else funnel()
            if sites:
                raise Reparametrise(sites, str(e)) from None
            self.whiten, self.adaptive, self.fallback_reason = None, True, str(e)
            return None
        if elbo is not None and not self.reparam_sites and not self._keep_centred:
            sites = funnel()
            if sites:  # a mode, and a funnel: compare with the non-centred parameterisation's Laplace frame
                self._centred, self._centred_elbo = frame, elbo(frame)
                raise Reparametrise(sites, "compare")
        if self.reparam_sites and self._centred is not None:
            noncentred = elbo(frame)
            if not noncentred > self._centred_elbo + _ELBO_MARGIN:
                raise Reparametrise([], "the centred model's Laplace frame fits as well", keep_centred=True)
            self.compared, self._centred = (self._centred_elbo, noncentred), None
        self.whiten, self.adaptive = "laplace", False
        return frame

    def to_dict(self) -> dict:
        """The frame in use, as a checkpoint stores it."""
        return {
            "whiten": self.whiten if self.whiten is not None or not self.adaptive else "adaptive",
            "adaptive_frame": self.adaptive,
            "reparam_sites": list(self.reparam_sites),
        }

    @staticmethod
    def request_of(saved: dict) -> str | None:
        """The ``whiten`` to build a guide with that restores the frame of :meth:`to_dict`'s ``saved``."""
        return "laplace" if saved.get("whiten") == "affine" else saved.get("whiten")
