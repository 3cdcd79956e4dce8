"""Golden tensors of the HaoMood/bilinear-cnn port's B-CNN head (PEERS.md §6.4), for tests/test_bcnn.py.

    python tools/golden/bcnn.py CHECKOUT [--commit bcc2883]

CHECKOUT is a clone (or bare mirror) of https://github.com/HaoMood/bilinear-cnn. The harness reads
``src/bilinear_cnn_all.py`` at the commit, fixes only its Python-3 syntax (``async=True``), runs
the module's imports and ``class BCNN`` (not the training manager), swaps its VGG-16 trunk for a
module returning seeded relu5_3-like features (the head is what B-CNN adds; the trunk is
torchvision's VGG-16), and records in float64: logits, the cross-entropy, exact slices and seeded
projections of the gradients of the features and of the classifier. No official code is stored.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bcnn_common as common  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "golden" / "bcnn"


class StoredFeatures(torch.nn.Module):
    def __init__(self, stored: torch.Tensor) -> None:
        super().__init__()
        self.stored = torch.nn.Parameter(stored)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.stored


def official_bcnn(checkout: str, commit: str) -> type:
    source = subprocess.run(["git", "-C", checkout, "show", f"{commit}:src/bilinear_cnn_all.py"],
                            check=True, capture_output=True, text=True).stdout
    source = source.replace("async=True", "non_blocking=True")
    sys.modules["cub200"] = types.ModuleType("cub200")  # imported by the script, used only by its data manager
    namespace: dict = {"__name__": "bilinear_cnn_all"}
    exec(compile(source, "bilinear_cnn_all.py", "exec"), namespace)  # noqa: S102 (the official file, by design)
    return namespace["BCNN"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout")
    parser.add_argument("--commit", default="bcc2883c43c1f5fad1b58b906014354876d76911")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", args.checkout, "rev-parse", args.commit], check=True,
                            capture_output=True, text=True).stdout.strip()
    model = official_bcnn(args.checkout, commit)().double()
    model.features = StoredFeatures(common.features())
    weight, bias = common.classifier()
    with torch.no_grad():
        model.fc.weight.copy_(weight)
        model.fc.bias.copy_(bias)
    logits = model(torch.zeros(common.BATCH, 3, 448, 448, dtype=torch.float64))
    loss = F.cross_entropy(logits, common.labels())
    loss.backward()
    grad_features, grad_weight = model.features.stored.grad, model.fc.weight.grad
    tensors = {
        "logits": logits.detach(), "loss": loss.detach().reshape(1),
        "grad_features_slice": grad_features[:, :8, :4, :4].contiguous(),
        "grad_weight_slice": grad_weight[:4, :256].contiguous(), "grad_bias": model.fc.bias.grad,
        "grad_features_projections": torch.stack([(grad_features * r).sum() for r in common.projections(grad_features.shape)]),
        "grad_weight_projections": torch.stack([(grad_weight * r).sum() for r in common.projections(grad_weight.shape)]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "head.safetensors"), metadata={
        "repository": "https://github.com/HaoMood/bilinear-cnn", "commit": commit, "file": "src/bilinear_cnn_all.py",
        "torch": torch.__version__})
    print(f"wrote {OUT / 'head.safetensors'} from HaoMood/bilinear-cnn {commit}")


if __name__ == "__main__":
    main()
