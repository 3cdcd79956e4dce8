"""Golden tensors for ``api_net`` from PeiqinZhuang/API-Net.

Usage: python tools/golden/api_net.py <checkout of PeiqinZhuang/API-Net> [out dir]

Runs the official ``API_Net`` (models.py: ``pdist``, pair mining, mutual vector, gates, the four
logits) on CPU in its own setting (2048-wide pooled features, 200 classes, hidden 512), fed fixed
pooled features instead of running ResNet-101 (docs/PEERS.md): its ``models.resnet101`` is replaced
by a stand-in whose trunk is the identity, the input is the B × 2048 feature as a 1 × 1 map and the
14 × 14 average pool becomes a 1 × 1 one (the same operation on that map). Its weights come from
seeded generators the test regenerates. train.py is Python 2 and trains at import, so its loss
lines (136-170: the 2·(2B) × 200 logit buffers, cross-entropy over the 8B rows, softmax scores at
the true class, ``MarginRankingLoss(0.05)``) are re-stated in ``official_loss``.

Written: the mined pairs and their labels; the four logit sets, both loss terms, the total and
gradients (features, map1, map2, fc) in float64 with dropout off, then again in float32 (whose
buffers are float32 as the official; in float64 they take the logits' dtype so nothing is rounded);
the four logits under seeded dropout (p 0.5, float64); eval logits; pairs of two degenerate
batches (an image alone in its class, a batch of one class); and the first epoch of the official
``BalancedBatchSampler`` (datasets.py) with NumPy's global seed 3.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import generated, official_commit, official_file, run_parts, write

WIDTH, CLASSES = 2048, 200
LABELS = [5, 17, 5, 199, 17, 0, 199, 0, 5, 17]
"""Four classes with 3, 3, 2, 2 images, mixed order (B = 10: 20 pairs)."""
LEAN = 0.2
NOISE = 2.0
DROPOUT_SEED = 7
SAMPLER_LABELS = [c for c, count in zip((0, 2, 3, 5, 8, 9), (5, 7, 4, 6, 9, 3), strict=True) for _ in range(count)]
SAMPLER_SEED, SAMPLER_CLASSES, SAMPLER_IMAGES = 3, 3, 2


def features(net: nn.Module) -> torch.Tensor:
    """The pooled features (stored): non-negative like post-ReLU averages, each leaning towards its
    class's classifier row so that true-class scores are large enough for some pairs to meet the
    ranking margin and some not (random features leave every score near 1/200)."""
    towards = net.fc.weight.detach().double()[LABELS].clamp_min(0) * WIDTH**0.5
    return NOISE * generated(1, len(LABELS), WIDTH).abs() + LEAN * towards


def fill(net: nn.Module) -> None:
    """Seeded weights by position in the official state dict: matrices N(0, 1/fan_in), biases N(0, 0.01)."""
    with torch.no_grad():
        for index, tensor in enumerate(net.state_dict().values()):
            values = generated(100 + index, *tensor.shape)
            tensor.copy_(values / tensor[0].numel() ** 0.5 if tensor.dim() > 1 else 0.1 * values)


def official_loss(outputs: tuple[torch.Tensor, ...], buffer_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """train.py:141-170 re-stated (Python 2 file): returns (softmax_loss, rank_loss)."""
    logit1_self, logit1_other, logit2_self, logit2_other, labels1, labels2 = outputs
    batch_size = logit1_self.shape[0]
    self_logits = torch.zeros(2 * batch_size, CLASSES, dtype=buffer_dtype)
    other_logits = torch.zeros(2 * batch_size, CLASSES, dtype=buffer_dtype)
    self_logits[:batch_size] = logit1_self
    self_logits[batch_size:] = logit2_self
    other_logits[:batch_size] = logit1_other
    other_logits[batch_size:] = logit2_other
    logits = torch.cat([self_logits, other_logits], dim=0)
    targets = torch.cat([labels1, labels2, labels1, labels2], dim=0)
    softmax_loss = nn.CrossEntropyLoss()(logits, targets)
    rows = torch.arange(2 * batch_size).long()
    self_scores = nn.Softmax(dim=1)(self_logits)[rows, torch.cat([labels1, labels2], dim=0)]
    other_scores = nn.Softmax(dim=1)(other_logits)[rows, torch.cat([labels1, labels2], dim=0)]
    flag = torch.ones([2 * batch_size], dtype=buffer_dtype)
    rank_loss = nn.MarginRankingLoss(margin=0.05)(self_scores, other_scores, flag)
    return softmax_loss, rank_loss


class Trunkless(nn.Module):
    """Stands in for ``resnet101``: API_Net keeps ``children()[:-2]``, here one identity."""

    def __init__(self) -> None:
        super().__init__()
        self.identity, self.avgpool, self.fc = nn.Identity(), nn.Identity(), nn.Identity()


class Lenient(np.ndarray):
    """NumPy < 1.25 stored a one-element array into a scalar slot; get_pairs relies on it
    (``intra_labels[i, 0] = labels[i]`` with ``labels`` of shape B × 1). NumPy 2 raises."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, np.asarray(value).reshape(()) if np.size(value) == 1 else value)


def lenient_numpy() -> SimpleNamespace:
    """``np`` for models.py: the real module whose ``zeros`` makes ``Lenient`` arrays (a shim)."""
    return SimpleNamespace(**{**vars(np), "zeros": lambda *a, **k: np.zeros(*a, **k).view(Lenient)})


def build(namespace: dict[str, Any]) -> nn.Module:
    namespace["models"] = SimpleNamespace(resnet101=lambda pretrained=False: Trunkless())
    net = namespace["API_Net"]()
    net.avg = nn.AvgPool2d(kernel_size=1, stride=1)  # the 14 x 14 pool of a 1 x 1 map
    fill(net)
    return net


def record_pairs(net: nn.Module, store: dict[str, torch.Tensor], prefix: str) -> None:
    mine = net.get_pairs

    def recording(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = mine(embeddings, labels)
        store[f"{prefix}intra_pairs"], store[f"{prefix}inter_pairs"] = result[0], result[1]
        return result

    net.get_pairs = recording


def train_pass(net: nn.Module, x: torch.Tensor, out: dict[str, torch.Tensor], prefix: str, buffer: torch.dtype) -> None:
    net.train()
    inputs = x.clone().requires_grad_(True)
    record_pairs(net, out, prefix)
    outputs = net(inputs.view(*inputs.shape, 1, 1), torch.tensor(LABELS), flag="train")
    for name, value in zip(("logit1_self", "logit1_other", "logit2_self", "logit2_other", "labels1", "labels2"),
                           outputs, strict=True):
        out[prefix + name] = value.detach()
    ce, rank = official_loss(outputs, buffer)
    out[prefix + "ce"], out[prefix + "rank"] = ce.detach().reshape(1), rank.detach().reshape(1)
    net.zero_grad()
    (ce + rank).backward()
    del net.get_pairs  # the class's own again
    out[prefix + "grad_features"] = inputs.grad
    for name in ("map1", "map2", "fc"):
        layer = getattr(net, name)
        out[f"{prefix}grad_{name}_norm"] = layer.weight.grad.norm().reshape(1)
        out[f"{prefix}grad_{name}_bias"] = layer.bias.grad
    out[prefix + "grad_map1_rows"] = net.map1.weight.grad[:4]
    out[prefix + "grad_map2_rows"] = net.map2.weight.grad[:8]
    out[prefix + "grad_fc_rows"] = net.fc.weight.grad[[0, 1, 5, 17, 199]]


class Labelled:
    """The dataset ``BalancedBatchSampler`` reads: ``labels`` and a length."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)


def main(checkout: str, out: str = "tests/data/golden/api_net") -> None:
    namespace = run_parts(official_file(checkout, "models.py"), {"device", "pdist", "API_Net"})
    namespace["np"] = lenient_numpy()
    net = build(namespace).double()
    x = features(net)
    tensors: dict[str, torch.Tensor] = {"features": x, "labels": torch.tensor(LABELS)}
    net.drop.p = 0.0
    train_pass(net, x, tensors, "", torch.float64)
    net.eval()
    with torch.no_grad():
        tensors["eval_logits"] = net(x.view(*x.shape, 1, 1), flag="val")

    net32 = build(namespace)
    net32.drop.p = 0.0
    train_pass(net32, x.float(), tensors, "f32_", torch.float32)

    dropped = build(namespace).double()
    torch.manual_seed(DROPOUT_SEED)
    dropped.train()
    outputs = dropped(x.view(*x.shape, 1, 1), torch.tensor(LABELS), flag="train")
    for name, value in zip(("logit1_self", "logit1_other", "logit2_self", "logit2_other"), outputs, strict=False):
        tensors["drop_" + name] = value.detach()

    for name, labels in (("alone", [3, 3, 8, 8, 11]), ("one_class", [4, 4, 4, 4])):
        intra, inter, _, _ = net.get_pairs(x[:len(labels)], torch.tensor(labels))
        tensors[f"{name}_intra_pairs"], tensors[f"{name}_inter_pairs"] = intra, inter

    sampler_namespace = run_parts(official_file(checkout, "datasets.py"), {"BalancedBatchSampler"})
    np.random.seed(SAMPLER_SEED)
    sampler = sampler_namespace["BalancedBatchSampler"](Labelled(SAMPLER_LABELS), SAMPLER_CLASSES, SAMPLER_IMAGES)
    tensors["sampler_batches"] = torch.tensor(np.array([np.asarray(b, dtype=np.int64) for b in sampler]))
    write(Path(out), tensors, official_commit(checkout), "PeiqinZhuang/API-Net")


if __name__ == "__main__":
    main(*sys.argv[1:])
