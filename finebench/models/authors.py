"""Load weights trained with the authors' public code (prlz77/attend-and-rectify) into finebench.

Their ``WideResNetAttention`` and finebench's WRN + Attend and Rectify compute the same function;
only parameter names differ. The converter maps every key explicitly and refuses unknown ones,
so a strict load proves that nothing was dropped or left at its initial value. It also reads the
earlier layouts that produced their logs (painless-attention 844c4f8 to 1bf9ecf: final BatchNorm
``bn``, tap BatchNorms ``pre_bn0``/``pre_bn1``), for a model built with the matching
``stem``/``shortcut`` and ``tap_norm`` options (docs/MECHANISM.md §4).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from finebench.errors import FinebenchError
from finebench.models.network import ImageClassifier
from finebench.models.attention import AttendAndRectify
from finebench.models.wrn import WideResNet

_HEAD_NAMES = {"att_head.conv": "attention_head", "out_head.conv": "output_head", "score.conv": "gate_head"}


def _rules(attention_taps: list[str]) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    def module_index(group: str) -> int:
        tap = f"group{group}"
        if tap not in attention_taps:
            raise FinebenchError(f"authors' weights hold att{group}.* but the model has modules on {attention_taps}")
        return attention_taps.index(tap)

    return [
        (re.compile(r"conv0\.(.+)"), lambda m: f"backbone.stem_conv.{m[1]}"),
        (re.compile(r"bn0\.(.+)"), lambda m: f"backbone.stem_bn.{m[1]}"),
        (re.compile(r"group_(\d)\.block_(\d+)\.conv_reduce\.(.+)"), lambda m: f"backbone.groups.{m[1]}.{m[2]}.shortcut.{m[3]}"),
        (re.compile(r"group_(\d)\.block_(\d+)\.((?:conv|bn)[01]\..+)"), lambda m: f"backbone.groups.{m[1]}.{m[2]}.{m[3]}"),
        (re.compile(r"bn_g2\.(.+)"), lambda m: f"backbone.final_bn.{m[1]}"),
        (re.compile(r"bn\.(.+)"), lambda m: f"backbone.final_bn.{m[1]}"),  # before 9dcf338
        (re.compile(r"pre_bn([01])\.(.+)"), lambda m: f"backbone.tap_norms.group{m[1]}.{m[2]}"),  # before 9dcf338
        (re.compile(r"classifier\.(.+)"), lambda m: f"classifier.{m[1]}"),
        (re.compile(r"att(\d)\.(att_head\.conv|out_head\.conv|score\.conv)\.weight"),
         lambda m: f"attention.attention_modules.{module_index(m[1])}.{_HEAD_NAMES[m[2]]}.weight"),
        (re.compile(r"output_gate\.gates\.(.+)"), lambda m: f"attention.global_gate.linear.{m[1]}"),
        (re.compile(r"output_gate\.bn\.(.+)"), lambda m: f"attention.global_gate.bn.{m[1]}"),
    ]


def convert_authors_state_dict(
    state_dict: Mapping[str, torch.Tensor], attention_taps: list[str], *, sources_shallowest_first: bool = False
) -> dict[str, torch.Tensor]:
    """Rename the authors' keys to finebench's; their constant ``att_head.diag`` buffer is checked and dropped.

    ``sources_shallowest_first``: their code before 9dcf338 appended the modules' outputs in
    group order (group 0 first) where the released code and finebench put the deepest first, so
    the global gate's rows (its linear layer and BatchNorm channels) for the modules are
    reversed. That is a relabelling of the gate's outputs: the same function and the same
    initial distribution, so finebench needs no option for it, only this reordering on loading.
    """
    rules = _rules(attention_taps)
    modules = len(attention_taps)
    converted: dict[str, torch.Tensor] = {}
    for raw_key, value in state_dict.items():
        key = raw_key.removeprefix("module.")  # saved from DataParallel
        if re.fullmatch(r"att\d\.att_head\.diag", key):
            heads = value.shape[-1]
            if not torch.equal(value.reshape(heads, heads).float(), 1 - torch.eye(heads)):
                raise FinebenchError(f"authors' weights: {raw_key} is not 1 - I: this is not their AttentionHead")
            continue
        if re.fullmatch(r"pre_bn2\..+", key):
            continue  # created by their early code for group 2 but never used: that tap reads ``bn``
        for pattern, rename in rules:
            match = pattern.fullmatch(key)
            if match:
                converted[rename(match)] = value
                break
        else:
            raise FinebenchError(f"authors' weights: key {raw_key!r} has no finebench counterpart")
    if sources_shallowest_first:
        order = list(reversed(range(modules)))
        for key, value in converted.items():
            if key.startswith("attention.global_gate.") and value.ndim >= 1 and not key.endswith("num_batches_tracked"):
                converted[key] = torch.cat([value[order], value[modules:]])
    return converted


def load_authors_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    depth: int,
    width: int,
    num_classes: int,
    attention_depth: int,
    attention_width: int,
    attention_type: str = "softmax",
    reg_w: float = 0.0,
) -> ImageClassifier:
    """Build WRN-depth-width + Attend and Rectify and load the authors' ``WideResNetAttention`` weights strictly.

    ``attention_type`` is their gating function ("softmax" or "sigmoid"). State dicts saved before
    PyTorch 0.4.1 lack BatchNorm's ``num_batches_tracked``; it only matters with momentum=None, so
    it is filled with zero.
    """
    if attention_type not in ("softmax", "sigmoid"):
        raise FinebenchError(f"attention_type={attention_type!r} is invalid: expected softmax or sigmoid")
    backbone = WideResNet(depth, width)
    attention = AttendAndRectify.on_backbone(
        backbone, num_classes, backbone.attention_taps(attention_depth), attention_width=attention_width,
        gates=attention_type, reg_w=float(reg_w), output_mode="mixture",
    )
    model = ImageClassifier(backbone, num_classes, attention)
    converted = convert_authors_state_dict(state_dict, model.attention_taps)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise FinebenchError(f"authors' weights do not fit WRN-{depth}-{width} AD={attention_depth} "
                             f"AW={attention_width} N={num_classes}: {str(error).splitlines()[1:3]}") from error
    return model
