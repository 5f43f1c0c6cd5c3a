"""``python -m benchmarks [--quick|--full|--smoke] [--out DIR] [--device cuda]
[--only step_cost,accuracy,amortized,amortized_hier,amortized_sbibm,memory,multimodal]``.

Writes one JSON file per part into ``--out`` and regenerates ``REPORT.md`` (plus PNG plots) from
whatever JSON files are there. ``--quick`` (default) finishes in a few minutes on 2 cores;
``--full`` is the configuration the committed report is meant to come from; ``--smoke`` is a tiny
configuration for CI (it only checks that everything runs). ``multimodal`` (mode discovery on multimodal targets,
``benchmarks/multimodal.py``) runs only when named in ``--only``; it writes ``multimodal[_smoke].json`` and ``.md``
(``--full`` runs its quick configuration).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

PARTS = ("step_cost", "accuracy", "amortized", "amortized_hier", "amortized_sbibm", "memory")
OPTIONAL_PARTS = ("multimodal",)  # run only when named in --only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick")
    g.add_argument("--full", dest="mode", action="store_const", const="full")
    g.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiny CI configuration")
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS + OPTIONAL_PARTS)} (default: {','.join(PARTS)})",
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument(
        "--posteriors",
        default=None,
        help="accuracy: comma-separated subset of posterior names (posteriordb names or sbibm task/obs)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="step_cost only: torch device to time on (e.g. cuda); writes step_cost_cuda.json",
    )
    p.add_argument("--report-only", action="store_true", help="only regenerate REPORT.md from the JSON files in --out")
    a = p.parse_args(argv)
    mode = a.mode or "quick"
    parts = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS + OPTIONAL_PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {list(PARTS + OPTIONAL_PARTS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small tensors: intra-op threads only add contention on a shared machine
    from . import report

    failed = []
    if not a.report_only:
        for part in parts:
            t0 = time.perf_counter()
            print(f"[benchmarks] {part} ({mode}) ...", flush=True)
            try:
                if part == "step_cost":
                    from .step_cost import run
                elif part == "accuracy":
                    from .accuracy import run
                elif part == "amortized":
                    from .amortized import run
                elif part == "amortized_hier":
                    from .amortized import run_hier as run
                elif part == "amortized_sbibm":
                    from .amortized import run_sbibm as run
                elif part == "multimodal":
                    from .multimodal import run
                else:
                    from .memory import run
                kw = {"posteriors": a.posteriors} if part == "accuracy" else {}
                if part == "step_cost":
                    kw["device"] = a.device
                run(mode, out, **kw)
            except Exception:  # noqa: BLE001 - report the failure, keep the other parts
                traceback.print_exc()
                failed.append(part)
            print(f"[benchmarks] {part} done in {time.perf_counter() - t0:.1f} s", flush=True)
    path = report.build_report(out)
    print(f"[benchmarks] report: {path}", flush=True)
    if failed:
        print(f"[benchmarks] FAILED parts: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
