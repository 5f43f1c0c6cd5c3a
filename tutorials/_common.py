"""What the tutorials share: the smoke-mode flag and the folder they write their figures and tables to."""

import argparse
import os
import tempfile
from pathlib import Path

CI = bool(os.environ.get("CI"))  # smoke mode (set in CI): fewer steps and draws, same code path


def output_dir(name: str, description: str) -> Path:
    """``--out DIR`` if given, else ``pyro_stein_tutorials/<name>`` under the system's temporary folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help="folder for figures and tables (default: a temporary one)")
    out = parser.parse_args().out
    if out is not None:
        return out
    base = Path(tempfile.gettempdir()) / "pyro_stein_tutorials"
    return base / "ci" / name if CI else base / name
