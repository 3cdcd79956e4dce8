"""Golden tensors for ``pmg``'s heads and four-step training from the official PMG code.

Usage: python tools/golden/pmg_heads.py <checkout of the PMG repository> [out dir]

Builds the official ``PMG`` (model.py: feature size 512, 200 classes) on a trunk replaced by a
module returning fixed post-ReLU maps of ResNet-50's widths at 448 px (layer2/3/4:
512×56×56, 1024×28×28, 2048×14×14; batch 2), so its fixed max-pool kernels are global; every
weight is set from seeded generators the test regenerates (too large to commit). It records the
train-mode outputs of the first forward, then runs one batch of the official training step
(train.py lines 88-117, restated here because train.py trains at import: three jigsaw steps on
heads 1-3 and the whole image on the concatenated head with weight 2, each with its own SGD step,
lr 0.002, momentum 0.9, wd 5e-4, gradients zeroed in place as PyTorch 1.3 did) and records the
step losses, slices of parameters and BatchNorm statistics after it, and the eval-mode outputs.
Float32 (a float64 run takes minutes on two cores); the test compares at float32 tolerances.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import official_commit, official_file, run_parts, write  # noqa: E402

SHAPES = ((512, 56), (1024, 28), (2048, 14))
WATCHED = ("conv_block1.1.conv.weight", "conv_block3.0.conv.weight", "classifier1.4.weight", "classifier2.1.weight",
           "classifier_concat.1.weight", "classifier_concat.4.bias", "conv_block2.1.bn.running_var",
           "classifier3.0.running_mean", "classifier_concat.2.weight")


def maps(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(20 + i)).clamp_min(0)
            for i, (c, s) in enumerate(SHAPES)]


def fill(state: dict[str, torch.Tensor]) -> None:
    """Every float tensor of the state dict, in its order, from generator seed 100 + index: weights
    ~ N(0, 1/fan_in), BatchNorm scales 1 + 0.1·N, biases and running means 0.1·N, running vars 1."""
    for index, (name, tensor) in enumerate(state.items()):
        if not tensor.is_floating_point():
            continue
        values = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(100 + index))
        if name.endswith("running_var"):
            values = torch.ones_like(values)
        elif tensor.dim() > 1:
            values = values / tensor[0].numel() ** 0.5
        elif name.endswith("weight"):
            values = 1 + 0.1 * values
        else:
            values = 0.1 * values
        tensor.copy_(values)


class Fixed(torch.nn.Module):
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def forward(self, images: torch.Tensor) -> tuple:
        return (None, None, *self.tensors)


def main(checkout: str, out: str = "tests/data/golden/pmg_heads") -> None:
    namespace = run_parts(official_file(checkout, "model.py"), {"PMG", "BasicConv"})
    net = namespace["PMG"](Fixed(maps()), 512, 200)
    with torch.no_grad():
        fill(net.state_dict())
    labels = torch.tensor([3, 150])
    images = torch.zeros(2, 3, 448, 448)
    net.train()
    first = net(images)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    cross_entropy = torch.nn.CrossEntropyLoss()
    losses = []
    for index, weight in enumerate((1, 1, 1, 2)):  # train.py:88-117 (the jigsaw does not reach a fixed trunk)
        optimizer.zero_grad(set_to_none=False)
        loss = cross_entropy(net(images)[index], labels) * weight
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    net.eval()
    with torch.no_grad():
        tested = net(images)
    state = net.state_dict()
    tensors = {f"train_{i}": first[i].detach() for i in range(4)}
    tensors |= {f"eval_{i}": tested[i] for i in range(4)}
    tensors |= {"losses": torch.stack(losses), "labels": labels}
    tensors |= {f"after.{name}": state[name].flatten()[:4096] for name in WATCHED}
    write(Path(out), tensors, official_commit(checkout), "PRIS-CV/PMG-Progressive-Multi-Granularity-Training")


if __name__ == "__main__":
    main(*sys.argv[1:])
