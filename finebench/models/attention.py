"""Attend and Rectify (Rodriguez et al., TMM 2020): gated attention modules on a backbone's taps.

Follows the authors' code (prlz77/attend-and-rectify) numerically; docs/MECHANISM.md §1 states the
mechanism (§3: what equals their released code). Per module on a B×C×H×W tap with K heads and N classes:

* attention head: 3x3 conv to K maps, softmax over the H·W positions (not over channels);
* output head: 3x3 conv to K·N class maps, read out as a mask-weighted spatial sum;
* module gate: 3x3 conv to K scores, read out with the same masks, softmax(tanh(.)) over heads.

The D module outputs and the network's own logits are mixed per class as log-probabilities,
weighted by a global gate tanh(BN1d(Linear)) on the pooled final features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finebench.models.output import ModelOutput

GATE_FUNCTIONS = ("softmax", "sigmoid", "none")
OUTPUT_MODES = ("mixture", "50")
SIGMOID_EPS = 1e-6
"""The authors' guard against an all-zero sigmoid gate sum."""


def spatial_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the H·W positions of each map, so each B×K mask sums to one over space."""
    return F.softmax(scores.flatten(2), dim=2).view_as(scores)


class AttentionModule(nn.Module):
    """One Attend and Rectify module: K attention heads, their class hypotheses and a module gate.

    Parameters: 9·C·K (attention) + 9·C·K·N (output) + 9·C·K (gate) = 9·C·K·(N+2).
    """

    def __init__(self, channels: int, num_classes: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.num_classes = num_classes
        self.attention_head = nn.Conv2d(channels, heads, 3, padding=1, bias=False)
        self.output_head = nn.Conv2d(channels, heads * num_classes, 3, padding=1, bias=False)
        self.gate_head = nn.Conv2d(channels, heads, 3, padding=1, bias=False)
        for conv in (self.attention_head, self.output_head, self.gate_head):
            nn.init.kaiming_normal_(conv.weight)
        self.register_buffer("off_diagonal", 1.0 - torch.eye(heads).unsqueeze(0), persistent=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (module logits B×N, masks B×K×H×W)."""
        heads, classes = self.heads, self.num_classes
        # The three heads read the same input, so they run as one K·(N+2)-channel convolution: the
        # same multiply-adds, but no K-channel convolutions, which oneDNN runs far below its peak
        # (measured: benchmarks/attention_overhead.py). The weights stay three parameters.
        weight = torch.cat([self.attention_head.weight, self.output_head.weight, self.gate_head.weight])
        maps = F.conv2d(features, weight, padding=1)
        masks = spatial_softmax(maps[:, :heads])
        # One GEMM reads out every map against every mask and head k keeps its own block: K times
        # the multiply-adds of a per-head sum, but a real matrix product on the whole (NCHW or
        # channels_last) conv output in place, where a per-head einsum is a slow batched
        # matrix-vector product, and a slice of the output would be copied.
        read = torch.bmm(maps.flatten(2), masks.flatten(2).transpose(1, 2))  # B×K·(N+2)×K
        class_reads, gate_reads = read[:, heads:].split([heads * classes, heads], dim=1)
        head_logits = class_reads.unflatten(1, (heads, classes)).diagonal(dim1=1, dim2=3)  # B×N×K
        head_weights = F.softmax(torch.tanh(gate_reads.diagonal(dim1=1, dim2=2)), dim=1)
        return torch.einsum("bnk,bk->bn", head_logits, head_weights), masks

    def head_weights(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Module gate: B×K weights of the heads, softmax over heads of tanh(Σ_xy M_k·S_k).

        For tools drawing the attention (``finebench attend``); ``masks`` are the ones ``forward``
        returned for ``features``, and ``forward`` computes the same weights in its fused read-out.
        """
        head_scores = torch.einsum("bkhw,bkhw->bk", self.gate_head(features), masks)
        return F.softmax(torch.tanh(head_scores), dim=1)

    def mask_overlap(self, masks: torch.Tensor) -> torch.Tensor:
        """Inter-head regulariser (unweighted): mean of the squared off-diagonal Gram entries
        of the 2x2 average-pooled masks, averaged over the batch and all K×K entries."""
        pooled = F.avg_pool2d(masks, 2, 2).flatten(2)
        gram = torch.bmm(pooled, pooled.transpose(1, 2)) * self.off_diagonal
        return gram.pow(2).mean()


class GlobalGate(nn.Module):
    """tanh(BN1d(Linear(C_last, sources))) on the pooled features the classifier also reads."""

    def __init__(self, channels: int, sources: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, sources, bias=False)
        nn.init.kaiming_normal_(self.linear.weight)
        self.bn = nn.BatchNorm1d(sources)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.linear(pooled)))


class AttendAndRectify(nn.Module):
    """D attention modules on named taps plus the global gate that mixes them with the network.

    ``taps`` lists (tap name, channels) in source order, deepest first. ``output_mode="mixture"``
    gates D+1 sources (modules, then the network); ``"50"`` gates the D modules only and averages
    that mixture with the network's log-probabilities at a fixed 0.5, as the authors' first
    (cluttered MNIST) model did.
    """

    def __init__(
        self,
        taps: Sequence[tuple[str, int]],
        final_channels: int,
        num_classes: int,
        attention_width: int = 4,
        gates: str = "softmax",
        reg_w: float = 1e-3,
        output_mode: str = "mixture",
    ) -> None:
        super().__init__()
        if gates not in GATE_FUNCTIONS:
            raise ValueError(f"gates={gates!r}: expected one of {GATE_FUNCTIONS}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={output_mode!r}: expected one of {OUTPUT_MODES}")
        self.taps = [name for name, _ in taps]
        self.gates = gates
        self.reg_w = reg_w
        self.output_mode = output_mode
        self.attention_modules = nn.ModuleList(
            AttentionModule(channels, num_classes, attention_width) for _, channels in taps
        )
        sources = len(taps) + (1 if output_mode == "mixture" else 0)
        self.global_gate = GlobalGate(final_channels, sources) if gates != "none" else None

    def mix(self, log_probs: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted sum of B×S×N source log-probabilities; returns (mixture, weights or None)."""
        if self.global_gate is None:
            return log_probs.mean(1), None
        scores = self.global_gate(pooled).float()
        if self.gates == "softmax":
            weights = F.softmax(scores, dim=1)
        else:
            squashed = torch.sigmoid(scores)
            weights = squashed / (SIGMOID_EPS + squashed.sum(1, keepdim=True))
        # elementwise, not einsum: autocast would run einsum in bf16 and round the log-probabilities
        return (log_probs * weights.unsqueeze(2)).sum(1), weights

    def forward(self, taps: Mapping[str, torch.Tensor], pooled: torch.Tensor, logits: torch.Tensor) -> ModelOutput:
        """``gates`` are the effective B×(D+1) source weights (modules deepest first, then the
        network), so ``log_probs = Σ_i gates_i · log_softmax(source_i)`` in every mode; None without gates."""
        module_logits: list[torch.Tensor] = []
        overlaps: list[torch.Tensor] = []
        want_reg = self.training and self.reg_w > 0
        for name, module in zip(self.taps, self.attention_modules, strict=True):
            prediction, masks = module(taps[name])
            module_logits.append(prediction)
            if want_reg:
                overlaps.append(module.mask_overlap(masks))
        # log-probabilities and their mixture in float32 even under autocast: they feed the NLL
        network_log_probs = F.log_softmax(logits.float(), dim=1)
        if self.output_mode == "mixture":
            sources = F.log_softmax(torch.stack([*module_logits, logits], dim=1).float(), dim=2)
            log_probs, weights = self.mix(sources, pooled)
        else:
            sources = F.log_softmax(torch.stack(module_logits, dim=1).float(), dim=2)
            attention_log_probs, module_weights = self.mix(sources, pooled)
            log_probs = 0.5 * (attention_log_probs + network_log_probs)
            weights = None
            if module_weights is not None:
                weights = torch.cat([0.5 * module_weights, torch.full_like(module_weights[:, :1], 0.5)], dim=1)
        reg_loss = self.reg_w * torch.stack(overlaps).mean() if want_reg else None
        return ModelOutput(log_probs, logits, tuple(module_logits), weights, reg_loss)
