"""The one output structure every finebench model returns.

Baselines, Attend and Rectify and the peer plug-ins all return ``ModelOutput`` so the training
engine, the evaluator and the report treat every variant alike. It is a NamedTuple (not a
dataclass) so that DDP, torch.compile and tracing see an ordinary tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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
