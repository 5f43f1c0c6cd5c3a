"""Argument checks shared by the modules (one integer check for every integer option)."""

from __future__ import annotations

import operator


def _int_at_least(value, name: str, lo: int, expected: str | None = None) -> int:
    """``value`` as an ``int`` >= ``lo`` (any integer type: ``numpy.int64``, a 0-d integer tensor; not ``bool``),
    else a ``ValueError`` naming ``name`` and what was ``expected`` (default "an int >= lo")."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < lo:
        raise ValueError(f"{name} must be {expected or f'an int >= {lo}'}, got {value!r}")
    return n
