"""Saving and loading guides: files of tensors and plain values, described by frozen configs.

:meth:`AmortizedSteinGuide.save <pyro_stein.AmortizedSteinGuide.save>` writes a dict read back with
``torch.load(weights_only=True)`` (no code runs on load). Its ``config`` is made of the configs' own
serialisations: :class:`GuideOptions` (the guide's value options and its post-processing steps), the frame
(:meth:`~pyro_stein.frames.Frame.to_dict`), the amortization (:meth:`~pyro_stein.Amortization.to_dict`) and the
layout of the latent sites and networks. Every config checks itself when it is made, so a loaded file is checked
before any network is built; :func:`checked_payload` adds the checks of the file as a whole (format and version,
ranges, tensors, and that the networks it describes have exactly its weights' names and shapes).

Format versions: 1 (the first), 2 (adds the initial values and the sites' supports), 3 (the post-processing as a
list of steps instead of the options ``moment_correction``, ``correction_samples``, ``mcmc_steps`` and
``mcmc_leapfrog``). Files of every version load.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ._checks import _int_at_least
from ._legacy import AMORTIZATION_OPTIONS, POSTPROCESS_NEW_FORM
from .amortization import Amortization
from .frames import Frame
from .nn import DeepSetEncoder, GaussianResidualSampler
from .postprocess import LEGACY_DEFAULTS, PostProcess, legacy_steps, steps_argument
from .tracing import _init_to_saved, _site_kind, _site_probe

__all__ = ["GuideOptions", "checked_payload", "load_guide", "save_guide"]

FORMAT_VERSION = 3  # of the file AmortizedSteinGuide.save writes (see the module doc)
_MAX_DIM = 1 << 20  # a bound on the sizes a checkpoint's configuration may state (checked against its weights too)
_MAX_DRAWS = 1 << 24
_LEGACY_POSTPROCESS_RANGES = (
    ("moment_correction", 0, 1000),
    ("correction_samples", 3, _MAX_DRAWS),
    ("mcmc_steps", 0, 1 << 20),
    ("mcmc_leapfrog", 1, 1 << 12),
)
# the largest value a saved post-processing step may state for each option
_STEP_BOUNDS = {"num_draws": _MAX_DRAWS, "rounds": 1000, "steps": 1 << 20, "leapfrog": 1 << 12}


@dataclass(frozen=True)
class GuideOptions:
    """The value options of an :class:`~pyro_stein.AmortizedSteinGuide` (``guide.options``), checked when made.

    :param float init_scale: initial spread of the default sampler in unconstrained space (relative to the frame's
        sds when the guide has a frame).
    :param str vectorize: how the model's log joint is evaluated over particles (``"auto"``, ``"vmap"``,
        ``"loop"``; see :class:`~pyro_stein.logjoint.ModelLogDensity`).
    :param int num_summary_samples: draws used by ``median`` and ``quantiles``.
    :param bool record_graph: replay recorded graphs of the guide's own model evaluations (see the guide).
    :param tuple postprocess: the default post-processing steps of ``sample_posterior``.
    """

    init_scale: float = 0.1
    vectorize: str = "auto"
    num_summary_samples: int = 1000
    record_graph: bool = True
    postprocess: tuple = ()

    def __post_init__(self):
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, numbers.Real):
            raise TypeError(f"init_scale must be a positive number, got {self.init_scale!r}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale!r}")
        object.__setattr__(self, "init_scale", float(self.init_scale))
        if self.vectorize not in ("auto", "vmap", "loop"):
            raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop', got {self.vectorize!r}")
        samples = _int_at_least(self.num_summary_samples, "guide.num_summary_samples", 1)
        object.__setattr__(self, "num_summary_samples", samples)
        if not isinstance(self.record_graph, bool):
            raise TypeError(f"record_graph must be True or False, got {self.record_graph!r}")
        object.__setattr__(self, "postprocess", steps_argument(self.postprocess))

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values (the steps as :meth:`~pyro_stein.postprocess.PostProcess.to_dict` gives)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["postprocess"] = [step.to_dict() for step in self.postprocess]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuideOptions:
        """The options :meth:`to_dict` gave ``d`` (missing ones at their defaults; a file of format 1 or 2 gives
        its post-processing as the old options, converted to steps)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"postprocess"}
        options = {k: d[k] for k in names if k in d}
        if "postprocess" in d:
            steps = tuple(PostProcess.from_dict(s) for s in d["postprocess"])
        else:
            steps = legacy_steps(**{k: d.get(k, v) for k, v in LEGACY_DEFAULTS.items()})
        return cls(**options, postprocess=steps)


class Restore(NamedTuple):
    """What the set-up of a loaded guide restores instead of building afresh (networks' configs, the sites to
    expect), and the file it came from."""

    path: Any
    sampler: dict | None
    encoder: dict | None
    sites: list
    site_kinds: list | None
    site_probes: dict | None
    frame_summary_squash: bool


# what AmortizedSteinGuide.load's keywords must not hold (they go to the model; the guide's come from the file)
GUIDE_OPTIONS = (
    *(f.name for f in dataclasses.fields(GuideOptions)),
    "init_loc_fn",
    "amortized",
    "whiten",
    *POSTPROCESS_NEW_FORM,
    *AMORTIZATION_OPTIONS[2:],
)


def _refuse_guide_options(model, kwargs: dict) -> None:
    """``AmortizedSteinGuide.load``'s keywords go to the model: refuse a guide option among them (it comes from
    the file) unless the model itself takes an argument of that name."""
    given = [k for k in kwargs if k in GUIDE_OPTIONS]
    if not given:
        return
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):
        params = {}
    given = [k for k in given if k not in params]
    if given:
        raise TypeError(
            f"AmortizedSteinGuide.load got the guide option(s) {given}: a guide's options are restored from the file "
            "(init_loc_fn as the initial values it gave); load's other keywords are the model's arguments. Drop "
            f"{given[0]}=..., or set a changeable option after loading (e.g. guide.num_summary_samples = 500)"
        )


def _check_postprocess(path, cfg: dict) -> None:
    """The saved post-processing steps (format 3): known steps with options in range."""
    from ._io import CheckpointError

    steps = cfg.get("postprocess")
    if not isinstance(steps, list):
        raise CheckpointError(path, f"config['postprocess'] = {steps!r} is not a list: the file is corrupt")
    for i, step in enumerate(steps):
        try:
            PostProcess.from_dict(step)
            for key, hi in _STEP_BOUNDS.items():
                if key in step and step[key] > hi:
                    raise ValueError(f"{step['name']}.{key} = {step[key]} is above {hi}")
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                path, f"config['postprocess'][{i}] = {step!r} is not a post-processing step ({e}): the file is corrupt"
            ) from None


def checked_payload(path, payload) -> dict:
    """The configuration of a loaded :meth:`AmortizedSteinGuide.save` file, after checking the whole file: format and
    version, the configuration's types and ranges, the tensors (float32 or float64, one dtype, finite), and that
    the networks the configuration describes have exactly the file's weights' names and shapes (built on the
    ``meta`` device: nothing is allocated). Raises :class:`~pyro_stein.CheckpointError` naming the file."""
    from ._io import CheckpointError, check_format_version, check_tensor_dict, config_choice, config_float, config_int

    if not isinstance(payload, dict) or payload.get("format") != "pyro_stein.AmortizedSteinGuide":
        raise CheckpointError(path, "is not a file written by AmortizedSteinGuide.save()")
    written_by = f" (written by pyro_stein {payload.get('pyro_stein_version')!s})"
    version = check_format_version(path, payload.get("format_version"), FORMAT_VERSION, written_by)
    cfg = payload.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(path, "lacks its config dict: the file is corrupt")
    config_float(path, cfg, "init_scale", 0.0, 1e6)
    config_choice(path, cfg, "amortized", (True, False))
    for key in (
        "record_graph",
        "frame_context",
        "frame_summary_squash",
        "custom_dataset_fn",
        "custom_encoder",
        "custom_create_plates",
    ):
        config_choice(path, cfg, key, (True, False), False)
    config_choice(path, cfg, "mean_features", (True, False, None), None)
    config_int(path, cfg, "context_dim", 1, _MAX_DIM)
    config_choice(path, cfg, "vectorize", ("auto", "vmap", "loop"))
    config_int(path, cfg, "num_summary_samples", 1, _MAX_DRAWS)
    if version <= 2:  # the post-processing as the options of earlier versions
        for key, lo, hi in _LEGACY_POSTPROCESS_RANGES:
            config_int(path, cfg, key, lo, hi, LEGACY_DEFAULTS[key])
    else:
        _check_postprocess(path, cfg)
    config_int(path, cfg, "laplace_evaluations", 1, 1 << 20, 50)
    config_choice(path, cfg, "whiten", (None, "laplace", "affine", "adaptive"), None)
    config_choice(path, cfg, "adaptive_frame", (True, False), False)
    reparam = cfg.get("reparam_sites", [])
    if not (isinstance(reparam, list) and all(isinstance(n, str) for n in reparam)):
        raise CheckpointError(
            path,
            f"config['reparam_sites'] = {reparam!r} is not a list of site names: the file is corrupt or was altered",
        )
    sites = cfg.get("sites")
    ok = (
        isinstance(sites, list)
        and sites
        and all(
            isinstance(x, list)
            and len(x) == 3
            and isinstance(x[0], str)
            and all(
                isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape)
                for shape in x[1:]
            )
            for x in sites
        )
    )
    if not ok:
        raise CheckpointError(
            path,
            f"config['sites'] = {sites!r} is not a list of [name, shape, unconstrained "
            "shape]: the file is corrupt or was altered",
        )
    latent_dim = sum(math.prod(x[2]) for x in sites)
    if latent_dim > _MAX_DIM:
        raise CheckpointError(path, f"its sites pack into {latent_dim} dims, more than {_MAX_DIM}: the file is corrupt")
    kinds = cfg.get("site_kinds")
    if version >= 2 and not (
        isinstance(kinds, list)
        and [k[0] for k in kinds if isinstance(k, list)] == [x[0] for x in sites]
        and all(len(k) == 3 and all(isinstance(v, str) for v in k) for k in kinds)
    ):
        raise CheckpointError(path, "config['site_kinds'] does not list the sites' supports: the file is corrupt")
    state = payload.get("state_dict")
    # a custom network's buffers may be integers (it is also registered as _user_sampler / _user_encoder)
    custom = tuple(
        f"{prefix}{part}." for part in ("sampler", "encoder") if cfg.get(part) is None for prefix in ("", "_user_")
    )
    dtype = check_tensor_dict(path, state, "state_dict", integer_ok=lambda key: key.startswith(custom))
    if version >= 2:
        saved = cfg.get("dtype")
        if dtype is not None and saved != str(dtype).replace("torch.", ""):
            raise CheckpointError(
                path, f"its tensors have dtype {dtype}, but its config says {saved!r}: the file was altered"
            )
        for key in ("init_values", "site_probes"):
            check_tensor_dict(path, payload.get(key), key)
        probes = payload["site_probes"]
        for name, shape, _ in sites:
            if name not in probes or probes[name].dim() != 1 or probes[name].numel() != math.prod(shape):
                raise CheckpointError(path, f"site_probes lacks a proper entry for site {name!r}: the file is corrupt")
    for part, net_cls, keys in (
        (
            "sampler",
            GaussianResidualSampler,
            (
                ("latent_dim", 1),
                ("noise_dim", 1),
                ("context_dim", 0),
                ("hidden_dim", 1),
                ("num_layers", 1),
                ("max_amortized_tril", 0),
            ),
        ),
        ("encoder", DeepSetEncoder, (("feature_dim", 1), ("output_dim", 1), ("hidden_dim", 1), ("num_layers", 1))),
    ):
        net = cfg.get(part)
        if net is None:  # a custom network (passed to load again), or an encoder-less guide
            if part == "sampler" and not isinstance(cfg.get("sampler_class"), str):
                raise CheckpointError(path, "config lacks both the sampler's configuration and its class name")
            continue
        if not isinstance(net, dict):
            raise CheckpointError(path, f"config[{part!r}] is a {type(net).__name__}, not a dict")
        for key, lo in keys:
            config_int(path, net, key, lo, _MAX_DIM, optional=key == "noise_dim")
        if part == "sampler":
            config_float(path, net, "init_scale", 0.0, 1e6)
            config_choice(path, net, "affine", ("auto", "full", "diag"))
            if net["latent_dim"] != latent_dim:
                raise CheckpointError(
                    path,
                    f"config['sampler']['latent_dim'] = {net['latent_dim']} but the sites pack "
                    f"into {latent_dim} dims: the file is corrupt or was altered",
                )
        else:
            config_choice(path, net, "mean_features", (True, False), False)
            # encoders saved before the squash existed were trained without it
            net["squash"] = config_choice(path, net, "squash", (True, False), False)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = {f"{part}.{k}": tuple(v.shape) for k, v in net_cls(**net).state_dict().items()}
        except (TypeError, ValueError) as e:
            raise CheckpointError(path, f"config[{part!r}] does not describe a {net_cls.__name__} ({e})") from None
        got = {k: tuple(v.shape) for k, v in state.items() if k.startswith(f"{part}.")}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
            raise CheckpointError(
                path,
                f"its weights do not match the {part} its config describes ({net}); e.g. {diff} differ: the "
                "file is corrupt or was altered",
            )
    return cfg


def save_guide(guide, path) -> None:
    """Write ``guide`` to ``path`` (see :meth:`~pyro_stein.AmortizedSteinGuide.save`)."""
    from . import __version__
    from ._io import atomic_torch_save

    if guide.prototype_trace is None:
        raise ValueError("the guide has no parameters yet: call guide.setup(*example_args) or train it before save()")
    state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    like = next(guide.sampler.parameters())
    amortization = guide._amortization
    config = {
        **guide.options.to_dict(),
        **guide.frame.to_dict(),
        "amortized": guide.amortized,
        **amortization.to_dict(),
        "mean_features": guide.mean_features,
        "frame_context": guide.per_dataset_frames,
        "frame_summary_squash": guide.encoding.squash_frame_summary if guide.encoding is not None else True,
        "sites": [[s.name, list(s.shape), list(s.unconstrained_shape)] for s in guide.sites],
        "site_kinds": [[s.name, *_site_kind(s)] for s in guide.sites],
        "sampler": getattr(guide.sampler, "config", None) if guide._user_sampler is None else None,
        "encoder": getattr(guide.encoder, "config", None) if guide.amortized and amortization.encoder is None else None,
        "sampler_class": type(guide.sampler).__name__,
        "custom_create_plates": getattr(guide, "create_plates", None) is not None,
        "dtype": str(like.dtype).replace("torch.", ""),
    }
    payload = {
        "format": "pyro_stein.AmortizedSteinGuide",
        "format_version": FORMAT_VERSION,
        "pyro_stein_version": __version__,
        "config": config,
        "init_values": {n: v.detach().clone() for n, v in guide.init_values().items()},
        "site_probes": {s.name: _site_probe(s, like.dtype, like.device).cpu() for s in guide.sites},
        "state_dict": state,
    }
    atomic_torch_save(payload, path)


def load_guide(
    cls,
    path,
    model: Callable,
    args: tuple,
    kwargs: dict,
    map_location=None,
    sampler: nn.Module | None = None,
    encoder: nn.Module | None = None,
    dataset_fn: Callable | None = None,
    create_plates: Callable | None = None,
):
    """The guide of class ``cls`` saved at ``path`` (see :meth:`~pyro_stein.AmortizedSteinGuide.load`)."""
    from ._io import CheckpointError, load_weights_only

    _refuse_guide_options(model, kwargs)
    payload = load_weights_only(path, map_location)
    cfg = checked_payload(path, payload)
    if cfg["amortized"] and cfg.get("whiten") == "laplace" and not cfg.get("frame_context"):
        raise CheckpointError(
            path,
            f"holds an amortized whiten='laplace' guide saved by pyro_stein "
            f"{payload.get('pyro_stein_version')}, whose sampler did not see the frame summary that this version "
            "passes it; retrain the guide with this version",
        )
    if cfg["sampler"] is None and sampler is None:
        raise ValueError(
            f"the guide in {str(path)!r} was saved with a custom sampler ({cfg['sampler_class']}); "
            "pass sampler=<an instance of it> to load"
        )
    if cfg["amortized"] and cfg["encoder"] is None and encoder is None:
        raise ValueError(
            f"the guide in {str(path)!r} was saved with a custom encoder; pass encoder=<an instance of it> to load"
        )
    for name, given in (("dataset_fn", dataset_fn), ("create_plates", create_plates)):
        if cfg.get(f"custom_{name}") and given is None:
            raise ValueError(
                f"the guide in {str(path)!r} was saved with a custom {name}; pass the same function as {name}= to load"
            )
    amortization = Amortization(
        dataset_fn=dataset_fn,
        encoder=encoder if cfg["amortized"] else None,
        context_dim=cfg["context_dim"],
        mean_features=bool(cfg.get("mean_features", False)) and encoder is None and cfg["amortized"],
        laplace_evaluations=cfg.get("laplace_evaluations", 50),
    )
    options = GuideOptions.from_dict(cfg)
    init_values = payload.get("init_values")
    guide = cls(
        model,
        sampler=sampler,
        init_loc_fn=None if init_values is None else _init_to_saved(init_values),
        whiten=Frame.request_of(cfg),
        amortized=amortization if cfg["amortized"] else False,
        create_plates=create_plates,
        **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
    )
    if not cfg["amortized"]:
        guide._set_amortization(amortization)  # a dataset_fn of a guide that is not amortized, for dataset_features
    guide._restore = Restore(
        path=path,
        sampler=cfg["sampler"],
        encoder=cfg["encoder"],
        sites=cfg["sites"],
        site_kinds=cfg.get("site_kinds"),
        site_probes=payload.get("site_probes"),
        frame_summary_squash=bool(cfg.get("frame_summary_squash", False)),  # as it was trained
    )
    if cfg.get("reparam_sites"):  # the funnel's sites were non-centred when it was set up
        guide._use_reparam(cfg["reparam_sites"], None)
    guide.setup(*args, **kwargs)
    own = guide.state_dict(keep_vars=True)
    for key, value in payload["state_dict"].items():
        if key in own and own[key].is_floating_point() != value.is_floating_point():
            raise CheckpointError(
                path,
                f"state_dict[{key!r}] has dtype {value.dtype}, but the guide's {key} has "
                f"dtype {own[key].dtype}: the file is corrupt or was altered",
            )
    try:
        guide.load_state_dict(payload["state_dict"])
    except RuntimeError as e:  # a custom sampler/encoder whose weights differ from the saved ones
        raise CheckpointError(
            path,
            f"its weights do not fit the guide rebuilt for this model ({str(e).strip().splitlines()[0]}): pass the "
            "sampler/encoder it was saved with",
        ) from None
    if cfg.get("whiten") == "affine":  # a frame that calibrate() gave a guide without one
        guide.frame.whiten = "affine"
    guide.frame.adaptive = bool(cfg.get("adaptive_frame", guide.frame.adaptive))
    return guide
