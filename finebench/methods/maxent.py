"""Maximum-Entropy fine-grained classification (Dubey et al., NeurIPS 2018, eq. 3).

The plain network trained with cross-entropy minus ``gamma`` times the entropy of its predicted
distribution, averaged over the batch: L = CE(p, y) − γ·H(p), H(p) = −Σ_k p_k log p_k. Penalising
confident predictions suits fine-grained sets, whose classes differ little, so a net trained to one
certain answer per image fits noise (the paper's argument).

There is no official code for this loss, so ``tests/test_method_hooks.py`` checks it against its
closed form on hand-computed distributions (docs/METHODS.md §4). It is a loss-only method: the network is
the baseline's and ``gamma`` reaches the loss through the bound method's ``options``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from finebench.methods.base import Method, MethodOptions
from finebench.methods.registry import register
from finebench.models.output import ModelOutput


class MaxEntOptions(MethodOptions):
    kind: Literal["maxent"]
    gamma: Annotated[float, Field(ge=0)] = 0.1
    """Weight of the entropy term (γ; the paper picks it per dataset by validation, 0.1 is in its range)."""


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean over rows of the entropy (nats) of each row's softmax."""
    log_probs = F.log_softmax(logits, dim=1)
    return -(log_probs.exp() * log_probs).sum(1).mean()


class MaxEnt(Method):
    kind = "maxent"
    description = "Maximum-Entropy loss: cross-entropy minus gamma times the prediction's entropy (Dubey et al. 2018)"
    Options = MaxEntOptions
    training_only_options = ("gamma",)

    def table_name(self, options: MaxEntOptions) -> str:  # type: ignore[override]
        return self.kind if options.gamma == MaxEntOptions.model_fields["gamma"].default else f"{self.kind}-g{options.gamma:g}"

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """CE − γ·H on one pass; the entropy term is the objective's, so ``evaluate``'s ``test_loss`` has it too."""
        logits = output.logits.to(torch.promote_types(output.logits.dtype, torch.float32))
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return ce - self.options.gamma * prediction_entropy(logits)

    def loss_terms(self, output: ModelOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            entropy = prediction_entropy(output.logits.detach().float())
        return {**super().loss_terms(output, labels), "train_entropy": entropy}


METHOD = register(MaxEnt())
