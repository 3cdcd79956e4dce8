"""Distributed training on CPU: Gloo over loopback, workers started by torchrun's own agent.

The end-to-end tests share one tiny recipe (WRN-10-1 with Attend and Rectify, SyncBatchNorm, fp32)
on a self-made 16x16 store: 96 training images (six global batches of 16) and 41 test images, so
the two workers' test shards differ in size and in their number of batches.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import DATASET, EVENTS, prepare_tiny_bars

from finebench.data.loader import build_loaders
from finebench.data.sampler import BatchShardSampler
from finebench.errors import FinebenchError
from finebench.predictions import read_predictions
from finebench.recipe import load_recipe
from finebench.runner import run_recipe
from finebench.train.distributed import WorkerEnv, describe_failure, torchrun_argv

TRAIN_IMAGES, TEST_IMAGES = 96, 41
EPOCHS = 3
TOLERANCE = 1e-5
"""Largest relative difference allowed between a 2-worker and a 1-process metric (fp32, Gloo)."""

RECIPE = f"""
seeds = [0]
[dataset]
name = "{DATASET}"
input_size = 16
augmentation = "none"
[model]
backbone = "wrn"
options = {{ depth = 10, width = 1 }}
[[variants]]
kind = "attention"
attention_depth = 2
attention_width = 2
[train]
epochs = {EPOCHS}
batch_size = 16
eval_batch_size = 10
lr = 0.05
schedule = "cosine"
precision = "fp32"
sync_batchnorm = true
channels_last = false  # oneDNN's channels_last kernels round differently per batch size
log_every = 2
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_bars(tmp_path_factory.mktemp("data"), TRAIN_IMAGES, TEST_IMAGES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp")
    (path / "tiny.toml").write_text(RECIPE)
    return path


def _env() -> dict[str, str]:
    # Loopback only: Gloo's sockets on lo, the rendezvous on 127.0.0.1 (finebench's launcher default).
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _launch(workdir: Path, data_root: Path, results: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "finebench", "run", "tiny.toml", "--results-dir", results,
               "--data-root", str(data_root), "--quiet", "--nproc-per-node", "2", "--dist-timeout", "30", *extra]
    return subprocess.Popen(command, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(item[5:]) for item in environ if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run_dir(results: Path) -> Path:
    (run_dir,) = [p for p in (results / "tiny").iterdir() if p.is_dir()]
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process(workdir: Path, data_root: Path) -> Path:
    """The reference: the same recipe in this process (one worker, the same global batch)."""
    outcomes = run_recipe(load_recipe(workdir / "tiny.toml"), results_dir=workdir / "single", data_root=data_root,
                          quiet=True)
    assert [o.status for o in outcomes] == ["finished"]
    return _run_dir(workdir / "single")


@pytest.fixture(scope="module")
def killed_job(workdir: Path, data_root: Path) -> dict:
    """Two workers; rank 1 is SIGKILLed as soon as epoch 1's checkpoint exists."""
    launcher = _launch(workdir, data_root, "multi")
    started = time.monotonic()
    checkpoint = workdir / "multi" / "tiny"
    while not list(checkpoint.glob("*/last.pt")):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() - started < 120, "the distributed job never wrote a checkpoint"
        time.sleep(0.02)
    workers = {_rank_of(pid): pid for pid in _children(launcher.pid)}
    os.kill(workers[1], signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    return {"returncode": launcher.returncode, "seconds": time.monotonic() - killed_at, "stderr": stderr,
            "workers": workers, "rows": _metrics(_run_dir(workdir / "multi"))}


@pytest.fixture(scope="module")
def resumed_job(workdir: Path, data_root: Path, killed_job: dict) -> dict:
    """The same command again after the kill: it resumes the interrupted run on both workers."""
    started = time.monotonic()
    launcher = _launch(workdir, data_root, "multi")
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stdout[-3000:] + stderr
    return {"run_dir": _run_dir(workdir / "multi"), "stdout": stdout, "stderr": stderr,
            "seconds": time.monotonic() - started}


# ---- sampling and environment (no processes) -----------------------------------------------------


def test_each_global_batch_is_the_same_images_whatever_the_number_of_workers():
    one = BatchShardSampler(50, 8, world_size=1, seed=3)
    shards = [BatchShardSampler(50, 8, rank=r, world_size=4, seed=3) for r in range(4)]
    for sampler in (one, *shards):
        sampler.set_epoch(2)
    single = one.indices().tolist()
    assert len({len(s) for s in shards}) == 1  # equal step counts on every worker
    for step in range(one.steps):
        global_batch = single[step * 8 : step * 8 + 8]
        union = [i for s in shards for i in s.indices().tolist()[step * 2 : step * 2 + 2]]
        assert sorted(union) == sorted(global_batch[: len(union)])


def test_the_shuffle_changes_each_epoch_and_repeats_for_the_same_epoch():
    sampler = BatchShardSampler(40, 8, seed=0)
    sampler.set_epoch(1)
    first = sampler.indices()
    sampler.set_epoch(2)
    assert not torch.equal(first, sampler.indices())
    sampler.set_epoch(1)
    assert torch.equal(first, sampler.indices())


def test_a_partial_last_batch_is_trimmed_to_equal_shares_or_dropped_below_two_each():
    # 21 images, global batch 8, 2 workers: 2 full batches, 5 left -> 2 each (one image unused).
    assert [len(BatchShardSampler(21, 8, rank=r, world_size=2)) for r in range(2)] == [10, 10]
    # 19 images: 3 left -> 1 each, which BatchNorm cannot train on: dropped.
    assert [BatchShardSampler(19, 8, rank=r, world_size=2).steps for r in range(2)] == [2, 2]
    assert BatchShardSampler(21, 10).steps == 2  # one process: a last batch of one is dropped


def test_a_global_batch_that_does_not_split_across_workers_is_a_user_error(data_root: Path):
    with pytest.raises(FinebenchError, match=r"train.batch_size = 10 does not split evenly across 4 workers"):
        build_loaders(DATASET, data_root, batch_size=10, rank=0, world_size=4)


def test_worker_loaders_split_the_global_batch_and_shard_the_test_set_without_padding(data_root: Path):
    seen = []
    for rank in range(2):
        loaders = build_loaders(DATASET, data_root, batch_size=16, eval_batch_size=10, rank=rank, world_size=2)
        assert [len(labels) for _, labels in loaders.train] == [8] * 6
        seen += [int(i) for i in loaders.test.dataset.indices]
    assert sorted(seen) == list(range(TEST_IMAGES))


def test_the_torchrun_environment_is_read_and_checked():
    assert WorkerEnv.from_environ({}) is None
    env = WorkerEnv.from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert env == WorkerEnv(rank=3, local_rank=1, world_size=4, local_world_size=2)
    with pytest.raises(FinebenchError, match=r"sets RANK but not LOCAL_RANK, WORLD_SIZE"):
        WorkerEnv.from_environ({"RANK": "0"})
    with pytest.raises(FinebenchError, match=r"WORLD_SIZE='two': expected an integer"):
        WorkerEnv.from_environ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "two"})


def test_the_launcher_runs_finebench_under_torchrun_without_restarts_on_loopback():
    argv = torchrun_argv(2, ["run", "r.toml"])
    assert argv[argv.index("--max-restarts") + 1] == "0"
    assert argv[argv.index("--rdzv-endpoint") + 1].startswith("127.0.0.1:")
    assert argv[-4:] == ["-m", "finebench", "run", "r.toml"]


FROZEN_PEER = """
import sys, time, torch
from finebench.train.distributed import distributed_context
with distributed_context("cpu", timeout_s=3) as ctx:
    if ctx.rank == 1:
        time.sleep(60)  # alive but never joins the collective, as a hung machine would
    started = time.monotonic()
    try:
        ctx.reduce_sum(torch.ones(1))
    except Exception as error:
        print(f"gave up after {time.monotonic() - started:.1f}s: {type(error).__name__}", flush=True)
        sys.exit(3)
"""


def test_a_worker_whose_peer_stops_answering_fails_after_the_timeout(tmp_path: Path):
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    workers = [subprocess.Popen([sys.executable, "-c", FROZEN_PEER], env={**env, "RANK": str(rank)}, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        output, _ = workers[0].communicate(timeout=50)
    finally:
        for worker in workers:
            worker.kill()
    assert workers[0].returncode == 3, output
    seconds = float(re.search(r"gave up after ([0-9.]+)s", output).group(1))
    assert 2.5 < seconds < 15


def test_a_failure_report_names_the_killed_worker_before_the_ones_the_agent_stopped():
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,
        ProcessFailure,
    )

    stopped = ProcessFailure(local_rank=0, pid=100, exitcode=-signal.SIGTERM, error_file="/nonexistent")
    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-signal.SIGKILL, error_file="/nonexistent")
    stopped.timestamp = killed.timestamp - 1  # the agent's SIGTERM may even be stamped first
    message = describe_failure(ChildFailedError("finebench", {0: stopped, 1: killed}))
    assert message == ("distributed run failed: worker rank 1 (pid 101) was killed by SIGKILL, worker rank 0 (pid 100) "
                       "was killed by SIGTERM; the job was stopped (see the worker output above)")


# ---- two CPU workers end to end --------------------------------------------------------------------


def test_killing_a_worker_ends_the_job_with_a_clear_error_in_bounded_time(killed_job: dict):
    assert killed_job["returncode"] != 0
    assert killed_job["seconds"] < 60
    pid = killed_job["workers"][1]
    assert re.search(rf"error: distributed run failed: worker rank 1 \(pid {pid}\) was killed by SIGKILL.*"
                     r"the job was stopped", killed_job["stderr"])
    assert not any(_alive(p) for p in killed_job["workers"].values())  # rank 0 did not hang on


def test_a_rerun_resumes_the_interrupted_run_on_every_worker(resumed_job: dict, killed_job: dict):
    rows = _metrics(resumed_job["run_dir"])
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    done_before = len(killed_job["rows"])
    assert 1 <= done_before < EPOCHS
    assert rows[:done_before] == killed_job["rows"]  # kept, timings included: not trained again
    checkpoint = torch.load(resumed_job["run_dir"] / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == EPOCHS and len(checkpoint["rng_ranks"]) == 2


def test_two_workers_write_one_set_of_records(resumed_job: dict):
    run_dir = resumed_job["run_dir"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.json", "confusion.json", "last.pt",
                                                          "metrics.jsonl", "predictions.parquet", "summary.json",
                                                          *EVENTS]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2
    # The confusion matrix is summed over both workers: every test image once, its diagonal the top-1 count.
    matrix = json.loads((run_dir / "confusion.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == TEST_IMAGES
    assert 100 * sum(matrix[i][i] for i in range(len(matrix))) / TEST_IMAGES == summary["final"]["test_top1"]
    assert resumed_job["stdout"].count("tiny: results") == 1  # one results table, from rank 0


def test_every_test_image_is_evaluated_exactly_once(resumed_job: dict):
    for row in _metrics(resumed_job["run_dir"]):
        correct = row["test_top1"] * TEST_IMAGES / 100
        assert abs(correct - round(correct)) < 1e-6, row  # a count over 41 images, not 40 or 42


def test_two_workers_record_each_test_image_once_under_its_id(resumed_job: dict, single_process: Path):
    """Each worker evaluates its shard; the gathered per-image file is the one process's image for image."""
    multi = read_predictions(resumed_job["run_dir"] / "predictions.parquet")
    single = read_predictions(single_process / "predictions.parquet")
    assert multi.ids.tolist() == list(range(TEST_IMAGES)) and np.array_equal(multi.labels, single.labels)
    assert multi.digest == single.digest == json.loads((resumed_job["run_dir"] / "summary.json").read_text())["test_set_digest"]
    # the same top-1 count as the run's (equal to the one process's, test_two_workers_match_one_process...)
    summary = json.loads((resumed_job["run_dir"] / "summary.json").read_text())
    assert 100 * multi.correct().sum() / TEST_IMAGES == summary["final"]["test_top1"]


def test_two_workers_match_one_process_with_the_same_global_batch(resumed_job: dict, single_process: Path):
    multi, single = _metrics(resumed_job["run_dir"]), _metrics(single_process)
    for got, want in zip(multi, single, strict=True):
        assert got["test_top1"] == want["test_top1"] and got["train_top1"] == want["train_top1"]
        assert got["network_top1"] == want["network_top1"] and got["module_top1"] == want["module_top1"]
        for key in ("train_loss", "test_loss", "test_top5", "lr"):
            assert got[key] == pytest.approx(want[key], rel=TOLERANCE), key


@pytest.mark.slow
def test_the_same_command_runs_when_torchrun_starts_it(workdir: Path, data_root: Path, single_process: Path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "0", "-m", "finebench",
               "run", "tiny.toml", "--results-dir", "torchrun", "--data-root", str(data_root), "--quiet"]
    done = subprocess.run(command, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = _run_dir(workdir / "torchrun")
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    for got, want in zip(_metrics(run_dir), _metrics(single_process), strict=True):
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=TOLERANCE)


@pytest.mark.slow
def test_two_torchrun_agents_meet_at_a_rendezvous_like_two_machines(workdir: Path, data_root: Path,
                                                                     single_process: Path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-machines", "--max-restarts", "0",
               "-m", "finebench", "run", "tiny.toml", "--results-dir", "nodes", "--data-root", str(data_root), "--quiet"]
    agents = [subprocess.Popen(command, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    for agent in agents:
        _, stderr = agent.communicate(timeout=300)
        assert agent.returncode == 0, stderr
    run_dir = _run_dir(workdir / "nodes")
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    for got, want in zip(_metrics(run_dir), _metrics(single_process), strict=True):
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=TOLERANCE)


@pytest.mark.slow
def test_a_compiled_distributed_run_finishes_with_the_eager_metrics(workdir: Path, data_root: Path,
                                                                    single_process: Path):
    """DDP + torch.compile (Inductor's C++ backend on CPU), two workers: the compiled run records what
    it resolved and matches the eager one-process run within float rounding (no dropout here)."""
    launcher = _launch(workdir, data_root, "compiled", "--set", "train.compile=true", "--dist-timeout", "900")
    _, stderr = launcher.communicate(timeout=1200)
    assert launcher.returncode == 0, stderr[-3000:]
    run_dir = _run_dir(workdir / "compiled")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["compile"] is True and summary["world_size"] == 2 and summary["compile_time_s"] > 0
    for got, want in zip(_metrics(run_dir), _metrics(single_process), strict=True):
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-3)
