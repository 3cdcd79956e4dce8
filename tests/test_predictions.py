"""Per-image predictions (``predictions.parquet``) and ``report --disagree`` built on them.

A real tiny run through the CLI writes the file its summary names; its top-1 column is the run's
recorded top-1, ``finebench eval`` writes the same predictions for the split; the disagreement
statistics equal statsmodels' McNemar and scipy's paired bootstrap on the same numbers; another
test set, a missing or a broken file is one line naming the file(s).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from test_trained import cli
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench.methods import get_method
from finebench.models.output import ModelOutput
from finebench.predictions import (
    SHOWN_PREDICTION,
    PerImagePredictions,
    digest_test_set,
    read_predictions,
    write_predictions,
)
from finebench.report.disagree import (
    BOOTSTRAP_BATCH,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    RESAMPLES,
    bootstrap_difference,
    compare,
    mcnemar_exact,
)
from finebench.report.records import method_predictions
from finebench.train.evaluate import evaluate
from finebench.train.runtime import DistContext

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_IMAGES = 41
VARIANTS = ("baseline", "attention")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two variants of one seed trained for an epoch through ``finebench run``."""
    base = tmp_path_factory.mktemp("predictions")
    data_root = prepare_tiny_bars(base / "data", 64, TEST_IMAGES)
    recipe = base / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=(3,), variants=VARIANTS, eval_batch_size=16))
    done = cli("run", str(recipe), "--data-root", str(data_root), "--results-dir", str(base / "results"), "-q")
    assert done.returncode == 0, done.stderr
    runs = {json.loads(path.read_text())["variant"]: path.parent for path in (base / "results").rglob("summary.json")}
    return {"data": data_root, "results": base / "results", **runs}


def names(world: dict[str, Path]) -> tuple[str, str]:
    return tuple(json.loads((world[kind] / "summary.json").read_text())["variant_name"] for kind in VARIANTS)


def test_a_run_records_each_images_predictions_and_its_summary_names_the_file(world) -> None:
    import datasets

    labels = np.asarray(datasets.load_from_disk(str(world["data"] / "mnist5k" / "test"))["label"])
    for kind in VARIANTS:
        summary = json.loads((world[kind] / "summary.json").read_text())
        predictions = read_predictions(world[kind] / summary["predictions_file"])
        assert summary["predictions_file"] == "predictions.parquet"
        assert predictions.ids.tolist() == list(range(TEST_IMAGES)) and predictions.split == "test"
        assert np.array_equal(predictions.labels, labels)  # the store's labels, in store order
        assert summary["test_set_digest"] == predictions.digest == digest_test_set(np.arange(TEST_IMAGES), labels)
        # the shown prediction's first class is the top-1 the run recorded (same counts, exactly)
        assert 100.0 * predictions.correct().sum() / TEST_IMAGES == summary["final"]["test_top1"]
        top5 = (predictions.classes[SHOWN_PREDICTION] == predictions.labels[:, None]).any(axis=1)
        assert 100.0 * top5.sum() / TEST_IMAGES == summary["final"]["test_top5"]
        probs = predictions.probs[SHOWN_PREDICTION]
        assert probs.dtype == np.float32 and np.all(np.diff(probs, axis=1) <= 0) and np.all(probs.sum(axis=1) <= 1 + 1e-6)
        rows = [json.loads(line) for line in (world[kind] / "metrics.jsonl").read_text().splitlines()]
        assert all("per_image" not in row for row in rows)
    attention = read_predictions(world["attention"] / "predictions.parquet")
    final = json.loads((world["attention"] / "summary.json").read_text())["final"]
    assert list(attention.classes) == [SHOWN_PREDICTION, "network_top1", *(f"module_top1.{tap}" for tap in final["module_top1"])]
    assert 100.0 * attention.correct("network_top1").sum() / TEST_IMAGES == final["network_top1"]
    for tap, value in final["module_top1"].items():
        assert 100.0 * attention.correct(f"module_top1.{tap}").sum() / TEST_IMAGES == value


def test_eval_writes_the_same_predictions_into_a_file_of_its_split(world) -> None:
    run_dir = world["attention"]
    recorded = (run_dir / "predictions.parquet").read_bytes()
    done = cli("eval", str(run_dir), "--data-root", str(world["data"]), "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["predictions_file"] == str(run_dir / "predictions-test.parquet")
    again, own = read_predictions(run_dir / "predictions-test.parquet"), read_predictions(run_dir / "predictions.parquet")
    assert metrics["test_set_digest"] == own.digest == again.digest
    assert list(again.classes) == list(own.classes)
    for name in own.classes:  # the same model, images, batches and precision on the same CPU: equal
        assert np.array_equal(again.classes[name], own.classes[name])
        assert np.array_equal(again.probs[name], own.probs[name])
    assert (run_dir / "predictions.parquet").read_bytes() == recorded  # the run's own record stays
    done = cli("eval", str(run_dir), "--data-root", str(world["data"]), "--device", "cpu", "--split", "train")
    assert done.returncode == 0 and "predictions-train.parquet" in done.stderr
    assert read_predictions(run_dir / "predictions-train.parquet").ids.tolist() == list(range(64))


def test_report_disagree_prints_mcnemars_test_of_the_two_runs(world, tmp_path: Path) -> None:
    a, b = names(world)
    done = cli("report", str(world["results"]), "--disagree", a, b, "--plots", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    assert "McNemar p" in done.stdout and "paired t-test" in done.stdout
    first, second = (read_predictions(world[kind] / "predictions.parquet") for kind in VARIANTS)
    only_a = int((first.correct() & ~second.correct()).sum())
    only_b = int((second.correct() & ~first.correct()).sum())
    row = next(line for line in done.stdout.splitlines() if "mnist5k" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[-3:-1] == [str(only_a), str(only_b)]
    p = mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue
    assert cells[-1] == ("<0.001" if p < 0.001 else f"{p:.3f}")
    figures = sorted(path.name for path in (tmp_path / "plots").iterdir())
    assert figures == [f"disagree_{a}_vs_{b}_mnist5k_WRN-10-1_3.{suffix}" for suffix in ("png", "svg")]
    as_json = cli("report", str(world["results"]), "--disagree", a, b, "-f", "json")
    (record,) = json.loads(as_json.stdout)
    assert (record["a_only"], record["b_only"], record["images"]) == (only_a, only_b, TEST_IMAGES)


def test_report_disagree_of_files_from_another_test_set_is_one_line_naming_both(world, tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(world["results"], results, ignore=shutil.ignore_patterns("predictions-*.parquet", "last.pt"))
    a, b = names(world)
    moved = next(path.parent for path in results.rglob("summary.json")
                 if json.loads(path.read_text())["variant"] == "attention")
    other = read_predictions(moved / "predictions.parquet")
    labels = other.labels.copy()
    labels[0] = (labels[0] + 1) % 10  # one image labelled otherwise: another test set
    write_predictions(moved / "predictions.parquet",
                      PerImagePredictions(other.ids, labels, other.classes, other.probs, other.split))
    done = cli("report", str(results), "--disagree", a, b)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "different test sets" in message and len(done.stderr.strip().splitlines()) <= 2  # one line, wrapped at most once
    assert str(moved.name) in message and "predictions.parquet" in message
    baseline = next(path.parent for path in results.rglob("summary.json")
                    if json.loads(path.read_text())["variant"] == "baseline")
    assert baseline.name in message

    (moved / "predictions.parquet").write_bytes(b"not parquet")
    done = cli("report", str(results), "--disagree", a, b)
    assert done.returncode == 2 and "not a readable Parquet file" in done.stderr and "Traceback" not in done.stderr

    (moved / "predictions.parquet").unlink()
    done = cli("report", str(results), "--disagree", a, b)
    assert done.returncode == 2 and "not found" in done.stderr and "finebench eval" in done.stderr


def test_report_disagree_of_an_unknown_variant_is_one_line_listing_the_known(world) -> None:
    a, _ = names(world)
    done = cli("report", str(world["results"]), "--disagree", a, "nonesuch")
    assert done.returncode == 2 and "'nonesuch'" in done.stderr and a in done.stderr


# ---- the statistics, on numbers the tests choose -------------------------------------------------


def per_image(correct: np.ndarray, labels: np.ndarray, classes: int = 10) -> PerImagePredictions:
    """A file's content whose top-1 is right exactly where ``correct`` says."""
    wrong = (labels + 1) % classes
    top1 = np.where(correct, labels, wrong)
    ranked = np.stack([top1, *((top1 + k) % classes for k in range(1, 5))], axis=1).astype(np.int64)
    probs = np.tile(np.array([0.5, 0.2, 0.1, 0.1, 0.1], np.float32), (len(labels), 1))
    return PerImagePredictions(np.arange(len(labels), dtype=np.int64), labels, {SHOWN_PREDICTION: ranked},
                               {SHOWN_PREDICTION: probs}, "test")


def test_mcnemar_and_the_bootstrap_equal_statsmodels_and_scipy_on_the_same_numbers(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 10, 500)
    a_correct, b_correct = rng.random(500) < 0.8, rng.random(500) < 0.7
    write_predictions(tmp_path / "a.parquet", per_image(a_correct, labels))
    write_predictions(tmp_path / "b.parquet", per_image(b_correct, labels))
    result = compare(read_predictions(tmp_path / "a.parquet"), read_predictions(tmp_path / "b.parquet"),
                     tmp_path / "a.parquet", tmp_path / "b.parquet")
    table = [[int((a_correct & b_correct).sum()), int((a_correct & ~b_correct).sum())],
             [int((~a_correct & b_correct).sum()), int((~a_correct & ~b_correct).sum())]]
    assert (result.a_only, result.b_only) == (table[0][1], table[1][0])
    assert result.p_value == mcnemar(table, exact=True).pvalue  # float64: equal, no tolerance
    expected = stats.bootstrap((a_correct.astype(float), b_correct.astype(float)),
                               lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis), paired=True,
                               vectorized=True, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                               method="percentile", batch=BOOTSTRAP_BATCH,
                               rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
    assert (result.ci_low, result.ci_high) == (100.0 * expected.low, 100.0 * expected.high)
    assert result.difference == 100.0 * (a_correct.mean() - b_correct.mean())
    assert result.a_top1 == 100.0 * a_correct.mean() and result.images == 500
    # fixed seed: the same files give the same interval
    assert bootstrap_difference(a_correct, b_correct) == (expected.low, expected.high)


def test_mcnemar_on_small_and_lopsided_counts_equals_statsmodels() -> None:
    for a_only, b_only in ((0, 0), (0, 1), (1, 0), (3, 9), (25, 5), (40, 41)):
        assert mcnemar_exact(a_only, b_only) == mcnemar([[10, a_only], [b_only, 10]], exact=True).pvalue


def test_identical_predictions_give_a_zero_interval_and_p_one(tmp_path: Path) -> None:
    labels = np.arange(20) % 10
    same = per_image(np.arange(20) % 3 == 0, labels)
    result = compare(same, same, tmp_path / "a", tmp_path / "b")
    assert (result.a_only, result.b_only, result.p_value, result.ci_low, result.ci_high) == (0, 0, 1.0, 0.0, 0.0)


def test_a_file_changed_after_writing_is_one_line(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from finebench.errors import FinebenchError

    path = tmp_path / "p.parquet"
    write_predictions(path, per_image(np.ones(10, bool), np.arange(10)))
    table = pq.read_table(path)
    import pyarrow as pa

    changed = table.set_column(1, "label", pa.array(table.column("label").to_numpy()[::-1].copy()))
    pq.write_table(changed.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(FinebenchError, match="changed after it was written"):
        read_predictions(path)
    pq.write_table(table.replace_schema_metadata({}), path)
    with pytest.raises(FinebenchError, match="expected 'finebench-predictions'"):
        read_predictions(path)


# ---- what the evaluator collects -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pmg", "ws_dan", "cal"])
def test_each_methods_per_image_predictions_are_named_as_its_metrics(kind: str) -> None:
    """The names of ``prediction_logits`` are the fields ``eval_metrics`` writes (what ``report
    --predictions`` lists), in the order of ``eval_counts``."""
    method = get_method(kind)
    heads = {"pmg": 3, "ws_dan": 2, "cal": 5}[kind]
    torch.manual_seed(0)
    output = ModelOutput(torch.randn(6, 4), torch.randn(6, 4), module_logits=tuple(torch.randn(6, 4) for _ in range(heads)))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    named = method.prediction_logits(output)
    counts = [float(count) for count in method.eval_counts(output, labels)]
    recorded = method_predictions(method.eval_metrics(counts, 6.0, torch.nn.Identity()))
    assert list(named) == list(recorded)
    for (name, logits), value in zip(named.items(), recorded.values(), strict=True):
        assert value == 100.0 * float((logits.argmax(1) == labels).sum()) / 6.0, name


class _Net(torch.nn.Module):
    """Small integer weights on small integer images: logits exact in float32, whatever the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 7)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randint(-3, 4, (7, 8)).float())
            self.linear.bias.zero_()

    def forward(self, images: torch.Tensor) -> ModelOutput:
        logits = self.linear(images.flatten(1))
        return ModelOutput(torch.log_softmax(logits, 1), logits)


class _Rank(DistContext):
    """Rank 1 of 2 whose gather hands back rank 0's value as recorded by an earlier call."""

    def __init__(self, rank: int, first: list) -> None:
        super().__init__(rank=rank, world_size=2)
        self.first = first

    def gather(self, value: object) -> list[object]:
        if self.rank == 0:
            self.first.append(value)
            return [value, value]
        return [self.first[0], value]


def test_sharded_evaluation_gives_every_image_its_id_as_one_process_does() -> None:
    """Under DDP each rank evaluates ``range(rank, N, 2)`` (the loaders' shard rule); the gathered
    file is the one process's, image for image."""
    torch.manual_seed(0)
    images, labels = torch.randint(-3, 4, (23, 8)).float(), torch.randint(0, 7, (23,))
    model = _Net()

    def batches(index: range) -> list:
        return [(images[list(index)][i:i + 4], labels[list(index)][i:i + 4]) for i in range(0, len(index), 4)]

    baseline = get_method("baseline")
    whole = evaluate(model, batches(range(23)), device=torch.device("cpu"), method=baseline, per_image=True)
    plain = evaluate(model, batches(range(23)), device=torch.device("cpu"), method=baseline)
    assert {k: v for k, v in whole.items() if k != "per_image"} == plain  # nothing it computed changes
    first: list = []
    evaluate(model, batches(range(0, 23, 2)), device=torch.device("cpu"), method=baseline, per_image=True, ctx=_Rank(0, first))
    sharded = evaluate(model, batches(range(1, 23, 2)), device=torch.device("cpu"), method=baseline, per_image=True,
                       ctx=_Rank(1, first))["per_image"]
    one = whole["per_image"]
    assert sharded.ids.tolist() == list(range(23)) and np.array_equal(sharded.labels, labels.numpy())
    assert np.array_equal(sharded.classes[SHOWN_PREDICTION], one.classes[SHOWN_PREDICTION])
    assert np.array_equal(sharded.probs[SHOWN_PREDICTION], one.probs[SHOWN_PREDICTION])
    assert 100.0 * one.correct().mean() == pytest.approx(whole["test_top1"], rel=1e-12)


def test_restart_discards_the_per_image_files_of_the_discarded_model(tmp_path: Path) -> None:
    from finebench.results import RunDir

    run_dir = RunDir(tmp_path, "tiny", "abc")
    content = per_image(np.ones(4, bool), np.arange(4))
    for path in (run_dir.predictions_path(), run_dir.predictions_path("test"), run_dir.predictions_path("train+val")):
        write_predictions(path, content)
    (run_dir.path / "notes.parquet").write_bytes(b"kept")
    run_dir.discard()
    assert sorted(path.name for path in run_dir.path.iterdir()) == ["notes.parquet"]
