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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finebench.models.attention_op import attention_readout
from finebench.models.base import Backbone
from finebench.models.output import ModelOutput

GATE_FUNCTIONS = ("softmax", "sigmoid", "none")
OUTPUT_MODES = ("mixture", "50")
REG_MASKS = ("pooled", "full")
"""The masks the regulariser's Gram matrices read: average-pooled 2x2 (released code, from
painless-attention 738122b on) or the full masks (every logged run but the CIFAR dropout run)."""
TAP_NORMS = ("shared", "separate")
"""Where a CIFAR WRN module reads groups 0/1: the next block's pre-activation (released code) or
``relu(BatchNorm_i(group output))`` with a BatchNorm of its own (painless-attention ea7d4af, 1bf9ecf)."""
READOUTS = ("eager", "custom_op")
"""How a module reads its maps out: ordinary ops (default) or one ``torch.library`` operator with a
closed-form backward that torch.compile treats as one node (``finebench.models.attention_op``)."""
SIGMOID_EPS = 1e-6
"""The authors' guard against an all-zero sigmoid gate sum."""


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32: autocast's bf16/fp16 scores are mixed in float32, while a float32 or
    float64 model keeps its own precision (no dispatcher call in the common fp32 step; a float64
    model, as gradcheck uses, must not be rounded to float32 here)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


HEAD_WEIGHT_NAMES = ("attention_head", "output_head", "gate_head")
"""The three heads' weights as separate convolutions (the authors' layout, and finebench's
state dicts before the heads were fused); ``AttentionModule`` still loads them."""


def fuse_head_weights(attention: torch.Tensor, output: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The fused K·(N+2)-channel weight from the three heads' weights (K, K·N and K out-channels).

    Order: the K attention channels, then per head k its N class channels followed by its gate
    channel, so that one reshape of the read-out puts each head's classes and gate side by side.
    """
    heads = attention.shape[0]
    per_head = torch.cat([output.unflatten(0, (heads, -1)), gate.unsqueeze(1)], dim=1)
    return torch.cat([attention, per_head.flatten(0, 1)])


class AttentionModule(nn.Module):
    """One Attend and Rectify module: K attention heads, their class hypotheses and a module gate.

    Parameters: 9·C·K (attention) + 9·C·K·N (output) + 9·C·K (gate) = 9·C·K·(N+2), held as one
    K·(N+2)-channel convolution ``conv`` (layout: ``fuse_head_weights``).
    """

    def __init__(
        self, channels: int, num_classes: int, heads: int = 4, reg_masks: str = "pooled", readout: str = "eager"
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r}: expected one of {READOUTS}")
        self.heads = heads
        self.readout_op = readout == "custom_op"
        self.pool_reg_masks = reg_masks == "pooled"
        self.num_classes = num_classes
        # The three heads read the same input, so they are one convolution: the same multiply-adds,
        # but one kernel instead of three (K-channel convolutions run far below oneDNN's peak) and
        # one parameter instead of a ``cat`` of three each step (benchmarks/op_count.py).
        self.conv = nn.Conv2d(channels, heads * (num_classes + 2), 3, padding=1, bias=False)
        parts = [torch.empty(rows, channels, 3, 3) for rows in (heads, heads * num_classes, heads)]
        for part in parts:  # each head initialised as its own convolution was (same fan-in, same draws)
            nn.init.kaiming_normal_(part)
        with torch.no_grad():
            self.conv.weight.copy_(fuse_head_weights(*parts))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(heads).unsqueeze(0), persistent=False)
        self.register_load_state_dict_pre_hook(_fuse_legacy_head_weights)

    @property
    def attention_weight(self) -> torch.Tensor:
        """K×C×3×3: the attention head's filters (a view of ``conv.weight``)."""
        return self.conv.weight[: self.heads]

    @property
    def output_weight(self) -> torch.Tensor:
        """K·N×C×3×3: the output head's filters, head-major (a copy)."""
        return self._per_head()[:, : self.num_classes].flatten(0, 1)

    @property
    def gate_weight(self) -> torch.Tensor:
        """K×C×3×3: the module gate's filters (a view of ``conv.weight``)."""
        return self._per_head()[:, self.num_classes]

    def _per_head(self) -> torch.Tensor:
        return self.conv.weight[self.heads :].unflatten(0, (self.heads, self.num_classes + 1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (module logits B×N, masks B×K×H×W)."""
        heads, classes = self.heads, self.num_classes
        maps = self.conv(features)
        if self.readout_op:  # one opaque node for torch.compile (finebench.models.attention_op)
            logits, masks = attention_readout(maps, heads)
            return logits, masks.unflatten(2, maps.shape[2:])
        flat = maps.flatten(2)
        masks = F.softmax(flat[:, :heads], dim=2)
        # One GEMM reads out every map against every mask and head k keeps its own block: K times
        # the multiply-adds of a per-head sum, but a real matrix product on the (NCHW or
        # channels_last) conv output in place, where a per-head einsum is a slow batched
        # matrix-vector product that first copies the maps. The whole output, attention maps
        # included (K×K more entries): oneDNN copies a channel slice of it before a bf16 GEMM
        # (+2 to +5 % step time at N = 100 on CPU, benchmarks/attention_overhead.py).
        read = torch.bmm(flat, masks.mT)[:, heads:]  # B×K·(N+1)×K
        class_reads, gate_reads = read.unflatten(1, (heads, classes + 1)).diagonal(dim1=1, dim2=3).split(
            [classes, 1], dim=1
        )  # B×N×K, B×1×K
        head_weights = F.softmax(torch.tanh(gate_reads), dim=2)
        return (class_reads * head_weights).sum(2), masks.unflatten(2, maps.shape[2:])

    def head_outputs(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """B×K×N: each head's own class scores (the maps read out under its mask), before the module
        gate weighs them; ``forward``'s logits are their sum weighted by ``head_weights``.

        For tools drawing the attention: the heads' gates are often alike (0.5 ± 3e-5 in a trained
        CIFAR run), while what each head says about the image tells them apart."""
        heads, classes = self.heads, self.num_classes
        flat = self.conv(features).flatten(2)
        read = torch.bmm(flat, masks.flatten(2).mT)[:, heads:]
        class_reads = read.unflatten(1, (heads, classes + 1)).diagonal(dim1=1, dim2=3)[:, :classes]  # B×N×K
        return class_reads.transpose(1, 2)

    def head_weights(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Module gate: B×K weights of the heads, softmax over heads of tanh(Σ_xy M_k·S_k).

        For tools drawing the attention (``finebench attend``); ``masks`` are the ones ``forward``
        returned for ``features``, and ``forward`` computes the same weights in its fused read-out.
        """
        gate_scores = F.conv2d(features, self.gate_weight, padding=1)
        head_scores = torch.einsum("bkhw,bkhw->bk", gate_scores, masks)
        return F.softmax(torch.tanh(head_scores), dim=1)

    def mask_overlap(self, masks: torch.Tensor) -> torch.Tensor:
        """Inter-head regulariser (unweighted): mean of the squared off-diagonal Gram entries
        of the 2x2 average-pooled (or, ``reg_masks="full"``, the whole) masks, averaged over the
        batch and all K×K entries."""
        return self.weighted_overlap(masks, self.off_diagonal) / (masks.shape[0] * self.heads**2)

    def weighted_overlap(self, masks: torch.Tensor, entry_weights: torch.Tensor) -> torch.Tensor:
        """Σ over the batch and the K×K entries of w_ij·G_ij², G the Gram matrix of the 2x2
        average-pooled masks; ``entry_weights`` (1×K×K) carries the off-diagonal 0/1 mask and any
        constant factors (loss weight, mean), so the training step spends no kernel on them."""
        pooled = (F.avg_pool2d(masks, 2, 2) if self.pool_reg_masks else masks).flatten(2)
        gram = torch.bmm(pooled, pooled.mT)
        return (gram * gram * entry_weights).sum()  # the mask is 0/1, so (G·mask)² = G²·mask


def _fuse_legacy_head_weights(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    """Load hook: three separate head weights (the authors' layout, older finebench checkpoints)
    become the fused ``conv.weight``; a state dict holding only some of them is left for the strict
    load to report."""
    keys = [f"{prefix}{name}.weight" for name in HEAD_WEIGHT_NAMES]
    if all(key in state_dict for key in keys):
        state_dict[f"{prefix}conv.weight"] = fuse_head_weights(*(state_dict.pop(key) for key in keys))


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
        reg_masks: str = "pooled",
        readout: str = "eager",
    ) -> None:
        super().__init__()
        if reg_masks not in REG_MASKS:
            raise ValueError(f"reg_masks={reg_masks!r}: expected one of {REG_MASKS}")
        if gates not in GATE_FUNCTIONS:
            raise ValueError(f"gates={gates!r}: expected one of {GATE_FUNCTIONS}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={output_mode!r}: expected one of {OUTPUT_MODES}")
        self.taps = [name for name, _ in taps]
        self.gates = gates
        self.reg_w = reg_w
        self.output_mode = output_mode
        self.attention_modules = nn.ModuleList(
            AttentionModule(channels, num_classes, attention_width, reg_masks, readout) for _, channels in taps
        )
        sources = len(taps) + (1 if output_mode == "mixture" else 0)
        self.global_gate = GlobalGate(final_channels, sources) if gates != "none" else None

    @classmethod
    def on_backbone(cls, backbone: Backbone, num_classes: int, taps: Sequence[str], **options: Any) -> AttendAndRectify:
        """Modules on the named taps of ``backbone`` (deepest first), sized from its tap declarations."""
        return cls([(tap, backbone.tap_point(tap).channels) for tap in taps], backbone.out_channels, num_classes,
                   **options)

    def mix(self, log_probs: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted sum of B×S×N source log-probabilities; returns (mixture, weights or None)."""
        if self.global_gate is None:
            return log_probs.mean(1), None
        scores = as_float32(self.global_gate(pooled))
        if self.gates == "softmax":
            weights = F.softmax(scores, dim=1)
        else:
            squashed = torch.sigmoid(scores)
            weights = squashed / (SIGMOID_EPS + squashed.sum(1, keepdim=True))
        # elementwise, not einsum: autocast would run einsum in bf16 and round the log-probabilities
        return (log_probs * weights.unsqueeze(2)).sum(1), weights

    def _overlap_weights(self, batch: int) -> torch.Tensor:
        """Gram entry weights giving reg_w × the mean over modules of ``mask_overlap``: the loss
        weight and both means folded into one small tensor, one multiplication a step instead of
        a division per module and a stack, a mean and a multiplication."""
        heads = self.attention_modules[0].heads
        return self.attention_modules[0].off_diagonal * (self.reg_w / (len(self.taps) * batch * heads**2))

    def forward(self, taps: Mapping[str, torch.Tensor], pooled: torch.Tensor, logits: torch.Tensor) -> ModelOutput:
        """``gates`` are the effective B×(D+1) source weights (modules deepest first, then the
        network), so ``log_probs = Σ_i gates_i · log_softmax(source_i)`` in every mode; None without gates."""
        module_logits: list[torch.Tensor] = []
        reg_loss: torch.Tensor | None = None
        want_reg = self.training and self.reg_w > 0
        entry_weights = self._overlap_weights(next(iter(taps.values())).shape[0]) if want_reg else None
        for name, module in zip(self.taps, self.attention_modules, strict=True):
            prediction, masks = module(taps[name])
            module_logits.append(prediction)
            if want_reg:
                overlap = module.weighted_overlap(masks, entry_weights)
                reg_loss = overlap if reg_loss is None else reg_loss + overlap
        # log-probabilities and their mixture in float32 even under autocast: they feed the NLL
        if self.output_mode == "mixture":
            sources = F.log_softmax(as_float32(torch.stack([*module_logits, logits], dim=1)), dim=2)
            log_probs, weights = self.mix(sources, pooled)
        else:
            sources = F.log_softmax(as_float32(torch.stack(module_logits, dim=1)), dim=2)
            attention_log_probs, module_weights = self.mix(sources, pooled)
            log_probs = 0.5 * (attention_log_probs + F.log_softmax(as_float32(logits), dim=1))
            weights = None
            if module_weights is not None:
                weights = torch.cat([0.5 * module_weights, torch.full_like(module_weights[:, :1], 0.5)], dim=1)
        return ModelOutput(log_probs, logits, tuple(module_logits), weights, reg_loss)
