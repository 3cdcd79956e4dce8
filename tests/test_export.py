"""``finebench export`` carries everything its recorded test top-1 needs (issue 27, defect 2): the
run's test transform (resize, crop, mean/std, "half" included) and its method's test-time passes
(WS-DAN's and CAL's views, ...). For every registered method, a tiny run is trained, exported and
loaded with ``load_exported``; its prediction on the raw test images, preprocessed by the exported
transform, gives the recorded top-1 and the engine's logits.

Tolerance: none. The exported transform and the loader run the same operations on the same bytes
(``EvalTransform`` shares the loader's decode, resize and ``Normalise``), and the exported model
runs the method's ``predict`` with the same weights on the same single batch (eval_batch_size =
every test image) as the run's evaluation did, in fp32 on the CPU; so images, logits and top-1
must be equal bit for bit, and any difference is a real divergence, not rounding.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from tiny_data import DATASET, prepare_three_classes, prepare_tiny_bars, tiny_recipe

from finebench.data.loader import build_eval_loader, eval_transform
from finebench.errors import FinebenchError
from finebench.methods import METHODS, build_model_from_config, get_method, parse_options
from finebench.recipe import load_recipe
from finebench.runner import run_recipe
from finebench.trained import export_run, load_exported, load_trained_run, preprocessing_record, write_export

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_IMAGES = 6
BACKBONE_OPTIONS: dict[str, dict | None] = {"wrn": {"depth": 10, "width": 1}, "timm:test_resnet": None,
                                            "timm:test_vit": {"img_size": 32}}
"""A method runs on the first of these it attaches to (ECA needs a timm CNN, TransFG a ViT), with its options."""
BACKBONES = tuple(BACKBONE_OPTIONS)
VARIANT_OPTIONS: dict[str, dict] = {
    "pim": {"selections": [24, 8, 2, 1], "fpn_size": 16, "image_size": 32},
    "ielt": {"select_numbers": [2, 2, 2, 2, 2], "votes_per_head": 2, "key_tokens": 4},
}
"""Options a method needs on these tiny backbones at 32 px (PIM: counts within timm:test_resnet's 64/16/4/1
tokens; IELT: test_vit's 6 blocks, 2 x 2 patches)."""
WRN_LINES = 'backbone = "wrn"\noptions = { depth = 10, width = 1 }'


def backbone_for(kind: str) -> str:
    for backbone in BACKBONES:
        try:
            get_method(kind).check_backbone(backbone, parse_options(kind, {}))
        except FinebenchError:
            continue
        return backbone
    raise AssertionError(f"method {kind!r} attaches to none of {BACKBONES}")


@pytest.fixture(scope="module")
def bars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 40 training images: four of each class, API-Net's images_per_class
    return prepare_tiny_bars(tmp_path_factory.mktemp("bars") / "data", 40, TEST_IMAGES)


def raw_test_images(data_root: Path, dataset: str) -> tuple[list[bytes], torch.Tensor]:
    """The test split's stored (encoded) images and labels, as a user of the export would hold them."""
    import datasets

    split = datasets.load_from_disk(str(data_root / dataset / "test"))
    split = split.cast_column("image", datasets.Image(decode=False))
    return [row["image"]["bytes"] for row in split], torch.tensor(split["label"])


def train_and_export(recipe_text: str, base: Path, data_root: Path) -> tuple[Path, Path]:
    recipe = base / "recipe.toml"
    recipe.write_text(recipe_text)
    (outcome,) = run_recipe(load_recipe(recipe), results_dir=base / "results", data_root=data_root, quiet=True)
    assert outcome.status == "finished"
    export_run(outcome.path, base / "export")
    return outcome.path, base / "export"


def check_reproduces_the_run(run_dir: Path, export: Path, data_root: Path) -> dict:
    """The exported model on the exported transform of the raw test images gives the recorded top-1
    and the engine's own prediction (``Method.predict`` on the test loader's batch) bit for bit."""
    config = json.loads((run_dir / "config.json").read_text())
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    dataset = config["dataset"]
    exported = load_exported(export)
    encoded, labels = raw_test_images(data_root, dataset["name"])
    images = torch.stack([exported.transform(Image.open(io.BytesIO(data))) for data in encoded])
    loader, _ = build_eval_loader(dataset["name"], data_root, "test", batch_size=len(encoded),
                                  input_size=dataset["input_size"], augmentation=dataset["augmentation"],
                                  resize=dataset.get("resize"), normalize=dataset.get("normalize"))
    (loaded_images, loaded_labels), = list(loader)
    assert torch.equal(images, loaded_images) and torch.equal(labels, loaded_labels)
    method = get_method(config["variant"]["kind"])
    with torch.no_grad():
        output = exported(images)
        scores = exported.scores(images)
        engine = method.predict(load_trained_run(run_dir).model, loaded_images)
    assert torch.equal(output.logits, engine.logits) and torch.equal(output.log_probs, engine.log_probs)
    assert torch.equal(scores, method.scores(engine).float())
    top1 = 100.0 * (scores.argmax(dim=1) == labels).sum().item() / len(labels)
    assert top1 == final["test_top1"]
    assert exported.config["source_run"]["test_top1"] == final["test_top1"]
    return exported.config


@pytest.mark.parametrize("kind", list(METHODS))
def test_every_methods_exported_model_predicts_with_the_methods_test_passes(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default run's check for every method (the trained one below is slow for PMG's 1024-channel
    heads): a random network exported and loaded predicts through ``Method.predict`` on the network,
    not its bare forward (WS-DAN's and CAL's views), and carries its test transform. The call is
    watched as well as the output compared: on a random network WS-DAN's test crop is the whole
    image (its mean attention map is flat), so its prediction equals the bare forward's."""
    backbone = backbone_for(kind)
    meta = {"name": DATASET, "image_max_side": 16, "image_size": [16, 16]}
    transform = eval_transform(meta, "none", 32, normalize="half")
    config = {"model": {"backbone": backbone, "options": BACKBONE_OPTIONS[backbone]},
              "variant": {"kind": kind, "options": VARIANT_OPTIONS.get(kind, {})}, "num_classes": 5,
              "preprocessing": preprocessing_record(transform)}
    torch.manual_seed(0)
    network = build_model_from_config(config, 5, pretrained=False).eval()
    write_export(network, config, tmp_path)
    exported = load_exported(tmp_path)
    assert exported.preprocess == transform
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    images = torch.stack([exported.transform(picture), -exported.transform(picture)])
    assert torch.equal(images[0], transform.normalise(transform(picture)))
    method = exported.method  # the method bound to the exported variant's options
    assert method.options == parse_options(kind, VARIANT_OPTIONS.get(kind, {}))
    with torch.no_grad():
        expected = method.predict(network, images)
        calls: list[nn.Module] = []
        predict = method.predict
        monkeypatch.setattr(method, "predict", lambda model, x: calls.append(model) or predict(model, x))
        output, scores = exported(images), exported.scores(images)
    assert calls == [exported.network, exported.network]
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.log_probs, expected.log_probs)
    assert torch.equal(scores, method.scores(expected).float())


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(METHODS))
def test_every_methods_export_reproduces_its_recorded_test_top1(kind: str, bars: Path, tmp_path: Path) -> None:
    backbone = backbone_for(kind)
    text = tiny_recipe(variants=(kind,), input_size=32, eval_batch_size=TEST_IMAGES, batch_size=16) + "threads = 1\n"
    if backbone != "wrn":
        options = BACKBONE_OPTIONS[backbone]
        extra = "\noptions = { " + ", ".join(f"{k} = {v}" for k, v in options.items()) + " }" if options else ""
        text = text.replace(WRN_LINES, f'backbone = "{backbone}"{extra}')
    for key, value in VARIANT_OPTIONS.get(kind, {}).items():
        text = text.replace(f'kind = "{kind}"', f'kind = "{kind}"\n{key} = {value}')
    run_dir, export = train_and_export(text, tmp_path, bars)
    config = check_reproduces_the_run(run_dir, export, bars)
    assert config["variant"]["kind"] == kind and config["model"]["backbone"] == backbone
    assert config["preprocessing"] == {"kind": "none", "size": 32, "resize": 32,
                                       "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def test_an_export_carries_half_normalisation_and_a_resize_and_reproduces_the_run(tmp_path: Path) -> None:
    """JPEGs larger than the resize: the loader decodes them at half scale (libjpeg's DCT scaling),
    so the exported transform must too for the pixels, and so the logits, to be the run's."""
    rng = np.random.default_rng(5)
    images = []
    for index in range(9):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    prepare_three_classes(tmp_path / "data", DATASET, images)
    text = tiny_recipe(variants=("ws_dan",), input_size=32, augmentation="imagenet", eval_batch_size=3,
                       batch_size=6, extra_dataset='resize = [40, 48]\nnormalize = "half"') + "threads = 1\n"
    run_dir, export = train_and_export(text, tmp_path, tmp_path / "data")
    config = check_reproduces_the_run(run_dir, export, tmp_path / "data")
    assert config["preprocessing"] == {"kind": "imagenet", "size": 32, "resize": [40, 48],
                                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert config["dataset"]["normalize"] == "half" and config["dataset"]["resize"] == [40, 48]


def test_an_export_of_an_older_format_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"format": "finebench-model", "format_version": 1}))
    with pytest.raises(FinebenchError, match=r"format_version 1; expected 2 \(export the run again"):
        load_exported(tmp_path)
