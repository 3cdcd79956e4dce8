"""The device JPEG path (finebench.data.gpu_decode) on CPU tensors: the same pixels as the worker
path on the same JPEGs, its selection per device and store, and one training run through it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import tiny_recipe

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.data.config import IMAGENET_MEAN, IMAGENET_STD
from finebench.data.gpu_decode import decode_jpegs, decode_on_device, decoder_library
from finebench.data.loader import build_loaders
from finebench.data.prepare import prepare_dataset
from finebench.data.presets import crop_offsets, resize_crop_flip, resized_size
from finebench.data.synthetic import synthetic_photo
from finebench.data.throughput import compare_with_workers
from finebench.errors import FinebenchError

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "jpegs_gpu_decode"
CLASSES = 3
# Mixed sizes, none with a shorter side of twice the resize (where the worker path's PIL draft
# decode at reduced scale would apply): upscaled, downscaled, portrait, two of one size, greyscale.
SIZES = [(60, 44), (90, 70), (50, 80), (90, 70), (72, 72), (64, 50)]
SIZE, RESIZE = 32, round(32 * 256 / 224)
STD_255 = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # normalised value x this = grey levels


def _jpeg(rng: np.random.Generator, width: int, height: int, grey: bool = False) -> bytes:
    image = synthetic_photo(rng, width, height)
    buffer = io.BytesIO()
    (image.convert("L") if grey else image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(rng: np.random.Generator, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    synthetic_photo(rng, width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def _prepare(root: Path, name: str, encode=_jpeg) -> Path:
    """Train 12 / test 6 images of SIZES; with ``_jpeg`` every fifth one is greyscale."""

    def parse(_raw: Path) -> ParsedDataset:
        rng = np.random.default_rng(0)

        def split(count: int) -> list[Example]:
            options = [{"grey": True} if i % 5 == 4 and encode is _jpeg else {} for i in range(count)]
            return [Example(encode(rng, *SIZES[i % len(SIZES)], **options[i]), i % CLASSES) for i in range(count)]

        return ParsedDataset([f"c{i}" for i in range(CLASSES)], {"train": split(12), "test": split(6)})

    spec = DatasetSpec(name=name, num_classes=CLASSES, split_sizes={}, protocol="test", terms="test", homepage="",
                       parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(name, root, quiet=True)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("data"), NAME)


def _loaders(root: Path, decode: str, **options):
    return build_loaders(NAME, root, batch_size=4, eval_batch_size=4, seed=3, input_size=SIZE,
                         augmentation="imagenet", decode=decode, **options)


def _grey_levels_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of two normalised batches, in grey levels (asserted <= 1 by the callers;
    the 1e-3 in them is float32 rounding of the normalisation, not a pixel)."""
    return float(((a - b).abs() * STD_255).max())


def test_eval_batches_equal_the_worker_paths_pixels(data_root):
    workers, device = _loaders(data_root, "workers"), _loaders(data_root, "device")
    assert (workers.path, device.path) == ("workers", "device_decode")
    pairs = list(zip(workers.test, device.test))
    assert len(pairs) == len(device.test) == 2
    for (expected, expected_labels), (got, labels) in pairs:
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert torch.equal(labels, expected_labels)
        assert _grey_levels_apart(got, expected) <= 1 + 1e-3


@pytest.mark.parametrize("float_resize", [True, False], ids=["float32 resize (CUDA's)", "uint8 resize (CPU's)"])
def test_train_batches_equal_the_worker_paths_pixels_given_the_same_crop_and_flip(data_root, float_resize):
    """The worker path (workers=0) draws left, top, then flip from numpy's generator seeded with the
    run seed; the same draws passed to the device transform give the same pixels."""
    loaders = _loaders(data_root, "workers")
    rng = np.random.default_rng(3)
    columns = loaders.train.dataset.columns
    order = list(loaders.train.sampler)
    for step, (expected, _labels) in enumerate(loaders.train):
        indices = order[step * 4 : step * 4 + 4]
        encoded = [torch.frombuffer(bytearray(columns.image_bytes(i)), dtype=torch.uint8) for i in indices]
        images = decode_jpegs(encoded, torch.device("cpu"))
        offsets, flips = [], []
        for image in images:
            width, height = resized_size(image.shape[2], image.shape[1], RESIZE, SIZE)
            offsets.append([int(rng.integers(0, width - SIZE + 1)), int(rng.integers(0, height - SIZE + 1))])
            flips.append(rng.random() < 0.5)
        pixels = resize_crop_flip(images, size=SIZE, resize=RESIZE, offsets=torch.tensor(offsets),
                                  flips=torch.tensor(flips), float_resize=float_resize)
        got = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255) / STD_255
        assert _grey_levels_apart(got, expected) <= 1 + 1e-3
    assert any(flips) and not all(flips), "the check should cover flipped and unflipped crops"


def test_the_gpu_suites_pixel_check_passes_on_the_cpu():
    check = compare_with_workers("cpu", source_size=(80, 60), images=6, input_size=SIZE)
    assert check["images"] == 6 and check["max_grey_levels"] <= 1 + 1e-3 and check["mean_grey_levels"] < 0.5


def test_random_crops_cover_every_offset_and_centre_crops_are_centred():
    generator = torch.Generator().manual_seed(0)
    drawn = crop_offsets([(36, 40)] * 4000, 32, generator)
    assert set(drawn[:, 0].tolist()) == set(range(5)) and set(drawn[:, 1].tolist()) == set(range(9))
    assert crop_offsets([(36, 40), (32, 32)], 32, None).tolist() == [[2, 4], [0, 0]]


def test_the_device_path_is_reproducible_from_its_seed_and_its_generator_state(data_root):
    first = _loaders(data_root, "device").train
    state = first.generator.get_state()
    batches = [images for images, _ in first]
    again = [images for images, _ in _loaders(data_root, "device").train]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    first.generator.set_state(state)  # what a resumed run does with the checkpointed state
    assert all(torch.equal(a, b) for a, b in zip(batches, (images for images, _ in first)))


def test_byte_reading_workers_deliver_the_same_batches_as_the_main_process(data_root):
    in_process = [images for images, _ in _loaders(data_root, "device").train]
    with_workers = [images for images, _ in _loaders(data_root, "device", workers=1).train]
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers))


def test_a_png_among_the_jpegs_is_decoded_on_the_cpu_path():
    rng = np.random.default_rng(1)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8)
               for data in (_jpeg(rng, 40, 30), _png(rng, 40, 30), _jpeg(rng, 30, 40, grey=True))]
    images = decode_jpegs(encoded, torch.device("cpu"))
    for data, image in zip(encoded, images):
        with Image.open(io.BytesIO(data.numpy().tobytes())) as opened:
            expected = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(image, expected)


def test_an_image_no_decoder_takes_is_named_in_one_clear_error():
    rng = np.random.default_rng(2)
    good = _jpeg(rng, 40, 30)
    broken = good[:3] + b"\x00" * 40  # a JPEG header, then garbage
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in (good, broken)]
    with pytest.raises(FinebenchError, match="image 17 cannot be decoded"):
        decode_jpegs(encoded, torch.device("cpu"), names=[16, 17])


@pytest.mark.parametrize(
    ("decode", "device", "augmentation", "jpeg", "expected"),
    [
        ("auto", "cuda", "imagenet", True, True),
        ("auto", "cpu", "imagenet", True, False),
        ("auto", "cuda", "imagenet", False, False),
        ("auto", "cuda", "cifar", True, False),
        ("device", "cpu", "imagenet", True, True),
        ("workers", "cuda", "imagenet", True, False),
    ],
)
def test_auto_chooses_the_device_path_for_jpeg_stores_on_cuda_only(decode, device, augmentation, jpeg, expected):
    chosen = decode_on_device(decode, augmentation=augmentation, device=torch.device(device), jpeg=lambda: jpeg,
                              dataset="d")
    assert chosen is expected


@pytest.mark.parametrize(
    ("decode", "augmentation", "jpeg", "message"),
    [("gpu", "imagenet", True, "decode 'gpu' is not valid"), ("device", "cifar", True, "needs the imagenet"),
     ("device", "imagenet", False, "needs JPEG-encoded")],
)
def test_a_forced_device_path_that_cannot_work_is_one_clear_error(decode, augmentation, jpeg, message):
    with pytest.raises(FinebenchError, match=message):
        decode_on_device(decode, augmentation=augmentation, device=torch.device("cpu"), jpeg=lambda: jpeg, dataset="d")


def test_a_png_store_is_not_taken_for_jpeg(tmp_path):
    root = _prepare(tmp_path, "pngs_gpu_decode", encode=_png)
    with pytest.raises(FinebenchError, match="needs JPEG-encoded"):
        build_loaders("pngs_gpu_decode", root, batch_size=4, input_size=SIZE, augmentation="imagenet", decode="device")


def test_a_run_trains_through_the_device_path_and_records_it(tmp_path, data_root):
    from finebench.recipe import load_recipe
    from finebench.runner import run_recipe

    recipe = tmp_path / "jpeg.toml"
    recipe.write_text(tiny_recipe(seeds=None, dataset=NAME, input_size=SIZE, augmentation="imagenet",
                                  extra_dataset='decode = "device"', variants=("attention",), attention_depth=1,
                                  batch_size=6, eval_batch_size=None))
    # Already prepared: the run only needs the name registered.
    spec = DatasetSpec(name=NAME, num_classes=CLASSES, split_sizes={}, protocol="test", terms="test", homepage="",
                       parse=lambda _raw: ParsedDataset([], {}), offline=True)
    with registry.override(spec):
        outcomes = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    (outcome,) = outcomes
    assert outcome.status == "finished"
    summary = json.loads((outcome.path / "summary.json").read_text())
    assert summary["data_path"] == "device_decode"
    assert summary["epochs_completed"] == 1 and np.isfinite(summary["final"]["train_loss"])


LIBRARIES = ["torchvision", pytest.param("torchcodec", marks=pytest.mark.skipif(
    decoder_library() != "torchcodec", reason="TorchCodec is not installed (pip install 'finebench[codec]')"))]


@pytest.mark.parametrize("library", LIBRARIES)
def test_each_decoder_library_gives_pil_pixels_for_jpeg_grey_jpeg_and_png(library):
    """TorchCodec (chosen where installed) and torchvision.io decode a store's bytes to the same
    pixels as PIL (libjpeg-turbo), so the data path does not depend on which one is installed."""
    rng = np.random.default_rng(3)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8)
               for data in (_jpeg(rng, 40, 30), _png(rng, 40, 30), _jpeg(rng, 30, 40, grey=True))]
    images = decode_jpegs(encoded, torch.device("cpu"), library=library)
    for data, image in zip(encoded, images):
        with Image.open(io.BytesIO(data.numpy().tobytes())) as opened:
            expected = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)
        assert image.dtype == torch.uint8 and torch.equal(image, expected)


@pytest.mark.parametrize("library", LIBRARIES)
def test_each_decoder_library_names_an_undecodable_image(library):
    rng = np.random.default_rng(4)
    good = _jpeg(rng, 40, 30)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in (good, good[:3] + b"\x00" * 40)]
    with pytest.raises(FinebenchError, match="image 9 cannot be decoded"):
        decode_jpegs(encoded, torch.device("cpu"), names=[8, 9], library=library)
