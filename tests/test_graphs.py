"""Recorded log densities (pyro_stein.graphs): the replay must give the model's own values, and the
bookkeeping must record only when it is safe and re-record when the data change."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_stein import HMC, AmortizedSteinGuide, AmortizedSVGD, NonFiniteLogJointError
from pyro_stein.graphs import GraphedLogDensity, RecordedGraphWarning
from pyro_stein.logjoint import ModelLogDensity, latent_sites_from_trace

from .conftest import DEVICE, tensor


def logreg(X, y=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def hierarchical(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    with pyro.plate("groups", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def masked(y):
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=y > 0)


def selected_rows(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    Xp = X[y > 0]  # boolean indexing of the data: traced fine, but waits for the device (no CUDA graph)
    with pyro.plate("data", Xp.shape[0]):
        pyro.sample("y", dist.Normal(Xp @ w, 1.0), obs=Xp.new_ones(Xp.shape[0]))


def branching(X, y=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    scale = 1.0 if float(y.sum()) > 0 else 2.0  # Python control flow on data: cannot be recorded
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, scale), obs=y)


def _data(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = tensor(torch.randn(n, d, generator=g))
    return X, tensor(torch.randint(0, 2, (n,), generator=g).double())


def _log_density(model, *args, **kwargs):
    tr = poutine.trace(model).get_trace(*args, **kwargs)
    return ModelLogDensity(model, latent_sites_from_trace(tr), record_graph=True)


def _evaluate(ld, u, args, kwargs, times):
    out = None
    for _ in range(times):
        out = ld.log_density_and_score(u, args, kwargs)
    return out


def _assert_close(got, want, what):
    # float64 by default: the replay runs the same operations, so only rounding (summation order) differs
    tol = 1e-9 if want[0].dtype == torch.float64 else 1e-4
    for g, w, name in zip(got, want, ("log density", "score")):
        scale = float(w.abs().max())
        assert torch.allclose(g, w, rtol=tol, atol=tol * scale), (
            f"{what}: replayed {name} differs from the model's by {float((g - w).abs().max()):.3g}"
        )


def _cases():
    X, y = _data()
    big_X, big_y = _data(n=5000, d=2, seed=1)  # above the CPU threshold of the custom Bernoulli log-prob Function
    sigma = tensor(torch.linspace(0.5, 2.0, 8))
    return {
        "logreg": (logreg, (X,), {"y": y}),
        "logreg-fused-bernoulli": (logreg, (big_X,), {"y": big_y}),
        "hierarchical": (hierarchical, (sigma,), {"y": tensor(torch.linspace(-3.0, 3.0, 8))}),
        "obs_mask": (masked, (tensor([1.0, -1.0, 2.0, -0.5]),), {}),
    }


@pytest.mark.parametrize("case", ["logreg", "logreg-fused-bernoulli", "hierarchical", "obs_mask"])
def test_replay_equals_the_model(case):
    model, args, kwargs = _cases()[case]
    ld = _log_density(model, *args, **kwargs)
    g = torch.Generator().manual_seed(1)
    u = tensor(torch.randn(16, ld.dim, generator=g))
    _evaluate(ld, u, args, kwargs, ld.graphs.min_calls)
    assert ld.graphs.status == "replaying", ld.graphs.status
    for shift in (0.0, 0.3):  # new particles through the same recording
        got = ld.log_density_and_score(u + shift, args, kwargs)
        reference = ModelLogDensity(model, ld.sites).log_density_and_score(u + shift, args, kwargs)
        _assert_close(got, reference, f"{case}, particles shifted by {shift}")


def test_records_only_after_min_calls_and_then_skips_the_model():
    calls = []

    def counted(X, y=None):
        calls.append(1)
        logreg(X, y)

    X, y = _data()
    ld = _log_density(counted, X, y=y)
    u = tensor(torch.zeros(4, ld.dim))
    for i in range(ld.graphs.min_calls - 1):
        ld.log_density_and_score(u, (X,), {"y": y})
        assert ld.graphs.status == "waiting", f"recorded after {i + 1} calls"
    ld.log_density_and_score(u, (X,), {"y": y})
    assert ld.graphs.status == "replaying"
    before = len(calls)
    ld.log_density_and_score(u, (X,), {"y": y})
    assert len(calls) == before, "a replay ran the model's Python"


def test_in_place_change_of_the_data_is_seen():
    X, y = _data()
    ld = _log_density(logreg, X, y=y)
    u = tensor(torch.randn(8, ld.dim, generator=torch.Generator().manual_seed(2)))
    _evaluate(ld, u, (X,), {"y": y}, ld.graphs.min_calls)
    assert ld.graphs.status == "replaying"
    y.copy_(1.0 - y)  # in place: the recording no longer matches (version changed); the values must follow
    reference = ModelLogDensity(logreg, ld.sites).log_density_and_score(u, (X,), {"y": y})
    for _ in range(ld.graphs.min_calls + 1):  # before and after the second recording
        _assert_close(ld.log_density_and_score(u, (X,), {"y": y}), reference, "after y changed in place")
    assert ld.graphs.num_recordings == 2 and ld.graphs.status == "replaying"


def test_new_data_every_call_switches_recording_off():
    X, y = _data()
    ld = _log_density(logreg, X, y=y)
    ld.graphs.min_calls = 1
    u = tensor(torch.zeros(4, ld.dim))
    for _ in range(ld.graphs.max_recordings + 1):
        ld.log_density_and_score(u, (X.clone(),), {"y": y})
    assert ld.graphs.status.startswith("off: the arguments changed"), ld.graphs.status


@pytest.mark.parametrize(
    "model, args, kwargs, reason",
    [
        (branching, _data(), {}, "recording failed"),
        (logreg, (_data()[0],), {"y": _data()[1].tolist()}, "an argument is neither a dense tensor nor a plain value"),
    ],
    ids=["data-dependent-branch", "list-of-floats-is-plain"],
)
def test_unrecordable_models_fall_back_to_the_model(model, args, kwargs, reason):
    if isinstance(kwargs.get("y"), list):  # a list of numbers is plain: recorded; an arbitrary object is not
        kwargs = {"y": args[0].new_tensor(kwargs["y"])}
        args = (args[0], object())

        def model(X, extra, y=None):  # noqa: F811 - a model taking an opaque object
            logreg(X, y)

    ld = _log_density(model, *args, **kwargs)
    u = tensor(torch.randn(4, ld.dim, generator=torch.Generator().manual_seed(3)))
    got = _evaluate(ld, u, args, kwargs, ld.graphs.min_calls + 1)
    assert ld.graphs.status.startswith(f"off: {reason}"), ld.graphs.status
    reference = ModelLogDensity(model, ld.sites).log_density_and_score(u, args, kwargs)
    _assert_close(got, reference, "fallback")


def test_disagreeing_recording_is_not_used():
    graphs = GraphedLogDensity(lambda r, args, kwargs: -(r**2).sum(), min_calls=1)
    u = tensor(torch.ones(3, 2))
    wrong = (tensor(torch.zeros(3)), tensor(torch.zeros(3, 2)))  # what the "model" claims
    got = graphs(u, (), {}, lambda: wrong)
    assert graphs.status == "off: the recorded graph disagreed with the model's own evaluation"
    assert got is wrong


def test_non_finite_values_are_still_caught_when_replaying():
    def model(y):
        s = pyro.sample("s", dist.LogNormal(y.new_tensor(0.0), 1.0))
        pyro.sample("y", dist.Normal(0.0, 1.0 / (s - 1.0).abs()), obs=y)  # infinite scale at s = 1

    y = tensor(0.5)
    ld = _log_density(model, y)
    u = tensor(torch.linspace(0.5, 1.5, 5)).unsqueeze(-1)
    _evaluate(ld, u, (y,), {}, ld.graphs.min_calls)
    assert ld.graphs.status == "replaying"
    with pytest.raises(NonFiniteLogJointError, match="'y'"):
        ld.log_density_and_score(u - 1.0, (y,), {})  # the replayed shape; row 2 is u = 0, i.e. s = 1


def test_driver_records_and_can_be_told_not_to():
    X, y = _data()
    pyro.set_rng_seed(0)
    svgd = AmortizedSVGD(logreg, AmortizedSteinGuide(logreg), pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
    for _ in range(25):
        svgd.step(X, y)
    assert svgd._log_density.graphs.status == "replaying"
    pyro.clear_param_store()
    off = AmortizedSVGD(
        logreg, AmortizedSteinGuide(logreg), pyro.optim.Adam({"lr": 1e-2}), num_particles=8, record_graph=False
    )
    off.step(X, y)
    assert off._log_density.graphs is None
    with pytest.raises(TypeError, match="record_graph must be True or False"):
        AmortizedSVGD(logreg, AmortizedSteinGuide(logreg), pyro.optim.Adam({"lr": 1e-2}), record_graph="yes")


@pytest.mark.gpu
def test_cuda_graph_replay_equals_the_model_and_survives_a_failed_capture():
    if DEVICE.type != "cuda":
        pytest.skip("run the suite with PYRO_STEIN_DEVICE=cuda")
    for case in ("logreg", "hierarchical"):
        model, args, kwargs = _cases()[case]
        ld = _log_density(model, *args, **kwargs)
        u = tensor(torch.randn(16, ld.dim, generator=torch.Generator().manual_seed(1)))
        _evaluate(ld, u, args, kwargs, ld.graphs.min_calls)
        assert ld.graphs.status == "replaying" and ld.graphs._recording.graph is not None
        reference = ModelLogDensity(model, ld.sites).log_density_and_score(u + 0.1, args, kwargs)
        _assert_close(ld.log_density_and_score(u + 0.1, args, kwargs), reference, f"{case} on the GPU")
    X, y = _data()
    ld = _log_density(branching, X, y)
    _evaluate(ld, tensor(torch.zeros(4, ld.dim)), (X, y), {}, ld.graphs.min_calls)
    assert ld.graphs.status.startswith("off: recording failed")
    cov = tensor([[2.0, 0.5], [0.5, 1.0]])

    def correlated():  # the Cholesky factor is computed (and checked, which waits for the device) in the model
        pyro.sample("x", dist.MultivariateNormal(cov.new_zeros(2), covariance_matrix=cov))

    ld = _log_density(correlated)
    u = tensor(torch.randn(8, 2, generator=torch.Generator().manual_seed(6)))
    _evaluate(ld, u, (), {}, ld.graphs.min_calls)
    assert ld.graphs.status.startswith("replaying"), ld.graphs.status
    _assert_close(
        ld.log_density_and_score(u, (), {}),
        ModelLogDensity(correlated, ld.sites).log_density_and_score(u),
        "MVN on the GPU",
    )
    # the device and its random-number generator still work after the failed and the screened recordings
    assert torch.randn(1000, device=DEVICE).abs().max() > 0


def test_screening_finds_value_dependent_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyro_stein.graphs import _screen

    x = tensor(torch.randn(6, generator=torch.Generator().manual_seed(5)))
    mask = x > 0
    assert _screen(make_fx(lambda v: (v * 2.0).exp().sum())(x), x) == (None, None)
    assert _screen(make_fx(lambda v: v[mask].sum())(x), x)[0] == "aten::index with a boolean mask"
    assert _screen(make_fx(lambda v: torch.masked_select(v, mask).sum())(x), x)[0] == "aten::masked_select"


def test_disagreement_is_found_next_to_an_infinite_log_density():
    def single(r, args, kwargs):  # -inf where r[0] == 0, else -|r|^2
        return torch.where(r[0] == 0, torch.full_like(r[0], -torch.inf), -(r**2).sum())

    graphs = GraphedLogDensity(single, min_calls=1)
    u = tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    true_score = torch.where(u[:, :1] == 0, torch.zeros_like(u), -2 * u)
    wrong = (tensor([-torch.inf, -5.0, -2.0]), true_score)  # row 1 is wrong (-2 is right); row 0 is -inf in both
    graphs(u, (), {}, lambda: wrong)
    assert graphs.status == "off: the recorded graph disagreed with the model's own evaluation", graphs.status


def test_shapes_that_depend_on_data_values_are_not_recorded():
    """A write that bypasses the version counter (a NumPy view) must not meet a frozen selection size."""
    X, y = _data()
    ld = _log_density(selected_rows, X, y)
    u = tensor(torch.randn(4, ld.dim, generator=torch.Generator().manual_seed(4)))
    got = _evaluate(ld, u, (X, y), {}, ld.graphs.min_calls)
    assert ld.graphs.status == (
        "off: the model's shapes depend on the data's values (aten::index with a boolean mask); "
        "a recording would freeze them"
    )
    _assert_close(
        got, ModelLogDensity(selected_rows, ld.sites).log_density_and_score(u, (X, y), {}), "boolean-mask model"
    )


def test_replayed_values_carry_no_gradient_to_tensors_the_model_reads():
    X, y = _data()
    weight = tensor(torch.ones(X.shape[-1])).requires_grad_(True)  # e.g. a parameter the user fits elsewhere

    def weighted(X, weight, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=X @ (w * weight)), obs=y)

    ld = _log_density(weighted, X, weight, y)
    u = tensor(torch.randn(4, ld.dim, generator=torch.Generator().manual_seed(7)))
    lp, score = _evaluate(ld, u, (X, weight, y), {}, ld.graphs.min_calls + 1)
    assert ld.graphs.status == "replaying"
    assert not lp.requires_grad and not score.requires_grad and weight.grad is None


def test_models_with_parameter_sites_are_not_recorded():
    X, y = _data()

    def with_param(X, y):
        s = pyro.param("s", X.new_tensor(1.0))
        w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), s).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    ld = _log_density(with_param, X, y)
    _evaluate(ld, tensor(torch.zeros(4, ld.dim)), (X, y), {}, ld.graphs.min_calls)
    assert (
        ld.graphs.status
        == "off: the model has pyro.param/pyro.module sites, whose values can be replaced between calls"
    )


def test_plain_values_are_told_apart_by_type_and_sign():
    def signed(y, c):
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
        pyro.sample("y", dist.Normal(mu * math.copysign(1.0, c) + (2.0 if c is True else 0.0), 1.0), obs=y)

    y = tensor(1.5)
    ld = _log_density(signed, y, 0.0)
    u = tensor(torch.randn(4, 1, generator=torch.Generator().manual_seed(8)))
    _evaluate(ld, u, (y, 0.0), {}, ld.graphs.min_calls)
    assert ld.graphs.status == "replaying"
    plain = ModelLogDensity(signed, ld.sites)
    for c in (-0.0, 1, True, 1.0):
        _assert_close(ld.log_density_and_score(u, (y, c), {}), plain.log_density_and_score(u, (y, c)), f"c = {c!r}")


def test_state_outside_the_arguments_is_caught_by_the_periodic_check():
    X, y = _data()
    state = {"scale": 0.1}  # e.g. an annealing factor changed between steps

    def annealed(X, y):
        with poutine.scale(scale=state["scale"]):
            logreg(X, y)

    ld = _log_density(annealed, X, y=y)
    u = tensor(torch.randn(4, ld.dim, generator=torch.Generator().manual_seed(9)))
    _evaluate(ld, u, (X,), {"y": y}, ld.graphs.min_calls)
    assert ld.graphs.status == "replaying"
    state["scale"] = 1.0
    with pytest.warns(RecordedGraphWarning, match="reads state other than its latent values and arguments"):
        _evaluate(ld, u, (X,), {"y": y}, ld.graphs.verify_every)
    assert ld.graphs.status == "off: a replay stopped matching the model's own evaluation"
    reference = ModelLogDensity(annealed, ld.sites).log_density_and_score(u, (X,), {"y": y})
    _assert_close(ld.log_density_and_score(u, (X,), {"y": y}), reference, "after the switch-off")


def test_a_replay_that_raises_gives_the_models_own_result():
    X, y = _data()
    ld = _log_density(logreg, X, y=y)
    u = tensor(torch.randn(4, ld.dim, generator=torch.Generator().manual_seed(10)))
    _evaluate(ld, u, (X,), {"y": y}, ld.graphs.min_calls)

    def broken(v):
        raise RuntimeError("planted")

    ld.graphs._recording.traced = broken
    got = ld.log_density_and_score(u, (X,), {"y": y})
    assert ld.graphs.status == "off: a replay raised RuntimeError"
    _assert_close(
        got,
        ModelLogDensity(logreg, ld.sites).log_density_and_score(u, (X,), {"y": y}),
        "fallback after a raising replay",
    )


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["sparse-csr", "inference-mode"])
def test_unusual_argument_tensors_switch_recording_off_without_failing(kind):
    X, y = _data()
    if kind == "sparse-csr":
        extra = X.to_sparse_csr()
    else:
        with torch.inference_mode():
            extra = X.clone()

    def model(X, extra, y):
        logreg(X, y)

    ld = _log_density(model, X, extra, y)
    u = tensor(torch.zeros(4, ld.dim))
    got = _evaluate(ld, u, (X, extra, y), {}, 2)
    assert ld.graphs.status.startswith("off: an argument is neither a dense tensor nor a plain value")
    _assert_close(got, ModelLogDensity(model, ld.sites).log_density_and_score(u, (X, extra, y)), kind)


def test_a_dropped_log_density_is_freed_without_the_garbage_collector():
    """The recording callbacks hold the log density weakly. (Once a trace exists, torch.fx's tracer keeps
    frames that refer to it until the garbage collector runs.)"""
    import weakref

    X, y = _data()
    ld = _log_density(logreg, X, y=y)
    _evaluate(ld, tensor(torch.zeros(4, ld.dim)), (X,), {"y": y}, 2)  # waiting: holds the pending arguments
    ref = weakref.ref(ld)
    del ld
    assert ref() is None, "the log density is kept alive by a reference cycle"


# ---- recordings shared across data of the same shapes (what the guide uses when it draws for new datasets) ----
def _shared_log_density(model, *args, **kwargs):
    tr = poutine.trace(model).get_trace(*args, **kwargs)
    return ModelLogDensity(model, latent_sites_from_trace(tr), record_graph=True, share_across_data=True)


def _hier_data(seed, groups=8):
    g = torch.Generator().manual_seed(seed)
    return (tensor(0.5 + 2 * torch.rand(groups, generator=g)),), {"y": tensor(3 * torch.randn(groups, generator=g))}


@pytest.mark.parametrize("case", ["logreg", "hierarchical", "obs_mask"])
def test_shared_recording_equals_the_model_on_new_data_of_the_same_shape(case):
    model, args, kwargs = _cases()[case]
    ld = _shared_log_density(model, *args, **kwargs)
    u = tensor(torch.randn(16, ld.dim, generator=torch.Generator().manual_seed(11)))
    _evaluate(ld, u, args, kwargs, ld.graphs.min_calls)
    assert ld.graphs.status == "replaying" and ld.graphs.num_recordings == 1, ld.graphs.status
    plain = ModelLogDensity(model, ld.sites)
    for seed in (1, 2):  # new data, same shapes: the same recording, the new data's values
        g = torch.Generator().manual_seed(seed)
        new_args = tuple(a + 0.5 * torch.rand(a.shape, generator=g).to(a) for a in args)
        new_kwargs = {k: v.flip(0) for k, v in kwargs.items()}
        got = ld.log_density_and_score(u, new_args, new_kwargs)
        _assert_close(got, plain.log_density_and_score(u, new_args, new_kwargs), f"{case}, new data (seed {seed})")
    assert ld.graphs.num_recordings == 1, "new data of the recorded shape were recorded again"


def test_shared_recordings_are_kept_per_shape_least_recently_used_first():
    args, kwargs = _hier_data(0)
    ld = _shared_log_density(hierarchical, *args, **kwargs)
    ld.graphs.max_recordings = 2
    plain = ModelLogDensity(hierarchical, ld.sites)
    u = tensor(torch.randn(6, ld.dim, generator=torch.Generator().manual_seed(12)))
    for n in (6, 5, 6, 3):  # 6 and 5 particles recorded; 6 used again; 3 then pushes out 5, not 6
        for _ in range(ld.graphs.min_calls):
            got = ld.log_density_and_score(u[:n], args, kwargs)
        _assert_close(got, plain.log_density_and_score(u[:n], args, kwargs), f"{n} particles")
    kept = sorted(key[0][1][0] for key in ld.graphs._shared)  # the particle counts of the kept recordings
    assert kept == [3, 6], f"kept {kept}: the least recently used shape (5 particles) should have gone"
    assert ld.graphs.num_recordings == 3


@pytest.mark.parametrize("replayed", [False, True])
def test_recording_stops_when_shapes_rarely_repeat(replayed):
    """A recording dropped before ``min_calls`` replays cost more than it saved; after ``max_recordings`` such drops
    recording is switched off (and the model's own evaluation is used). Recordings that were replayed enough before
    being dropped do not count."""
    args, kwargs = _hier_data(0)
    ld = _shared_log_density(hierarchical, *args, **kwargs)
    graphs = ld.graphs
    graphs.max_recordings, graphs.min_calls = 2, 3
    plain = ModelLogDensity(hierarchical, ld.sites)
    u = tensor(torch.randn(8, ld.dim, generator=torch.Generator().manual_seed(13)))
    for n in (2, 3, 4, 5, 6):  # a new particle count each time: recorded at its 3rd call, dropped two shapes later
        for _ in range(graphs.min_calls * (2 if replayed else 1)):
            got = ld.log_density_and_score(u[:n], args, kwargs)
        _assert_close(got, plain.log_density_and_score(u[:n], args, kwargs), f"{n} particles")
    if replayed:
        assert graphs.status == "replaying" and graphs.num_wasted == 0, (graphs.status, graphs.num_wasted)
        assert graphs.num_recordings == 5
    else:  # 2 and 3 were dropped unreplayed when 4 and 5 were recorded: off after the 4th recording
        assert graphs.status.startswith("off: the arguments' shapes rarely repeat"), graphs.status
        assert graphs.num_recordings == 4 and not graphs._shared, "recording went on after it was switched off"


def test_counts_of_a_shape_need_not_be_consecutive():
    (sigma,), kw = _hier_data(0)
    ld = _shared_log_density(hierarchical, sigma, **kw)
    u = tensor(torch.zeros(4, ld.dim))
    other = tensor(torch.zeros(5, ld.dim))
    for i in range(ld.graphs.min_calls - 1):  # another shape in between every call
        ld.log_density_and_score(u, *_hier_data(i))
        ld.log_density_and_score(other, *_hier_data(i))
        assert ld.graphs.status == "waiting", f"recorded after {i + 1} calls of each shape"
    ld.log_density_and_score(u, *_hier_data(99))
    assert ld.graphs.status == "replaying" and ld.graphs.num_recordings == 1


def test_shared_recording_refuses_models_whose_python_reads_the_data():
    X, y = _data()
    ld = _shared_log_density(branching, X, y)
    u = tensor(torch.randn(4, ld.dim, generator=torch.Generator().manual_seed(13)))
    _evaluate(ld, u, (X, y), {}, ld.graphs.min_calls)
    assert ld.graphs.status.startswith("off: recording failed"), ld.graphs.status
    flipped = 1.0 - y  # the other branch, had the first dataset's been frozen into a graph
    _assert_close(
        ld.log_density_and_score(u, (X, flipped), {}),
        ModelLogDensity(branching, ld.sites).log_density_and_score(u, (X, flipped)),
        "other branch",
    )


def test_folded_constants_are_computed_once_and_random_operations_are_not_folded():
    from pyro_stein.graphs import _simplify

    def fn(u):
        return u * torch.ones(3, dtype=u.dtype).exp() + torch.randn(3, dtype=u.dtype)

    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn)(tensor(torch.zeros(2, 3)))
    _simplify(gm)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "aten.exp.default" not in targets and "aten.ones.default" not in targets, targets
    assert "aten.randn.default" in targets, f"a random operation was folded into a constant: {targets}"
    a, b = gm(tensor(torch.zeros(2, 3))), gm(tensor(torch.zeros(2, 3)))
    assert not torch.equal(a, b), "the random term was frozen"


def test_the_periodic_check_sees_a_change_in_a_coordinate_on_a_small_scale():
    """The check's tolerance follows each coordinate's own scale: a stale replay of a coordinate whose scores are
    ~1, next to one whose scores are ~100, is caught (a tolerance from the largest value over all coordinates
    let it through)."""
    state = {"scale": 1.0}

    def two_scales(y):
        a = pyro.sample("a", dist.Normal(tensor(0.0), 0.01))  # scores of order 100
        b = pyro.sample("b", dist.Normal(tensor(0.0), state["scale"]))  # scores of order 1
        pyro.sample("y", dist.Normal(a + b, 1.0), obs=y)

    y = tensor(0.3)
    ld = _log_density(two_scales, y)
    u = tensor(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))
    _evaluate(ld, u, (y,), {}, ld.graphs.min_calls)
    assert ld.graphs.status == "replaying"
    state["scale"] = 0.8
    with pytest.warns(RecordedGraphWarning, match="reads state other than its latent values and arguments"):
        _evaluate(ld, u, (y,), {}, ld.graphs.verify_every)
    assert ld.graphs.status == "off: a replay stopped matching the model's own evaluation"


def test_division_with_a_rounding_mode_is_not_bypassed():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyro_stein.graphs import _simplify

    def fn(u):
        return torch.div(u, 1.0, rounding_mode="floor"), torch.div(u, 1.0)

    u = tensor(torch.tensor([0.5, -1.5, 2.25]))
    gm = make_fx(fn)(u)
    _simplify(gm)
    floor, same = gm(u)
    assert torch.equal(floor, u.floor()) and torch.equal(same, u)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_folding_bypasses_exact_identities_only(mode):
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyro_stein.graphs import _simplify

    def fn(u, data):
        zero, one = torch.zeros_like(u), torch.ones(u.shape[-1], dtype=u.dtype)
        a = (u + zero) * one / one  # bypassed: a is u
        b = -(-(a**1.0)).unsqueeze(-1).sum(-1)  # bypassed: b is a
        c = b - data.new_zeros(3)  # bypassed: data's shape-only zeros
        kept = zero[:1] - c + data.new_zeros(4, 2, 3)  # not bypassed: 0 - c is -c, and + zeros broadcasts to (4, 2, 3)
        flags = (data > 0).to(torch.int64) * one  # not bypassed: the product is floating point
        return c.exp(), kept.sum(0) * one.to(torch.int64), flags

    u, data = tensor(torch.randn(2, 3, generator=torch.Generator().manual_seed(3))), tensor(torch.randn(3))
    gm = make_fx(fn, tracing_mode=mode)(u, data)
    before = gm(u, data)
    _simplify(gm)
    ops = sorted(n.target._schema.name for n in gm.graph.nodes if n.op == "call_function")
    assert ops == ["aten::_to_copy", "aten::add", "aten::exp", "aten::gt", "aten::mul", "aten::sub", "aten::sum"], ops
    for got, want in zip(gm(u, data), before):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (
            "a bypassed operation changed a value, its dtype or its shape"
        )


def test_shared_recording_never_returns_its_input_or_a_stored_constant():
    from pyro_stein.graphs import _SharedRecording

    def fn(u, data):  # after folding: the score is u itself (u * 1 + 0), the log density a stored constant
        return torch.ones(u.shape[0], dtype=u.dtype).exp() + data.new_zeros(()), u * 1.0 + torch.zeros_like(u)

    u, data = tensor(torch.randn(4, 3, generator=torch.Generator().manual_seed(5))), tensor(torch.zeros(()))
    rec = _SharedRecording(fn, u, (data,))
    assert [n.op for n in rec.traced.graph.nodes if n.op == "call_function"] == [], "the identities were not bypassed"
    u_before, (lp, score) = u.clone(), rec(u, (data,))
    lp.add_(1.0)
    score.add_(1.0)
    assert torch.equal(u, u_before), "writing to the returned score changed the particles"
    again = rec(u, (data,))
    assert torch.equal(again[0], torch.full_like(again[0], math.e)), (
        "writing to the returned log density changed the recording"
    )


def test_guide_draws_through_shared_recordings_and_can_be_told_not_to(tmp_path):
    pyro.set_rng_seed(0)
    args, kwargs = _hier_data(0)
    guide = AmortizedSteinGuide(hierarchical, amortized=True, postprocess=[HMC(steps=2, leapfrog=3)])
    guide.setup(*args, **kwargs)
    for seed in range(4):  # 2 x 3 leapfrog evaluations per call at the same particle shape
        a, k = _hier_data(seed)
        guide.sample_posterior(50, *a, **k)
    assert guide.log_density.graphs.status == "replaying", guide.log_density.graphs.status
    a, k = _hier_data(7)
    pyro.set_rng_seed(5)
    replayed = guide.sample_posterior(50, *a, **k)
    graphs, guide.log_density.graphs = guide.log_density.graphs, None
    pyro.set_rng_seed(5)
    eager = guide.sample_posterior(50, *a, **k)
    guide.log_density.graphs = graphs
    for name in eager:
        _assert_close(
            (replayed[name], replayed[name]),
            (eager[name], eager[name]),
            f"draws of {name!r} with and without recordings",
        )
    guide.save(tmp_path / "g.pt")
    off = AmortizedSteinGuide.load(tmp_path / "g.pt", hierarchical, *args, **kwargs)
    assert off.log_density.graphs is not None, "record_graph=True (the default) was not restored"
    off = AmortizedSteinGuide(hierarchical, amortized=True, record_graph=False)
    off.setup(*args, **kwargs)
    assert off.log_density.graphs is None
    with pytest.raises(TypeError, match="record_graph must be True or False"):
        AmortizedSteinGuide(hierarchical, record_graph=1)


def test_a_copied_log_density_records_for_itself():
    import copy

    (sigma,), kw = _hier_data(0)
    ld = _shared_log_density(hierarchical, sigma, **kw)
    u = tensor(torch.zeros(4, ld.dim))
    _evaluate(ld, u, (sigma,), kw, ld.graphs.min_calls)
    twin = copy.deepcopy(ld)
    assert twin.graphs is not ld.graphs and twin.graphs.num_recordings == 0 and twin.graphs.share_across_data
    _evaluate(twin, u, (sigma,), kw, twin.graphs.min_calls)
    assert twin.graphs.status == "replaying"
    del ld
    _assert_close(
        twin.log_density_and_score(u, (sigma,), kw),
        ModelLogDensity(hierarchical, twin.sites).log_density_and_score(u, (sigma,), kw),
        "the copy, original gone",
    )
