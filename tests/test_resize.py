"""``dataset.resize`` (the ``imagenet`` recipe's resize before its crops: shorter side, or an exact
[height, width]) and ``dataset.normalize`` (the mean/std) on the worker and device-decode paths
(the in-memory path serves only cifar/none, where resize is refused and normalize applies);
validated in one line; absent from the run id when unset."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import prepare_three_classes
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, ParsedDataset
from finebench.data.config import (
    CIFAR_MEAN,
    CIFAR_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from finebench.data.loader import (
    build_eval_loader,
    build_loaders,
    eval_transform,
    plan_loaders,
)
from finebench.data.presets import draft_size, resized_size
from finebench.errors import FinebenchError
from finebench.recipe import expand_runs, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
SIZES = [(60, 40), (40, 60), (50, 50)]
"""(width, height) of the test images: resize 48 scales each shorter side by a whole-pixel ratio,
so torchvision's truncating ``Resize(48)`` and finebench's rounding agree exactly."""
COUNT = 9
RESIZES = {"shorter": 48, "exact": [40, 36]}
IDS_BEFORE_RESIZE = {
    "pmg_cub200.toml": [
        "resnet50/baseline/seed0=3fa647d38475", "resnet50/baseline/seed1=44ad62087803",
        "resnet50/baseline/seed2=4e673dd413ad", "resnet50/pmg/seed0=4d55c8c18597",
        "resnet50/pmg/seed1=d9bc049347d9", "resnet50/pmg/seed2=0cd97fd7210a",
    ],
    "bcnn_cub200.toml": [
        "torchvision:vgg16/baseline/seed0=d16ae28f1c37", "torchvision:vgg16/baseline/seed1=5a130bf27c26",
        "torchvision:vgg16/baseline/seed2=d4d91ebb4c38", "torchvision:vgg16/bcnn/seed0=f0676a16deb3",
        "torchvision:vgg16/bcnn/seed1=2b3fb4c991e8", "torchvision:vgg16/bcnn/seed2=cf2de01a5db9",
        "torchvision:vgg16/bcnn-haomood/seed0=02a44915f87b", "torchvision:vgg16/bcnn-haomood/seed1=95a5e23e00a9",
        "torchvision:vgg16/bcnn-haomood/seed2=e0077006d592",
    ],
}
"""These recipes' frozen run ids before they set ``dataset.resize`` / ``dataset.normalize``."""


def _encoded(array: np.ndarray, form: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=form, **({"quality": 90} if form == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Smooth colour images (random noise would hide a wrong resize less well than it shows one)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(COUNT):
        width, height = SIZES[i % 3]
        small = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory, images: list[np.ndarray]) -> Path:
    """``resize_png``: lossless photos of mixed sizes (worker path, exact pixels); ``resize_jpeg``:
    the same as JPEGs (worker and device-decode paths); ``resize_small``: 32 px images (in-memory)."""
    root = tmp_path_factory.mktemp("data")
    prepare_three_classes(root, "resize_png", [_encoded(image, "PNG") for image in images])
    prepare_three_classes(root, "resize_jpeg", [_encoded(image, "JPEG") for image in images])
    rng = np.random.default_rng(1)
    prepare_three_classes(root, "resize_small",
                          [_encoded(a, "PNG") for a in rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)])
    return root


def _loaders(root: Path, dataset: str, path: str = "workers", **settings):
    decode = "workers" if path == "workers" else "device"
    loaders = build_loaders(dataset, root, batch_size=3, seed=5, input_size=SIZE, augmentation="imagenet",
                            decode=decode, device="cpu", **settings)
    assert loaders.path == path
    return loaders


def _uint8(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised batches back to their grey levels (exact: the normalisation is two float ops)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (mean, std))
    return (images * std + mean).round().to(torch.uint8)


def _all(loader) -> torch.Tensor:
    return torch.cat([images for images, _ in loader])


def _reference(image: torch.Tensor, resize: int | list[int]) -> torch.Tensor:
    """torchvision's ``Resize(resize)`` of a uint8 3×H×W image (antialiased bilinear)."""
    return TF.resize(image, resize if isinstance(resize, list) else [resize], antialias=True)


def _centre(image: torch.Tensor) -> torch.Tensor:
    return TF.center_crop(image, [SIZE, SIZE])


def _test_images(images: list[np.ndarray]) -> list[np.ndarray]:
    return images[COUNT * 2 // 3:]


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("form", list(RESIZES))
def test_worker_test_images_are_torchvisions_resize_and_centre_crop(data_root: Path, images, form: str) -> None:
    resize = RESIZES[form]
    got = _uint8(_all(_loaders(data_root, "resize_png", resize=resize).test))
    expected = torch.stack([_centre(_reference(_as_tensor(a), resize)) for a in _test_images(images)])
    assert torch.equal(got, expected)


def _window_distance(crop: torch.Tensor, resized: torch.Tensor) -> int:
    """The smallest largest-pixel difference between ``crop`` and any SIZE×SIZE window of
    ``resized`` or of its mirror image (the random crop and flip)."""
    best = 255
    height, width = resized.shape[1:]
    for source in (resized, resized.flip(-1)):
        for top in range(height - SIZE + 1):
            for left in range(width - SIZE + 1):
                window = source[:, top : top + SIZE, left : left + SIZE]
                best = min(best, int((window.int() - crop.int()).abs().max()))
    return best


@pytest.mark.parametrize("form", list(RESIZES))
@pytest.mark.parametrize("path", ["workers", "device_decode"])
def test_training_crops_are_windows_of_torchvisions_resize(data_root: Path, form: str, path: str) -> None:
    """Every training image is a crop (maybe flipped) of the image resized as torchvision's
    Resize(resize) does; on JPEGs, decoded by torchvision, within one grey level."""
    resize = RESIZES[form]
    loaders = _loaders(data_root, "resize_jpeg", path, resize=resize)
    source = store_bytes(data_root, "resize_jpeg", "train")
    order = loaders.train.sampler.indices().tolist()
    crops = _uint8(_all(loaders.train))
    for crop, index in zip(crops, order, strict=True):
        resized = _reference(decode_jpeg(torch.frombuffer(bytearray(source[index]), dtype=torch.uint8)), resize)
        assert _window_distance(crop, resized) <= 1


def store_bytes(root: Path, dataset: str, split: str) -> list[bytes]:
    import datasets

    table = datasets.load_from_disk(str(root / dataset / split)).data.table
    return [item["bytes"] for item in table.column("image").to_pylist()]


@pytest.mark.parametrize("form", list(RESIZES))
def test_device_decode_test_images_match_the_worker_path(data_root: Path, form: str) -> None:
    resize = RESIZES[form]
    workers = _uint8(_all(_loaders(data_root, "resize_jpeg", resize=resize).test)).int()
    device = _uint8(_all(_loaders(data_root, "resize_jpeg", "device_decode", resize=resize).test)).int()
    assert workers.shape == device.shape == (COUNT - COUNT * 2 // 3, 3, SIZE, SIZE)
    assert int((workers - device).abs().max()) <= 1


@pytest.mark.parametrize("path", ["workers", "device_decode"])
def test_the_two_forms_differ(data_root: Path, path: str) -> None:
    """An exact [h, w] is not the shorter-side rule (the aspect changes), and neither is the default."""
    batches = [_all(_loaders(data_root, "resize_jpeg", path, resize=resize).test)
               for resize in (None, 48, [40, 36])]
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[1], batches[2])


@pytest.mark.parametrize("path", ["workers", "device_decode"])
def test_the_default_is_the_imagenet_rule_bit_for_bit(data_root: Path, images, path: str) -> None:
    """Unset, batches equal those of the recipe's own rule given explicitly (round(s*256/224)),
    and on lossless images torchvision's resize of the shorter side to it and a centre crop."""
    default, explicit = _loaders(data_root, "resize_jpeg", path), _loaders(data_root, "resize_jpeg", path,
                                                                         resize=round(SIZE * 256 / 224))
    for split in ("train", "test"):
        assert all(torch.equal(a, b) for a, b in zip(_all(getattr(default, split)), _all(getattr(explicit, split)),
                                                     strict=True))
    got = _uint8(_all(_loaders(data_root, "resize_png").test))
    shapes = [resized_size(w, h, 37, SIZE) for w, h in SIZES]  # round(32 * 256 / 224) = 37
    assert shapes == [(56, 37), (37, 56), (37, 37)]  # 55.5 rounds up (torchvision's Resize(37) truncates)
    expected = torch.stack([_centre(_reference(_as_tensor(a), [height, width]))
                            for a, (width, height) in zip(_test_images(images), shapes * 3)])
    assert torch.equal(got, expected)


def test_the_jpeg_draft_never_drops_pixels_the_resize_keeps() -> None:
    assert draft_size(1000, 800, 256) == (320, 256)  # the shorter-side rule: ceil of the scaled sides
    assert draft_size(1000, 801, 256) == (320, 256)
    assert draft_size(1000, 800, (512, 300)) == (300, 512)  # exact: (width, height) of the target


def test_resize_with_cifar_or_none_is_refused_by_the_loaders(data_root: Path) -> None:
    with pytest.raises(FinebenchError, match=r"^dataset.resize = 48: augmentation 'cifar' has no resize") as error:
        build_loaders("resize_small", data_root, batch_size=3, augmentation="auto", resize=48)  # auto: cifar
    assert "\n" not in str(error.value)
    with pytest.raises(FinebenchError, match=r"^dataset.resize = \[40, 36\]: augmentation 'none'"):
        build_loaders("resize_small", data_root, batch_size=3, augmentation="none", input_size=32, resize=[40, 36])


def test_a_resize_smaller_than_the_crop_is_refused_by_the_loaders(data_root: Path) -> None:
    with pytest.raises(FinebenchError, match=r"^dataset.resize = \[40, 31\]: smaller than the 32 px crop "
                                             r"\(dataset.input_size = 32\)"):
        _loaders(data_root, "resize_png", resize=[40, 31])
    with pytest.raises(FinebenchError, match=r"^dataset.resize = 200: smaller than the 224 px crop"):
        build_loaders("resize_png", data_root, batch_size=3, augmentation="imagenet", resize=200)  # default 224


@pytest.mark.parametrize("path", ["workers", "device_decode", "in_memory"])
@pytest.mark.parametrize("setting", ["half", {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}])
def test_normalize_half_maps_grey_levels_to_minus_one_to_one(data_root: Path, path: str, setting) -> None:
    """The same pixels as the default, normalised as (x / 255 - 0.5) / 0.5, named or as numbers."""
    if path == "in_memory":
        def make(**settings):
            return build_loaders("resize_small", data_root, batch_size=3, seed=5, augmentation="cifar",
                                 in_memory=True, **settings)
        default_stats = (CIFAR_MEAN, CIFAR_STD)
    else:
        def make(**settings):
            return _loaders(data_root, "resize_jpeg", path, **settings)
        default_stats = (IMAGENET_MEAN, IMAGENET_STD)
    plain, half = make(), make(normalize=setting)
    assert half.path == path
    for split in ("train", "test"):
        pixels = _uint8(_all(getattr(plain, split)), *default_stats)
        got = _all(getattr(half, split))
        assert torch.equal(_uint8(got, HALF_MEAN, HALF_STD), pixels)
        assert torch.allclose(got, pixels.float() / 127.5 - 1, atol=1e-6)


def test_named_presets_are_the_constants(data_root: Path) -> None:
    """normalize = "imagenet" on a small-image store replaces the CIFAR statistics it would take."""
    plain = build_loaders("resize_small", data_root, batch_size=3, augmentation="none", input_size=32)
    imagenet = build_loaders("resize_small", data_root, batch_size=3, augmentation="none", input_size=32,
                             normalize="imagenet")
    assert torch.equal(_uint8(_all(plain.test), CIFAR_MEAN, CIFAR_STD), _uint8(_all(imagenet.test)))
    assert not torch.equal(_all(plain.test), _all(imagenet.test))
    with pytest.raises(FinebenchError, match="^dataset.normalize 'halves' is not a preset: expected one of imagenet"):
        build_loaders("resize_small", data_root, batch_size=3, normalize="halves")


def test_eval_transforms_follow_the_run_settings(data_root: Path, images) -> None:
    """``finebench attend``/``eval`` feed a trained model what its test loader fed it."""
    config_dataset = {"resize": [40, 36], "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    loader, meta = build_eval_loader("resize_png", data_root, "test", batch_size=3, input_size=SIZE,
                                     augmentation="imagenet", **config_dataset)
    expected = _all(_loaders(data_root, "resize_png", **config_dataset).test)
    assert torch.equal(_all(loader), expected)
    transform = eval_transform(meta, "imagenet", SIZE, **config_dataset)
    one = transform.normalise(transform(Image.fromarray(_test_images(images)[0])))
    assert torch.equal(one, expected[0])


@pytest.mark.parametrize(("setting", "expected"), [
    ("dataset.resize=[512]", "dataset.resize: Value error, expected a positive int (the shorter side"),
    ("dataset.resize=0", "dataset.resize: Value error, expected a positive int"),
    ("dataset.resize='512'", "dataset.resize: Value error, expected a positive int"),
    ("dataset.resize=[512, 440]", "dataset.resize: Value error, smaller than the 448 px crop (dataset.input_size = 448)"),
    ("dataset.resize=400", "dataset.resize: Value error, smaller than the 448 px crop"),
    ("dataset.normalize='halves'",
     "dataset.normalize: Value error, unknown preset 'halves': expected one of imagenet, cifar, half"),
    ("dataset.normalize={mean=[0.5, 0.5], std=[1, 1, 1]}",
     "dataset.normalize: Value error, mean: List should have at least 3 items"),
    ("dataset.normalize={mean=[0.5, 0.5, 0.5], std=[1, 1, 0]}",
     "dataset.normalize: Value error, std.2: Input should be greater than 0"),
    ("dataset.normalize=0.5", "dataset.normalize: Value error, expected a preset name"),
])
def test_a_bad_value_is_one_line_naming_the_field(setting: str, expected: str) -> None:
    with pytest.raises(FinebenchError) as error:
        load_recipe(ROOT / "recipes" / "pmg_cub200.toml", [setting], check_dataset=False)
    assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("augmentation", ["cifar", "none"])
def test_the_cli_dry_run_refuses_resize_where_it_does_not_apply(augmentation: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finebench", "run", str(ROOT / "recipes" / "pmg_cub200.toml"), "--dry-run",
         "--set", f"dataset.augmentation={augmentation}"], check=False, capture_output=True, text=True, timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"dataset.resize: Value error, augmentation {augmentation!r} has no resize" in lines[0]
    assert "choose augmentation imagenet" in lines[0]


@pytest.mark.parametrize("name", list(IDS_BEFORE_RESIZE))
def test_a_recipe_without_the_settings_keeps_its_run_ids(tmp_path: Path, name: str) -> None:
    text = (ROOT / "recipes" / name).read_text()
    assert "resize = " in text
    recipe = tmp_path / name
    recipe.write_text("\n".join(line for line in text.splitlines() if not line.startswith(("resize", "normalize"))))
    without = [f"{run.config['model']['backbone']}/{run.variant_name}/seed{run.seed}={run.run_id}"
               for run in expand_runs(load_recipe(recipe, check_dataset=False))]
    assert without == IDS_BEFORE_RESIZE[name]
    frozen = json.loads((ROOT / "tests" / "data" / "frozen_run_ids.json").read_text())
    assert not set(without) & set(frozen[name])  # the shipped recipe sets them: other ids


def test_a_recipes_settings_reach_the_run_and_its_config(tmp_path: Path, data_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``finebench run`` builds its loaders with them and config.json records them (what eval reads back)."""
    from tiny_data import tiny_recipe

    from finebench.data import loader
    from finebench.runner import run_recipe

    seen: list[dict] = []
    build = loader.build_loaders

    def spying(*args, **kwargs):
        seen.append(kwargs)
        return build(*args, **kwargs)

    monkeypatch.setattr(loader, "build_loaders", spying)

    recipe = tmp_path / "resize.toml"
    recipe.write_text(tiny_recipe(seeds=None, dataset="resize_jpeg", input_size=SIZE, augmentation="imagenet",
                                  extra_dataset='decode = "workers"\nresize = [40, 36]\nnormalize = "half"',
                                  batch_size=3, eval_batch_size=None))
    spec = DatasetSpec(name="resize_jpeg", num_classes=3, split_sizes={}, protocol="test", terms="test", homepage="",
                       parse=lambda _raw: ParsedDataset([], {}), offline=True)
    with registry.override(spec):
        (outcome,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    assert outcome.status == "finished"
    assert [(kwargs["resize"], kwargs["normalize"]) for kwargs in seen] == [([40, 36], "half")]
    config = json.loads((outcome.path / "config.json").read_text())
    assert config["dataset"]["resize"] == [40, 36] and config["dataset"]["normalize"] == "half"


def test_a_store_shrunk_below_the_recipes_resize_is_refused_naming_the_rebuild(
    tmp_path: Path, images: list[np.ndarray]
) -> None:
    """``prepare --short-side 36`` stores training-scale photos for a 36 px resize; a recipe that
    resizes the shorter side to more would upscale them back: refused, with the command that fixes it."""
    prepare_three_classes(tmp_path, "resize_shrunk", [_encoded(image, "PNG") for image in images], short_side=36)
    plan = plan_loaders("resize_shrunk", tmp_path, input_size=SIZE, augmentation="imagenet", resize=[36, 36])
    assert plan.data.resize == (36, 36)
    for resize, needed in ((48, 48), (None, round(SIZE * 256 / 224))):
        with pytest.raises(FinebenchError, match=(
                rf"^dataset 'resize_shrunk' in .* was prepared with --short-side 36, below the {needed} px this "
                r"recipe resizes the shorter side to, so training would upscale every image: rebuild it with "
                r"`finebench prepare resize_shrunk --data-root .* --force`")):
            plan_loaders("resize_shrunk", tmp_path, input_size=SIZE, augmentation="imagenet", resize=resize)
