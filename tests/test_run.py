"""`finebench run` end to end on a tiny prepared dataset: records, rerun, resume after SIGKILL,
bad recipes, NaN runs, locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_data import CLASSES, DATASET, EVENTS, prepare_tiny_bars, tiny_recipe

from finebench.errors import FinebenchError
from finebench.plan import RunSelection
from finebench.recipe import expand_runs, load_recipe
from finebench.results import RunDir, RunLocked
from finebench.runner import run_recipe
from finebench.train_settings import MACHINE_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_bars(tmp_path_factory.mktemp("data"), 96, 40)


RECIPE = tiny_recipe(seeds=(0, 1), variants=("baseline", "attention"), schedule="cosine", extra_train="threads = 1")

SUMMARY_KEYS = {
    "schema", "run_id", "recipe", "status", "failure_reason", "dataset", "num_classes", "backbone",
    "backbone_label", "variant", "variant_name", "variant_options", "taps", "seed", "fold", "epochs", "epochs_completed",
    "final", "best", "params", "flops", "params_baseline", "flops_baseline", "module_flops", "input_size",
    "train_time_s", "images_per_s", "device", "precision", "channels_last", "world_size", "threads", "threads_rule",
    "torch_version", "compile", "compile_time_s",
    "finebench_version", "git_commit", "hostname", "started_at", "finished_at",
}


def recipe_file(tmp_path: Path, text: str = RECIPE, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "finebench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in MACHINE_FIELDS} for row in rows]


def test_a_recipe_writes_valid_records_for_every_variant_and_seed_and_a_rerun_skips_them(tmp_path, data_root):
    loaded = load_recipe(recipe_file(tmp_path))
    outcomes = run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    assert [(o.run.variant_name, o.run.seed, o.status) for o in outcomes] == [
        ("baseline", 0, "finished"), ("baseline", 1, "finished"),
        ("attention-ad2-aw2", 0, "finished"), ("attention-ad2-aw2", 1, "finished"),
    ]
    for outcome in outcomes:
        run_dir = tmp_path / "results" / "tiny" / outcome.run.run_id
        assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
            "config.json", "confusion.json", "last.pt", "metrics.jsonl", "predictions.parquet", "summary.json", *EVENTS]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert SUMMARY_KEYS <= set(summary)
        assert summary["status"] == "finished" and summary["epochs_completed"] == 1
        assert summary["backbone_label"] == "WRN-10-1" and summary["num_classes"] == CLASSES
        assert summary["final"]["epoch"] == 1 and 0 <= summary["final"]["test_top1"] <= 100
        assert "optimistic" in summary["best"]["note"]
        assert summary["params"] > 0 and summary["flops"] > 0 and summary["input_size"] == 16
        config = json.loads((run_dir / "config.json").read_text())
        assert config["seed"] == outcome.run.seed and config["variant"]["name"] == outcome.run.variant_name
        if outcome.run.variant_kind == "attention":
            assert summary["params"] > summary["params_baseline"]
            assert set(summary["module_flops"]) == set(summary["final"]["module_top1"]) and summary["module_flops"]
            assert summary["final"]["network_top1"] is not None
            # WRN-10-1, AD 2: the pre-activated outputs of groups 2 and 1, deepest first
            assert summary["taps"] == [
                {"module": "attention.attention_modules.0", "tap": "group2", "channels": 64, "stride": 4},
                {"module": "attention.attention_modules.1", "tap": "group1", "channels": 32, "stride": 2},
            ]
        else:
            assert summary["params"] == summary["params_baseline"] and summary["module_flops"] == {}
            assert summary["taps"] == []
        assert summary["fold"] is None and "fold" not in config["dataset"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*") if p.is_file()}
    again = run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    assert {o.status for o in again} == {"skipped-finished"}
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*") if p.is_file()}


def test_a_run_killed_mid_training_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path, data_root):
    recipe = recipe_file(tmp_path, RECIPE.replace("seeds = [0, 1]", "seeds = [0]"))
    common = ["--data-root", str(data_root), "--only", "attention", "--set", "train.epochs=4", "--quiet"]
    loaded = load_recipe(recipe, ["train.epochs=4"])
    (run_id,) = [r.run_id for r in expand_runs(loaded, ["attention"])]
    # The uninterrupted reference runs in this process, on one thread like the subprocesses.
    run_recipe(loaded, results_dir=tmp_path / "ref", data_root=data_root, selection=RunSelection(("attention",)),
               quiet=True)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "finebench", "run", str(recipe), "--results-dir", "killed",
                                *common], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = RunDir(tmp_path / "killed", "tiny", run_id)
    deadline = time.monotonic() + 120
    while not killed.checkpoint_path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert killed.status() == "running" and 1 <= len(killed.read_metrics()) < 4

    resumed = cli("run", str(recipe), "--results-dir", "killed", *common, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected = RunDir(tmp_path / "ref", "tiny", run_id)
    assert without_timing(killed.read_metrics()) == without_timing(expected.read_metrics())
    assert killed.summary()["final"] == expected.summary()["final"]
    assert killed.status() == "finished" and killed.summary()["epochs_completed"] == 4


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from finebench.cli import main

    monkeypatch.setattr(sys, "argv", ["finebench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[train]", "[train]\nbatchsize = 3"), "train.batchsize: unknown key"),
        (("epochs = 1", "epochs = 1.5"), "train.epochs: Input should be a valid integer"),
        ((f'name = "{DATASET}"', 'name = "no_such_set"'), "dataset.name: unknown dataset 'no_such_set'"),
        ((f'name = "{DATASET}"', 'name = "cifar10"'), "cifar10"),  # registered, not prepared
    ],
)
def test_bad_recipes_give_one_line_exit_code_2_and_write_nothing(tmp_path, data_root, monkeypatch, capsys,
                                                                  edit, message):
    recipe = recipe_file(tmp_path, RECIPE.replace(*edit))
    code, err = _main(monkeypatch, capsys, "run", str(recipe), "--results-dir", str(tmp_path / "results"),
                      "--data-root", str(data_root))
    assert code == 2
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_the_console_script_exits_2_on_a_bad_recipe(tmp_path):
    result = cli("run", str(recipe_file(tmp_path, RECIPE + "\n[extra]\n")), cwd=tmp_path)
    assert result.returncode == 2 and "extra: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_diverging_run_is_recorded_as_failed_and_the_next_run_goes_on(tmp_path, data_root):
    loaded = load_recipe(recipe_file(tmp_path), ["train.lr=1e30", "train.optimizer=sgd", "train.momentum=0"])
    outcomes = run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root,
                          selection=RunSelection(("baseline",)), quiet=True)
    assert [o.status for o in outcomes] == ["failed", "failed"]  # the second seed still ran
    for outcome in outcomes:
        summary = RunDir(tmp_path / "results", "tiny", outcome.run.run_id).summary()
        assert summary["status"] == "failed"
        assert summary["failure_reason"].startswith("loss became") and "epoch 1 step" in summary["failure_reason"]
    rerun = run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root,
                       selection=RunSelection(("baseline",)), quiet=True)
    assert {o.status for o in rerun} == {"skipped-failed"}


def test_a_run_locked_by_another_process_is_left_alone(tmp_path, data_root):
    loaded = load_recipe(recipe_file(tmp_path), ["seeds=[0]"])
    baseline, attention = expand_runs(loaded)
    held = RunDir(tmp_path / "results", "tiny", baseline.run_id)
    with held.lock():
        with pytest.raises(RunLocked):
            with RunDir(tmp_path / "results", "tiny", baseline.run_id).lock():
                pass
        outcomes = run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    assert [o.status for o in outcomes] == ["locked", "finished"]
    assert held.summary() is None


def test_dry_run_lists_runs_with_cost_and_writes_nothing(tmp_path, data_root):
    loaded = load_recipe(recipe_file(tmp_path))
    outcomes = run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root, dry_run=True)
    assert [o.status for o in outcomes] == ["planned"] * 4
    assert outcomes[2].summary["params"] > outcomes[0].summary["params"] > 0
    assert [t["tap"] for t in outcomes[2].summary["taps"]] == ["group2", "group1"]
    assert not (tmp_path / "results").exists()


def test_the_dry_run_table_shows_each_variants_settings_taps_and_the_shared_settings(tmp_path, data_root):
    result = cli("run", str(recipe_file(tmp_path)), "--data-root", str(data_root), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "AD2 AW2 gates softmax output mixture reg_w 0.001" in result.stdout
    assert "group2:64@4 group1:32@2" in result.stdout
    assert "lr 0.05" in result.stdout and "batch 16" in result.stdout and "1 epochs" in result.stdout


def test_unprepared_data_is_reported_before_any_file_is_written(tmp_path):
    loaded = load_recipe(recipe_file(tmp_path, RECIPE.replace(f'"{DATASET}"', '"cifar10"')))
    with pytest.raises(FinebenchError, match="cifar10"):
        run_recipe(loaded, results_dir=tmp_path / "results", data_root=tmp_path / "none")
    assert not (tmp_path / "results").exists()
