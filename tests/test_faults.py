"""Faults and hostile-but-fair inputs: checkpoint files (corrupt, crafted, altered, from a newer version),
interrupted writes and updates, non-finite updates, half-precision data and argument checks.

Every case asserts the exception's type and the names in its message, and that nothing changed on failure
(files and parameters bit for bit)."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_stein.guide as guide_module
from pyro_stein import Amortization, AmortizedSteinGuide, AmortizedSVGD, CheckpointError, Dataset
from pyro_stein.distributed import DistributedAmortizedSVGD, load_checkpoint

from .conftest import DEVICE


# ------------------------------------------------------------------------------------------ models
def poisson_model(y):
    lam = pyro.sample("lam", dist.LogNormal(torch.zeros((), dtype=y.dtype, device=y.device), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Poisson(lam), obs=y)


def poisson_model_real_support(y):  # the same site name and shape, another support
    lam = pyro.sample("lam", dist.Normal(torch.zeros((), dtype=y.dtype, device=y.device), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Poisson(lam.exp()), obs=y)


def uniform_model(hi):
    def model(y):
        p = pyro.sample("lam", dist.Uniform(torch.zeros((), dtype=y.dtype, device=y.device), hi))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Poisson(p), obs=y)

    return model


def y_data():
    return torch.tensor([2.0, 4.0, 3.0, 5.0, 1.0, 0.0, 3.0], device=DEVICE)


def mean_model(n, y=None):
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), device=DEVICE), 1.0))
    s = pyro.sample("s", dist.LogNormal(torch.zeros((), device=DEVICE), 0.5))
    with pyro.plate("obs", n):
        return pyro.sample("y", dist.Normal(mu, s), obs=y)


def trained_guide(steps=3):
    """A guide after a few steps, for the fault tests' files and states. Not meant to be accurate: the end-of-run
    health checks (whose verdict on so short a run depends on the random stream) are off."""
    y = y_data()
    guide = AmortizedSteinGuide(poisson_model)
    AmortizedSVGD(poisson_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8).run(
        y, num_steps=steps, progress_bar=False, check_health=False
    )
    return guide, y


def params_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def guide_file(tmp_path):
    guide, y = trained_guide()
    path = tmp_path / "guide.pt"
    guide.save(path)
    return guide, y, path


@pytest.fixture
def dist_file(tmp_path):
    guide = AmortizedSteinGuide(poisson_model)
    svgd = DistributedAmortizedSVGD(poisson_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
    svgd.run(y_data(), num_steps=2, progress_bar=False)
    path = tmp_path / "ckpt.pt"
    svgd.save_checkpoint(path, note="x", train_s=1.5)
    return guide, svgd, path


def fresh_set_up_guide():
    return AmortizedSteinGuide(poisson_model).setup(y_data())


# ------------------------------------------------------------------------------------------ no code on load
def _touch(path):  # what a crafted checkpoint would run on load
    Path(path).write_text("ran")
    return {}


class _Crafted:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_touch, (self.path,))


@pytest.mark.parametrize("loader", ["guide", "distributed"])
def test_crafted_checkpoint_runs_no_code(tmp_path, loader):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    if loader == "guide":
        torch.save({"format": "pyro_stein.AmortizedSteinGuide", "format_version": 1, "config": _Crafted(marker)}, path)
        with pytest.raises(CheckpointError, match="evil.pt.*pickled"):
            AmortizedSteinGuide.load(path, poisson_model, y_data())
    else:
        torch.save({"guide": {}, "svgd": _Crafted(marker)}, path)
        with pytest.raises(CheckpointError, match="evil.pt.*pickled"):
            load_checkpoint(path, fresh_set_up_guide())
    assert not marker.exists(), "loading the checkpoint ran code"


def test_genuine_distributed_checkpoint_is_plain_and_restores(dist_file):
    guide, _, path = dist_file
    state = torch.load(path, weights_only=True)
    assert state["note"] == "x" and state["svgd"]["num_steps"] == 2
    g2 = fresh_set_up_guide()
    s2 = DistributedAmortizedSVGD(poisson_model, g2, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
    load_checkpoint(path, g2, s2)
    assert same(params_of(guide), params_of(g2)) and s2.num_steps == 2


def test_save_checkpoint_refuses_extra_that_needs_unpickling(tmp_path, dist_file):
    _, svgd, path = dist_file
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"extra\['cfg'\].*Namespace"):
        import argparse

        svgd.save_checkpoint(path, cfg=argparse.Namespace(a=1))
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------ corrupt files
def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not a checkpoint\n")
    elif how == "other_object":
        torch.save([1, 2, 3], path)


CORRUPTIONS = ["truncated", "garbage", "empty", "text", "other_object"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_guide_file_raises_named_error(guide_file, how):
    _, y, path = guide_file
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match="guide.pt") as info:
        AmortizedSteinGuide.load(path, poisson_model, y)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_distributed_checkpoint_raises_named_error(dist_file, how):
    _, _, path = dist_file
    _corrupt(path, how)
    guide = fresh_set_up_guide()
    before = params_of(guide)
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        load_checkpoint(path, guide)
    assert same(before, params_of(guide))


def test_newer_guide_format_version_is_refused_naming_both(guide_file):
    _, y, path = guide_file
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"guide.pt.*format_version 99.*format_version 3"):
        AmortizedSteinGuide.load(path, poisson_model, y)


def test_newer_distributed_format_version_is_refused_naming_both(dist_file):
    _, _, path = dist_file
    state = torch.load(path, weights_only=True)
    state["format_version"] = 99
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"ckpt.pt.*format_version 99.*format_version 1"):
        load_checkpoint(path, fresh_set_up_guide())


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("init_scale", "big", "init_scale"),
        ("num_summary_samples", 0, "num_summary_samples"),
        ("context_dim", -1, "context_dim"),
        ("whiten", "pca", "whiten"),
        ("postprocess", [{"name": "MALA", "steps": 2, "num_draws": 10**12}], "num_draws"),
        ("postprocess", [{"name": "Langevin", "steps": 2}], "postprocess"),
        ("amortized", "yes", "amortized"),
        ("sites", [["lam", [], "x"]], "sites"),
    ],
)
def test_guide_config_out_of_range_is_refused(guide_file, key, value, fragment):
    _, y, path = guide_file
    payload = torch.load(path, weights_only=True)
    payload["config"][key] = value
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"guide.pt.*{fragment}"):
        AmortizedSteinGuide.load(path, poisson_model, y)


def test_guide_config_of_format_2_out_of_range_is_refused(guide_file):
    """A file of format 2 states its post-processing as the options of that version: checked as before."""
    _, y, path = guide_file
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 2
    del payload["config"]["postprocess"]
    payload["config"]["correction_samples"] = 10**12
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="guide.pt.*correction_samples"):
        AmortizedSteinGuide.load(path, poisson_model, y)
    payload["config"]["correction_samples"] = 500
    payload["config"]["mcmc_steps"] = 3
    torch.save(payload, path)
    from pyro_stein import MALA

    assert AmortizedSteinGuide.load(path, poisson_model, y).postprocess == (MALA(steps=3, num_draws=500),)


def test_oversized_network_config_is_refused_before_any_network_is_built(guide_file, monkeypatch):
    _, y, path = guide_file
    payload = torch.load(path, weights_only=True)
    payload["config"]["sampler"]["hidden_dim"] = 15000
    torch.save(payload, path)

    def no_build(*a, **k):
        raise AssertionError("a network was built before the checkpoint was checked")

    from pyro_stein.construction import GuideSetUp

    monkeypatch.setattr(GuideSetUp, "networks", no_build)
    with pytest.raises(CheckpointError, match=r"guide.pt.*do not match the sampler.*15000"):
        AmortizedSteinGuide.load(path, poisson_model, y)


@pytest.mark.parametrize("loader", ["guide", "distributed"])
@pytest.mark.parametrize("bad", ["nan", "int", "half"])
def test_bad_tensors_inside_a_checkpoint_are_refused(guide_file, dist_file, loader, bad):
    path = guide_file[2] if loader == "guide" else dist_file[2]
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"] if loader == "guide" else payload["guide"]
    key = "sampler.loc"
    if bad == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif bad == "int":
        state[key] = state[key].long()
    else:
        state[key] = state[key].half()
    torch.save(payload, path)
    fragment = "NaN" if bad == "nan" else "dtype"
    with pytest.raises(CheckpointError, match=rf"{path.name}.*sampler.loc.*{fragment}"):
        if loader == "guide":
            AmortizedSteinGuide.load(path, poisson_model, y_data())
        else:
            load_checkpoint(path, fresh_set_up_guide())


def test_distributed_checkpoint_with_nan_optimiser_state_is_refused(dist_file):
    _, _, path = dist_file
    state = torch.load(path, weights_only=True)
    name = next(iter(state["svgd"]["optim"]))
    st = state["svgd"]["optim"][name]["state"][0]
    st["exp_avg"] = torch.full_like(st["exp_avg"], float("nan"))
    torch.save(state, path)
    guide = fresh_set_up_guide()
    before = params_of(guide)
    with pytest.raises(CheckpointError, match=r"ckpt.pt.*exp_avg.*NaN"):
        load_checkpoint(path, guide)
    assert same(before, params_of(guide))


# ------------------------------------------------------------------------------------------ sites
@pytest.mark.parametrize(
    "other, fragment",
    [
        (poisson_model_real_support, r"'lam' has support Real.*GreaterThan"),
        (uniform_model(2.0), r"'lam'.*Interval"),
    ],
)
def test_checkpoint_refuses_a_site_with_another_support(tmp_path, other, fragment):
    y = y_data()
    model = poisson_model if other is poisson_model_real_support else uniform_model(1.0)
    guide = AmortizedSteinGuide(model).setup(y)
    guide.save(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match=rf"g.pt.*{fragment}"):
        AmortizedSteinGuide.load(tmp_path / "g.pt", other, y)
    AmortizedSteinGuide.load(tmp_path / "g.pt", model, y)  # the model it was saved with loads


# ------------------------------------------------------------------------------------------ exact restore
def test_laplace_guide_with_custom_init_draws_the_same_after_save_load(tmp_path):
    """An amortized whiten='laplace' guide finds each dataset's frame from the initial values: a restored guide
    must start from the same ones (they come from init_loc_fn, which is code and cannot be saved)."""
    y = torch.tensor([1.0, 2.0, 3.0, 2.5], device=DEVICE)

    def model(y):
        s = pyro.sample("s", dist.LogNormal(torch.zeros((), device=DEVICE), 1.0))
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), device=DEVICE), 10.0))
        with pyro.plate("d", len(y)):
            pyro.sample("y", dist.Normal(mu, s), obs=y)

    init = pyro.infer.autoguide.init_to_value(
        values={"mu": torch.tensor(5.0, device=DEVICE), "s": torch.tensor(3.0, device=DEVICE)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyro_stein_laplace_warning())
        g1 = AmortizedSteinGuide(
            model, amortized=Amortization(laplace_evaluations=2), whiten="laplace", init_loc_fn=init
        )
        g1.setup(y)
        g1.save(tmp_path / "g.pt")
        g2 = AmortizedSteinGuide.load(tmp_path / "g.pt", model, y)
        pyro.set_rng_seed(3)
        a = g1.sample_posterior(20, y)
        pyro.set_rng_seed(3)
        b = g2.sample_posterior(20, y)
    assert all(torch.equal(a[k], b[k]) for k in a)


def pyro_stein_laplace_warning():
    from pyro_stein import LaplaceFrameWarning

    return LaplaceFrameWarning


def test_load_refuses_guide_options_as_model_keywords(guide_file):
    _, y, path = guide_file
    with pytest.raises(TypeError, match=r"guide option\(s\) \['init_loc_fn'\].*restored from the file"):
        AmortizedSteinGuide.load(path, poisson_model, y, init_loc_fn=guide_module.init_to_mean_or_feasible())


def test_load_asks_for_a_custom_dataset_fn(tmp_path):
    y = torch.randn(9, device=DEVICE)
    fn = lambda n, y=None: y[:, None]
    g1 = AmortizedSteinGuide(mean_model, amortized=Amortization(dataset_fn=fn)).setup(9, y=y)
    g1.save(tmp_path / "a.pt")
    with pytest.raises(ValueError, match="custom dataset_fn; pass the same function as dataset_fn="):
        AmortizedSteinGuide.load(tmp_path / "a.pt", mean_model, 9, y=y)
    g2 = AmortizedSteinGuide.load(tmp_path / "a.pt", mean_model, 9, y=y, dataset_fn=fn)
    pyro.set_rng_seed(2)
    a = g1.sample_posterior(5, 9, y=y)["mu"]
    pyro.set_rng_seed(2)
    assert torch.equal(a, g2.sample_posterior(5, 9, y=y)["mu"])


def test_version_1_guide_file_still_loads(guide_file):
    guide, y, path = guide_file
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 1
    for key in ("init_values", "site_probes"):
        del payload[key]
    for key in ("site_kinds", "custom_dataset_fn", "custom_create_plates", "dtype"):
        del payload["config"][key]
    torch.save(payload, path)
    g2 = AmortizedSteinGuide.load(path, poisson_model, y)
    assert same(params_of(guide), params_of(g2))


# ------------------------------------------------------------------------------------------ interrupted writes
def _half_then_interrupt(real_save, rng):
    """A torch.save that writes a random part of the file, then raises KeyboardInterrupt (a Ctrl-C mid-write)."""

    def save(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        part = data[: rng.randrange(len(data))]
        if hasattr(f, "write"):
            f.write(part)
        else:
            Path(f).write_bytes(part)
        raise KeyboardInterrupt

    return save


@pytest.mark.parametrize("writer", ["guide", "distributed"])
def test_interrupted_saves_leave_the_previous_file_readable(tmp_path, monkeypatch, writer):
    rng = random.Random(0)
    if writer == "guide":
        guide, y = trained_guide(2)
        path = tmp_path / "g.pt"
        save = lambda: guide.save(path)
        load = lambda: params_of(AmortizedSteinGuide.load(path, poisson_model, y))
    else:
        guide = AmortizedSteinGuide(poisson_model)
        svgd = DistributedAmortizedSVGD(poisson_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
        svgd.run(y_data(), num_steps=2, progress_bar=False, check_health=False)  # a file to save, not a fit
        path = tmp_path / "c.pt"
        save = lambda: svgd.save_checkpoint(path)

        def load():
            g = fresh_set_up_guide()
            load_checkpoint(path, g)
            return params_of(g)

    save()
    good = path.read_bytes()
    expected = load()
    real_save = torch.save
    unreadable = 0
    for _ in range(50):
        monkeypatch.setattr(torch, "save", _half_then_interrupt(real_save, rng))
        with torch.no_grad():  # change the guide, so that a torn write would mix old and new
            for p in guide.parameters():
                p.add_(0.01)
        with pytest.raises(KeyboardInterrupt):
            save()
        monkeypatch.setattr(torch, "save", real_save)
        unreadable += path.read_bytes() != good
    assert unreadable == 0
    assert same(expected, load())
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "temporary files were left behind"


def test_interrupted_plot_sbc_leaves_the_previous_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from pyro_stein.diagnostics import plot_sbc

    ranks = {"mu": torch.randint(0, 10, (30,))}
    path = tmp_path / "sbc.png"
    plot_sbc(ranks, 9, bins=5, path=path)
    good = path.read_bytes()
    assert good[:4] == b"\x89PNG"
    real = Figure.savefig

    def half(self, f, *args, **kwargs):
        f.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(KeyboardInterrupt):
        plot_sbc(ranks, 9, bins=5, path=path)
    monkeypatch.setattr(Figure, "savefig", real)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["sbc.png"]


# ------------------------------------------------------------------------------------------ updates
def make_svgd(lr=1e-2, optim=None):
    guide = AmortizedSteinGuide(poisson_model).setup(y_data())
    svgd = AmortizedSVGD(
        poisson_model, guide, optim or pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.99}), num_particles=8
    )
    return guide, svgd


def optim_state(svgd):
    return svgd.get_state()["optim"]


def nested_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_interrupt_inside_the_optimiser_step_undoes_it(monkeypatch):
    """A KeyboardInterrupt raised after the optimiser has moved some parameters (one torch optimiser per
    parameter in a PyroOptim): every parameter and its optimiser state must be back at step k."""
    rng = random.Random(1)
    guide, svgd = make_svgd()
    y = y_data()
    svgd.run(y, num_steps=2, progress_bar=False)
    cls = type(next(iter(svgd.optim.optim_objs.values())))
    real_step = cls.step
    torn = 0
    for _ in range(40):
        calls = {"n": 0, "stop": rng.randrange(1, len(list(guide.parameters())))}

        def step(self, *a, calls=calls, **k):
            out = real_step(self, *a, **k)
            calls["n"] += 1
            if calls["n"] == calls["stop"]:
                raise KeyboardInterrupt
            return out

        before, state, k = params_of(guide), optim_state(svgd), svgd.num_steps
        monkeypatch.setattr(cls, "step", step)
        with pytest.raises(KeyboardInterrupt):
            svgd.run(y, num_steps=3, progress_bar=False)
        monkeypatch.setattr(cls, "step", real_step)
        done = svgd.num_steps - k  # whole steps made before the interrupted one
        assert done == 0
        torn += not (same(before, params_of(guide)) and nested_equal(state, optim_state(svgd)))
        svgd.step(y)  # training goes on
    assert torn == 0


# an interrupt that lands in a weakref callback (e.g. torch's WeakIdKeyDictionary) is reported as unraisable by
# Python, and run() goes on: that trial then checks a complete run
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_random_ctrl_c_during_run_never_tears_an_update(monkeypatch):
    """Real SIGINTs at random moments of run(): afterwards the parameters are exactly those after
    svgd.num_steps whole steps of an uninterrupted run with the same seed. Each parameter's optimiser step is
    slowed down (1 ms), so that most interrupts land inside an update, between two parameters."""
    import signal
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    cls = type(pyro.optim.ClippedAdam({"lr": 1.0}).pt_optim_constructor([torch.zeros(1, requires_grad=True)]))
    real_step = cls.step

    def slow_step(self, *a, **k):
        time.sleep(0.001)
        return real_step(self, *a, **k)

    monkeypatch.setattr(cls, "step", slow_step)
    y, n = y_data(), 10
    pyro.set_rng_seed(0)
    guide, svgd = make_svgd()
    ref = [params_of(guide)]
    for _ in range(n):
        svgd.step(y)
        ref.append(params_of(guide))
    rng = random.Random(2)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    torn = interrupted = 0
    try:
        t0 = time.perf_counter()
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        make_svgd()[1].run(y, num_steps=n, progress_bar=False, calibrate=False)
        total = time.perf_counter() - t0
        for _ in range(30):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide, svgd = make_svgd()
            timer = threading.Timer(rng.uniform(0, total), os.kill, (os.getpid(), signal.SIGINT))
            try:
                timer.start()  # a short delay may fire before start() returns
                svgd.run(y, num_steps=n, progress_bar=False, calibrate=False)  # the steps alone
                timer.join()
                time.sleep(0.01)  # a signal sent just after run() returned lands here
            except KeyboardInterrupt:
                interrupted += 1
            timer.join()
            torn += not same(ref[svgd.num_steps], params_of(guide))
    finally:
        signal.signal(signal.SIGINT, old)
    assert torn == 0
    assert interrupted >= 15


@pytest.mark.parametrize("optim", ["Adam", "ClippedAdam", "SGD"])
def test_infinite_learning_rate_is_undone_and_named(optim):
    ctor = getattr(pyro.optim, optim)
    guide, svgd = make_svgd(optim=ctor({"lr": float("inf")}))
    y = y_data()
    before, k = params_of(guide), svgd.num_steps
    with pytest.raises(ValueError, match=rf"{optim} \(lr=inf\).*sampler\.loc.*undone.*learning rate") as info:
        svgd.step(y)
    assert type(info.value).__name__ == "NonFiniteUpdateError"
    assert same(before, params_of(guide)) and svgd.num_steps == k
    assert svgd.optim.optim_objs == {} and svgd.get_state()["optim"] == {}


def test_get_state_and_state_dict_are_snapshots():
    guide, svgd = make_svgd()
    y = y_data()
    svgd.run(y, num_steps=2, progress_bar=False)
    state, sd = svgd.get_state(), guide.state_dict()
    kept_state, kept_sd = optim_state(svgd), params_of(guide)
    svgd.set_state(state)
    svgd.run(y, num_steps=3, progress_bar=False)
    assert nested_equal(state["optim"], kept_state) and same(sd, kept_sd)
    assert not same(sd, params_of(guide))


# ------------------------------------------------------------------------------------------ dtypes and arguments
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where", ["setup", "step", "sample_posterior", "step_batch"])
def test_half_precision_data_is_refused_naming_the_argument(half, where):
    y = y_data()
    if where == "step_batch":
        guide = AmortizedSteinGuide(mean_model, amortized=True)
        svgd = AmortizedSVGD(mean_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4)
        good = [Dataset(5, y=torch.randn(5, device=DEVICE)) for _ in range(2)]
        svgd.step_batch(good)
        before = params_of(guide)
        with pytest.raises(TypeError, match=rf"dataset 1's argument 'y' has dtype {half}.*\.float\(\)"):
            svgd.step_batch([good[0], Dataset(5, y=torch.randn(5, device=DEVICE).to(half))])
        assert same(before, params_of(guide))
        return
    guide = AmortizedSteinGuide(poisson_model)
    svgd = AmortizedSVGD(poisson_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4)
    if where != "setup":
        svgd.step(y)
    before = params_of(guide)
    with pytest.raises(TypeError, match=rf"argument 0 has dtype {half}.*\.float\(\)"):
        if where == "setup":
            guide.setup(y.to(half))
        elif where == "step":
            svgd.step(y.to(half))
        else:
            guide.sample_posterior(5, y.to(half))
    assert same(before, params_of(guide))


def test_numpy_integer_options_are_accepted():
    import numpy as np

    guide = AmortizedSteinGuide(poisson_model, num_summary_samples=np.int64(50))
    svgd = AmortizedSVGD(poisson_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=np.int64(8))
    assert type(svgd.num_particles) is int and svgd.num_particles == 8
    assert type(guide.num_summary_samples) is int
    svgd.step(y_data())


@pytest.mark.parametrize(
    "owner, name, value, fragment",
    [
        ("guide", "num_summary_samples", 0, "guide.num_summary_samples must be"),
        ("guide", "num_summary_samples", 2.5, "guide.num_summary_samples must be"),
        ("svgd", "num_particles", 1, r"svgd.num_particles must be an int >= 2"),
        ("svgd", "num_particles", True, r"svgd.num_particles must be an int >= 2"),
        ("svgd", "leave_one_out", "no", r"svgd.leave_one_out must be True or False, got 'no'"),
        ("svgd", "precondition", "diag", r"svgd.precondition must be 'auto', 'variance' or None, got 'diag'"),
        ("svgd", "record_graph", 1, r"svgd.record_graph must be True or False, got 1"),
    ],
)
def test_options_set_after_construction_are_checked(owner, name, value, fragment):
    guide = AmortizedSteinGuide(poisson_model)
    svgd = AmortizedSVGD(poisson_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
    obj = guide if owner == "guide" else svgd
    old = getattr(obj, name)
    with pytest.raises((ValueError, TypeError), match=fragment):
        setattr(obj, name, value)
    assert getattr(obj, name) == old


def regression(X, y=None):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1], device=X.device), 1.0).to_event(1))
    with pyro.plate("obs", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)


@pytest.mark.parametrize("call", ["sample_posterior", "step", "forward"])
def test_non_amortized_guide_refuses_data_of_another_width(call):
    X3, X5 = torch.randn(10, 3, device=DEVICE), torch.randn(10, 5, device=DEVICE)
    y = torch.randn(10, device=DEVICE)
    guide = AmortizedSteinGuide(regression)
    svgd = AmortizedSVGD(regression, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=4)
    svgd.step(X3, y)
    before = params_of(guide)
    with pytest.raises(ValueError, match=r"latent site 'beta' shape \(5,\).*set up with shape \(3,\).*new guide"):
        if call == "sample_posterior":
            guide.sample_posterior(4, X5, y)
        elif call == "step":
            svgd.step(X5, y)
        else:
            guide(X5, y)
    assert same(before, params_of(guide))
    assert guide.sample_posterior(4, X3, y)["beta"].shape == (4, 3)


def test_sbc_refuses_a_nan_true_value_naming_the_site():
    from pyro_stein.diagnostics import sbc

    guide = AmortizedSteinGuide(mean_model, amortized=True).setup(5, y=torch.randn(5, device=DEVICE))
    calls = {"n": 0}

    def simulate():
        calls["n"] += 1
        truth = {
            "mu": torch.tensor(float("nan") if calls["n"] == 2 else 0.3, device=DEVICE),
            "s": torch.tensor(1.0, device=DEVICE),
        }
        return Dataset(5, y=torch.randn(5, device=DEVICE)), truth

    with pytest.raises(ValueError, match=r"true value of 'mu' for simulated dataset 1 is not finite"):
        sbc(guide, simulate, num_datasets=3, num_samples=9)


# ------------------------------------------------------------------------------------------ error hints
def _regression_with(kind):
    def model(X, y=None):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(3, dtype=X.dtype, device=X.device), 1.0).to_event(1))
        if kind == "model_error":
            raise ZeroDivisionError("the model's own bug")
        Xk = X.float() if kind == "dtype" else X
        with pyro.plate("obs", X.shape[0]):
            pyro.sample("y", dist.Normal(Xk @ beta, 1.0), obs=y)

    return model


@pytest.mark.parametrize(
    "kind, hint, not_hint",
    [
        ("dtype", r"dtype mismatch: the guide's latent values are torch.float64", "another number of features"),
        ("shape", r"shape mismatch: .*another number of features", "dtype mismatch"),
        ("model_error", r"ZeroDivisionError \(the model's own bug\).*comes from the model itself", "another number"),
    ],
)
def test_model_errors_get_a_hint_matching_their_cause(kind, hint, not_hint):
    from pyro_stein.logjoint import ModelEvaluationError, ModelLogDensity

    X = torch.randn(6, 3, device=DEVICE, dtype=torch.float64)
    y = torch.randn(6, device=DEVICE, dtype=torch.float64)
    good = _regression_with("shape")
    guide = AmortizedSteinGuide(good).setup(X, y)
    ld = ModelLogDensity(_regression_with(kind), guide.sites, vectorize="vmap")
    u = torch.randn(4, guide.latent_dim, dtype=torch.float64, device=DEVICE)
    args = (torch.cat([X, X], -1), y) if kind == "shape" else (X, y)
    with pytest.raises(ModelEvaluationError, match=hint) as info:
        ld.log_density(u, args)
    assert not_hint not in str(info.value)


@pytest.mark.parametrize("build", ["sampler", "encoder", "polish", "rbm"])
def test_numpy_integers_accepted_by_every_integer_option(build, tmp_path):
    """numpy integers are accepted everywhere an int is, and stored as plain ints (a checkpoint of a guide built
    with them must load with weights_only=True)."""
    import numpy as np

    from pyro_stein.mcmc import mala_polish
    from pyro_stein.nn import DeepSetEncoder, GaussianResidualSampler

    if build == "sampler":
        net = GaussianResidualSampler(
            np.int64(3), context_dim=np.int64(2), hidden_dim=np.int64(8), num_layers=np.int64(1)
        )
        assert all(type(v) is int for k, v in net.config.items() if k in ("latent_dim", "context_dim", "hidden_dim"))
        torch.save(net.config, tmp_path / "c.pt")
        torch.load(tmp_path / "c.pt", weights_only=True)
    elif build == "encoder":
        net = DeepSetEncoder(np.int64(2), output_dim=np.int64(5), hidden_dim=np.int64(8), num_layers=np.int64(1))
        assert all(type(v) is int for k, v in net.config.items() if k not in ("mean_features", "squash"))
    elif build == "polish":
        z = torch.randn(10, 2, device=DEVICE)
        _, rates = mala_polish(z, lambda x: (-0.5 * x.pow(2).sum(-1), -x), np.int64(2))
        assert rates.shape == (2,)
    else:
        from pyro_stein import GaussianBernoulliRBM

        rbm = GaussianBernoulliRBM(np.int64(3), np.int64(2))
        assert type(rbm.num_visible) is int and rbm.sample(np.int64(4)).shape == (4, 3)


# ------------------------------------------------------------------------------------------ datasets
def test_one_row_amortized_dataset_keeps_its_covariates():
    def model(X, y=None):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2, device=X.device), 1.0).to_event(1))
        with pyro.plate("obs", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)

    X, y = torch.randn(10, 2, device=DEVICE), torch.randn(10, device=DEVICE)
    guide = AmortizedSteinGuide(model, amortized=True).setup(X, y)
    X1, y1 = torch.tensor([[1.0, 2.0]], device=DEVICE), torch.tensor([0.5], device=DEVICE)
    feats = guide.dataset_features(X1, y1).features
    assert torch.equal(feats, torch.tensor([[[0.5, 1.0, 2.0]]], device=DEVICE))
    assert guide.sample_posterior(3, X1, y1)["beta"].shape == (3, 2)


def test_ragged_batch_is_encoded_in_groups_not_padded_to_the_largest(monkeypatch):
    guide = AmortizedSteinGuide(mean_model, amortized=True).setup(5, y=torch.randn(5, device=DEVICE))
    sizes = [10, 5000, 12, 9]
    datasets = [Dataset(n, y=torch.randn(n, device=DEVICE)) for n in sizes]
    seen = []
    real = type(guide.encoder).forward

    def spy(self, features, mask=None):
        seen.append(tuple(features.shape))
        return real(self, features, mask)

    monkeypatch.setattr(type(guide.encoder), "forward", spy)
    grouped = guide.contexts(datasets)
    assert max(b * n for b, n, _ in seen) == 5000, f"padded far beyond the real rows: {seen}"
    from pyro_stein.data import collate_features

    like = next(guide.sampler.parameters())
    padded = real(guide.encoder, *collate_features([guide.encoding.features(d, like) for d in datasets])[:2])
    assert torch.allclose(grouped, padded, rtol=1e-6, atol=1e-8)


def test_kernel_with_nan_second_derivative_warns_once():
    import math

    from pyro_stein import KernelWarning, RBFKernel

    class BadKernel(RBFKernel):
        def profile(self, u):
            f, df, _ = super().profile(u)
            return f, df, torch.full_like(u, float("nan"))

    guide = AmortizedSteinGuide(poisson_model)
    svgd = AmortizedSVGD(poisson_model, guide, pyro.optim.Adam({"lr": 1e-2}), kernel=BadKernel(), num_particles=8)
    with pytest.warns(KernelWarning, match=r"step 0: .*BadKernel.*d2k \(second derivative\).*profile\(\)"):
        value = svgd.step(y_data())
    assert math.isnan(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(svgd.step(y_data()))  # warned once


# ------------------------------------------------------------------------------------------ graph recording
def _tensor_bounded_model(y):
    p = pyro.sample("p", dist.Uniform(torch.tensor(0.0, device=y.device), torch.tensor(5.0, device=y.device)))
    with pyro.plate("d", len(y)):
        pyro.sample("y", dist.Poisson(p), obs=y)


def test_recording_works_for_a_tensor_bounded_prior():
    y = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    guide = AmortizedSteinGuide(_tensor_bounded_model).setup(y)
    ld = guide.log_density
    u = torch.randn(50, 1, device=DEVICE)
    for _ in range(25):
        got = ld.log_density_and_score(u, (y,), {})
    assert ld.graphs.status == "replaying", ld.graphs.status
    from pyro_stein.logjoint import ModelLogDensity

    want = ModelLogDensity(_tensor_bounded_model, guide.sites).log_density_and_score(u, (y,), {})
    assert all(torch.allclose(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("cause", ["reads_values", "other"])
def test_a_failed_recording_says_its_real_cause(cause, monkeypatch):
    from pyro_stein import graphs

    y = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    if cause == "reads_values":

        def model(y):
            p = pyro.sample("p", dist.Normal(torch.tensor(0.0, device=y.device), 1.0))
            if y.sum() > 0:
                pyro.sample("y", dist.Poisson(p.exp()).expand([len(y)]).to_event(1), obs=y)
    else:
        model = poisson_model

        def broken(*a, **k):
            raise RuntimeError("out of coffee")

        monkeypatch.setattr(graphs._SharedRecording, "__init__", broken)
    guide = AmortizedSteinGuide(model).setup(y)
    u = torch.randn(50, 1, device=DEVICE)
    for _ in range(25):
        guide.log_density.log_density_and_score(u, (y,), {})
    status = guide.log_density.graphs.status
    if cause == "reads_values":
        assert status.startswith("off: recording failed") and "reads its data's values" in status
    else:
        assert "RuntimeError: out of coffee" in status and "data's values" not in status


def test_custom_sampler_with_an_integer_buffer_round_trips(tmp_path):
    from pyro_stein.nn import GaussianResidualSampler

    class Counting(GaussianResidualSampler):
        def __init__(self):
            super().__init__(1, init_loc=torch.zeros(1, device=DEVICE))
            self.register_buffer("calls", torch.tensor(0, device=DEVICE))

    y = y_data()
    g1 = AmortizedSteinGuide(poisson_model, sampler=Counting()).setup(y)
    g1.sampler.calls.fill_(7)
    g1.save(tmp_path / "g.pt")
    g2 = AmortizedSteinGuide.load(tmp_path / "g.pt", poisson_model, y, sampler=Counting())
    assert int(g2.sampler.calls) == 7 and same(params_of(g1), params_of(g2))
    payload = torch.load(tmp_path / "g.pt", weights_only=True)
    payload["state_dict"]["sampler.loc"] = payload["state_dict"]["sampler.loc"].long()
    torch.save(payload, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match=r"g.pt.*sampler.loc.*dtype torch.int64"):
        AmortizedSteinGuide.load(tmp_path / "g.pt", poisson_model, y, sampler=Counting())


# ------------------------------------------------------------------------------------------ memory
def _chunking_case():
    """A regression on 200 rows (X: 600 elements), its guide's sites and 103 particles."""
    X = torch.randn(200, 3, device=DEVICE)
    y = torch.randn(200, device=DEVICE)
    guide = AmortizedSteinGuide(regression).setup(X, y)
    return (X, y), guide.sites, torch.randn(103, 3, device=DEVICE)


def _rows_per_call(ld, u, args):
    """``ld.log_density_and_score(u, args)`` and the number of particles each model evaluation took."""
    seen = []
    real = ld._map

    def spy(fn, v):
        seen.append(v.shape[0])
        return real(fn, v)

    ld._map = spy
    return ld.log_density_and_score(u, args), seen


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_many_particles_on_large_data_are_evaluated_in_chunks(vectorize):
    from pyro_stein.logjoint import ModelLogDensity

    args, sites, u = _chunking_case()
    whole = ModelLogDensity(regression, sites, vectorize).log_density_and_score(u, args)
    ld = ModelLogDensity(regression, sites, vectorize)
    ld.chunk_elements = 600 * 10  # 10 particles x 600 elements (X)
    (lp, score), seen = _rows_per_call(ld, u, args)
    assert max(seen) <= 10 and lp.shape == (103,) and score.shape == (103, 3)
    assert torch.allclose(lp, whole[0]) and torch.allclose(score, whole[1])


def test_many_particles_on_cpu_are_evaluated_in_cache_sized_chunks():
    """On CPU, particles beyond the cache budget go in pieces of about cpu_chunk_min_rows rows or more; on another
    device only the memory budget splits them. The values are those of one call."""
    from pyro_stein.logjoint import ModelLogDensity

    args, sites, u = _chunking_case()
    whole = ModelLogDensity(regression, sites, "vmap")
    whole.cpu_chunk_elements = 1 << 40
    expected = whole.log_density_and_score(u, args)
    ld = ModelLogDensity(regression, sites, "vmap")
    ld.cpu_chunk_elements, ld.cpu_chunk_min_rows = 600 * 10, 20  # 10 particles x 600 elements (X), at least 20
    (lp, score), seen = _rows_per_call(ld, u, args)
    if DEVICE.type == "cpu":  # 10 rows fit the budget; pieces of (nearly) equal size of at most 20 rows
        assert 10 < max(seen) <= 20, seen
    else:
        assert seen == [103], seen
    assert torch.allclose(lp, expected[0]) and torch.allclose(score, expected[1])


GLOBAL_SCALE = torch.tensor(1.0)


def _global_reading_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype, device=y.device), 1.0))
    with pyro.plate("d", len(y)):
        pyro.sample("y", dist.Normal(mu, GLOBAL_SCALE.to(y)), obs=y)


@pytest.mark.parametrize("shared", [False, True])
def test_a_reassigned_global_is_seen_by_the_next_recorded_evaluation(shared):
    global GLOBAL_SCALE
    from pyro_stein.logjoint import ModelLogDensity

    y = torch.tensor([0.5, 1.5, -0.3], device=DEVICE)
    guide = AmortizedSteinGuide(_global_reading_model).setup(y)
    ld = ModelLogDensity(_global_reading_model, guide.sites, record_graph=True, share_across_data=shared)
    u = torch.randn(20, 1, device=DEVICE)
    old = GLOBAL_SCALE
    try:
        for _ in range(25):
            ld.log_density_and_score(u, (y,), {})
        assert ld.graphs.status == "replaying", ld.graphs.status
        GLOBAL_SCALE = torch.tensor(3.0)
        got = ld.log_density_and_score(u, (y,), {})
        want = ModelLogDensity(_global_reading_model, guide.sites).log_density_and_score(u, (y,), {})
        assert torch.allclose(got[0], want[0]) and torch.allclose(got[1], want[1])
    finally:
        GLOBAL_SCALE = old
