"""BatchNorm as the authors' runs had it: ghost BatchNorm, and PyTorch 0.4's initial weights.

Ghost BatchNorm: batch statistics over groups of N images of one device's batch.

The authors trained with ``DataParallel``: each GPU's replica normalised its share of the batch
(64 images on the 2 GPUs of every CIFAR log, 16 on the ImageNet run's 8) with that share's
statistics, and the running statistics kept were replica 0's, i.e. its first share's.
``convert_ghost_batchnorm`` reproduces that on one device: a training batch is split into
consecutive groups of ``group_size`` images, each normalised with its own statistics, and only
the first group updates the running statistics. Evaluation is unchanged (running statistics).
The last, short batch of an epoch is split into full groups and a remainder, where
``DataParallel`` split it evenly over its GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def ghost_batch_norm(bn: nn.BatchNorm1d | nn.BatchNorm2d, x: torch.Tensor, group_size: int,
                     forward: nn.Module) -> torch.Tensor:
    """``forward`` (the BatchNorm's own) on the first group; the other groups use their own
    statistics and leave the running ones alone, as DataParallel's replicas 1..n-1 did."""
    if not bn.training or x.shape[0] <= group_size:
        return forward(x)
    first, *rest = x.split(group_size)
    outputs = [forward(first)]
    outputs += [F.batch_norm(part, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for part in rest]
    return torch.cat(outputs)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics come from groups of ``group_size`` images."""

    group_size: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ghost_batch_norm(self, x, self.group_size, super().forward)


class GhostBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics come from groups of ``group_size`` rows."""

    group_size: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ghost_batch_norm(self, x, self.group_size, super().forward)


_GHOST = {nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm1d: GhostBatchNorm1d}


def convert_ghost_batchnorm(module: nn.Module, group_size: int) -> nn.Module:
    """Every ``BatchNorm1d``/``BatchNorm2d`` below ``module`` becomes its ghost version, in place.

    The new modules hold the very same parameter and buffer objects under the same names, so
    state dicts, checkpoints and an optimiser built before the conversion are unaffected.
    """
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: expected an integer >= 1")
    for name, child in module.named_children():
        ghost_type = _GHOST.get(type(child))
        if ghost_type is None:
            convert_ghost_batchnorm(child, group_size)
            continue
        ghost = ghost_type.__new__(ghost_type)
        ghost.__dict__.update(child.__dict__)  # parameters, buffers, hooks and settings, shared not copied
        ghost.group_size = group_size
        module.add_module(name, ghost)
    return module


BatchNormInit = Literal["ones", "uniform"]
BATCHNORM_INITS: tuple[BatchNormInit, ...] = ("ones", "uniform")
"""A new BatchNorm's weight (``model.batchnorm_init``): ``ones`` (PyTorch >= 1.2, the default) or
``uniform`` in [0, 1), as PyTorch 0.4 drew it for the authors' logged runs (docs/MECHANISM.md §4)."""


@contextmanager
def initial_batchnorm_weights(init: BatchNormInit) -> Iterator[None]:
    """Every BatchNorm constructed inside starts with weights ``init``; biases stay zero.

    ``uniform`` reproduces PyTorch 0.4's ``_BatchNorm.reset_parameters`` (``weight.data.uniform_()``,
    replaced by ones in 1.2, pytorch/pytorch#12259): the draw is made where 0.4 made it, in the
    BatchNorm's constructor, from the global generator. The model's own init then runs on that
    stream in 0.4's order: each BatchNorm's draw lands between the default draws of the layers
    built before and after it, and an init applied after construction (WRN's Kaiming-normal
    pass over its convolutions) follows the draws of every layer built before it. A BatchNorm
    whose weights are then loaded (a pretrained backbone) drew too, as in 0.4, and keeps them.
    What the authors' runs drew cannot be replayed: their scripts set no seed, and finebench's
    convolutions draw their Kaiming init after construction where theirs did it per layer, so
    this reproduces 0.4's BatchNorm init for finebench's model, the same distribution as theirs.

    The patch is on torch's class while the block runs: build models inside it on one thread.
    """
    if init not in BATCHNORM_INITS:
        raise ValueError(f"batchnorm_init={init!r}: expected one of {BATCHNORM_INITS}")
    if init == "ones":
        yield
        return
    own = _BatchNorm.__dict__.get("reset_parameters")  # None: inherited from _NormBase
    released = _BatchNorm.reset_parameters

    def reset_parameters(self: _BatchNorm) -> None:
        released(self)  # running statistics reset, weight ones, bias zero: no draw
        if self.affine:
            with torch.no_grad():
                self.weight.uniform_()

    _BatchNorm.reset_parameters = reset_parameters  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del _BatchNorm.reset_parameters
        else:
            _BatchNorm.reset_parameters = own  # type: ignore[method-assign]
