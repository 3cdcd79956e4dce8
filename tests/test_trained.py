"""``finebench eval`` repeats a run's final evaluation exactly; ``finebench export`` round-trips the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench.errors import FinebenchError
from finebench.recipe import load_recipe
from finebench.runner import run_recipe
from finebench.trained import EXPORT_FORMAT, export_run, load_exported, load_trained_run

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = tiny_recipe(seeds=(3,), variants=("attention",), eval_batch_size=16, schedule="cosine")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("trained")
    data_root = prepare_tiny_bars(base / "data", 64, 41)
    recipe = base / "tiny.toml"
    recipe.write_text(RECIPE)
    (outcome,) = run_recipe(load_recipe(recipe), results_dir=base / "results", data_root=data_root, quiet=True)
    return outcome.path, data_root


def cli(*args: str) -> subprocess.CompletedProcess:
    """The console script in-process (``main`` with its error handling): no interpreter start-up per call."""
    import contextlib
    import io

    from finebench.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["finebench", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_eval_reproduces_the_final_test_metrics_exactly(trained) -> None:
    run_dir, data_root = trained
    done = cli("eval", str(run_dir), "--data-root", str(data_root), "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert metrics["images"] == 41 and metrics["split"] == "test"
    assert metrics["test_top1"] == final["test_top1"] and metrics["test_top5"] == final["test_top5"]
    assert metrics["network_top1"] == final["network_top1"] and metrics["module_top1"] == final["module_top1"]
    assert metrics["mean_class_top1"] == final["mean_class_top1"]
    assert metrics["confusion"] == json.loads((run_dir / "confusion.json").read_text())["matrix"]
    assert metrics["test_loss"] == pytest.approx(final["test_loss"], rel=1e-6)


def test_eval_table_and_another_split(trained) -> None:
    run_dir, data_root = trained
    done = cli("eval", str(run_dir), "--data-root", str(data_root), "--device", "cpu", "--split", "train")
    assert done.returncode == 0, done.stderr
    assert "train split, 64 images" in done.stdout and "mean per-class" in done.stdout


def test_eval_of_a_folder_that_is_not_a_run_is_one_clear_line(tmp_path: Path) -> None:
    done = cli("eval", str(tmp_path))
    assert done.returncode == 2 and "config.json: not found" in done.stderr and "Traceback" not in done.stderr


def test_export_round_trips_weights_and_outputs(trained, tmp_path: Path) -> None:
    run_dir, _ = trained
    done = cli("export", str(run_dir), "--out", str(tmp_path / "export"))
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["format"] == EXPORT_FORMAT and config["num_classes"] == 10
    assert config["variant"]["kind"] == "attention" and config["model"]["backbone"] == "wrn"
    assert config["classes"] == [str(c) for c in range(10)]
    original = load_trained_run(run_dir).model
    rebuilt = load_exported(tmp_path / "export")
    expected, got = original.state_dict(), rebuilt.network.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(images), rebuilt(images)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.logits, b.logits)


def test_loading_an_export_checks_its_format(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FinebenchError, match="format 'something-else'"):
        load_exported(tmp_path)


def test_export_writes_into_the_run_folder_by_default(trained) -> None:
    run_dir, _ = trained
    written = export_run(run_dir)
    assert [p.name for p in written] == ["model.safetensors", "config.json"]
    assert written[0].stat().st_mode & 0o777 == written[1].stat().st_mode & 0o777  # not private
    assert all(p.parent == run_dir / "export" for p in written)


def test_export_without_the_store_that_settles_the_transform_is_one_line_and_writes_nothing(
    trained, tmp_path: Path
) -> None:
    run_dir, _ = trained
    done = cli("export", str(run_dir), "--out", str(tmp_path / "export"), "--data-root", str(tmp_path))
    assert done.returncode == 2 and "dataset 'mnist5k' is not prepared in" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not (tmp_path / "export").exists()
