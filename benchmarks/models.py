"""Reference posteriors: Pyro translations of posteriordb and sbibm models with their reference draws.

Every loader returns a :class:`ReferencePosterior`. The models are ordinary single-draw Pyro models; the
reference draws are keyed by Pyro site name (constrained space, leading sample dimension) and
:meth:`ReferencePosterior.flatten` turns any such dict into a ``[num_draws, dim]`` matrix whose columns are
named by :attr:`ReferencePosterior.param_names` (Stan style, 1-based), in the order of
:attr:`ReferencePosterior.sites`, each site flattened row-major.

The data folder is ``$PYRO_STEIN_SHARED_DATA`` when set, else ``<repo>/../shared/data``. Nothing is downloaded.
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
    "POSTERIORDB_NAMES",
    "SBIBM_TASKS",
    "ReferencePosterior",
    "bernoulli_glm_prior_precision",
    "bernoulli_glm_summary",
    "data_dir",
    "gaussian_linear_posterior",
    "load_posteriordb",
    "load_sbibm",
    "sbibm_model",
]

POSTERIORDB_NAMES: tuple[str, ...] = (
    "eight_schools-eight_schools_noncentered",
    "sblrc-blr",
    "kidiq-kidscore_interaction",
    "arK-arK",
    "gp_pois_regr-gp_regr",
)
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


def kidscore_interaction(
    mom_hs: torch.Tensor, mom_iq: torch.Tensor, kid_score: torch.Tensor | None = None
) -> None:
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
    if name.startswith("eight_schools"):
        model, args, kwargs = eight_schools_noncentered, (t(data["sigma"]),), {"y": t(data["y"])}
    elif name == "sblrc-blr":
        model, args, kwargs = blr, (t(data["X"]),), {"y": t(data["y"])}
    elif name.startswith("kidiq"):
        model = kidscore_interaction
        args, kwargs = (t(data["mom_hs"]), t(data["mom_iq"])), {"kid_score": t(data["kid_score"])}
    elif name == "arK-arK":
        y, K = t(data["y"]), int(data["K"])
        lags = torch.stack([y[K - k - 1 : y.shape[0] - k - 1] for k in range(K)], dim=-1)
        model, args, kwargs = ark, (lags,), {"y": y[K:]}
    else:  # gp_pois_regr-gp_regr
        model, args, kwargs = gp_regr, (t(data["x"]),), {"y": t(data["y"])}
    draws = _posteriordb_draws(folder, shapes, **tkw)
    if name.startswith("eight_schools"):  # latent site of the non-centred parametrisation
        draws["theta_trans"] = (draws["theta"] - draws["mu"][:, None]) / draws["tau"][:, None]
    names = [n for s in sites for n in _stan_names(s, shapes[s])]
    return ReferencePosterior(name, model, args, kwargs, draws, sites, names)


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
    return _design_matrix_file(data_dir() / "sbibm" / "bernoulli_glm" / "design_matrix.pt").to(dtype=dtype, device=device)


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
