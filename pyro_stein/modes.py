"""Mode discovery for multimodal posteriors: tempering, multi-start mode searches and mixture samplers.

A sampler trained with the Stein direction from one start (a Laplace frame at one mode) stays near the modes its
particles see. Three ways to reach the others:

* **Annealing** (:class:`Tempered`, :func:`anneal`): train on ``p_beta(z) ∝ prior(z) likelihood(z)^beta`` with
  ``beta`` rising from near 0 to 1, so the sampler starts as wide as the prior and follows the posterior as its
  modes separate. Needs a sampler that can split (e.g. :class:`~pyro_stein.flows.FlowSampler`).
* **Mode searches combined into a mixture** (:func:`find_modes`, :func:`mixture_from_modes`, :func:`fit_mixture`,
  :func:`reweight_mixture`): many gradient ascents from prior draws, the distinct optima kept with their Laplace
  approximations, one flow per mode started at its Laplace approximation and trained with the Stein direction in its
  own frame, then the mixture weights re-estimated from importance weights against the model's log joint.
* **Balancing the masses** (:func:`elbo_refine`): after annealing, the Stein direction keeps the split of mass
  between modes that the sampler had when they separated; maximising the ELBO on the sampler's density moves it.
  The same refinement, averaged over training datasets, widens an amortized flow that the Stein direction left
  too narrow.
* **Known symmetries** (:class:`~pyro_stein.flows.SymmetrizedSampler`): where the posterior is invariant under sign
  flips or relabellings, one mode found is all of them.

All of them need only the model's log density and score, through the guide's ``log_density``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ._checks import _int_at_least
from .data import dataset_batch
from .flows import FlowSampler, MixtureSampler
from .importance import psis
from .kernels import RadialKernel, RBFKernel
from .logjoint import pack
from .stein import ksd_from_matrices, stein_direction_from_matrices
from .tracing import require_full_data

__all__ = [
    "Modes",
    "Tempered",
    "anneal",
    "elbo_refine",
    "find_modes",
    "fit_mixture",
    "mixture_from_modes",
    "reweight_mixture",
]


class _TemperMessenger(Messenger):
    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"] and not msg["infer"].get("is_auxiliary"):
            msg["scale"] = self.beta * msg["scale"]


class Tempered:
    """A model whose observed sites (the likelihood, and ``pyro.factor`` terms) are scaled by ``beta``: its log joint is
    ``log prior + beta log likelihood``. Set ``beta`` between calls (see :func:`anneal`).

    The model is re-run at each evaluation, so build the guide and :class:`~pyro_stein.AmortizedSVGD` on it with
    ``record_graph=False`` (a recorded graph would keep the ``beta`` it was recorded with).
    """

    def __init__(self, model, beta: float = 1.0):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.model = model
        self.beta = float(beta)

    def __call__(self, *args, **kwargs):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta!r}")
        with _TemperMessenger(self.beta):
            return self.model(*args, **kwargs)


def anneal(
    svgd,
    tempered: Tempered,
    *args,
    num_steps: int,
    anneal_fraction: float = 0.5,
    beta0: float = 1e-3,
    **kwargs,
) -> list[float]:
    """Train ``svgd`` (an :class:`~pyro_stein.AmortizedSVGD` on ``tempered``) for ``num_steps`` steps while ``beta``
    rises geometrically from ``beta0`` to 1 over the first ``anneal_fraction`` of them, then stays at 1.

    The guide should be set up (its frame, if any, found) at ``beta0``: this function sets ``tempered.beta = beta0``
    before its first step, so a guide not yet set up gets the prior's frame. For an amortized guide pass the training
    datasets as ``datasets=[...]`` (then each step is a ``step_batch`` on them).

    :returns: the Stein discrepancy of each step (at its ``beta``).
    """
    num_steps = _int_at_least(num_steps, "num_steps", 1)
    if not isinstance(tempered, Tempered):
        raise TypeError(f"tempered must be a pyro_stein.modes.Tempered, got {type(tempered).__name__}")
    if svgd.record_graph or svgd.guide.record_graph:
        raise ValueError(
            "annealing changes the model between steps: build the guide and AmortizedSVGD with record_graph=False"
        )
    if not 0 < beta0 <= 1 or not 0 <= anneal_fraction <= 1:
        raise ValueError(f"need 0 < beta0 <= 1 and 0 <= anneal_fraction <= 1, got {beta0!r}, {anneal_fraction!r}")
    datasets = kwargs.pop("datasets", None)
    ramp = max(1, int(anneal_fraction * num_steps))
    history = []
    for t in range(num_steps):
        tempered.beta = min(1.0, beta0 ** (1 - t / ramp)) if t < ramp else 1.0
        history.append(svgd.step_batch(datasets) if datasets is not None else svgd.step(*args, **kwargs))
    tempered.beta = 1.0
    return history


class Modes(NamedTuple):
    """Distinct local maxima of a log density and their Laplace approximations, by decreasing Laplace mass."""

    locs: Tensor  #: ``(K, D)`` the modes (packed unconstrained latents)
    scale_trils: Tensor  #: ``(K, D, D)`` Cholesky factors of the inverse negative Hessians
    log_masses: Tensor  #: ``(K,)`` Laplace log masses ``log p(m) + D/2 log 2 pi + log|det L|``
    counts: Tensor  #: ``(K,)`` how many starts ended at each mode


def _hessians(log_density, x: Tensor, args, kwargs, step: float = 1e-4) -> Tensor:
    """Hessians of the log density at the rows of ``x`` ``(S, D)`` by central differences of the score."""
    S, D = x.shape
    eye = torch.eye(D, dtype=x.dtype, device=x.device) * step
    pts = torch.cat([x[:, None] + eye, x[:, None] - eye], 1).reshape(-1, D)
    _, score = log_density.log_density_and_score(pts, args, kwargs, check=False)
    score = score.to(x.dtype).reshape(S, 2, D, D)
    H = (score[:, 0] - score[:, 1]) / (2 * step)  # row j: d score / d x_j
    return 0.5 * (H + H.transpose(-1, -2))


@torch.no_grad()
def find_modes(
    guide,
    *args,
    num_starts: int = 64,
    num_steps: int = 500,
    lr: float = 0.05,
    starts: Tensor | None = None,
    merge_distance: float = 3.0,
    **kwargs,
) -> Modes:
    """Search the posterior of the dataset ``(*args, **kwargs)`` for its modes from many starts.

    Each start (a draw of the model's prior, or a row of ``starts``) climbs the guide's log density (packed
    unconstrained latents, ``guide.log_density``) by ``num_steps`` Adam steps on the score, then up to 10 Newton steps;
    points with a negative-definite Hessian are kept, merged when within ``merge_distance`` standard deviations (of
    the better one's Laplace approximation) of a better point.

    :param guide: an :class:`~pyro_stein.AmortizedSteinGuide` (set up here if needed) for the model.
    :param Tensor starts: ``(S, D)`` starting points in the packed unconstrained space (default: ``num_starts`` draws
        of the model's prior).
    :returns: :class:`Modes`.
    """
    guide.setup(*args, **kwargs)
    ld = guide.log_density
    like = next(guide.sampler.parameters())
    if starts is None:
        num_starts = _int_at_least(num_starts, "num_starts", 1)
        model = guide.inference_model
        rows = []
        for _ in range(num_starts):
            tr = poutine.trace(model).get_trace(*args, **kwargs)
            rows.append(pack({s.name: tr.nodes[s.name]["value"].unsqueeze(0) for s in guide.sites}, guide.sites))
        x = torch.cat(rows).to(like)
    else:
        x = torch.as_tensor(starts).to(like).reshape(-1, guide.latent_dim).clone()
    S, D = x.shape
    # Adam ascent on the score, run by hand: the log density is evaluated without autograd
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2 = 0.9, 0.999
    for t in range(1, _int_at_least(num_steps, "num_steps", 0) + 1):
        _, g = ld.log_density_and_score(x, args, kwargs, check=False)
        g = torch.nan_to_num(g.to(x.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x + lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
    lp, g = ld.log_density_and_score(x, args, kwargs, check=False)
    lp, g = lp.to(x.dtype), g.to(x.dtype)
    for _ in range(10):  # Newton steps, each kept only where it raises the log density
        H = _hessians(ld, x, args, kwargs)
        step = torch.linalg.solve(-H + 1e-10 * torch.eye(D, dtype=x.dtype), g.unsqueeze(-1)).squeeze(-1)
        trial = x + step
        lp2, g2 = ld.log_density_and_score(trial, args, kwargs, check=False)
        lp2, g2 = lp2.to(x.dtype), g2.to(x.dtype)
        better = torch.isfinite(lp2) & (lp2 >= lp)
        x = torch.where(better[:, None], trial, x)
        lp = torch.where(better, lp2, lp)
        g = torch.where(better[:, None], g2, g)
    H = _hessians(ld, x, args, kwargs)
    evals = torch.linalg.eigvalsh(H)
    ok = torch.isfinite(lp) & (evals.max(-1).values < 0) & torch.isfinite(evals).all(-1)
    if not bool(ok.any()):
        raise ValueError("no start reached a point with a negative-definite Hessian; raise num_steps or num_starts")
    x, lp, H = x[ok], lp[ok], H[ok]
    cov = torch.linalg.inv(-H)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    L = torch.linalg.cholesky(cov)
    order = torch.argsort(lp, descending=True)
    kept: list[int] = []
    counts: list[int] = []
    for i in order.tolist():
        for j, k in enumerate(kept):
            d = torch.linalg.solve_triangular(L[k], (x[i] - x[k]).unsqueeze(-1), upper=False).norm()
            if d < merge_distance:
                counts[j] += 1
                break
        else:
            kept.append(i)
            counts.append(1)
    idx = torch.tensor(kept, device=x.device)
    log_mass = lp[idx] + 0.5 * D * math.log(2 * math.pi) + L[idx].diagonal(dim1=-2, dim2=-1).log().sum(-1)
    order = torch.argsort(log_mass, descending=True)
    return Modes(x[idx][order], L[idx][order], log_mass[order], torch.tensor(counts, device=x.device)[order])


def mixture_from_modes(modes: Modes, max_components: int | None = None, **flow_kwargs) -> MixtureSampler:
    """A :class:`~pyro_stein.flows.MixtureSampler` of one :class:`~pyro_stein.flows.FlowSampler` per mode, each started
    at the mode's Laplace approximation, weighted by the Laplace masses. Pass it to a guide built with ``whiten=None``
    (the components carry their own frames) and train it with :func:`fit_mixture`.

    :param int max_components: keep only the modes of largest Laplace mass.
    :param flow_kwargs: further :class:`~pyro_stein.flows.FlowSampler` options (``num_layers``, ``bins``, ...).
    """
    K = modes.locs.shape[0] if max_components is None else min(int(max_components), modes.locs.shape[0])
    D = modes.locs.shape[-1]
    comps = [
        FlowSampler(D, init_loc=modes.locs[k], init_scale=modes.scale_trils[k], seed=k, **flow_kwargs) for k in range(K)
    ]
    return MixtureSampler(comps, modes.log_masses[:K])


def fit_mixture(
    guide,
    *args,
    num_steps: int = 500,
    num_particles: int = 64,
    lr: tuple[float, float] = (1e-2, 1e-3),
    kernel: RadialKernel | None = None,
    reweight_every: int = 100,
    **kwargs,
) -> list[float]:
    """Train each component of a guide's :class:`~pyro_stein.flows.MixtureSampler` with the Stein direction on its own
    draws, in its own affine frame (the component's current ``loc`` and ``L``): ``num_particles`` draws per component
    and step, the kernel and the Stein direction computed on ``L^{-1} (z - loc)`` (score ``L^T grad log p``) and
    mapped back by ``L``, so that every mode, however narrow or far from the others, gets its own well-scaled update.
    The mixture weights are re-estimated by :func:`reweight_mixture` every ``reweight_every`` steps and at the end.

    :param guide: a non-amortized :class:`~pyro_stein.AmortizedSteinGuide` whose sampler is a ``MixtureSampler``.
    :param lr: Adam's learning rate, decayed geometrically from the first value to the second.
    :returns: the mean (over components) Stein discrepancy of each step.
    """
    guide.setup(*args, **kwargs)
    mix = guide.sampler
    if not isinstance(mix, MixtureSampler):
        raise TypeError(f"fit_mixture trains a guide whose sampler is a MixtureSampler, got {type(mix).__name__}")
    if guide.amortized:
        raise ValueError("fit_mixture trains a mixture for one dataset; the guide is amortized")
    num_steps = _int_at_least(num_steps, "num_steps", 1)
    n = _int_at_least(num_particles, "num_particles", 2)
    kernel = RBFKernel() if kernel is None else kernel
    opt = torch.optim.Adam(mix.parameters(), lr=lr[0])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, (lr[1] / lr[0]) ** (1 / num_steps))
    like = next(mix.parameters())
    K, D = len(mix.components), mix.latent_dim
    history = []
    for t in range(num_steps):
        us, frames = [], []
        for comp in mix.components:
            noise = torch.randn(n, comp.noise_dim, dtype=like.dtype, device=like.device)
            us.append(comp(noise))
            loc, L, _ = comp._affine(None)
            frames.append((loc.detach(), L.detach()))
        u = torch.stack(us)  # (K, n, D)
        x = guide.unwhiten(u.detach().reshape(K * n, D))
        _, score = guide.log_density.log_density_and_score(x, args, kwargs, check=False)
        score = guide.whiten_score(torch.nan_to_num(score.to(u.dtype))).reshape(K, n, D)
        loc = torch.stack([f[0] for f in frames])
        Ls = torch.stack([f[1] for f in frames])
        w = torch.linalg.solve_triangular(Ls, (u.detach() - loc[:, None]).transpose(-1, -2), upper=False)
        w = w.transpose(-1, -2)  # (K, n, D) in each component's frame
        sw = score @ Ls  # L^T score
        km = kernel.matrices(w)
        phi = stein_direction_from_matrices(w, sw, km) @ Ls.transpose(-1, -2)
        history.append(float(ksd_from_matrices(w, sw, km).mean()))
        loss = -(u * phi).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if reweight_every and (t + 1) % reweight_every == 0 and t + 1 < num_steps:
            reweight_mixture(guide, *args, **kwargs)
    reweight_mixture(guide, *args, **kwargs)
    return history


@torch.no_grad()
def reweight_mixture(guide, *args, num_samples: int = 4000, rounds: int = 3, **kwargs) -> float:
    """Re-estimate the weights of a guide's :class:`~pyro_stein.flows.MixtureSampler` from importance weights.

    Each round draws ``num_samples`` points from the mixture, weights them against the model's log joint
    (Pareto-smoothed) and sets ``w_k = sum_i W_i r_ik`` with ``r_ik`` the responsibility of component ``k`` for draw
    ``i`` (a population Monte Carlo update: its fixed point gives each component the posterior mass it covers).

    :returns: the Pareto k-hat of the last round's weights.
    """
    from .diagnostics import draws_and_log_densities

    mix = guide.sampler
    if not isinstance(mix, MixtureSampler):
        raise TypeError(f"reweight_mixture needs a guide whose sampler is a MixtureSampler, got {type(mix).__name__}")
    khat = math.inf
    for _ in range(_int_at_least(rounds, "rounds", 1)):
        z, log_q, log_p = draws_and_log_densities(guide, num_samples, *args, **kwargs)
        smoothed, khat = psis(log_p - log_q)
        u = guide.whiten_latents(z)
        resp = torch.log_softmax(mix.component_log_probs(u), -1)
        log_w = torch.logsumexp(smoothed.unsqueeze(-1) + resp, 0)
        # a floor keeps every component drawn (so a later round can raise it again); the density accounts for it
        mix.set_log_weights(torch.logaddexp(log_w, torch.full_like(log_w, math.log(1e-3 / len(log_w)))))
    return float(khat)


def _amortized_negative_elbo(guide, datasets, num_samples: int) -> tuple[Tensor, Tensor]:
    """The negative ELBO of an amortized guide averaged over ``datasets``, and a surrogate with the same gradient in
    the guide's parameters: ``log q(z) - s(z) . z`` with the model's score ``s`` at the reparametrised draws ``z``
    held fixed, so that the model is evaluated once for the whole batch, without a graph through it.

    A dataset whose value or score is not finite at some draw is left out of both (as a training step leaves it
    out); when none is finite, both are ``nan``."""
    from .diagnostics import _draws_with_density

    sampler = guide.sampler
    like = guide._like()
    noise = torch.randn(len(datasets), num_samples, sampler.noise_dim, dtype=like.dtype, device=like.device)

    def draws(batch, eps):  # the unconstrained draws and their log density under the guide, with a graph
        frame = guide.frames(batch) if guide.per_dataset_frames else None
        return _draws_with_density(guide, eps, guide.contexts(batch, frame).unsqueeze(-2), frame)

    z, log_q = draws(datasets, noise)
    log_p, score = guide.log_density.log_density_and_score_batch(z.detach(), datasets, check=False)
    log_p, score = log_p.to(log_q.dtype), score.to(z.dtype)
    values = (log_q - log_p).detach()
    keep = torch.isfinite(values).all(-1) & torch.isfinite(score).flatten(1).all(-1)
    if not bool(keep.all()):
        # the kept datasets' draws again, on their own: a dataset left out must not reach the gradient at all (its
        # encoder inputs may be infinite, and 0 * inf in a weight's gradient is nan)
        kept = [d for d, k in zip(datasets, keep.tolist()) if k]
        if not kept:
            nan = values.new_full((), math.nan)
            return nan, nan
        score, values = score[keep], values[keep]
        z, log_q = draws(kept, noise[keep])
    surrogate = (log_q - (score * z).sum(-1)).mean()
    return values.mean(), surrogate


def elbo_refine(
    guide,
    *args,
    datasets=None,
    batch_size: int = 8,
    num_steps: int = 3000,
    num_samples: int = 256,
    lr: float = 3e-3,
    **kwargs,
) -> list[float]:
    """Refine a guide whose sampler has a density by maximising the ELBO ``E_q[log p(z) - log q(z)]`` with
    reparametrised draws.

    Two uses. After annealing, it fixes the masses of the modes found: the Stein direction moves draws within a mode
    but hardly between modes (a draw would have to cross the low density between them), so an annealed sampler keeps
    the split of mass it had when the modes separated, while the ELBO's gradient acts on the sampler's density
    directly (a mode with too much mass has ``log q > log p`` on its draws, and the gradient lowers it there). And
    after amortized training, it widens what the Stein direction leaves too narrow: with a few dozen particles per
    dataset the Stein direction's fixed point under-disperses where a posterior is far from Gaussian, and the ELBO
    of a flexible flow has no such bias. The ELBO is mode-seeking: run it after Stein training, not instead of it.

    ``num_steps`` Adam steps of ``num_samples`` draws, the learning rate decaying from ``lr`` to 0 on a cosine. A step
    whose loss or gradient is not finite is skipped (no parameter moves); more than a tenth of the steps skipped
    raises a ``ValueError``.

    :param datasets: for an amortized guide: its training datasets (a collection, a
        :class:`~pyro_stein.data.PriorPredictiveStream` or an iterator of batches, as for
        :meth:`~pyro_stein.AmortizedSVGD.run`); each step averages the ELBO over ``batch_size`` of them and moves the
        encoder and the sampler. Leave ``None`` to refine a guide fitted to the one dataset ``(*args, **kwargs)``.
    :param int batch_size: datasets per step when ``datasets`` is a collection or a stream (an iterator of batches
        sets its own).
    :returns: the negative ELBO estimate of each step (``nan`` for a skipped step), in nats; with ``datasets``, the
        average over the step's datasets. A dataset whose model log density or score is not finite at some draw is
        left out of its step, as in training; a step none of whose datasets is finite is skipped.
    """
    from .diagnostics import _density_draws, _require_density
    from .infer import _batches

    num_steps = _int_at_least(num_steps, "num_steps", 1)
    num_samples = _int_at_least(num_samples, "num_samples", 2, "an int >= 2")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a positive number, got {type(lr).__name__}")
    if not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if datasets is None:
        if guide.amortized:
            raise ValueError(
                "elbo_refine of an amortized guide needs its training datasets: elbo_refine(guide, datasets=[...])"
            )
        guide.setup(*args, **kwargs)
        _require_density(guide)
        batches = None
        params = [p for p in guide.sampler.parameters() if p.requires_grad]
    else:
        if not guide.amortized:
            raise ValueError(
                "elbo_refine(guide, datasets=...) refines an amortized guide; this guide fits one dataset: pass it as "
                "elbo_refine(guide, *args, **kwargs)"
            )
        batches = (dataset_batch(b, "elbo_refine") for b in _batches(datasets, batch_size, args, kwargs))
        first = next(batches)
        guide.setup(*first[0].args, **first[0].kwargs)
        _require_density(guide)
        require_full_data(guide.subsample_plates, "elbo_refine", "pass the full data")
        if guide.standardization_pending:  # a guide not trained yet: its encoder standardised as training would
            guide.fit_standardization(first)
        params = [p for p in guide.parameters() if p.requires_grad]

    def loss_of(batch):  # (the negative ELBO, a loss with its gradient)
        if batch is None:
            _, log_q, log_p = _density_draws(guide, num_samples, args, kwargs)
            loss = (log_q - log_p).mean()
            return loss, loss
        return _amortized_negative_elbo(guide, batch, num_samples)

    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_steps)
    history, skipped = [], 0
    for t in range(num_steps):
        opt.zero_grad()
        batch = None if batches is None else (first if t == 0 else next(batches))
        with torch.enable_grad():
            loss, surrogate = loss_of(batch)
            if torch.isfinite(loss):
                surrogate.backward()
        finite = bool(torch.isfinite(loss)) and all(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params
        )
        if finite:
            opt.step()
        else:
            skipped += 1
            if skipped > num_steps // 10:
                raise ValueError(
                    f"elbo_refine: {skipped} steps had a non-finite loss or gradient (the sampler puts draws where the "
                    "model's log density is not finite); lower lr, or train the guide with the Stein direction first"
                )
        schedule.step()
        history.append(float(loss.detach()) if finite else math.nan)
    opt.zero_grad()
    return history
