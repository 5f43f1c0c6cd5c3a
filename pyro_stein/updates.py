"""The optimiser step of a training driver, all or nothing, and the names of a module's parameters in Pyro's param
store (through its public API).

A step that fails part-way (an exception, ``KeyboardInterrupt`` included) or leaves non-finite values is undone
completely (:class:`UpdateTransaction`); a Ctrl-C that arrives during it is held until it has finished
(:func:`deferred_interrupt`).
"""

from __future__ import annotations

import copy
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyro
import torch
from pyro.optim import PyroOptim
from torch import Tensor, nn

__all__ = ["NonFiniteUpdateError", "UpdateTransaction", "deferred_interrupt", "register_params", "unregister_params"]


class NonFiniteUpdateError(ValueError):
    """An optimiser step made guide parameters NaN or infinite (e.g. an infinite learning rate); the step was undone."""


def _snapshot(obj):
    """A copy of nested dicts, lists and tuples with every tensor cloned (detached): later steps do not change it."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, then raise it as
    ``KeyboardInterrupt``: an optimiser step is never cut between two parameters. Only in the main thread, and
    only while SIGINT has Python's default handler (a handler of the caller's own is left alone)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def _torch_optimizer(obj):
    """The torch optimiser a PyroOptim keeps for a parameter (a scheduler's optimiser for a PyroLRScheduler)."""
    return obj if isinstance(obj, torch.optim.Optimizer) else getattr(obj, "optimizer", obj)


def _all_finite(params: Sequence[Tensor]) -> bool:
    """Whether every parameter is finite: one fused norm per parameter and one host sync; a non-finite norm (also
    from an overflow of large finite values) is confirmed element by element."""
    if not params:
        return True
    try:
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(list(params))).sum())):
            return True
    except (RuntimeError, TypeError):  # e.g. parameters on several devices
        pass
    return all(bool(torch.isfinite(p).all()) for p in params)


class UpdateTransaction:
    """The parameters' values and the optimiser's state for them, taken before an optimiser step, so that a step
    that fails part-way (an exception, ``KeyboardInterrupt`` included) or leaves non-finite values is undone
    completely: every parameter and its optimiser state (moments, step counts, a decayed learning rate) back at
    step k, and optimisers created by the failed step forgotten.

    A torch optimiser keeps what a step changes in ``state[param]`` and in its ``param_groups``' hyperparameters
    (e.g. ClippedAdam's decayed learning rate); those are copied (tensors cloned), nothing else is."""

    def __init__(self, optim: PyroOptim, params: Sequence[Tensor]):
        self.optim = optim
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]
        self.states = {}
        for p in self.params:
            obj = optim.optim_objs.get(p)
            if obj is None:
                continue
            opt = _torch_optimizer(obj)
            state = opt.state.get(p)
            self.states[
                p
            ] = (  # hyperparameters are numbers, tuples or None: replaced by a step, never changed in place
                None
                if state is None
                else {
                    k: v.clone() if isinstance(v, Tensor) else _snapshot(v) if isinstance(v, (list, dict)) else v
                    for k, v in state.items()
                },
                [dict(group) for group in opt.param_groups],
            )
        self.waiting = dict(optim._state_waiting_to_be_consumed)

    def rollback(self) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)
        for p in self.params:
            if p in self.states:
                opt = _torch_optimizer(self.optim.optim_objs[p])
                state, groups = self.states[p]
                if state is None:
                    opt.state.pop(p, None)
                else:
                    opt.state[p] = state
                for group, saved in zip(opt.param_groups, groups):
                    group.update((k, v) for k, v in saved.items() if k != "params")
            elif p in self.optim.optim_objs:
                del self.optim.optim_objs[p]
                self.optim.grad_clip.pop(p, None)
        self.optim._state_waiting_to_be_consumed.clear()
        self.optim._state_waiting_to_be_consumed.update(self.waiting)


def _optimiser_description(optim: PyroOptim, params: Sequence[Tensor]) -> str:
    """``"Adam (lr=0.001)"``: the torch optimiser behind a PyroOptim and its learning rate, for messages."""
    for p in params:
        obj = optim.optim_objs.get(p)
        if obj is None:
            continue
        opt = _torch_optimizer(obj)
        groups = getattr(opt, "param_groups", None) or [{}]
        return f"{type(opt).__name__} (lr={groups[0].get('lr', '?')})"
    ctor = getattr(optim, "pt_optim_constructor", None)
    args = optim.pt_optim_args if isinstance(getattr(optim, "pt_optim_args", None), dict) else {}
    return f"{getattr(ctor, '__name__', type(optim).__name__)} (lr={args.get('lr', '?')})"


def register_params(module: nn.Module, prefix: str) -> list[Tensor]:
    """Name ``module``'s parameters ``prefix$$$name`` in Pyro's param store (so a PyroOptim's state is keyed by
    name), replacing another tensor under that name; returns them."""
    store = pyro.get_param_store()
    params = []
    for name, p in module.named_parameters():
        full = f"{prefix}$$${name}"
        if store.param_name(p) != full or store[full] is not p:
            store[full] = p  # an unconstrained parameter: the store keeps this very tensor
        params.append(p)
    return params


def unregister_params(prefix: str) -> None:
    """Remove the names :func:`register_params` gave under ``prefix`` (the module keeps its weights)."""
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(f"{prefix}$$$")]:
        del store[name]
