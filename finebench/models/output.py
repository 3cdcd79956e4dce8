"""The one output structure every finebench model returns.

Baselines, Attend and Rectify and the peer plug-ins all return ``ModelOutput`` so the training
engine, the evaluator and the report treat every variant alike. It is a NamedTuple (not a
dataclass) so that DDP, torch.compile and tracing see an ordinary tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ModelOutput(NamedTuple):
    log_probs: torch.Tensor
    """B×N mixed log-probabilities: what is trained with NLL and evaluated."""
    logits: torch.Tensor
    """B×N logits of the network's own classifier."""
    module_logits: tuple[torch.Tensor, ...] = ()
    """One B×N tensor per attention module, in the authors' source order (deepest tap first)."""
    gates: torch.Tensor | None = None
    """B×(D+1) mixing weights of the sources, or None for models without gates."""
    reg_loss: torch.Tensor | None = None
    """Training only: scalar already weighted by reg_w and averaged over modules; None in eval."""
    aux: tuple[torch.Tensor, ...] = ()
    """Method-specific tensors its own loss or training step reads (WS-DAN: pooled features and
    attention maps; CAL: effect logits too); the method's module documents their order."""


def mixture_loss(output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """NLL on the mixed log-probabilities plus the regulariser (Attend and Rectify's training loss)."""
    log_probs = output.log_probs.float()
    loss = F.nll_loss(log_probs, labels)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * log_probs.mean()
    if output.reg_loss is not None:
        loss = loss + output.reg_loss.float()
    return loss
