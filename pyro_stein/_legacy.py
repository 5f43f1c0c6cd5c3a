"""The guide options of earlier versions: accepted for one more release, each with a ``FutureWarning`` naming the
new form.

The constructor keywords ``moment_correction``, ``correction_samples``, ``mcmc_steps`` and ``mcmc_leapfrog`` became
post-processing steps (``postprocess=[MomentCorrection(...), HMC(...)]``); ``dataset_fn``, ``encoder``,
``context_dim``, ``mean_features`` and ``laplace_evaluations`` became :class:`~pyro_stein.Amortization` options
(``amortized=Amortization(...)``). The same names as guide attributes (``guide.mcmc_steps = 10``) still read and
set what they stood for.
"""

from __future__ import annotations

import dataclasses
import warnings

from ._checks import _int_at_least
from .amortization import Amortization
from .postprocess import LEGACY_DEFAULTS, legacy_steps, legacy_values

# the new form of each old post-processing option, in the constructor and as an attribute
POSTPROCESS_NEW_FORM = {
    "moment_correction": ("postprocess=[MomentCorrection(rounds=...)]", "guide.postprocess = [MomentCorrection(...)]"),
    "correction_samples": (
        "the num_draws= of each post-processing step, e.g. postprocess=[MomentCorrection(num_draws=...)]",
        "the num_draws= of each step in guide.postprocess",
    ),
    "mcmc_steps": (
        "postprocess=[MALA(steps=...)] (or HMC(steps=..., leapfrog=...))",
        "guide.postprocess = [MALA(steps=...)] (or HMC(steps=..., leapfrog=...))",
    ),
    "mcmc_leapfrog": (
        "postprocess=[HMC(steps=..., leapfrog=...)]",
        "guide.postprocess = [HMC(steps=..., leapfrog=...)]",
    ),
}
# the lower bound and its wording of each old post-processing option
_POSTPROCESS_BOUNDS = {
    "moment_correction": (0, None),
    "correction_samples": (3, None),
    "mcmc_steps": (0, None),
    "mcmc_leapfrog": (1, "an int >= 1 (1: MALA steps)"),
}
AMORTIZATION_OPTIONS = ("dataset_fn", "encoder", "context_dim", "mean_features", "laplace_evaluations")


def _warn(subject: str, new_form: str, stacklevel: int) -> None:
    warnings.warn(
        f"{subject} is deprecated and will be removed in the next release; use {new_form} instead",
        FutureWarning,
        stacklevel=stacklevel + 1,
    )


def _amortization_form(name: str) -> str:
    return f"amortized=Amortization({name}=...) (pyro_stein.Amortization)"


def check_postprocess_option(name: str, value) -> int:
    """An old post-processing option's value, checked as it was (``guide.<name> must be ...``)."""
    lo, expected = _POSTPROCESS_BOUNDS[name]
    return _int_at_least(value, f"guide.{name}", lo, expected)


def constructor_options(deprecated: dict, amortized, postprocess) -> tuple[Amortization, tuple | None, dict | None]:
    """The new-form options for old constructor keywords: ``(amortization, postprocess steps or None, the old
    post-processing values or None)``. Checks every value first (the errors of earlier versions), then warns once
    per keyword given (a ``FutureWarning`` naming its new form); an unknown keyword is a ``TypeError``."""
    unknown = sorted(set(deprecated) - set(POSTPROCESS_NEW_FORM) - set(AMORTIZATION_OPTIONS))
    if unknown:
        raise TypeError(f"AmortizedSteinGuide() got an unexpected keyword argument {unknown[0]!r}")
    old_post = {k: check_postprocess_option(k, v) for k, v in deprecated.items() if k in POSTPROCESS_NEW_FORM}
    old_amortization = {k: v for k, v in deprecated.items() if k in AMORTIZATION_OPTIONS}
    if old_post and postprocess is not None:
        raise ValueError(f"pass either postprocess=[...] or the old options {sorted(old_post)}, not both")
    if isinstance(amortized, Amortization):
        if old_amortization:
            raise ValueError(
                f"pass {sorted(old_amortization)} inside Amortization(...), not next to amortized=Amortization(...)"
            )
        amortization = amortized
    else:
        if old_amortization.get("encoder") is not None and amortized is False:
            raise ValueError("an encoder was given but amortized=False; pass amortized=True to use it")
        if old_amortization.get("mean_features") and amortized is False:
            raise ValueError("mean_features=True is for the dataset encoder of an amortized guide; pass amortized=True")
        amortization = Amortization(**old_amortization)
    for name in old_post:
        _warn(f"AmortizedSteinGuide({name}=...)", POSTPROCESS_NEW_FORM[name][0], stacklevel=3)
    for name in old_amortization:
        _warn(f"AmortizedSteinGuide({name}=...)", _amortization_form(name), stacklevel=3)
    if not old_post:
        return amortization, None, None
    values = {**LEGACY_DEFAULTS, **old_post}
    return amortization, legacy_steps(**values), values


class PostprocessAttribute:
    """``guide.<name>`` for an old post-processing option: reads and sets the post-processing it stood for (held in
    ``guide.postprocess``), with a ``FutureWarning``."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, guide, objtype=None):
        if guide is None:
            return self
        _warn(f"guide.{self.name}", POSTPROCESS_NEW_FORM[self.name][1], stacklevel=2)
        return guide._legacy_values()[self.name]

    def __set__(self, guide, value) -> None:
        value = check_postprocess_option(self.name, value)
        _warn(f"guide.{self.name}", POSTPROCESS_NEW_FORM[self.name][1], stacklevel=2)
        values = {**guide._legacy_values(), self.name: value}
        guide.postprocess = legacy_steps(**values)
        guide._legacy_postprocess = values  # what the old options said, also where no step holds it


class AmortizationAttribute:
    """``guide.<name>`` for an old amortization option: reads and sets the guide's :class:`Amortization`
    (``guide.amortization``), with a ``FutureWarning``."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, guide, objtype=None):
        if guide is None:
            return self
        _warn(f"guide.{self.name}", f"guide.amortization.{self.name}", stacklevel=2)
        return getattr(guide._amortization, self.name)

    def __set__(self, guide, value) -> None:
        if self.name in ("context_dim", "laplace_evaluations"):
            value = _int_at_least(value, f"guide.{self.name}", 1)
        config = dataclasses.replace(guide._amortization, **{self.name: value})  # checked
        _warn(f"setting guide.{self.name}", f"{_amortization_form(self.name)} when building the guide", 2)
        guide._set_amortization(config)


class MeanFeaturesAttribute(AmortizationAttribute):
    """``guide.mean_features``: whether the default encoder passes the feature means to the sampler (its default
    decided for the guide's frame; reading it does not warn). Setting it, as earlier versions allowed before set-up,
    sets the guide's :class:`Amortization`, with a ``FutureWarning``."""

    def __get__(self, guide, objtype=None):
        if guide is None:
            return self
        return guide.amortized and guide._amortization.resolved_mean_features(guide.frame.whiten)


def legacy_values_of(steps, remembered: dict | None) -> dict:
    """The old options' values: those last set through them, or else those that describe ``steps``."""
    return dict(remembered) if remembered is not None else legacy_values(steps)
