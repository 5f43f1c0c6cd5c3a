"""Mode discovery: tempering, mode searches, mixtures and symmetrized samplers on a sign-symmetric target."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_stein import Amortization, AmortizedSteinGuide, AmortizedSVGD
from pyro_stein.data import Dataset
from pyro_stein.diagnostics import draws_and_log_densities, importance_diagnostics
from pyro_stein.flows import FlowSampler, MixtureSampler, SymmetrizedSampler
from pyro_stein.importance import psis
from pyro_stein.modes import (
    Tempered,
    anneal,
    elbo_refine,
    find_modes,
    fit_mixture,
    mixture_from_modes,
    reweight_mixture,
)


def _sym_model(y):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(theta**2, 1.0).to_event(1), obs=y)


def _data():  # four modes near (+-1.2, +-1.5)
    g = torch.Generator().manual_seed(0)
    return torch.tensor([1.2, 1.5]) ** 2 + torch.randn(30, 2, generator=g)


def _orthant_masses(z, smoothed):
    idx = (z[:, 0] > 0).long() * 2 + (z[:, 1] > 0).long()
    return torch.zeros(4).index_add_(0, idx, smoothed.exp())


def test_tempered_scales_the_likelihood_only():
    y = _data()
    tempered = Tempered(_sym_model, beta=0.25)
    tr = pyro.poutine.trace(tempered).get_trace(y)
    tr.compute_log_prob()
    prior = tr.nodes["theta"]["log_prob_sum"]
    full = pyro.poutine.trace(pyro.poutine.replay(_sym_model, trace=tr)).get_trace(y)
    full.compute_log_prob()
    torch.testing.assert_close(tr.log_prob_sum(), prior + 0.25 * full.nodes["y"]["log_prob_sum"])
    tempered.beta = 2.0
    with pytest.raises(ValueError, match="beta"):
        tempered(y)


def test_anneal_needs_unrecorded_graphs_and_runs():
    y = _data()
    tempered = Tempered(_sym_model)
    guide = AmortizedSteinGuide(tempered, sampler=FlowSampler(2, init_scale=2.0), whiten=None)
    with pytest.raises(ValueError, match="record_graph=False"):
        anneal(AmortizedSVGD(tempered, guide), tempered, y, num_steps=2)
    guide = AmortizedSteinGuide(tempered, sampler=FlowSampler(2, init_scale=2.0), whiten=None, record_graph=False)
    svgd = AmortizedSVGD(tempered, guide, num_particles=16, record_graph=False)
    history = anneal(svgd, tempered, y, num_steps=6)
    assert len(history) == 6 and tempered.beta == 1.0


def test_mode_searches_find_every_sign_symmetric_mode_and_the_mixture_covers_them():
    pyro.set_rng_seed(0)
    y = _data()
    probe = AmortizedSteinGuide(_sym_model, whiten=None).setup(y)
    modes = find_modes(probe, y, num_starts=40, num_steps=200)
    assert modes.locs.shape == (4, 2)
    torch.testing.assert_close(modes.locs.abs(), modes.locs[:1].abs().expand(4, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(modes.log_masses, modes.log_masses[:1].expand(4), atol=1e-5, rtol=0)
    guide = AmortizedSteinGuide(_sym_model, sampler=mixture_from_modes(modes, num_layers=1), whiten=None)
    history = fit_mixture(guide, y, num_steps=20, num_particles=16, reweight_every=10)
    assert len(history) == 20 and isinstance(guide.sampler, MixtureSampler)
    khat = reweight_mixture(guide, y, num_samples=2000)
    assert khat < 0.7
    z, log_q, log_p = draws_and_log_densities(guide, 4000, y)
    masses = _orthant_masses(z, psis(log_p - log_q)[0])
    assert float(((masses - 0.25).abs() / 0.25).max()) < 0.2


def _one_mode_of_four():
    """``(y, guide, sampler)``: a flow trained on one of the four modes of the sign-symmetric target, inside a
    :class:`SymmetrizedSampler` over the four sign flips (left off: ``sampler.symmetrize = False``)."""
    y = _data()
    probe = AmortizedSteinGuide(_sym_model, whiten=None).setup(y)
    mode = find_modes(probe, y, starts=torch.tensor([[1.0, 1.0]]), num_steps=100)
    base = FlowSampler(2, num_layers=1, init_loc=mode.locs[0], init_scale=mode.scale_trils[0])
    sampler = SymmetrizedSampler(base, [([0, 1], [a, b]) for a in (1, -1) for b in (1, -1)])
    guide = AmortizedSteinGuide(_sym_model, sampler=sampler, whiten=None)
    sampler.symmetrize = False  # the base alone: one of the four modes
    AmortizedSVGD(_sym_model, guide, num_particles=32).run(y, num_steps=30)
    return y, guide, sampler


def test_symmetrized_sampler_covers_the_modes_one_start_misses():
    pyro.set_rng_seed(0)
    y, guide, sampler = _one_mode_of_four()
    alone = importance_diagnostics(guide, y, num_samples=2000)
    # k-hat cannot see modes that no draw reaches: within its mode the base is good, so k-hat is low, while the
    # evidence misses the other three quarters of the mass
    assert float(alone.khat) < 0.7
    sampler.symmetrize = True
    r = importance_diagnostics(guide, y, num_samples=4000)
    assert float(r.khat) < 0.7
    # the base alone holds a quarter of the mass: its evidence estimate is a quarter of the whole
    assert float(r.log_evidence) == pytest.approx(float(alone.log_evidence) + math.log(4.0), abs=0.1)
    z, _, _ = draws_and_log_densities(guide, 4000, y)
    masses = _orthant_masses(z, psis(torch.zeros(4000))[0])
    assert float(((masses - 0.25).abs() / 0.25).max()) < 0.2


def test_a_defensive_mixture_lets_khat_see_the_modes_no_draw_reaches():
    """The base flow alone covers one of four equal modes, which its own draws' k-hat need not show (see above);
    with a tenth of the draws from the prior (which puts about 1 % of its mass near each mode, so some 20 of 200
    prior draws land in the missed ones with weights far above the rest) k-hat exceeds 0.7. The symmetrized sampler
    covers every mode and keeps a small k-hat, and its log-evidence estimates with and without the prior's draws
    agree within 4 combined standard errors."""
    pyro.set_rng_seed(0)
    y, guide, sampler = _one_mode_of_four()
    defended = importance_diagnostics(guide, y, num_samples=2000, defensive=0.1)
    assert float(defended.khat) > 0.7, float(defended.khat)
    sampler.symmetrize = True
    plain = importance_diagnostics(guide, y, num_samples=4000)
    r = importance_diagnostics(guide, y, num_samples=4000, defensive=0.1)
    assert float(r.khat) <= 0.7, float(r.khat)
    se = math.hypot(float(r.log_evidence_se), float(plain.log_evidence_se))
    gap = abs(float(r.log_evidence) - float(plain.log_evidence))
    assert gap < 4 * se, (
        f"log evidence {float(r.log_evidence):.4f} vs {float(plain.log_evidence):.4f} (4 s.e. {4 * se:.4f})"
    )


@pytest.mark.parametrize(
    "value, error, match",
    [
        (1.0, ValueError, r"\[0, 1\)"),
        (-0.1, ValueError, r"\[0, 1\)"),
        ("0.1", TypeError, "float"),
        (0.9995, ValueError, "leaves"),
    ],
)
def test_defensive_share_is_checked(value, error, match):
    guide = AmortizedSteinGuide(_sym_model, sampler=FlowSampler(2), whiten=None)
    with pytest.raises(error, match=match):
        importance_diagnostics(guide, _data(), num_samples=2000, defensive=value)


def _conjugate_model(y):
    x = pyro.sample("x", dist.Normal(torch.zeros(()), 1.0))
    pyro.sample("y", dist.Normal(x, 1.0), obs=y)


def test_elbo_refine_fits_an_exact_gaussian_posterior_and_its_evidence():
    """x ~ N(0, 1), y | x ~ N(x, 1), y = 1: the posterior is N(0.5, 0.5) and log Z = log N(1; 0, 2). A flow started
    far off (mean 0, sd 3) ends at the posterior. Tolerances from Monte Carlo error: 4,000 draws give the mean to
    0.011 and the variance to 0.011 (one s.e.), and log Z from exact weights to well under 0.01."""
    pyro.set_rng_seed(0)
    y = torch.tensor(1.0)
    guide = AmortizedSteinGuide(_conjugate_model, sampler=FlowSampler(1, num_layers=1, init_scale=3.0), whiten=None)
    history = elbo_refine(guide, y, num_steps=1000, num_samples=128, lr=1e-2)
    assert len(history) == 1000 and all(math.isfinite(h) for h in history)
    z, log_q, log_p = draws_and_log_densities(guide, 4000, y)
    log_z = float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(y))
    assert float(z.mean()) == pytest.approx(0.5, abs=0.05), "mean off by more than 4.5 Monte Carlo s.e."
    assert float(z.var()) == pytest.approx(0.5, abs=0.05), "variance off by more than 4.5 Monte Carlo s.e."
    assert float(torch.logsumexp(log_p - log_q, 0) - math.log(4000)) == pytest.approx(log_z, abs=0.02)
    assert -history[-1] == pytest.approx(log_z, abs=0.1), "the last step's ELBO estimate (128 draws)"


def _conjugate_data_model(y):
    x = pyro.sample("x", dist.Normal(torch.zeros(()), 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(x, 1.0), obs=y)


@pytest.mark.parametrize("whiten", [None, "laplace"])
def test_amortized_elbo_refine_fits_exact_posteriors_of_new_datasets(whiten):
    """x ~ N(0, 1), y_i | x ~ N(x, 1), five observations: the posterior is N(sum(y) / 6, 1 / 6), and mean(y) reaches
    the flow's context. An amortized flow started too narrow (scale 0.3 against a posterior sd of 0.41) and refined
    on 64 prior-predictive datasets alone ends at the exact posterior of held-out datasets. 4,000 draws give the mean
    to 0.016 posterior sds and the variance to 2.2 % (one Monte Carlo s.e.); the tolerances are 4 s.e. plus an
    amortization allowance of 0.05 sd for the mean and 5 % for the variance: the flow's context head is an MLP, which
    fits the linear map from mean(y) to the posterior mean only approximately over the data's range."""
    pyro.set_rng_seed(0)
    n = 5
    train = [Dataset(torch.randn(()) + torch.randn(n)) for _ in range(64)]
    extra = 1 if whiten is None else 3  # the data mean (+ the frame summary: loc and the scale's diagonal)
    guide = AmortizedSteinGuide(
        _conjugate_data_model,
        amortized=Amortization(context_dim=4, mean_features=True),
        sampler=FlowSampler(1, context_dim=4 + extra, num_layers=0, init_scale=0.3),
        whiten=whiten,
    )
    history = elbo_refine(guide, datasets=train, num_steps=300, num_samples=64, lr=1e-2)
    assert len(history) == 300 and all(math.isfinite(h) for h in history)
    var = 1 / (n + 1)
    for y in (torch.tensor([-1.5, -0.5, -1.0, -2.0, -0.2]), torch.zeros(n), torch.tensor([1.0, 2.0, 0.5, 1.5, 1.2])):
        z, _, _ = draws_and_log_densities(guide, 4000, y)
        error = (float(z.mean()) - float(y.sum()) / (n + 1)) / math.sqrt(var)
        assert abs(error) < 4 * 0.016 + 0.05, f"mean off by {error:.3f} posterior sds (4 MC s.e. + 0.05)"
        assert float(z.var()) / var == pytest.approx(1.0, abs=4 * 0.022 + 0.05), "variance (4 MC s.e. + 5 %)"


@pytest.mark.parametrize("whiten", [None, "laplace"])
def test_amortized_elbo_refine_has_the_gradient_of_the_negative_elbo(whiten):
    """The batched surrogate (the model's score held fixed at the draws) has the value and the gradient of the average
    negative ELBO computed with a graph through the model and the frame's map, for the same noise."""
    from pyro_stein.modes import _amortized_negative_elbo

    pyro.set_rng_seed(0)
    datasets = [Dataset(torch.randn(4) + k) for k in range(3)]
    extra = 1 if whiten is None else 3
    guide = AmortizedSteinGuide(
        _conjugate_data_model,
        amortized=Amortization(context_dim=4, mean_features=True),
        sampler=FlowSampler(1, context_dim=4 + extra, num_layers=1),
        whiten=whiten,
    )
    guide.setup(*datasets[0].args)
    guide.fit_standardization(datasets)
    params = [p for p in guide.parameters() if p.requires_grad]
    torch.manual_seed(1)
    value, surrogate = _amortized_negative_elbo(guide, datasets, 16)
    batched = torch.autograd.grad(surrogate, params, allow_unused=True)
    torch.manual_seed(1)
    noise = torch.randn(len(datasets), 16, 1)
    losses = []
    for d, eps in zip(datasets, noise):
        context, frame = guide.context_and_frame(*d.args)
        u, log_q = guide.sampler.sample_and_log_prob(eps, context)
        z = guide.unwhiten(u, frame)
        if frame is not None:
            log_q = log_q - torch.linalg.slogdet(frame[1])[1]
        losses.append((log_q - guide.log_density.log_density(z, d.args, d.kwargs)).mean())
    direct = torch.stack(losses).mean()
    assert float(value) == pytest.approx(float(direct.detach()), rel=1e-10)
    for g, h in zip(batched, torch.autograd.grad(direct, params, allow_unused=True)):
        if g is None or h is None:
            assert g is None and h is None
        else:
            torch.testing.assert_close(g, h)


def _subsampled_model(y):
    x = pyro.sample("x", dist.Normal(torch.zeros(()), 1.0))
    with pyro.plate("data", y.shape[0], subsample_size=2):
        pyro.sample("y", dist.Normal(x, 1.0), obs=y)


def test_amortized_elbo_refine_takes_batches_of_argument_tuples_and_refuses_subsampling():
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(
        _conjugate_data_model,
        amortized=Amortization(context_dim=2),
        sampler=FlowSampler(1, context_dim=3, num_layers=0),  # + the data mean
        whiten=None,
    )
    batches = iter([[(torch.randn(3),), (torch.randn(3),)] for _ in range(2)])
    history = elbo_refine(guide, datasets=batches, num_steps=2, num_samples=8)
    assert len(history) == 2 and all(math.isfinite(h) for h in history)
    with pytest.raises(ValueError, match="empty batch"):
        elbo_refine(guide, datasets=iter([[]]), num_steps=1)
    subsampled = AmortizedSteinGuide(
        _subsampled_model,
        amortized=Amortization(context_dim=2),
        sampler=FlowSampler(1, context_dim=3, num_layers=0),  # + the data mean
        whiten=None,
    )
    with pytest.raises(ValueError, match="subsamples plates"):
        elbo_refine(subsampled, datasets=[Dataset(torch.randn(5))], num_steps=1)
    assert subsampled.standardization_pending, "the refused call left the encoder's standardisation as it was"


def test_amortized_elbo_refine_leaves_out_a_dataset_that_is_not_finite():
    """A dataset whose log joint overflows (observations of 1e200) is left out of the step, which still moves the
    guide on the others, as a training step does; a batch of such datasets only is skipped."""
    from pyro_stein.modes import _amortized_negative_elbo

    pyro.set_rng_seed(0)
    good = [Dataset(torch.randn(4) + k) for k in range(3)]
    guide = AmortizedSteinGuide(
        _conjugate_data_model,
        amortized=Amortization(context_dim=4, mean_features=True),
        sampler=FlowSampler(1, context_dim=5, num_layers=0),
        whiten=None,
    )
    guide.setup(*good[0].args)
    guide.fit_standardization(good)
    bad = Dataset(torch.full((4,), 1e200))
    torch.manual_seed(1)
    value, surrogate = _amortized_negative_elbo(guide, [*good, bad], 16)
    torch.manual_seed(1)
    expected, _ = _amortized_negative_elbo(guide, good, 16)
    assert math.isfinite(float(value)) and math.isfinite(float(surrogate.detach()))
    assert float(value) == pytest.approx(float(expected), rel=1e-10), "the mean over the finite datasets"
    params = [p for p in guide.parameters() if p.requires_grad]
    assert all(
        bool(torch.isfinite(g).all())
        for g in torch.autograd.grad(surrogate, params, allow_unused=True)
        if g is not None
    )
    batches = iter([[good[0], bad]] * 19 + [[bad]])  # one skipped step of 20: within the tenth allowed
    history = elbo_refine(guide, datasets=batches, num_steps=20, num_samples=8)
    assert all(math.isfinite(h) for h in history[:19]) and math.isnan(history[19])


def test_elbo_refine_rejects_what_it_cannot_fit():
    y = torch.tensor(1.0)
    plain = AmortizedSteinGuide(_conjugate_model, whiten=None)
    with pytest.raises(TypeError, match="no density"):
        elbo_refine(plain, y, num_steps=1)
    guide = AmortizedSteinGuide(_conjugate_model, sampler=FlowSampler(1, num_layers=1), whiten=None)
    with pytest.raises(TypeError, match="lr"):
        elbo_refine(guide, y, lr="fast")
    with pytest.raises(ValueError, match="lr"):
        elbo_refine(guide, y, lr=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        elbo_refine(guide, y, num_steps=0)
    with pytest.raises(ValueError, match="amortized guide"):
        elbo_refine(guide, datasets=[Dataset(y)], num_steps=1)
    amortized = AmortizedSteinGuide(
        _conjugate_data_model,
        amortized=Amortization(context_dim=2),
        sampler=FlowSampler(1, context_dim=2, num_layers=0),
        whiten=None,
    )
    with pytest.raises(ValueError, match="datasets=\\[...\\]"):
        elbo_refine(amortized, torch.zeros(3), num_steps=1)
    with pytest.raises(ValueError, match="not both"):
        elbo_refine(amortized, torch.zeros(3), datasets=[Dataset(torch.zeros(3))], num_steps=1)
    no_density = AmortizedSteinGuide(_conjugate_data_model, amortized=Amortization(context_dim=2), whiten=None)
    with pytest.raises(TypeError, match="no density"):
        elbo_refine(no_density, datasets=[Dataset(torch.zeros(3))], num_steps=1)
