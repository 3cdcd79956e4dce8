"""The evaluation of a split: loss, top-1, top-5, a mixture model's network and module top-1, the
method's own counts, and on request the confusion matrix and each image's top classes; every count
summed over ranks (``DistContext.reduce_sum``), so the figures are exact under DDP."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods.base import Method
from finebench.models.output import ModelOutput
from finebench.predictions import SHOWN_PREDICTION, TOP_K, PerImagePredictions
from finebench.train.runtime import DistContext, autocast, to_device


def tap_names(model: nn.Module, count: int) -> list[str]:
    taps = list(getattr(model, "attention_taps", []) or [])
    return taps if len(taps) == count else [f"module{i}" for i in range(count)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    method: Method,
    precision: str = "fp32",
    channels_last: bool = False,
    ctx: DistContext | None = None,
    confusion: bool = False,
    per_image: bool = False,
) -> dict[str, Any]:
    """Loss, top-1, top-5 and, for attention models, the network's and each module's own top-1.

    ``confusion``: also the N×N confusion matrix (rows: true class, columns: top-1 prediction),
    summed over ranks like the other counts, so per-class figures are exact under DDP too.
    The method decides the prediction (``predict``), what top-1 reads (``scores``) and ``test_loss``
    (its training ``loss`` without the regulariser); a mixture method's network and modules are
    counted too (``Method.mixture``).
    ``per_image``: also ``per_image``, each image's top classes for every prediction the model makes
    (``PerImagePredictions``), read off the outputs this evaluation computes anyway.
    """
    ctx = ctx or DistContext()
    mixture = method.mixture
    model.eval()
    totals: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    module_count = 0
    collected: list[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
    for images, labels in loader:
        images, labels = to_device(images, labels, device, channels_last)
        with autocast(device, precision):
            output = method.predict(model, images)
        scores = method.scores(output).float()
        loss = method.loss(output._replace(reg_loss=None), labels) * labels.numel()
        top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
        row = [
            labels.new_tensor(labels.numel(), dtype=torch.float64),
            loss.double(),
            (top5[:, 0] == labels).sum().double(),
            (top5 == labels[:, None]).any(dim=1).sum().double(),
        ]
        if mixture:
            module_count = len(output.module_logits)
            row.append((output.logits.argmax(dim=1) == labels).sum().double())
            row.extend((m.argmax(dim=1) == labels).sum().double() for m in output.module_logits)
        row.extend(count.double() for count in method.eval_counts(output, labels))
        batch = torch.stack(row)
        totals = batch if totals is None else totals + batch
        if confusion:
            classes = scores.shape[1]
            counts = torch.bincount(labels * classes + top5[:, 0], minlength=classes * classes)
            matrix = counts if matrix is None else matrix + counts
        if per_image:
            unwrapped = getattr(model, "module", model)
            modules = tap_names(getattr(unwrapped, "_orig_mod", unwrapped), module_count) if mixture else []
            collected.append((labels, _top_classes(scores, top5, output, method, modules)))
    if totals is None:
        raise FinebenchError("the test split is empty: nothing to evaluate")
    values = ctx.reduce_sum(totals).tolist()
    count = values[0]
    result: dict[str, Any] = {
        "test_loss": values[1] / count,
        "test_top1": 100.0 * values[2] / count,
        "test_top5": 100.0 * values[3] / count,
        "network_top1": None,
        "module_top1": {},
    }
    if mixture:
        unwrapped = getattr(model, "module", model)
        result["network_top1"] = 100.0 * values[4] / count
        names = tap_names(getattr(unwrapped, "_orig_mod", unwrapped), module_count)
        result["module_top1"] = {name: 100.0 * v / count for name, v in zip(names, values[5:5 + module_count])}
    result.update(method.eval_metrics(values[4 + (1 + module_count if mixture else 0):], count, model))
    if matrix is not None:
        classes = math.isqrt(matrix.numel())
        result["confusion"] = ctx.reduce_sum(matrix.double()).view(classes, classes).long().tolist()
    if per_image:
        result["per_image"] = _gather_per_image(collected, ctx)
    return result


def _top_classes(scores: torch.Tensor, top5: torch.Tensor, output: ModelOutput, method: Method,
                 module_names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batch's top classes and their softmax probabilities per prediction, left on the device
    (no host sync per batch). The shown prediction keeps the evaluator's own ``top5``, so its first
    class is the top-1 the metrics counted; the others (A&R's network and modules, named as
    summary.json's ``network_top1`` and ``module_top1`` entries, and the method's ``prediction_logits``)
    take their own top-k."""
    def top(values: torch.Tensor, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        values = values.float()
        if indices is None:
            indices = values.topk(min(TOP_K, values.shape[1]), dim=1).indices
        return indices, torch.softmax(values, dim=1).gather(1, indices)

    found = {SHOWN_PREDICTION: top(scores, top5)}
    if module_names:
        found["network_top1"] = top(output.logits)
        found.update((f"module_top1.{name}", top(logits))
                     for name, logits in zip(module_names, output.module_logits, strict=True))
    found.update((name, top(logits)) for name, logits in method.prediction_logits(output).items())
    return found


def _gather_per_image(collected: list[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]],
                      ctx: DistContext) -> PerImagePredictions:
    """Every rank's batches as one ``PerImagePredictions`` in id order. The test loaders shard as
    ``range(rank, N, world_size)`` in store order (``finebench.data.loader``), which is what gives
    each image its id here."""
    names = list(collected[0][1])
    labels = torch.cat([batch_labels for batch_labels, _ in collected]).cpu().numpy()
    classes = [torch.cat([found[name][0] for _, found in collected]).cpu().numpy() for name in names]
    probs = [torch.cat([found[name][1] for _, found in collected]).cpu().numpy() for name in names]
    parts = ctx.gather((labels, classes, probs)) if ctx.world_size > 1 else [(labels, classes, probs)]
    ids = np.concatenate([rank + ctx.world_size * np.arange(len(part[0])) for rank, part in enumerate(parts)])
    order = np.argsort(ids, kind="stable")

    def joined(field: int, index: int) -> np.ndarray:
        return np.concatenate([part[field][index] for part in parts])[order]

    return PerImagePredictions(
        ids[order].astype(np.int64), np.concatenate([part[0] for part in parts])[order].astype(np.int64),
        {name: joined(1, i).astype(np.int64) for i, name in enumerate(names)},
        {name: joined(2, i).astype(np.float32) for i, name in enumerate(names)},
    )
