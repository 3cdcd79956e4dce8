"""The report turns hand-written run records into exact tables, whatever else lies in results/."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finebench import report
from finebench.errors import FinebenchError

WRN_PARAMS = 36_480_000
WRN_FLOPS = 5_240_000_000
ATT_PARAMS = 36_960_000  # +1.3158 %
ATT_FLOPS = 5_250_000_000  # +0.1908 %

BASELINE_TOP1 = [96.0, 96.2, 96.1]
ATTENTION_TOP1 = [96.5, 96.7, 96.3]
SE_TOP1 = [96.3]


def write_run(
    root: Path,
    *,
    variant: str,
    variant_name: str,
    seed: int,
    top1: float | None,
    dataset: str = "cifar10",
    backbone_label: str = "WRN-28-10",
    status: str = "finished",
    options: dict[str, Any] | None = None,
    params: int = WRN_PARAMS,
    flops: int = WRN_FLOPS,
    images_per_s: float = 1500.0,
    best_top1: float | None = None,
    module_top1: dict[str, float] | None = None,
    module_flops: dict[str, int] | None = None,
    network_top1: float | None = None,
    epochs: int = 3,
    recipe: str = "wrn_cifar10",
) -> Path:
    """One run folder in the engine's format (records_contract): summary.json and metrics.jsonl."""
    run_id = f"{dataset}-{backbone_label}-{variant_name}-{seed}".lower()
    run_dir = root / recipe / run_id
    run_dir.mkdir(parents=True)
    final = None
    if top1 is not None:
        final = {"epoch": epochs, "test_top1": top1, "test_top5": 99.9, "test_loss": 0.15,
                 "train_loss": 0.01, "network_top1": network_top1, "module_top1": module_top1 or {}}
    summary = {
        "schema": 1, "run_id": run_id, "recipe": recipe, "status": status,
        "failure_reason": "loss became nan at epoch 3 step 17" if status == "failed" else None,
        "dataset": dataset, "num_classes": 10, "backbone": "wrn", "backbone_label": backbone_label,
        "variant": variant, "variant_name": variant_name, "variant_options": options or {},
        "seed": seed, "epochs": epochs, "epochs_completed": epochs if status == "finished" else 2,
        "final": final,
        "best": {"epoch": epochs, "test_top1": best_top1 if best_top1 is not None else top1,
                 "note": "best-epoch test accuracy (optimistic: selected on the test set)"},
        "params": params, "flops": flops, "params_baseline": WRN_PARAMS, "flops_baseline": WRN_FLOPS,
        "module_flops": module_flops or {}, "input_size": 32, "train_time_s": 100.0,
        "images_per_s": images_per_s, "device": "cpu", "precision": "fp32", "channels_last": False,
        "world_size": 1, "torch_version": "2.14.1", "finebench_version": "0.1.0", "git_commit": None,
        "hostname": "test", "started_at": "2026-11-24T20:00:00Z", "finished_at": "2026-11-24T21:00:00Z",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = []
    for epoch in range(1, epochs + 1):
        lines.append(json.dumps({
            "epoch": epoch, "train_loss": 2.0 / epoch, "train_top1": 30.0 * epoch,
            "test_loss": 2.1 / epoch, "test_top1": (top1 or 50.0) - (epochs - epoch),
            "test_top5": 99.0, "lr": 0.1, "epoch_time_s": 10.0, "images_per_s": images_per_s,
            "network_top1": network_top1, "module_top1": module_top1 or {},
        }))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "config.json").write_text(json.dumps({"model": {"backbone": "wrn"}}))
    return run_dir


ATTENTION_OPTIONS = {"attention_depth": 3, "attention_width": 4, "gates": "softmax",
                     "reg_w": 0.001, "output_mode": "mixture"}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Three baseline seeds, three attention seeds, one SE seed, a corrupt record, a failed run."""
    root = tmp_path / "results"
    for seed, top1 in enumerate(BASELINE_TOP1):
        write_run(root, variant="baseline", variant_name="baseline", seed=seed, top1=top1,
                  images_per_s=1500.0 + seed * 30)
    for seed, top1 in enumerate(ATTENTION_TOP1):
        write_run(root, variant="attention", variant_name="attention-ad3-aw4", seed=seed, top1=top1,
                  options=ATTENTION_OPTIONS, params=ATT_PARAMS, flops=ATT_FLOPS, images_per_s=1400.0,
                  best_top1=top1 + 0.2,
                  module_top1={"group2": 93.0 + seed, "group1": 80.0, "group0": 50.0},
                  module_flops={"group2": 5_200_000_000, "group1": 3_500_000_000, "group0": 1_750_000_000},
                  network_top1=95.9)
    write_run(root, variant="se", variant_name="se", seed=0, top1=SE_TOP1[0],
              params=36_600_000, flops=5_240_524_000, images_per_s=1450.0)
    corrupt = root / "wrn_cifar10" / "corrupt-run"
    corrupt.mkdir()
    (corrupt / "summary.json").write_text('{"schema": 1, "run_id": "x", "status": "fini')
    write_run(root, variant="attention", variant_name="attention-ad3-aw4", seed=7, top1=None,
              status="failed", options=ATTENTION_OPTIONS)
    return root


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("|")[1:-1]]


def _row(table, variant_name: str):
    rows = table[table["variant_name"] == variant_name]
    assert len(rows) == 1
    return rows.iloc[0]


def test_load_runs_skips_corrupt_record_with_warning_and_lists_failed(results: Path) -> None:
    runs, failed, warnings = report.load_runs([results])
    assert len(runs) == 7
    assert len(failed) == 1
    assert failed.iloc[0]["failure_reason"] == "loss became nan at epoch 3 step 17"
    assert len(warnings) == 1 and "corrupt-run/summary.json" in warnings[0]


def test_record_missing_a_field_is_skipped_naming_the_field(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=90.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["backbone_label"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    runs, _, warnings = report.load_runs([tmp_path])
    assert runs.empty
    assert "backbone_label" in warnings[0] and str(run_dir / "summary.json") in warnings[0]


def test_running_record_is_skipped_not_counted(tmp_path: Path) -> None:
    write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=None, status="running")
    runs, failed, warnings = report.load_runs([tmp_path])
    assert runs.empty and failed.empty and "running" in warnings[0]


def test_summary_table_means_sample_stds_gains_and_overheads(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    table = report.summary_table(runs)
    baseline, attention, se = (_row(table, name) for name in ("baseline", "attention-ad3-aw4", "se"))
    assert attention["n"] == 3
    assert attention["top1_mean"] == pytest.approx(statistics.mean(ATTENTION_TOP1))
    assert attention["top1_std"] == pytest.approx(statistics.stdev(ATTENTION_TOP1))  # ddof=1: 0.2
    assert attention["baseline_top1"] == pytest.approx(96.1)
    assert attention["delta_pt"] == pytest.approx(0.4)
    assert attention["params_overhead_pct"] == pytest.approx((ATT_PARAMS / WRN_PARAMS - 1) * 100)
    assert attention["flops_overhead_pct"] == pytest.approx((ATT_FLOPS / WRN_FLOPS - 1) * 100)
    assert baseline["images_per_s"] == pytest.approx(1530.0)
    assert se["n"] == 1 and math.isnan(se["top1_std"])
    assert se["delta_pt"] == pytest.approx(0.2)


def test_markdown_shows_exact_numbers(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    text = report.render(report.summary_table(runs), "markdown")
    lines = {line.split("|")[3].strip(): line for line in text.splitlines() if line.startswith("| cifar10")}
    attention = [cell.strip() for cell in lines["attention-ad3-aw4"].split("|")[1:-1]]
    # Dataset, Backbone, Variant, n, Top-1, Baseline, Gain, Params, Params +%, FLOPs, FLOPs +%, img/s
    assert attention == ["cifar10", "WRN-28-10", "attention-ad3-aw4", "3", "96.50 ± 0.20", "96.10",
                         "+0.40", "36.96M", "+1.32", "5.25G", "+0.19", "1,400"]
    se = [cell.strip() for cell in lines["se"].split("|")[1:-1]]
    assert se[3:7] == ["1", "96.30", "96.10", "+0.20"]  # n=1: no ±
    assert "Top-1 (%)" in text.splitlines()[0] and "Gain (pt)" in text.splitlines()[0]


def test_csv_keeps_numbers_numeric(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    rows = list(csv.DictReader(io.StringIO(report.render(report.summary_table(runs), "csv"))))
    attention = next(r for r in rows if r["variant_name"] == "attention-ad3-aw4")
    assert float(attention["top1_mean"]) == pytest.approx(96.5)
    assert float(attention["top1_std"]) == pytest.approx(0.2)
    assert float(attention["delta_pt"]) == pytest.approx(0.4)
    assert float(attention["params_overhead_pct"]) == pytest.approx(1.3158, abs=1e-4)
    assert float(attention["flops_overhead_pct"]) == pytest.approx(0.1908, abs=1e-4)
    assert attention["n"] == "3"


def test_latex_is_booktabs_with_escaped_cells(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    text = report.render(report.summary_table(runs), "latex")
    assert r"\toprule" in text and r"\midrule" in text and r"\bottomrule" in text
    assert r"96.50 $\pm$ 0.20" in text
    assert "+0.40" in text and "+1.32" in text and "+0.19" in text
    assert r"Params +\%" in text and "backbone_label" not in text


def test_json_records(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    records = json.loads(report.render(report.summary_table(runs), "json"))
    attention = next(r for r in records if r["variant_name"] == "attention-ad3-aw4")
    assert attention["top1_mean"] == pytest.approx(96.5) and attention["n"] == 3


def test_error_mode_reports_error_and_its_change(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    table = report.summary_table(runs, error=True)
    attention = _row(table, "attention-ad3-aw4")
    assert attention["error_mean"] == pytest.approx(3.5)
    assert attention["delta_pt"] == pytest.approx(-0.4)
    text = report.render(table, "markdown")
    assert "Error (%)" in text and "Δ error (pt)" in text and "3.50 ± 0.20" in text


def test_missing_baseline_shows_dash_not_crash(tmp_path: Path) -> None:
    write_run(tmp_path, variant="attention", variant_name="attention-ad3-aw4", seed=0, top1=80.0,
              options=ATTENTION_OPTIONS, dataset="cub200", backbone_label="WRN-50-2")
    runs, _, _ = report.load_runs([tmp_path])
    table = report.summary_table(runs)
    assert math.isnan(table.iloc[0]["delta_pt"])
    cells = [cell.strip() for cell in report.render(table, "markdown").splitlines()[2].split("|")[1:-1]]
    assert cells[5:7] == ["—", "—"]  # Baseline, Gain


def test_by_ablation_axes_with_aliases(tmp_path: Path) -> None:
    for seed, top1 in enumerate([90.0, 92.0]):
        write_run(tmp_path, variant="baseline", variant_name="baseline", seed=seed, top1=top1)
    for depth, width, top1 in [(1, 2, 91.5), (3, 4, 93.0), (3, 4, 94.0)]:
        options = {**ATTENTION_OPTIONS, "attention_depth": depth, "attention_width": width}
        write_run(tmp_path, variant="attention", variant_name=f"attention-ad{depth}-aw{width}",
                  seed=int(top1), top1=top1, options=options)
    runs, _, _ = report.load_runs([tmp_path])
    table = report.summary_table(runs, by=["dataset", "AD", "AW"])
    assert list(table.columns[:4]) == ["dataset", "attention_depth", "attention_width", "variant_name"]
    ad3 = table[table["attention_depth"] == 3].iloc[0]
    assert ad3["top1_mean"] == pytest.approx(93.5) and ad3["delta_pt"] == pytest.approx(2.5)
    lines = report.render(table, "markdown").splitlines()
    assert _cells(lines[0])[:4] == ["Dataset", "AD", "AW", "Variant"]
    assert _cells(lines[2])[:7] == ["cifar10", "—", "—", "baseline", "2", "91.00 ± 1.41", "91.00"]
    assert _cells(lines[4])[:7] == ["cifar10", "3", "4", "attention-ad3-aw4", "2", "93.50 ± 0.71", "91.00"]
    with pytest.raises(FinebenchError, match="'depth'"):
        report.summary_table(runs, by=["depth"])


def test_reference_numbers_appear_beside_matching_rows(tmp_path: Path) -> None:
    write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=95.8)
    write_run(tmp_path, variant="attention", variant_name="attention-ad3-aw4", seed=0, top1=96.2,
              options=ATTENTION_OPTIONS)
    write_run(tmp_path, variant="attention", variant_name="attention-ad1-aw2", seed=0, top1=96.0,
              options={**ATTENTION_OPTIONS, "attention_depth": 1, "attention_width": 2})
    runs, _, _ = report.load_runs([tmp_path])
    table = report.summary_table(runs, reference=report.load_reference())
    assert _row(table, "attention-ad3-aw4")["reference_top1"] == pytest.approx(96.55)
    assert _row(table, "baseline")["reference_top1"] == pytest.approx(96.10)
    assert _row(table, "attention-ad3-aw4")["reference_selection"] == "best-epoch"
    assert math.isnan(_row(table, "attention-ad1-aw2")["reference_top1"])  # the authors' AD/AW differ
    text = report.render(table, "markdown")
    assert "Paper" in text and "best-epoch" in text
    error_table = report.summary_table(runs, reference=report.load_reference(), error=True)
    assert _row(error_table, "attention-ad3-aw4")["reference_error"] == pytest.approx(3.45)


def test_reference_distinguishes_dropout_from_config(tmp_path: Path) -> None:
    plain = write_run(tmp_path, variant="attention", variant_name="attention", seed=0, top1=96.0,
                      backbone_label="WRN-40-10", options=ATTENTION_OPTIONS)
    dropped = write_run(tmp_path, variant="attention", variant_name="attention-dropout", seed=0,
                        top1=96.4, backbone_label="WRN-40-10", options=ATTENTION_OPTIONS)
    (dropped / "config.json").write_text(json.dumps({"model": {"backbone_options": {"dropout": 0.3}}}))
    assert plain.exists()
    runs, _, _ = report.load_runs([tmp_path])
    table = report.summary_table(runs, reference=report.load_reference())
    assert _row(table, "attention")["reference_top1"] == pytest.approx(96.52)
    assert _row(table, "attention-dropout")["reference_top1"] == pytest.approx(96.86)


def test_every_shipped_reference_number_is_marked_best_epoch() -> None:
    reference = report.load_reference()
    assert set(reference["selection"]) == {"best-epoch"}
    assert reference["source"].notna().all()
    assert len(reference) == 13


def test_early_prediction_table_orders_modules_by_cost(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    table = report.early_prediction_table(runs)
    assert list(table["source"]) == ["group0", "group1", "group2", "network classifier", "full model"]
    group2 = table.iloc[2]
    assert group2["top1_mean"] == pytest.approx(94.0) and group2["top1_std"] == pytest.approx(1.0)
    assert group2["flops_pct_of_full"] == pytest.approx(5.2 / 5.25 * 100)
    text = report.render(table, "markdown")
    assert "94.00 ± 1.00" in text and "99.0" in text


def test_best_selection_uses_best_epoch_accuracy(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    table = report.summary_table(runs, selection="best")
    assert _row(table, "attention-ad3-aw4")["top1_mean"] == pytest.approx(96.7)
    assert "best-epoch" in report.table_note(table)


def test_cli_report_writes_file_and_warns_about_corrupt_record(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "table.csv"
    done = subprocess.run(
        [sys.executable, "-m", "finebench", "report", str(results), "--format", "csv", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "corrupt-run" in done.stderr and "failed" in done.stderr.lower()
    rows = list(csv.DictReader(out.open()))
    assert {r["variant_name"] for r in rows} == {"baseline", "attention-ad3-aw4", "se"}


def test_cli_report_piped_markdown_is_plain(results: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "finebench", "report", str(results), "--reference", "--early"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| attention-ad3-aw4 " in done.stdout.replace("|  ", "| ") or "attention-ad3-aw4" in done.stdout
    assert "96.50 ± 0.20" in done.stdout and "| full model" in done.stdout


def test_cli_report_unknown_by_column_is_one_line_error(results: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "finebench", "report", str(results), "--by", "nonsense"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "nonsense" in done.stderr and "Traceback" not in done.stderr


def test_same_run_found_twice_counts_once(results: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(results / "wrn_cifar10", tmp_path / "copy" / "wrn_cifar10")
    runs, _, warnings = report.load_runs([results, tmp_path / "copy"])
    assert len(runs) == 7
    assert sum("already read" in w for w in warnings) == 8  # 7 runs + the failed one


def test_missing_results_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match="no such file or folder"):
        report.load_runs([tmp_path / "typo"])


def test_no_runs_renders_a_note_not_a_crash(tmp_path: Path) -> None:
    runs, failed, _ = report.load_runs([tmp_path])
    table = report.summary_table(runs)
    assert report.render(table, "markdown") == "(no runs)\n"
    assert report.render(report.early_prediction_table(runs), "csv").startswith("dataset,")


def test_rich_table_for_terminals_has_every_column(results: Path) -> None:
    from rich.console import Console

    runs, _, _ = report.load_runs([results])
    table = report.summary_table(runs)
    console = Console(record=True, width=250)
    console.print(report.rich_table(report.format_table(table), caption=report.table_note(table)))
    text = console.export_text()
    assert "96.50 ± 0.20" in text and "Params +%" in text and "ddof=1" in text


def test_reference_matches_either_name_of_a_backbone(tmp_path: Path) -> None:
    write_run(tmp_path, variant="attention", variant_name="attention", seed=0, top1=83.0,
              dataset="cub200", backbone_label="wide_resnet50_2", options=ATTENTION_OPTIONS)
    runs, _, _ = report.load_runs([tmp_path])
    table = report.summary_table(runs, reference=report.load_reference())
    assert table.iloc[0]["reference_top1"] == pytest.approx(83.64)


def test_reference_file_missing_a_column_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "ref.csv"
    bad.write_text("dataset,backbone_label,value\ncifar10,WRN-28-10,96\n")
    with pytest.raises(FinebenchError, match=r"ref.csv: missing column\(s\) variant"):
        report.load_reference([bad])


def test_wide_layout_one_row_per_dataset_and_backbone(results: Path) -> None:
    runs, _, _ = report.load_runs([results])
    lines = report.render(report.summary_table(runs), "markdown", wide=True).splitlines()
    assert len(lines) == 3  # header, rule, one dataset × backbone row
    header, row = _cells(lines[0]), _cells(lines[2])
    cells = dict(zip(header, row))
    assert cells["baseline top-1"] == "96.10 ± 0.10 (n=3)"
    assert cells["attention-ad3-aw4 top-1"] == "96.50 ± 0.20 (n=3)"
    assert cells["attention-ad3-aw4 gain"] == "+0.40"
    assert cells["attention-ad3-aw4 params/FLOPs +%"] == "+1.32 / +0.19"
    assert cells["se top-1"] == "96.30 (n=1)" and cells["se gain"] == "+0.20"
    with_paper = report.render(report.summary_table(runs, reference=report.load_reference()), wide=True)
    paper = dict(zip(_cells(with_paper.splitlines()[0]), _cells(with_paper.splitlines()[2])))
    assert paper["attention-ad3-aw4 paper"] == "96.55" and paper["se paper"] == "—"
    latex = report.render(report.summary_table(runs, error=True), "latex", wide=True)
    assert r"3.50 $\pm$ 0.20 (n=3)" in latex and "-0.40" in latex


def test_reference_value_that_is_not_a_number_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "ref.csv"
    header = ",".join(report.REFERENCE_COLUMNS)
    bad.write_text(f"{header}\ncifar10,WRN-28-10,baseline,,,0,top1,96.1,best-epoch,log\n"
                   "cifar10,WRN-28-10,attention,3,4,0,top1,n/a,best-epoch,log\n")
    with pytest.raises(FinebenchError, match=r"ref.csv, line 3: value 'n/a' is not a number"):
        report.load_reference([bad])
