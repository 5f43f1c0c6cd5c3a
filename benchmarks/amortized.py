"""Part 3: amortized inference: per-new-dataset cost and accuracy against NUTS and SVI from scratch."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD, Dataset, PriorPredictiveStream

from .report import machine_info, write_json

D_FEATURES = 5
CONFIG = {
    "smoke": {"steps": 10, "batch": 4, "particles": 32, "datasets": 1, "nuts": (20, 30), "svi_steps": 20, "nuts_cap_s": 20},
    "quick": {"steps": 150, "batch": 8, "particles": 64, "datasets": 3, "nuts": (100, 200), "svi_steps": 300, "nuts_cap_s": 40},
    # full was cut to fit a ~75-minute session on a loaded 2-core machine (brief: 20 datasets, 500 + 1000 NUTS)
    "full": {"steps": 600, "batch": 8, "particles": 64, "datasets": 8, "nuts": (300, 600), "svi_steps": 1000,
             "nuts_cap_s": 45},  # sbibm family (c): its own part, amortized_sbibm
}
NUM_DRAWS = 1000
NPE_C2ST = {"gaussian_linear": 0.506, "bernoulli_glm": 0.559}


def model(X, y=None):
    """Logistic regression with a half-normal hyperprior on the weight scale."""
    s = pyro.sample("s", dist.HalfNormal(X.new_tensor(1.0)))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), s).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def make_args(generator=None):
    n = int(torch.randint(20, 501, (), generator=generator))
    return Dataset(torch.randn(n, D_FEATURES, generator=generator))


def _flat(samples):
    return torch.cat([samples["s"].reshape(-1, 1), samples["w"].reshape(-1, D_FEATURES)], -1).double()


def _compare(draws, ref):
    err = ((draws.mean(0) - ref.mean(0)).abs() / ref.std(0))
    ratio = draws.std(0) / ref.std(0)
    return {"worst_mean_err": float(err.max()), "worst_sd_ratio": float(ratio[ratio.log().abs().argmax()])}


def _nuts(d, cfg):
    warm, num = cfg["nuts"]
    t0 = time.perf_counter()

    def hook(kernel, samples, stage, i):
        if time.perf_counter() - t0 > cfg["nuts_cap_s"]:
            raise TimeoutError(f"NUTS exceeded its {cfg['nuts_cap_s']} s cap")

    mcmc = MCMC(NUTS(model), num_samples=num, warmup_steps=warm, num_chains=1, disable_progbar=True, hook_fn=hook)
    mcmc.run(*d.args, **d.kwargs)
    return mcmc.get_samples()


def _svi(d, cfg):
    guide = AutoNormal(model)
    steps = cfg["svi_steps"]
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*d.args, **d.kwargs)
    with torch.no_grad():
        return Predictive(guide, num_samples=NUM_DRAWS, parallel=True)(*d.args, **d.kwargs)


SBIBM_CONFIG = {  # part "amortized_sbibm": the guide trained once per task on the prior predictive
    "smoke": {"steps": 10, "batch": 4, "particles": 32, "observations": 2, "draws": 500},
    "quick": {"steps": 400, "batch": 8, "particles": 64, "observations": 3, "draws": 2000},
    "full": {"steps": 3000, "batch": 8, "particles": 64, "observations": 10, "draws": 10_000},
}
SBIBM_CORRECTION_ROUNDS = 2


def _sbibm(cfg, result):
    """Train one amortized guide per sbibm task on its prior predictive; C2ST on the reference observations,
    raw and with the Stein moment correction (``SBIBM_CORRECTION_ROUNDS`` rounds)."""
    from .metrics import c2st, sd_ratio, standardized_mean_error
    from .models import bernoulli_glm_summary, load_sbibm, sbibm_model

    out = {}
    steps, batch, particles = cfg["steps"], cfg["batch"], cfg["particles"]
    for task in ("gaussian_linear", "bernoulli_glm"):
        torch.set_default_dtype(torch.float64)
        try:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            m = sbibm_model(task)
            if task == "bernoulli_glm":  # the spikes alone are not permutation-invariant data: encode the 10 summaries
                dataset_fn = lambda obs=None: bernoulli_glm_summary(obs).reshape(1, -1)  # noqa: E731
            else:
                dataset_fn = lambda obs=None: obs.reshape(1, -1)  # noqa: E731
            guide = AmortizedSteinGuide(m, amortized=True, dataset_fn=dataset_fn)
            svgd = AmortizedSVGD(m, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)}),
                                 num_particles=particles)
            stream = PriorPredictiveStream(m, lambda: Dataset(), obs_kwargs={"x": "obs"})
            t0 = time.perf_counter()
            svgd.run(steps, datasets=stream, batch_size=batch, progress_bar=False)
            train = time.perf_counter() - t0
            rows = {"raw": [], "corrected": []}
            for i in range(1, cfg["observations"] + 1):
                ref = load_sbibm(task, i)
                refd = ref.flat_draws()[: cfg["draws"]]
                for kind, rounds in (("raw", 0), ("corrected", SBIBM_CORRECTION_ROUNDS)):
                    guide.moment_correction = rounds
                    t1 = time.perf_counter()
                    draws = ref.flatten(guide.sample_posterior(cfg["draws"], *ref.args, **ref.kwargs))
                    wall = time.perf_counter() - t1
                    rows[kind].append({
                        "observation": i, "c2st": c2st(refd, draws, early_stopping=True), "sample_wall_s": wall,
                        "worst_std_mean_error": float(standardized_mean_error(refd, draws).max()),
                        "worst_sd_error": float((sd_ratio(refd, draws) - 1).abs().max()),
                    })
            guide.moment_correction = 0
            out[task] = {"steps": steps, "batch_size": batch, "num_particles": particles, "train_wall_s": train,
                         "gradient_evaluations": steps * batch * particles, "npe_reference": NPE_C2ST[task],
                         "correction_rounds": SBIBM_CORRECTION_ROUNDS,
                         "c2st_variant": f"early_stopping=True, {cfg['draws']:,} vs {cfg['draws']:,} draws"}
            for kind, r in rows.items():
                out[task][kind] = {"per_observation": r, "mean_c2st": statistics.mean(x["c2st"] for x in r),
                                   "max_c2st": max(x["c2st"] for x in r)}
            print(f"  sbibm {task}: mean C2ST raw {out[task]['raw']['mean_c2st']:.3f}, corrected "
                  f"{out[task]['corrected']['mean_c2st']:.3f} (NPE {NPE_C2ST[task]}; train {train:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001
            out[task] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            torch.set_default_dtype(torch.float32)
    result["sbibm"] = out


def run_sbibm(mode: str, out: Path) -> dict:
    """Part ``amortized_sbibm``: family (c) of the amortization work; writes ``amortized_sbibm.json``."""
    t_start = time.perf_counter()
    cfg = SBIBM_CONFIG[mode]
    result = {"mode": mode, "config": cfg, "machine": machine_info()}
    _sbibm(cfg, result)
    result["wall_s"] = time.perf_counter() - t_start
    write_json(out, "amortized_sbibm", result)
    return result


def run(mode: str, out: Path) -> dict:
    t_start = time.perf_counter()
    cfg = CONFIG[mode]
    result = {"mode": mode, "config": cfg, "machine": machine_info(), "num_draws": NUM_DRAWS, "dtype": "torch.float32"}
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    stream = PriorPredictiveStream(model, make_args, obs_kwargs={"y": "y"})
    guide = AmortizedSteinGuide(model, amortized=True)
    steps = cfg["steps"]
    svgd = AmortizedSVGD(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)}),
                         num_particles=cfg["particles"])
    t0 = time.perf_counter()
    hist = svgd.run(steps, datasets=stream, batch_size=cfg["batch"], progress_bar=False)
    train = time.perf_counter() - t0
    result["training"] = {
        "steps": steps, "batch_size": cfg["batch"], "num_particles": cfg["particles"], "wall_s": train,
        "gradient_evaluations": steps * cfg["batch"] * cfg["particles"],
        "ksd_first_last": [statistics.mean(hist[:10]), statistics.mean(hist[-10:])],
    }
    print(f"  amortized training: {steps} steps in {train:.1f} s", flush=True)
    # held-out datasets: a separate seeded generator, never seen in training
    g = torch.Generator().manual_seed(12345)
    pyro.set_rng_seed(12345)
    held = [stream.sample() for _ in range(cfg["datasets"])]
    rows = []
    for d in held:
        row = {"n_rows": int(d.args[0].shape[0])}
        guide.sample_posterior(NUM_DRAWS, *d.args, **d.kwargs)  # warm-up (first call on this shape)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            am = guide.sample_posterior(NUM_DRAWS, *d.args, **d.kwargs)
            times.append(time.perf_counter() - t0)
        am_wall = statistics.median(times)
        pyro.clear_param_store()
        t0 = time.perf_counter()
        try:
            nuts = _nuts(d, cfg)
            nuts_wall = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            row["error"] = f"NUTS: {type(e).__name__}: {e}"
            rows.append(row)
            continue
        pyro.clear_param_store()
        t0 = time.perf_counter()
        sv = _svi(d, cfg)
        svi_wall = time.perf_counter() - t0
        ref = _flat(nuts)
        row["amortized"] = dict(_compare(_flat(am), ref), wall_s=am_wall)
        row["svi"] = dict(_compare(_flat(sv), ref), wall_s=svi_wall)
        row["nuts"] = {"wall_s": nuts_wall, "num_samples": int(ref.shape[0])}
        rows.append(row)
        print(f"  dataset n={row['n_rows']}: ours {am_wall * 1e3:.1f} ms, NUTS {nuts_wall:.1f} s, SVI {svi_wall:.1f} s; "
              f"ours err {row['amortized']['worst_mean_err']:.3f} sd {row['amortized']['worst_sd_ratio']:.3f}", flush=True)
    del g
    ok = [r for r in rows if "amortized" in r]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    sm = {
        "num_datasets": len(ok),
        "num_failed": len(rows) - len(ok),
        "amortized_wall_s": med([r["amortized"]["wall_s"] for r in ok]),
        "nuts_wall_s": med([r["nuts"]["wall_s"] for r in ok]),
        "svi_wall_s": med([r["svi"]["wall_s"] for r in ok]),
        "amortized_mean_err": med([r["amortized"]["worst_mean_err"] for r in ok]),
        "amortized_sd_ratio": med([r["amortized"]["worst_sd_ratio"] for r in ok]),
        "svi_mean_err": med([r["svi"]["worst_mean_err"] for r in ok]),
        "svi_sd_ratio": med([r["svi"]["worst_sd_ratio"] for r in ok]),
        "amortized_mean_err_ok": sum(r["amortized"]["worst_mean_err"] < 0.2 for r in ok),
        "amortized_sd_ok": sum(abs(r["amortized"]["worst_sd_ratio"] - 1) <= 0.2 for r in ok),
        "svi_mean_err_ok": sum(r["svi"]["worst_mean_err"] < 0.2 for r in ok),
        "svi_sd_ok": sum(abs(r["svi"]["worst_sd_ratio"] - 1) <= 0.2 for r in ok),
    }
    sm["ratio_nuts_over_amortized"] = sm["nuts_wall_s"] / sm["amortized_wall_s"]
    sm["ratio_svi_over_amortized"] = sm["svi_wall_s"] / sm["amortized_wall_s"]
    result["summary"] = sm
    result["datasets"] = rows
    warm, num = cfg["nuts"]
    result["notes"] = (
        f"Family: s ~ HalfNormal(1), w ~ N(0, s^2 I_{D_FEATURES}), y_i ~ Bernoulli(sigmoid(x_i . w)), x_i ~ N(0, I), "
        "20-500 rows per dataset, drawn from the prior predictive (`PriorPredictiveStream`). The amortized guide is trained "
        "once on fresh simulated datasets; the held-out datasets are new draws. Per-dataset wall time: ours = median of 5 "
        f"`sample_posterior({NUM_DRAWS})` calls after one warm-up call; NUTS = one chain, {warm} warmup + {num} samples "
        f"(cap {cfg['nuts_cap_s']} s); SVI = AutoNormal from scratch, {cfg['svi_steps']} steps + {NUM_DRAWS} draws. "
        "Accuracy: per dataset, worst dimension over (s, w_1..w_5) of |mean - mean_NUTS| / sd_NUTS and sd / sd_NUTS "
        f"(NUTS is itself a {num}-draw Monte Carlo estimate: its own error on the mean is ~{1 / math.sqrt(num / 5):.2f} sd "
        "allowing for autocorrelation). float32."
    )
    result["wall_s"] = time.perf_counter() - t_start
    write_json(out, "amortized", result)
    return result
