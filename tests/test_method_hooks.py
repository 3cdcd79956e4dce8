"""Method hooks bound to their variant's options, the default loss's regulariser, the loss terms
metrics.jsonl logs beside the objective, and the passes summary.json's FLOPs assume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finebench.methods import Method, build_model, get_method, method_of, parse_options
from finebench.methods.maxent import MaxEntOptions
from finebench.models.output import ModelOutput
from finebench.recipe import TrainSection, load_recipe
from finebench.train.step import build_train_step

TINY_WRN = {"depth": 10, "width": 1}


def test_the_registry_hands_out_the_method_bound_to_the_variants_options() -> None:
    """A loss-only method with an option reads it as ``self.options``: no model subclass carries it."""
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.tensor([0, 2])
    output = ModelOutput(F.log_softmax(logits, 1), logits)
    plain = method_of(parse_options("maxent", {"gamma": 0.0}))
    strong = method_of(parse_options("maxent", {"gamma": 0.5}))
    assert plain.options.gamma == 0.0 and strong.options.gamma == 0.5
    assert torch.equal(plain.loss(output, labels), F.cross_entropy(logits, labels))
    assert strong.loss(output, labels) < plain.loss(output, labels)
    assert get_method("maxent").options == MaxEntOptions(kind="maxent")  # the kind's instance: the defaults
    assert get_method("maxent").options.gamma == 0.1 and type(strong) is type(get_method("maxent"))
    with pytest.raises(ValueError, match="kind 'baseline'"):
        get_method("maxent").bind(parse_options("baseline", {}))


def test_the_default_loss_adds_the_models_reg_loss() -> None:
    logits, labels = torch.tensor([[1.0, -1.0], [0.0, 3.0]]), torch.tensor([1, 1])
    reg = torch.tensor(0.25)
    with_reg = ModelOutput(F.log_softmax(logits, 1), logits, reg_loss=reg)
    loss = get_method("baseline").loss(with_reg, labels)
    assert torch.equal(loss, F.cross_entropy(logits, labels) + reg)  # the same two float32 ops: exact
    assert torch.equal(get_method("baseline").loss(with_reg._replace(reg_loss=None), labels),
                       F.cross_entropy(logits, labels))


def test_the_maximum_entropy_loss_is_its_closed_form() -> None:
    """No official code: CE − γ·H on hand-computed softmaxes. Logits (0, log 3) give p = (1/4, 3/4):
    CE(label 0) = log 4, H = log 4 − (3/4) log 3; uniform logits give CE = H = log N. float64 kept
    through the loss, so the comparison is float64's (assert_close's float64 default, 1e-7)."""
    gamma = 0.3
    method = method_of(parse_options("maxent", {"gamma": gamma}))
    logits = torch.tensor([[0.0, math.log(3.0)], [1.5, 1.5]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    first = math.log(4.0) - gamma * (math.log(4.0) - 0.75 * math.log(3.0))
    second = math.log(2.0) - gamma * math.log(2.0)
    loss = method.loss(ModelOutput(F.log_softmax(logits, 1), logits), labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor((first + second) / 2, dtype=torch.float64))
    terms = method.loss_terms(ModelOutput(F.log_softmax(logits, 1), logits), labels)
    assert set(terms) == {"train_ce", "train_entropy"}
    # loss_terms are float32 (they are logged): float32's rounding of values near 1, a few ulps
    torch.testing.assert_close(terms["train_ce"].double(), torch.tensor((math.log(4.0) + math.log(2.0)) / 2,
                                                                         dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_a_step_logs_plain_cross_entropy_beside_its_objective(accumulation_steps: int) -> None:
    """The engine's step adds ``loss_terms`` to its epoch sums: the logged objective is CE − γ·H of
    the same pass, so the three logged values agree to float32 rounding (terms near 1: 1e-5)."""
    torch.manual_seed(0)
    gamma = 0.5
    method = method_of(parse_options("maxent", {"gamma": gamma}))
    model = build_model("wrn", 3, method.options, backbone_options=TINY_WRN)
    train = TrainSection(epochs=1, batch_size=8, lr=0.01, precision="fp32", schedule="constant",
                         accumulation_steps=accumulation_steps, threads=1)
    step = build_train_step(model, train, steps_per_epoch=2, method=method)
    images, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss, _ = step(images, labels)
    terms = {name: float(total) / len(labels) for name, total in step.take_loss_terms().items()}
    assert set(terms) == {"train_ce", "train_entropy"}
    assert float(loss) == pytest.approx(terms["train_ce"] - gamma * terms["train_entropy"], rel=1e-5, abs=1e-5)
    assert step.take_loss_terms() == {}  # read once per epoch


@pytest.mark.slow
def test_a_run_logs_train_ce_and_its_summary_records_the_passes_its_flops_assume(tmp_path: Path) -> None:
    """Through the runner: the method it trains is the variant's (γ reaches the loss), every row has
    ``train_ce``, and summary.json says the FLOPs count one test pass and one training pass per image."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench.runner import run_recipe

    root = prepare_tiny_bars(tmp_path / "data", 16, 8)
    recipe = tmp_path / "maxent.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", {"kind": "maxent", "gamma": 0.5}), eval_batch_size=8))
    run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=root, quiet=True)
    runs = {json.loads((path / "summary.json").read_text())["variant"]: path
            for path in (tmp_path / "results").glob("*/*") if (path / "summary.json").is_file()}
    assert set(runs) == {"baseline", "maxent"}
    for kind, path in runs.items():
        summary = json.loads((path / "summary.json").read_text())
        assert summary["flops_passes"] == {"test": 1, "train": 1}
        (row,) = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        if kind == "baseline":  # its objective is the plain CE: the same per-batch means, summed in float32 vs float64
            assert row["train_ce"] == pytest.approx(row["train_loss"], rel=1e-5)
        else:
            assert row["train_loss"] == pytest.approx(row["train_ce"] - 0.5 * row["train_entropy"], rel=1e-5, abs=1e-5)


def test_methods_keep_no_state_but_their_options_so_binding_copies_compute_alike() -> None:
    """``bind`` is a shallow copy: every registered method's instance holds only ``options`` (its
    other attributes are class-level), so a bound copy computes as the kind's one instance did."""
    from finebench.methods import METHODS

    for kind, method in METHODS.items():
        assert set(vars(method)) == {"options"}, kind
        assert isinstance(method, Method) and method.options == method.Options(kind=kind)


def test_maxent_runs_through_the_cli_dry_run_profile_and_one_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A new method goes through the commands a user types: the dry run lists it, ``profile`` costs it,
    ``run`` trains it for an epoch (exit 0 each), and its record carries γ and the entropy term."""
    from in_process import finebench_in_process
    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 16, 8)
    recipe = tmp_path / "maxent.toml"
    recipe.write_text(tiny_recipe(variants=({"kind": "maxent", "gamma": 0.5},), eval_batch_size=8) + "threads = 1\n")
    results = tmp_path / "results"
    common = ("--data-root", str(root), "--results-dir", str(results))
    code, out, err = finebench_in_process(monkeypatch, capsys, "run", str(recipe), "--dry-run", *common, columns=200)
    assert code == 0 and "maxent-g0.5" in out, err
    code, out, err = finebench_in_process(monkeypatch, capsys, "profile", str(recipe), "--json", columns=200)
    assert code == 0, err
    assert "maxent-g0.5" in {row["label"] for row in json.loads(out)["rows"]}
    code, out, err = finebench_in_process(monkeypatch, capsys, "run", str(recipe), "-q", *common, columns=200)
    assert code == 0, err
    (run_dir,) = [path.parent for path in results.glob("*/*/summary.json")]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert summary["status"] == "finished" and summary["variant"] == "maxent"
    assert config["variant"]["options"]["gamma"] == 0.5
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train_ce", "train_entropy"} <= set(row)
