"""Optimisers, parameter groups and learning-rate schedules from a recipe's ``train`` section.

The schedule is a per-step ``LambdaLR`` whose factor is a pure function of the step, so its whole
state is one integer: resuming restores it exactly, and warmup is smooth rather than per epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from torch import nn

from finebench.train_settings import TrainSection


def _parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Backbone/head split from the models package; every parameter counts as head without one."""
    try:
        from finebench.models import parameter_groups

        groups = parameter_groups(model)
    except (ImportError, TypeError):  # not a finebench model (benchmarks, tests): one group
        return {"backbone": [], "head": [p for p in model.parameters() if p.requires_grad]}
    return {name: [p for p in params if p.requires_grad] for name, params in groups.items()}


def build_optimizer(model: nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    """SGD (plain or Nesterov) or AdamW, with the backbone at ``backbone_lr_mult`` × lr."""
    groups = []
    for name, params in _parameter_groups(model).items():
        if not params:
            continue
        mult = train.backbone_lr_mult if name == "backbone" else 1.0
        groups.append({"params": params, "lr": train.lr * mult, "name": name, "lr_mult": mult})
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        nesterov=train.optimizer == "nesterov" and train.momentum > 0,
    )


def lr_factor_fn(train: TrainSection, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr multiplier at a global step: linear warmup, then the recipe's decay (in epochs)."""
    total = train.epochs * steps_per_epoch
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    min_factor = train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.lr_updates == "epoch":
            step -= step % steps_per_epoch  # the decay as it stood at this epoch's first batch
        epoch = step / steps_per_epoch
        if train.schedule == "constant":
            return 1.0
        if train.schedule == "step":
            return train.gamma ** int(epoch // train.step_size)
        if train.schedule == "multistep":
            return train.gamma ** bisect.bisect_right(train.milestones, int(epoch))
        if train.schedule == "exponential":
            return train.gamma ** (epoch / train.step_size)
        progress = max(0, step - warmup) / max(1, total - warmup)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSection, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimiser step; the lambda scales each group's own (multiplied) lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(train, steps_per_epoch))
