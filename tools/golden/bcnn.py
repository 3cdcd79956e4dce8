"""Golden tensors for ``bcnn`` from HaoMood/bilinear-cnn (the PyTorch port of B-CNN).

Usage: python tools/golden/bcnn.py <checkout of HaoMood/bilinear-cnn> [out dir]

Runs the official ``BCNN`` (src/bilinear_cnn_all.py, ``async=True`` rewritten as
``non_blocking=True`` so it parses) in float64 on CPU with its VGG trunk replaced by a module
returning a fixed post-ReLU map X (2 × 512 × 28 × 28; the asserts need 448 px input), so the
bilinear head is compared exactly: logits, cross-entropy, dL/dX and the fc gradients. X and the fc
weights come from seeded generators (``common.generated``) the test regenerates; only checksums and
outputs are stored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import generated, official_commit, official_file, run_parts, write  # noqa: E402

BATCH, CHANNELS, SIDE, CLASSES = 2, 512, 28, 200


class Fixed(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.value


def main(checkout: str, out: str = "tests/data/golden/bcnn") -> None:
    source = official_file(checkout, "src/bilinear_cnn_all.py").replace("async=True", "non_blocking=True")
    namespace = run_parts(source, {"BCNN"}, {"cub200.py": ""})
    model = namespace["BCNN"]().double()
    x = generated(0, BATCH, CHANNELS, SIDE, SIDE, relu=True).requires_grad_(True)
    labels = torch.tensor([3, 150])
    with torch.no_grad():
        model.fc.weight.copy_(generated(1, CLASSES, CHANNELS**2, scale=0.003))
        model.fc.bias.copy_(generated(2, CLASSES, scale=0.01))
    model.features = Fixed(x)
    logits = model(torch.zeros(BATCH, 3, 448, 448, dtype=torch.float64))
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    write(Path(out), {
        "x_checksum": x.detach().sum().reshape(1), "labels": labels, "logits": logits, "loss": loss.reshape(1),
        "grad_x_head": x.grad[:, :8], "grad_x_norm": x.grad.norm().reshape(1),
        "grad_fc_bias": model.fc.bias.grad, "grad_fc_weight_head": model.fc.weight.grad[:8, :512],
    }, official_commit(checkout), "HaoMood/bilinear-cnn")


if __name__ == "__main__":
    main(*sys.argv[1:])
