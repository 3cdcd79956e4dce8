"""A tiny learnable image dataset prepared through finebench's real store, for end-to-end runs.

It is stored under a registered offline name (``mnist5k``) so that ``finebench`` subprocesses and
torchrun workers, which cannot see a test's registry override, still find the store by name.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from collections.abc import Callable
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.data.prepare import prepare_dataset

DATASET = "mnist5k"
EVENTS = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
"""What a run folder holds beside its records: TensorBoard events where the optional extra is installed."""
CLASSES = 10


def bar_examples(count: int, rng: np.random.Generator,
                 group_of: Callable[[int, int], int | None] | None = None) -> list[Example]:
    """16x16 noise with a bright bar whose row encodes the class: learnable in a few steps.
    ``group_of(index, label)``: each image's group (iNat's supercategory), for tests of per-group results."""
    examples = []
    for i in range(count):
        label = i % CLASSES
        image = rng.integers(0, 60, (16, 16), dtype=np.uint8)
        image[label : label + 4, 2:14] = 255
        examples.append(Example(image, label, None if group_of is None else group_of(i, label)))
    return examples


def prepare_tiny_bars(root: Path, train_images: int, test_images: int) -> Path:
    """Prepare the bars dataset into ``root`` and return ``root`` (the data root)."""

    def parse(raw_dir: Path) -> ParsedDataset:
        rng = np.random.default_rng(0)
        return ParsedDataset(
            [str(c) for c in range(CLASSES)], {"train": bar_examples(train_images, rng), "test": bar_examples(test_images, rng)}
        )

    spec = DatasetSpec(name=DATASET, num_classes=CLASSES, split_sizes={}, protocol="test", terms="test",
                       homepage="", parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(DATASET, root, quiet=True)
    return root


def tiny_recipe(
    *,
    seeds: tuple[int, ...] | None = (0,),
    variants: tuple[str | Mapping[str, Any], ...] = ("baseline",),
    attention_depth: int = 2,
    attention_width: int = 2,
    dataset: str = DATASET,
    input_size: int = 16,
    augmentation: str = "none",
    extra_dataset: str = "",
    epochs: int = 1,
    batch_size: int = 16,
    eval_batch_size: int | None = 40,
    lr: float | None = 0.05,
    schedule: str = "constant",
    extra_train: str = "",
    backbone: str = "wrn",
    model_options: str = "{ depth = 10, width = 1 }",
    extra_model: str = "",
) -> str:
    """The TOML of a tiny fp32 recipe (by default WRN-10-1) on ``dataset`` (by default the bars set), one line per key.

    ``variants`` are kinds, ``"baseline"`` or ``"attention"`` (the latter with ``attention_depth`` and
    ``attention_width``), or any method's variant as a mapping (``{"kind": "mcl", "xi": 2}``: kind,
    name and options: scalars and lists, written as TOML values); ``seeds``, ``eval_batch_size`` or ``lr`` of None leave that key out;
    ``extra_dataset``, ``extra_model`` and ``extra_train`` are lines appended to their tables.
    """
    lines = [""]
    if seeds is not None:
        lines.append(f"seeds = [{', '.join(str(seed) for seed in seeds)}]")
    lines += ["[dataset]", f'name = "{dataset}"', f"input_size = {input_size}", f'augmentation = "{augmentation}"']
    if extra_dataset:
        lines.append(extra_dataset)
    lines += ["[model]", f'backbone = "{backbone}"', f"options = {model_options}"]
    if extra_model:
        lines.append(extra_model)
    for kind in variants:
        if not isinstance(kind, str):
            lines += ["[[variants]]", *(f"{key} = {json.dumps(value)}" for key, value in kind.items())]
            continue
        lines += ["[[variants]]", f'kind = "{kind}"']
        if kind == "attention":
            lines += [f"attention_depth = {attention_depth}", f"attention_width = {attention_width}"]
    lines += ["[train]", f"epochs = {epochs}", f"batch_size = {batch_size}"]
    if eval_batch_size is not None:
        lines.append(f"eval_batch_size = {eval_batch_size}")
    if lr is not None:
        lines.append(f"lr = {lr}")
    lines += [f'schedule = "{schedule}"', 'precision = "fp32"']
    if extra_train:
        lines.append(extra_train)
    return "\n".join(lines) + "\n"


def prepare_three_classes(root: Path, name: str, images: list, *, short_side: int | None = None) -> None:
    """``images`` (arrays or encoded files) prepared through the real store as dataset ``name``:
    labels 0, 1, 2 in turn, the first two thirds train and the rest test. For tests of the data
    paths (augmentations, resizes), which need images of their own rather than the bars."""
    labels = [index % 3 for index in range(len(images))]
    half = len(images) * 2 // 3

    def parse(_raw: Path) -> ParsedDataset:
        return ParsedDataset(["a", "b", "c"], {
            "train": [Example(image, label) for image, label in zip(images[:half], labels[:half], strict=True)],
            "test": [Example(image, label) for image, label in zip(images[half:], labels[half:], strict=True)],
        })

    spec = DatasetSpec(name=name, num_classes=3, split_sizes={}, protocol="test", terms="test", homepage="",
                       parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(name, root, quiet=True, short_side=short_side)


def cut_where_torch_load_says_einval(checkpoint: Path) -> None:
    """Cut ``checkpoint`` short at the first length (in KiB) where ``torch.load`` fails with an
    ``OSError`` ("[Errno 22] Invalid argument", issue 27 item 4: a file cut short to under ~64 KiB)
    rather than the ``RuntimeError`` that most cuts give; an error if no cut does any more."""
    import torch

    data = checkpoint.read_bytes()
    for keep in range(1024, len(data), 1024):
        checkpoint.write_bytes(data[:keep])
        try:
            torch.load(checkpoint, map_location="cpu", weights_only=True)
        except OSError:
            return
        except (RuntimeError, EOFError, pickle.UnpicklingError):  # the other ways torch reports damage
            pass
    raise AssertionError(f"no cut of {checkpoint} makes torch.load raise OSError: the test lost its case")
