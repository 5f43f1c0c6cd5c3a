"""The training cost of the no-options path against the usage example before the defaults, as medians of repeats.

For each reference posterior, the training of ``AmortizedSteinGuide(model)`` with ``AmortizedSVGD(model, guide).run``
(automatic frame, default optimiser and steps, end-of-run checks and calibration) is timed against the previous usage
example (``whiten=None``, 1500 steps x 64 particles, ClippedAdam lr 1e-2 with lrd 0.9985, no checks). The two are
interleaved, in alternating order, ``repeats`` times in one process after a warm-up that pays the one-off costs (the
first torch optimiser of a process takes about a second to construct); the table gives each median and the ratio of
the medians. The target: the no-options path trains within 1.5x of the previous default.

``python -m benchmarks.default_cost [--smoke] [--repeats 3] [--only NAME,...] [--out DIR]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import pyro
import torch

from pyro_stein import AmortizedSteinGuide, AmortizedSVGD
from pyro_stein.infer import TrainingWarning

from .models import REFERENCE_NAMES, baseball_model, load_reference, load_sbibm
from .report import machine_info, write_json

TARGET = 1.5
PREVIOUS_STEPS = 1500
SMOKE_STEPS = 20


class _Problem:
    def __init__(self, name, model, args, kwargs):
        self.name, self.model, self.args, self.kwargs = name, model, args, kwargs


def _problem(name: str) -> _Problem:
    if name == "baseball":  # the model and data only: its reference draws (a NUTS run) are not needed here
        return _Problem(name, *baseball_model(torch.float64))
    ref = load_sbibm(*name.split("/")[:1], int(name.split("/")[1])) if "/" in name else load_reference(name)
    return _Problem(name, ref.model, ref.args, ref.kwargs)


def train_default(p: _Problem, steps: int | None) -> float:
    """Seconds to train the no-options path (set-up, training, end-of-run checks and calibration)."""
    t0 = time.perf_counter()
    guide = AmortizedSteinGuide(p.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)  # the health messages are the accuracy benchmark's business
        AmortizedSVGD(p.model, guide).run(*p.args, num_steps=steps, progress_bar=False, **p.kwargs)
    return time.perf_counter() - t0


def train_previous(p: _Problem, steps: int | None) -> float:
    """Seconds to train the usage example before the defaults."""
    t0 = time.perf_counter()
    guide = AmortizedSteinGuide(p.model, whiten=None)
    svgd = AmortizedSVGD(p.model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.9985}), num_particles=64)
    n = PREVIOUS_STEPS if steps is None else steps
    svgd.run(*p.args, num_steps=n, progress_bar=False, check_health=False, calibrate=False, **p.kwargs)
    return time.perf_counter() - t0


def measure(name: str, repeats: int, steps: int | None) -> dict:
    p = _problem(name)
    times = {"default": [], "previous": []}
    for r in range(repeats):
        order = ("default", "previous") if r % 2 == 0 else ("previous", "default")
        for which in order:
            pyro.clear_param_store()
            pyro.set_rng_seed(r)
            times[which].append((train_default if which == "default" else train_previous)(p, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "times_s": times,
        "median_default_s": med["default"],
        "median_previous_s": med["previous"],
        "ratio": med["default"] / med["previous"],
    }


def _warm_up() -> None:
    """Pay the one-off costs of a process (the first torch optimiser, the first vmap) on a tiny model."""

    def tiny(x):
        pyro.sample("a", pyro.distributions.Normal(x, 1.0))

    p = _Problem("warm-up", tiny, (torch.tensor(0.0, dtype=torch.float64),), {})
    train_default(p, 5)
    train_previous(p, 5)


def report(result: dict) -> str:
    lines = [
        "# Training cost of the defaults",
        "",
        f"Medians of {result['repeats']} interleaved repeats per posterior, in one process after a warm-up; "
        f"steps: {result['steps'] or 'the defaults (1500 each)'}. Target: ratio <= {TARGET}.",
        "",
        "| posterior | no options (s) | previous default (s) | ratio | within target |",
        "|---|---|---|---|---|",
    ]
    met = 0
    for name, r in result["results"].items():
        ok = r["ratio"] <= TARGET
        met += ok
        lines.append(
            f"| {name} | {r['median_default_s']:.2f} | {r['median_previous_s']:.2f} | {r['ratio']:.2f} | "
            f"{'yes' if ok else 'no'} |"
        )
    lines += ["", f"Within {TARGET}x on {met}/{len(result['results'])}."]
    return "\n".join(lines) + "\n"


def run(out: Path, names: list[str], repeats: int, steps: int | None) -> dict:
    torch.set_default_dtype(torch.float64)
    t_start = time.perf_counter()
    _warm_up()
    result = {"machine": machine_info(), "repeats": repeats, "steps": steps, "results": {}}
    for name in names:
        result["results"][name] = measure(name, repeats, steps)
        print(f"  {name:45s} ratio {result['results'][name]['ratio']:.2f}", flush=True)
    result["wall_s"] = time.perf_counter() - t_start
    stem = "default_cost" if steps is None else "default_cost_smoke"  # a smoke run keeps the full results
    write_json(out, stem, result)
    (out / f"{stem}.md").write_text(report(result), encoding="utf-8")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.default_cost", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", default=bool(os.environ.get("CI")))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    names = [s for s in a.only.split(",") if s] or [
        *REFERENCE_NAMES,
        "baseball",
        "gaussian_linear/1",
        "bernoulli_glm/1",
    ]
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(out, names, a.repeats, SMOKE_STEPS if a.smoke else None)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
