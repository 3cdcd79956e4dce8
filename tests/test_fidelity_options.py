"""The fidelity options that golden tensors cannot show: ghost BatchNorm, classifier init, validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method
from finebench.models.batchnorm import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    convert_ghost_batchnorm,
)
from finebench.train_settings import TrainSection


@pytest.mark.parametrize(("shape", "group"), [((8, 3, 4, 4), 4), ((10, 3, 4, 4), 4), ((6, 5), 2)])
def test_ghost_batchnorm_equals_torch_batchnorm_chunk_by_chunk(shape: tuple[int, ...], group: int) -> None:
    """Each group normalised by torch's BatchNorm on that group alone; running statistics are
    those of a BatchNorm that saw only the first group (DataParallel's replica 0)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    reference = copy.deepcopy(bn)
    holder = nn.Sequential(bn)
    convert_ghost_batchnorm(holder, group)
    ghost = holder[0]
    assert isinstance(ghost, GhostBatchNorm2d if len(shape) == 4 else GhostBatchNorm1d)
    assert ghost.weight is bn.weight and ghost.running_mean is bn.running_mean  # shared, not copied
    x = torch.randn(shape, requires_grad=True)
    out = ghost(x)
    out.pow(2).sum().backward()
    expected_parts, replica0 = [], None
    x_ref = x.detach().clone().requires_grad_(True)
    for index, part in enumerate(x_ref.split(group)):
        replica = reference if index == 0 else copy.deepcopy(reference)
        expected_parts.append(replica(part))
        replica0 = replica0 or replica
    expected = torch.cat(expected_parts)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ghost.running_mean, reference.running_mean)
    torch.testing.assert_close(ghost.running_var, reference.running_var)
    assert not torch.allclose(out, nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
    ghost.eval()
    reference.eval()
    torch.testing.assert_close(ghost(x), reference(x))


def test_ghost_batchnorm_keeps_state_dict_keys_and_covers_every_batchnorm() -> None:
    model = build_model("wrn", 10, "attention", {"attention_depth": 2, "attention_width": 2}, {"depth": 10, "width": 1})
    keys = list(model.state_dict())
    convert_ghost_batchnorm(model, 2)
    assert list(model.state_dict()) == keys
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {GhostBatchNorm2d, GhostBatchNorm1d}  # the global gate's BatchNorm1d too


def test_batchnorm_group_excludes_sync_batchnorm() -> None:
    with pytest.raises(ValueError, match="batchnorm_group"):
        TrainSection(epochs=1, batch_size=8, schedule="constant", batchnorm_group=4, sync_batchnorm=True)


@pytest.mark.parametrize("init", ["default", "kaiming"])
def test_wrn_classifier_init(init: str) -> None:
    """PyTorch's default Linear init is uniform within 1/sqrt(fan_in); Kaiming-normal goes beyond it."""
    torch.manual_seed(0)
    model = build_model("wrn", 100, "baseline", None, {"depth": 10, "width": 1, "classifier_init": init})
    bound = model.classifier.in_features ** -0.5
    beyond = model.classifier.weight.abs().max().item() > bound * 1.0001
    assert beyond == (init == "kaiming")


@pytest.mark.parametrize(("options", "message"), [
    ({"stem": "bn"}, "stem='bn' is invalid"),
    ({"shortcut": "raw"}, "shortcut='raw' is invalid"),
    ({"classifier_init": "xavier"}, "classifier_init='xavier' is invalid"),
])
def test_wrn_fidelity_options_are_checked(options: dict[str, str], message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        build_model("wrn", 10, "baseline", None, {"depth": 10, "width": 1, **options})


def test_tap_norm_separate_needs_the_cifar_wrn_and_reg_masks_is_checked() -> None:
    with pytest.raises(FinebenchError, match="tap_norm='separate' is implemented for the CIFAR WRN"):
        build_model("resnext_cifar", 10, "attention", {"tap_norm": "separate"}, {"depth": 11, "cardinality": 2,
                                                                                   "base_width": 4})
    with pytest.raises(FinebenchError, match="reg_masks='none'"):
        build_model("wrn", 10, "attention", {"reg_masks": "none"}, {"depth": 10, "width": 1})


def test_separate_tap_norms_only_for_the_taps_in_use() -> None:
    model = build_model("wrn", 10, "attention", {"attention_depth": 2, "tap_norm": "separate"}, {"depth": 10, "width": 1})
    assert list(model.backbone.tap_norms) == ["group1"]
    model.train()
    model(torch.randn(2, 3, 32, 32)).log_probs.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing unused (DDP needs that)


RECIPE = """
description = "t"
{top}
[dataset]
name = "cifar10"
[model]
backbone = "wrn"
options = {{ depth = 10, width = 1 }}
[[variants]]
kind = "baseline"
[[variants]]
kind = "attention"
attention_width = 2
[train]
epochs = 1
batch_size = 8
milestones = [1]
{tables}
"""
TABLES = """
[logged.attention]
train = { optimizer = "sgd", batchnorm_group = 4 }
model_options = { stem = "conv" }
variant = { reg_masks = "full" }
[logged.attention-ad3-aw2]
train = { batchnorm_group = 2 }
"""


def logged_runs(tmp_path, top: str, tables: str, overrides: tuple[str, ...] = ()):
    """The runs of a tiny baseline + attention recipe with ``top`` lines and ``tables`` (``[logged.*]``), by kind."""
    from finebench.recipe import expand_runs, load_recipe

    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(top=top, tables=tables))
    return {run.variant_kind: run for run in expand_runs(load_recipe(path, overrides))}


def test_logged_tables_apply_per_variant_name_over_kind(tmp_path) -> None:
    runs = logged_runs(tmp_path, 'fidelity = "logged"', TABLES)
    attention, baseline = runs["attention"], runs["baseline"]
    assert attention.config["train"]["optimizer"] == "sgd" and attention.config["train"]["batchnorm_group"] == 2
    assert attention.config["model"]["options"] == {"depth": 10, "width": 1, "stem": "conv"}
    assert attention.config["variant"]["options"]["reg_masks"] == "full"
    assert attention.variant_name == "attention-ad3-aw2"  # names do not follow the log-time settings
    assert attention.train_section().optimizer == "sgd"
    assert baseline.config["train"]["optimizer"] == "nesterov" and "logged" not in baseline.config


def test_released_fidelity_keeps_the_run_ids_of_a_recipe_without_tables(tmp_path) -> None:
    plain = logged_runs(tmp_path, "", "")
    released = logged_runs(tmp_path, 'fidelity = "released"', TABLES)
    switched = logged_runs(tmp_path, 'fidelity = "logged"', TABLES, ("fidelity=released",))
    logged = logged_runs(tmp_path, 'fidelity = "logged"', TABLES)
    for kind in ("baseline", "attention"):
        assert plain[kind].run_id == released[kind].run_id == switched[kind].run_id
    assert logged["baseline"].run_id == plain["baseline"].run_id  # no table names it
    assert logged["attention"].run_id != plain["attention"].run_id


@pytest.mark.parametrize(("tables", "message"), [
    ('[logged.se]\ntrain = { optimizer = "sgd" }', r"logged: \['se'\] name no variant"),
    ("[logged.baseline]\ntrain = { batch_size = 4 }", "cannot differ per variant"),
    ('[logged.attention]\nvariant = { reg_masks = "half" }', "reg_masks"),
    ('[logged.baseline]\ntrain = { optimizer = "sgdd" }', "optimizer"),
])
def test_bad_logged_tables_are_named(tmp_path, tables: str, message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        logged_runs(tmp_path, 'fidelity = "logged"', tables)


@pytest.mark.parametrize("group", [0, 4])
def test_fit_trains_with_ghost_batchnorm_when_asked(group: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from finebench.train.fit import fit
    from finebench.train.rng import seed_everything

    seed_everything(0)
    model = build_model("wrn", 4, "baseline", None, {"depth": 10, "width": 1})
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 3, 8, 8, generator=generator), torch.arange(16) % 4)
    train = TrainSection(epochs=1, batch_size=8, schedule="constant", precision="fp32", batchnorm_group=group,
                         compile=False, channels_last=False, device="cpu")
    result = fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8), train, method=get_method("baseline"))
    assert result.status == "finished"
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]
    assert bool(ghosts) == bool(group) and all(m.group_size == group for m in ghosts)


def test_report_groups_runs_written_before_the_fidelity_settings_with_runs_at_their_defaults() -> None:
    from finebench.report.records import RunSummary, fingerprint, run_settings

    summary = RunSummary.model_validate({"run_id": "x", "recipe": "r", "status": "finished", "dataset": "cifar10",
                                         "backbone": "wrn", "backbone_label": "WRN-10-1", "variant": "attention",
                                         "variant_name": "a", "seed": 0})
    old = {"train": {"optimizer": "nesterov", "lr": 0.1}, "variant": {"kind": "attention", "options": {"reg_w": 0.001}}}
    new = {"fidelity": "released", "train": {"optimizer": "nesterov", "lr": 0.1, "batchnorm_group": 0},
           "variant": {"kind": "attention", "options": {"reg_w": 0.001, "reg_masks": "pooled", "tap_norm": "shared"}}}
    logged = {"fidelity": "logged", "logged": {"train": {"batchnorm_group": 64}},
              "train": {"optimizer": "nesterov", "lr": 0.1, "batchnorm_group": 64},
              "variant": {"kind": "attention", "options": {"reg_w": 0.001, "reg_masks": "full", "tap_norm": "shared"}}}
    prints = [fingerprint(run_settings(summary, config)) for config in (old, new, logged)]
    assert prints[0] == prints[1] != prints[2]
