"""Issue 29, part 5: ``report --reproduce`` puts each reference number (paper, official code,
re-implementation) beside finebench's mean ± 95% CI under the same selection rule, with the
difference and whether the reference lies inside the interval, on records the tests build."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from in_process import finebench_in_process
from scipy import stats
from test_report import write_run

from finebench import report
from finebench.errors import FinebenchError
from finebench.report.reproduce import (
    format_reproduction,
    reproduction_caption,
    reproduction_table,
)

HEADER = ",".join(report.REFERENCE_COLUMNS) + ",note,protocol,source_kind\n"
LAST = [96.3, 96.4, 96.2]
BEST = [v + 0.2 for v in LAST]  # best-on-test: 96.5, 96.6, 96.4


def _reference(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(f"{row}\n" for row in rows))
    return path


def _se_runs(root: Path, values: list[float] = LAST, variant_name: str = "se") -> Path:
    for seed, top1 in enumerate(values):
        write_run(root, variant="se", variant_name=variant_name, seed=seed, top1=top1, best_top1=top1 + 0.2)
    return root


REFERENCE_ROWS = [
    'cifar10,WRN-28-10,se,,,,,,0,top1,best-epoch,96.5,"Smith et al. 2024, Table 2",,,paper',
    "cifar10,WRN-28-10,se,,,,,,0,top1,best-epoch,97.9,smith/se@abc123 logs/cifar10.log,,official 8 GPUs,official-code",
    'cifar10,WRN-28-10,se,,,,,,0,top1,last-epoch,96.3,Lib README,"UNVERIFIED: not re-read",,reimplementation',
    "cifar10,WRN-28-10,se,,,,,,0.3,top1,best-epoch,99.0,another setting (dropout 0.3),,,paper",
]


def _half_width(values: list[float]) -> float:
    """scipy's 95% Student-t interval half-width of the mean."""
    low, high = stats.t.interval(0.95, len(values) - 1, loc=statistics.mean(values), scale=stats.sem(values))
    return (high - low) / 2


def test_each_reference_is_compared_under_its_own_selection_rule(tmp_path: Path) -> None:
    runs = report.load_runs([_se_runs(tmp_path / "results")]).runs
    reference = report.load_reference([_reference(tmp_path / "ref.csv", REFERENCE_ROWS)])
    table = reproduction_table(runs, reference)
    assert list(table["rule"]) == ["best", "final"]
    best, last = table.iloc[0], table.iloc[1]
    # a best-epoch reference (official scripts keep the best test epoch) against the best-on-test mean
    assert best["n"] == 3 and best["top1_mean"] == pytest.approx(statistics.mean(BEST))
    assert best["top1_ci"] == pytest.approx(_half_width(BEST), rel=1e-9)
    assert best["paper"] == 96.5 and best["paper_diff"] == pytest.approx(statistics.mean(BEST) - 96.5)
    assert best["paper_inside"] is True
    assert best["official-code"] == 97.9 and best["official-code_diff"] == pytest.approx(statistics.mean(BEST) - 97.9)
    assert best["official-code_inside"] is False and best["official-code_protocol"] == "official 8 GPUs"
    assert math.isnan(best["reimplementation"]) and best["reimplementation_inside"] is None
    # a last-epoch reference against the last epoch; the dropout-0.3 number states another setting: not here
    assert last["top1_mean"] == pytest.approx(statistics.mean(LAST)) and last["reimplementation"] == 96.3
    assert last["reimplementation_inside"] is True and last["reimplementation_unverified"]
    assert 99.0 not in set(table["paper"])
    shown = format_reproduction(table)
    assert list(shown["Rule"]) == ["best on test, optimistic", "last epoch"]
    assert list(shown["Paper in CI"]) == ["yes", "—"] and list(shown["Official code in CI"]) == ["no", "—"]
    assert shown["Reimpl."].iloc[1] == "96.30?" and shown["Δ official code"].iloc[0] == "-1.40"
    caption = reproduction_caption(table)
    assert "best on test, optimistic" in caption and "finebench − reference" in caption


def test_one_run_has_no_interval_and_a_recipe_variant_name_matches(tmp_path: Path) -> None:
    runs = report.load_runs([_se_runs(tmp_path / "results", [96.3], variant_name="se-custom")]).runs
    rows = ["cifar10,WRN-28-10,se-custom,,,,,,0,top1,last-epoch,96.0,port README,,,reimplementation"]
    table = reproduction_table(runs, report.load_reference([_reference(tmp_path / "ref.csv", rows)]))
    (row,) = table.itertuples()
    assert row.n == 1 and math.isnan(row.top1_ci) and row.reimplementation_inside is None
    assert format_reproduction(table)["Reimpl. in CI"].iloc[0] == "—"


def test_the_caption_says_when_the_rows_mix_pretraining_sources(tmp_path: Path) -> None:
    root = _se_runs(tmp_path / "results")
    write_run(root, variant="se", variant_name="se", seed=0, top1=90.0, dataset="cub200")
    for summary_path in root.rglob("summary.json"):
        summary = json.loads(summary_path.read_text())
        data = "ImageNet-21k" if summary["dataset"] == "cub200" else "ImageNet-1k"
        summary["pretrained"] = {"tag": "t", "file": "f", "sha256": "0" * 64, "pretraining": data}
        summary_path.write_text(json.dumps(summary))
    rows = [*REFERENCE_ROWS, 'cub200,WRN-28-10,se,,,,,,0,top1,last-epoch,91.0,"Smith et al. 2024",,,paper']
    table = reproduction_table(report.load_runs([root]).runs, report.load_reference([_reference(tmp_path / "r.csv", rows)]))
    assert set(table["pretraining"]) == {"ImageNet-1k", "ImageNet-21k"}
    assert "Mixed pretraining" in reproduction_caption(table)
    assert "Pretraining" in format_reproduction(table).columns


@pytest.mark.parametrize(("row", "expected"), [
    ("cifar10,WRN-28-10,se,,,,,,0,top1,best-epoch,96.5,src,,,preprint", r"line 3: source_kind 'preprint'; expected paper"),
    ("cifar10,WRN-28-10,se,,,,,,0,top1,best-epoch,n/a,src,,,paper", r"line 3: value 'n/a' is not a number"),
    ("cifar10,WRN-28-10,se,,,,,,0,top1,best,96.5,src,,,paper", r"line 3: selection 'best'; expected last-epoch or best-epoch"),
])
def test_a_malformed_reference_row_names_file_line_and_field(tmp_path: Path, row: str, expected: str) -> None:
    path = _reference(tmp_path / "ref.csv", [REFERENCE_ROWS[0], row])
    with pytest.raises(FinebenchError, match=rf"reference table {path}, {expected}"):
        report.load_reference([path])


def test_a_reference_without_a_source_kind_is_named(tmp_path: Path) -> None:
    path = _reference(tmp_path / "ref.csv", [REFERENCE_ROWS[0], REFERENCE_ROWS[1].rsplit(",", 1)[0] + ","])
    with pytest.raises(FinebenchError, match=rf"reference table {path}, line 3: source_kind is empty; expected paper"):
        report.load_reference([path])
    # a table from before the column (the summary's Paper column reads it as it did) cannot say
    runs = report.load_runs([_se_runs(tmp_path / "results")]).runs
    old = tmp_path / "old.csv"
    old.write_text(",".join(report.REFERENCE_COLUMNS) + "\n" + REFERENCE_ROWS[0].rsplit(",", 3)[0] + "\n")
    assert report.load_reference([old])["value"].tolist() == [96.5]
    with pytest.raises(FinebenchError, match=rf"reference table {old}, line 2: source_kind is empty"):
        reproduction_table(runs, report.load_reference([old]))


def test_cli_reproduce_prints_the_table_and_a_bad_row_is_one_line_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    results = _se_runs(tmp_path / "results")
    good = _reference(tmp_path / "ref.csv", REFERENCE_ROWS)
    code, out, err = finebench_in_process(monkeypatch, capsys, "report", str(results), "--reproduce",
                                          "--reference-file", str(good), "--format", "csv", columns=200)
    assert code == 0, err
    assert "official-code_inside" in out and "paper_diff" in out
    code, out, err = finebench_in_process(monkeypatch, capsys, "report", str(results), "--reproduce",
                                          "--reference-file", str(good), "--format", "latex", "-o",
                                          str(tmp_path / "table.tex"), columns=200)
    assert code == 0, err
    latex = (tmp_path / "table_reproduce.tex").read_text()
    caption, _, body = latex.partition("\\begin{tabular}")
    assert caption.count("\n") == 3 and all(line.startswith("% ") for line in caption.splitlines())  # a comment
    assert "best on test, optimistic" in body
    bad = _reference(tmp_path / "bad.csv", [REFERENCE_ROWS[0], REFERENCE_ROWS[0].replace("96.5", "9x")])
    code, out, err = finebench_in_process(monkeypatch, capsys, "report", str(results), "--reproduce",
                                          "--reference-file", str(bad), columns=200)
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and f"reference table {bad}, line 3: value '9x' is not a number" in err


def test_the_shipped_reference_tables_say_what_kind_of_source_each_number_is() -> None:
    shipped = report.reproduction_reference()
    assert set(shipped["source_kind"]) == {"paper", "official-code", "reimplementation"}
    official = shipped[(shipped["variant"] == "transfg") & (shipped["source_kind"] == "official-code")]
    assert list(official["value"]) == [91.1] and "Fine-grained-Visual-Analysis-Library" in official["source"].iloc[0]


def test_the_shipped_tables_place_fgvclibs_numbers_beside_a_transfg_run(tmp_path: Path) -> None:
    """The recipe's backbone label and dropout (recipes/transfg_cub200.toml) meet the shipped rows:
    the paper's number, the official code's and FGVCLib's, all best-epoch."""
    for seed, top1 in enumerate((90.9, 91.1)):
        write_run(tmp_path, variant="transfg", variant_name="transfg", seed=seed, top1=top1 - 0.3, best_top1=top1,
                  dataset="cub200", backbone_label="timm:vit_base_patch16_224.orig_in21k(img_size=448)", dropout=0.1)
    table = reproduction_table(report.load_runs([tmp_path]).runs, report.reproduction_reference())
    (row,) = table.itertuples(index=False)
    assert row.rule == "best" and row.top1_mean == pytest.approx(91.0)
    values = table.iloc[0]
    assert (values["paper"], values["official-code"], values["reimplementation"]) == (91.7, 91.1, 89.3)
    assert values["paper_unverified"] and not values["official-code_unverified"]
    assert values["official-code_diff"] == pytest.approx(91.0 - 91.1)
    half_width = _half_width([90.9, 91.1])  # t(1) · 0.1 = 1.27
    assert values["top1_ci"] == pytest.approx(half_width, rel=1e-9)
    inside = {kind: values[f"{kind}_inside"] for kind in ("paper", "official-code", "reimplementation")}
    assert None not in inside.values()
    # 91.7 and 91.1 lie within 91.0 ± 1.27; FGVCLib's 89.3 lies 1.7 below
    assert {kind: bool(flag) for kind, flag in inside.items()} == {
        "paper": True, "official-code": True, "reimplementation": False}
