"""Golden tensors for ``ws_dan`` from GuYuc/WS-DAN.PyTorch (the PyTorch WS-DAN papers run).

Usage: python tools/golden/ws_dan.py <checkout of WS-DAN.PyTorch> [out dir]

Imports the official ``models/`` (``WSDAN``, ``BAP``, ``BasicConv2d``) and ``utils.py``
(``CenterLoss``, ``batch_augment``) from a temporary copy of the checkout; never ``train.py`` or
``eval.py``, which assert CUDA at import. ``WSDAN(5 classes, M = 4, 'resnet50')`` has its trunk
replaced by a small conv trunk (two stride-4 conv + BN + ReLU blocks, 32 channels, 14×14 maps at
224 px) so the whole state dict is small enough to commit; the attention, pooling, classifier,
augmentation and loss are the official modules. The training step is train.py lines 182-219,
restated here (train.py cannot be imported): raw pass, centre update (β 0.05), crop
(θ ~ U(0.4, 0.6), padding 0.1) and drop (θ ~ U(0.2, 0.5)) passes, loss = the three
cross-entropies over 3 + the centre loss; SGD lr 1e-3, momentum 0.9, weight decay 1e-5 (train.py
line 106). Two steps on a batch of 3 images whose labels repeat one class (the indexed centre
update keeps one image's update), then the test prediction (eval.py / train.py validate: crop
around the mean map with θ 0.1, padding 0.05, logits averaged). The NumPy map indices and Python
θ draws are recorded by proxies in the official modules' namespaces. Run in float64 and in float32.
"""

from __future__ import annotations

import importlib
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import official_commit, official_file, write

REPO = "GuYuc/WS-DAN.PyTorch"
FILES = ("models/__init__.py", "models/resnet.py", "models/vgg.py", "models/inception.py", "models/wsdan.py",
         "models/blocks.py", "utils.py")
CLASSES, MAPS, SIZE, BATCH = 5, 4, 224, 3
LABELS = (1, 3, 1)


def trunk() -> torch.nn.Sequential:
    """The small stand-in trunk (tests/test_ws_dan.py builds the same one)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 4, stride=4, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(16, 32, 4, stride=4, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(inplace=True))


def images(dtype: torch.dtype) -> torch.Tensor:
    """Smooth inputs with structure (so the attention has parts to find), from a seeded generator."""
    noise = torch.randn(BATCH, 3, 28, 28, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return F.interpolate(noise, size=(SIZE, SIZE), mode="bilinear", align_corners=False).to(dtype)


def load(checkout: str) -> tuple[Any, Any]:
    folder = Path(tempfile.mkdtemp())
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(official_file(checkout, name))
    sys.path.insert(0, str(folder))
    return importlib.import_module("models.wsdan"), importlib.import_module("utils")


class Recorder:
    """Stands in for ``np`` / ``random`` (/ ``torch`` for CAL's ``zeros_like(...).uniform_``) inside
    an official module: draws as they do and records what each draw returned."""

    def __init__(self, real: Any, name: str, log: list) -> None:
        self.real, self.name, self.log = real, name, log

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self.real, attribute)
        if attribute == "random" and self.name == "np":
            return Recorder(value, "np.random", self.log)
        if attribute in ("choice", "uniform", "zeros_like"):
            def recorded(*args: Any, **kwargs: Any) -> Any:
                result = value(*args, **kwargs)
                self.log.append((attribute, result))
                return result
            return recorded
        return value


def run(wsdan: Any, utils: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    net = wsdan.WSDAN(CLASSES, M=MAPS, net="resnet50", pretrained=False)
    net.features = trunk()
    net.attentions = wsdan.BasicConv2d(32, MAPS, kernel_size=1)
    net.fc = torch.nn.Linear(MAPS * 32, CLASSES, bias=False)
    net = net.to(dtype)
    tensors = {f"init.{k}": v.clone() for k, v in net.state_dict().items()}
    log: list = []
    wsdan.np = Recorder(np, "np", log)
    utils.random = Recorder(random, "random", log)
    x, y = images(dtype), torch.tensor(LABELS)
    centres = torch.zeros(CLASSES, MAPS * 32, dtype=dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-5)
    cross_entropy, centre_loss = torch.nn.CrossEntropyLoss(), utils.CenterLoss()
    net.train()
    for step in range(2):
        log.clear()
        optimizer.zero_grad()
        raw, features, attention = net(x)
        targets = F.normalize(centres[y], dim=-1)
        centres[y] += 0.05 * (features.detach() - targets)
        with torch.no_grad():
            crops = utils.batch_augment(x, attention[:, :1, :, :], mode="crop", theta=(0.4, 0.6), padding_ratio=0.1)
        cropped, _, _ = net(crops)
        with torch.no_grad():
            drops = utils.batch_augment(x, attention[:, 1:, :, :], mode="drop", theta=(0.2, 0.5))
        dropped, _, _ = net(drops)
        terms = [cross_entropy(raw, y), cross_entropy(cropped, y), cross_entropy(dropped, y),
                 centre_loss(features, targets)]
        loss = terms[0] / 3. + terms[1] / 3. + terms[2] / 3. + terms[3]
        loss.backward()
        optimizer.step()
        choices = [value for kind, value in log if kind == "choice"]
        uniforms = [value for kind, value in log if kind == "uniform"]
        tensors |= {
            f"step{step}.maps": torch.tensor(np.stack(choices[:BATCH])),  # the raw pass's; crop/drop passes draw too
            f"step{step}.crop_theta": torch.tensor(uniforms[:BATCH], dtype=torch.float64),
            f"step{step}.drop_theta": torch.tensor(uniforms[BATCH:], dtype=torch.float64),
            f"step{step}.raw": raw.detach(), f"step{step}.crop": cropped.detach(), f"step{step}.drop": dropped.detach(),
            f"step{step}.features": features.detach(), f"step{step}.attention": attention.detach(),
            f"step{step}.terms": torch.stack([t.detach() for t in terms]), f"step{step}.loss": loss.detach(),
            f"step{step}.centres": centres.clone(),
            # crop and drop images: 3 x 3 x 224 x 224 is too large to commit; a checksum per image and
            # one row each pin them down
            f"step{step}.crop_images.sum": crops.sum(dim=(1, 2, 3)), f"step{step}.crop_images.row": crops[:, :, SIZE // 2],
            f"step{step}.drop_images.sum": drops.sum(dim=(1, 2, 3)), f"step{step}.drop_images.row": drops[:, :, SIZE // 2],
        }
    tensors |= {f"after.{k}": v.clone() for k, v in net.state_dict().items()}
    net.eval()
    with torch.no_grad():
        raw, _, mean_map = net(x)
        crops = utils.batch_augment(x, mean_map, mode="crop", theta=0.1, padding_ratio=0.05)
        cropped, _, _ = net(crops)
    tensors |= {"eval.raw": raw, "eval.crop": cropped, "eval.prediction": (raw + cropped) / 2.,
                "eval.mean_map": mean_map, "eval.crop_images.sum": crops.sum(dim=(1, 2, 3))}
    return tensors


def main(checkout: str, out: str = "tests/data/golden/ws_dan") -> None:
    wsdan, utils = load(checkout)
    tensors: dict[str, torch.Tensor] = {"labels": torch.tensor(LABELS)}
    for dtype, name in ((torch.float64, "f64"), (torch.float32, "f32")):
        tensors |= {f"{name}.{key}": value for key, value in run(wsdan, utils, dtype).items()}
    write(Path(out), tensors, official_commit(checkout), REPO)


if __name__ == "__main__":
    main(*sys.argv[1:])
