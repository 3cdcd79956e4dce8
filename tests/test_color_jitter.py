"""``dataset.color_jitter``: torchvision's ColorJitter on training images only, on the worker,
in-memory and device-decode paths, drawn from the run's augmentation generator; validated; and
absent from the run id when unset."""

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
from torchvision.transforms import v2

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, ParsedDataset
from finebench.data.config import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from finebench.data.loader import build_loaders
from finebench.data.presets import ColorJitter
from finebench.errors import FinebenchError
from finebench.recipe import expand_runs, load_recipe
from finebench.train.rng import capture_rng_state, restore_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
JITTER = ColorJitter(brightness=0.126, contrast=0.2, saturation=0.5, hue=0.05)
PATHS = ("workers", "in_memory", "device_decode")
WS_DAN_IDS_BEFORE_COLOR_JITTER = [
    "torchvision:inception_v3/baseline/seed0=5c5780192830",
    "torchvision:inception_v3/baseline/seed1=3d05657b7452",
    "torchvision:inception_v3/baseline/seed2=b6ef837c59d0",
    "torchvision:inception_v3/ws_dan-Mixed_6e/seed0=64ba87fc02fd",
    "torchvision:inception_v3/ws_dan-Mixed_6e/seed1=0790a5e2f0e2",
    "torchvision:inception_v3/ws_dan-Mixed_6e/seed2=1d31ff34a817",
]
"""recipes/ws_dan_cub200.toml's frozen run ids before it set ``dataset.color_jitter``."""


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``jitter_small``: 32 px colour images (the in-memory path); ``jitter_jpeg``: JPEGs of mixed
    sizes (the worker and device-decode paths, ``imagenet`` recipe)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    small = list(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    prepare_three_classes(root, "jitter_small", small)
    sizes = [(60, 44), (50, 70), (64, 64)]
    jpegs = [_jpeg(rng.integers(0, 256, (sizes[i % 3][1], sizes[i % 3][0], 3), dtype=np.uint8)) for i in range(12)]
    prepare_three_classes(root, "jitter_jpeg", jpegs)
    return root


def _loaders(root: Path, path: str, *, seed: int = 3, jitter: ColorJitter | None = JITTER):
    if path == "in_memory":
        loaders = build_loaders("jitter_small", root, batch_size=4, seed=seed, augmentation="cifar", in_memory=True,
                                color_jitter=jitter)
    else:
        decode = "workers" if path == "workers" else "device"
        loaders = build_loaders("jitter_jpeg", root, batch_size=4, seed=seed, input_size=32, augmentation="imagenet",
                                decode=decode, device="cpu", color_jitter=jitter)
    assert loaders.path == path
    return loaders


def _epoch(loader) -> list[torch.Tensor]:
    return [images for images, _ in loader]


def _uint8(loaders, images: torch.Tensor) -> torch.Tensor:
    """A normalised batch back to its uint8 grey levels (exact: the normalisation is two float ops)."""
    stats = (CIFAR_MEAN, CIFAR_STD) if loaders.path == "in_memory" else (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in stats)
    return (images * std + mean).round().to(torch.uint8)


@pytest.mark.parametrize("path", PATHS)
def test_jitter_changes_training_images_and_never_test_images(data_root: Path, path: str) -> None:
    plain, jittered = _loaders(data_root, path, jitter=None), _loaders(data_root, path)
    assert [labels.tolist() for _, labels in plain.train] == [labels.tolist() for _, labels in jittered.train]
    assert not any(torch.equal(a, b) for a, b in zip(_epoch(plain.train), _epoch(jittered.train)))
    plain_test, jittered_test = _epoch(plain.test), _epoch(jittered.test)
    assert len(plain_test) == len(jittered_test) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain_test, jittered_test))


@pytest.mark.parametrize("path", PATHS)
def test_each_image_is_torchvisions_color_jitter_with_the_drawn_factors(
    data_root: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every image the jitter gets (the cropped, flipped uint8 one) and the generator state it draws
    from are recorded; torchvision's own ``v2.ColorJitter``, drawing from the global torch RNG set to
    that state, gives the pixels the loader yields."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    apply = ColorJitter.apply

    def recording(self: ColorJitter, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append((image.clone(), generator.get_state()))
        return apply(self, image, generator)

    monkeypatch.setattr(ColorJitter, "apply", recording)
    loaders = _loaders(data_root, path)
    got = torch.cat([_uint8(loaders, images) for images in _epoch(loaders.train)])
    assert len(seen) == len(got) == loaders.train_size
    # fresh draws for every image, from the run's generator (a generator seeded anew per batch would repeat)
    assert len({bytes(state.numpy()) for _, state in seen}) == len(seen)
    reference = v2.ColorJitter(brightness=JITTER.brightness, contrast=JITTER.contrast, saturation=JITTER.saturation,
                               hue=JITTER.hue)
    expected = []
    for image, state in seen:
        torch.set_rng_state(state)
        expected.append(reference(image))
    assert torch.equal(got, torch.stack(expected))
    if path != "workers":  # batched paths: the jitter gets the same crops and flips as a run without it
        plain = _loaders(data_root, path, jitter=None)
        first = next(iter(plain.train))[0]
        assert torch.equal(_uint8(plain, first), torch.stack([image for image, _ in seen[: len(first)]]))


def test_the_draws_are_torchvisions_from_the_same_generator_state() -> None:
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 20, 24), dtype=np.uint8))
    for seed in range(8):
        torch.manual_seed(seed)
        expected = v2.ColorJitter(brightness=0.126, saturation=0.5)(image)
        got = ColorJitter(brightness=0.126, saturation=0.5).apply(image, torch.Generator().manual_seed(seed))
        assert got.dtype == torch.uint8 and torch.equal(got, expected)


@pytest.mark.parametrize("path", PATHS)
def test_same_seed_same_batches_and_a_restored_rng_state_repeats_them(data_root: Path, path: str) -> None:
    first, again, other = (_loaders(data_root, path, seed=s) for s in (3, 3, 4))
    batches = _epoch(first.train)
    assert all(torch.equal(a, b) for a, b in zip(batches, _epoch(again.train), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(batches, _epoch(other.train)))
    # Kill and resume: the engine's checkpointed RNG state brings back the next epoch's draws.
    state = capture_rng_state(first.train)
    next_epoch = _epoch(first.train)
    torch.manual_seed(12345)  # a resumed process starts with other global state
    restore_rng_state(state, first.train)
    assert all(torch.equal(a, b) for a, b in zip(next_epoch, _epoch(first.train), strict=True))


@pytest.mark.parametrize(("value", "expected"), [
    ("{hue=0.7}", "dataset.color_jitter.hue: Input should be less than or equal to 0.5"),
    ("{brightness=-0.1}", "dataset.color_jitter.brightness: Input should be greater than or equal to 0"),
    ("{}", "dataset.color_jitter: Value error, every property is 0"),
    ("{gamma=1.0}", "dataset.color_jitter.gamma: unknown key"),
    ("0.5", "dataset.color_jitter: Input should be a valid dictionary"),
])
def test_a_bad_value_is_one_line_naming_the_field(value: str, expected: str) -> None:
    with pytest.raises(FinebenchError) as error:
        load_recipe(ROOT / "recipes" / "ws_dan_cub200.toml", [f"dataset.color_jitter={value}"], check_dataset=False)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_cli_dry_run_rejects_a_bad_value_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finebench", "run", str(ROOT / "recipes" / "ws_dan_cub200.toml"), "--dry-run",
         "--set", "dataset.color_jitter.saturation=-1"], check=False, capture_output=True, text=True, timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "dataset.color_jitter.saturation" in lines[0], result.stderr


def test_jitter_with_augmentation_none_is_one_clear_error(data_root: Path) -> None:
    with pytest.raises(FinebenchError, match="^dataset.color_jitter: augmentation 'none'"):
        build_loaders("jitter_small", data_root, batch_size=4, augmentation="none", input_size=32, color_jitter=JITTER)


def _frozen() -> dict[str, list[str]]:
    return json.loads((ROOT / "tests" / "data" / "frozen_run_ids.json").read_text())


def test_a_recipe_without_color_jitter_keeps_its_run_ids(tmp_path: Path) -> None:
    """ws_dan_cub200 with the key removed (and the later ``resize``) has the ids it had before the
    setting existed; with it, others."""
    text = (ROOT / "recipes" / "ws_dan_cub200.toml").read_text()
    assert "color_jitter = " in text
    recipe = tmp_path / "ws_dan_cub200.toml"
    recipe.write_text("\n".join(line for line in text.splitlines() if not line.startswith(("color_jitter", "resize"))))
    without = [f"{run.config['model']['backbone']}/{run.variant_name}/seed{run.seed}={run.run_id}"
               for run in expand_runs(load_recipe(recipe, check_dataset=False))]
    assert without == WS_DAN_IDS_BEFORE_COLOR_JITTER
    assert not set(without) & set(_frozen()["ws_dan_cub200.toml"])  # the shipped recipe sets it: other ids


def test_a_recipes_color_jitter_reaches_the_training_loader(tmp_path: Path, data_root: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``finebench run``'s loaders get the recipe's setting: every training image of the epoch is
    jittered once, and config.json records the setting."""
    from tiny_data import tiny_recipe

    from finebench.runner import run_recipe

    calls: list[ColorJitter] = []
    apply = ColorJitter.apply

    def counting(self: ColorJitter, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(self)
        return apply(self, image, generator)

    monkeypatch.setattr(ColorJitter, "apply", counting)
    recipe = tmp_path / "jitter.toml"
    dataset_lines = 'decode = "workers"\ncolor_jitter = { brightness = 0.126, saturation = 0.5 }'
    recipe.write_text(tiny_recipe(seeds=None, dataset="jitter_jpeg", input_size=32, augmentation="imagenet",
                                  extra_dataset=dataset_lines, batch_size=4, eval_batch_size=None))
    spec = DatasetSpec(name="jitter_jpeg", num_classes=3, split_sizes={}, protocol="test", terms="test", homepage="",
                       parse=lambda _raw: ParsedDataset([], {}), offline=True)
    with registry.override(spec):
        (outcome,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    assert outcome.status == "finished"
    assert calls == [ColorJitter(brightness=0.126, saturation=0.5)] * 8  # the 8 training images, once each
    config = json.loads((outcome.path / "config.json").read_text())
    assert config["dataset"]["color_jitter"] == {"brightness": 0.126, "contrast": 0.0, "saturation": 0.5, "hue": 0.0}
