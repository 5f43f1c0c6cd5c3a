"""Files: atomic writes and loads that never run code.

Every file the library writes goes through :func:`atomic_write`: the content is written to a
temporary file in the destination's folder, flushed and fsynced, and then renamed over the
destination with :func:`os.replace`, so an interrupted or failed write (Ctrl-C, a full disk, an
exception while serialising) leaves the previous file, if any, intact and readable, and never a
half-written one under the destination's name.

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: tensors and plain
containers of numbers and strings, no pickled objects (a crafted file cannot run code on load).
A file that cannot be read that way (truncated, garbage, holding other objects) raises
:class:`CheckpointError`, a ``ValueError`` naming the file.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import torch
from torch import Tensor

__all__ = ["CheckpointError", "atomic_torch_save", "atomic_write", "check_plain", "load_weights_only"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable (truncated, corrupt, not a checkpoint), from a newer
    version of pyro_stein, holding invalid values, or not matching the model it is loaded for. The message
    names the file; :attr:`path` holds it."""

    def __init__(self, path, message: str):
        self.path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
        super().__init__(f"checkpoint {self.path!r}: {message}")


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file all or nothing: ``write(f)`` fills a temporary file in ``path``'s folder, which is flushed,
    fsynced and then renamed to ``path``. On any exception (``KeyboardInterrupt`` included) the temporary file
    is removed and ``path`` is left as it was.

    The temporary file is created with mode ``0o666`` less the umask, as ``open(path, "wb")`` would."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_weights_only(path, map_location=None) -> Any:
    """``torch.load(path, weights_only=True)``, with every failure to read the file as a :class:`CheckpointError`
    naming it (a missing file stays a ``FileNotFoundError``, a folder an ``IsADirectoryError``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            path,
            f"cannot be read as tensors and plain values only ({first}); it is corrupt, or holds pickled "
            "objects, which pyro_stein never loads (loading them could run code)",
        ) from None
    except Exception as e:  # noqa: BLE001 - EOFError, RuntimeError (bad zip), OSError, KeyError, ... from a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        raise CheckpointError(
            path, f"is not a readable checkpoint: truncated or corrupt ({type(e).__name__}: {first})"
        ) from None


_PLAIN_SCALARS = (bool, int, float, str, type(None))


def check_plain(obj: Any, where: str) -> None:
    """Raise a ``TypeError`` naming ``where`` unless ``obj`` is made of tensors, dicts with str or int keys, lists,
    tuples, ints, floats, bools, strs and ``None`` only: what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, Tensor):
        return
    if isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; keys must be str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}; a checkpoint holds tensors, dicts, lists, tuples, ints, floats, bools, "
        "strs and None only (it is loaded without unpickling objects): convert it (e.g. to a dict or a tensor)"
    )


# ---------------------------------------------------------------------------------------------- validation
def check_tensor_dict(
    path,
    state: Any,
    where: str,
    dtype: torch.dtype | None = None,
    integer_ok: Callable[[str], bool] = lambda key: False,
) -> torch.dtype | None:
    """Check a loaded ``{name: Tensor}`` mapping: every value a floating-point tensor of one dtype (``dtype`` when
    given; integer or bool tensors only under keys for which ``integer_ok(key)``), all entries finite. Returns that
    dtype (``None`` when there is no floating-point entry)."""
    if not isinstance(state, dict):
        raise CheckpointError(path, f"{where} is a {type(state).__name__}, not a dict of tensors")
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(path, f"{where} has a key {k!r} that is not a str")
        if not isinstance(v, Tensor):
            raise CheckpointError(path, f"{where}[{k!r}] is a {type(v).__name__}, not a tensor")
        if not v.is_floating_point() and not v.is_complex() and integer_ok(k):
            continue
        if not v.is_floating_point() or v.dtype in (torch.float16, torch.bfloat16):
            raise CheckpointError(
                path,
                f"{where}[{k!r}] has dtype {v.dtype}; the guide's tensors are float32 or "
                "float64: the file is corrupt or was altered",
            )
        if dtype is None:
            dtype = v.dtype
        elif v.dtype != dtype:
            raise CheckpointError(
                path, f"{where}[{k!r}] has dtype {v.dtype} but the others {dtype}: the file is corrupt or was altered"
            )
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(
                path,
                f"{where}[{k!r}] holds NaN or infinite values (a diverged guide saved, or a "
                "corrupt file); use an earlier checkpoint",
            )
    return dtype


def check_finite_tensors(path, obj: Any, where: str) -> None:
    """Every floating-point tensor and float inside ``obj`` (nested dicts, lists, tuples) is finite."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise CheckpointError(path, f"{where} holds NaN or infinite values; use an earlier checkpoint")
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise CheckpointError(path, f"{where} is {obj!r}; use an earlier checkpoint")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite_tensors(path, v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite_tensors(path, v, f"{where}[{i}]")


def config_int(path, cfg: dict, key: str, lo: int, hi: int, default: Any = ..., optional: bool = False) -> int | None:
    """``cfg[key]`` as an int in ``[lo, hi]`` (``None`` allowed when ``optional``), else a :class:`CheckpointError`."""
    if key not in cfg:
        if default is ...:
            raise CheckpointError(path, f"config lacks {key!r}: the file is corrupt or was altered")
        return default
    v = cfg[key]
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
        raise CheckpointError(
            path, f"config[{key!r}] = {v!r} is not an int in [{lo}, {hi}]: the file is corrupt or was altered"
        )
    return int(v)


def config_float(path, cfg: dict, key: str, lo: float, hi: float, default: Any = ...) -> float:
    """``cfg[key]`` as a finite float in ``(lo, hi]``, else a :class:`CheckpointError`."""
    if key not in cfg:
        if default is ...:
            raise CheckpointError(path, f"config lacks {key!r}: the file is corrupt or was altered")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not lo < v <= hi:
        raise CheckpointError(
            path, f"config[{key!r}] = {v!r} is not a number in ({lo}, {hi}]: the file is corrupt or was altered"
        )
    return float(v)


def config_choice(path, cfg: dict, key: str, choices: tuple, default: Any = ...) -> Any:
    """``cfg[key]``, one of ``choices`` (compared by type and value), else a :class:`CheckpointError`."""
    if key not in cfg:
        if default is ...:
            raise CheckpointError(path, f"config lacks {key!r}: the file is corrupt or was altered")
        return default
    v = cfg[key]
    if not any(type(v) is type(c) and v == c for c in choices):
        raise CheckpointError(
            path, f"config[{key!r}] = {v!r} is not one of {list(choices)}: the file is corrupt or was altered"
        )
    return v


def check_format_version(path, version, newest: int, written_by: str = "") -> int:
    """``version`` (a file's ``format_version``) if this pyro_stein reads it, else a :class:`CheckpointError`:
    corrupt when not a positive int, too new when above ``newest`` (``written_by``: who wrote it, for the message)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(path, f"has format_version {version!r}, not a positive int: the file is corrupt")
    if version > newest:
        raise CheckpointError(
            path,
            f"has format_version {version}{written_by}, but this pyro_stein reads format_version {newest} and older: "
            "upgrade pyro_stein to load it",
        )
    return version
