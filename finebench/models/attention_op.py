"""Attend and Rectify's read-out as one opaque operator with a closed-form backward.

``AttentionModule`` turns its fused convolution's output (K attention maps, then per head N class
maps and a gate map) into module logits and masks: a spatial softmax, a read-out of every map
against its head's mask, and a softmax over heads of tanh(gate read-out). Written as ordinary
ops, torch.compile's Inductor sees the spatial softmax and splits its reduction (its online
softmax turns off) and lets the small head convolution switch channels_last layout optimisation
off for the whole graph (``decide_layout_opt``; issue 21, pytorch/pytorch#153241, #189239). As a
``torch.library.custom_op`` the read-out is one node Inductor neither splits nor lays out, and its
backward is written in closed form (``register_autograd``) instead of being traced. It is chosen by
the attention variant's ``readout = "custom_op"``; the default stays the eager ops, which compiled
runs use until a GPU measurement shows the operator faster (``compile = "auto"`` leaves A&R eager).

Why by hand: no library provides this fused operator; its backward is the chain rule through the
two softmaxes and the read-out, checked against autograd of the eager path by float64 gradcheck and
``torch.library.opcheck`` (tests/test_attention_op.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(maps: torch.Tensor) -> torch.dtype:
    """float64 stays float64; half precision (autocast's conv output) is read out in float32,
    as the eager path's softmax is under autocast."""
    return torch.float64 if maps.dtype == torch.float64 else torch.float32


@torch.library.custom_op("finebench::attention_readout", mutates_args=())
def attention_readout(maps: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B×K·(N+2)×H×W maps (K attention maps, then per head N class maps and one gate map) ->
    (module logits B×N, masks B×K×H·W), both in float32 (float64 for a float64 model)."""
    with torch.autocast(maps.device.type, enabled=False):  # in the compute dtype whatever the context
        flat = maps.flatten(2).to(_compute_dtype(maps))
        masks = F.softmax(flat[:, :heads], dim=2)
        batch, _, positions = flat.shape
        reads = torch.einsum("bkjp,bkp->bkj", flat[:, heads:].reshape(batch, heads, -1, positions), masks)
        class_reads, gate_reads = reads[:, :, :-1], reads[:, :, -1]
        head_weights = F.softmax(torch.tanh(gate_reads), dim=1)
        return torch.einsum("bkn,bk->bn", class_reads, head_weights), masks


@attention_readout.register_fake
def _(maps: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, channels = maps.shape[:2]
    positions = maps.shape[2] * maps.shape[3]
    dtype = _compute_dtype(maps)
    classes = channels // heads - 2
    return maps.new_empty((batch, classes), dtype=dtype), maps.new_empty((batch, heads, positions), dtype=dtype)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    maps, heads = inputs
    _, masks = output
    ctx.heads = heads
    ctx.maps_shape = maps.shape
    ctx.maps_dtype = maps.dtype
    ctx.save_for_backward(maps, masks)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_logits: torch.Tensor | None, grad_masks: torch.Tensor | None
) -> tuple[torch.Tensor, None]:
    """Closed form of the chain rule through read-out, head softmax and spatial softmax."""
    maps, masks = ctx.saved_tensors
    with torch.autocast(maps.device.type, enabled=False):  # backward may run under the forward's autocast
        return _closed_form(ctx, maps, masks, grad_logits, grad_masks)


def _closed_form(
    ctx: torch.autograd.function.FunctionCtx, maps: torch.Tensor, masks: torch.Tensor,
    grad_logits: torch.Tensor | None, grad_masks: torch.Tensor | None,
) -> tuple[torch.Tensor, None]:
    heads = ctx.heads
    flat = maps.flatten(2).to(masks.dtype)
    batch, _, positions = flat.shape
    per_head = flat[:, heads:].reshape(batch, heads, -1, positions)  # B×K×(N+1)×P
    reads = torch.einsum("bkjp,bkp->bkj", per_head, masks)
    class_reads, gate_reads = reads[:, :, :-1], reads[:, :, -1]
    squashed = torch.tanh(gate_reads)
    head_weights = F.softmax(squashed, dim=1)
    grad_logits = torch.zeros_like(class_reads[:, 0]) if grad_logits is None else grad_logits.to(masks.dtype)
    grad_class_reads = grad_logits.unsqueeze(1) * head_weights.unsqueeze(2)  # B×K×N
    grad_weights = torch.einsum("bn,bkn->bk", grad_logits, class_reads)
    grad_squashed = head_weights * (grad_weights - (head_weights * grad_weights).sum(1, keepdim=True))
    grad_gate_reads = grad_squashed * (1 - squashed * squashed)
    grad_reads = torch.cat([grad_class_reads, grad_gate_reads.unsqueeze(2)], dim=2)  # B×K×(N+1)
    grad_per_head = grad_reads.unsqueeze(3) * masks.unsqueeze(2)
    grad_mask_total = torch.einsum("bkj,bkjp->bkp", grad_reads, per_head)
    if grad_masks is not None:
        grad_mask_total = grad_mask_total + grad_masks.to(masks.dtype)
    grad_attention = masks * (grad_mask_total - (masks * grad_mask_total).sum(2, keepdim=True))
    grad_maps = torch.cat([grad_attention, grad_per_head.reshape(batch, -1, positions)], dim=1)
    return grad_maps.reshape(ctx.maps_shape).to(ctx.maps_dtype), None


attention_readout.register_autograd(_backward, setup_context=_setup_context)
