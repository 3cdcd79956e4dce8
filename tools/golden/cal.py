"""Golden tensors for ``cal`` from raoyongming/CAL (``fgvc/``).

Usage: python tools/golden/cal.py <checkout of CAL> [out dir]

Imports the official ``fgvc/models`` (``WSDAN_CAL``, ``BAP``, ``BasicConv2d``) and ``fgvc/utils.py``
(``CenterLoss``, ``batch_augment``: the one training uses) from a temporary copy; never
``train_distributed.py`` (apex) or ``infer.py`` (CUDA). As for WS-DAN (tools/golden/ws_dan.py,
whose trunk, inputs and recorders this reuses), ``WSDAN_CAL(5 classes, M = 4, 'resnet50')`` gets
the small conv trunk. The training step is train_distributed.py lines 205-240 restated (raw pass,
centre update, crops and drops concatenated into one pass, loss = CE(raw)/3 + CE(effect, 3B) +
(2/3)·CE(crops and drops) + centre loss) with SGD lr 1e-3 (the first iteration's value of its
per-iteration schedule), momentum 0.9, weight decay 1e-5; two steps, then the test views of
infer.py lines 143-179 (image and flip, raw + crops (0.3, 0.1), (0.2, 0.1), (0.1, 0.05)) and the
training log's two-view prediction. The counterfactual maps (``torch.zeros_like(A).uniform_(0, 2)``),
NumPy map indices and Python θ draws are recorded. Float64 and float32.
"""

from __future__ import annotations

import importlib
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import official_commit, official_file, write
from ws_dan import BATCH, CLASSES, LABELS, MAPS, SIZE, Recorder, images, trunk

REPO = "raoyongming/CAL"
FILES = ("models/__init__.py", "models/resnet.py", "models/inception.py", "models/cal.py", "models/blocks.py",
         "utils.py")


def load(checkout: str) -> tuple:
    folder = Path(tempfile.mkdtemp())
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(official_file(checkout, f"fgvc/{name}"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("models.cal"), importlib.import_module("utils")


def run(cal, utils, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    net = cal.WSDAN_CAL(CLASSES, M=MAPS, net="resnet50", pretrained=False)
    net.features = trunk()
    net.attentions = cal.BasicConv2d(32, MAPS, kernel_size=1)
    net.fc = torch.nn.Linear(MAPS * 32, CLASSES, bias=False)
    net = net.to(dtype)
    tensors = {f"init.{k}": v.clone() for k, v in net.state_dict().items()}
    log: list = []
    cal.np, cal.torch, utils.random = Recorder(np, "np", log), Recorder(torch, "torch", log), Recorder(random, "random", log)
    x, y = images(dtype), torch.tensor(LABELS)
    centres = torch.zeros(CLASSES, MAPS * 32, dtype=dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-5)
    cross_entropy, centre_loss = torch.nn.CrossEntropyLoss(), utils.CenterLoss()
    net.train()
    for step in range(2):
        log.clear()
        optimizer.zero_grad()
        raw, effect, features, attention = net(x)
        targets = F.normalize(centres[y], dim=-1)
        centres[y] += 0.05 * (features.detach() - targets)
        with torch.no_grad():
            crops = utils.batch_augment(x, attention[:, :1, :, :], mode="crop", theta=(0.4, 0.6), padding_ratio=0.1)
            drops = utils.batch_augment(x, attention[:, 1:, :, :], mode="drop", theta=(0.2, 0.5))
        augmented = torch.cat([crops, drops], dim=0)
        y_aug = torch.cat([y, y], dim=0)
        aug, effect_aug, _, _ = net(augmented)
        effects = torch.cat([effect, effect_aug], dim=0)
        terms = [cross_entropy(raw, y), cross_entropy(effects, torch.cat([y, y_aug], dim=0)), cross_entropy(aug, y_aug),
                 centre_loss(features, targets)]
        loss = terms[0] / 3. + terms[1] * 3. / 3. + terms[2] * 2. / 3. + terms[3]
        loss.backward()
        optimizer.step()
        choices = [value for kind, value in log if kind == "choice"]
        uniforms = [value for kind, value in log if kind == "uniform"]
        fakes = [value for kind, value in log if kind == "zeros_like"]
        tensors |= {
            f"step{step}.maps": torch.tensor(np.stack(choices[:BATCH])),
            f"step{step}.crop_theta": torch.tensor(uniforms[:BATCH], dtype=torch.float64),
            f"step{step}.drop_theta": torch.tensor(uniforms[BATCH:], dtype=torch.float64),
            f"step{step}.fake_raw": fakes[0], f"step{step}.fake_aug": fakes[1],
            f"step{step}.raw": raw.detach(), f"step{step}.effect": effects.detach(), f"step{step}.aug": aug.detach(),
            f"step{step}.features": features.detach(), f"step{step}.attention": attention.detach(),
            f"step{step}.terms": torch.stack([t.detach() for t in terms]), f"step{step}.loss": loss.detach(),
            f"step{step}.centres": centres.clone(),
            f"step{step}.aug_images.sum": augmented.sum(dim=(1, 2, 3)), f"step{step}.aug_images.row": augmented[:, :, SIZE // 2],
        }
    tensors |= {f"after.{k}": v.clone() for k, v in net.state_dict().items()}
    net.eval()
    with torch.no_grad():
        views = {}
        for name, image in (("", x), ("_m", torch.flip(x, [3]))):
            raw, effect, _, mean_map = net(image)
            views[f"raw{name}"], views[f"effect_raw{name}"] = raw, effect
            for index, (theta, padding) in enumerate(((0.3, 0.1), (0.2, 0.1), (0.1, 0.05))):
                crop = utils.batch_augment(image, mean_map, mode="crop", theta=theta, padding_ratio=padding)
                views[f"crop{index}{name}"], views[f"effect_crop{index}{name}"] = net(crop)[:2]
        prediction = (views["raw"] + views["crop0"] + views["crop1"] + views["crop2"]) / 4.
        mirrored = (views["raw_m"] + views["crop0_m"] + views["crop1_m"] + views["crop2_m"]) / 4.
        effect = (views["effect_raw"] + views["effect_crop0"] + views["effect_crop1"] + views["effect_crop2"]) / 4.
        effect_m = (views["effect_raw_m"] + views["effect_crop0_m"] + views["effect_crop1_m"] + views["effect_crop2_m"]) / 4.
    tensors |= {
        "eval.raw": views["raw"], "eval.prediction": (prediction + mirrored) / 2., "eval.effect": (effect + effect_m) / 2.,
        # train_distributed.py validate (lines 300-309): raw + the (0.1, 0.05) crop
        "eval.two_view": (views["raw"] + views["crop2"]) / 2., "eval.effect_two_view": (views["effect_raw"] + views["effect_crop2"]) / 2.,
    }
    return tensors


def main(checkout: str, out: str = "tests/data/golden/cal") -> None:
    cal, utils = load(checkout)
    tensors: dict[str, torch.Tensor] = {"labels": torch.tensor(LABELS)}
    for dtype, name in ((torch.float64, "f64"), (torch.float32, "f32")):
        tensors |= {f"{name}.{key}": value for key, value in run(cal, utils, dtype).items()}
    write(Path(out), tensors, official_commit(checkout), REPO)


if __name__ == "__main__":
    main(*sys.argv[1:])
