"""A run's data settings resolved once, as timm's ``resolve_data_config`` resolves a model's.

The recipe's ``dataset`` section (or a run's config.json copy of it) says what the user asked for;
the dataset's ``DatasetSpec`` and its prepared store's meta.json say what the images are. This module
turns the two into one ``DataConfig`` (input size, resize, crop, flip, mean/std, colour jitter) that
the dry run, the loaders of every path, ``eval``, ``attend``, ``export`` and the run summary read, so
none of them decides a default of its own. The transforms that apply it live in ``presets``.

Augmentations (the authors' transforms, docs/MECHANISM.md §3):
- ``cifar``: reflect-pad 4, random crop back to size, horizontal flip; CIFAR mean/std.
- ``imagenet``: train resize shorter side to round(s*256/224), random crop s, flip; test the
  same resize and a centre crop; ImageNet mean/std (``s`` = input_size, default 224).
- ``none``: to-tensor and normalise only (resized to input_size when given).
- ``auto``: ``cifar`` for stores whose images are at most 64 px (meta ``image_max_side``),
  ``imagenet`` otherwise. Datasets whose meta says ``info.no_flip`` (digits) are never flipped.

``color_jitter`` (``presets.ColorJitter``, off by default) adds torchvision's colour jitter to the
training images of any augmentation but ``none``. ``resize`` (``presets.Resize``, default the
``imagenet`` rule above) replaces that augmentation's resize before the crop: an int for the shorter
side, or (height, width) for an exact, aspect-changing resize. ``normalize`` (a ``NORMALIZATIONS``
name or ``presets.Normalization``, default the augmentation's own) replaces the mean/std.

Resolved values never enter a run id: the id hashes the recipe's own settings (``recipe.run_id_for``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finebench.data.presets import ColorJitter, Normalization, Resize, Transform
from finebench.errors import FinebenchError

if TYPE_CHECKING:
    from finebench.data.builders.base import DatasetSpec

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar": (CIFAR_MEAN, CIFAR_STD),
    "half": (HALF_MEAN, HALF_STD),
}
"""``dataset.normalize``'s named (mean, std) presets; "half" maps 0..1 pixels to -1..1 (PMG's official
``Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))``)."""
IMAGENET_INPUT_SIZE = 224
"""The ``imagenet`` augmentation's crop when ``input_size`` is unset."""
SMALL_IMAGE_MAX_SIDE = 64
"""``auto`` takes the ``cifar`` augmentation for stores whose images are at most this many pixels a side."""
AUGMENTATIONS = ("auto", "cifar", "imagenet", "none")
SETTINGS = ("input_size", "augmentation", "color_jitter", "resize", "normalize")
"""The ``dataset`` keys the resolver reads (a recipe's section or a run's config.json copy)."""


@dataclass(frozen=True)
class DataConfig:
    """What the network gets, resolved from the recipe and the store: ``augmentation`` ("cifar",
    "imagenet" or "none", never "auto"), ``crop`` (the final side; None keeps the stored size),
    ``resize`` (imagenet: ``presets.Resize`` before cropping; cifar/none: the square side), ``flip``
    (training), ``mean``/``std``, ``color_jitter`` (training) and ``image_side`` (the store's
    uniform image side, where it has one)."""

    augmentation: str
    crop: int | None
    resize: Resize | None
    flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_jitter: ColorJitter | None = None
    image_side: int | None = None

    @property
    def input_size(self) -> int | None:
        """The side of the square images the network gets (None: images of their own sizes): what
        the run's costs are counted at and its summary records."""
        return self.crop or self.image_side

    def transform(self, train: bool) -> Transform:
        """The per-split transform settings: training adds the flip and the colour jitter."""
        return Transform(self.augmentation, train, self.crop, self.resize, self.flip and train, self.mean, self.std,
                         self.color_jitter if train else None)


def as_resize(value: int | Sequence[int] | None) -> Resize | None:
    """``dataset.resize`` as the transforms take it: a recipe's (or config.json's) [height, width]
    list becomes a tuple; an int or None stays."""
    if value is None or isinstance(value, int):
        return value
    height, width = value
    return int(height), int(width)


def resize_problem(resize: int | Sequence[int] | None, kind: str, input_size: int | None) -> str | None:
    """Why ``dataset.resize`` cannot apply to the augmentation ``kind`` (not "auto") at this
    ``input_size``, or None: the recipe check (``--dry-run``) and the resolver ask the same question."""
    resize = as_resize(resize)
    if resize is None:
        return None
    if kind != "imagenet":
        return (f"augmentation {kind!r} has no resize before a crop; remove resize or choose augmentation "
                "imagenet (or auto on a store of photos)")
    size = input_size or IMAGENET_INPUT_SIZE
    if min(resize if isinstance(resize, tuple) else (resize,)) < size:
        return (f"smaller than the {size} px crop (dataset.input_size = {input_size}): "
                f"every side must be at least {size}")
    return None


def normalization(setting: str | Normalization | Mapping[str, Any] | None,
                  default: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of ``dataset.normalize``: a ``NORMALIZATIONS`` name, numbers (a config.json
    mapping too), or None for the augmentation's own ``default``."""
    if setting is None:
        return default
    if isinstance(setting, str):
        if setting not in NORMALIZATIONS:
            raise FinebenchError(f"dataset.normalize {setting!r} is not a preset: expected one of "
                                 f"{', '.join(NORMALIZATIONS)} or {{mean = [r, g, b], std = [r, g, b]}}")
        return NORMALIZATIONS[setting]
    numbers = setting if isinstance(setting, Normalization) else Normalization.model_validate(dict(setting))
    return numbers.pair()


def planned_input_size(settings: Mapping[str, Any], spec: DatasetSpec) -> int:
    """The input size before the store is read (the dry run's costs): the recipe's, else the dataset's
    own default (``DatasetSpec.input_size``, the side ``resolve_data_config`` gives its store)."""
    return settings.get("input_size") or spec.input_size


def meta_without_store(name: str | None, input_size: int | None) -> dict[str, Any]:
    """What ``resolve_data_config`` reads from a store's meta.json, judged from the input size alone,
    for a trained run whose prepared store is not at hand (``finebench attend`` on another machine)."""
    return {"name": name, "image_max_side": input_size or IMAGENET_INPUT_SIZE,
            "image_size": [input_size, input_size] if input_size else None}


def resolve_data_config(settings: Mapping[str, Any], meta: Mapping[str, Any]) -> DataConfig:
    """The run's ``DataConfig`` from its ``dataset`` settings (``SETTINGS`` keys; missing ones take
    their defaults) and the prepared store's meta.json; a setting the store cannot take is a
    ``FinebenchError`` naming it."""
    augmentation = settings.get("augmentation") or "auto"
    input_size, resize = settings.get("input_size"), settings.get("resize")
    color_jitter, normalize = settings.get("color_jitter"), settings.get("normalize")
    if isinstance(color_jitter, Mapping):
        color_jitter = ColorJitter.model_validate(dict(color_jitter))
    if augmentation not in AUGMENTATIONS:
        raise FinebenchError(f"augmentation {augmentation!r} is not valid: expected one of {', '.join(AUGMENTATIONS)}")
    max_side = meta.get("image_max_side") or 0
    small = max_side <= SMALL_IMAGE_MAX_SIDE
    kind = augmentation if augmentation != "auto" else ("cifar" if small else "imagenet")
    if color_jitter is not None and kind == "none":
        raise FinebenchError("dataset.color_jitter: augmentation 'none' trains on unaugmented images; "
                             "remove color_jitter or choose augmentation auto, cifar or imagenet")
    problem = resize_problem(resize, kind, input_size)
    if problem:
        shown = list(resize) if isinstance(resize, (list, tuple)) else resize
        raise FinebenchError(f"dataset.resize = {shown}: {problem}")
    flip = kind != "none" and not meta.get("info", {}).get("no_flip", False)
    if kind == "imagenet":
        size = input_size or IMAGENET_INPUT_SIZE
        default_resize = round(size * 256 / IMAGENET_INPUT_SIZE)
        resize, mean, std = as_resize(resize) or default_resize, IMAGENET_MEAN, IMAGENET_STD
    else:
        uniform = meta.get("image_size")
        if input_size is None and not (uniform and uniform[0] == uniform[1]):
            if kind == "cifar":
                input_size = max_side  # small images of mixed sizes: square them at the largest side
            else:
                raise FinebenchError(
                    f"dataset {meta.get('name')!r} has images of different sizes: augmentation 'none' needs input_size"
                )
        size = resize = input_size
        mean, std = (CIFAR_MEAN, CIFAR_STD) if small else (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = normalization(normalize, (mean, std))
    image_side = (meta.get("image_size") or [None])[0]
    return DataConfig(kind, size, resize, flip, mean, std, color_jitter, image_side)
