"""Shared test configuration.

The suite runs in float64 by default. Set ``PYRO_STEIN_DEVICE=cuda`` to run it on a GPU and
``PYRO_STEIN_DTYPE=float32`` to run it in single precision. Tests marked ``gpu`` are skipped
when no CUDA device is present.
"""

import os
import zlib
from pathlib import Path

import pyro
import pytest
import torch

# The suite's tensors are small: intra-op threading only adds synchronisation cost (and on a loaded
# 2-core machine OpenMP oversubscription made steps ~30x slower), so tests run single-threaded.
torch.set_num_threads(1)

DEVICE = torch.device(os.environ.get("PYRO_STEIN_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("PYRO_STEIN_DTYPE", "float64"))
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _pyro_state(request):
    """Fresh param store, default dtype and validation for every test, and random streams seeded from the test's
    id (a CRC-32 of it): a test draws the same numbers whichever tests ran before it in its worker, so its result
    does not depend on pytest-xdist's order."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(old_dtype)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def dtype():
    return DTYPE


def tensor(x, **kw):
    """Test helper: a tensor on the suite's device and dtype."""
    return torch.as_tensor(x, dtype=kw.pop("dtype", DTYPE), device=DEVICE, **kw)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA
