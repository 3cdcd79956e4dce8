"""The fit loop: train for ``train.epochs``, evaluate, write each epoch's row and checkpoint to the
caller's store, and resume from its checkpoint.

Speed rules (the engine is benchmarked against a plain PyTorch loop): no host sync inside a step
(loss and accuracy accumulate on the device; the losses are checked for NaN once per ``log_every``
steps and the progress display reads the running loss about once a second, ``DISPLAY_EVERY_S``),
non-blocking copies, ``zero_grad(set_to_none=True)``. Resume rule: a checkpoint at the end of
every epoch holds the model, optimiser, scheduler, grad scaler, every RNG state (python, numpy,
torch, CUDA, the loader's shuffling generator) and the epoch, so a resumed run repeats the
uninterrupted one exactly on CPU in fp32. Distributed seam: ``fit`` takes a ``DistContext``;
only rank 0 writes, and ``reduce_sum`` is where counts are summed across ranks. The caller (the
runner) supplies the store (``RunStore``), the progress display and the ``on_epoch`` callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods.base import Method
from finebench.predictions import PerImagePredictions
from finebench.train.evaluate import evaluate
from finebench.train.optim import build_optimizer, build_scheduler
from finebench.train.progress import DISPLAY_EVERY_S, Progress, SilentProgress
from finebench.train.rng import capture_rng_state, restore_rng_state
from finebench.train.runtime import (
    DistContext,
    Runtime,
    compile_model,
    place_model,
    resolve_runtime,
    synchronize_device,
)
from finebench.train.step import TrainStep, make_train_step
from finebench.train.threads import choose_threads, load_average
from finebench.train_settings import MACHINE_FIELDS, TrainSection


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the run cannot continue."""


@dataclass
class FitResult:
    status: str
    """``finished`` or ``failed``."""
    failure_reason: str | None
    rows: list[dict[str, Any]]
    epochs_completed: int
    train_time_s: float
    images_per_s: float
    """Training images per second, steps that compiled a graph left out (``compile_time_s``)."""
    precision: str
    device: torch.device
    confusion: list[list[int]] | None = None
    """Confusion matrix of the final evaluation (rows: true class); None when it did not run."""
    compiled: bool = False
    channels_last: bool = False
    compile_time_s: float = 0.0
    """Wall time of the training steps that compiled (the first of each batch shape per process)."""
    selected: dict[str, Any] | None = None
    """``train.select = "best_validation"``: the selected epoch, its validation top-1 and the test
    evaluation of its weights (``best.pt``); None for ``"last"``."""
    selected_confusion: list[list[int]] | None = None
    """The confusion matrix of that evaluation (``confusion`` stays the last epoch's)."""
    predictions: PerImagePredictions | None = None
    """Per-image predictions of the final evaluation (collected on every rank); None when it did not run."""


class RunStore(Protocol):
    """What ``fit`` needs from a run folder (``finebench.results.RunDir`` provides it)."""

    def read_metrics(self) -> list[dict[str, Any]]: ...
    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None: ...
    def save_checkpoint(self, state: Mapping[str, Any]) -> None: ...
    def load_checkpoint(self) -> dict[str, Any] | None: ...
    # ``train.select = "best_validation"`` only:
    def save_best(self, state: Mapping[str, Any]) -> None: ...
    def load_best(self) -> dict[str, Any] | None: ...


def _check_finite(losses: list[torch.Tensor], epoch: int, first_step: int, ctx: DistContext) -> None:
    """One host read for a whole log interval; names the first bad step when there is one.

    The count of bad losses is summed over ranks so that every rank stops at the same step.
    """
    if not losses:
        return
    stacked = torch.stack(losses)
    finite = torch.isfinite(stacked)
    if ctx.reduce_sum((~finite).sum().double()).item() == 0:
        return
    if bool(finite.all()):
        raise NonFiniteLoss(f"loss became non-finite on another rank at epoch {epoch} near step {first_step}")
    index = int((~finite).nonzero()[0, 0])
    value = stacked[index].item()
    raise NonFiniteLoss(f"loss became {value} at epoch {epoch} step {first_step + index}")


def _train_epoch(
    step: TrainStep, loader: Iterable, epoch: int, epochs: int, log_every: int, progress: Progress, ctx: DistContext
):
    steps = len(loader)  # type: ignore[arg-type]
    progress.start_epoch(epoch, epochs, steps)
    loss_sum = torch.zeros((), device=step.device, dtype=torch.float64)
    correct_sum = torch.zeros((), device=step.device, dtype=torch.float64)
    seen = 0
    pending: list[torch.Tensor] = []
    compile_s, compile_images = 0.0, 0
    start = time.perf_counter()
    shown = start
    for index, (images, labels) in enumerate(loader):
        if step.compiling(images):  # timed apart: compile time is not training throughput
            synchronize_device(step.device)
            compile_start = time.perf_counter()
            loss, correct = step(images, labels)
            synchronize_device(step.device)
            compile_s += time.perf_counter() - compile_start
            compile_images += labels.shape[0]
        else:
            loss, correct = step(images, labels)
        batch = labels.shape[0]
        loss_sum += loss.double() * batch
        correct_sum += correct
        seen += batch
        pending.append(loss)
        last = index + 1 == steps
        if len(pending) == log_every or last:
            _check_finite(pending, epoch, index + 1 - len(pending), ctx)
            pending = []
        if last or time.perf_counter() - shown >= DISPLAY_EVERY_S:
            loss_mean = loss_sum.item() / seen  # waits for the queued steps, so the rate below counts them
            shown = time.perf_counter()
            progress.update(
                index + 1,
                images_per_s=(seen - compile_images) / max(shown - start - compile_s, 1e-9),
                loss=loss_mean,
                lr=step.optimizer.param_groups[-1]["lr"],
            )
    synchronize_device(step.device)
    elapsed = time.perf_counter() - start - compile_s
    return loss_sum, correct_sum, seen, elapsed, compile_s, compile_images


def _check_same_checkpoint(checkpoint: Mapping[str, Any] | None, ctx: DistContext) -> None:
    """Every rank must resume from rank 0's epoch, else they would train different step counts and hang."""
    epoch = None if checkpoint is None else int(checkpoint["epoch"])
    main_epoch = ctx.broadcast(epoch)
    if epoch != main_epoch:
        found = "no checkpoint" if epoch is None else f"a checkpoint of epoch {epoch}"
        main = "starts afresh" if main_epoch is None else f"resumes from epoch {main_epoch}"
        raise FinebenchError(
            f"rank {ctx.rank} finds {found} but rank 0 {main}: keep the results folder "
            "on a filesystem that every machine shares"
        )


def fit(
    model: nn.Module,
    train_loader: Any,
    test_loader: Iterable,
    train: TrainSection,
    *,
    method: Method,
    store: RunStore | None = None,
    ctx: DistContext | None = None,
    progress: Progress | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
    on_epoch: Callable[[Mapping[str, Any], list[dict[str, Any]]], None] | None = None,
    runtime: Runtime | None = None,
    validation_loader: Iterable | None = None,
) -> FitResult:
    """Train for ``train.epochs``, resuming from the store's checkpoint when it has one.

    ``validation_loader`` (the run's ``dataset.validation``) is evaluated with the test split at each
    evaluation epoch (``val_loss``, ``val_top1`` in its row). ``train.select = "best_validation"``
    keeps the weights of the epoch with the highest validation top-1 (the earliest on a tie) in the
    store's ``best.pt``, written before ``last.pt``, whose ``selection`` entry is what a resume goes on
    from (a ``best.pt`` ahead of it is rewritten by the replayed epoch); after the last epoch those
    weights are evaluated on the test split (``FitResult.selected`` and ``selected_confusion``).

    The caller seeds the RNGs and builds the model and loaders; ``fit`` owns everything from the
    optimiser on. A NaN/inf loss ends the run with status ``failed`` instead of raising.
    ``on_epoch(row, rows)`` runs on rank 0 after each epoch's records are written (the runner's
    live summary and TensorBoard events). ``runtime``: the settings the caller resolved (and records);
    without it they are resolved here from ``train``. ``method``: the run's method, whose hooks
    decide the step (``Method.train_step``), the evaluation and its extra metrics fields.
    """
    ctx = ctx or DistContext()
    progress = progress or SilentProgress()
    runtime = runtime or resolve_runtime(train, attention=method.mixture)
    device, precision = runtime.device, runtime.precision
    compiled, channels_last = runtime.compiled, runtime.channels_last
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads.threads)
    place_model(model, train, runtime)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, len(train_loader))
    wrapped = ctx.wrap(model)
    trained_model = compile_model(wrapped) if compiled else wrapped
    # Under DDP evaluate the bare model: test shards may differ in size by one batch, and DDP's
    # forward would wait for a buffer broadcast from ranks that have already finished.
    eval_model = trained_model if wrapped is model else (compile_model(model) if compiled else model)
    step = make_train_step(trained_model, optimizer, scheduler, train, device, precision, method=method,
                           compiled=compiled, channels_last=channels_last)

    rows: list[dict[str, Any]] = []
    start_epoch, train_time, train_images, compile_time = 1, 0.0, 0, 0.0
    checkpoint = store.load_checkpoint() if store is not None else None
    _check_same_checkpoint(checkpoint, ctx)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step.scaler.load_state_dict(checkpoint["scaler"])
        # Each rank resumes its own random streams when the worker count is unchanged.
        per_rank = checkpoint.get("rng_ranks") or []
        restore_rng_state(per_rank[ctx.rank] if len(per_rank) == ctx.world_size else checkpoint["rng"], train_loader)
        start_epoch = int(checkpoint["epoch"]) + 1
        train_time, train_images = float(checkpoint["train_time_s"]), int(checkpoint["train_images"])
        compile_time = float(checkpoint.get("compile_time_s", 0.0))
        rows = [row for row in store.read_metrics() if row["epoch"] < start_epoch]
        progress.message(f"resuming from epoch {start_epoch - 1}")

    final_confusion: list[list[int]] | None = None
    selecting = train.select == "best_validation"
    if selecting and validation_loader is None:
        raise FinebenchError('train.select = "best_validation" needs a validation split (dataset.validation)')
    selection: dict[str, Any] | None = checkpoint.get("selection") if checkpoint is not None else None
    best_in_memory: dict[str, Any] | None = None  # without a store, the selected weights stay here
    selected: dict[str, Any] | None = None
    selected_confusion: list[list[int]] | None = None
    final_predictions: PerImagePredictions | None = None

    def result(status: str, reason: str | None, epochs_done: int) -> FitResult:
        throughput = train_images / train_time if train_time else 0.0
        return FitResult(
            status, reason, rows, epochs_done, train_time, throughput, precision, device,
            confusion=final_confusion, compiled=compiled, channels_last=channels_last, compile_time_s=compile_time,
            selected=selected, selected_confusion=selected_confusion, predictions=final_predictions,
        )

    def evaluate_split(loader: Iterable, *, confusion: bool, per_image: bool = False) -> dict[str, Any]:
        return evaluate(eval_model, loader, device=device, method=method, precision=precision,
                        channels_last=channels_last, ctx=ctx, confusion=confusion, per_image=per_image)

    for epoch in range(start_epoch, train.epochs + 1):
        if runtime.threads_each_epoch and epoch > start_epoch:  # the caller chose for the first one
            torch.set_num_threads(choose_threads(train.threads, workers_here=runtime.workers_here).threads)
        epoch_threads = torch.get_num_threads()
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        trained_model.train()
        step.epoch = epoch
        try:
            loss_sum, correct_sum, seen, elapsed, epoch_compile_s, compile_images = _train_epoch(
                step, train_loader, epoch, train.epochs, train.log_every, progress, ctx
            )
        except NonFiniteLoss as error:
            return result("failed", str(error), epoch - 1)
        method_counts = step.take_method_counts()
        loss_terms = step.take_loss_terms()
        counts = ctx.reduce_sum(
            torch.stack([loss_sum, correct_sum, loss_sum.new_tensor(seen), loss_sum.new_tensor(compile_images)])
        ).tolist()
        timed_images = counts[2] - counts[3]
        train_time += elapsed
        train_images += int(timed_images)
        compile_time += epoch_compile_s
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": counts[0] / counts[2],
            "train_top1": 100.0 * counts[1] / counts[2],
            **({} if method_counts is None
               else method.train_metrics(ctx.reduce_sum(method_counts).tolist(), counts[2])),
            **({} if not loss_terms else  # the method's logged loss terms: means over the epoch's images
               dict(zip(loss_terms, (total / counts[2] for total in
                                     ctx.reduce_sum(torch.stack(list(loss_terms.values()))).tolist()), strict=True))),
            "lr": optimizer.param_groups[-1]["lr"],
            "epoch_time_s": elapsed,
            "images_per_s": timed_images / elapsed if elapsed else 0.0,
            "threads": epoch_threads,
            "load_1min": load_average(),
        }
        if epoch % train.eval_every == 0 or epoch == train.epochs:
            metrics = evaluate_split(test_loader, confusion=epoch == train.epochs, per_image=epoch == train.epochs)
            final_confusion = metrics.pop("confusion", None)
            final_predictions = metrics.pop("per_image", None)
            if validation_loader is not None:
                held_out = evaluate_split(validation_loader, confusion=False)
                metrics.update(val_loss=held_out["test_loss"], val_top1=held_out["test_top1"])
            trained = {k: v for k, v in row.items() if k not in ("lr", *MACHINE_FIELDS)}
            row = {**trained, **metrics, **{k: row[k] for k in ("lr", *MACHINE_FIELDS)}}
            if not math.isfinite(row["test_loss"]):
                rows.append(row)
                if store is not None and ctx.is_main:
                    store.write_metrics(rows)
                return result("failed", f"test loss became {row['test_loss']} at epoch {epoch}", epoch)
            rows.append(row)
            if selecting and (selection is None or row["val_top1"] > selection["val_top1"]):
                selection = {"epoch": epoch, "val_top1": row["val_top1"]}
                best = {**selection, "model": model.state_dict()}
                if store is None:
                    best_in_memory = {**selection, "model": {k: v.detach().clone() for k, v in best["model"].items()}}
                elif ctx.is_main:
                    store.save_best(best)  # before last.pt: a kill between the two replays this epoch
        progress.end_epoch(row)
        rng = capture_rng_state(train_loader) if store is not None else {}
        rng_ranks = ctx.gather(rng) if store is not None and ctx.world_size > 1 else []
        if store is not None and ctx.is_main:
            store.write_metrics(rows)
            store.save_checkpoint(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": step.scaler.state_dict(),
                    "rng": rng,
                    "rng_ranks": rng_ranks,
                    "train_time_s": train_time,
                    "train_images": train_images,
                    "compile_time_s": compile_time,
                    **({"selection": selection} if selecting else {}),
                    **dict(checkpoint_extra or {}),
                }
            )
        if on_epoch is not None and ctx.is_main:
            on_epoch(row, rows)
    if selecting:
        selected, selected_confusion = _evaluate_selected(model, store, best_in_memory, selection, ctx,
                                                       lambda: evaluate_split(test_loader, confusion=True))
    return result("finished", None, train.epochs)


def _evaluate_selected(
    model: nn.Module, store: RunStore | None, in_memory: Mapping[str, Any] | None, selection: Mapping[str, Any] | None,
    ctx: DistContext, evaluate_test: Callable[[], dict[str, Any]],
) -> tuple[dict[str, Any] | None, list[list[int]] | None]:
    """The selected epoch's weights into ``model`` and their test evaluation: the run's final one."""
    ctx.barrier()  # rank 0's best.pt is complete before any rank reads it
    best = in_memory if store is None else store.load_best()
    if best is None or selection is None:
        return None, None
    if int(best["epoch"]) != int(selection["epoch"]):
        raise FinebenchError(f"best.pt holds epoch {best['epoch']} but the last checkpoint selected epoch "
                             f"{selection['epoch']}: the run's records disagree; rerun with --restart")
    model.load_state_dict(best["model"])
    metrics = evaluate_test()
    confusion = metrics.pop("confusion", None)
    return {"rule": "best_validation", "epoch": int(selection["epoch"]), "val_top1": selection["val_top1"],
            **metrics}, confusion
