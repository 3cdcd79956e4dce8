"""tests/gloo.py's hand-back: a worker's result must outlive the worker that sent it."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from gloo import put_result, take_result


def _send_and_exit(queue, rank: int) -> None:
    put_result(queue, rank, {"weights": torch.arange(6.0).reshape(2, 3), "steps": [1, 2]})


def test_a_tensor_result_is_read_after_its_worker_has_exited() -> None:
    """The parent reads only once the worker is gone, as happens under load: a tensor sent as a handle
    to the worker's shared memory fails here (the resource sharer it points to is gone:
    FileNotFoundError or ConnectionRefusedError); one sent by value does not."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_send_and_exit, args=(queue, 1))
    worker.start()
    worker.join(timeout=60)
    assert worker.exitcode == 0
    rank, result, failure = take_result(queue, timeout=60)
    assert (rank, failure) == (1, None)
    assert torch.equal(result["weights"], torch.arange(6.0).reshape(2, 3)) and result["steps"] == [1, 2]
