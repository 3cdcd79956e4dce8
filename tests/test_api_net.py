"""API-Net (``finebench.methods.api_net``): pair mining, the pair head and its loss against the
official PeiqinZhuang/API-Net golden tensors, the class-balanced sampler (official first epoch,
DDP shares), the batch checks, the method on every backbone family and its training step."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from float_tolerance import assert_agrees
from gloo import on_two_workers
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method, parse_options
from finebench.methods.api_net import (
    APINetClassifier,
    ClassBalancedSampler,
    mine_pairs,
    pair_terms,
)
from finebench.models.base import Backbone
from finebench.train_settings import TrainSection
from finebench.train.fit import fit
from finebench.train.step import TrainStep

GOLDEN = Path(__file__).parent / "data" / "golden" / "api_net" / "golden.safetensors"
TINY = {"depth": 10, "width": 1}
FAMILIES = [("wrn", TINY), ("resnext_cifar", {"depth": 11, "cardinality": 2, "base_width": 4}),
            ("resnet18", None), ("timm:resnet10t", None), ("torchvision:resnet18", None)]
OFFICIAL_NAMES = {"map1.weight": "map1.weight", "map1.bias": "map1.bias", "map2.weight": "map2.weight",
                  "map2.bias": "map2.bias", "fc.weight": "classifier.weight", "fc.bias": "classifier.bias"}
"""Official state-dict names, in its order, to finebench's (the golden script fills by that order)."""
SAMPLER_LABELS = [c for c, count in zip((0, 2, 3, 5, 8, 9), (5, 7, 4, 6, 9, 3), strict=True) for _ in range(count)]


class Pooled(Backbone):
    """A trunk whose input already is the pooled feature (the golden script feeds fixed features)."""

    tap_points = ()
    out_channels = 2048
    attention_candidates = ()

    def forward(self, x, taps=(), stop_after_taps=False):
        return x, {}


def official_model(dtype: torch.dtype, dropout: float = 0.0) -> APINetClassifier:
    """The golden weights: tools/golden/api_net.py's ``fill`` (N(0, 1/fan_in) matrices, N(0, 0.01)
    biases) into a float32 model (as the official one is built), then cast to ``dtype``."""
    model = APINetClassifier(Pooled(), 200, parse_options("api_net", {"dropout": dropout}))
    state = model.state_dict()
    with torch.no_grad():
        for index, name in enumerate(OFFICIAL_NAMES.values()):
            tensor = state[name]
            values = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(100 + index), dtype=torch.float64)
            tensor.copy_(values / tensor[0].numel() ** 0.5 if tensor.dim() > 1 else 0.1 * values)
    return model.to(dtype)


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "PeiqinZhuang/API-Net",
                                   "commit": "c4996c7fec3fbd46fe2873f74e8ba154218b7e7f"}


FORWARD_TERMS = 2 * 2048 + 512 + 2048
"""The pair head's accumulations, input to logits: map1 over both features, map2 over its hidden
units, the classifier over the gated feature (tests/float_tolerance.py)."""
LOSS_TERMS = FORWARD_TERMS + 200 + 40
"""... then the softmax over 200 classes and the mean over the 8B = 40 pair rows."""
GRADIENT_TERMS = LOSS_TERMS + 200 + 2048 + 512 + 40
"""... then back through the classifier, map2 and map1, summed over the pair rows that share an image."""
NORM_TERMS = GRADIENT_TERMS + 22
"""... then a weight gradient's norm: torch sums its at most 2**22 squares pairwise (log2 of the length)."""


def _compare_training(dtype: torch.dtype, prefix: str) -> None:
    """float64 strictly; float32 within the worst-case rounding of each tensor's accumulation chain."""
    golden = load_file(GOLDEN)
    model = official_model(dtype).train()
    features = golden["features"].to(dtype).requires_grad_(True)
    labels = golden["labels"]
    anchors, partners = mine_pairs(features, labels)
    assert torch.equal(anchors, torch.cat([golden[prefix + "intra_pairs"][:, 0], golden[prefix + "inter_pairs"][:, 0]]))
    assert torch.equal(partners, torch.cat([golden[prefix + "intra_pairs"][:, 1], golden[prefix + "inter_pairs"][:, 1]]))
    output = model(features, labels=labels)
    self_logits, other_logits, pair_labels, _ = output.aux
    assert_agrees(self_logits.detach(), torch.cat([golden[prefix + "logit1_self"], golden[prefix + "logit2_self"]]),
                  FORWARD_TERMS)
    assert_agrees(other_logits.detach(), torch.cat([golden[prefix + "logit1_other"], golden[prefix + "logit2_other"]]),
                  FORWARD_TERMS)
    assert torch.equal(pair_labels, torch.cat([golden[prefix + "labels1"], golden[prefix + "labels2"]]))
    ce, rank, _ = pair_terms(output)
    assert_agrees(ce.detach().reshape(1), golden[prefix + "ce"], LOSS_TERMS)
    assert_agrees(rank.detach().reshape(1), golden[prefix + "rank"], LOSS_TERMS)
    torch.testing.assert_close(get_method("api_net").loss(output, labels), ce + rank)
    (ce + rank).backward()
    assert_agrees(features.grad, golden[prefix + "grad_features"], GRADIENT_TERMS)
    for name, layer in (("map1", model.map1), ("map2", model.map2), ("fc", model.classifier)):
        assert_agrees(layer.weight.grad.norm().reshape(1), golden[f"{prefix}grad_{name}_norm"], NORM_TERMS, msg=name)
        assert_agrees(layer.bias.grad, golden[f"{prefix}grad_{name}_bias"], GRADIENT_TERMS, msg=name)
    assert_agrees(model.map1.weight.grad[:4], golden[prefix + "grad_map1_rows"], GRADIENT_TERMS)
    assert_agrees(model.map2.weight.grad[:8], golden[prefix + "grad_map2_rows"], GRADIENT_TERMS)
    assert_agrees(model.classifier.weight.grad[[0, 1, 5, 17, 199]], golden[prefix + "grad_fc_rows"], GRADIENT_TERMS)


def test_pairs_logits_losses_and_gradients_equal_the_official_in_float64() -> None:
    _compare_training(torch.float64, "")


def test_pairs_logits_losses_and_gradients_equal_the_official_in_float32() -> None:
    _compare_training(torch.float32, "f32_")


def test_the_golden_batch_has_pairs_on_both_sides_of_the_margin() -> None:
    """The comparison exercises the hinge where it is active and where it is zero."""
    golden = load_file(GOLDEN)
    output = official_model(torch.float64).train()(golden["features"], labels=golden["labels"])
    _, _, lead = pair_terms(output)
    assert (lead >= 0.05).any() and (lead < 0).any()


def test_seeded_dropout_draws_the_official_masks_in_the_official_order() -> None:
    golden = load_file(GOLDEN)
    model = official_model(torch.float64, dropout=0.5).train()
    torch.manual_seed(7)
    self_logits, other_logits, _, _ = model(golden["features"], labels=golden["labels"]).aux
    close = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(self_logits.detach(), torch.cat([golden["drop_logit1_self"], golden["drop_logit2_self"]]),
                               **close)
    torch.testing.assert_close(other_logits.detach(),
                               torch.cat([golden["drop_logit1_other"], golden["drop_logit2_other"]]), **close)


def test_the_test_prediction_is_the_plain_classifier_on_the_pooled_feature() -> None:
    golden = load_file(GOLDEN)
    model = official_model(torch.float64).eval()
    with torch.no_grad():
        output = get_method("api_net").predict(model, golden["features"])
    torch.testing.assert_close(output.logits, golden["eval_logits"], rtol=1e-10, atol=1e-12)
    assert output.aux == ()


def test_an_image_without_a_candidate_pairs_with_image_0_as_the_official() -> None:
    golden = load_file(GOLDEN)
    for name, labels in (("alone", [3, 3, 8, 8, 11]), ("one_class", [4, 4, 4, 4])):
        _, partners = mine_pairs(golden["features"][:len(labels)], torch.tensor(labels))
        assert torch.equal(partners, torch.cat([golden[f"{name}_intra_pairs"][:, 1], golden[f"{name}_inter_pairs"][:, 1]]))


def test_given_pairs_replace_the_mining() -> None:
    golden = load_file(GOLDEN)
    model = official_model(torch.float64).train()
    pairs = (torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4]))
    self_logits, _, pair_labels, _ = model(golden["features"], labels=golden["labels"], pairs=pairs).aux
    assert self_logits.shape == (8, 200) and torch.equal(pair_labels[4:], golden["labels"][1:5])


# ---- sampler ---------------------------------------------------------------------------------


def test_the_sampler_draws_the_official_first_epoch_from_the_same_numpy_seed() -> None:
    golden = load_file(GOLDEN)["sampler_batches"]
    sampler = ClassBalancedSampler(SAMPLER_LABELS, 3, 2, seed=2)
    sampler.set_epoch(1)  # RandomState(seed + epoch) = the official np.random.seed(3)
    assert torch.equal(torch.from_numpy(sampler.global_batches()), golden)
    assert sampler.steps == len(golden) == len(SAMPLER_LABELS) // 6


def test_each_worker_takes_whole_classes_of_the_same_global_batches_and_epochs_differ() -> None:
    labels = np.repeat(np.arange(12), 9)
    one = ClassBalancedSampler(labels, 8, 3, seed=5)
    shards = [ClassBalancedSampler(labels, 8, 3, seed=5, rank=rank, world_size=2) for rank in range(2)]
    for sampler in (one, *shards):
        sampler.set_epoch(1)
    steps, local = one.steps, shards[0].local_batch
    assert steps == 108 // 24 and local == 12 and len(shards[1]) == steps * local
    joined = torch.cat([shard.indices().view(steps, local) for shard in shards], dim=1)
    assert torch.equal(joined, one.indices().view(steps, 24))
    for batch in joined:
        classes = torch.from_numpy(labels)[batch].view(8, 3)
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0].tolist())) == 8
    first = one.indices()
    one.set_epoch(2)
    assert not torch.equal(first, one.indices())


@pytest.mark.parametrize(("labels", "classes", "images", "world", "message"), [
    (np.repeat(np.arange(4), 9), 6, 2, 1, "6 classes per batch but the training split has 4"),
    (np.r_[np.repeat(np.arange(3), 9), [3, 3]], 2, 3, 1, "class 3 has 2 training images, fewer than images_per_class = 3"),
    (np.repeat(np.arange(8), 9), 6, 2, 4, "do not split into 4 workers of whole classes"),
])
def test_a_batch_the_sampler_cannot_draw_is_one_line(labels, classes: int, images: int, world: int,
                                                     message: str) -> None:
    with pytest.raises(FinebenchError, match=f"^variant 'api_net': .*{message}") as error:
        ClassBalancedSampler(labels, classes, images, world_size=world)
    assert "\n" not in str(error.value)


# ---- options and checks ----------------------------------------------------------------------


def test_options_default_to_the_official_code_and_name_what_differs() -> None:
    method = get_method("api_net")
    options = parse_options("api_net", {})
    assert (options.images_per_class, options.classes_per_batch, options.margin, options.hidden, options.dropout,
            options.mutual_activation, options.freeze_backbone_epochs) == (4, None, 0.05, 512, 0.5, "none", 8)
    assert method.train_passes_per_image == 1 and method.test_forward_passes == 1
    assert method.table_name(options) == "api_net"
    assert method.settings(options) == ("batch/4 classes x 4 images, margin 0.05, hidden 512, dropout 0.5, "
                                        "backbone frozen 8 epochs")
    assert method.table_name(parse_options("api_net", {"classes_per_batch": 30, "margin": 0.0,
                                                       "freeze_backbone_epochs": 0, "mutual_activation": "relu"})) \
        == "api_net-n30-m0-f0-relu"
    with pytest.raises(FinebenchError, match="images_per_class"):
        parse_options("api_net", {"images_per_class": 1})


def _train(**changes: object) -> TrainSection:
    return TrainSection(**{"epochs": 1, "batch_size": 16, "schedule": "constant", **changes})


def test_train_settings_take_the_papers_batch_only_when_the_options_choose_it() -> None:
    method = get_method("api_net")
    common = _train()
    assert method.train_settings(common, parse_options("api_net", {})) == common
    paper = method.train_settings(common, parse_options("api_net", {"classes_per_batch": 30}))
    assert paper.batch_size == 120 and paper.model_copy(update={"batch_size": 16}) == common


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 30}, r"train.batch_size = 30 is not a multiple of images_per_class = 4; expected e.g. 28 or 32$"),
    ({"batch_size": 6}, r"train.batch_size = 6 is not a multiple of images_per_class = 4; expected e.g. 8$"),
    ({"batch_size": 4}, (r"train.batch_size = 4 holds 1 class x 4 images, and inter-class pairs need at least 2 "
                         r"classes per batch; expected batch_size >= 8$")),
    ({"batch_size": 20, "accumulation_steps": 2}, (
        r"train.batch_size = 20 holds 5 classes x 4 images, which do not split into 2 micro-batches "
        r"\(train.accumulation_steps\) of whole classes, at least 2 each \(pairs are mined within each\); "
        r"expected a multiple of 2 classes, at least 4 \(e.g. batch_size = 24\)$")),
    ({"batch_size": 8, "accumulation_steps": 2}, (
        r"train.batch_size = 8 holds 2 classes x 4 images, which do not split into 2 micro-batches .*; "
        r"expected a multiple of 2 classes, at least 4 \(e.g. batch_size = 16\)$")),
])
def test_a_batch_that_cannot_be_paired_is_one_line_naming_the_setting(changes: dict, message: str) -> None:
    with pytest.raises(FinebenchError, match=f"^variant 'api_net': {message}"):
        get_method("api_net").train_settings(_train(**changes), parse_options("api_net", {}))


def test_batches_of_whole_classes_per_micro_batch_pass() -> None:
    for changes in ({"batch_size": 8}, {"batch_size": 16, "accumulation_steps": 2},
                    {"batch_size": 48, "accumulation_steps": 4}):
        train = _train(**changes)
        assert get_method("api_net").train_settings(train, parse_options("api_net", {})) == train


def test_the_dry_run_names_a_batch_that_cannot_be_paired(tmp_path: Path) -> None:
    from tiny_data import tiny_recipe

    from finebench.recipe import load_recipe
    from finebench.runner import run_recipe

    recipe = tmp_path / "pairs.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "api_net"), batch_size=18))
    with pytest.raises(FinebenchError, match=r"^variant 'api_net': train.batch_size = 18 is not a multiple of "
                                             r"images_per_class = 4; expected e.g. 16 or 20$"):
        run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=tmp_path, dry_run=True)


# ---- model and step --------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "options"), FAMILIES)
def test_api_net_attaches_on_every_family_through_its_pooled_feature(backbone: str, options: dict | None) -> None:
    model = build_model(backbone, 5, "api_net", {"hidden": 8}, options).train()
    labels = torch.tensor([0, 0, 3, 3])
    output = model(torch.randn(4, 3, 32, 32), labels=labels)
    width = model.backbone.out_channels
    assert model.map1.in_features == 2 * width and model.map2.out_features == width
    assert output.logits.shape == (4, 5) and output.aux[0].shape == (16, 5)
    assert torch.isfinite(get_method("api_net").loss(output, labels))
    assert model.eval()(torch.randn(2, 3, 32, 32)).aux == ()


def _model(seed: int = 0, **options: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("wrn", 4, "api_net", {"hidden": 8, "dropout": 0.0, "freeze_backbone_epochs": 0, **options},
                       TINY)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=generator), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _engine(model: nn.Module, accumulation: int, epoch: int = 1, batch=None) -> TrainStep:
    step = TrainStep(model, _sgd(model), None, torch.device("cpu"), accumulation_steps=accumulation,
                     method=get_method("api_net"))
    step.epoch = epoch
    step(*(batch or _batch()))
    return step


def test_under_accumulation_each_micro_batch_mines_its_own_pairs_and_the_step_is_their_mean() -> None:
    images, labels = _batch()
    reference = _model().train()
    optimizer = _sgd(reference)
    optimizer.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        output = reference(images[part], labels=labels[part])
        ce, rank, _ = pair_terms(output)
        assert set(output.aux[2][4:].tolist()) <= set(labels[part].tolist())  # partners from the part only
        (0.5 * (ce + rank)).backward()
    optimizer.step()
    engine = _model().train()
    step = _engine(engine, accumulation=2)
    for (name, found), expected in zip(engine.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6, msg=name)
    counts = step.take_method_counts()
    assert counts is not None and counts[0] == 2 * 4 * 4  # two parts of 4 images: 16 pair rows each


def test_the_backbone_takes_no_step_in_its_frozen_epochs_and_the_head_does() -> None:
    for epoch, moves in ((2, False), (3, True)):
        model = _model(freeze_backbone_epochs=2).train()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        _engine(model, accumulation=1, epoch=epoch)
        after = dict(model.named_parameters())
        assert not torch.equal(after["map1.weight"], before["map1.weight"])
        assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
        first = next(name for name, _ in model.backbone.named_parameters())
        assert torch.equal(after[f"backbone.{first}"], before[f"backbone.{first}"]) != moves


def test_fit_records_the_pair_statistics_of_each_epoch() -> None:
    images, labels = _batch()
    data = [(images, labels), (images.flip(3), labels)]
    train = TrainSection(epochs=1, batch_size=8, lr=0.05, schedule="constant", precision="fp32", threads=1)
    result = fit(_model().float(), data, data[:1], train, method=get_method("api_net"))
    row = result.rows[0]
    pairs = row["train_pairs"]
    assert set(pairs) == {"self_beats_other", "margin_met", "rank_loss", "ce"}
    assert 0 <= pairs["margin_met"] <= pairs["self_beats_other"] <= 100 and 0 <= pairs["rank_loss"] <= 0.05 + 1
    assert row["train_loss"] == pytest.approx(pairs["ce"] + pairs["rank_loss"], rel=1e-5)
    assert list(row)[:4] == ["epoch", "train_loss", "train_top1", "train_pairs"] and "test_top1" in row


def _worker(rank: int) -> tuple[dict, list]:
    model = _model().train()
    images, labels = _batch()
    wrapped = nn.parallel.DistributedDataParallel(model)
    step = _engine(wrapped, accumulation=1, batch=(images[rank * 4:(rank + 1) * 4], labels[rank * 4:(rank + 1) * 4]))
    return ({k: v.detach().numpy().copy() for k, v in model.named_parameters()}, step.take_method_counts().tolist())


@pytest.mark.slow
def test_two_gloo_workers_mine_the_pairs_of_a_one_process_run_with_two_micro_batches() -> None:
    """Each worker's share is one micro-batch's worth of whole classes: the same pairs, the same step
    (parameters; BatchNorm running statistics differ: DDP keeps rank 0's, accumulation updates twice)."""
    results = on_two_workers(_worker)
    model = _model().train()
    step = _engine(model, accumulation=2)
    expected_counts = step.take_method_counts()
    for rank in (0, 1):
        weights, _ = results[rank]
        for name, value in model.named_parameters():
            torch.testing.assert_close(torch.from_numpy(weights[name]), value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(results[0][1], dtype=torch.float64) + torch.tensor(results[1][1], dtype=torch.float64),
                               expected_counts)


@pytest.mark.parametrize("in_memory", [False, True])
def test_every_loader_path_hands_out_the_class_balanced_batches(tmp_path: Path, in_memory: bool) -> None:
    from functools import partial

    from tiny_data import DATASET, prepare_tiny_bars

    from finebench.data.loader import build_loaders

    root = prepare_tiny_bars(tmp_path, 40, 8)
    options = parse_options("api_net", {"images_per_class": 2})
    loaders = build_loaders(DATASET, root, batch_size=8, input_size=16, augmentation="none", in_memory=in_memory,
                            sampler_factory=partial(get_method("api_net").batch_sampler, options))
    assert loaders.path == ("in_memory" if in_memory else "workers")
    loaders.train.sampler.set_epoch(1)
    batches = [labels for _, labels in loaders.train]
    assert len(batches) == 40 // 8
    for labels in batches:
        pairs = labels.view(4, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all() and len(set(pairs[:, 0].tolist())) == 4


@pytest.mark.slow
def test_a_recipe_trains_api_net_from_the_cli_and_records_its_pair_statistics(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 40, 20)
    recipe = tmp_path / "pairs.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "api_net"), batch_size=16).replace(
        'kind = "api_net"', 'kind = "api_net"\nhidden = 8\nfreeze_backbone_epochs = 0') + "threads = 1\n")
    results = tmp_path / "results"
    tree = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}  # this checkout's finebench
    run = subprocess.run([sys.executable, "-m", "finebench", "run", str(recipe), "--data-root", str(root),
                          "--results-dir", str(results)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         check=False, env=tree)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for path in results.glob("pairs/*/metrics.jsonl")
            for line in path.read_text().splitlines() if "train_pairs" in line]
    assert len(rows) == 1 and rows[0]["train_pairs"]["ce"] > 0
    summaries = [json.loads(path.read_text()) for path in results.glob("pairs/*/summary.json")]
    assert sorted(s["variant_name"] for s in summaries) == ["api_net-h8-f0", "baseline"]
    assert all(s["status"] == "finished" for s in summaries)
