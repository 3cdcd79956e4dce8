"""Issue 27, defects 5 and 8: tracebacks a user met without --debug, and an unknown variant key
that was not named. Each case goes through the CLI: one line naming the value and what works, a
non-zero exit, and nothing written (or a run left in a state a rerun can act on)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli_reliability import run_main
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench.recipe import expand_runs, load_recipe
from finebench.recipe_sections import MAX_INPUT_SIZE
from finebench.results import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_bars(tmp_path_factory.mktemp("issue27") / "data", 48, 20)


def _recipe(tmp_path: Path, text: str = tiny_recipe()) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- defect 5 ------------------------------------------------------------------------------------


def test_submit_slurm_without_slurm_is_one_line_with_the_alternatives_and_writes_nothing(
    tmp_path, data_root, monkeypatch, capsys
):
    """It was 48 lines of traceback ending in submitit's 'Could not detect "srun"'."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    results = tmp_path / "results"
    code, _, err = run_main(monkeypatch, capsys, "run", str(_recipe(tmp_path)), "--data-root", str(data_root),
                            "--results-dir", str(results), "--submit", "slurm", "-q")
    _one_line_error(code, err, "--submit slurm", "Slurm not found", "srun", "sbatch", "--submit local",
                    "without --submit")
    assert not results.exists()


def test_an_input_size_no_gpu_holds_is_refused_when_the_recipe_loads(tmp_path, data_root, monkeypatch, capsys):
    """input_size = 100000 made --dry-run's cost probe allocate 120 GB and die with a traceback."""
    results = tmp_path / "results"
    recipe = _recipe(tmp_path, tiny_recipe(input_size=100_000))
    code, _, err = run_main(monkeypatch, capsys, "run", str(recipe), "--dry-run", "--data-root", str(data_root),
                            "--results-dir", str(results))
    _one_line_error(code, err, "tiny.toml: dataset.input_size", "100000", f"at most {MAX_INPUT_SIZE}")
    assert not results.exists()
    # the largest size allowed still loads (the bound refuses typos, not protocols)
    assert load_recipe(recipe, [f"dataset.input_size={MAX_INPUT_SIZE}"]).input_size() == MAX_INPUT_SIZE


def test_profile_input_size_has_the_recipes_bound(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["finebench", "profile", "--backbone", "wrn", "--depth", "10", "--width", "1",
                                     "--input-size", "100000"])
    from finebench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "--input-size" in err and "100000" in err and f"1 to {MAX_INPUT_SIZE}" in err


@pytest.mark.parametrize("override", ["train.lr=1e39", "train.weight_decay=3.5e38", "variants.0.reg_w=1e300"])
def test_a_float_beyond_float32_is_refused_before_a_run_folder_is_written(tmp_path, data_root, monkeypatch,
                                                                           capsys, override):
    """--set train.lr=1e39 trained, died in the first step ('value cannot be converted to type float
    without overflow') and left the run 'running'."""
    field, _, value = override.partition("=")
    results = tmp_path / "results"
    recipe = _recipe(tmp_path, tiny_recipe(variants=("attention",)))
    code, _, err = run_main(monkeypatch, capsys, "run", str(recipe), "--data-root", str(data_root),
                            "--results-dir", str(results), "--set", override, "-q")
    _one_line_error(code, err, f"{field}: expected a finite float32 value", f"got {float(value)!r}")
    assert not results.exists()
    # float32's largest finite value itself is a valid setting
    assert load_recipe(_recipe(tmp_path), ["train.lr=3.4e38"]).recipe.train.lr == 3.4e38


def test_an_unexpected_error_mid_run_records_the_run_failed_not_running(tmp_path, data_root, monkeypatch, capsys):
    """A bug that stopped training left summary.json "running" (``report``: in progress, forever)."""
    import finebench.train.fit as engine  # the fit loop's module, patched below

    recipe = _recipe(tmp_path, tiny_recipe(epochs=2))
    results = tmp_path / "results"
    args = ["run", str(recipe), "--data-root", str(data_root), "--results-dir", str(results), "-q"]
    run_dir = RunDir(results, "tiny", expand_runs(load_recipe(recipe))[0].run_id)
    real_epoch, calls = engine._train_epoch, []

    def bug_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected bug")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "_train_epoch", bug_in_epoch_two)
    monkeypatch.setattr("sys.argv", ["finebench", *args])
    from finebench.cli import main

    with pytest.raises(ValueError, match="injected bug") as raised:  # a bug keeps its traceback
        main()
    assert any("--retry-failed" in note for note in raised.value.__notes__)
    monkeypatch.setattr(engine, "_train_epoch", real_epoch)
    state, summary = run_dir.state(), run_dir.summary()
    assert state.kind == "failed" and state.failure_reason == "ValueError: injected bug"
    assert summary["epochs_completed"] == 1 and summary["finished_at"] is not None
    code, out, err = run_main(monkeypatch, capsys, *args)  # a rerun says so and stops, as for any failed run
    assert code == 1 and "skipped-failed" in out, err
    code, _, err = run_main(monkeypatch, capsys, *args, "--retry-failed")  # and resumes from epoch 1's checkpoint
    assert code == 0, err
    assert run_dir.status() == "finished" and len(run_dir.read_metrics()) == 2


# ---- defect 8 ------------------------------------------------------------------------------------


def _ws_dan_recipe(tmp_path: Path, *lines: str) -> Path:
    return _recipe(tmp_path, tiny_recipe().replace('kind = "baseline"', "\n".join(['kind = "ws_dan"', *lines])))


def test_an_unknown_variant_key_names_the_key_the_variant_and_its_methods_options(tmp_path, data_root,
                                                                                  monkeypatch, capsys):
    """It said "variants.0: unknown key": the key was dropped because 'attention' is also a method's name."""
    args = ["--dry-run", "--data-root", str(data_root), "--results-dir", str(tmp_path / "results")]
    code, _, err = run_main(monkeypatch, capsys, "run", str(_ws_dan_recipe(tmp_path, "attention = 4")), *args)
    line = _one_line_error(code, err, "tiny.toml: variants.0.attention: unknown key 'attention' in variant 0 "
                           "(kind ws_dan): not an option of ws_dan (did you mean 'attentions'?); ws_dan's options: "
                           "attentions, tap, centre_beta")
    assert "(and name)" in line

    code, _, err = run_main(monkeypatch, capsys, "run", str(_ws_dan_recipe(tmp_path, 'name = "wsd"', "reg_w = 1.0")),
                            *args)
    _one_line_error(code, err, "variants.0.reg_w: unknown key 'reg_w' in variant 0 (kind ws_dan, name 'wsd'): "
                    "an option of attention, not of ws_dan; ws_dan's options: attentions")

    code, _, err = run_main(monkeypatch, capsys, "run", str(_recipe(tmp_path)), *args, "--set", "variants.0.depth=2")
    _one_line_error(code, err, "variants.0.depth: unknown key 'depth' in variant 0 (kind baseline): not an option "
                    "of baseline; baseline takes no options (only name)")


def test_a_logged_table_named_after_a_method_keeps_its_name_in_the_path(tmp_path, data_root, monkeypatch, capsys):
    """The same filter turned logged.baseline.extra into logged.extra."""
    code, _, err = run_main(monkeypatch, capsys, "run", str(_recipe(tmp_path)), "--dry-run", "--data-root",
                            str(data_root), "--set", "logged.baseline.extra=1")
    _one_line_error(code, err, "tiny.toml: logged.baseline.extra: unknown key")
