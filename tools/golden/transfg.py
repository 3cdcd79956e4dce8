"""Golden tensors for ``transfg`` from TACJu/TransFG.

Usage: python tools/golden/transfg.py <checkout of TACJu/TransFG> [out dir]
Needs ``ml_collections`` (the official configs.py imports it) and SciPy (its position-embedding zoom).

Runs the official ``VisionTransformer`` (models/modeling.py, imported whole: it trains nothing at
import) on CPU in a tiny configuration of the official ViT-B/16 layout: hidden 32, 4 heads, MLP 64,
4 blocks (so the part selection multiplies the maps of the first 3), patch 16 with ``split =
'overlap'`` and ``slide_step`` 12 (the README's setting) at 64 px: 5 x 5 = 25 tokens. Dropout is
off (its masks are not reproducible across implementations; the rest is deterministic). Its
weights go through the official ``load_from`` from a Google-format checkpoint (the npz key names)
that this script generates with seeds the test regenerates: a 14 x 14 position grid, so
``load_from`` resizes it with SciPy's linear zoom, and, as in the official code, the part block
(``part_layer``) and the head keep their own random initialisation, which is stored.

Written, in float64 and in float32: the official state dict after ``load_from``; the labels; the
selected token indices (``Part_Attention``'s argmax per head, + 1); the part-layer CLS after
``part_norm``; the logits; the cross-entropy and ``con_loss`` terms and their sum; and the
gradients of the loss with respect to every parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import generated, import_official, official_commit, write

HIDDEN, HEADS, MLP, BLOCKS, PATCH, STRIDE, IMAGE, GRID_PRETRAINED = 32, 4, 64, 4, 16, 12, 64, 14
CLASSES = 5
LABELS = [0, 3, 0, 1]
"""Two images of class 0 (a positive pair for the contrastive term) and two singletons."""


def google_checkpoint() -> dict[str, np.ndarray]:
    """A checkpoint in the layout of Google's ``ViT-B_16.npz`` (tiny sizes), from seeded generators:
    seed 1000 + position in this order, matrices N(0, 1/fan_in), vectors N(0, 0.1), LayerNorm scales
    1 + N(0, 0.1). The test regenerates it with ``checkpoint_shapes``."""
    return {name: values.numpy() for name, values in regenerate().items()}


def checkpoint_shapes() -> list[tuple[str, tuple[int, ...], str]]:
    """(npz name, shape, kind) in generation order; kind: matrix, vector or scale."""
    shapes: list[tuple[str, tuple[int, ...], str]] = [
        ("embedding/kernel", (PATCH, PATCH, 3, HIDDEN), "matrix"),
        ("embedding/bias", (HIDDEN,), "vector"),
        ("cls", (1, 1, HIDDEN), "vector"),
        ("Transformer/posembed_input/pos_embedding", (1, 1 + GRID_PRETRAINED**2, HIDDEN), "vector"),
        ("Transformer/encoder_norm/scale", (HIDDEN,), "scale"),
        ("Transformer/encoder_norm/bias", (HIDDEN,), "vector"),
    ]
    for block in range(BLOCKS):  # the last block is in the checkpoint too; load_from never reads it
        root = f"Transformer/encoderblock_{block}"
        for part in ("query", "key", "value"):
            shapes += [(f"{root}/MultiHeadDotProductAttention_1/{part}/kernel", (HIDDEN, HEADS, HIDDEN // HEADS), "matrix"),
                       (f"{root}/MultiHeadDotProductAttention_1/{part}/bias", (HEADS, HIDDEN // HEADS), "vector")]
        shapes += [(f"{root}/MultiHeadDotProductAttention_1/out/kernel", (HEADS, HIDDEN // HEADS, HIDDEN), "matrix"),
                   (f"{root}/MultiHeadDotProductAttention_1/out/bias", (HIDDEN,), "vector"),
                   (f"{root}/MlpBlock_3/Dense_0/kernel", (HIDDEN, MLP), "matrix"),
                   (f"{root}/MlpBlock_3/Dense_0/bias", (MLP,), "vector"),
                   (f"{root}/MlpBlock_3/Dense_1/kernel", (MLP, HIDDEN), "matrix"),
                   (f"{root}/MlpBlock_3/Dense_1/bias", (HIDDEN,), "vector"),
                   (f"{root}/LayerNorm_0/scale", (HIDDEN,), "scale"), (f"{root}/LayerNorm_0/bias", (HIDDEN,), "vector"),
                   (f"{root}/LayerNorm_2/scale", (HIDDEN,), "scale"), (f"{root}/LayerNorm_2/bias", (HIDDEN,), "vector")]
    return shapes


def regenerate() -> dict[str, torch.Tensor]:
    """The checkpoint as float64 tensors (the test's copy of this rule lives in its own file)."""
    out = {}
    for index, (name, shape, kind) in enumerate(checkpoint_shapes()):
        values = generated(1000 + index, *shape)
        fan_in = int(np.prod(shape[:-1])) if kind == "matrix" else 1
        out[name] = values / fan_in**0.5 if kind == "matrix" else (1 + 0.1 * values if kind == "scale" else 0.1 * values)
    return out


def official_module(checkout: str) -> Any:
    return import_official(checkout, "models", {name: f"models/{name}" for name in ("modeling.py", "configs.py")},
                           "modeling")


def run(modeling, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    config = modeling.CONFIGS["ViT-B_16"]
    config.hidden_size = HIDDEN
    config.transformer.num_heads, config.transformer.mlp_dim, config.transformer.num_layers = HEADS, MLP, BLOCKS
    config.transformer.dropout_rate = config.transformer.attention_dropout_rate = 0.0
    config.split, config.slide_step = "overlap", STRIDE
    torch.manual_seed(0)  # the part block's and the head's own initialisation
    model = modeling.VisionTransformer(config, img_size=IMAGE, num_classes=CLASSES, smoothing_value=0)
    checkpoint = {name: values.astype(np.float32) for name, values in google_checkpoint().items()}
    model.load_from(checkpoint)  # float32, as the official loads the npz
    model = model.to(dtype).train()
    images = generated(7, len(LABELS), 3, IMAGE, IMAGE).to(dtype)
    labels = torch.tensor(LABELS)
    selected = {}

    def keep_selection(_module, _inputs, output):
        selected["index"] = output[1] + 1

    model.transformer.encoder.part_select.register_forward_hook(keep_selection)
    tokens = {}
    def keep_cls(_module, _inputs, output):
        tokens.setdefault("cls", output[:, 0])  # returns None: the output is left as it is

    model.transformer.encoder.part_norm.register_forward_hook(keep_cls)
    part_tokens = model.transformer(images)
    logits = model.part_head(part_tokens[:, 0])
    ce = torch.nn.CrossEntropyLoss()(logits, labels)
    contrast = modeling.con_loss(part_tokens[:, 0], labels)
    loss, official_logits = model(images, labels)
    torch.testing.assert_close(official_logits, logits)  # the same forward, once through the official call
    model.zero_grad()
    loss.backward()
    out = {f"state.{k}": v for k, v in model.state_dict().items()}
    out.update({"selected": selected["index"], "part_cls": tokens["cls"], "logits": logits, "ce": ce.reshape(1),
                "contrast": contrast.reshape(1), "loss": loss.reshape(1)})
    out.update({f"grad.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    return {f"{prefix}.{k}": v.detach() for k, v in out.items()}


def main() -> None:
    checkout = sys.argv[1]
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parents[2] / "tests/data/golden/transfg"
    modeling = official_module(checkout)
    tensors = {"labels": torch.tensor(LABELS)}
    tensors.update(run(modeling, torch.float64, "f64"))
    tensors.update(run(modeling, torch.float32, "f32"))
    write(out, tensors, official_commit(checkout), "TACJu/TransFG")


if __name__ == "__main__":
    main()
