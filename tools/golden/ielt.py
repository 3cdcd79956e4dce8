"""Golden tensors for ``ielt`` from mobulan/IELT.

Usage: python tools/golden/ielt.py <checkout of mobulan/IELT> [out dir]
Needs ``ml_collections`` (the official models/vit.py imports it) and SciPy (its position-embedding zoom).

Runs the official ``InterEnsembleLearningTransformer`` (models/IELT.py with models/modules.py and
models/vit.py; never setup.py or main.py, whose import changes CUDA_VISIBLE_DEVICES and opens a
socket) on CPU. The one shim, in this process's temporary copy of models/IELT.py only: its four
``device='cuda'`` become ``device='cpu'``. The configuration is a tiny one of the official ViT-B/16
layout: hidden 32, 4 heads, MLP 64, 4 blocks (3 voting layers), patch 16 at 128 px: 8 x 8 patches;
``dataset='cub'`` (the extra blocks keep their own random initialisation); dropout off. The encoder's
hard-coded 11 selection rates are set, as attributes after construction, to a 3-layer list
[16, 14, 12] / 42 (``total_num`` 42), since the official list fits 12 blocks only.

Weights: the official ``load_from`` on the Google-format checkpoint of tools/golden/transfg.py (the
same tiny sizes: a 14 x 14 position grid, resized by the official SciPy zoom to 8 x 8); it zeroes
the head, which is then drawn from seed 2000 (weight N(0, 1), bias N(0, 0.1)) so that gradients
reach the blocks. The extra blocks keep their own random initialisation (seed 0), stored.

Written, in float64 and in float32 (the state dict once, from the float64 run: float32 values widened):
the state dict; per voting layer the selected token indices
and the votes after smoothing (``MultiHeadVoting``'s outputs, float16 integers stored as float32);
the same for the CLR stage; the CLR and key CLS; the part and complement logits; both cross-entropy
terms and the loss; every parameter's gradient; and one dynamic-selection move from the initial
rates with this forward's key tokens (``count_patch``'s layer counts and the new rates).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import generated, import_official, official_commit, write
from transfg import google_checkpoint

HIDDEN, HEADS, MLP, BLOCKS, PATCH, IMAGE = 32, 4, 64, 4, 16, 128
SELECT_NUMBERS = [16, 14, 12]
CLASSES = 5
LABELS = [0, 3, 0, 1]


def official_module(checkout: str) -> Any:
    def to_cpu(name: str, text: str) -> str:
        if name != "IELT.py":
            return text
        model_code = text.split("if __name__")[0].splitlines()  # comments and __main__ never run
        live = [line for line in model_code if "device='cuda'" in line and not line.strip().startswith("#")]
        assert len(live) == 4, "the official file changed: review the shim"
        return text.replace("device='cuda'", "device='cpu'")

    return import_official(checkout, "models", {name: f"models/{name}" for name in ("IELT.py", "modules.py", "vit.py")},
                           "IELT", to_cpu)


def run(ielt, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    config = ielt.get_b16_config()
    config.hidden_size, config.mlp_dim, config.num_heads, config.num_layers = HIDDEN, MLP, HEADS, BLOCKS
    config.dropout_rate = config.att_dropout = 0.0
    torch.manual_seed(0)  # the extra blocks' own initialisation
    model = ielt.InterEnsembleLearningTransformer(config, img_size=IMAGE, num_classes=CLASSES, dataset="cub",
                                                  total_num=sum(SELECT_NUMBERS))
    encoder = model.encoder
    encoder.select_rate = torch.tensor(SELECT_NUMBERS) / encoder.total_num
    encoder.select_num = encoder.select_rate * encoder.total_num
    checkpoint = {name: values.astype(np.float32) for name, values in google_checkpoint().items()}
    model.load_from(checkpoint)  # float32, as the official loads the npz; zeroes the head
    with torch.no_grad():
        model.head.weight.copy_(generated(2000, CLASSES, HIDDEN))
        model.head.bias.copy_(0.1 * generated(2001, CLASSES))
    model = model.to(dtype).train()
    images = generated(7, len(LABELS), 3, IMAGE, IMAGE).to(dtype)
    labels = torch.tensor(LABELS)
    votes: list[tuple[torch.Tensor, torch.Tensor]] = []
    encoder.patch_select.register_forward_hook(lambda _m, _i, output: votes.append(output))
    cls: dict[str, torch.Tensor] = {}

    def keep_cls(_module, _inputs, output):
        cls["key"], cls["clr"] = output

    encoder.register_forward_hook(keep_cls)
    part_logits, loss = model(images, labels)
    complement_logits = model.head(cls["clr"])
    loss_part = torch.nn.CrossEntropyLoss()(part_logits, labels)
    loss_complement = torch.nn.CrossEntropyLoss()(complement_logits, labels)
    torch.testing.assert_close(loss, 0.6 * loss_part + 0.4 * loss_complement)
    model.zero_grad()
    loss.backward()
    out: dict[str, torch.Tensor] = {}
    if dtype == torch.float64:  # float32 values widened: the float32 run's state is this one rounded back, exactly
        out = {f"state.{k}": v for k, v in model.state_dict().items()  # the CLR block is stored once:
               if not k.startswith("encoder.clr_encoder.clr_layer.")}  # the same module as encoder.clr_layer
    for layer, (index, count) in enumerate(votes[:-1]):
        out[f"selected.{layer}"], out[f"votes.{layer}"] = index, count.float()
    out["key_selected"], out["key_votes"] = votes[-1][0], votes[-1][1].float()
    out.update({"key_cls": cls["key"], "clr_cls": cls["clr"], "logits": part_logits,
                "complement_logits": complement_logits, "loss_part": loss_part.reshape(1),
                "loss_complement": loss_complement.reshape(1), "loss": loss.reshape(1)})
    out.update({f"grad.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    out["rate_before"] = encoder.select_rate.clone()
    layer_count = encoder.count_patch(votes[-1][0])
    encoder.update_layer_select(layer_count)
    out["layer_count"], out["rate_after"] = layer_count, encoder.select_rate
    return {f"{prefix}.{k}": v.detach() for k, v in out.items()}


def main() -> None:
    checkout = sys.argv[1]
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parents[2] / "tests/data/golden/ielt"
    ielt = official_module(checkout)
    tensors = {"labels": torch.tensor(LABELS)}
    tensors.update(run(ielt, torch.float64, "f64"))
    tensors.update(run(ielt, torch.float32, "f32"))
    write(out, tensors, official_commit(checkout), "mobulan/IELT")


if __name__ == "__main__":
    main()
