"""Default sampler or flow sampler: accuracy of the no-options guide with each, and of the flow's PSIS draws.

On reference posteriors (non-amortized), for each seed:

* ``default``: ``AmortizedSteinGuide(model)`` (its default sampler, ``GaussianResidualSampler``), trained by
  ``AmortizedSVGD(model, guide).run(*args)``, draws from ``sample_posterior`` with the default post-processing;
* ``flow``: the same with ``sampler=FlowSampler(D)`` (``D``: the guide's latent dimension);
* ``flow (raw)``: the flow's own draws (``postprocess=[]``);
* ``flow + PSIS``: the flow's draws resampled with Pareto-smoothed importance weights
  (:func:`pyro_stein.diagnostics.importance_sample_posterior`), with its ``k-hat``.

Loading and scoring are :mod:`benchmarks.accuracy`'s (``_load``, ``score`` with ``exact=False``).

Part ``--amortized``: family (a) of :mod:`benchmarks.amortized` (logistic regression with a weight-scale
hyperprior) with an amortized flow guide, ``AmortizedSteinGuide(model, amortized=True, sampler=FlowSampler(D,
context_dim=C), **guide_kwargs)`` (``C``: the context width the default sampler gets, the dataset encoding plus the
frame summary), trained and scored as that benchmark does (same stream, steps, optimiser, the same 20 held-out
datasets and exact moments); per held-out dataset the flow's raw draws, two HMC polishes, and its PSIS draws with
``k-hat``. NUTS is not re-run: the speed-ups use the NUTS times in ``results/amortized.json``.

Run: ``python -m benchmarks.sampler_choice [--posteriors a,b] [--seeds 0,1] [--draws 5000]``; writes
``benchmarks/results/sampler_choice.{json,md}``; ``python -m benchmarks.sampler_choice --amortized`` writes
``benchmarks/results/sampler_choice_amortized.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD
from pyro_stein.diagnostics import importance_sample_posterior
from pyro_stein.flows import FlowSampler

from .accuracy import _load, score
from .report import machine_info

POSTERIORS = (
    "eight_schools-eight_schools_noncentered",
    "sblri-blr",
    "kidiq-kidscore_interaction",
    "gp_pois_regr-gp_regr",
    "arK-arK",
)
METHODS = ("default", "flow", "flow (raw)", "flow + PSIS")


def _latent_dim(ref) -> int:
    guide = AmortizedSteinGuide(ref.model)
    guide.setup(*ref.args, **ref.kwargs)
    return guide.latent_dim


def _train(ref, sampler=None, steps: int | None = None) -> tuple[AmortizedSteinGuide, float]:
    t0 = time.perf_counter()
    guide = AmortizedSteinGuide(ref.model) if sampler is None else AmortizedSteinGuide(ref.model, sampler=sampler)
    AmortizedSVGD(ref.model, guide).run(*ref.args, num_steps=steps, progress_bar=False, **ref.kwargs)
    return guide, time.perf_counter() - t0


def _postprocess(guide) -> list[str]:
    """The guide's post-processing after training (the run's health checks may have added an MCMC polish)."""
    return [repr(step) for step in guide.postprocess]


def _scored(ref, samples, **extra) -> dict:
    out = score(ref, samples, exact=False)
    out.update(extra)
    return out


def run_posterior(name: str, seed: int, draws: int, steps: int | None = None) -> dict:
    ref = _load(name)
    res = {}
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide, wall = _train(ref, steps=steps)
    res["default"] = _scored(
        ref, guide.sample_posterior(draws, *ref.args, **ref.kwargs), train_s=wall, postprocess=_postprocess(guide)
    )

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    D = _latent_dim(ref)
    pyro.set_rng_seed(seed)
    guide, wall = _train(ref, FlowSampler(D), steps)
    res["flow"] = _scored(
        ref,
        guide.sample_posterior(draws, *ref.args, **ref.kwargs),
        train_s=wall,
        latent_dim=D,
        postprocess=_postprocess(guide),
    )
    raw = guide.sample_posterior(draws, *ref.args, postprocess=[], **ref.kwargs)
    res["flow (raw)"] = _scored(ref, raw, train_s=wall)
    t0 = time.perf_counter()
    psis_draws, khat = importance_sample_posterior(guide, draws, *ref.args, **ref.kwargs)
    res["flow + PSIS"] = _scored(ref, psis_draws, train_s=wall, khat=khat, psis_s=time.perf_counter() - t0)
    return res


def run_amortized(out: Path, mode: str = "full") -> dict:
    """Family (a) with an amortized flow guide (see the module docstring); writes ``sampler_choice_amortized.json``."""
    from pyro_stein.data import Dataset, PriorPredictiveStream

    from . import amortized as am

    fam, cfg = am.FAMILIES["amortized"], am.CONFIG[mode]
    model = fam["model"]
    torch.set_default_dtype(torch.float32)  # as benchmarks.amortized
    t_start = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    stream = PriorPredictiveStream(model, fam["make_args"], obs_kwargs={"y": "y"})
    probe = AmortizedSteinGuide(model, amortized=True, **fam["guide_kwargs"])  # to read D and the context width
    d0 = stream.sample()
    probe.setup(*d0.args, **d0.kwargs)
    D, C = probe.latent_dim, probe.sampler.context_dim
    guide, stream, _, train = am.train_on_family(
        model,
        fam,
        cfg,
        lambda: AmortizedSteinGuide(
            model, amortized=True, sampler=FlowSampler(D, context_dim=C), **fam["guide_kwargs"]
        ),
    )
    steps = cfg["steps"]
    print(f"amortized flow guide (D={D}, context {C}): {steps} steps in {train:.1f} s", flush=True)
    baseline_path = Path(__file__).parent / "results" / "amortized.json"
    baseline = json.loads(baseline_path.read_text()) if baseline_path.exists() else None
    pyro.set_rng_seed(12345)  # the held-out datasets of benchmarks.amortized
    held = [stream.sample() for _ in range(cfg["datasets"])]
    methods = {"raw": (0, 0, 1), "polished_hmc3": (2, 3, 5), "polished_hmc10": (2, 10, 5)}
    rows = []
    for i, d in enumerate(held):
        row = {"size": fam["size_of"](d)}
        if baseline and i < len(baseline["datasets"]) and baseline["datasets"][i]["size"] == row["size"]:
            row["nuts_wall_s"] = baseline["datasets"][i]["nuts"]["wall_s"]
        ref = fam["exact"](d)
        if len(ref) == 3:
            row["reference_ess"], ref = ref[2], ref[:2]
        for m, (rounds, k, lf) in methods.items():
            draws, wall = am._timed_draws(guide, d, 5 if m == "raw" else 3, rounds, k, m == "raw", lf)
            row[m] = dict(am._compare(fam["flat"](draws, d), ref), wall_s=wall)
        copies = iter([Dataset(*d.args, **d.kwargs).map_tensors(torch.clone) for _ in range(3)])
        khats = []

        def psis_call(copies=copies, khats=khats):  # called right away, in this iteration
            e = next(copies)
            draws, khat = importance_sample_posterior(guide, am.NUM_DRAWS, *e.args, **e.kwargs)
            khats.append(khat)
            return draws

        draws, wall = am._timed(psis_call, 3)
        row["psis"] = dict(am._compare(fam["flat"](draws, d), ref), wall_s=wall, khat=khats[-1])
        rows.append(row)
        print(
            f"dataset {i} rows={row['size']}: "
            + "; ".join(
                f"{m} {row[m]['wall_s'] * 1e3:.0f} ms err {row[m]['worst_mean_err']:.2f} sd {row[m]['max_sd_dev']:.2f}"
                for m in (*methods, "psis")
            )
            + f"; k-hat {row['psis']['khat']:.2f}",
            flush=True,
        )
    nuts = [r["nuts_wall_s"] for r in rows if "nuts_wall_s" in r]
    summary = {"nuts_wall_s": am._median(nuts), "num_datasets": len(rows)}
    for m in (*methods, "psis"):
        summary[m] = am._accuracy_summary(rows, m)
        summary[m]["speedup_vs_nuts"] = summary["nuts_wall_s"] / summary[m]["wall_s"]
    summary["psis"]["khat_median"] = am._median([r["psis"]["khat"] for r in rows])
    summary["psis"]["khat_le_0.7"] = sum(r["psis"]["khat"] <= 0.7 for r in rows)
    result = {
        "machine": machine_info(),
        "mode": mode,
        "latent_dim": D,
        "context_dim": C,
        "training": {"steps": steps, "wall_s": train, "lr": fam["lr"], "batch_size": cfg["batch"]},
        "nuts_times_from": "results/amortized.json (same held-out datasets, matched by index and size)",
        "summary": summary,
        "datasets": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "sampler_choice_amortized.json").write_text(json.dumps(result, indent=1))
    write_amortized_markdown(result, out / "sampler_choice_amortized.md")
    return result


AMORTIZED_LABELS = {
    "raw": "flow, raw draws",
    "polished_hmc3": "flow + 2 correction rounds + 3 HMC steps x 5",
    "polished_hmc10": "flow + 2 correction rounds + 10 HMC steps x 5",
    "psis": "flow + PSIS",
}


def write_amortized_markdown(result: dict, path: Path) -> None:
    """The summary of :func:`run_amortized` next to the default sampler's figures in ``results/amortized.json``."""
    sm = result["summary"]
    lines = [
        "# Family (a) with an amortized flow guide",
        "",
        f"FlowSampler(D={result['latent_dim']}, context_dim={result['context_dim']}), trained "
        f"{result['training']['steps']} steps in {result['training']['wall_s']:.0f} s; "
        f"{sm['num_datasets']} held-out datasets, exact moments; ok: mean error < 0.2 sd / every sd within 20 %. "
        f"Speed-up: median NUTS time ({sm['nuts_wall_s']:.1f} s, {result['nuts_times_from']}) over the median draw "
        "time (1000 draws).",
        "",
        "| sampler | method | mean ok | sd ok | both ok | median worst mean err | max worst mean err | ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def add(sampler, label, s):
        lines.append(
            f"| {sampler} | {label} | {s['mean_err_ok']} | {s['sd_ok']} | {s['both_ok']} | {s['mean_err']:.3f} | "
            f"{s['max_mean_err']:.3f} | {1e3 * s['wall_s']:.0f} | {s['speedup_vs_nuts']:.0f}x |"
        )

    for m, label in AMORTIZED_LABELS.items():
        add("flow", label, sm[m])
    baseline_path = Path(__file__).parent / "results" / "amortized.json"
    if baseline_path.exists():
        base = json.loads(baseline_path.read_text())
        for m in ("amortized", "polished_hmc3", "polished_hmc10", "polished_hmc20"):
            if m in base["summary"]:
                add("default (amortized.json)", base["method_labels"][m], base["summary"][m])
    lines += [
        "",
        f"PSIS k-hat: median {sm['psis']['khat_median']:.2f}, <= 0.7 on {sm['psis']['khat_le_0.7']} of "
        f"{sm['num_datasets']} datasets.",
    ]
    path.write_text("\n".join(lines) + "\n")


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Sampler choice: default sampler or flow sampler",
        "",
        f"Draws per method: {result['draws']}; C2ST with early stopping (`benchmarks.accuracy.score`, exact=False); "
        "worst mean error in posterior sds; worst sd ratio (farthest from 1); train_s: training alone; "
        "post-processing: what `sample_posterior` applied (the training's health checks add an HMC polish when "
        "they find the draws too narrow); PSIS and raw rows use none.",
        "",
        "| posterior | seed | method | C2ST | worst mean err | worst sd ratio | train s | k-hat | post-processing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row and "results" not in row:
            lines.append(f"| {row['posterior']} | {row['seed']} | error: {row['error']} | | | | | | |")
            continue
        for m in METHODS:
            r = row["results"].get(m, {})
            lines.append(
                f"| {row['posterior']} | {row['seed']} | {m} | {_fmt(r.get('c2st'))} | "
                f"{_fmt(r.get('worst_std_mean_error'))} | {_fmt(r.get('worst_sd_ratio'))} | "
                f"{_fmt(r.get('train_s'), '.1f')} | {_fmt(r.get('khat'), '.2f')} | "
                f"{', '.join(r['postprocess']) if r.get('postprocess') else '-'} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--posteriors", default=",".join(POSTERIORS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--draws", type=int, default=5000)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the library's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--amortized", action="store_true", help="family (a) with an amortized flow guide instead")
    p.add_argument("--mode", default="full", help="benchmarks.amortized's mode for --amortized")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.amortized:
        return run_amortized(Path(a.out), a.mode)
    torch.set_default_dtype(torch.float64)  # as benchmarks.accuracy: the reference data are float64
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "sampler_choice.json"
    result = {"machine": machine_info(), "draws": a.draws, "rows": []}
    if json_path.exists():  # keep earlier rows (other posteriors or seeds); a re-run replaces its own
        result["rows"] = json.loads(json_path.read_text()).get("rows", [])
    t_start = time.perf_counter()
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in [s.strip() for s in a.posteriors.split(",") if s.strip()]:
            try:
                row = {"posterior": name, "seed": seed, "results": run_posterior(name, seed, a.draws, a.steps)}
            except Exception as e:  # noqa: BLE001 - record the failure, keep going
                row = {"posterior": name, "seed": seed, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            result["rows"] = [r for r in result["rows"] if (r["posterior"], r["seed"]) != (name, seed)] + [row]
            for m, r in row.get("results", {}).items():
                print(
                    f"{name:42s} s{seed} {m:12s} c2st={r.get('c2st', float('nan')):.3f} "
                    f"sme={r.get('worst_std_mean_error', float('nan')):.3f} "
                    f"sdr={r.get('worst_sd_ratio', float('nan')):.3f} train={r.get('train_s', float('nan')):.1f}s "
                    f"khat={r.get('khat', float('nan')):.2f}",
                    flush=True,
                )
            if "error" in row:
                print(f"{name} s{seed} error: {row['error']}", flush=True)
            result["wall_s"] = time.perf_counter() - t_start
            json_path.write_text(json.dumps(result, indent=1))
            write_markdown(result, out / "sampler_choice.md")
    return result


if __name__ == "__main__":
    main()
