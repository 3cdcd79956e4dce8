"""The recipe's ``[dataset]`` and ``[model]`` tables: their fields, defaults and checks.

``finebench.recipe`` assembles them with ``[train]`` (``finebench.train_settings``) and the variants
into a ``Recipe``; they live apart so that the recipe module holds loading and expansion only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finebench.data.config import NORMALIZATIONS, resize_problem
from finebench.data.presets import ColorJitter, Normalization
from finebench.data.root import DEFAULT_ROOT
from finebench.models.batchnorm import BATCHNORM_INITS, BatchNormInit
from finebench.models.registry import LIBRARY_WEIGHTS
from finebench.train_settings import Section

MAX_INPUT_SIZE = 4096
"""The largest ``dataset.input_size``: at 4096 px a side one ResNet-50 training image keeps about 73 GB
of activations for its backward pass (222 MB at 224 px, counted with ``torch.autograd.graph.
saved_tensors_hooks``, times (4096 / 224)²), so a single image barely fits the largest GPUs; beyond
it not one image trains, and the cost probe of every run and dry run (one float32 image, 12 bytes a
pixel) would itself ask for gigabytes. A larger value is a typo, not a protocol: the fine-grained
ones crop at most 448 px."""


class ValidationSection(Section):
    """``dataset.validation``: the images model selection looks at, never trained on
    (``finebench.data.validation``): ``{fraction = 0.1, seed = 0}`` carves a class-stratified share of
    the training split, ``{split = "val"}`` names a split of the store (FGVC-Aircraft's, Oxford Flowers')."""

    fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    """Which images a fraction takes (its own generator: the run's ``seeds`` do not move it)."""
    split: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSection:
        if (self.fraction is None) == (self.split is None):
            raise ValueError('expected either fraction (e.g. { fraction = 0.1, seed = 0 }: carved from the training '
                             'split) or split (e.g. { split = "val" }: a split of the store), got '
                             + ("both" if self.split is not None else "neither"))
        if self.split is not None and "seed" in self.model_fields_set:
            raise ValueError("seed chooses the images of a fraction; a named split takes all its images: remove seed")
        return self


class DatasetSection(Section):
    name: str
    root: str = DEFAULT_ROOT
    input_size: Annotated[int, Field(gt=0)] | None = None
    """The side of the square images the network sees (the crop), at most ``MAX_INPUT_SIZE``."""
    augmentation: str = "auto"
    train_split: str = "train"
    test_split: str = "test"
    folds: list[Annotated[int, Field(ge=0)]] | None = None
    """k-fold datasets (adience, uec_food100): the held-out folds to run, default every fold. Each
    becomes its own run (its ``dataset.fold``) testing on that fold and training on the others."""
    decode: Literal["auto", "workers", "device"] = "auto"
    """JPEG stores: "auto" decodes and augments batches on the device when training on CUDA
    (``finebench.data.gpu_decode``), "device" forces that on any device, "workers" the PIL workers."""
    color_jitter: ColorJitter | None = None
    """torchvision's ColorJitter on training images after the crop and flip, e.g. ``{brightness =
    0.126, saturation = 0.5}`` (WS-DAN's and CAL's official transform); unset: none. Drawn from the
    run's augmentation generator, on every data path (``finebench.data.presets.ColorJitter``)."""
    resize: int | list[int] | None = None
    """The ``imagenet`` augmentation's resize before its random (train) and centre (test) crop: an
    int scales the shorter side to it (B-CNN's ``Resize(448)``), ``[height, width]`` to exactly that
    size, aspect not kept (``Resize((512, 512))`` of WS-DAN, CAL, API-Net); unset: round(s*256/224)."""
    validation: ValidationSection | None = None
    """A validation split (``ValidationSection``), evaluated every epoch (``val_top1``, ``val_loss``)
    and what ``train.select = "best_validation"`` selects on; unset: none, every training image trains."""
    normalize: str | Normalization | None = None
    """The mean/std: a preset (``finebench.data.config.NORMALIZATIONS``: "imagenet", "cifar", "half"
    = PMG's mean = std = 0.5) or ``{mean = [r, g, b], std = [r, g, b]}``; unset: the augmentation's own."""

    @field_validator("input_size")
    @classmethod
    def _input_size_bound(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_INPUT_SIZE:
            raise ValueError(f"expected at most {MAX_INPUT_SIZE} pixels a side (not one training image larger fits "
                             f"a GPU; fine-grained protocols crop 448): one {value} x {value} image alone is "
                             f"{12 * value**2 / 1e9:.3g} GB as float32")
        return value

    @field_validator("resize", mode="before")
    @classmethod
    def _resize_form(cls, value: Any, info: ValidationInfo) -> Any:
        def positive(item: Any) -> bool:
            return isinstance(item, int) and not isinstance(item, bool) and item > 0

        if value is not None and not (positive(value) or (isinstance(value, list) and len(value) == 2
                                                          and all(map(positive, value)))):
            raise ValueError("expected a positive int (the shorter side, aspect kept) or [height, width] "
                             "(exactly that size)")
        augmentation = info.data.get("augmentation")
        if augmentation not in (None, "auto"):  # "auto" depends on the store: the loaders check it
            problem = resize_problem(value, augmentation, info.data.get("input_size"))
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_form(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in NORMALIZATIONS:
            raise ValueError(f"unknown preset {value!r}: expected one of {', '.join(NORMALIZATIONS)} "
                             "or {mean = [r, g, b], std = [r, g, b]}")
        if isinstance(value, dict):
            try:
                return Normalization.model_validate(value)
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'value'}: {item['msg']}"
                                     for item in error.errors())
                raise ValueError(problems) from None
        if value is not None and not isinstance(value, (str, Normalization)):
            raise ValueError(f"expected a preset name ({', '.join(NORMALIZATIONS)}) or "
                             "{mean = [r, g, b], std = [r, g, b]}")
        return value


NO_PRETRAINED = "none"
"""``model.pretrained = "none"``: no pretrained weights, whatever the recipe file says."""


class ModelSection(Section):
    backbone: str | Annotated[list[str], Field(min_length=1)]
    """One backbone, or a list: every variant and seed then runs on each (``timm:<name>`` works too)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Backbone options, e.g. ``{depth = 28, width = 10}`` for WRN."""
    pretrained: str | None = None
    """``"imagenet"`` (torchvision's), ``"timm"`` (timm's cache) or a weights file; ``"none"`` (the
    way to turn a recipe's weights off: ``--set model.pretrained=none``) trains from scratch."""
    batchnorm_init: BatchNormInit = BATCHNORM_INITS[0]
    """Every new BatchNorm's initial weight: ``"ones"`` (PyTorch >= 1.2), or ``"uniform"`` in [0, 1),
    drawn at construction as PyTorch 0.4 did for the authors' logged runs (docs/MECHANISM.md §4;
    ``finebench.models.batchnorm.initial_batchnorm_weights``). Pretrained weights replace it."""

    @field_validator("pretrained", mode="before")
    @classmethod
    def _no_weights(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == NO_PRETRAINED:
            return None
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"is empty: expected {NO_PRETRAINED!r} (train from scratch), 'imagenet', 'timm' "
                             "or a weights file path")
        if isinstance(value, str) and value not in LIBRARY_WEIGHTS and not Path(value).expanduser().is_file():
            raise ValueError(f"weights file {value!r} does not exist: expected {NO_PRETRAINED!r}, 'imagenet', "
                             "'timm' or an existing .pth/.safetensors file")
        return value

    @model_validator(mode="after")
    def _check_backbones(self) -> ModelSection:
        if isinstance(self.backbone, list) and len(set(self.backbone)) != len(self.backbone):
            raise ValueError(f"backbone names must be unique, got {self.backbone}")
        return self

    def backbones(self) -> list[str]:
        return [self.backbone] if isinstance(self.backbone, str) else list(self.backbone)
