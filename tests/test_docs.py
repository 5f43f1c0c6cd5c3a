"""The documentation builds without a warning (``mkdocs build --strict``), and every tutorial is in the gallery.

The build renders the API reference from the package's docstrings (mkdocstrings), the benchmark
report from ``benchmarks/results/REPORT.md`` and the tutorials' sources, so a docstring griffe
cannot parse, a broken link or a missing tutorial page fails here. Skipped where MkDocs is not
installed (``pip install -e ".[docs]"`` installs it; the ``test`` extra includes it).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def _tutorials() -> list[Path]:
    """The tutorial scripts (``tutorials/_common.py`` holds their shared helpers, not a tutorial)."""
    return sorted(p for p in (ROOT / "tutorials").glob("*.py") if not p.name.startswith("_"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


_MISSING = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _installed(m)]
needs_mkdocs = pytest.mark.skipif(
    bool(_MISSING), reason=f"docs tools not installed ({', '.join(_MISSING)}); pip install -e '.[docs]'"
)


@needs_mkdocs
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    site = tmp_path / "site"
    assert (site / "api" / "guide" / "index.html").is_file()
    assert (site / "benchmarks" / "report" / "index.html").is_file()
    for script in _tutorials():  # each page shows its tutorial's source, not a marker
        html = (site / "tutorials" / script.stem / "index.html").read_text(encoding="utf-8")
        assert "--8&lt;--" not in html and "--8 &lt; --" not in html, (
            f"{script.stem}: a snippet marker was not expanded"
        )
        first_def = re.search(r"^def (\w+)", script.read_text(encoding="utf-8"), re.M).group(1)
        assert f">{first_def}<" in html, f"{script.stem}: the page does not render its source (no def {first_def})"


def test_every_tutorial_has_a_gallery_page():
    gallery = (ROOT / "docs" / "tutorials" / "index.md").read_text(encoding="utf-8")
    for script in _tutorials():
        page = ROOT / "docs" / "tutorials" / f"{script.stem}.md"
        assert page.is_file(), f"tutorials/{script.name} has no page docs/tutorials/{script.stem}.md"
        assert f'--8<-- "tutorials/{script.name}"' in page.read_text(encoding="utf-8"), (
            f'{page.name} does not include its source with the snippet line --8<-- "tutorials/{script.name}"'
        )
        assert f"({script.stem}.md)" in gallery, f"the gallery (docs/tutorials/index.md) does not link {script.stem}.md"
