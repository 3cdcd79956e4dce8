"""Speed measurement helpers and ``finebench bench RECIPE``: interleaving, medians, estimates, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finebench.bench import Timing, bench_recipe, format_table, paired_ratio, time_side_by_side
from finebench.cli import app

torch.set_num_threads(1)

TINY_RECIPE = (
    '[dataset]\nname = "cifar10"\ninput_size = 8\n'
    '[model]\nbackbone = "wrn"\noptions = { depth = 10, width = 1 }\n'
    '[[variants]]\nkind = "baseline"\n'
    '[[variants]]\nkind = "attention"\nattention_depth = 2\nattention_width = 2\n'
    '[train]\nepochs = 3\nbatch_size = 4\nschedule = "constant"\nprecision = "fp32"\n'
)
"""A registered dataset (cifar10: 50,000 official training images) need not be prepared to be timed."""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


def test_timing_reports_the_median_repeat_and_its_spread() -> None:
    timing = Timing((2.0, 1.0, 4.0), items=8)
    assert timing.median_s == 2.0
    assert timing.per_s == 4.0
    assert timing.spread_pct == 150.0


def test_candidates_run_interleaved_in_alternating_order_after_their_warmup() -> None:
    calls: list[str] = []
    timings = time_side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                items=3, warmup=2, repeats=3, calls_per_repeat=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert set(timings) == {"a", "b"}
    assert all(len(t.seconds) == 3 and t.items == 6 for t in timings.values())


def test_paired_ratio_is_the_median_of_the_per_repeat_speed_ratios() -> None:
    fast = Timing((1.0, 2.0, 1.0), items=10)  # 10, 5, 10 items/s
    slow = Timing((2.0, 2.0, 4.0), items=10)  # 5, 5, 2.5 items/s under the same loads
    assert paired_ratio(fast, slow) == 2.0  # ratios 2, 1, 4
    assert paired_ratio(slow, fast) == 0.5


def test_time_side_by_side_rejects_zero_repeats() -> None:
    with pytest.raises(ValueError):
        time_side_by_side({"a": lambda: None}, items=1, repeats=0)


def test_format_table_aligns_columns() -> None:
    lines = format_table(["name", "value"], [["a", 1.5], ["long name", 10]]).splitlines()
    assert lines[0].split() == ["name", "value"]
    assert len({len(line) for line in lines}) == 1


def test_bench_recipe_times_each_variant_and_estimates_the_epoch(recipe: Path, tmp_path: Path) -> None:
    rows = bench_recipe(str(recipe), images=8, data_root=str(tmp_path / "nothing-prepared"))
    assert [row.variant for row in rows] == ["baseline", "attention-ad2-aw2"]
    for row in rows:
        assert (row.batch_size, row.input_size, row.precision, row.train_images) == (4, 8, "fp32", 50_000)
        assert row.images_per_s > 0 and row.step_s > 0
        assert row.epoch_s == pytest.approx(50_000 / row.images_per_s)
        assert row.run_s == pytest.approx(3 * row.epoch_s)
        assert (row.compiled, row.compile_s) == (False, None)  # compile "auto" stays eager on CPU


def test_bench_recipe_applies_overrides_and_only(recipe: Path) -> None:
    rows = bench_recipe(str(recipe), ["train.batch_size=2"], images=2, only=["baseline"])
    assert [(row.variant, row.batch_size) for row in rows] == [("baseline", 2)]


def test_cli_bench_prints_json_rows(recipe: Path) -> None:
    result = CliRunner().invoke(app, ["bench", str(recipe), "--images", "4", "--only", "baseline", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "load average" in report["machine"]
    assert [row["variant"] for row in report["rows"]] == ["baseline"]


def test_cli_bench_prints_a_table_with_the_epoch_estimate(recipe: Path) -> None:
    result = CliRunner().invoke(app, ["bench", str(recipe), "--images", "4", "--only", "baseline"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "img/s" in result.stdout and "50,000" in result.stdout and "epoch" in result.stdout


def test_cli_bench_user_error_is_one_line_and_exit_2(recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    from finebench.cli import main

    monkeypatch.setattr(sys, "argv", ["finebench", "bench", str(recipe), "--images", "0"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--images 0" in err


@pytest.mark.slow
def test_bench_reports_the_compiling_step_apart_from_the_timed_ones(recipe: Path) -> None:
    """As ``fit`` does: the first step of a compiled model compiles; bench times it apart."""
    rows = bench_recipe(str(recipe), ["train.compile=true", "train.channels_last=false"], images=8, only=["baseline"])
    (row,) = rows
    assert row.compiled and not row.channels_last
    assert row.compile_s is not None and row.compile_s > 10 * row.step_s


def test_the_whole_recipe_estimate_is_the_longest_first_makespan_over_the_jobs() -> None:
    from finebench.bench import BenchRow, recipe_estimate

    def row(name: str, run_s: float | None, compile_s: float | None = None) -> BenchRow:
        return BenchRow(name, 32, 32, "fp32", False, 100.0, 0.1, 1.0, compile_s is not None, compile_s, 1000,
                        None if run_s is None else run_s / 10, run_s)

    rows = [row("baseline", 100.0), row("attention", 150.0, compile_s=5.0)]
    runs = {"baseline": 3, "attention": 3}
    serial = recipe_estimate(rows, runs)
    assert serial.seconds == 3 * 100.0 + 3 * (150.0 + 4 * 5.0)
    two = recipe_estimate(rows, runs, jobs=2)
    assert two.seconds == 170.0 * 2 + 100.0  # 170,170,170,100,100,100 longest first: [170+170+100, 170+100+100]
    slowed = recipe_estimate(rows, runs, jobs=6, job_slowdown=1.5)
    assert slowed.seconds == 150.0 * 1.5 + 20.0
    assert recipe_estimate([row("baseline", None)], {"baseline": 1}).seconds is None
    assert "6 job(s)" in slowed.describe()


def test_the_estimate_says_compiled_graphs_only_for_the_variants_that_compiled() -> None:
    from finebench.bench import BenchRow, recipe_estimate

    def row(name: str, compile_s: float | None) -> BenchRow:
        return BenchRow(name, 32, 32, "fp32", False, 100.0, 0.1, 1.0, compile_s is not None, compile_s, 1000,
                        10.0, 100.0)

    eager = recipe_estimate([row("baseline", None), row("attention", None)], {"baseline": 1, "attention": 1})
    assert "compiled graph" not in eager.describe() and "nothing compiled" in eager.describe()
    both = recipe_estimate([row("baseline", 2.0), row("attention", 3.0)], {"baseline": 1, "attention": 1})
    assert "plus 4 compiled graph(s) per run," in both.describe()
    one = recipe_estimate([row("baseline", None), row("attention", 3.0)], {"baseline": 1, "attention": 1})
    assert "plus 4 compiled graph(s) per run of attention," in one.describe()
    assert one.seconds == 100.0 + 100.0 + 4 * 3.0
