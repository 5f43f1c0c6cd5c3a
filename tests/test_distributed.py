"""Data-parallel amortized training (pyro_stein.distributed): 2 gloo ranks on loopback vs 1 process.

The 2-rank run is launched with ``python -m torch.distributed.run --nproc_per_node=2`` on this
file (see ``_worker`` at the bottom) with a hard timeout; the 1-process run executes the same
file with plain ``python`` (no torchrun environment: world size 1, twice the per-step batch), so
both runs see the same number of datasets.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_stein import Amortization, AmortizedSteinGuide, AmortizedSVGD, Dataset, PriorPredictiveStream
from pyro_stein.distributed import (
    DistributedAmortizedSVGD,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    max_parameter_deviation,
    seed_rank,
    shard,
)
from pyro_stein.nn import DeepSetEncoder, GaussianResidualSampler

ROOT = Path(__file__).resolve().parents[1]
# The family is narrow enough (20-30 observations per dataset) for a short run to reach the same
# accuracy check as the single-process tests: means within 0.2 posterior sd, sds within 20 %.
FULL = os.environ.get("PYRO_STEIN_DIST_FULL", "") not in ("", "0")
STEPS = 1500 if FULL else 400  # optimiser steps in both runs
BATCH = 4  # datasets per rank per step with 2 ranks; the 1-process run uses 2 * BATCH
MEAN_TOL, SD_TOL = 0.2, 0.2
NUM_PARTICLES = 32
NUM_HELD_OUT = 10
NUM_DRAWS = 4000
TIMEOUT_S = 1500 if FULL else 240


# ------------------------------------------------------------------------------------------ the family
def mean_model(n, y=None):
    """mu ~ N(0, 1); y_i ~ N(mu, 1), i = 1..n. Posterior N(sum y / (n + 1), 1 / (n + 1))."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(()), torch.ones(())))
    with pyro.plate("obs", n):
        return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def make_args():
    return Dataset(int(torch.randint(20, 31, ())))


def make_guide():
    if FULL:
        return AmortizedSteinGuide(mean_model, amortized=True)
    enc = DeepSetEncoder(1, output_dim=8, hidden_dim=32)
    sampler = GaussianResidualSampler(1, context_dim=8, hidden_dim=32, init_scale=0.3)
    return AmortizedSteinGuide(mean_model, amortized=Amortization(encoder=enc), sampler=sampler)


def make_svgd(guide, steps):
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)})
    return DistributedAmortizedSVGD(mean_model, guide, optim, num_particles=NUM_PARTICLES)


def held_out_errors(guide) -> tuple[list[float], list[float]]:
    """(posterior-mean error / exact sd, sampler sd / exact sd) on NUM_HELD_OUT fixed datasets."""
    pyro.set_rng_seed(12345)  # the same held-out datasets whatever the world size
    stream = PriorPredictiveStream(mean_model, make_args, obs_kwargs={"y": "y"})
    held_out = [stream.sample() for _ in range(NUM_HELD_OUT)]
    draws = guide.sample_posterior_batch(NUM_DRAWS, held_out)["mu"]
    errs, ratios = [], []
    for d, x in zip(held_out, draws):
        n, y = d.args[0], d.kwargs["y"]
        m, s = y.sum() / (n + 1), (1.0 / (n + 1)) ** 0.5
        errs.append(float((x.mean() - m) / s))
        ratios.append(float(x.std() / s))
    return errs, ratios


# ------------------------------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], out: Path) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: the session this test started
        log, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S} s:\n{log.decode()[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.decode()[-3000:]}"
    wall = time.perf_counter() - t0
    results = {int(p.stem[4:]): torch.load(p, weights_only=False) for p in out.glob("rank*.pt")}
    return {"ranks": results, "wall_s": wall, "dir": out}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ws2")
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", __file__,
           "--out", str(out), "--steps", str(STEPS), "--batch-size", str(BATCH)]  # fmt: skip
    return _launch(cmd, out)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("ws1")
    cmd = [sys.executable, __file__, "--out", str(out), "--steps", str(STEPS), "--batch-size", str(2 * BATCH)]
    return _launch(cmd, out)


def _check_accuracy(res, label):
    errs, ratios = res["errs"], res["ratios"]
    worst_mean = max(abs(e) for e in errs)
    worst_sd = max(abs(r - 1) for r in ratios)
    # Monte Carlo s.e. with NUM_DRAWS = 4000 draws: 1 / sqrt(4000) = 0.016 posterior sd for the mean,
    # 1 / sqrt(2 * 4000) = 0.011 for the sd ratio: the tolerances are > 10 s.e. wide. The untrained
    # guide is off by 3-5 posterior sd in the mean.
    mode = "full" if FULL else "short CI run"
    assert worst_mean < MEAN_TOL, (
        f"{label}, {mode}: worst |mean error| {worst_mean:.3f} posterior sd, target < {MEAN_TOL} "
        f"(MC s.e. 0.016); {errs}"
    )
    assert worst_sd < SD_TOL, (
        f"{label}, {mode}: worst |sd ratio - 1| {worst_sd:.3f}, target < {SD_TOL} (MC s.e. 0.011); {ratios}"
    )


# ------------------------------------------------------------------------------------------ tests
def test_two_gloo_ranks_train_and_stay_identical(two_ranks):
    ranks = two_ranks["ranks"]
    assert sorted(ranks) == [0, 1]
    r0, r1 = ranks[0], ranks[1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["num_steps"] == r1["num_steps"] == STEPS
    assert r0["datasets_seen"] == r1["datasets_seen"] == STEPS * 2 * BATCH
    # the ranks trained on different data but hold bit-identical parameters (and agree they do)
    assert r0["max_parameter_deviation"] == r1["max_parameter_deviation"] == 0.0
    assert torch.equal(r0["flat"], r1["flat"])
    # and the parameters moved away from rank 0's initialisation
    assert not torch.equal(r0["flat"], r0["init_flat"])
    # each rank initialised its own (differently seeded) weights; rank 0's were broadcast before training
    assert not torch.equal(r0["own_init_flat"], r1["own_init_flat"])
    assert torch.equal(r0["init_flat"], r1["init_flat"]) and torch.equal(r1["init_flat"], r0["own_init_flat"])
    assert all(torch.isfinite(torch.tensor(r["history"])).all() for r in ranks.values())
    assert (two_ranks["dir"] / "ckpt.pt").exists()


def test_two_rank_guide_is_accurate(two_ranks):
    _check_accuracy(two_ranks["ranks"][0], "world size 2")


def test_one_process_same_data_budget_is_accurate_and_agrees(one_rank, two_ranks):
    r1, r2 = one_rank["ranks"][0], two_ranks["ranks"][0]
    assert r1["world_size"] == 1 and r1["datasets_seen"] == r2["datasets_seen"]
    _check_accuracy(r1, "world size 1")
    # both are within 0.2 sd / 20 % of the exact posterior, so within 0.4 sd / ~40 % of each other;
    # check the two runs directly too
    for a, b in zip(r1["errs"], r2["errs"]):
        assert abs(a - b) < 2 * MEAN_TOL, (r1["errs"], r2["errs"])
    for a, b in zip(r1["ratios"], r2["ratios"]):
        assert abs(a / b - 1) < 2 * SD_TOL, (r1["ratios"], r2["ratios"])
    print(f"\nwall time (launch + import + {STEPS} steps + eval): world size 1 {one_rank['wall_s']:.1f} s, "
          f"world size 2 {two_ranks['wall_s']:.1f} s; training loop only: "
          f"{r1['train_s']:.1f} s vs {r2['train_s']:.1f} s")  # fmt: skip


def test_resume_two_rank_checkpoint_in_one_process(two_ranks):
    r0 = two_ranks["ranks"][0]
    guide = make_guide()
    svgd = make_svgd(guide, 10)
    pyro.set_rng_seed(1)
    state = load_checkpoint(two_ranks["dir"] / "ckpt.pt", guide, svgd, example=make_args_with_obs())
    assert state["world_size"] == 2
    flat = torch.cat([p.detach().reshape(-1) for p in guide.parameters()])
    # bit for bit, once rounded to this process's dtype (the ranks may have trained in another)
    assert torch.equal(flat, r0["flat"].to(flat.dtype))
    assert svgd.num_steps == STEPS and svgd.datasets_seen == STEPS * 2 * BATCH
    stream = PriorPredictiveStream(mean_model, make_args, obs_kwargs={"y": "y"})
    svgd.run(datasets=stream, batch_size=2, num_steps=3, progress_bar=False)
    assert svgd.num_steps == STEPS + 3 and svgd.datasets_seen == STEPS * 2 * BATCH + 6
    # the Adam moments were restored (not re-initialised): the optimiser has state for every parameter
    assert len(svgd.optim.get_state()) == len(list(guide.parameters()))


def make_args_with_obs():
    return PriorPredictiveStream(mean_model, make_args, obs_kwargs={"y": "y"}).sample()


def test_single_process_matches_plain_driver_exactly():
    """Without a process group the distributed driver makes exactly AmortizedSVGD's updates."""
    flats = []
    for cls in (AmortizedSVGD, DistributedAmortizedSVGD):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make_guide()
        stream = PriorPredictiveStream(mean_model, make_args, obs_kwargs={"y": "y"})
        svgd = cls(mean_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
        svgd.run(datasets=stream, batch_size=2, num_steps=3, progress_bar=False)
        flats.append(torch.cat([p.detach().reshape(-1) for p in guide.parameters()]))
    assert torch.equal(flats[0], flats[1])
    assert max_parameter_deviation(guide) == 0.0


def test_a_dropped_dataset_is_not_counted_in_the_rank_weight():
    """A rank's gradient is weighted by the datasets its loss used: one left out for a non-finite log joint (see
    AmortizedSVGD.step_batch) is not counted (datasets_seen, the all-reduce weight without a process group)."""
    from pyro_stein import NonFiniteDatasetWarning

    from .conftest import tensor
    from .test_amortized import penalised_mean_model

    y = [tensor(torch.randn(6)) for _ in range(3)]
    huge = torch.finfo(tensor(0.0).dtype).max
    good1, good2, bad = Dataset(6, 0.5, y=y[0]), Dataset(6, 0.5, y=y[1]), Dataset(6, huge, y=y[2])
    pyro.set_rng_seed(0)
    guide = AmortizedSteinGuide(penalised_mean_model, amortized=True).setup(*good1.args, **good1.kwargs)
    svgd = DistributedAmortizedSVGD(penalised_mean_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
    svgd.step_batch([good1, good2])
    assert svgd.datasets_seen == 2
    with pytest.warns(NonFiniteDatasetWarning):
        svgd.step_batch([good1, bad, good2])
    assert svgd.datasets_seen == 4 and svgd.num_dropped_datasets == 1


def test_shard_and_seed_helpers(monkeypatch):
    items = list(range(10))
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items and shards[1] == [1, 4, 7]
    assert shard(items) == items  # no process group: world size 1
    with pytest.raises(ValueError, match="cannot be split"):
        shard([1], 0, 2)
    for rank, world, message in (
        (2, 2, "rank must be below world_size = 2, got 2"),
        (-1, 2, "rank must be an int >= 0"),
        (0, 0, "world_size must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            shard(items, rank, world)
    assert seed_rank(7) == 7 and seed_rank(7, rank=3) == 10
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type, ctx.is_main) == (0, 1, None, "cpu", True)


def test_init_distributed_reads_a_group_the_caller_started(monkeypatch, tmp_path):
    """Started without torchrun's environment (e.g. mp.spawn + init_process_group), the group says the rank."""
    import torch.distributed as dist

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = init_distributed()
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type) == (0, 1, "gloo", "cpu")
    finally:
        cleanup_distributed()


def test_a_failed_first_step_leaves_no_standardisation_behind():
    """As AmortizedSVGD: the encoder's standardisation fitted on a first batch whose step fails is undone, and the
    next batch fits it afresh."""
    from pyro_stein import NonFiniteLogJointError

    from .conftest import tensor
    from .test_amortized import penalised_mean_model

    huge = torch.finfo(tensor(0.0).dtype).max
    bad = [Dataset(6, huge, y=tensor(torch.full((6,), 100.0)))] * 2
    good = [Dataset(6, 0.5, y=tensor(torch.randn(6))) for _ in range(2)]
    states = []
    for cls in (AmortizedSVGD, DistributedAmortizedSVGD):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AmortizedSteinGuide(penalised_mean_model, amortized=True).setup(*good[0].args, **good[0].kwargs)
        svgd = cls(penalised_mean_model, guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=8)
        with pytest.raises(NonFiniteLogJointError):
            svgd.step_batch(bad)
        svgd.step_batch(good)
        states.append({k: v.clone() for k, v in guide.named_buffers()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), "the failed batch's standardisation stayed"


# ------------------------------------------------------------------------------------------ the worker
def _worker(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    ctx = init_distributed(backend="gloo", timeout=120)
    try:
        seed_rank(a.seed)  # different datasets and particle noise per rank; also a different init per rank
        stream = PriorPredictiveStream(mean_model, make_args, obs_kwargs={"y": "y"})
        guide = make_guide()
        first = stream.sample()
        guide.setup(*first.args, **first.kwargs)
        own_init_flat = torch.cat([p.detach().reshape(-1) for p in guide.parameters()]).clone()
        svgd = make_svgd(guide, a.steps)
        svgd.sync_parameters()
        init_flat = torch.cat([p.detach().reshape(-1) for p in guide.parameters()]).clone()
        t0 = time.perf_counter()
        history = svgd.run(datasets=stream, batch_size=a.batch_size, num_steps=a.steps, progress_bar=False)
        train_s = time.perf_counter() - t0
        dev = max_parameter_deviation(guide)
        svgd.save_checkpoint(Path(a.out) / "ckpt.pt", train_s=train_s)
        res = {
            "world_size": ctx.world_size,
            "num_steps": svgd.num_steps,
            "datasets_seen": svgd.datasets_seen,
            "max_parameter_deviation": dev,
            "flat": torch.cat([p.detach().reshape(-1) for p in guide.parameters()]),
            "init_flat": init_flat,
            "own_init_flat": own_init_flat,
            "history": history,
            "train_s": train_s,
        }
        if ctx.is_main:
            res["errs"], res["ratios"] = held_out_errors(guide)
        torch.save(res, Path(a.out) / f"rank{ctx.rank}.pt")
    finally:
        from pyro_stein.distributed import cleanup_distributed

        cleanup_distributed()


if __name__ == "__main__":
    _worker()
