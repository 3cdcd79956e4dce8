"""Data-parallel training on torch.distributed, launched by torchrun: finebench brings no launcher of its own.

A worker learns its place from the variables torchrun (``torch.distributed.run``) sets: ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``. The same
``finebench run`` therefore works started by ``torchrun`` on one or many machines, under SLURM via
``srun torchrun``, or by ``finebench run --nproc-per-node N``, which runs torchrun's own code in
process (``launch_workers``).

Rules that keep a distributed run equal to a one-process run with the same global batch:

* ``finebench.data.loader.BatchShardSampler`` shuffles the whole training set once per epoch
  (seed + epoch), cuts the permutation into global batches and gives each worker a contiguous
  slice of every batch, so step
  ``i`` sees the same images whatever the number of workers; DDP's gradient mean over equal slices
  is then the global batch's gradient. ``SyncBatchNorm`` (``train.sync_batchnorm``) makes batch
  statistics global too.
* Every reduction is a sum of counts (``reduce_sum``), so evaluation over non-padded test shards
  counts each test image exactly once.

Failure rule: a collective that waits longer than ``timeout_s`` raises instead of hanging, and the
launcher runs with ``max_restarts=0``, so one dead worker ends the whole job with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finebench.errors import FinebenchError
from finebench.models.network import ImageClassifier
from finebench.train.runtime import DistContext, resolve_device

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective may wait for the slowest worker (torch's own default for Gloo)."""

_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


# ---- where this process stands -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerEnv:
    """This process's place in a torchrun job, read from the environment torchrun sets."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> WorkerEnv | None:
        """None outside torchrun; a clear error when the variables are half set or not integers."""
        environ = os.environ if environ is None else environ
        present = [name for name in _TORCHRUN_VARIABLES[:3] if name in environ]
        if not present:
            return None
        missing = [name for name in _TORCHRUN_VARIABLES[:3] if name not in environ]
        if missing:
            raise FinebenchError(
                f"environment sets {', '.join(present)} but not {', '.join(missing)}: start workers with torchrun, "
                "which sets RANK, LOCAL_RANK and WORLD_SIZE together"
            )
        values = {}
        for name in _TORCHRUN_VARIABLES:
            raw = environ.get(name, environ["WORLD_SIZE"] if name == "LOCAL_WORLD_SIZE" else "")
            try:
                values[name] = int(raw)
            except ValueError:
                raise FinebenchError(f"environment variable {name}={raw!r}: expected an integer") from None
        env = cls(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"], values["LOCAL_WORLD_SIZE"])
        if not (env.world_size >= 1 and 0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_world_size):
            raise FinebenchError(
                f"environment RANK={env.rank} LOCAL_RANK={env.local_rank} WORLD_SIZE={env.world_size} "
                f"LOCAL_WORLD_SIZE={env.local_world_size}: expected 0 <= RANK < WORLD_SIZE and 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE"
            )
        return env


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, Gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


_LOST_CONTACT_MARKERS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "NCCL", "timed out",
                         "Timed out")


def lost_contact(error: BaseException) -> bool:
    """Whether ``error`` says another worker went away or stopped answering (not a fault of the run)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _LOST_CONTACT_MARKERS)


# ---- BatchNorm over the global batch ----------------------------------------------------------------


class _SumOverWorkers(torch.autograd.Function):
    """All-reduce sum whose gradient is summed over workers too: every worker's loss depends on the
    statistics every worker contributed (torch's SyncBatchNorm backward does the same)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        total = grad.clone()
        dist.all_reduce(total)
        return total


class WorkerSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the global batch for CPU workers (Gloo).

    torch's ``SyncBatchNorm`` runs on GPUs only; this is the same computation from plain ops and one
    float64 all-reduce of (sum, sum of squares, count) per layer. Outside training, or with one
    worker, it is an ordinary BatchNorm; its state dict is BatchNorm's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        channels, dims = input.shape[1], [0, *range(2, input.dim())]
        wide = input.double()
        local = torch.cat([wide.sum(dims), wide.square().sum(dims), wide.new_tensor([input.numel() / channels])])
        total = _SumOverWorkers.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean.square()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype)
        output = (input - mean.to(input.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output


def _to_worker_sync(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (WorkerSyncBatchNorm, nn.SyncBatchNorm)):
        synced = WorkerSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _to_worker_sync(child))
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` computes global-batch statistics: torch's SyncBatchNorm on GPUs,
    ``WorkerSyncBatchNorm`` on CPUs. Converted in place below the root, so the parameter objects
    (and an optimiser built on them) stay the same."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_worker_sync(model)


# ---- the distributed context the engine calls ------------------------------------------------------


@dataclass
class DDPContext(DistContext):
    """A worker of an initialised process group: DDP wrapping and collectives for the engine."""

    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sync_batchnorm: bool = False

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the (already placed) model; every parameter takes part in every step.

        ``find_unused_parameters`` stays off: Attend and Rectify uses all of its weights in every
        training forward (the regulariser and the gates included), and the search would cost a
        graph traversal per step. Parameters the model never reads (a backbone's layers past the
        tap a method pools: ``ImageClassifier.unused_parameter_names``) are named to DDP as ignored
        instead, the mechanism WS-DAN's per-rank centres already use. A model whose method trains one
        head per backward (``ImageClassifier.each_backward_reaches_every_parameter`` False: PMG) has
        DDP search each backward; the heads it does not reach keep the gradient they had (zero, or
        None), as in one process.
        """
        if self.sync_batchnorm:
            model = convert_sync_batchnorm(model, self.device)
        unused = model.unused_parameter_names() if isinstance(model, ImageClassifier) else []
        if unused:
            ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
            model._ddp_params_and_buffers_to_ignore = [*ignored, *unused]
        device_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        partial = isinstance(model, ImageClassifier) and not model.each_backward_reaches_every_parameter
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                                   find_unused_parameters=partial)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.detach().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``value`` on every rank (decisions only rank 0 may take)."""
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        dist.barrier()


def _worker_device(device_spec: str, env: WorkerEnv) -> torch.device:
    """``auto``/``cuda`` put each worker on the GPU of its LOCAL_RANK; an explicit index would stack them."""
    device = resolve_device(device_spec)
    if device.type != "cuda":
        return device
    if device.index is not None and env.local_world_size > 1:
        raise FinebenchError(
            f"train.device = {device_spec!r}: with {env.local_world_size} workers on this machine each one "
            "takes the GPU of its LOCAL_RANK; set train.device to 'auto' or 'cuda'"
        )
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise FinebenchError(
            f"LOCAL_RANK {env.local_rank} has no GPU: this machine has {count}; start at most {count} workers per machine"
        )
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


@contextlib.contextmanager
def distributed_context(
    device_spec: str = "auto",
    *,
    sync_batchnorm: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> Iterator[DistContext]:
    """The process group for this worker for the duration, or a one-process context outside torchrun.

    The group is always torn down, also when training raises, so a failed rank exits promptly and
    the launcher sees its exit code.
    """
    env = WorkerEnv.from_environ(environ)
    if env is None or env.world_size == 1:
        yield DistContext()
        return
    if timeout_s <= 0:
        raise FinebenchError(f"--dist-timeout {timeout_s:g}: expected a positive number of seconds")
    device = _worker_device(device_spec, env)
    backend = backend_for(device)
    if backend == "nccl":
        # Let the NCCL watchdog abort and end this process when a collective times out.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield DDPContext(env.rank, env.world_size, env.local_rank, device, sync_batchnorm)
    except Exception as error:
        if not lost_contact(error):
            raise
        # One line instead of a backend traceback: the worker that failed first has the story.
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])[:200]
        raise FinebenchError(f"worker rank {env.rank}: lost contact with the other workers ({detail})",
                             exit_code=1) from error
    finally:
        dist.destroy_process_group()


# ---- launching workers on this machine --------------------------------------------------------------


def inside_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_RANK" in environ


def torchrun_argv(nproc_per_node: int, worker_argv: Sequence[str], *, rdzv_endpoint: str = "127.0.0.1:0") -> list[str]:
    """The torchrun command line that starts ``python -m finebench WORKER_ARGV`` N times on this machine."""
    return [
        "--nnodes", "1",
        "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", rdzv_endpoint,
        "--max-restarts", "0",
        "--monitor-interval", "0.5",
        "-m", "finebench", *worker_argv,
    ]


def how_ended(exitcode: int) -> str:
    """A child process's end as words: ``exited with code 2``, ``was killed by SIGKILL`` (a negative
    ``exitcode`` is the signal's number, as ``subprocess`` and torchrun report it)."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        return f"was killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"was killed by signal {-exitcode}"


def describe_failure(error: Exception) -> str:
    """One line naming every failed worker and how, the likely cause first.

    A worker killed by a signal other than SIGTERM (SIGKILL, SIGSEGV, the OOM killer) comes first,
    then non-zero exits, then the workers the agent itself stopped with SIGTERM.
    """
    failures = getattr(error, "failures", None) or {}
    if not failures:
        return f"distributed run failed: {error}"

    def likely_cause_first(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, failure = item
        code = failure.exitcode
        category = 0 if code < 0 and -code != signal.SIGTERM else 1 if code > 0 else 2
        return category, failure.timestamp, rank

    parts = [f"worker rank {rank} (pid {failure.pid}) {how_ended(failure.exitcode)}"
             for rank, failure in sorted(failures.items(), key=likely_cause_first)]
    return f"distributed run failed: {', '.join(parts)}; the job was stopped (see the worker output above)"


def launch_workers(nproc_per_node: int, worker_argv: Sequence[str], *, rdzv_endpoint: str = "127.0.0.1:0") -> None:
    """Run ``finebench WORKER_ARGV`` in ``nproc_per_node`` workers with torchrun's own agent.

    Returns when every worker has finished; when one fails the agent stops the others at once
    (``max_restarts`` 0) and a ``FinebenchError`` names the failed worker.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc_per_node < 1:
        raise FinebenchError(f"--nproc-per-node {nproc_per_node}: expected 1 or more workers")
    if inside_torchrun():
        raise FinebenchError(
            "--nproc-per-node: this process is already a torchrun worker; leave the option out and let torchrun "
            "set the number of workers"
        )
    args = parse_args(torchrun_argv(nproc_per_node, worker_argv, rdzv_endpoint=rdzv_endpoint))
    try:
        run(args)
    except ChildFailedError as error:
        raise FinebenchError(describe_failure(error), exit_code=1) from None
