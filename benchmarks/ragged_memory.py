"""Peak memory of one amortized training step on a ragged batch: one large dataset alone, and the same
dataset batched with small ones.

Each configuration runs in its own subprocess, which records ``ru_maxrss`` after building the data and
the guide (its baseline) and again after the step; the difference is the step's peak resident memory.
The batch of the large dataset with small ones should stay within 1.5x of the large dataset alone (the
dataset encoder encodes datasets of very different sizes in separate groups instead of padding the small
ones to the large one's size).

Usage: ``python -m benchmarks.ragged_memory [--rows 1000000] [--small 3]``; prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _child(rows: int, small: int) -> dict:
    import resource

    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_stein import AmortizedSteinGuide, AmortizedSVGD, Dataset

    torch.set_num_threads(1)
    if os.environ.get("PYRO_STEIN_PAD_RAGGED"):  # for comparison: pad every batch to its largest dataset
        import pyro_stein.amortization

        pyro_stein.amortization.size_groups = lambda sizes, slack=0: [list(range(len(sizes)))]

    def model(n, y=None):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(()), 1.0))
        with pyro.plate("obs", n):
            return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    pyro.set_rng_seed(0)
    datasets = [Dataset(rows, y=torch.randn(rows))] + [Dataset(20, y=torch.randn(20)) for _ in range(small)]
    guide = AmortizedSteinGuide(model, amortized=True).setup(20, y=torch.randn(20))
    svgd = AmortizedSVGD(model, guide, pyro.optim.Adam({"lr": 1e-3}), num_particles=16)
    warm = [Dataset(20, y=torch.randn(20)) for _ in range(2)]
    svgd.step_batch(warm)  # lazily initialised machinery (vmap, the optimiser) in the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    svgd.step_batch(datasets)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "small": small, "step_peak_mb": round((peak - base) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(_child(a.rows, a.small)), flush=True)
        return
    results = []
    for small in (0, a.small):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.ragged_memory", "--child", "--rows", str(a.rows), "--small", str(small)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    alone, mixed = results[0]["step_peak_mb"], results[1]["step_peak_mb"]
    print(json.dumps({"ratio_mixed_to_alone": round(mixed / max(alone, 1e-9), 2), "target": 1.5}))


if __name__ == "__main__":
    main()
