"""Part 2: accuracy of AmortizedSteinGuide and Pyro baselines against reference posterior draws."""

from __future__ import annotations

import math
import time
import traceback
import warnings
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.distributions import ImproperUniform
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible, init_to_value

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD
from pyro_stein.infer import TrainingWarning
from pyro_stein.tracing import _first_tensor, init_to_mean_or_feasible

from .metrics import c2st, sd_ratio, standardized_mean_error, worst_ratio
from .models import REFERENCE_NAMES, load_reference, load_sbibm
from .report import machine_info, write_json

CONFIG = {
    # steps / particles / draws per method and mode
    "smoke": {
        "asg_steps": 30,
        "asg_particles": 32,
        "svi_steps": 30,
        "svgd_steps": 20,
        "svgd_particles": 32,
        "nuts_warmup": 10,
        "nuts_samples": 20,
        "nuts_cap_s": 5,
        "draws": 200,
        "c2st_exact": False,
    },
    "quick": {
        "asg_steps": 800,
        "asg_particles": 64,
        "svi_steps": 800,
        "svgd_steps": 300,
        "svgd_particles": 128,
        "nuts_warmup": 150,
        "nuts_samples": 300,
        "nuts_cap_s": 45,
        "draws": 1000,
        "c2st_exact": False,
    },
    "full": {
        "asg_steps": None,
        "asg_particles": 64,
        "svi_steps": 3000,
        "svgd_steps": 1500,
        "svgd_particles": 256,
        "nuts_warmup": 500,
        "nuts_samples": 1500,
        "nuts_cap_s": 300,
        "draws": 5000,
        "c2st_exact": False,
    },
}
DEFAULTS = "AmortizedSteinGuide"
RAW = "AmortizedSteinGuide (raw draws)"
PREVIOUS = "AmortizedSteinGuide (previous default)"
METHODS = (DEFAULTS, RAW, PREVIOUS, "AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "pyro.infer.SVGD", "NUTS")
PREVIOUS_STEPS = 1500  # the usage example before the defaults: 1500 steps, ClippedAdam lr 1e-2 with lrd 0.9985
DRAW_TIMING_REPEATS = 5


def _decay(lr0, lr1, steps):
    return pyro.optim.ClippedAdam({"lr": lr0, "lrd": (lr1 / lr0) ** (1 / max(1, steps))})


def _init_values(ref):
    """Values for the sites with an ImproperUniform prior (the flat priors of kidiq's beta, the flat-prior regressions'
    beta and sigma, the HMMs' simplexes and ordered vectors): ``init_to_mean_or_feasible``'s, the image of zero in
    unconstrained space (zeros for a real beta); other sites fall back to init_to_feasible. ``None`` when there are
    none."""
    init = init_to_mean_or_feasible(like=_first_tensor([ref.args, ref.kwargs]))
    trace = poutine.trace(InitMessenger(init)(ref.model)).get_trace(*ref.args, **ref.kwargs)
    vals = {
        name: site["value"].detach()
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and isinstance(site["fn"], ImproperUniform)
    }
    return vals or None


def _init_loc_fn(ref):
    vals = _init_values(ref)
    return init_to_feasible if vals is None else init_to_value(values=vals, fallback=init_to_feasible)


def _model(ref):
    """The model, wrapped so that un-conditioned sites with an ImproperUniform prior start at the init values
    instead of calling ``.sample()`` (which they cannot): used for NUTS, AutoIAFNormal and pyro.infer.SVGD, whose
    set-up traces the model by sampling and which take no usable ``init_loc_fn``."""
    vals = _init_values(ref)
    if vals is None:
        return ref.model
    return InitMessenger(init_to_value(values=vals, fallback=init_to_feasible))(ref.model)


def _complete(ref, samples):
    """Add deterministic sites the reference compares (eight schools' theta) when a method returns latents only."""
    samples = {k: v.detach() for k, v in samples.items()}
    if "theta" in ref.sites and "theta" not in samples and "theta_trans" in samples:
        samples["theta"] = samples["mu"].reshape(-1, 1) + samples["tau"].reshape(-1, 1) * samples["theta_trans"]
    return samples


_TRAINED: dict = {}  # ref name -> (trained default guide, training wall time): the raw draws reuse it


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return float(sorted(times)[len(times) // 2])


def _trained_default(ref, cfg):
    """The no-options path of the README: ``AmortizedSteinGuide(model)``, ``AmortizedSVGD(model, guide)``, ``run``
    (the library's default number of steps in mode ``full``; fewer in the shorter modes)."""
    if ref.name not in _TRAINED:
        _TRAINED.clear()
        t0 = time.perf_counter()
        guide = AmortizedSteinGuide(ref.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TrainingWarning)
            AmortizedSVGD(ref.model, guide).run(*ref.args, num_steps=cfg["asg_steps"], progress_bar=False, **ref.kwargs)
        health = [str(w.message)[:200] for w in caught if issubclass(w.category, TrainingWarning)]
        _TRAINED[ref.name] = (guide, time.perf_counter() - t0, health)
    return _TRAINED[ref.name]


def _draw_costs(guide, ref, n: int = 1000) -> dict:
    """Median ms of ``sample_posterior(n)`` with the default post-processing and with raw draws (after a warm-up)."""

    def call(postprocess=None):  # None: the guide's own post-processing
        guide.sample_posterior(n, *ref.args, postprocess=postprocess, **ref.kwargs)

    call()
    out = {"draw_ms_default": _median_ms(call, DRAW_TIMING_REPEATS)}
    call([])
    out["draw_ms_raw"] = _median_ms(lambda: call([]), DRAW_TIMING_REPEATS)
    return out


def fit_asg(ref, cfg):
    """Ours with no options: automatic frame, default optimiser and steps, default post-processing of the draws."""
    guide, wall, health = _trained_default(ref, cfg)
    samples = guide.sample_posterior(cfg["draws"], *ref.args, **ref.kwargs)
    extra = dict(
        _draw_costs(guide, ref),
        train_s=wall,
        health_warnings=health,
        frame="laplace" if guide.whiten else ("adaptive" if guide.adaptive_frame else "none"),
    )
    return samples, extra


def fit_asg_raw(ref, cfg):
    """The same trained guide, its sampler's own draws (no moment correction, no MCMC polish)."""
    guide, wall, _ = _trained_default(ref, cfg)
    return guide.sample_posterior(cfg["draws"], *ref.args, postprocess=[], **ref.kwargs)


def fit_asg_previous(ref, cfg):
    """What the usage example did before the defaults: no frame, 1500 steps, raw draws."""
    t0 = time.perf_counter()
    guide = AmortizedSteinGuide(ref.model, whiten=None)
    svgd = AmortizedSVGD(ref.model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.9985}), num_particles=64)
    steps = PREVIOUS_STEPS if cfg["asg_steps"] is None else min(PREVIOUS_STEPS, cfg["asg_steps"])
    svgd.run(*ref.args, num_steps=steps, progress_bar=False, check_health=False, **ref.kwargs)
    wall = time.perf_counter() - t0
    return guide.sample_posterior(cfg["draws"], *ref.args, **ref.kwargs), {"train_s": wall}


def _fit_svi(ref, cfg, guide):
    steps = cfg["svi_steps"]
    svi = SVI(_model(ref), guide, _decay(1e-2, 1e-3, steps), Trace_ELBO())
    for _ in range(steps):
        svi.step(*ref.args, **ref.kwargs)
    sites = [s for s in ref.sites if s != "theta" or not ref.name.startswith("eight")]
    with torch.no_grad():
        try:
            pred = Predictive(guide, num_samples=cfg["draws"], parallel=True)(*ref.args, **ref.kwargs)
        except Exception:  # noqa: BLE001 - vectorized draws not possible for this guide/model: loop
            pred = Predictive(guide, num_samples=cfg["draws"], parallel=False)(*ref.args, **ref.kwargs)
    return {k: v for k, v in pred.items() if k in sites or k == "theta_trans"}


def fit_autonormal(ref, cfg):
    return _fit_svi(ref, cfg, AutoNormal(ref.model, init_loc_fn=_init_loc_fn(ref)))


def fit_automvn(ref, cfg):
    return _fit_svi(ref, cfg, AutoMultivariateNormal(ref.model, init_loc_fn=_init_loc_fn(ref)))


def fit_autoiaf(ref, cfg):
    return _fit_svi(ref, cfg, AutoIAFNormal(_model(ref)))


def fit_pyro_svgd(ref, cfg):
    steps = cfg["svgd_steps"]
    svgd = pyro.infer.SVGD(
        _model(ref),
        pyro.infer.RBFSteinKernel(),
        _decay(5e-2, 5e-3, steps),
        num_particles=cfg["svgd_particles"],
        max_plate_nesting=1,
    )
    for _ in range(steps):
        svgd.step(*ref.args, **ref.kwargs)
    parts = svgd.get_named_particles()
    P = cfg["svgd_particles"]
    out = {}
    for k, v in parts.items():
        v = v.detach()
        shape = next((tuple(ref.draws[k].shape[1:]) for _ in [0] if k in ref.draws), None)
        if k == "theta_trans":
            shape = (ref.args[0].shape[-1],)
        if shape is None:
            continue
        if v.numel() != P * math.prod(shape):
            raise RuntimeError(f"particles of site {k!r} have shape {tuple(v.shape)}, cannot be read as {P} x {shape}")
        out[k] = v.reshape((P,) + shape)
    return out


def fit_nuts(ref, cfg):
    vals = _init_values(ref)
    kw = {} if vals is None else {"init_strategy": init_to_value(values=vals)}
    t0, cap, count = time.perf_counter(), cfg["nuts_cap_s"], [0]

    def hook(kernel, samples, stage, i):
        count[0] += 1
        if time.perf_counter() - t0 > cap:
            raise TimeoutError(
                f"NUTS exceeded its {cap:.0f} s cap after {count[0]} of "
                f"{cfg['nuts_warmup'] + cfg['nuts_samples']} iterations"
            )

    mcmc = MCMC(
        NUTS(_model(ref), **kw),
        num_samples=cfg["nuts_samples"],
        warmup_steps=cfg["nuts_warmup"],
        num_chains=1,
        disable_progbar=True,
        hook_fn=hook,
    )
    mcmc.run(*ref.args, **ref.kwargs)
    return mcmc.get_samples()


FITTERS = {
    DEFAULTS: fit_asg,
    RAW: fit_asg_raw,
    PREVIOUS: fit_asg_previous,
    "AutoNormal": fit_autonormal,
    "AutoMultivariateNormal": fit_automvn,
    "AutoIAFNormal": fit_autoiaf,
    "pyro.infer.SVGD": fit_pyro_svgd,
    "NUTS": fit_nuts,
}


def score(ref, samples, exact: bool, seed: int = 0) -> dict:
    approx = ref.flatten(_complete(ref, samples)).double()
    refd = ref.flat_draws().double()
    out = {"num_draws": int(approx.shape[0])}
    if not torch.isfinite(approx).all():
        out["error"] = "non-finite draws"
        approx = approx[torch.isfinite(approx).all(-1)]
        if approx.shape[0] < 10:
            return out
    # equal class sizes: subsample the reference to as many draws as the method produced (seeded)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(refd.shape[0], generator=g)[: min(refd.shape[0], approx.shape[0])]
    t0 = time.perf_counter()
    out["c2st"] = c2st(refd[idx], approx, seed=seed, early_stopping=not exact)
    out["c2st_s"] = time.perf_counter() - t0
    out["c2st_variant"] = "exact (sbibm)" if exact else "early_stopping"
    out["c2st_ref_draws"] = int(idx.numel())
    sme = standardized_mean_error(refd, approx)
    sdr = sd_ratio(refd, approx)
    out["worst_std_mean_error"] = float(sme.max())
    out["worst_sd_ratio"] = worst_ratio(sdr)
    out["worst_std_mean_error_param"] = ref.param_names[int(sme.argmax())]
    return out


def _targets(names: str | None, mode: str) -> list[str]:
    if names:
        return [s.strip() for s in names.split(",") if s.strip()]
    # the baseball posterior ("baseball") is run only when named: its reference is a NUTS run of a few minutes
    base = list(REFERENCE_NAMES) + ["gaussian_linear/1", "bernoulli_glm/1"]
    return base


def _load(name):
    if "/" in name:
        task, i = name.split("/")
        return load_sbibm(task, int(i))
    return load_reference(name)


NOTES = (
    "C2ST: `benchmarks.metrics.c2st` ({variant}); the reference is subsampled (seeded) to the same number of draws as "
    "the method, so both classes are balanced; for pyro.infer.SVGD that is only its particle count, so its C2ST is "
    "noisier. Flat priors (kidiq's beta, the flat-prior regressions' beta and sigma, the HMMs' simplexes and ordered "
    "vectors) are ImproperUniform sites, which Pyro cannot sample: AutoNormal and AutoMultivariateNormal "
    "get `init_loc_fn=init_to_value(values, fallback=init_to_feasible)` with each such site at the image of zero in "
    "unconstrained space (beta=0); NUTS gets `init_to_value(values)` and, like "
    "AutoIAFNormal (whose init_loc_fn is ignored) and pyro.infer.SVGD (no init option), a model wrapped in "
    "`InitMessenger(init_to_value(values))` so that their set-up traces do not call `.sample()`. AmortizedSteinGuide "
    "initialises such sites itself. pyro.infer.SVGD runs the model under a particle plate at dim -2: models not "
    "written for that batch shape (vector latents in matrix products, GP kernels) fail or mis-group particles; we run "
    "the reference models unmodified and report what happens. Eight schools: theta is computed from mu, tau and "
    "theta_trans for methods that return latents only. Only observation 1 of each sbibm task is run (time)."
)


def run(mode: str, out: Path, posteriors: str | None = None, methods=METHODS) -> dict:
    t_start = time.perf_counter()
    cfg = CONFIG[mode]
    result = {"mode": mode, "config": cfg, "machine": machine_info(), "results": {}, "dtype": "torch.float64"}
    result["budgets"] = {
        DEFAULTS: "no options: AmortizedSteinGuide(model), AmortizedSVGD(model, guide), run(*args) ("
        + ("the default number of steps" if cfg["asg_steps"] is None else f"{cfg['asg_steps']} steps")
        + f"), sample_posterior with its default post-processing; {cfg['draws']} draws. train_s: training "
        "alone; draw_ms_default / draw_ms_raw: median ms of sample_posterior(1000) with the default "
        "post-processing / without it",
        RAW: "the same trained guide, its sampler's own draws (postprocess=[]); wall includes the training",
        PREVIOUS: f"the usage example before the defaults: whiten=None, {PREVIOUS_STEPS} steps x 64 particles, "
        "ClippedAdam lr 1e-2, lrd 0.9985, raw draws",
        "AutoNormal / AutoMultivariateNormal / AutoIAFNormal": f"{cfg['svi_steps']} SVI steps, Trace_ELBO "
        f"(1 particle), ClippedAdam lr 1e-2 -> 1e-3; {cfg['draws']} draws",
        "pyro.infer.SVGD": f"{cfg['svgd_steps']} steps, {cfg['svgd_particles']} particles (= draws), RBFSteinKernel, "
        "ClippedAdam lr 5e-2 -> 5e-3, max_plate_nesting=1",
        "NUTS": f"1 chain, {cfg['nuts_warmup']} warmup + {cfg['nuts_samples']} samples (= draws), "
        f"wall cap {cfg['nuts_cap_s']} s",
    }
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(
        torch.float64
    )  # the reference data are float64; Pyro's autoguide networks follow the default
    try:
        _run_all(result, cfg, posteriors, mode, methods, out, t_start)
    finally:
        torch.set_default_dtype(old_dtype)
    pyro.clear_param_store()
    result["notes"] = NOTES.format(
        variant="sbibm's, early_stopping=False (up to 1000 adam iterations; sbibm: 10,000)"
        if cfg["c2st_exact"]
        else "early_stopping=True, i.e. NOT sbibm's definition (without early stopping each score "
        "trains 5 folds for up to 1000 iterations here, 10,000 in sbibm; too slow for this budget)"
    )
    result["wall_s"] = time.perf_counter() - t_start
    write_json(out, "accuracy", result)
    return result


def _run_all(result, cfg, posteriors, mode, methods, out, t_start):
    for name in _targets(posteriors, mode):
        ref = _load(name)
        res = {}
        for meth in methods:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            t0 = time.perf_counter()
            try:
                samples = FITTERS[meth](ref, cfg)
                wall = time.perf_counter() - t0
                samples, extra = samples if isinstance(samples, tuple) else (samples, {})
                if meth == RAW:  # it reuses the trained guide: charge the training too
                    wall += _TRAINED[ref.name][1]
                r = score(ref, samples, cfg["c2st_exact"])
                r.update(extra)
                r["wall_s"] = wall
            except Exception as e:  # noqa: BLE001 - record the failure honestly, keep going
                r = {"wall_s": time.perf_counter() - t0, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                r["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
            res[meth] = r
            print(
                f"  {name:45s} {meth:24s} c2st={r.get('c2st', float('nan')):.3f} "
                f"sme={r.get('worst_std_mean_error', float('nan')):.3f} "
                f"sdr={r.get('worst_sd_ratio', float('nan')):.3f} "
                f"wall={r['wall_s']:.1f}s {r.get('error', '')}",
                flush=True,
            )
        result["results"][name] = res
        write_json(out, "accuracy", dict(result, wall_s=time.perf_counter() - t_start))  # partial results survive
