"""Smoke test of the tutorials: every ``tutorials/*.py`` runs end to end in CI mode.

Each script is run as a subprocess from the repository root with ``CI=1`` (the scripts then take
few steps and write to ``tutorials/outputs/ci/``) and ``OMP_NUM_THREADS=1``. The scripts are
found by glob, so a tutorial added later is picked up without editing this file.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted(p for p in (ROOT / "tutorials").glob("*.py") if not p.name.startswith("_"))  # _common.py: helpers
TIMEOUT_S = 300


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(script):
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out  # bytes even with text=True
        pytest.fail(f"{script.name} did not finish within {TIMEOUT_S} s in CI mode; last output:\n{out[-3000:]}")
    assert proc.returncode == 0, (
        f"{script.name} exited with code {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr (tail) ---\n{proc.stderr[-3000:]}"
    )


def test_tutorials_found():
    assert any(p.name == "logistic_regression.py" for p in TUTORIALS), f"no tutorials found under {ROOT / 'tutorials'}"
