"""Reference posteriors: Pyro translations of posteriordb and sbibm models with their reference draws.

Every loader returns a :class:`ReferencePosterior`. The models are ordinary single-draw Pyro models; the
reference draws are keyed by Pyro site name (constrained space, leading sample dimension) and
:meth:`ReferencePosterior.flatten` turns any such dict into a ``[num_draws, dim]`` matrix whose columns are
named by :attr:`ReferencePosterior.param_names` (Stan style, 1-based), in the order of
:attr:`ReferencePosterior.sites`, each site flattened row-major.

The posteriordb models (:data:`POSTERIORDB_NAMES`) translate each posterior's ``model.stan`` line by line: a
parameter without a sampling statement gets Stan's flat prior on its declared support
(:class:`~pyro.distributions.ImproperUniform`: real, ``<lower=0>``, simplex, ``positive_ordered``), ``target +=``
terms that are not a site's own density become :func:`pyro.factor` terms, transformed data are computed in the model
from the raw columns, and the hidden states of the two HMMs are summed out by the forward algorithm. Each translation
is checked against its reference draws by the Stein identities (``tests/test_posteriordb_models.py``).
:data:`EIGHT_SCHOOLS_CENTERED` is the centred eight schools with the non-centred model's draws (the same posterior
over ``theta, mu, tau``). :data:`BASEBALL` is Pyro's baseball example, which has no published reference:
:func:`load_baseball` computes one with NUTS (minutes), so the accuracy benchmark runs it only when it is named.

The data folder is ``$PYRO_STEIN_SHARED_DATA`` when set, else ``<repo>/../shared/data``. Nothing is downloaded
(the baseball data are embedded here).
"""

from __future__ import annotations

import bz2
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = [
    "BASEBALL",
    "BASEBALL_AT_BATS",
    "BASEBALL_HITS",
    "EIGHT_SCHOOLS_CENTERED",
    "POSTERIORDB_NAMES",
    "REFERENCE_NAMES",
    "SBIBM_TASKS",
    "ReferencePosterior",
    "baseball_model",
    "bernoulli_glm_prior_precision",
    "bernoulli_glm_summary",
    "data_dir",
    "gaussian_linear_posterior",
    "load_baseball",
    "load_eight_schools_centered",
    "load_posteriordb",
    "load_reference",
    "load_sbibm",
    "sbibm_model",
]

POSTERIORDB_NAMES: tuple[str, ...] = (
    "eight_schools-eight_schools_noncentered",
    "sblrc-blr",
    "kidiq-kidscore_interaction",
    "arK-arK",
    "gp_pois_regr-gp_regr",
    "arma-arma11",
    "earnings-earn_height",
    "kidiq-kidscore_momiq",
    "mesquite-mesquite",
    "nes1996-nes",
    "sblri-blr",
    "kidiq_with_mom_work-kidscore_interaction_c2",
    "hmm_example-hmm_example",
    "bball_drive_event_0-hmm_drive_0",
)
# centred eight schools: the same posterior over (theta, mu, tau) as the non-centred posteriordb one, whose
# reference draws it reuses (the name must not start with "eight": the accuracy benchmark reads that prefix as
# "theta is a deterministic site")
EIGHT_SCHOOLS_CENTERED = "centered_eight_schools"
# Pyro's baseball example (partially pooled, logit link, centred) on the Efron-Morris data; no published reference:
# :func:`load_baseball` computes one with NUTS
BASEBALL = "baseball"
REFERENCE_NAMES: tuple[str, ...] = POSTERIORDB_NAMES + (EIGHT_SCHOOLS_CENTERED,)
SBIBM_TASKS: tuple[str, ...] = ("gaussian_linear", "bernoulli_glm")
GAUSSIAN_LINEAR_VAR = 0.1  # prior and likelihood covariance scale of sbibm's gaussian_linear


def data_dir() -> Path:
    """The shared reference-data folder (``$PYRO_STEIN_SHARED_DATA`` or ``<repo>/../shared/data``)."""
    env = os.environ.get("PYRO_STEIN_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class ReferencePosterior:
    """A model, the arguments to condition it on, and reference posterior draws.

    :param name: posterior name (posteriordb name, or ``"<task>/<num_observation>"`` for sbibm).
    :param model: single-draw Pyro model, called as ``model(*args, **kwargs)``.
    :param args: positional model arguments (covariates).
    :param kwargs: keyword model arguments (the observations).
    :param draws: reference draws by site name, leading sample dimension, site shapes as in the model.
    :param sites: the sites compared, in column order of :meth:`flatten`.
    :param param_names: Stan-style name of each column of :meth:`flatten`.
    """

    name: str
    model: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    draws: dict[str, torch.Tensor] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """Number of columns of :meth:`flatten`."""
        return len(self.param_names)

    def flatten(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stack ``samples[site]`` for ``site in self.sites`` into ``[num_draws, dim]`` (row-major per site).

        :param samples: dict with (at least) the keys in :attr:`sites`, each with a leading sample dimension.
        :returns: matrix whose columns are named by :attr:`param_names`.
        """
        missing = [s for s in self.sites if s not in samples]
        if missing:
            raise ValueError(f"samples lack sites {missing}; need {self.sites}")
        n = samples[self.sites[0]].shape[0]
        out = torch.cat([samples[s].reshape(n, -1) for s in self.sites], dim=-1)
        if out.shape[-1] != self.dim:
            raise ValueError(f"flattened width {out.shape[-1]} != {self.dim} ({self.param_names})")
        return out

    def flat_draws(self) -> torch.Tensor:
        """The reference draws as a ``[num_draws, dim]`` matrix."""
        return self.flatten(self.draws)


def _stan_names(site: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [site]
    return [f"{site}[{','.join(str(i + 1) for i in idx)}]" for idx in np.ndindex(*shape)]


# --------------------------------------------------------------------------------------------------
# posteriordb models (single draw, observations as keyword arguments)
# --------------------------------------------------------------------------------------------------


def eight_schools_noncentered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Non-centred eight schools; ``theta`` is exposed as a deterministic site."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("schools", sigma.shape[-1]):
        theta_trans = pyro.sample("theta_trans", dist.Normal(sigma.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def blr(X: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Bayesian linear regression (sblrc-blr)."""
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[-1]), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(X.new_tensor(10.0)))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


def kidscore_interaction(mom_hs: torch.Tensor, mom_iq: torch.Tensor, kid_score: torch.Tensor | None = None) -> None:
    """Kid IQ regression with interaction; ``beta`` has a flat improper prior."""
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (4,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(mom_iq.new_tensor(2.5)))
    mean = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq + beta[3] * (mom_hs * mom_iq)
    with pyro.plate("data", mom_iq.shape[0]):
        pyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


def ark(lags: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """AR(K): ``lags[t, k] = y_{t-k-1}`` for the modelled times ``t > K`` (rows), ``y`` = those ``y_t``."""
    K = lags.shape[-1]
    alpha = pyro.sample("alpha", dist.Normal(lags.new_tensor(0.0), 10.0))
    beta = pyro.sample("beta", dist.Normal(lags.new_zeros(K), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(lags.new_tensor(2.5)))
    with pyro.plate("time", lags.shape[0]):
        pyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y)


def gp_regr(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """GP regression with squared-exponential kernel; ``sigma`` is the noise *variance*."""
    rho = pyro.sample("rho", dist.Gamma(x.new_tensor(25.0), 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(x.new_tensor(2.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_tensor(1.0)))
    sq = (x[:, None] - x[None, :]) ** 2
    cov = alpha**2 * torch.exp(-sq / (2 * rho**2)) + sigma * torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    pyro.sample("y", dist.MultivariateNormal(x.new_zeros(x.shape[0]), covariance_matrix=cov), obs=y)


def eight_schools_centered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Centred eight schools: ``theta`` is the latent site itself (a funnel in ``(log tau, theta)``)."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def arma11(y_prev: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """ARMA(1, 1) (arma-arma11): ``y_prev = y[:-1]`` (the lagged outputs the recursion reads), ``y`` = all ``T``
    outputs.

    ``nu_1 = mu + phi * mu`` (``err_0 = 0``), ``nu_t = mu + phi * y_{t-1} + theta * err_{t-1}`` with
    ``err_t = y_t - nu_t``; Stan's ``err ~ normal(0, sigma)`` is ``y ~ normal(nu, sigma)``.
    """
    mu = pyro.sample("mu", dist.Normal(y_prev.new_tensor(0.0), 10.0))
    phi = pyro.sample("phi", dist.Normal(y_prev.new_tensor(0.0), 2.0))
    theta = pyro.sample("theta", dist.Normal(y_prev.new_tensor(0.0), 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(y_prev.new_tensor(2.5)))
    nu = mu + phi * mu
    nus = [nu]
    for t in range(y_prev.shape[-1]):  # sequential: each prediction reads the previous error
        nu = mu + phi * y_prev[t] + theta * (y_prev[t] - nu)
        nus.append(nu)
    with pyro.plate("time", y_prev.shape[-1] + 1):
        pyro.sample("y", dist.Normal(torch.stack(nus), sigma), obs=y)


def _flat_regression(
    columns: list[torch.Tensor], obs_name: str, y: torch.Tensor | None, sigma_prior: dist.Distribution | None
) -> None:
    """Site ``obs_name``: ``y ~ N(beta_1 + sum_k beta_{k+1} columns_k, sigma)`` with a flat prior on ``beta`` and
    ``sigma_prior`` on ``sigma`` (flat on ``(0, inf)`` when ``None``: Stan's default for a ``<lower=0>`` parameter)."""
    like = columns[0]
    X = torch.stack([torch.ones_like(like)] + list(columns), dim=-1)
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (X.shape[-1],)))
    if sigma_prior is None:
        sigma_prior = dist.ImproperUniform(constraints.positive, (), ())
    sigma = pyro.sample("sigma", sigma_prior)
    with pyro.plate("data", X.shape[0]):
        pyro.sample(obs_name, dist.Normal(X @ beta, sigma), obs=y)


def earn_height(height: torch.Tensor, earn: torch.Tensor | None = None) -> None:
    """earnings-earn_height: ``earn ~ N(beta_1 + beta_2 height, sigma)``, flat priors on ``beta`` and ``sigma``."""
    _flat_regression([height], "earn", earn, None)


def kidscore_momiq(mom_iq: torch.Tensor, kid_score: torch.Tensor | None = None) -> None:
    """kidiq-kidscore_momiq: ``kid_score ~ N(beta_1 + beta_2 mom_iq, sigma)``, flat ``beta``,
    ``sigma ~ HalfCauchy(2.5)``."""
    _flat_regression([mom_iq], "kid_score", kid_score, dist.HalfCauchy(mom_iq.new_tensor(2.5)))


def mesquite(
    diam1: torch.Tensor,
    diam2: torch.Tensor,
    canopy_height: torch.Tensor,
    total_height: torch.Tensor,
    density: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> None:
    """mesquite-mesquite: ``weight`` on the six raw covariates plus an intercept, flat priors."""
    _flat_regression([diam1, diam2, canopy_height, total_height, density, group], "weight", weight, None)


def nes(
    real_ideo: torch.Tensor,
    race_adj: torch.Tensor,
    age_discrete: torch.Tensor,
    educ1: torch.Tensor,
    gender: torch.Tensor,
    income: torch.Tensor,
    partyid7: torch.Tensor | None = None,
) -> None:
    """nes1996-nes: ``partyid7`` on ideology, race, age-group dummies (30-44, 45-64, 65+ for ``age_discrete``
    2, 3, 4: Stan's transformed data), education, gender and income; flat priors."""
    age = [(age_discrete == k).to(real_ideo.dtype) for k in (2, 3, 4)]
    _flat_regression([real_ideo, race_adj, *age, educ1, gender, income], "partyid7", partyid7, None)


def kidscore_interaction_c2(mom_hs: torch.Tensor, mom_iq: torch.Tensor, kid_score: torch.Tensor | None = None) -> None:
    """kidiq_with_mom_work-kidscore_interaction_c2: covariates centred on reference points (Stan's transformed
    data ``mom_hs - 0.5``, ``mom_iq - 100`` and their product); flat priors on ``beta`` and ``sigma``."""
    c2_mom_hs, c2_mom_iq = mom_hs - 0.5, mom_iq - 100.0
    _flat_regression([c2_mom_hs, c2_mom_iq, c2_mom_hs * c2_mom_iq], "kid_score", kid_score, None)


def _hmm_log_marginal(log_trans: torch.Tensor, log_emit: torch.Tensor) -> torch.Tensor:
    """Forward algorithm: ``log sum_z prod_t p(z_t | z_{t-1}) p(obs_t | z_t)`` with ``log_trans[j, k] = log p(k | j)``,
    ``log_emit[t, k]`` the emission log densities and, as in the posteriordb programs, no initial-state term."""
    gamma = log_emit[0]
    for t in range(1, log_emit.shape[0]):
        gamma = torch.logsumexp(gamma[:, None] + log_trans, dim=0) + log_emit[t]
    return torch.logsumexp(gamma, dim=-1)


def hmm_example(y: torch.Tensor) -> None:
    """hmm_example-hmm_example: 2-state HMM, ``y_t ~ N(mu[z_t], 1)``; transition rows ``theta1``, ``theta2`` with
    flat priors on the simplex; ``mu`` positive-ordered with the (unnormalised, as in Stan) terms ``N(mu_1 | 3, 1)``
    and ``N(mu_2 | 10, 1)``. The states are summed out (factor ``"y"``)."""
    if y is None:
        raise ValueError("hmm_example needs the observations y (its likelihood is a factor)")
    K = 2
    theta1 = pyro.sample("theta1", dist.ImproperUniform(constraints.simplex, (), (K,)))
    theta2 = pyro.sample("theta2", dist.ImproperUniform(constraints.simplex, (), (K,)))
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.positive_ordered_vector, (), (K,)))
    pyro.factor("mu_prior", dist.Normal(y.new_tensor([3.0, 10.0]), 1.0).log_prob(mu).sum())
    log_trans = torch.stack([theta1, theta2]).log()
    log_emit = dist.Normal(mu, 1.0).log_prob(y[:, None])
    pyro.factor("y", _hmm_log_marginal(log_trans, log_emit))


def hmm_drive(alpha: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """bball_drive_event_0-hmm_drive_0: 2-state HMM with exponential emissions ``u_t ~ Exp(phi[z_t])`` (1/speed),
    ``v_t ~ Exp(lambda[z_t])`` (hoop distance); transition rows ``theta_k ~ Dirichlet(alpha[k])``; ``phi`` and
    ``lambda`` positive-ordered with the (unnormalised) terms ``N(. | 0, 1)``, ``N(. | 3, 1)``. States summed out."""
    if u is None or v is None:
        raise ValueError("hmm_drive needs the observations u and v (its likelihood is a factor)")
    theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
    K = alpha.shape[-1]
    phi = pyro.sample("phi", dist.ImproperUniform(constraints.positive_ordered_vector, (), (K,)))
    lam = pyro.sample("lambda", dist.ImproperUniform(constraints.positive_ordered_vector, (), (K,)))
    prior_loc = u.new_tensor([0.0, 3.0])
    pyro.factor("phi_prior", dist.Normal(prior_loc, 1.0).log_prob(phi).sum())
    pyro.factor("lambda_prior", dist.Normal(prior_loc, 1.0).log_prob(lam).sum())
    log_trans = torch.stack([theta1, theta2]).log()
    log_emit = dist.Exponential(phi).log_prob(u[:, None]) + dist.Exponential(lam).log_prob(v[:, None])
    pyro.factor("uv", _hmm_log_marginal(log_trans, log_emit))


# Efron and Morris (1975): 18 players' hits in their first 45 at-bats of the 1970 season (Clemente, F. Robinson,
# F. Howard, Johnstone, Berry, Spencer, Kessinger, L. Alvarado, Santo, Swoboda, Unser, Williams, Scott, Petrocelli,
# E. Rodriguez, Campaneris, Munson, Alvis)
BASEBALL_HITS: tuple[int, ...] = (18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7)
BASEBALL_AT_BATS = 45


def partially_pooled_with_logit(at_bats: torch.Tensor, hits: torch.Tensor | None = None) -> None:
    """Pyro's baseball example ``partially_pooled_with_logit`` (centred): ``loc ~ N(-1, 1)``,
    ``scale ~ HalfCauchy(1)``, ``alpha_i ~ N(loc, scale)``, ``hits_i ~ Binomial(at_bats_i, logits=alpha_i)``."""
    loc = pyro.sample("loc", dist.Normal(at_bats.new_tensor(-1.0), 1.0))
    scale = pyro.sample("scale", dist.HalfCauchy(at_bats.new_tensor(1.0)))
    with pyro.plate("num_players", at_bats.shape[-1]):  # site names as in Pyro's example
        alpha = pyro.sample("alpha", dist.Normal(loc, scale))
        pyro.sample("obs", dist.Binomial(at_bats, logits=alpha), obs=hits)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _posteriordb_draws(folder: Path, shapes: dict[str, tuple[int, ...]], **tkw) -> dict[str, torch.Tensor]:
    chains = _read_json(folder / "reference_draws.json")
    out = {}
    for site, shape in shapes.items():
        cols = [torch.cat([torch.as_tensor(c[n], **tkw) for c in chains]) for n in _stan_names(site, shape)]
        out[site] = torch.stack(cols, dim=-1).reshape(-1, *shape)
    return out


def _two_state(name: str, data: dict) -> None:
    if int(data["K"]) != 2:  # the Stan program sets theta[1] and theta[2] only
        raise ValueError(f"{name}: data K must be 2 (the program has two transition rows), got {data['K']!r}")


def _ark_data(data: dict, t: Callable) -> tuple:
    y, K = t(data["y"]), int(data["K"])
    lags = torch.stack([y[K - k - 1 : y.shape[0] - k - 1] for k in range(K)], dim=-1)
    return ark, (lags,), {"y": y[K:]}


def _arma_data(data: dict, t: Callable) -> tuple:
    y = t(data["y"])
    return arma11, (y[:-1],), {"y": y}


def _hmm_example_data(data: dict, t: Callable) -> tuple:
    _two_state("hmm_example", data)
    return hmm_example, (), {"y": t(data["y"])}


def _hmm_drive_data(data: dict, t: Callable) -> tuple:
    _two_state("hmm_drive_0", data)
    return hmm_drive, (t(data["alpha"]),), {"u": t(data["u"]), "v": t(data["v"])}


# posteriordb name -> (data.json dict, tensor converter) -> (model, args, kwargs)
_POSTERIORDB_MODELS: dict[str, Callable[[dict, Callable], tuple]] = {
    "eight_schools-eight_schools_noncentered": lambda d, t: (
        eight_schools_noncentered,
        (t(d["sigma"]),),
        {"y": t(d["y"])},
    ),
    "sblrc-blr": lambda d, t: (blr, (t(d["X"]),), {"y": t(d["y"])}),
    "sblri-blr": lambda d, t: (blr, (t(d["X"]),), {"y": t(d["y"])}),
    "kidiq-kidscore_interaction": lambda d, t: (
        kidscore_interaction,
        (t(d["mom_hs"]), t(d["mom_iq"])),
        {"kid_score": t(d["kid_score"])},
    ),
    "arK-arK": _ark_data,
    "gp_pois_regr-gp_regr": lambda d, t: (gp_regr, (t(d["x"]),), {"y": t(d["y"])}),
    "arma-arma11": _arma_data,
    "earnings-earn_height": lambda d, t: (earn_height, (t(d["height"]),), {"earn": t(d["earn"])}),
    "kidiq-kidscore_momiq": lambda d, t: (kidscore_momiq, (t(d["mom_iq"]),), {"kid_score": t(d["kid_score"])}),
    "mesquite-mesquite": lambda d, t: (
        mesquite,
        tuple(t(d[k]) for k in ("diam1", "diam2", "canopy_height", "total_height", "density", "group")),
        {"weight": t(d["weight"])},
    ),
    "nes1996-nes": lambda d, t: (
        nes,
        tuple(t(d[k]) for k in ("real_ideo", "race_adj", "age_discrete", "educ1", "gender", "income")),
        {"partyid7": t(d["partyid7"])},
    ),
    "kidiq_with_mom_work-kidscore_interaction_c2": lambda d, t: (
        kidscore_interaction_c2,
        (t(d["mom_hs"]), t(d["mom_iq"])),
        {"kid_score": t(d["kid_score"])},
    ),
    "hmm_example-hmm_example": _hmm_example_data,
    "bball_drive_event_0-hmm_drive_0": _hmm_drive_data,
}


def load_posteriordb(
    name: str, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> ReferencePosterior:
    """Load one of :data:`POSTERIORDB_NAMES` with its 10,000 reference draws (10 chains concatenated).

    Columns of :meth:`ReferencePosterior.flatten` follow the posterior's ``info.json`` order
    (eight schools: ``theta[1..8], mu, tau``; the others: the Stan parameter blocks in order).

    :param name: posterior name, one of :data:`POSTERIORDB_NAMES`.
    :param dtype: floating dtype of data and draws.
    :param device: device of data and draws.
    """
    if name not in POSTERIORDB_NAMES:
        raise ValueError(f"unknown posteriordb posterior {name!r}; valid names: {list(POSTERIORDB_NAMES)}")
    folder = data_dir() / "posteriordb" / name
    data = _read_json(folder / "data.json")
    info = _read_json(folder / "info.json")
    tkw = {"dtype": dtype, "device": device}

    def t(v: Any) -> torch.Tensor:
        return torch.as_tensor(v, **tkw)

    shapes = {k: (() if v == 1 else (v,)) for k, v in info["dimensions"].items()}  # all size-1 are scalars
    sites = list(shapes)
    model, args, kwargs = _POSTERIORDB_MODELS[name](data, t)
    draws = _posteriordb_draws(folder, shapes, **tkw)
    if name == "eight_schools-eight_schools_noncentered":  # latent site of the non-centred parametrisation
        draws["theta_trans"] = (draws["theta"] - draws["mu"][:, None]) / draws["tau"][:, None]
    names = [n for s in sites for n in _stan_names(s, shapes[s])]
    return ReferencePosterior(name, model, args, kwargs, draws, sites, names)


def load_eight_schools_centered(
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> ReferencePosterior:
    """Centred eight schools (:func:`eight_schools_centered`) with the non-centred posteriordb reference draws.

    Both parametrisations define the same posterior over ``(theta, mu, tau)``, so the draws of
    ``eight_schools-eight_schools_noncentered`` are draws of this one. Columns: ``theta[1..8], mu, tau``.
    """
    ref = load_posteriordb("eight_schools-eight_schools_noncentered", dtype, device)
    draws = {k: ref.draws[k] for k in ("theta", "mu", "tau")}
    return ReferencePosterior(
        EIGHT_SCHOOLS_CENTERED,
        eight_schools_centered,
        ref.args,
        ref.kwargs,
        draws,
        ["theta", "mu", "tau"],
        list(ref.param_names),
    )


def baseball_model(
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> tuple[Callable[..., Any], tuple, dict[str, torch.Tensor]]:
    """Pyro's baseball example (:func:`partially_pooled_with_logit`) on the Efron-Morris data, embedded here.

    :returns: ``(model, args, kwargs)``: ``args = (at_bats,)`` (45 for each of the 18 players),
        ``kwargs = {"hits": hits}``.
    """
    hits = torch.tensor(BASEBALL_HITS, dtype=dtype, device=device)
    return partially_pooled_with_logit, (torch.full_like(hits, BASEBALL_AT_BATS),), {"hits": hits}


def load_baseball(
    num_samples: int = 10_000,
    warmup_steps: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> ReferencePosterior:
    """The baseball posterior with a reference computed here by Pyro's NUTS (there is no published one).

    One chain of ``warmup_steps`` + ``num_samples`` iterations (defaults: 2,000 + 10,000, about five minutes on
    one CPU core), seeded with ``seed``. NUTS runs on the non-centred form of the same posterior
    (``poutine.reparam`` with ``LocScaleReparam(centered=0.0)`` on ``alpha``;
    ``alpha = loc + scale * alpha_decentered``), which it explores far better than the centred funnel; the
    returned model is the centred one. Columns: ``loc, scale, alpha[1..18]``.

    :param num_samples: NUTS draws kept, the reference's size (at least 1).
    :param warmup_steps: NUTS adaptation steps (at least 0).
    """
    for arg, value, lo in (("num_samples", num_samples, 1), ("warmup_steps", warmup_steps, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
        if value < lo:
            raise ValueError(f"{arg} must be at least {lo}, got {value}")
    from pyro.infer import MCMC, NUTS
    from pyro.infer.reparam import LocScaleReparam

    model, args, kwargs = baseball_model(dtype, device)
    noncentered = pyro.poutine.reparam(model, config={"alpha": LocScaleReparam(centered=0.0)})
    with pyro.poutine.seed(rng_seed=seed):  # global RNG state is restored afterwards
        mcmc = MCMC(NUTS(noncentered), num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
        mcmc.run(*args, **kwargs)
    samples = mcmc.get_samples()
    draws = {k: samples[k].detach() for k in ("loc", "scale")}
    draws["alpha"] = draws["loc"][:, None] + draws["scale"][:, None] * samples["alpha_decentered"].detach()
    sites = ["loc", "scale", "alpha"]
    names = ["loc", "scale"] + _stan_names("alpha", (len(BASEBALL_HITS),))
    return ReferencePosterior(BASEBALL, model, args, kwargs, draws, sites, names)


def load_reference(
    name: str, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> ReferencePosterior:
    """Any named reference posterior: one of :data:`REFERENCE_NAMES` (posteriordb names and
    :data:`EIGHT_SCHOOLS_CENTERED`) or :data:`BASEBALL` (whose reference :func:`load_baseball` computes by NUTS).

    :param name: posterior name.
    """
    if name == EIGHT_SCHOOLS_CENTERED:
        return load_eight_schools_centered(dtype, device)
    if name == BASEBALL:
        return load_baseball(dtype=dtype, device=device)
    if name not in POSTERIORDB_NAMES:
        raise ValueError(f"unknown reference posterior {name!r}; valid names: {list(REFERENCE_NAMES) + [BASEBALL]}")
    return load_posteriordb(name, dtype, device)


# --------------------------------------------------------------------------------------------------
# sbibm tasks
# --------------------------------------------------------------------------------------------------


def bernoulli_glm_prior_precision(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """sbibm's bernoulli_glm prior precision (offset 0.5, smoothness filter ``F^T F``), 10 x 10."""
    M = 9
    D = torch.eye(M, dtype=dtype, device=device) - torch.diag(torch.ones(M - 1, dtype=dtype, device=device), -1)
    F = D @ D + torch.diag(torch.sqrt(torch.arange(M, dtype=dtype, device=device) / M))
    P = torch.zeros(M + 1, M + 1, dtype=dtype, device=device)
    P[0, 0] = 0.5
    P[1:, 1:] = F.T @ F
    return P


@functools.lru_cache(maxsize=1)
def _design_matrix_file(path: Path) -> torch.Tensor:
    # read once: the summary statistic is called for every new observation, and a file read per call
    # (~2 ms) would be charged to the amortized guide's time to a posterior
    return torch.load(path, weights_only=True)


def _design_matrix(dtype: torch.dtype, device) -> torch.Tensor:
    return _design_matrix_file(data_dir() / "sbibm" / "bernoulli_glm" / "design_matrix.pt").to(
        dtype=dtype, device=device
    )


def bernoulli_glm_summary(y: torch.Tensor, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """sbibm's 10 summary statistics of raw spikes ``y[..., 100]``: ``design^T y`` (spike count first)."""
    return y.to(dtype) @ _design_matrix(dtype, device if device is not None else y.device)


def sbibm_model(
    task: str, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Callable[[torch.Tensor | None], torch.Tensor]:
    """The task's prior and likelihood as a Pyro model ``model(obs=None)``.

    With ``obs=None`` the model simulates from the prior predictive (returns the simulated ``x``);
    with ``obs`` given it is the posterior's joint. Sites: ``theta`` (10) and ``x``
    (gaussian_linear: a 10-vector event; bernoulli_glm: 100 raw spikes in plate ``"bins"``).

    :param task: one of :data:`SBIBM_TASKS`.
    """
    tkw = {"dtype": dtype, "device": device}
    if task == "gaussian_linear":
        scale = math.sqrt(GAUSSIAN_LINEAR_VAR)

        def gaussian_linear(obs: torch.Tensor | None = None) -> torch.Tensor:
            theta = pyro.sample("theta", dist.Normal(torch.zeros(10, **tkw), scale).to_event(1))
            return pyro.sample("x", dist.Normal(theta, scale).to_event(1), obs=obs)

        return gaussian_linear
    if task == "bernoulli_glm":
        design = _design_matrix(dtype, device)
        precision = bernoulli_glm_prior_precision(dtype, device)
        loc = torch.zeros(10, **tkw)

        def bernoulli_glm(obs: torch.Tensor | None = None) -> torch.Tensor:
            theta = pyro.sample("theta", dist.MultivariateNormal(loc, precision_matrix=precision))
            with pyro.plate("bins", design.shape[0]):
                return pyro.sample("x", dist.Bernoulli(logits=design @ theta), obs=obs)

        return bernoulli_glm
    raise ValueError(f"unknown sbibm task {task!r}; valid tasks: {list(SBIBM_TASKS)}")


def _read_csv(path: Path, **tkw) -> torch.Tensor:
    if path.suffix == ".bz2":
        with bz2.open(path, "rt") as f:
            arr = np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2)
    else:
        arr = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return torch.as_tensor(arr, **tkw)


def load_sbibm(
    task: str, num_observation: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> ReferencePosterior:
    """Load an sbibm task's observation and its 10,000 reference posterior draws.

    The model is :func:`sbibm_model` called with ``obs`` = the 10-D observation (gaussian_linear) or the
    100 raw spikes (bernoulli_glm). Columns: ``theta[1..10]``.

    :param task: one of :data:`SBIBM_TASKS`.
    :param num_observation: 1..10.
    """
    model = sbibm_model(task, dtype, device)
    if num_observation not in range(1, 11):
        raise ValueError(f"num_observation must be one of 1..10, got {num_observation!r}")
    folder = data_dir() / "sbibm" / task / f"num_observation_{num_observation}"
    tkw = {"dtype": dtype, "device": device}
    obs_file = "observation_raw.csv" if task == "bernoulli_glm" else "observation.csv"
    obs = _read_csv(folder / obs_file, **tkw)[0]
    draws = {"theta": _read_csv(folder / "reference_posterior_samples.csv.bz2", **tkw)}
    return ReferencePosterior(
        f"{task}/{num_observation}", model, (), {"obs": obs}, draws, ["theta"], _stan_names("theta", (10,))
    )


def gaussian_linear_posterior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior of gaussian_linear given one observation ``x[10]``: ``N(x/2, 0.05 I)``.

    With prior ``N(0, s I)`` and likelihood ``N(theta, s I)`` (s = 0.1) the posterior precision is ``2/s``.

    :returns: ``(mean[10], cov[10, 10])``.
    """
    d = x.shape[-1]
    return x / 2, torch.eye(d, dtype=x.dtype, device=x.device) * (GAUSSIAN_LINEAR_VAR / 2)
