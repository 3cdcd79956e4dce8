"""Golden tensors for ``mcl`` from PRIS-CV/Mutual-Channel-Loss.

Usage: python tools/golden/mcl.py <checkout of PRIS-CV/Mutual-Channel-Loss> [out dir]

Runs the official ``supervisor`` (CUB-200-2011.py, with ``Mask`` and ``my_pooling.my_MaxPool2d``)
in float64 on CPU in its own setting (200 classes, ξ = 3, a 600 × 14 × 14 post-ReLU map, batch 2),
with Python ``random`` seeded (0) and ``Tensor.cuda`` a no-op: L_dis, L_div, the mask it drew and
dL/dF of the official total weights (1.5·L_dis + 20·L_div). F comes from a seeded generator the
test regenerates; checksums and outputs are stored.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import generated, official_commit, official_file, run_parts, write  # noqa: E402

BATCH, CLASSES, XI, SIDE = 2, 200, 3, 14
ALPHA, BETA = 1.5, 20.0


def main(checkout: str, out: str = "tests/data/golden/mcl") -> None:
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor  # shim: Mask calls .cuda()
    namespace = run_parts(official_file(checkout, "CUB-200-2011.py"), {"criterion", "Mask", "supervisor"},
                          {"my_pooling.py": official_file(checkout, "my_pooling.py")})
    drawn = []
    official_mask = namespace["Mask"]

    def recording_mask(batch: int, channels: int) -> torch.Tensor:
        mask = official_mask(batch, channels)
        drawn.append(mask)
        return mask

    namespace["Mask"] = recording_mask
    features = generated(10, BATCH, CLASSES * XI, SIDE, SIDE, relu=True).requires_grad_(True)
    labels = torch.tensor([3, 150])
    random.seed(0)
    dis, div = namespace["supervisor"](features, labels, height=SIDE, cnum=XI)
    (ALPHA * dis + BETA * div).backward()
    write(Path(out), {
        "features_checksum": features.detach().sum().reshape(1), "labels": labels,
        "mask": drawn[0][0].flatten(), "dis": dis.reshape(1), "div": div.reshape(1),
        "grad_head": features.grad[:, :30], "grad_norm": features.grad.norm().reshape(1),
    }, official_commit(checkout), "PRIS-CV/Mutual-Channel-Loss")


if __name__ == "__main__":
    main(*sys.argv[1:])
