"""``finebench attend`` on a tiny trained attention run writes one attention-map PNG per image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finebench import attend
from finebench.errors import FinebenchError
from finebench.methods import build_model

CLASSES = ["cat", "dog", "bird"]
BACKBONE_OPTIONS = {"depth": 10, "width": 1, "dropout": 0.0}
ATTENTION_OPTIONS = {"attention_depth": 3, "attention_width": 2, "gates": "softmax", "reg_w": 0.001,
                     "output_mode": "mixture"}


def tiny_attention_run(root: Path, data_root: Path) -> Path:
    """Train WRN-10-1 + attention a few steps on random 32×32 images; save it as `finebench run` does."""
    torch.manual_seed(0)
    model = build_model("wrn", len(CLASSES), variant="attention", variant_options=ATTENTION_OPTIONS,
                        backbone_options=BACKBONE_OPTIONS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, len(CLASSES), (8,))
    model.train()
    for _ in range(3):
        output = model(images)
        loss = torch.nn.functional.nll_loss(output.log_probs, labels) + output.reg_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run_dir = root / "tiny" / "abc123def456"
    run_dir.mkdir(parents=True)
    config = {
        "recipe": "tiny",
        "dataset": {"name": "toy", "root": str(data_root), "input_size": None, "augmentation": "auto",
                    "train_split": "train", "test_split": "test"},
        "model": {"backbone": "wrn", "options": BACKBONE_OPTIONS, "pretrained": None},
        "variant": {"kind": "attention", "name": "attention-ad3-aw2", "options": ATTENTION_OPTIONS},
        "seed": 0,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").write_text(json.dumps({
        "schema": 1, "run_id": "abc123def456", "recipe": "tiny", "status": "finished", "dataset": "toy",
        "num_classes": len(CLASSES), "backbone": "wrn", "backbone_label": "WRN-10-1", "variant": "attention",
        "variant_name": "attention-ad3-aw2", "variant_options": ATTENTION_OPTIONS, "seed": 0,
    }))
    torch.save({"epoch": 1, "model": model.state_dict()}, run_dir / "last.pt")
    return run_dir


def toy_store(data_root: Path) -> None:
    """A prepared 'toy' dataset (Arrow store + meta.json) with a 6-image test split."""
    import datasets

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    store = datasets.Dataset.from_dict({"image": pictures, "label": [0, 1, 2, 0, 1, 2]}, features=features)
    store.save_to_disk(str(data_root / "toy" / "test"))
    (data_root / "toy" / "meta.json").write_text(json.dumps({
        "name": "toy", "classes": CLASSES, "image_max_side": 32, "image_size": [32, 32],
        "splits": {"test": 6},
    }))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("attend")
    data_root = base / "data"
    toy_store(data_root)
    return tiny_attention_run(base / "results", data_root), data_root


def test_capture_gives_spatial_masks_and_gates(tiny: tuple[Path, Path]) -> None:
    run = attend.load_attention_run(tiny[0])
    capture = attend.capture_attention(run.model, torch.randn(2, 3, 32, 32))
    assert len(capture.masks) == 3 and len(capture.taps) == 3
    for masks, weights in zip(capture.masks, capture.head_weights):
        assert masks.shape[:2] == (2, 2)
        assert torch.allclose(masks.sum(dim=(2, 3)), torch.ones(2, 2), atol=1e-5)
        assert torch.allclose(weights.sum(1), torch.ones(2), atol=1e-5)
    assert capture.source_gates.shape == (2, 4)


def test_attend_writes_a_png_per_image_file(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, data_root = tiny
    paths = []
    for index in range(2):
        path = tmp_path / f"photo{index}.png"
        Image.fromarray(np.full((40, 50, 3), 60 * index, dtype=np.uint8)).save(path)
        paths.append(path)
    written = attend.attend(run_dir, paths, data_root=data_root, out_dir=tmp_path / "maps")
    assert [p.name for p in written] == ["photo0.png", "photo1.png"]
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000


def test_cli_attend_on_a_split_writes_into_the_run_folder(tiny: tuple[Path, Path]) -> None:
    run_dir, data_root = tiny
    done = subprocess.run(
        [sys.executable, "-m", "finebench", "attend", str(run_dir), "--split", "test", "--n", "3",
         "--data-root", str(data_root)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    written = sorted((run_dir / "attention_maps").glob("*.png"))
    assert len(written) == 3 and all(p.stat().st_size > 5000 for p in written)


def test_attend_refuses_a_baseline_run(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "baseline"
    run_dir.mkdir()
    config = json.loads((tiny[0] / "config.json").read_text())
    config["variant"] = {"kind": "baseline", "name": "baseline", "options": {}}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").write_text((tiny[0] / "summary.json").read_text())
    with pytest.raises(FinebenchError, match="attention"):
        attend.attend(run_dir, split="test", data_root=tiny[1])


def _copy_run(tiny_run: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("config.json", "summary.json", "last.pt"):
        (to / name).write_bytes((tiny_run / name).read_bytes())
    return to


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", b"[1]", r"config.json: holds a JSON list; expected an object"),
        ("config.json", b'{"variant": ["attention"]}', r"variant.kind is None"),
        ("last.pt", b"\x80\x02cos\nsystem\n.", r"cannot read run checkpoint .*last.pt: not a torch state dict"),
        ("last.pt", b"PK\x03\x04junk", r"cannot read run checkpoint .*last.pt"),
    ],
    ids=["config-not-an-object", "variant-not-an-object", "pickle-not-weights-only", "damaged-zip"],
)
def test_damaged_run_files_are_one_line_user_errors(
    tiny: tuple[Path, Path], tmp_path: Path, file: str, content: bytes, message: str
) -> None:
    run_dir = _copy_run(tiny[0], tmp_path / "run")
    (run_dir / file).write_bytes(content)
    with pytest.raises(FinebenchError, match=message) as caught:
        attend.attend(run_dir, split="test", data_root=tiny[1])
    assert "\n" not in str(caught.value)


def test_attend_missing_image_is_one_line_error(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match="no such image file"):
        attend.attend(tiny[0], [tmp_path / "nope.jpg"], data_root=tiny[1])


def test_images_with_the_same_name_get_separate_figures(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "cat.png"
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    written = attend.attend(tiny[0], paths, data_root=tiny[1], out_dir=tmp_path / "maps")
    assert [p.name for p in written] == ["cat.png", "cat_1.png"]


def test_heads_are_told_apart_by_what_they_say_not_by_equal_gates(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Issue 22 item 10: every head was labelled `w=0.50` (gates 0.5000 ± 3e-5 in a trained run).
    Each head now shows its own top class; a module's weights only where they differ."""
    from finebench.models.attention import AttentionModule

    run = attend.load_attention_run(tiny[0])
    images = torch.randn(1, 3, 32, 32)
    capture = attend.capture_attention(run.model, images)
    assert len(capture.head_log_probs) == 3 and capture.head_log_probs[0].shape == (1, 2, len(CLASSES))
    # the heads' own scores add up to the module's logits under the module gate
    module = next(m for m in run.model.modules() if isinstance(m, AttentionModule))
    seen = {}
    hook = module.register_forward_hook(lambda m, i, o: seen.update(features=i[0], out=o))
    with torch.no_grad():
        run.model(images)
        hook.remove()
        logits, masks = seen["out"]
        weights = module.head_weights(seen["features"], masks)
        assert torch.allclose((module.head_outputs(seen["features"], masks) * weights[:, :, None]).sum(1), logits,
                              atol=1e-5)
    picture = np.zeros((32, 32, 3), np.uint8)

    def head_titles() -> list[str]:
        figure = attend.attention_figure(picture, capture, 0, CLASSES)
        return [axes.get_title() for axes in figure.axes if " head " in axes.get_title()]

    capture.head_weights = [torch.full_like(w, 0.5) for w in capture.head_weights]
    titles = head_titles()
    assert len(titles) == 6 and not any("w=" in t for t in titles)
    assert all(any(name in t for name in CLASSES) for t in titles)
    capture.head_weights = [torch.tensor([[0.7, 0.3]]) for _ in capture.head_weights]
    assert all("w=0.70" in t or "w=0.30" in t for t in head_titles())
