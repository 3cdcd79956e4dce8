"""Issue 22 (reliability, second round): what a new user and a hostile tester broke, one test each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finebench.errors import FinebenchError
from finebench.profile import profile_recipe_backbones
from finebench.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
seeds = [0]
[dataset]
name = "mnist5k"
input_size = 32
[model]
backbone = ["timm:resnet10t", "torchvision:resnet18"]
[[variants]]
kind = "baseline"
[train]
epochs = 1
batch_size = 8
lr = 0.05
schedule = "constant"
"""


def finebench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finebench", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize(("edit", "message"), [
    (("lr = 0.05", 'lr = "0.05"'), "train.lr: Input should be a valid number"),
    (("epochs = 1", "epochs = true"), "train.epochs: Input should be a valid integer"),
    (("seeds = [0]", "seeds = [true]"), "seeds.0: Input should be a valid integer"),
    (("input_size = 32", "input_size = 32.0"), "dataset.input_size: Input should be a valid integer"),
])
def test_a_quoted_number_or_a_boolean_where_a_number_goes_is_an_error(tmp_path: Path, edit, message) -> None:
    """Item 5: the schema no longer coerces "0.05" to 0.05 or true to 1 (an int where a float goes still works)."""
    recipe = tmp_path / "typed.toml"
    recipe.write_text(RECIPE.replace(*edit))
    with pytest.raises(FinebenchError, match=message):
        load_recipe(recipe)
    (tmp_path / "ok.toml").write_text(RECIPE.replace("lr = 0.05", "lr = 1"))
    assert load_recipe(tmp_path / "ok.toml").recipe.train.lr == 1.0


def test_set_with_a_boolean_for_an_integer_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(RECIPE)
    result = finebench("run", "r.toml", "--dry-run", "--set", "train.epochs=true", cwd=tmp_path)
    assert result.returncode == 2
    assert "train.epochs: Input should be a valid integer" in result.stderr
    assert result.stderr.strip().count("\n") == 0


@pytest.mark.slow  # about 17 s at rest: a dry run and a profile of two backbones, each its own process
def test_the_shipped_several_backbone_recipe_dry_runs_and_profiles_each_backbone(tmp_path: Path) -> None:
    """Item 6: ``finebench run recipes/any_backbone_cub200.toml --dry-run`` died in recipe_settings."""
    dry = finebench("run", str(ROOT / "recipes" / "any_backbone_cub200.toml"), "--dry-run", "--data-root",
                    str(tmp_path), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-1500:]
    assert "Traceback" not in dry.stderr
    (tmp_path / "r.toml").write_text(RECIPE)
    reports = profile_recipe_backbones(str(tmp_path / "r.toml"))
    assert [report.backbone for report in reports] == ["timm:resnet10t", "torchvision:resnet18"]
    assert reports[0].rows[0].params != reports[1].rows[0].params
    listed = finebench("profile", "r.toml", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-1500:]
    assert [entry["backbone"] for entry in json.loads(listed.stdout)] == ["timm:resnet10t", "torchvision:resnet18"]


def test_pretrained_none_turns_a_recipes_weights_off_and_bad_values_fail_at_load(tmp_path: Path) -> None:
    """Item 13: ``--set model.pretrained=none`` means no weights; "" and a missing file are one-line
    errors when the recipe is loaded (so at --dry-run), not when the run starts."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace('backbone = ["timm:resnet10t", "torchvision:resnet18"]',
                                     'backbone = "timm:resnet10t"\npretrained = "timm"'))
    assert load_recipe(recipe).recipe.model.pretrained == "timm"
    assert load_recipe(recipe, ["model.pretrained=none"]).recipe.model.pretrained is None
    with pytest.raises(FinebenchError, match="model.pretrained: .*is empty: expected 'none'"):
        load_recipe(recipe, ['model.pretrained=""'])
    with pytest.raises(FinebenchError, match="model.pretrained: .*weights file './missing.pth' does not exist"):
        load_recipe(recipe, ["model.pretrained=./missing.pth"])
    result = finebench("run", "r.toml", "--dry-run", "--set", "model.pretrained=", cwd=tmp_path)
    assert result.returncode == 2 and "is empty: expected 'none'" in result.stderr


@pytest.mark.parametrize(("backbone", "kind", "options", "backbone_options", "size"), [
    ("wrn", "baseline", None, {"depth": 10, "width": 1}, 32),
    ("wrn", "attention", {"attention_depth": 2, "attention_width": 2}, {"depth": 10, "width": 1}, 32),
    ("wrn", "cbam", None, {"depth": 10, "width": 1}, 32),
    ("wrn", "bcnn", None, {"depth": 10, "width": 1}, 32),
    ("resnext_cifar", "se", None, {"depth": 11, "cardinality": 2, "base_width": 4}, 32),
    ("timm:resnet10t", "attention", None, None, 64),
    ("timm:resnet10t", "eca", None, None, 64),
    ("torchvision:resnet18", "attention", {"attention_depth": 1}, None, 64),
])
def test_fvcore_agrees_with_torchs_flop_counter_on_convolutions_and_matrix_products(
    backbone, kind, options, backbone_options, size
) -> None:
    """Item 12: fvcore (no release since 2022, traces through deprecated TorchScript) is checked by
    ``profile`` against torch.utils.flop_counter on every model; here on every method and family."""
    from finebench.methods import build_model, get_method
    from finebench.profile import TensorOutputs, cross_check_flops

    model = build_model(backbone, 10, kind, options, backbone_options).eval()
    check = cross_check_flops(TensorOutputs(model, get_method(kind)), size)
    assert check.fvcore_macs > 0
    assert check.agrees, str(check)


def test_a_resume_that_fails_changes_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 4: an unreadable last.pt used to rewrite summary.json first (epochs_completed 1 -> 0)."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench.errors import Interrupted
    from finebench.recipe import expand_runs
    from finebench.results import RunDir
    from finebench.runner import run_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(epochs=3) + "threads = 1\n")
    loaded = load_recipe(recipe)
    run_dir = RunDir(tmp_path / "results", "tiny", expand_runs(loaded)[0].run_id)
    save = RunDir.save_checkpoint

    def save_then_stop(self: RunDir, state) -> None:  # noqa: ANN001
        save(self, state)
        raise KeyboardInterrupt  # as Ctrl-C right after the first epoch's checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    assert run_dir.state().kind == "resumable"
    run_dir.checkpoint_path.write_bytes(b"not a checkpoint")
    before = {path.name: path.read_bytes() for path in run_dir.path.iterdir() if path.is_file()}
    with pytest.raises(FinebenchError):
        run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    after = {path.name: path.read_bytes() for path in run_dir.path.iterdir() if path.is_file()}
    assert after == before


def _finished_tiny_run(tmp_path: Path, epochs: int = 2):
    """A finished tiny run (its loaded recipe, data root and folder) for the damaged-summary tests."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench.recipe import expand_runs
    from finebench.results import RunDir
    from finebench.runner import run_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(epochs=epochs) + "threads = 1\n")
    loaded = load_recipe(recipe)
    run_dir = RunDir(tmp_path / "results", "tiny", expand_runs(loaded)[0].run_id)
    [outcome] = run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    assert outcome.status == "finished"
    return loaded, root, run_dir


def test_a_finished_run_with_a_damaged_summary_is_rebuilt_not_retrained(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1: a damaged summary.json used to stop `run` with advice to --restart, which deleted the
    intact model. Now the rerun rebuilds the summary from config.json, metrics.jsonl and last.pt."""
    from finebench.runner import run_recipe
    import finebench.train.fit as engine  # the fit loop's module, patched below

    loaded, root, run_dir = _finished_tiny_run(tmp_path)
    intact = json.loads(run_dir.summary_path.read_text())
    checkpoint, metrics = run_dir.checkpoint_path.read_bytes(), run_dir.metrics_path.read_bytes()
    run_dir.summary_path.write_text('{"status": "fini')  # cut mid-write by a full disk, say
    assert run_dir.state().kind == "resumable" and run_dir.state().rebuild_summary

    def no_training(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(engine, "_train_epoch", no_training)
    [outcome] = run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    assert outcome.status == "finished"
    rebuilt = json.loads(run_dir.summary_path.read_text())
    assert run_dir.checkpoint_path.read_bytes() == checkpoint and run_dir.metrics_path.read_bytes() == metrics
    for key in ("status", "run_id", "epochs_completed", "final", "best", "params", "flops", "train_time_s",
                "images_per_s", "variant_name", "seed", "started_at"):
        assert rebuilt[key] == intact[key], key
    assert run_dir.state().kind == "finished"


def test_restart_refuses_to_discard_a_run_whose_records_show_every_epoch_done(tmp_path: Path) -> None:
    """Item 1: `--restart` needs `--discard-finished` to throw away a trained model (a readable last.pt of the last epoch)."""
    from finebench.plan import RunSelection
    from finebench.runner import run_recipe

    loaded, root, run_dir = _finished_tiny_run(tmp_path)
    run_dir.summary_path.write_text("not json")
    kept = {path.name: path.read_bytes() for path in run_dir.path.iterdir() if path.is_file()}
    with pytest.raises(FinebenchError, match="holds all 2 epochs done.*--discard-finished"):
        run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True,
                   selection=RunSelection(restart=True))
    assert {path.name: path.read_bytes() for path in run_dir.path.iterdir() if path.is_file()} == kept
    cli = finebench("run", str(tmp_path / "tiny.toml"), "--restart", "--results-dir", str(tmp_path / "results"),
                    "--data-root", str(root), cwd=tmp_path)
    assert cli.returncode == 2 and "--discard-finished" in cli.stderr and "Traceback" not in cli.stderr
    [outcome] = run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True,
                           selection=RunSelection(restart=True, discard_finished=True))
    assert outcome.status == "finished"
    assert run_dir.checkpoint_path.read_bytes() != kept["last.pt"]  # trained again from epoch 1


def test_a_recipe_file_name_that_is_not_utf8_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    """Item 2: `q\\xff.toml` died in the TensorBoard writer mid-run and left the run "running"."""
    from tiny_data import tiny_recipe

    odd = Path(os.fsdecode(bytes(tmp_path) + b"/q\xff.toml"))
    odd.write_text(tiny_recipe(epochs=1))
    result = finebench("run", str(odd), "--results-dir", str(tmp_path / "results"), "--data-root",
                       str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-1500:]
    assert "is not UTF-8 text" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()
    named = finebench("run", str(odd), "--set", "name=q_ok", "--dry-run", "--data-root", str(tmp_path / "data"),
                      cwd=tmp_path)
    assert named.returncode == 0, named.stderr[-1500:]  # a `name` replaces the file's
    spaced = finebench("run", str(odd), "--set", 'name=" x"', "--dry-run", cwd=tmp_path)
    assert spaced.returncode == 2 and "starts or ends with whitespace" in spaced.stderr


def test_report_shows_the_table_when_one_record_has_non_utf8_names(tmp_path: Path) -> None:
    """Item 2: a record written under a non-UTF-8 folder name stopped every report of the folder in pyarrow."""
    from finebench.report.records import load_runs

    _, _, run_dir = _finished_tiny_run(tmp_path, epochs=1)
    summary = json.loads(run_dir.summary_path.read_text())
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/results/q\xff/" + run_dir.path.name.encode()))
    odd.parent.mkdir()
    import shutil

    shutil.copytree(run_dir.path, odd)
    (odd / "summary.json").write_text(json.dumps({**summary, "recipe": "q\udcff", "run_id": "odd"}))
    loaded = load_runs([tmp_path / "results"])
    assert sorted(loaded.runs["recipe"]) == ["q\\xff", "tiny"]
    assert any("not UTF-8 text" in problem for problem in loaded.warnings)
    loaded.runs.to_json()  # the writers of the table accept it
    report = finebench("report", str(tmp_path / "results"), cwd=tmp_path)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr[-1500:]


def test_out_of_memory_is_one_line_naming_the_batch_and_leaves_the_run_resumable(tmp_path: Path) -> None:
    """Item 3: an allocation failure gave a raw allocator traceback. Reproduced for real: the CPU
    allocator under an address-space limit (RLIMIT_AS), the path a CUDA OOM takes too."""
    import resource

    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    (tmp_path / "r.toml").write_text(tiny_recipe(epochs=1) + "threads = 1\n")
    limit = 5 * 2**30

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    args = [sys.executable, "-m", "finebench", "run", "r.toml", "--data-root", str(root), "--results-dir", "results",
            "-q", "--set", "train.batch_size=4000", "--set", "dataset.input_size=160",
            "--set", "model.options.depth=16", "--set", "model.options.width=4"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300, preexec_fn=limited)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "out of memory with train.batch_size 4000" in result.stderr
    assert "--set train.accumulation_steps=2" in result.stderr
    [run_dir] = (tmp_path / "results" / "r").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # not failed: rerun resumes


def test_a_cuda_out_of_memory_error_takes_the_same_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 3 on the CUDA error type (no GPU here), raised while evaluating: one line, the run kept."""
    import torch
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench.results import RunDir
    from finebench.runner import run_recipe
    import finebench.train.fit as engine  # the fit loop's module, patched below

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(epochs=1, extra_train="threads = 1\naccumulation_steps = 2"))
    loaded = load_recipe(recipe)

    def out_of_memory(*args, **kwargs):  # noqa: ANN002, ANN003
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "evaluate", out_of_memory)
    with pytest.raises(FinebenchError, match=r"out of memory with train.batch_size 16 \(8 images per forward pass\)"
                       r".*accumulation_steps=4.*eval_batch_size 40") as raised:
        run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    assert raised.value.exit_code == 1 and "\n" not in str(raised.value)
    [run_dir] = (tmp_path / "results" / "tiny").iterdir()
    assert RunDir.at(run_dir).state().kind in ("new", "resumable") and RunDir.at(run_dir).status() == "running"


def test_dry_run_warns_when_pretrained_weights_are_not_cached_and_run_stops_before_writing(tmp_path: Path) -> None:
    """Item 11: a recipe whose weights are not in the cache passed --dry-run and failed only once its run began."""
    import os as _os

    from tiny_data import prepare_tiny_bars

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    (tmp_path / "r.toml").write_text(RECIPE.replace('backbone = ["timm:resnet10t", "torchvision:resnet18"]',
                                                    'backbone = "torchvision:resnet18"\npretrained = "imagenet"')
                                     )
    env = {**_os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    common = ["--data-root", str(root), "--results-dir", str(tmp_path / "results")]
    dry = subprocess.run([sys.executable, "-m", "finebench", "run", "r.toml", "--dry-run", *common],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr[-1500:]
    assert "warning: model.pretrained = 'imagenet' for torchvision:resnet18" in dry.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in dry.stderr
    run = subprocess.run([sys.executable, "-m", "finebench", "run", "r.toml", *common],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 2 and "--set model.pretrained=none" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "results").exists()


def test_the_pre_flight_check_decodes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: the pre-flight check built the first run's full loaders; on the in-memory path
    that decoded both splits and copied them to the device only to throw them away."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench.data import in_memory
    from finebench.runner import run_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(epochs=1, extra_train="threads = 1"))
    decoded: list[str] = []
    real = in_memory.decoded

    def counted(split_dirs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        decoded.extend(path.name for path in split_dirs)
        return real(split_dirs, *args, **kwargs)

    monkeypatch.setattr(in_memory, "decoded", counted)
    [outcome] = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=root, quiet=True)
    assert outcome.status == "finished" and outcome.summary["data_path"] == "in_memory"
    assert decoded == ["train", "test"]  # once, by the run itself


def test_a_resume_parses_the_summary_and_the_metrics_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: a resumed run read summary.json 3 times and metrics.jsonl 4 times (plan, the lock's
    second look, the runner, the engine). RunDir is the one reader and parses an unchanged file once."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench import results
    from finebench.errors import Interrupted
    from finebench.results import RunDir
    from finebench.runner import run_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(epochs=2, extra_train="threads = 1"))
    loaded = load_recipe(recipe)
    save = RunDir.save_checkpoint

    def save_then_stop(self: RunDir, state) -> None:  # noqa: ANN001
        save(self, state)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    parsed: list[str] = []
    for name in ("parse_summary", "parse_metrics"):
        real = getattr(results, name)
        monkeypatch.setattr(results, name, lambda path, real=real: parsed.append(path.name) or real(path))
    [outcome] = run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    assert outcome.status == "finished" and outcome.summary["epochs_completed"] == 2
    assert sorted(parsed) == ["metrics.jsonl", "summary.json"]


def test_messages_name_what_the_user_gave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 9: a folder as the recipe, an out-of-range list index, a failed write naming our temporary
    file, and a rebuild hint without the --data-root the store lives under."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench.atomic import atomic_write_bytes

    (tmp_path / "recipes").mkdir()
    with pytest.raises(FinebenchError, match="is a folder, expected a recipe .toml file"):
        load_recipe(tmp_path / "recipes")
    (tmp_path / "r.toml").write_text(tiny_recipe(variants=("baseline", "attention")))
    with pytest.raises(FinebenchError, match=r"index 5 is out of range: variants in .*r.toml has 2 entries \(indices 0-1\)"):
        load_recipe(tmp_path / "r.toml", ["variants.5.reg_w=1"])
    with pytest.raises(FinebenchError, match=r"variants is a list, expected an index \(indices 0-1\), got 'x'"):
        load_recipe(tmp_path / "r.toml", ["variants.x.reg_w=1"])

    import os as _os

    def read_only(src, dst):  # noqa: ANN001  (as EROFS would refuse the rename)
        raise OSError(30, "Read-only file system", src, None, dst)

    monkeypatch.setattr(_os, "replace", read_only)
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(tmp_path / "table.md", b"x")
    assert raised.value.filename == str(tmp_path / "table.md") and ".tmp" not in str(raised.value)
    monkeypatch.undo()

    root = prepare_tiny_bars(tmp_path / "elsewhere", 8, 4)
    [arrow] = list((root / "mnist5k" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    run = finebench("run", "r.toml", "--data-root", str(root), "--results-dir", str(tmp_path / "res"), cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-1500:]
    assert f"finebench prepare mnist5k --data-root {root} --force" in run.stderr


def test_output_into_a_pipe_keeps_whole_lines_and_cells(tmp_path: Path) -> None:
    """Item 9: captured output wrapped prepare's counts mid-phrase and cut table names (`attention-ad...`)."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    deep = tmp_path / ("a_rather_long_folder_name_for_the_data_" * 4)
    root = prepare_tiny_bars(deep, 16, 8)
    long_name = "attention-with-a-long-descriptive-name-that-a-table-would-cut-" * 2
    recipe = tiny_recipe(variants=("baseline", "attention")).replace('kind = "attention"',
                                                                     f'kind = "attention"\nname = "{long_name}"')
    (tmp_path / "r.toml").write_text(recipe.replace('backbone = "wrn"', 'backbone = ["wrn", "resnext_cifar"]')
                                     .replace("options = { depth = 10, width = 1 }", ""))
    dry = finebench("run", "r.toml", "--dry-run", "--data-root", str(root), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-1500:]
    assert long_name in dry.stdout and "…" not in dry.stdout
    other = tmp_path / ("another_rather_long_folder_name_" * 4)
    prepared = subprocess.run([sys.executable, "-m", "finebench", "prepare", "mnist5k", "--data-root", str(other)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-1500:]
    assert any(line.startswith("prepared mnist5k in ") and line.endswith("test 1000")
               for line in (prepared.stdout + prepared.stderr).splitlines())
