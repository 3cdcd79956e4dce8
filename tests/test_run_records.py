"""What a run leaves for a reviewer: a live summary each epoch, the environment, the data digest,
the final confusion matrix and TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_data import DATASET, prepare_tiny_bars, tiny_recipe

from finebench.data.store import meta_digest
from finebench.recipe import load_recipe
from finebench.report.stats import mean_class_accuracy
from finebench.results import RunDir
from finebench.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = tiny_recipe(epochs=2, schedule="cosine")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[tuple[str, int]]]:
    """One 2-epoch run; every summary.json it wrote, in order, as (status, epochs_completed)."""
    base = tmp_path_factory.mktemp("records")
    data_root = prepare_tiny_bars(base / "data", 60, 40)
    recipe = base / "tiny.toml"
    recipe.write_text(RECIPE)
    written: list[tuple[str, int]] = []
    original = RunDir.write_summary

    def spy(self: RunDir, summary: dict) -> None:
        written.append((summary["status"], summary["epochs_completed"]))
        original(self, summary)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunDir, "write_summary", spy)
        (outcome,) = run_recipe(load_recipe(recipe), results_dir=base / "results", data_root=data_root, quiet=True)
    return outcome.path, data_root, written


def test_the_summary_is_rewritten_after_every_epoch_while_running(finished) -> None:
    _, _, written = finished
    assert written == [("running", 0), ("running", 1), ("running", 2), ("finished", 2)]


def test_the_summary_records_versions_git_state_and_the_data_digest(finished) -> None:
    run_dir, data_root, _ = finished
    summary = json.loads((run_dir / "summary.json").read_text())
    import platform

    import torchvision

    assert summary["python_version"] == platform.python_version()
    assert summary["torchvision_version"] == torchvision.__version__.split("+")[0]
    assert {"cuda_version", "cudnn_version", "git_dirty"} <= set(summary)
    assert summary["dataset_digest"] == meta_digest(data_root, DATASET)
    assert summary["dataset_digest"].startswith("sha256:") and len(summary["dataset_digest"]) == 71


def test_the_final_confusion_matrix_gives_the_test_accuracy_and_the_mean_per_class_accuracy(finished) -> None:
    run_dir, _, _ = finished
    summary = json.loads((run_dir / "summary.json").read_text())
    record = json.loads((run_dir / "confusion.json").read_text())
    matrix = record["matrix"]
    assert record["classes"] == [str(c) for c in range(10)]
    assert sum(map(sum, matrix)) == 40
    assert 100 * sum(matrix[i][i] for i in range(10)) / 40 == summary["final"]["test_top1"]
    recalls = [matrix[i][i] / sum(matrix[i]) for i in range(10)]
    assert summary["final"]["mean_class_top1"] == pytest.approx(100 * sum(recalls) / 10)
    assert mean_class_accuracy(matrix) == pytest.approx(100 * sum(recalls) / 10)


def test_tensorboard_events_hold_the_jsonl_rows(finished) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = finished
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = events.Scalars("test_top1")
    assert [e.step for e in logged] == [row["epoch"] for row in rows]
    assert [e.value for e in logged] == pytest.approx([row["test_top1"] for row in rows])
    assert {"train_loss", "lr", "test_top5"} <= set(events.Tags()["scalars"])
