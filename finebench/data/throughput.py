"""How fast, and how exactly, the data paths deliver training batches: the measurements the GPU
suite (``benchmarks/gpu_suite.py``) and ``benchmarks/loader.py`` make of the loader.

It sits above ``loader`` and ``gpu_decode`` (it builds loaders through the real prepare and loader
code on synthetic JPEGs), so neither of those imports it.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finebench.data.config import IMAGENET_STD
from finebench.data.loader import build_loaders
from finebench.data.synthetic import prepare_synthetic_jpeg_store


@dataclass(frozen=True)
class LoaderThroughput:
    path: str
    """"device" (``gpu_decode``) or "workers" (PIL in worker processes)."""
    device: str
    images_per_s: float
    repeats_s: list[float]
    images: int
    source_size: tuple[int, int]
    input_size: int
    batch_size: int
    workers: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure_throughput(
    device: str | torch.device = "cuda",
    *,
    path: str = "device",
    source_size: tuple[int, int] = (500, 375),
    images: int = 1024,
    input_size: int = 224,
    batch_size: int = 128,
    workers: int = 4,
    repeats: int = 3,
    folder: Path | None = None,
) -> LoaderThroughput:
    """Training-batch images/s of one data path at ``input_size`` from synthetic ``source_size`` JPEGs.

    Writes a store of ``images`` synthetic photographs (q90 JPEG) through the real prepare code
    into ``folder`` (a temporary folder when None), builds the training loader with
    ``decode=path`` ("device" or "workers") on ``device``, drains one epoch to warm up (worker
    start, nvJPEG handles, allocator) and times ``repeats`` further epochs, waiting for the device
    at the end of each. Returns the median. The batches are the ``imagenet`` recipe's (resize
    round(input_size*256/224), random crop, flip, normalise), ready on ``device``.
    """
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        root = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        name = f"synthetic_jpeg_{source_size[0]}x{source_size[1]}_{images}"
        prepare_synthetic_jpeg_store(root, name, train=images, test=2, size=source_size)
        loader = build_loaders(name, root, batch_size=batch_size, workers=workers, input_size=input_size,
                               augmentation="imagenet", decode=path, device=device,
                               pin_memory=device.type == "cuda").train
        timings = []
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            seen = 0
            for batch, _labels in loader:
                if batch.device != device:
                    batch = batch.to(device, non_blocking=True)
                seen += len(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                timings.append(time.perf_counter() - start)
        median = statistics.median(timings)
        return LoaderThroughput(path, str(device), seen / median, timings, seen, tuple(source_size), input_size,
                                batch_size, workers)


def compare_with_workers(
    device: str | torch.device = "cuda",
    *,
    source_size: tuple[int, int] = (400, 300),
    images: int = 64,
    input_size: int = 224,
    folder: Path | None = None,
) -> dict[str, float]:
    """How far the device path's evaluation batches are from the worker path's on the same
    synthetic JPEGs, in grey levels: ``{"max_grey_levels", "mean_grey_levels", "images"}``.

    The check the tests make on CPU tensors, for a GPU (nvJPEG's decode is not libjpeg-turbo's,
    so this is where a difference would show). Keep ``source_size``'s shorter side below twice
    round(input_size*256/224), where the worker path decodes at reduced scale instead.
    """
    device = torch.device(device)
    std_255 = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    with contextlib.ExitStack() as stack:
        root = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        name = f"synthetic_jpeg_{source_size[0]}x{source_size[1]}_{images}_check"
        prepare_synthetic_jpeg_store(root, name, train=2, test=images, size=source_size, seed=1)
        common = {"batch_size": 32, "input_size": input_size, "augmentation": "imagenet"}
        on_device = build_loaders(name, root, decode="device", device=device, **common).test
        on_workers = build_loaders(name, root, decode="workers", **common).test
        largest, total, count = 0.0, 0.0, 0
        for (got, _), (expected, _) in zip(on_device, on_workers):
            levels = (got.cpu() - expected).abs() * std_255
            largest = max(largest, float(levels.max()))
            total, count = total + float(levels.sum()), count + levels.numel()
    return {"max_grey_levels": largest, "mean_grey_levels": total / count, "images": images}
