"""A peer method trains from a recipe through the CLI beside the baseline: records, a report row,
profile figures (issue 19's smoke check, on the tests' tiny data instead of mnist5k)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow  # about 20 s at rest: three finebench processes (run, report, profile)
def test_a_recipe_trains_baseline_and_bcnn_from_the_cli_with_records_and_profile(tmp_path: Path) -> None:
    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 40, 20)
    recipe = tmp_path / "bcnn.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "bcnn")).replace(
        'kind = "bcnn"', 'kind = "bcnn"\nreduce = 8') + "threads = 1\n")
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "finebench", "run", str(recipe), "--data-root", str(root),
                          "--results-dir", str(results)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summaries = [json.loads(path.read_text()) for path in results.glob("bcnn/*/summary.json")]
    assert sorted(s["variant_name"] for s in summaries) == ["baseline", "bcnn-r8"]
    assert all(s["status"] == "finished" for s in summaries)
    report = subprocess.run([sys.executable, "-m", "finebench", "report", str(results), "--format", "csv"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "bcnn-r8" in report.stdout
    profile = subprocess.run([sys.executable, "-m", "finebench", "profile", str(recipe), "--json"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert profile.returncode == 0, profile.stderr[-2000:]
    rows = {row["label"]: row for row in json.loads(profile.stdout)["rows"]}
    assert rows["bcnn-r8"]["params"] > rows["baseline"]["params"]


@pytest.mark.slow  # about 20 s at rest: a training run and two reports, each its own process
def test_report_predictions_lists_every_prediction_pmg_records_and_names_the_shown_one(tmp_path: Path) -> None:
    """Issue 19: each method records every prediction its paper reports and the table says which it
    shows (PMG: the concatenated head; also each head and the four heads summed)."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "pmg.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "pmg")).replace('kind = "pmg"', 'kind = "pmg"\nfeature_size = 8')
                      + "threads = 1\n")
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "finebench", "run", str(recipe), "--data-root", str(root),
                          "--results-dir", str(results), "-q"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    [summary] = [json.loads(p.read_text()) for p in results.glob("pmg/*/summary.json")
                 if json.loads(p.read_text())["variant"] == "pmg"]
    assert set(summary["final"]["top1_granularity"]) == {"8", "4", "2"} and "top1_combined" in summary["final"]
    report = subprocess.run([sys.executable, "-m", "finebench", "report", str(results), "--predictions", "--format",
                             "csv"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    markdown = subprocess.run([sys.executable, "-m", "finebench", "report", str(results)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300)
    assert "pmg: top-1 is the concatenated head" in markdown.stdout  # said under the summary table
    lines = [line for line in report.stdout.splitlines() if line.startswith("mnist5k") or "pmg-f8" in line]
    sources = [line for line in lines if "pmg-f8" in line]
    assert any("top-1 as shown: the concatenated head" in line for line in sources)
    assert any("head 1 alone" in line for line in sources) and any("logits summed" in line for line in sources)
    assert len(sources) >= 1 + 5  # the summary table's row, then shown + 3 heads + combined


@pytest.mark.slow
def test_ws_dan_and_cal_train_from_the_cli_and_record_their_extra_test_predictions(tmp_path: Path) -> None:
    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 40, 20)
    recipe = tmp_path / "attn.toml"
    text = tiny_recipe(variants=("ws_dan", "cal"), input_size=32)
    recipe.write_text(text.replace('kind = "ws_dan"', 'kind = "ws_dan"\nattentions = 2')
                      .replace('kind = "cal"', 'kind = "cal"\nattentions = 2') + "threads = 1\n")
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "finebench", "run", str(recipe), "--data-root", str(root),
                          "--results-dir", str(results)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    records = {json.loads(path.with_name("summary.json").read_text())["variant_name"]:
               json.loads(path.read_text().splitlines()[-1]) for path in results.glob("attn/*/metrics.jsonl")}
    assert {"top1_raw", "top1_crop"} <= set(records["ws_dan-m2"])
    assert {"top1_raw", "top1_crop", "top1_two_view", "top1_effect_two_view", "top1_effect"} <= set(records["cal-m2"])
