"""Two CPU processes in one Gloo process group, for tests that check a distributed step against one
process: the start, the port, the hand-back of results and the tear-down, written once."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 120


def _entry(rank: int, port: int, queue: Any, worker: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        put_result(queue, rank, worker(rank, *args))
    except BaseException:  # the parent raises it at once instead of waiting out the timeout
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def put_result(queue: Any, rank: int, result: Any) -> None:
    """Send a worker's result pickled here, by value: a multiprocessing queue would send a tensor as a
    handle to this process's shared memory, which is gone once it exits, often before the parent reads it."""
    queue.put((rank, pickle.dumps(result), None))


def take_result(queue: Any, timeout: float = TIMEOUT_S) -> tuple[int, Any, str | None]:
    """(rank, result, traceback or None) of the next worker to answer."""
    rank, result, failure = queue.get(timeout=timeout)
    return rank, None if result is None else pickle.loads(result), failure


def on_two_workers(worker: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """``worker(rank, *args)`` on two spawned Gloo ranks; what each returns, by rank. ``worker`` must
    be a module-level function; what it returns (tensors included) crosses back by value."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    processes = mp.start_processes(_entry, args=(port, queue, worker, args), nprocs=WORLD, join=False,
                                   start_method="spawn")
    results, failures = {}, []
    for _ in range(WORLD):
        rank, result, failure = take_result(queue)
        results[rank] = result
        if failure is not None:
            failures.append(f"rank {rank}: {failure}")
    processes.join(timeout=TIMEOUT_S)
    if failures:
        raise AssertionError("\n".join(failures))
    return results
