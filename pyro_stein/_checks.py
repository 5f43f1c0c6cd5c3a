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


class _CheckedOption:
    """An option held in the instance's ``__dict__`` and checked whenever it is set (in the constructor or later as
    ``obj.<name> = value``); subclasses define :meth:`check`, which returns the value to store or raises."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.name] = self.check(value)

    def check(self, value):
        raise NotImplementedError
