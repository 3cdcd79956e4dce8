"""Issue 29, items 1 and 2: a validation split held out of training on every loader path, and model
selection on it (``train.select = "best_validation"``: best.pt, the selected epoch's test numbers)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import DATASET, prepare_tiny_bars, tiny_recipe

import finebench
from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.data.loader import build_loaders
from finebench.data.prepare import prepare_dataset
from finebench.data.validation import CarveError, carve, digest, largest_fraction
from finebench.errors import FinebenchError
from finebench.recipe import expand_runs, load_recipe
from finebench.report.records import fingerprint, load_runs, run_settings
from finebench.report.render import format_table, table_note, wide_view
from finebench.report.tables import summary_table
from finebench.results import RunDir
from finebench.train_settings import MACHINE_FIELDS
from finebench.runner import run_recipe
from finebench.summary import RunSummary
from finebench.trained import load_trained_run, strip_wrappers

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "validation_ids"
CLASSES = 3
STEP = 4
"""Image ``i`` of a split is one flat colour whose red level is ``STEP * i``: a batch says which
images it holds (JPEG keeps a flat colour within a level or two, well inside STEP / 2)."""
TRAIN, TEST, VAL = 60, 12, 9


def _flat(index: int, label: int, jpeg: bool) -> np.ndarray | bytes:
    pixels = np.zeros((12, 12, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = STEP * index, 60 * label
    if not jpeg:
        return pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _prepare(root: Path, name: str, splits: dict[str, int], jpeg: bool = False) -> Path:
    def parse(_raw: Path) -> ParsedDataset:
        return ParsedDataset([f"c{i}" for i in range(CLASSES)], {
            split: [Example(_flat(i, i % CLASSES, jpeg), i % CLASSES) for i in range(count)]
            for split, count in splits.items()})

    spec = DatasetSpec(name=name, num_classes=CLASSES, split_sizes={}, protocol="test", terms="test", homepage="",
                       parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(name, root, quiet=True)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _prepare(root, NAME, {"train": TRAIN, "val": VAL, "test": TEST})
    _prepare(root, NAME + "_jpeg", {"train": TRAIN, "test": TEST}, jpeg=True)
    _prepare(root, NAME + "_folds", {"fold0": 30, "fold1": 30, "fold2": 30})
    return root


def _ids(loader) -> list[int]:
    """The images an epoch of ``loader`` delivers, by index (decoded from the red level; the loaders
    here normalise with ``normalize = "half"``: mean = std = 0.5)."""
    found = []
    for images, _ in loader:
        red = images[:, 0].float().mean(dim=(1, 2)) * 0.5 + 0.5
        found += (red * 255 / STEP).round().long().tolist()
    return found


def _set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


# ---- the resolver -----------------------------------------------------------------------------


def test_a_carved_split_is_stratified_fixed_by_its_seed_and_leaves_every_class_a_training_image():
    labels = np.repeat(np.arange(4), [10, 5, 3, 2])
    chosen = carve(labels, 0.3, seed=7)
    assert np.array_equal(chosen, carve(labels, 0.3, seed=7))  # the seed fixes it
    assert not np.array_equal(chosen, carve(labels, 0.3, seed=8))
    # floor(0.3 n + 0.5) per class: 3 of 10, 2 of 5, 1 of 3, 1 of 2 (the last keeps one)
    assert np.bincount(labels[chosen], minlength=4).tolist() == [3, 2, 1, 1]
    assert np.all(np.diff(chosen) > 0)
    assert digest(chosen) == digest(list(reversed(chosen.tolist())))  # of the set, not the order


def test_a_fraction_that_would_empty_a_class_names_it_and_what_works():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 8)
    with pytest.raises(CarveError) as error:
        carve(labels, 0.8, seed=0, classes=["oak", "elm", "ash"])
    message = str(error.value)
    assert "\n" not in message and "'elm' has 2 training images" in message
    assert f"below {largest_fraction(2):.4g}" in message  # 0.75: floor(0.75 * 2 + 0.5) = 2 takes both
    assert len(carve(labels, 0.74, seed=0)) and np.bincount(labels[carve(labels, 0.74, seed=0)])[1] == 1


# ---- every loader path: training never sees a validation image --------------------------------


@pytest.mark.parametrize("path, options", [
    ("in_memory", {"in_memory": True}),
    ("workers", {"in_memory": False, "workers": 0}),
    ("workers", {"in_memory": False, "workers": 1}),
    ("device_decode", {"decode": "device", "device": "cpu"}),
])
def test_the_training_loader_and_the_validation_ids_are_disjoint_on_every_path(data_root, path, options):
    jpeg = path == "device_decode"
    name = NAME + "_jpeg" if jpeg else NAME
    augmentation = {"augmentation": "imagenet", "input_size": 8} if jpeg else {"augmentation": "none", "input_size": 12}
    loaders = build_loaders(name, data_root, batch_size=8, eval_batch_size=5, seed=1, **augmentation, **options,
                            validation={"fraction": 0.2, "seed": 3}, normalize="half")
    assert loaders.path == path
    validation = loaders.validation_choice.positions.tolist()
    record = loaders.validation_choice.record(TRAIN)
    assert record["ids"] == validation and record["digest"] == digest(validation) and len(validation) == 12
    training = set(range(TRAIN)) - set(validation)
    for epoch in (1, 2):
        _set_epoch(loaders.train, epoch)
        seen = _ids(loaders.train)
        assert set(seen) == training and len(seen) == len(training)  # every training image, no validation one
    assert sorted(_ids(loaders.validation)) == validation
    assert loaders.train_size == TRAIN - 12 and loaders.validation_size == 12
    assert sorted(_ids(loaders.test)) == list(range(TEST))


def test_a_named_validation_split_is_read_whole_and_training_keeps_its_own_split(data_root):
    loaders = build_loaders(NAME, data_root, batch_size=10, eval_batch_size=4, augmentation="none", input_size=12,
                            in_memory=False, validation={"split": "val"}, normalize="half")
    assert sorted(_ids(loaders.validation)) == list(range(VAL))  # the val split's own images
    _set_epoch(loaders.train, 1)
    assert sorted(_ids(loaders.train)) == list(range(TRAIN))
    with pytest.raises(FinebenchError, match="'val' is also in train_split 'train\\+val'"):
        build_loaders(NAME, data_root, batch_size=10, augmentation="none", input_size=12, train_split="train+val",
                      validation={"split": "val"})


def test_on_a_k_fold_split_each_held_out_fold_carves_from_its_training_folds_only(data_root):
    loaders = build_loaders(NAME + "_folds", data_root, batch_size=6, eval_batch_size=6, augmentation="none",
                            input_size=12, train_split="fold1+fold2", test_split="fold0", in_memory=True,
                            validation={"fraction": 0.1}, normalize="half")
    held = loaders.validation_choice.positions
    assert held.max() < 60 and len(held) == 6  # positions in fold1 + fold2 (30 + 30), 2 of each class
    # position p is image p % 30 of fold p // 30: the validation images are of the training folds
    assert sorted(_ids(loaders.validation)) == sorted((held % 30).tolist())
    _set_epoch(loaders.train, 1)
    assert loaders.train_size == 54 and len(_ids(loaders.train)) == 54


# ---- recipes: the schema, the run id, --dry-run -----------------------------------------------


def _recipe(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_validation_and_select_enter_the_run_id_only_when_set(tmp_path):
    plain = _recipe(tmp_path, tiny_recipe())
    (base,) = expand_runs(load_recipe(plain))
    (last,) = expand_runs(load_recipe(plain, ['train.select="last"']))
    assert last.run_id == base.run_id  # the default is no setting: every existing id stays
    (held,) = expand_runs(load_recipe(plain, ["dataset.validation={fraction = 0.2}"]))
    (seeded,) = expand_runs(load_recipe(plain, ["dataset.validation={fraction = 0.2, seed = 0}"]))
    (other,) = expand_runs(load_recipe(plain, ["dataset.validation={fraction = 0.2, seed = 1}"]))
    (selecting,) = expand_runs(load_recipe(plain, ["dataset.validation={fraction = 0.2}",
                                                   'train.select="best_validation"']))
    assert held.run_id == seeded.run_id and len({base.run_id, held.run_id, other.run_id, selecting.run_id}) == 4


def test_runs_recorded_before_the_settings_existed_group_with_runs_at_their_defaults(tmp_path):
    (run,) = expand_runs(load_recipe(_recipe(tmp_path, tiny_recipe())))
    assert run.config["dataset"]["validation"] is None and run.config["train"]["select"] == "last"
    older = json.loads(json.dumps(run.config))
    del older["dataset"]["validation"], older["train"]["select"]
    summary = RunSummary(run_id=run.run_id, recipe="tiny", status="finished", dataset=DATASET, backbone="wrn",
                         backbone_label="WRN-10-1", variant="baseline", variant_name="baseline", seed=0)
    assert fingerprint(run_settings(summary, run.config)) == fingerprint(run_settings(summary, older))


@pytest.mark.parametrize("overrides, message", [
    (['train.select="best_validation"'], 'train.select = "best_validation" needs a validation split'),
    (["dataset.validation={fraction = 0.2, split = \"val\"}"], "expected either fraction"),
    (["dataset.validation={split = \"val\", seed = 2}"], "remove seed"),
    (["dataset.validation={fraction = 1.0}"], "dataset.validation.fraction: Input should be less than 1"),
    (["dataset.validation={split = \"val\"}"], "mnist5k has no split 'val' (its splits: test, train)"),
])
def test_a_bad_validation_setting_is_one_line_at_dry_run(tmp_path, overrides, message):
    with pytest.raises(FinebenchError) as error:
        load_recipe(_recipe(tmp_path, tiny_recipe()), overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_named_split_must_be_the_datasets_own_and_apart_from_training(tmp_path):
    aircraft = _recipe(tmp_path, tiny_recipe(dataset="fgvc_aircraft"))
    (run,) = expand_runs(load_recipe(aircraft, ['dataset.validation={split = "val"}']))
    assert run.config["dataset"]["validation"] == {"fraction": None, "seed": 0, "split": "val"}
    with pytest.raises(FinebenchError, match="'val' is also in train_split 'train\\+val'"):
        load_recipe(aircraft, ['dataset.validation={split = "val"}', 'dataset.train_split="train+val"'])
    with pytest.raises(FinebenchError, match="adience is a 5-fold dataset; carve each fold's validation images"):
        load_recipe(_recipe(tmp_path, tiny_recipe(dataset="adience")), ['dataset.validation={split = "fold1"}'])


def test_a_fraction_that_empties_a_class_stops_the_dry_run_of_a_prepared_store(tmp_path):
    data_root = prepare_tiny_bars(tmp_path / "data", 30, 10)  # 3 images a class
    loaded = load_recipe(_recipe(tmp_path, tiny_recipe()), ["dataset.validation={fraction = 0.9}"])
    with pytest.raises(FinebenchError) as error:
        run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root, dry_run=True, quiet=True)
    assert "class '0' has 3 training images and would keep none" in str(error.value)
    assert "a fraction below 0.8333" in str(error.value) and not (tmp_path / "results").exists()


# ---- model selection: best.pt, the records, kill -9 and resume ---------------------------------

SELECTING = tiny_recipe(epochs=4, schedule="cosine", lr=0.1, extra_dataset="validation = { fraction = 0.25, seed = 5 }",
                        extra_train='select = "best_validation"\nthreads = 1')


def test_best_validation_records_the_split_keeps_best_pt_and_tests_the_selected_weights(tmp_path):
    data_root = prepare_tiny_bars(tmp_path / "data", 80, 40)
    (outcome,) = run_recipe(load_recipe(_recipe(tmp_path, SELECTING)), results_dir=tmp_path / "results",
                            data_root=data_root, quiet=True)
    run_dir = RunDir.at(outcome.path)
    summary, rows = run_dir.summary(), run_dir.read_metrics()
    record = run_dir.read_validation()
    assert summary["validation"]["digest"] == record["digest"] == digest(record["ids"])
    assert record["count"] == 20 and summary["validation"]["images"] == 20 and summary["select"] == "best_validation"
    assert all({"val_top1", "val_loss"} <= set(row) for row in rows)
    chosen = max(rows, key=lambda row: (row["val_top1"], -row["epoch"]))  # the earliest best
    selected = summary["selected"]
    assert selected["epoch"] == chosen["epoch"] and selected["val_top1"] == chosen["val_top1"]
    best = run_dir.load_best()
    assert best["epoch"] == chosen["epoch"]
    # eval, attend and export rebuild the run with the selected weights, not the last epoch's (here the
    # selected epoch may be the last, so best.pt is replaced by weights of its own to tell them apart)
    marked = {name: torch.full_like(value, 0.5) if value.is_floating_point() else value
              for name, value in best["model"].items()}
    run_dir.save_best({**best, "model": marked})
    rebuilt = load_trained_run(outcome.path).model.state_dict()
    assert all(torch.equal(rebuilt[name], value) for name, value in strip_wrappers(marked).items())
    run_dir.save_best(best)
    # The test evaluation of the selected weights is that epoch's own test evaluation (eval_every 1),
    # the same weights on the same images in the same order: float64 sums of identical float32 outputs.
    assert selected["test_top1"] == chosen["test_top1"] and selected["test_loss"] == chosen["test_loss"]
    assert summary["final"]["epoch"] == 4 and summary["best"]["epoch"] == max(
        rows, key=lambda row: (row["test_top1"], -row["epoch"]))["epoch"]
    # the report: one column per selection rule, each rule named in the note
    table = summary_table(load_runs([tmp_path / "results"]).runs)
    assert table.loc[0, "selected_top1_mean"] == selected["test_top1"]
    assert table.loc[0, "best_top1_mean"] == summary["best"]["test_top1"]
    assert table.loc[0, "top1_mean"] == summary["final"]["test_top1"]
    headers = list(format_table(table).columns) + list(wide_view(table).columns)
    assert {"Top-1 (last epoch)", "Top-1 (val-selected)", "Top-1 (best on test, optimistic)"} <= set(headers)
    assert {"baseline top-1 (last epoch)", "baseline top-1 (val-selected)"} <= set(headers)
    note = table_note(table)
    assert "(val-selected) the weights of the epoch with the best validation top-1" in note
    assert "(best on test) " not in note and "optimistic: selected on the test set" in note
    run_dir.discard()  # --restart: the selected weights and the split's record go with the others
    assert not run_dir.best_path.exists() and not run_dir.validation_path.exists()


def _launch(args: list[str], cwd: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    """``finebench ARGS`` in a fresh interpreter. ``kill``: it SIGKILLs itself at epoch 2, right after
    ``"best"``.pt (before last.pt: the window a resume must replay) or right after ``"last"``.pt."""
    source_root = str(Path(finebench.__file__).resolve().parents[1])
    killer = "" if kill is None else f"""
import os, signal
from finebench.results import RunDir
original = RunDir.save_best if {kill!r} == "best" else RunDir.save_checkpoint
def save_then_die(self, state):
    original(self, state)
    if state["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
setattr(RunDir, "save_best" if {kill!r} == "best" else "save_checkpoint", save_then_die)
"""
    code = killer + "\nimport sys\nfrom finebench.cli import main\nsys.argv = ['finebench'] + sys.argv[1:]\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([source_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, RunDir]:
    root = tmp_path_factory.mktemp("selecting")
    data_root = prepare_tiny_bars(root / "data", 80, 40)
    recipe = _recipe(root, SELECTING)
    whole = _launch(["run", str(recipe), "--data-root", str(data_root), "-q", "--results-dir", str(root / "whole")],
                    root)
    assert whole.returncode == 0, whole.stderr
    (run,) = expand_runs(load_recipe(recipe))
    return recipe, data_root, RunDir(root / "whole", "tiny", run.run_id)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["best", "last"])
def test_kill_9_mid_run_then_resume_selects_the_same_epoch_with_the_same_test_numbers(uninterrupted, tmp_path, kill):
    recipe, data_root, one = uninterrupted
    assert one.load_best()["epoch"] >= 2  # epoch 2 improves on epoch 1: the "best" kill has its window
    common = ["run", str(recipe), "--data-root", str(data_root), "-q", "--results-dir", str(tmp_path / "killed")]
    killed = _launch(common, tmp_path, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    two = RunDir(tmp_path / "killed", one.path.parent.name, one.path.name)
    # "best": best.pt holds epoch 2, last.pt still epoch 1, which the resume replays from
    assert two.load_checkpoint()["epoch"] == (1 if kill == "best" else 2) and two.load_best()["epoch"] == 2
    assert two.summary()["status"] == "running"
    resumed = _launch(common, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    # CPU, fp32, one thread: a resume repeats the uninterrupted run bit for bit (the engine's resume rule)
    assert one.summary()["selected"] == two.summary()["selected"]
    assert one.read_validation() == two.read_validation()
    strip = [{k: v for k, v in row.items() if k not in MACHINE_FIELDS} for row in one.read_metrics()]
    assert strip == [{k: v for k, v in row.items() if k not in MACHINE_FIELDS} for row in two.read_metrics()]
    best_one, best_two = one.load_best(), two.load_best()
    assert best_one["epoch"] == best_two["epoch"]
    assert all(torch.equal(best_one["model"][key], best_two["model"][key]) for key in best_one["model"])
    assert json.loads(one.confusion_path.read_text()) == json.loads(two.confusion_path.read_text())
