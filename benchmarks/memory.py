"""Part 4: peak memory of one step vs particles n and latent dim D, each configuration in its own subprocess.

Each child imports everything, builds the data, records ``ru_maxrss`` as its baseline, then builds the
guide and runs the steps and records ``ru_maxrss`` again; the difference is the step's peak resident
memory (guide parameters and optimizer state included). ``tracemalloc`` is reported too, but it only
sees Python-level allocations, not torch's allocator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .report import machine_info, write_json

BYTES = 4  # float32
CONFIGS = {
    "smoke": {"ours": [(64, 100)], "pyro_svgd": []},
    "quick": {"ours": [(64, 10), (256, 10), (64, 1000), (256, 1000), (64, 10000)], "pyro_svgd": [(64, 1000)]},
    "full": {
        "ours": [(n, D) for D in (10, 1000, 10000) for n in (64, 256, 1024)],
        "pyro_svgd": [(64, 1000), (256, 1000), (64, 10000), (128, 10000)],
    },
}
PYRO_SVGD_MAX_BYTES = 8e9  # skip pyro.infer.SVGD configs whose n x n x D tensors would need more (est. 4 of them)


def _child(method: str, n: int, D: int, steps: int) -> dict:
    import resource
    import statistics
    import tracemalloc

    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_stein import AmortizedSteinGuide, AmortizedSVGD

    torch.set_num_threads(1)

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    def model_plate():  # pyro.infer.SVGD's particle plate sits at dim -2
        pyro.sample("x", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    def tiny():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    # warm-up on a tiny model so that lazily imported/initialised machinery (functorch, optimizers) is in the baseline
    AmortizedSVGD(tiny, AmortizedSteinGuide(tiny), pyro.optim.ClippedAdam({"lr": 1e-2}), num_particles=4).step()
    pyro.infer.SVGD(
        tiny, pyro.infer.RBFSteinKernel(), pyro.optim.Adam({"lr": 1e-2}), num_particles=4, max_plate_nesting=1
    ).step()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    tracemalloc.start()
    out = {"method": method, "n": n, "D": D}
    if method == "ours":
        guide = AmortizedSteinGuide(model)
        svgd = AmortizedSVGD(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), num_particles=n)
        step = svgd.step
    else:
        svgd = pyro.infer.SVGD(
            model_plate,
            pyro.infer.RBFSteinKernel(),
            pyro.optim.Adam({"lr": 1e-2}),
            num_particles=n,
            max_plate_nesting=1,
        )
        step = svgd.step
    step()  # set-up step (vmap check, parameter creation)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, tm_peak = tracemalloc.get_traced_memory()
    out.update(
        baseline_rss_mb=base / 1024,
        peak_rss_mb=(peak - base) / 1024,
        tracemalloc_peak_mb=tm_peak / 2**20,
        step_s=statistics.median(times),
        steps_timed=steps,
    )
    if method == "ours":
        out["affine"] = guide.sampler.affine
        out["guide_params"] = sum(p.numel() for p in guide.parameters())
        out["guide_params_mb"] = out["guide_params"] * BYTES / 2**20
    return out


def _spawn(method, n, D, steps, timeout):
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", method, str(n), str(D), str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = str(Path(__file__).resolve().parents[1])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "D": D, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"method": method, "n": n, "D": D, "error": f"exit {p.returncode}: {tail}"}
    return json.loads(lines[-1])


def run(mode: str, out: Path) -> dict:
    t_start = time.perf_counter()
    cfg = CONFIGS[mode]
    steps = {"smoke": 2, "quick": 3, "full": 5}[mode]
    timeout = {"smoke": 60, "quick": 120, "full": 300}[mode]
    rows = []
    for method in ("ours", "pyro_svgd"):
        for n, D in cfg[method]:
            nnD = n * n * D * BYTES
            if method == "pyro_svgd" and 4 * nnD > PYRO_SVGD_MAX_BYTES:
                r = {
                    "method": method,
                    "n": n,
                    "D": D,
                    "error": "skipped: n x n x D tensors would not fit the 8 GB allowance",
                }
            else:
                r = _spawn(method, n, D, steps, timeout)
            r["nnD_tensor_mb"] = nnD / 2**20
            r["particles_mb"] = n * D * BYTES / 2**20
            rows.append(r)
            print(
                f"  memory {method} n={n} D={D}: {r.get('peak_rss_mb', float('nan')):.1f} MB, "
                f"step {r.get('step_s', float('nan')) * 1e3:.1f} ms {r.get('error', '')}",
                flush=True,
            )
    result = {
        "mode": mode,
        "dtype": "torch.float32",
        "machine": machine_info(),
        "configs": rows,
        "notes": (
            "Model: `x ~ Normal(0, I_D)` (isotropic Gaussian). Each configuration runs in a fresh subprocess: peak RSS "
            "(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) after a set-up step and "
            f"{steps} timed steps, minus the same process's RSS after imports and one warm-up step on a 2-dim model "
            "(this includes the guide's parameters and "
            "Adam state: for D = 10^4 the default sampler's residual MLP alone has ~10.5 M parameters). "
            "`affine` is what the default GaussianResidualSampler chose automatically ('auto' = full up to D = 512, "
            "else diag). tracemalloc sees only Python allocations, not torch's allocator. `n x n x D tensor` is the "
            "float32 size of one such tensor (what pyro.infer.SVGD's RBFSteinKernel builds); our kernels only build "
            "n x n matrices. Step times here come from few steps in a cold process: use part 1 for timings."
        ),
    }
    result["wall_s"] = time.perf_counter() - t_start
    write_json(out, "memory", result)
    return result


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "--child":
    _, _, method, n, D, steps = sys.argv
    print(json.dumps(_child(method, int(n), int(D), int(steps))), flush=True)
