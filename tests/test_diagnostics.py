"""Stein diagnostics on draws from any source."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_stein.diagnostics import stein_discrepancy

from .conftest import tensor


def plated_model(y):
    """mu ~ N(0, 1); y_i ~ N(mu, 1) in a plate: exact posterior N(sum y / (n + 1), 1 / (n + 1))."""
    mu = pyro.sample("mu", dist.Normal(tensor(0.0), tensor(1.0)))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_ksd_of_exact_draws_is_small_and_of_shifted_draws_is_large():
    """On a plated model (the plate's subsample site must be ignored). KSD^2 of exact posterior draws
    is compared with its own spread over 10 independent replicates (the empirical s.e.)."""
    y = tensor([0.3, 1.2, -0.4, 0.8])
    post = dist.Normal(y.sum() / 5, 5**-0.5)
    torch.manual_seed(0)
    exact = torch.stack(
        [torch.tensor(stein_discrepancy(plated_model, {"mu": post.sample((400,))}, y)) for _ in range(10)]
    )
    se = exact.std() / 10**0.5
    assert exact.mean().abs() < 5 * se + 1e-3, f"KSD^2 of exact draws {exact.mean():.2e} vs s.e. {se:.2e}"
    shifted = stein_discrepancy(plated_model, {"mu": post.sample((400,)) + post.stddev}, y)
    assert shifted > 20 * exact.std(), f"shifted draws KSD^2 {shifted:.2e}, exact draws sd {exact.std():.2e}"


def test_missing_site_and_bad_input_errors():
    y = tensor([0.3, 1.2])
    with pytest.raises(ValueError, match="'mu'"):
        stein_discrepancy(plated_model, {"other": torch.zeros(5)}, y)
    with pytest.raises(TypeError, match="dict"):
        stein_discrepancy(plated_model, torch.zeros(5), y)
    for bad in (-5, 0, 1, 2.5):
        with pytest.raises(ValueError, match=rf"max_samples must be an int >= 2 .*got {bad}"):
            stein_discrepancy(plated_model, {"mu": tensor(torch.randn(10))}, y, max_samples=bad)


def test_draws_grouped_by_chain_are_rejected_not_read_as_a_wider_site():
    """(chains, draws) for a scalar site was read as 4 draws of a 100-vector, giving a confident, wrong KSD."""
    y = tensor([0.3, 1.2])
    with pytest.raises(
        ValueError, match=r"samples\['mu'\] has draws of shape \(100,\), but the site's shape is \(\).*group_by_chain"
    ):
        stein_discrepancy(plated_model, {"mu": tensor(torch.randn(4, 100))}, y)


def test_extra_keys_play_no_part():
    """Only the latent sites' draws count: an extra key with fewer draws (or a 0-d value) changes nothing."""
    y = tensor([0.3, 1.2])
    mu = tensor(torch.randn(200, generator=torch.Generator().manual_seed(0)))
    plain = stein_discrepancy(plated_model, {"mu": mu}, y)
    assert stein_discrepancy(plated_model, {"mu": mu, "det": mu[:10], "zero": tensor(1.0)}, y) == plain


def test_sites_with_different_numbers_of_draws_are_rejected():
    def two_sites(y):
        a = pyro.sample("a", dist.Normal(tensor(0.0), 1.0))
        b = pyro.sample("b", dist.Normal(tensor(0.0), 1.0))
        pyro.sample("y", dist.Normal(a + b, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"different numbers of draws \[10, 20\]"):
        stein_discrepancy(two_sites, {"a": tensor(torch.randn(10)), "b": tensor(torch.randn(20))}, tensor(0.5))


class _PriorGuide:
    """Prior draws of plated_model's mu for any dataset (calibrated for SBC by construction)."""

    def sample_posterior(self, num_samples, y):
        return {"mu": tensor(torch.randn(num_samples))}


@pytest.mark.parametrize(
    "truth, match",
    [
        ({"MU": tensor(0.0)}, r"true values of \['MU'\], which are not among the guide's sites \['mu'\]"),
        ({"mu": tensor([0.0, 1.0, 2.0])}, r"true value of 'mu' has shape \(3,\), but the site's draws have shape \(\)"),
    ],
)
def test_sbc_rejects_true_values_that_do_not_fit(truth, match):
    from pyro_stein import Dataset
    from pyro_stein.diagnostics import sbc

    with pytest.raises(ValueError, match=match):
        sbc(_PriorGuide(), lambda: (Dataset(tensor([0.5])), truth), num_datasets=2, num_samples=9)


@pytest.mark.parametrize("arg", ["num_datasets", "num_samples"])
@pytest.mark.parametrize("bad", [0, 2.0, True])
def test_sbc_checks_its_counts(arg, bad):
    from pyro_stein import Dataset
    from pyro_stein.diagnostics import sbc

    with pytest.raises((TypeError, ValueError), match=arg):
        sbc(_PriorGuide(), lambda: (Dataset(tensor([0.5])), {"mu": tensor(0.0)}), **{arg: bad})


@pytest.mark.parametrize("n", [0, 1, 2.5, True])
def test_guide_ksd_checks_num_samples(n):
    from pyro_stein import AmortizedSteinGuide
    from pyro_stein.diagnostics import guide_ksd

    y = tensor([0.3, 1.2])
    guide = AmortizedSteinGuide(plated_model).setup(y)
    with pytest.raises(ValueError, match="num_samples must be"):
        guide_ksd(guide, y, num_samples=n)


def test_plot_sbc_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pyro_stein.diagnostics import plot_sbc

    ranks = {"mu": torch.randint(0, 50, (200,)), "w": torch.randint(0, 50, (200, 3))}
    fig = plot_sbc(ranks, num_samples=49, path=tmp_path / "sbc.png")
    assert len(fig.axes) == 2 and (tmp_path / "sbc.png").stat().st_size > 0


@pytest.mark.parametrize("num_samples, bins", [(100, 20), (99, 20), (30, 7)])
def test_plot_sbc_bins_hold_their_share_of_ranks(num_samples, bins):
    """Exactly uniform ranks fill every bin to its expected count, inside its band, whether or not ``bins`` divides
    ``num_samples + 1`` (equal-width bins over 0..num_samples + 1 would give some bins one rank more)."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pyro_stein.diagnostics import plot_sbc

    ranks = {"mu": torch.arange(num_samples + 1).repeat(40)}
    patches = plot_sbc(ranks, num_samples, bins=bins).axes[0].patches
    band, bars = patches[:bins], patches[bins:]
    heights = torch.tensor([b.get_height() for b in bars], dtype=torch.float64)
    assert heights.sum() == ranks["mu"].numel()
    for k, (lo, h) in enumerate(zip(band, heights)):
        assert lo.get_y() <= h <= lo.get_y() + lo.get_height(), f"bin {k}: count {h} outside its 99% band"
        assert h == pytest.approx(lo.get_y() + lo.get_height() / 2), f"bin {k}: count {h} is not its expected count"


def test_plot_sbc_argument_errors():
    from pyro_stein.diagnostics import plot_sbc

    for bad, match in (
        ({}, "ranks must be a non-empty dict"),
        (torch.arange(10), "ranks must be a non-empty dict"),
        ({"mu": torch.tensor([0.5, 3.7])}, r"ranks\['mu'\] must be an integer Tensor"),
    ):
        with pytest.raises(TypeError, match=match):
            plot_sbc(bad, 99)
    ranks = {"mu": torch.arange(10)}
    with pytest.raises(ValueError, match="bins must be an int between 1 and num_samples"):
        plot_sbc(ranks, 9, bins=11)
    with pytest.raises(ValueError, match=r"ranks of 'mu' lie in 0..9, outside 0..num_samples = 0..5"):
        plot_sbc(ranks, 5, bins=3)
