"""Samples/s of finebench's data pipeline against torchvision's ImageFolder on the same JPEG images.

Synthetic photographs (smooth colour fields with edges and noise, so JPEG sizes and decode times
are realistic) are written once as an ImageFolder tree of JPEG files and once, from those very
files, through ``finebench prepare``'s real store writer. Each pipeline then delivers shuffled,
augmented, normalised training batches with the same number of worker processes:

* 224x224 from 500x375 JPEGs (the typical CUB / Stanford Dogs photo) and from 1024x768 ones (where
  the JPEG draft decoding applies): finebench's ``imagenet`` recipe (resize 256, random crop 224,
  flip) vs ImageFolder + Resize(256), RandomCrop(224), RandomHorizontalFlip, ToTensor, Normalize.
  Also finebench's device path (``dataset.decode = "device"``: workers read bytes, the batch is
  decoded with ``torchvision.io.decode_jpeg`` and augmented on the GPU, or on the CPU without one).
* 32x32: finebench's ``cifar`` recipe (reflect-pad 4, crop, flip) through the worker pipeline
  and through the in-memory uint8 path (batched augmentation on the device), vs ImageFolder +
  RandomCrop(32, padding 4, reflect), flip, ToTensor, Normalize.

Next to each, the training step it feeds (ResNet-50 / WRN-16-4 at the engine's default precision)
is timed, so the output says whether the loader keeps up. Target: >= 2x ImageFolder, and faster
than the training step.

    python benchmarks/loader.py            # about 3 minutes on 2 cores
    python benchmarks/loader.py --quick    # smoke run
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from finebench.bench import (
    benchmark_arguments,
    format_table,
    machine_line,
    paired_ratio,
    parse_benchmark_arguments,
    synthetic_batch,
    time_side_by_side,
)
from finebench.data import config as fb_config
from finebench.data import loader as fb_loader
from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.data.prepare import prepare_dataset
from finebench.data.synthetic import synthetic_photo
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

TARGET = 2.0
CLASSES = [f"class{i}" for i in range(10)]


def write_image_folder(root: Path, count: int, width: int, height: int, seed: int) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(seed)
    files = []
    for index in range(count):
        label = index % len(CLASSES)
        path = root / CLASSES[label] / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_photo(rng, width, height).save(path, format="JPEG", quality=90)
        files.append((path, label))
    return files


def prepare_store(name: str, data_root: Path, train: list[tuple[Path, int]], test: list[tuple[Path, int]]) -> None:
    """The same JPEG files through finebench's real prepare/store writer (bytes kept as they are)."""

    def parse(_raw_dir: Path) -> ParsedDataset:
        return ParsedDataset(CLASSES, {split: [Example(path, label) for path, label in files]
                                       for split, files in (("train", train), ("test", test))})

    spec = DatasetSpec(name=name, num_classes=len(CLASSES), split_sizes={}, protocol="benchmark",
                       terms="synthetic", homepage="", parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(name, data_root, quiet=True)


def image_folder_loader(root: Path, size: int, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from torchvision import datasets, transforms

    if size >= 64:
        augment = [transforms.Resize(round(size * 256 / 224)), transforms.RandomCrop(size)]
        mean, std = fb_config.IMAGENET_MEAN, fb_config.IMAGENET_STD
    else:
        augment = [transforms.RandomCrop(size, padding=4, padding_mode="reflect")]
        mean, std = fb_config.CIFAR_MEAN, fb_config.CIFAR_STD
    transform = transforms.Compose([*augment, transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform=transform), batch_size=batch,
                                       shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def drain(loader: Iterable) -> None:
    for _images, _labels in loader:
        pass


@functools.cache
def step_speed(backbone: str, size: int, batch: int, repeats: int) -> float:
    """Images/s of the training step at the engine's defaults, for the 'does the loader keep up' column."""
    torch.manual_seed(0)
    options = {"depth": 16, "width": 4} if backbone == "wrn" else {}
    model = build_model(backbone, 10, "baseline", None, options)
    step = build_train_step(model, TrainSection(epochs=1, batch_size=batch, schedule="constant"),
                            method=get_method("baseline"), steps_per_epoch=100)
    images, labels = synthetic_batch(batch, size, 10, device=step.device)
    return time_side_by_side({"step": lambda: step(images, labels)}, items=batch, warmup=1, repeats=repeats,
                             device=step.device)["step"].per_s


def compare(folder: Path, size: int, source: tuple[int, int], count: int, batch: int, workers: int,
            repeats: int, step_backbone: str, step_batch: int) -> list[list]:
    name = f"bench{size}_{source[0]}"
    train = write_image_folder(folder / name / "train", count, *source, seed=size)
    test = write_image_folder(folder / name / "test", 2 * len(CLASSES), *source, seed=size + 1)
    prepare_store(name, folder / "data", train, test)
    common = {"batch_size": batch, "workers": workers, "seed": 0, "input_size": size}
    candidates = {
        "finebench (workers)": fb_loader.build_loaders(name, folder / "data", **common).train,
        "ImageFolder": image_folder_loader(folder / name / "train", size, batch, workers),
    }
    if size <= fb_config.SMALL_IMAGE_MAX_SIDE:
        in_memory = fb_loader.build_loaders(name, folder / "data", in_memory=True, **common).train
        candidates = {"finebench (in-memory)": in_memory, **candidates}
    else:
        # Workers read bytes; decode, resize, crop, flip and normalise run in batches on the device
        # (nvJPEG on a GPU; here on the CPU when there is none, where one process decodes alone).
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        on_device = fb_loader.build_loaders(name, folder / "data", decode="device", device=device, **common).train
        candidates = {f"finebench (decode on {device.type})": on_device, **candidates}
    timings = time_side_by_side({label: (lambda ld=ld: drain(ld)) for label, ld in candidates.items()},
                                items=count, warmup=1, repeats=repeats,
                                device="cuda" if torch.cuda.is_available() else None)
    reference = timings["ImageFolder"]
    step_per_s = step_speed(step_backbone, size, step_batch, 2)
    return [[f"{size}x{size} (from {source[0]}x{source[1]} JPEG)", label, workers, f"{t.per_s:,.0f}",
             f"{paired_ratio(t, reference):.2f}x", f"{step_per_s:,.1f}", f"{t.per_s / step_per_s:,.1f}x", f"{t.spread_pct:.0f}%"]
            for label, t in timings.items()]


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--workers", type=int, default=2)
    args = parse_benchmark_arguments(parser)
    big, small, repeats = 768, 5000, 5
    if args.quick:
        big, small, repeats = 32, 256, 1
    print("loader: samples/s of finebench's pipeline vs torchvision ImageFolder on the same JPEG images")
    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory(prefix="finebench-loader-") as folder:
        for source, count in (((500, 375), big), ((1024, 768), big * 2 // 3)):
            rows += compare(Path(folder), 224, source, count, 32, args.workers, repeats, "resnet50", 4 if args.quick else 16)
        rows += compare(Path(folder), 32, (32, 32), small, 128, args.workers, repeats, "wrn", 4 if args.quick else 64)
    print(format_table(["images", "pipeline", "workers", "samples/s", "vs ImageFolder", "train step img/s",
                        "loader/step", "spread"], rows))
    print(f"target: >= {TARGET:.0f}x ImageFolder and loader/step > 1 (the step: ResNet-50 at 224, WRN-16-4 at 32, "
          "engine defaults; here loader and step share the same 2 cores, on a GPU machine they do not)")


if __name__ == "__main__":
    main()
