"""The report turns hand-written run records into exact tables, whatever else lies in results/.

Every statistic is checked against a value computed here by its textbook formula (or a printed
table value), not by the code under test.
"""

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
T_975 = {2: 4.302653, 4: 2.776445}  # Student t 97.5% quantiles (printed tables), df = n − 1
# Per-seed confusion matrices of the attention runs (rows: true class): recalls 2/3, 1, 1/2 and so on.
CONFUSIONS = [[[2, 1, 0], [0, 4, 0], [1, 0, 1]],
              [[3, 0, 0], [1, 3, 0], [0, 0, 2]],
              [[1, 1, 1], [0, 4, 0], [0, 1, 1]]]
ATTENTION_OPTIONS = {"attention_depth": 3, "attention_width": 4, "gates": "softmax",
                     "reg_w": 0.001, "output_mode": "mixture"}


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
    lr: float = 0.1,
    fold: int | None = None,
    dropout: float = 0.0,
    confusion: list[list[int]] | None = None,
    top5: float = 99.9,
) -> Path:
    """One run folder in the engine's format: summary.json, config.json, metrics.jsonl (and confusion.json)."""
    run_id = f"{dataset}-{backbone_label}-{variant_name}-{seed}-{lr}-{fold}".lower()
    run_dir = root / recipe / run_id
    run_dir.mkdir(parents=True)
    final = None
    if top1 is not None:
        final = {"epoch": epochs, "test_top1": top1, "test_top5": top5, "test_loss": 0.15,
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
        "images_per_s": images_per_s, "device": "cpu", "precision": "fp32",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = []
    for epoch in range(1, epochs + 1):
        lines.append(json.dumps({
            "epoch": epoch, "train_loss": 2.0 / epoch + seed * 0.1, "train_top1": 30.0 * epoch,
            "test_loss": 2.1 / epoch, "test_top1": (top1 or 50.0) - (epochs - epoch),
            "test_top5": 99.0, "lr": lr, "epoch_time_s": 10.0, "images_per_s": images_per_s,
            "network_top1": network_top1, "module_top1": module_top1 or {},
        }))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    config = {"recipe": recipe, "seed": seed,
              "dataset": {"name": dataset, "root": f"/data/{seed}", "fold": fold,
                          "train_split": "train" if fold is None else "+".join(f"fold{i}" for i in range(5) if i != fold),
                          "test_split": "test" if fold is None else f"fold{fold}"},
              "model": {"backbone": "wrn", "options": {"dropout": dropout}},
              "variant": {"kind": variant, "name": variant_name, "options": options or {}},
              "train": {"lr": lr, "epochs": epochs, "workers": seed}}
    (run_dir / "config.json").write_text(json.dumps(config))
    if confusion is not None:
        (run_dir / "confusion.json").write_text(json.dumps({"matrix": confusion}))
    return run_dir


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Three baseline seeds, three attention seeds, one SE seed, a corrupt record, a failed run, a stopped run."""
    root = tmp_path / "results"
    for seed, top1 in enumerate(BASELINE_TOP1):
        write_run(root, variant="baseline", variant_name="baseline", seed=seed, top1=top1,
                  images_per_s=1500.0 + seed * 30)
    for seed, top1 in enumerate(ATTENTION_TOP1):
        write_run(root, variant="attention", variant_name="attention-ad3-aw4", seed=seed, top1=top1,
                  options=ATTENTION_OPTIONS, params=ATT_PARAMS, flops=ATT_FLOPS, images_per_s=1400.0,
                  best_top1=top1 + 0.2, confusion=CONFUSIONS[seed],
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
    stopped = write_run(root, variant="attention", variant_name="attention-ad3-aw4", seed=8, top1=91.5,
                        status="running", options=ATTENTION_OPTIONS)
    (stopped / "last.pt").write_bytes(b"")  # killed after its second epoch's checkpoint: resumable
    return root


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("|")[1:-1]]


def _row(table, variant_name: str, **where: Any):
    rows = table[table["variant_name"] == variant_name]
    for column, value in where.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1
    return rows.iloc[0]


def _markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = _cells(lines[0])
    return [dict(zip(header, _cells(line))) for line in lines[2:]]


# ---- records ---------------------------------------------------------------------------------


def test_load_runs_skips_corrupt_record_and_lists_failed_and_running_runs(results: Path) -> None:
    loaded = report.load_runs([results])
    assert len(loaded.runs) == 7
    assert loaded.failed.iloc[0]["failure_reason"] == "loss became nan at epoch 3 step 17"
    assert len(loaded.warnings) == 1 and "corrupt-run/summary.json" in loaded.warnings[0]
    (line,) = report.running_lines(loaded.running)
    assert "seed 8: resumable (stopped; rerunning its recipe goes on from the last saved epoch), epoch 2/3 done, " \
        "last test top-1 91.50" in line


def test_record_missing_a_field_is_skipped_naming_the_field(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=90.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["backbone_label"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    loaded = report.load_runs([tmp_path])
    assert loaded.runs.empty
    assert "backbone_label" in loaded.warnings[0] and str(run_dir / "summary.json") in loaded.warnings[0]


# ---- statistics ------------------------------------------------------------------------------


def test_means_carry_a_student_t_interval_and_one_run_has_none(results: Path) -> None:
    table = report.summary_table(report.load_runs([results]).runs)
    attention, se = _row(table, "attention-ad3-aw4"), _row(table, "se")
    std = statistics.stdev(ATTENTION_TOP1)
    assert attention["n"] == 3
    assert attention["top1_mean"] == pytest.approx(statistics.mean(ATTENTION_TOP1))
    assert attention["top1_std"] == pytest.approx(std)
    assert attention["top1_ci"] == pytest.approx(T_975[2] * std / math.sqrt(3), rel=1e-6)
    assert se["n"] == 1 and math.isnan(se["top1_std"]) and math.isnan(se["top1_ci"])
    assert attention["params_overhead_pct"] == pytest.approx((ATT_PARAMS / WRN_PARAMS - 1) * 100)
    assert attention["flops_overhead_pct"] == pytest.approx((ATT_FLOPS / WRN_FLOPS - 1) * 100)


def test_gain_is_the_paired_difference_by_seed_with_its_interval_and_t_test(results: Path) -> None:
    table = report.summary_table(report.load_runs([results]).runs)
    attention = _row(table, "attention-ad3-aw4")
    differences = [a - b for a, b in zip(ATTENTION_TOP1, BASELINE_TOP1)]  # 0.5, 0.5, 0.2
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    t = mean / (sd / math.sqrt(3))
    # Two-sided p of a t statistic with 2 degrees of freedom, in closed form: 1 − |t| / sqrt(t² + 2).
    assert attention["delta_pt"] == pytest.approx(mean)
    assert attention["delta_ci"] == pytest.approx(T_975[2] * sd / math.sqrt(3), rel=1e-6)
    assert attention["p_value"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-9)
    assert attention["n_pairs"] == 3 and attention["unpaired"] == 0
    assert bool(attention["significant"]) == (abs(mean) > T_975[2] * sd / math.sqrt(3))
    se = _row(table, "se")  # seed 0 only: one pair, no interval, no test
    assert se["n_pairs"] == 1 and se["delta_pt"] == pytest.approx(96.3 - 96.0) and math.isnan(se["p_value"])


def test_mean_per_class_accuracy_comes_from_the_saved_confusion_matrices(results: Path) -> None:
    table = report.summary_table(report.load_runs([results]).runs)
    per_run = []
    for matrix in CONFUSIONS:
        recalls = [row[i] / sum(row) for i, row in enumerate(matrix)]
        per_run.append(100 * sum(recalls) / len(recalls))
    attention = _row(table, "attention-ad3-aw4")
    assert attention["class_top1_mean"] == pytest.approx(statistics.mean(per_run))
    assert attention["class_top1_ci"] == pytest.approx(T_975[2] * statistics.stdev(per_run) / math.sqrt(3), rel=1e-6)
    assert math.isnan(_row(table, "baseline")["class_top1_mean"])  # no matrix saved


def test_configurations_that_share_seeds_are_never_pooled(results: Path) -> None:
    for seed, top1 in enumerate([60.0, 61.0, 62.0]):
        write_run(results, variant="baseline", variant_name="baseline", seed=seed, top1=top1, lr=0.5)
    table = report.summary_table(report.load_runs([results]).runs)
    slow, fast = _row(table, "baseline", setting="train.lr=0.1"), _row(table, "baseline", setting="train.lr=0.5")
    assert slow["n"] == 3 and slow["top1_mean"] == pytest.approx(96.1)
    assert fast["n"] == 3 and fast["top1_mean"] == pytest.approx(61.0)
    # The attention runs (lr 0.1) pair with the lr 0.1 baseline only.
    assert _row(table, "attention-ad3-aw4")["delta_pt"] == pytest.approx(0.4)
    assert any("train.lr" in note and "separate rows" in note for note in table.attrs["notes"])
    assert "train.lr" in report.table_note(table)
    by_lr = report.summary_table(report.load_runs([results]).runs, by=["dataset", "train.lr"])
    assert set(zip(by_lr["train.lr"], by_lr["variant_name"])) >= {(0.1, "baseline"), (0.5, "baseline")}
    assert "setting" not in by_lr


def test_k_fold_runs_pool_over_folds_and_pair_by_seed_and_fold(tmp_path: Path) -> None:
    base = [70.0, 72.0, 71.0, 69.0, 73.0]
    gains = [1.0, 0.5, 1.5, 0.0, 1.0]
    for fold in range(5):
        write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=base[fold], fold=fold,
                  dataset="adience")
        write_run(tmp_path, variant="attention", variant_name="attention", seed=0, top1=base[fold] + gains[fold],
                  fold=fold, dataset="adience", options=ATTENTION_OPTIONS)
    table = report.summary_table(report.load_runs([tmp_path]).runs)
    attention = _row(table, "attention")
    assert attention["n"] == 5 and attention["n_pairs"] == 5
    assert attention["delta_pt"] == pytest.approx(statistics.mean(gains))
    assert attention["delta_ci"] == pytest.approx(T_975[4] * statistics.stdev(gains) / math.sqrt(5), rel=1e-6)
    assert "folds" in report.table_note(table) and "seed and fold" in report.table_note(table)


# ---- renderers -------------------------------------------------------------------------------


def test_markdown_shows_mean_ci_gain_p_and_per_class(results: Path) -> None:
    table = report.summary_table(report.load_runs([results]).runs)
    rows = {row["Variant"]: row for row in _markdown_rows(report.render(table, "markdown"))}
    attention = rows["attention-ad3-aw4"]
    assert attention["Top-1"] == "96.50 ± 0.50" and attention["Gain"] == "+0.40 ± 0.43"
    assert attention["p"] == "0.057" and attention["Class"] == "75.00 ± 38.42"
    assert attention["Params"] == "36.96M" and attention["ΔP%"] == "+1.32" and attention["ΔF%"] == "+0.19"
    assert rows["se"]["Top-1"] == "96.30" and rows["se"]["Gain"] == "+0.30"
    assert "img/s" not in attention  # throughput only with --speed
    assert "img/s" in _markdown_rows(report.render(report.summary_table(report.load_runs([results]).runs, speed=True)))[0]


def test_flops_keep_the_digits_that_tell_variants_apart(tmp_path: Path) -> None:
    write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=90.0, flops=41_230_000)
    write_run(tmp_path, variant="se", variant_name="se", seed=0, top1=90.5, flops=45_870_000)
    write_run(tmp_path, variant="cbam", variant_name="cbam", seed=0, top1=90.5, flops=45_874_000)
    text = report.render(report.summary_table(report.load_runs([tmp_path]).runs))
    flops = {row["Variant"]: row["FLOPs"] for row in _markdown_rows(text)}
    assert flops == {"baseline": "0.041230G", "se": "0.045870G", "cbam": "0.045874G"}
    assert [row["Params"] for row in _markdown_rows(text)] == ["36.48M"] * 3


def test_csv_and_json_keep_every_number(results: Path) -> None:
    table = report.summary_table(report.load_runs([results]).runs)
    rows = list(csv.DictReader(io.StringIO(report.render(table, "csv"))))
    attention = next(r for r in rows if r["variant_name"] == "attention-ad3-aw4")
    assert float(attention["top1_ci"]) == pytest.approx(0.4968, abs=1e-4)
    assert float(attention["delta_pt"]) == pytest.approx(0.4) and float(attention["p_value"]) == pytest.approx(0.0572, abs=1e-4)
    assert attention["n"] == "3" and attention["significant"] == "False"
    records = json.loads(report.render(table, "json"))
    attention = next(r for r in records if r["variant_name"] == "attention-ad3-aw4")
    assert attention["class_top1_mean"] == pytest.approx(75.0) and attention["n_pairs"] == 3


def test_latex_shows_mean_ci_and_marks_significance(tmp_path: Path) -> None:
    for seed, (b, a) in enumerate([(90.0, 91.0), (90.5, 91.4), (91.0, 92.1)]):
        write_run(tmp_path, variant="baseline", variant_name="baseline", seed=seed, top1=b)
        write_run(tmp_path, variant="attention", variant_name="attention", seed=seed, top1=a, options=ATTENTION_OPTIONS)
    table = report.summary_table(report.load_runs([tmp_path]).runs)
    assert bool(_row(table, "attention")["significant"])
    text = report.render(table, "latex")
    assert r"\toprule" in text and r"\bottomrule" in text
    assert r"+1.00 $\pm$ 0.25$^{*}$" in text and r"$\Delta$P\%" in text and "ttest_rel" in text


def test_error_mode_reports_error_and_its_change(results: Path) -> None:
    table = report.summary_table(report.load_runs([results]).runs, error=True)
    attention = _row(table, "attention-ad3-aw4")
    assert attention["error_mean"] == pytest.approx(3.5) and attention["delta_pt"] == pytest.approx(-0.4)
    rows = {row["Variant"]: row for row in _markdown_rows(report.render(table))}
    assert rows["attention-ad3-aw4"]["Error"] == "3.50 ± 0.50" and rows["attention-ad3-aw4"]["ΔErr"] == "-0.40 ± 0.43"


def test_terminal_table_fits_80_columns_without_cutting_cells(results: Path) -> None:
    from rich.console import Console

    table = report.summary_table(report.load_runs([results]).runs, reference=report.load_reference())
    for text in (report.format_table(table), report.wide_view(table)):
        console = Console(record=True, width=80)
        for part in report.terminal_tables(text, 80, "finebench report", report.table_note(table)):
            console.print(part)
        output = console.export_text()
        assert "…" not in output and max(len(line) for line in output.splitlines()) <= 80
        assert "cifar10" in output and "96.50 ± 0.50" in output and "+0.40 ± 0.43" in output
        assert "96.32" in output and "+0.19" in output


def test_piped_report_takes_the_wide_layout_only_where_it_fits_the_readers_width(tmp_path: Path) -> None:
    """Issue 27: with seven variants the default report was about 820 characters wide."""
    from rich.console import Console

    variants = ("baseline", "se", "cbam", "eca", "bcnn", "mcl", "pmg")
    for variant in variants:
        for seed in range(2):
            write_run(tmp_path, variant=variant, variant_name=variant, seed=seed, top1=90.0 + seed)
    table = report.summary_table(report.load_runs([tmp_path]).runs)
    unbounded = report.fitted_markdown(table, True, None)  # a log or a file: no width to fit
    assert len(_markdown_rows(unbounded)) == 1 and max(map(len, unbounded.splitlines())) > 500
    for width in (200, 120):
        fitted = report.fitted_markdown(table, True, width)
        assert [row["Variant"] for row in _markdown_rows(fitted)] == ["baseline", *sorted(variants[1:])]
        assert max(len(line) for line in fitted.splitlines()) <= 130  # the long layout's own width
    runs = report.load_runs([tmp_path]).runs
    two = report.summary_table(runs[runs["variant"].isin(["baseline", "se"])])
    assert len(_markdown_rows(report.fitted_markdown(two, True, 200))) == 1  # two variants fit: the paper's layout

    def console(terminal: bool, width: int) -> Console:
        return Console(file=io.StringIO(), force_terminal=terminal, width=width)

    assert report.reader_width(console(True, 100), console(True, 90)) == 100
    assert report.reader_width(console(False, 100), console(True, 90)) == 90  # piped, e.g. into less
    assert report.reader_width(console(False, 100), console(False, 90)) is None

def test_wide_layout_one_row_per_dataset_and_backbone(results: Path) -> None:
    rows = _markdown_rows(report.render(report.summary_table(report.load_runs([results]).runs), wide=True))
    assert len(rows) == 1
    cells = rows[0]
    assert cells["baseline top-1"] == "96.10 ± 0.25 (n=3)"
    assert cells["attention-ad3-aw4 top-1"] == "96.50 ± 0.50 (n=3)"
    assert cells["attention-ad3-aw4 gain"] == "+0.40 ± 0.43" and cells["attention-ad3-aw4 p"] == "0.057"
    assert cells["attention-ad3-aw4 ΔP/ΔF%"] == "+1.32 / +0.19"
    assert cells["se top-1"] == "96.30 (n=1)"


# ---- the authors' numbers (issue 11 §4) -----------------------------------------------------------


def _reference_runs(root: Path) -> None:
    write_run(root, variant="baseline", variant_name="baseline", seed=0, top1=95.8, best_top1=96.0)
    write_run(root, variant="attention", variant_name="attention-ad3-aw4", seed=0, top1=96.2, best_top1=96.4,
              options=ATTENTION_OPTIONS)
    write_run(root, variant="attention", variant_name="attention-ad1-aw2", seed=0, top1=96.0,
              options={**ATTENTION_OPTIONS, "attention_depth": 1, "attention_width": 2})
    write_run(root, variant="attention", variant_name="attention-sigmoid", seed=0, top1=96.1,
              options={**ATTENTION_OPTIONS, "gates": "sigmoid"})


def test_reference_puts_the_authors_last_epoch_beside_our_final_epoch(tmp_path: Path) -> None:
    _reference_runs(tmp_path)
    table = report.summary_table(report.load_runs([tmp_path]).runs, reference=report.load_reference())
    assert _row(table, "attention-ad3-aw4")["reference_top1"] == pytest.approx(96.32)
    assert _row(table, "baseline")["reference_top1"] == pytest.approx(95.93)
    assert _row(table, "attention-ad3-aw4")["reference_selection"] == "last-epoch"
    assert "wrn_28_10_ad=3_aw=4" in _row(table, "attention-ad3-aw4")["reference_source"]
    # No log states these settings: no number beside them, not even the nearest one.
    assert math.isnan(_row(table, "attention-ad1-aw2")["reference_top1"])
    assert math.isnan(_row(table, "attention-sigmoid")["reference_top1"])
    assert "last epoch" in report.table_note(table)


def test_reference_with_best_puts_best_beside_best(tmp_path: Path) -> None:
    _reference_runs(tmp_path)
    table = report.summary_table(report.load_runs([tmp_path]).runs, reference=report.load_reference(),
                                 selection="best")
    attention = _row(table, "attention-ad3-aw4")
    assert attention["top1_mean"] == pytest.approx(96.4) and attention["reference_top1"] == pytest.approx(96.55)
    assert _row(table, "baseline")["reference_top1"] == pytest.approx(96.10)
    assert attention["reference_selection"] == "best-epoch" and "best-epoch" in report.table_note(table)


def test_reference_note_describes_the_reference_file_used(tmp_path: Path) -> None:
    """Issue 27: with --reference-file peers.csv the note still spoke of the authors' training logs."""
    _reference_runs(tmp_path / "results")
    runs = report.load_runs([tmp_path / "results"]).runs
    default = report.table_note(report.summary_table(runs, reference=report.load_reference()))
    assert "Paper: the last epoch's value from the authors' training logs in attend_and_rectify.csv" in default
    peers = tmp_path / "peers.csv"
    peers.write_text(",".join(report.REFERENCE_COLUMNS) + "\n"
                     + "cifar10,WRN-28-10,baseline,,,,,,0,top1,last-epoch,95.5,\"Smith et al. 2024, Table 2\"\n")
    note = report.table_note(report.summary_table(runs, reference=report.load_reference([peers])))
    assert "Paper: the last epoch's value from the numbers cited in peers.csv" in note and "log" not in note
    shipped = report.load_reference([report.reference.DEFAULT_REFERENCE_DIR / "papers" / "peers.csv"])
    note = report.table_note(report.summary_table(runs, reference=shipped))
    assert "Paper: no last epoch's value from the numbers cited in peers.csv" in note and "log" not in note

def test_reference_tells_dropout_and_reg_weight_apart(tmp_path: Path) -> None:
    write_run(tmp_path, variant="attention", variant_name="plain", seed=0, top1=96.0, backbone_label="WRN-40-10",
              options=ATTENTION_OPTIONS)
    write_run(tmp_path, variant="attention", variant_name="dropout", seed=0, top1=96.4, backbone_label="WRN-40-10",
              options=ATTENTION_OPTIONS, dropout=0.3)
    write_run(tmp_path, variant="attention", variant_name="c100", seed=0, top1=81.0, backbone_label="WRN-40-10",
              dataset="cifar100", options={**ATTENTION_OPTIONS, "reg_w": 0.0})
    write_run(tmp_path, variant="attention", variant_name="c100-reg", seed=0, top1=81.0, backbone_label="WRN-40-10",
              dataset="cifar100", options=ATTENTION_OPTIONS)
    table = report.summary_table(report.load_runs([tmp_path]).runs, reference=report.load_reference())
    assert _row(table, "plain")["reference_top1"] == pytest.approx(96.34)
    assert _row(table, "dropout")["reference_top1"] == pytest.approx(96.67)
    assert _row(table, "c100")["reference_top1"] == pytest.approx(81.04)
    assert math.isnan(_row(table, "c100-reg")["reference_top1"])


def test_reference_shows_imagenet_top5_and_hides_a_different_protocol(tmp_path: Path) -> None:
    options = {**ATTENTION_OPTIONS, "attention_width": 2, "gates": "sigmoid"}
    write_run(tmp_path, variant="attention", variant_name="attention", seed=0, top1=78.9, top5=94.3,
              dataset="imagenet", backbone_label="resnext50_32x4d", options=options)
    write_run(tmp_path, variant="attention", variant_name="attention-food", seed=0, top1=85.0,
              dataset="uec_food100", backbone_label="wide_resnet50_2", options={**ATTENTION_OPTIONS, "attention_width": 2})
    table = report.summary_table(report.load_runs([tmp_path]).runs, reference=report.load_reference())
    imagenet = _row(table, "attention")
    assert imagenet["reference_top1"] == pytest.approx(79.15) and imagenet["reference_top5"] == pytest.approx(94.55)
    assert math.isnan(_row(table, "attention-food")["reference_top1"])
    rows = {row["Variant"]: row for row in _markdown_rows(report.render(table))}
    assert rows["attention"]["Top-5"] == "94.30" and rows["attention"]["Paper top-5"] == "94.55"
    assert "uec_food100: the authors' numbers are not shown" in report.table_note(table)


def test_every_reference_row_states_its_settings_and_both_selections() -> None:
    reference = report.load_reference()
    attention = reference[reference["variant"] == "attention"]
    for column in ("attention_depth", "attention_width", "gates", "output", "reg_weight", "dropout"):
        assert attention[column].notna().all(), column
    assert reference["dropout"].notna().all() and reference["source"].notna().all()
    keys = ["dataset", "backbone_label", "variant", "dropout", "reg_weight", "metric"]
    selections = reference.groupby(keys, dropna=False)["selection"].apply(sorted)
    assert all(s == ["best-epoch", "last-epoch"] for s in selections)


def test_reference_file_problems_are_user_errors_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "ref.csv"
    bad.write_text("dataset,backbone_label,value\ncifar10,WRN-28-10,96\n")
    with pytest.raises(FinebenchError, match=r"ref.csv: missing column\(s\) variant"):
        report.load_reference([bad])
    header = ",".join(report.REFERENCE_COLUMNS)
    bad.write_text(f"{header}\ncifar10,WRN-28-10,baseline,,,,,,0,top1,last-epoch,96.1,log\n"
                   "cifar10,WRN-28-10,attention,3,4,softmax,mixture,0.001,0,top1,last-epoch,n/a,log\n")
    with pytest.raises(FinebenchError, match=r"ref.csv, line 3: value 'n/a' is not a number"):
        report.load_reference([bad])


# ---- early prediction, CLI -------------------------------------------------------------------


def test_early_prediction_table_orders_modules_by_cost(results: Path) -> None:
    table = report.early_prediction_table(report.load_runs([results]).runs)
    assert list(table["source"]) == ["group0", "group1", "group2", "network classifier", "full model"]
    group2 = table.iloc[2]
    assert group2["top1_mean"] == pytest.approx(94.0) and group2["top1_ci"] == pytest.approx(T_975[2] / math.sqrt(3), rel=1e-6)
    assert group2["flops_pct_of_full"] == pytest.approx(5.2 / 5.25 * 100)
    assert "94.00 ± 2.48" in report.render(table, "markdown")


def test_early_prediction_keeps_configurations_apart(tmp_path: Path) -> None:
    for lr, module in ((0.1, 80.0), (0.5, 20.0)):
        write_run(tmp_path, variant="attention", variant_name="attention", seed=0, top1=90.0, lr=lr,
                  options=ATTENTION_OPTIONS, module_top1={"group2": module}, module_flops={"group2": 1_000_000})
    table = report.early_prediction_table(report.load_runs([tmp_path]).runs)
    group2 = table[table["source"] == "group2"].set_index("setting")["top1_mean"]
    assert group2.to_dict() == {"train.lr=0.1": 80.0, "train.lr=0.5": 20.0}


def test_by_unknown_column_is_a_user_error(results: Path) -> None:
    with pytest.raises(FinebenchError, match="'depth'"):
        report.summary_table(report.load_runs([results]).runs, by=["depth"])


def test_missing_results_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match="no such file or folder"):
        report.load_runs([tmp_path / "typo"])


def test_no_finished_runs_renders_a_note_not_a_crash(tmp_path: Path) -> None:
    write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=None, status="running")
    runs = report.load_runs([tmp_path]).runs
    assert report.render(report.summary_table(runs), "markdown") == "(no finished runs)\n"
    assert report.render(report.early_prediction_table(runs), "csv").startswith("dataset,")


def test_same_run_found_twice_counts_once(results: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(results / "wrn_cifar10", tmp_path / "copy" / "wrn_cifar10")
    loaded = report.load_runs([results, tmp_path / "copy"])
    assert len(loaded.runs) == 7
    assert sum("already read" in w for w in loaded.warnings) == 9  # 7 runs + the failed + the stopped one


def test_cli_report_writes_file_and_lists_failed_and_running_runs(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "table.csv"
    done = subprocess.run(
        [sys.executable, "-m", "finebench", "report", str(results), "--format", "csv", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "corrupt-run" in done.stderr and "1 failed run" in done.stderr
    assert "1 unfinished run(s)" in done.stderr and "resumable" in done.stderr and "epoch 2/3 done" in done.stderr
    rows = list(csv.DictReader(out.open()))
    assert {r["variant_name"] for r in rows} == {"baseline", "attention-ad3-aw4", "se"}


def test_cli_report_piped_markdown_has_reference_early_table_and_legend(results: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "finebench", "report", str(results), "--reference", "--early"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "96.50 ± 0.50 (n=3)" in done.stdout and "| full model" in done.stdout
    assert "attention-ad3-aw4 paper" in done.stdout and "ttest_rel" in done.stdout


def test_cli_report_unknown_by_column_is_one_line_error(results: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "finebench", "report", str(results), "--by", "nonsense"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "nonsense" in done.stderr and "Traceback" not in done.stderr


def test_report_speed_marks_img_s_measured_under_different_threads_or_load(tmp_path: Path) -> None:
    """Issue 22 item 7: `report --speed` compared 74 img/s on 2 busy threads with 377 on 1."""
    for variant, used, load in (("baseline", [2], 3.9), ("se", [1], 1.1)):
        run_dir = write_run(tmp_path, variant=variant, variant_name=variant, seed=0, top1=90.0, images_per_s=100.0)
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, "threads_used": used, "load_1min": load}))
    table = report.summary_table(report.load_runs([tmp_path]).runs, speed=True)
    rows = {row["Variant"]: row for row in _markdown_rows(report.render(table, "markdown"))}
    assert rows["se"]["img/s"] == "100†" and rows["se"]["threads"] == "1" and rows["baseline"]["load"] == "3.9"
    assert any("different thread counts" in note for note in table.attrs["notes"])
    for run_dir in tmp_path.glob("*/*"):  # the same conditions: nothing to mark
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, "threads_used": [1], "load_1min": 1.2}))
    table = report.summary_table(report.load_runs([tmp_path]).runs, speed=True)
    assert "100†" not in report.render(table, "markdown") and not table.attrs["speed_marked"]


def test_report_speed_marks_speeds_and_significant_gains_apart_and_explains_both(tmp_path: Path) -> None:
    """Issue 27: ``*`` marked both a significant gain and img/s measured under other conditions."""
    for variant, top1s, used in (("baseline", (90.0, 90.1, 90.2), [2]), ("se", (91.0, 91.1, 91.3), [1])):
        for seed, top1 in enumerate(top1s):
            run_dir = write_run(tmp_path, variant=variant, variant_name=variant, seed=seed, top1=top1,
                                images_per_s=100.0)
            summary = json.loads((run_dir / "summary.json").read_text())
            (run_dir / "summary.json").write_text(json.dumps({**summary, "threads_used": used, "load_1min": 1.0}))
    table = report.summary_table(report.load_runs([tmp_path]).runs, speed=True)
    rows = {row["Variant"]: row for row in _markdown_rows(report.render(table, "markdown"))}
    assert rows["se"]["Gain"].endswith("*") and rows["se"]["img/s"] == "100†"
    note = report.table_note(table)
    assert "*: the CI excludes 0" in note and "img/s†: measured with different thread counts" in note
    latex = report.render(table, "latex")
    body = "\n".join(line for line in latex.splitlines() if not line.startswith("%"))  # the notes are comments
    assert r"$^{*}$" in body and r"100$^{\dagger}$" in body and "†" not in body

def test_a_split_report_has_even_tables_and_notes_at_the_terminal_width(results: Path) -> None:
    """Issue 22 item 9: at 130 columns the report split into a second table of one column and
    wrapped its notes to that table's 47 columns."""
    from rich.console import Console
    from rich.table import Table

    table = report.summary_table(report.load_runs([results]).runs, reference=report.load_reference(), speed=True)
    for width in (130, 100, 80):
        parts = report.terminal_tables(report.format_table(table), width, "finebench report", report.table_note(table))
        tables = [part for part in parts if isinstance(part, Table)]
        console = Console(record=True, width=width)
        assert min(len(part.columns) - 1 for part in tables) >= 2  # never one value column alone
        drawn = [console.measure(part).maximum for part in tables]
        assert min(drawn) >= 0.6 * max(drawn), drawn  # tables of even widths
        for part in parts:
            console.print(part)
        notes = console.export_text().split("final-epoch", 1)[1]
        assert max(len(line) for line in notes.splitlines()) > width - 20  # wrapped at the terminal's width


def test_report_predictions_shows_api_nets_pair_statistics_with_their_labels(tmp_path: Path) -> None:
    """Issue 19 item 4: API-Net's pair statistics reach the report (summary.json ``method_training``)."""
    from finebench.summary import method_training_entry

    rows = [{"epoch": 1, "train_loss": 1.0, "train_top1": 50.0, "train_pairs": {"self_beats_other": 40.0}},
            {"epoch": 2, "train_loss": 0.5, "train_top1": 60.0, "train_pairs": {"self_beats_other": 60.0,
                                                                                "rank_loss": 0.1}}]
    assert method_training_entry(rows) == {"train_pairs": {"self_beats_other": 60.0, "rank_loss": 0.1}}
    assert method_training_entry([{"epoch": 1, "train_loss": 1.0, "train_top1": 5.0}]) is None
    for seed, share in enumerate((60.0, 70.0)):
        run_dir = write_run(tmp_path, variant="api_net", variant_name="api_net", seed=seed, top1=90.0)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["method_training"] = {"train_pairs": {"self_beats_other": share, "rank_loss": 0.1}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    table = report.predictions_table(report.load_runs([tmp_path]).runs)
    rows = {row["Prediction"]: row for row in _markdown_rows(report.render(table, "markdown"))}
    assert rows["training pairs: own-gate score above the partner's (%, last epoch)"]["Value"].startswith("65.00 ±")
    assert rows["training pairs: mean ranking loss (last epoch)"]["Value"].startswith("0.10")
    assert rows["top-1 as shown"]["Value"].startswith("90.00")
