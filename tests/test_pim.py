"""PIM (``finebench.methods.pim``) against the official chou141253/FGVC-PIM head's golden tensors
(tools/golden/pim.py): the selection, every output, each loss term and every gradient; then the Swin
stage features, the options, the one-line errors, the test-time records and a training step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from float_tolerance import assert_agrees, float32_atol
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_data import DATASET, tiny_recipe

from finebench.cli import main
from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method, parse_options
from finebench.methods.pim import PIMClassifier, loss_terms
from finebench.models.output import ModelOutput
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

GOLDEN = Path(__file__).parent / "data" / "golden" / "pim" / "golden.safetensors"
BACKBONE = "timm:swin_tiny_patch4_window7_224"
TINY_SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
"""A 64 px Swin: stage tokens 64/16/4/4 with 32/64/128/128 channels (tools/golden/pim.py's sizes)."""
GOLDEN_OPTIONS = {"selections": [48, 12, 3, 2], "fpn_size": 16, "combiner_dropout": 0.0}
IMAGE = 64

FORWARD_TERMS = 128 + 128 + 4 + 16 + 16 + 2 * 256 + 16
"""Longest accumulation chain (tests/float_tolerance.py), stage tokens to stage logits: the two
projections (128 wide), the token mixing (4 then 16 tokens), the first 1 x 1 convolution (16), the
BatchNorm's mean and variance over 4 images x 64 tokens, the last convolution (16)."""
COMBINER_TERMS = FORWARD_TERMS + 65 + 16 + 16 + 4 + 2 + 2 * 8 + 2 + 16
"""... then the combiner: the pool over 65 selected tokens, q/k (16 wide, mean over 4), the
convolution (16), the adjacency (2 joints), the BatchNorm over 4 x 2, the joint pool, the classifier."""
LOSS_TERMS = COMBINER_TERMS + 5 + 64 + 4 * 64 * 5
"""... the softmax over 5 classes, a stage's mean over 64 tokens, an MSE's mean over 4 x 64 x 5."""
GRADIENT_TERMS = 2 * LOSS_TERMS + 4 * 64
"""... back the same way, then a weight's gradient summed over 4 images x 64 tokens."""

BATCHNORM_FED_BIASES = {*(f"stage_heads.{i}.0.bias" for i in range(4)), "combiner.conv1.bias"}
"""Biases of the convolutions right before a BatchNorm: their gradient is exactly 0 in training."""

OFFICIAL_TERMS = {**{f"stage{i}": f"layer{i}" for i in range(1, 5)},
                  **{f"selected{i}": f"select_layer{i}" for i in range(1, 5)},
                  **{f"dropped{i}": f"drop_layer{i}" for i in range(1, 5)}, "combiner": "comb_outs"}


def official_name(name: str) -> str | None:
    """finebench's head parameter → the official one (None: the backbone)."""
    if name.startswith("backbone."):
        return None
    part, index, rest = (name.split(".", 2) + [""])[:3]
    if part == "projections":
        return f"fpn.Proj_layer{int(index) + 1}.{rest}"
    if part == "mixers":
        return f"fpn.Up_layer{int(index) + 2}.{rest}"
    if part == "stage_heads":
        return f"fpn_classifier_layer{int(index) + 1}.{rest}"
    if part == "classifier":
        return f"combiner.classifier.{index}"
    return name  # combiner.*


def golden_model(precision: str) -> tuple[dict[str, torch.Tensor], PIMClassifier]:
    everything = load_file(GOLDEN)
    golden = {k.removeprefix(f"{precision}."): v for k, v in everything.items() if k.startswith(f"{precision}.")}
    golden["labels"] = everything["labels"]
    model = build_model(BACKBONE, 5, "pim", GOLDEN_OPTIONS, TINY_SWIN)
    dtype = torch.float64 if precision == "f64" else torch.float32
    model = model.to(dtype)
    state = model.state_dict()
    for name in state:
        official = official_name(name)
        if official is not None:
            state[name] = golden[f"state.{official}"]
    model.load_state_dict(state)
    return golden, model.train()


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "chou141253/FGVC-PIM",
                                   "commit": "348edd983d0007a0cbbce65979aa2fbaade068c8"}


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_selection_outputs_losses_and_gradients_equal_the_official(precision: str) -> None:
    golden, model = golden_model(precision)
    tokens = [golden[f"tokens.{i}"].clone().requires_grad_(True) for i in range(4)]
    labels = golden["labels"]
    output = model.head(tokens)
    stage, selected, dropped, ranks = (output.aux[4 * k:4 * k + 4] for k in range(4))
    for i in range(4):  # the discrete decisions first, exactly
        assert torch.equal(ranks[i], golden[f"ranks.{i}"]), f"stage {i + 1}'s selection"
    for i in range(4):
        assert_agrees(stage[i].detach(), golden[f"stage.{i}"], FORWARD_TERMS, msg=f"stage {i + 1}")
        assert_agrees(selected[i].detach(), golden[f"selected.{i}"], FORWARD_TERMS)
        assert_agrees(dropped[i].detach(), golden[f"dropped.{i}"], FORWARD_TERMS)
    assert_agrees(output.logits.detach(), golden["combiner"], COMBINER_TERMS)
    terms = loss_terms(output, labels)
    assert sorted(name for name, _, _ in terms) == sorted(OFFICIAL_TERMS)
    for name, weight, term in terms:
        assert_agrees(term.detach().reshape(1), golden[f"term.{OFFICIAL_TERMS[name]}"], LOSS_TERMS, msg=name)
    weights = {name[:5]: float(weight) for name, weight, _ in terms}
    assert weights == {"stage": 0.5, "selec": 0.0, "dropp": 5.0, "combi": 1.0}
    loss = get_method("pim").loss(output, labels)
    assert_agrees(loss.detach().reshape(1), golden["loss"], LOSS_TERMS)
    loss.backward()
    for name, parameter in model.named_parameters():
        official = official_name(name)
        if official is None:
            continue
        expected = golden[f"grad.{official}"]
        if name in BATCHNORM_FED_BIASES and precision == "f32":
            # exactly 0 (a train-mode BatchNorm subtracts the bias again): both sides are rounding
            # noise, bounded by the gradient reaching that layer, i.e. by its weight's gradient
            scale = golden[f"grad.{official.removesuffix('bias')}weight"]
            torch.testing.assert_close(parameter.grad, expected, rtol=0.0,
                                       atol=float32_atol(scale, GRADIENT_TERMS), msg=name)
        else:
            assert_agrees(parameter.grad, expected, GRADIENT_TERMS, msg=name)
    for i, t in enumerate(tokens):
        assert_agrees(t.grad, golden[f"grad.backbone.tokens.{i}"], GRADIENT_TERMS, msg=f"tokens {i}")


def test_fed_ranks_replace_the_selection() -> None:
    golden, model = golden_model("f64")
    tokens = [golden[f"tokens.{i}"] for i in range(4)]
    reversed_ranks = [golden[f"ranks.{i}"].flip(1) for i in range(4)]
    output = model.head(tokens, ranks=reversed_ranks)
    assert all(torch.equal(a, b) for a, b in zip(output.aux[12:16], reversed_ranks, strict=True))
    for b in range(4):  # the first kept row is the stage's row the fed ranks put first
        assert torch.equal(output.aux[4][b, 0], output.aux[0][b, reversed_ranks[0][b, 0]])
    assert not torch.allclose(output.logits, model.head(tokens).logits)


SWIN_TERMS = 48 + 8 + sum(9 * c + 3 * 16 for c in (8, 16, 32, 64)) + 2 * 4 * (8 + 16 + 32)
"""Longest accumulation chain, image to the last stage (tools/golden/pim.py's Swin): the 4 x 4 x 3
patch, its LayerNorm (8); per stage (width c) two LayerNorms, q/k/v, the projection and the MLP's
c- and 4c-wide sums (9c), the 16-token window's scores, softmax and weighted sum (3 x 16); the three
mergings' LayerNorm and reduction over 4c."""


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_the_swin_stages_equal_the_official_bundled_timm(precision: str) -> None:
    """The official patched timm 0.4.12 Swin's four outputs (its weights mapped by current timm's own
    ``checkpoint_filter_fn``: each stage's closing merging becomes the next stage's opening one)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    everything = load_file(GOLDEN)
    dtype = torch.float64 if precision == "f64" else torch.float32
    model = build_model(BACKBONE, 5, "pim", GOLDEN_OPTIONS, {**TINY_SWIN, "embed_dim": 8}).to(dtype).eval()
    swin = model.backbone.model
    official = {k.removeprefix("swin.state."): v for k, v in everything.items() if k.startswith("swin.state.")}
    mapped = checkpoint_filter_fn(official, swin)
    assert "layers.1.downsample.reduction.weight" in mapped and "layers.0.downsample.reduction.weight" not in mapped
    tables = [k for k in mapped if k.endswith("relative_position_bias_table")]
    assert tables and all(torch.equal(mapped[k], official[k]) for k in tables)  # windows equal: nothing resampled
    swin.load_state_dict(mapped)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        tokens = model.stage_tokens(images.to(dtype))
    for i, ours in enumerate(tokens):
        assert_agrees(ours, everything[f"swin.{precision}.layer{i + 1}"], SWIN_TERMS, msg=f"stage {i + 1}")


def test_on_a_swin_the_stages_are_the_patch_mergings_and_the_last_stage() -> None:
    """The official stage outputs (bundled timm 0.4.12: merging at the end of each stage) are current
    timm's ``layers[1..3].downsample`` outputs and the last stage's, without the final norm."""
    torch.manual_seed(0)
    model = build_model(BACKBONE, 5, "pim", GOLDEN_OPTIONS, TINY_SWIN).eval()
    swin = model.backbone.model
    seen = []
    hooks = [swin.layers[i].downsample.register_forward_hook(lambda _m, _i, out: seen.append(out)) for i in (1, 2, 3)]
    hooks.append(swin.layers[3].register_forward_hook(lambda _m, _i, out: seen.append(out)))
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        tokens = model.stage_tokens(images)
        swin.forward_features(images)
    for hook in hooks:
        hook.remove()
    assert [tuple(t.shape) for t in tokens] == [(2, 64, 32), (2, 16, 64), (2, 4, 128), (2, 4, 128)]
    for ours, official in zip(tokens, seen[3:], strict=True):  # the timm forward (ours fired 3 merging hooks)
        assert torch.equal(ours, official.flatten(1, 2))
    assert model.backbone_taps_read == ("layers.3",)
    assert model.unused_parameter_names() == ["backbone.model.norm.weight", "backbone.model.norm.bias"]


def test_a_cnn_uses_the_deepest_map_of_each_of_its_four_deepest_strides() -> None:
    model = build_model("timm:resnet10t", 5, "pim", {**GOLDEN_OPTIONS, "image_size": 64})
    assert model.taps == ("layer1", "layer2", "layer3", "layer4")
    assert model(torch.randn(2, 3, 64, 64)).logits.shape == (2, 5)


def test_options_and_table_names() -> None:
    method = get_method("pim")
    options = parse_options("pim", {})
    assert options.selections == [2048, 512, 128, 32] and options.fpn_size == 1536
    assert (options.stage_weight, options.selected_weight, options.dropped_weight, options.combiner_weight) == (
        0.5, 0.0, 5.0, 1.0)
    assert method.table_name(options) == "pim"
    assert method.table_name(parse_options("pim", GOLDEN_OPTIONS)) == "pim-s48-12-3-2-f16-combiner_dropout0"
    assert method.table_name(parse_options("pim", {"dropped_weight": 2.5})) == "pim-dropped_weight2.5"
    assert method.settings(options).startswith("selections 2048/512/128/32 · FPN 1536")
    with pytest.raises(FinebenchError, match=r"selections"):
        parse_options("pim", {"selections": [1, 2, 3]})


@pytest.mark.parametrize(("backbone", "options", "variant", "message"), [
    ("wrn", {"depth": 10, "width": 1}, {}, r"^variant 'pim' on wrn: expected a timm backbone with four stages"),
    ("timm:test_vit", None, {}, r"^variant 'pim' on timm:test_vit: expected a timm backbone with four stages"),
    (BACKBONE, TINY_SWIN, {}, (r"^variant 'pim' on timm:swin_tiny_patch4_window7_224: selections\[0\] = 2048 is "
                               r"more than stage 1's 64 tokens at 64 px; expected at most 64/16/4/4")),
    (BACKBONE, TINY_SWIN, {"selections": [10, 10, 4, 4]}, r"^variant 'pim': selections total 28; expected at least 32"),
    (BACKBONE, TINY_SWIN, {**GOLDEN_OPTIONS, "image_size": 32},
     r"^variant 'pim' on timm:swin_tiny_patch4_window7_224: image_size 32 but the Swin is built for 64"),
])
def test_one_line_errors_name_what_works(backbone: str, options: dict | None, variant: dict, message: str) -> None:
    with pytest.raises(FinebenchError, match=message) as error:
        build_model(backbone, 5, "pim", variant, options)
    assert "\n" not in str(error.value)


def test_the_wrong_input_size_is_a_one_line_error() -> None:
    model = build_model(BACKBONE, 5, "pim", GOLDEN_OPTIONS, TINY_SWIN).eval()
    with pytest.raises(FinebenchError, match=r"^variant 'pim': input \(32, 32\) but the model was built for \(64, 64\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_a_stage_keeping_every_token_has_no_dropped_term() -> None:
    """The official MSE over no dropped tokens is NaN; finebench leaves the term out."""
    model = build_model(BACKBONE, 5, "pim", {**GOLDEN_OPTIONS, "selections": [48, 12, 4, 4]}, TINY_SWIN)
    output = model(torch.randn(2, 3, IMAGE, IMAGE))
    names = [name for name, _, _ in loss_terms(output, torch.tensor([0, 1]))]
    assert "dropped1" in names and "dropped3" not in names and "dropped4" not in names
    assert torch.isfinite(get_method("pim").loss(output, torch.tensor([0, 1])))


def test_the_test_records_follow_the_official_evaluation() -> None:
    """Two images, two classes, one token per stage: stage heads and combiner with known scores.
    "highest-k" sums the softmax scores of the k heads with the *lowest* top score (official order)."""
    method = get_method("pim")
    confident = torch.tensor([[4.0, 0.0]])  # class 0, top softmax 0.98
    unsure_one = torch.tensor([[0.0, 0.5]])  # class 1, top softmax 0.62
    unsure_zero = torch.tensor([[0.3, 0.0]])  # class 0, top softmax 0.57
    stage = [torch.stack([unsure_one, confident])] * 3 + [torch.stack([unsure_zero, confident])]
    combiner = torch.cat([confident, confident])
    selected = [torch.stack([confident, unsure_one])] * 4
    dropped = [torch.stack([unsure_one, unsure_one])] * 4
    output = ModelOutput(combiner.log_softmax(1), combiner,
                         aux=(*stage, *selected, *dropped, *([torch.zeros(2, 1, dtype=torch.long)] * 4), torch.ones(4)))
    labels = torch.tensor([0, 0])
    metrics = method.eval_metrics([float(c) for c in method.eval_counts(output, labels)], 2, None)
    assert metrics["top1_stage"] == {"1": 50.0, "2": 50.0, "3": 50.0, "4": 100.0}
    assert metrics["top1_selected"] == {str(i): 50.0 for i in range(1, 5)}
    assert metrics["top1_dropped"] == {str(i): 0.0 for i in range(1, 5)}
    # image 0: heads ordered 4 (0.57, class 0), 1-3 (0.62, class 1), combiner (0.98, class 0)
    # highest-1: stage 4 alone → right; highest-2..4: class 1 leads → wrong; highest-5: 0.98 + ... → right
    assert metrics["top1_highest"] == {"1": 100.0, "2": 50.0, "3": 50.0, "4": 50.0, "5": 100.0}
    assert set(method.prediction_labels) == {f"{key}.{entry}" for key, value in metrics.items() for entry in value}


def test_a_training_step_through_the_engine_equals_two_halves_of_the_official_loss() -> None:
    """accumulation_steps = 2: the engine weights each half by 1/2, the official divides each
    batch's loss by ``update_freq`` = 2; one SGD step of both on the same two halves agree."""
    torch.manual_seed(0)
    method = get_method("pim")
    swin = {**TINY_SWIN, "drop_path_rate": 0.0}  # no random draws: the two runs see the same network
    model = build_model(BACKBONE, 5, "pim", GOLDEN_OPTIONS, swin).double()
    reference = build_model(BACKBONE, 5, "pim", GOLDEN_OPTIONS, swin).double()
    reference.load_state_dict(model.state_dict())
    images = torch.randn(4, 3, IMAGE, IMAGE, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    train = TrainSection(epochs=1, batch_size=4, schedule="constant", precision="fp32", lr=0.1, optimizer="sgd",
                         momentum=0.0, weight_decay=0.0, accumulation_steps=2, compile=False)
    step = build_train_step(model, train, steps_per_epoch=1, method=method)
    loss, _ = step(images, labels)
    assert torch.isfinite(loss)
    reference.train()
    for half in (slice(0, 2), slice(2, 4)):
        (method.loss(reference(images[half]), labels[half]) / 2).backward()
    with torch.no_grad():
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
            expected = theirs - 0.1 * theirs.grad if theirs.grad is not None else theirs
            torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12, msg=name)


def tiny_pim_recipe(folder: Path, selections: str, backbone: str = BACKBONE, more: str = "") -> Path:
    """A one-epoch pim recipe at 64 px (mnist5k ships inside a package), by default on the tiny Swin."""
    text = tiny_recipe(variants=("pim",), input_size=IMAGE, dataset=DATASET)
    options = TINY_SWIN if backbone == BACKBONE else {}
    listed = ", ".join(f"{key} = {list(value) if isinstance(value, tuple) else value}" for key, value in options.items())
    text = text.replace('backbone = "wrn"\noptions = { depth = 10, width = 1 }',
                        f'backbone = "{backbone}"' + (f"\noptions = {{ {listed} }}" if listed else ""))
    text = text.replace('kind = "pim"', f'kind = "pim"\nselections = {selections}\nfpn_size = 16{more}')
    recipe = folder / "pim_tiny.toml"
    recipe.write_text(text)
    return recipe


def finebench(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``finebench ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["finebench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_a_dry_run_with_too_many_selections_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    recipe = tiny_pim_recipe(tmp_path, "[2048, 512, 128, 32]")
    code, _, err = finebench(monkeypatch, capsys, "run", str(recipe), "--dry-run", "--results-dir",
                             str(tmp_path / "results"), "--data-root", str(tmp_path / "data"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert "selections[0] = 2048 is more than stage 1's 64 tokens at 64 px; expected at most 64/16/4/4" in lines[0]
    assert not (tmp_path / "results").exists()


def test_a_dry_run_at_another_input_size_than_built_for_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    recipe = tiny_pim_recipe(tmp_path, "[24, 8, 2, 1]", "timm:test_resnet", "\nimage_size = 32")
    code, _, err = finebench(monkeypatch, capsys, "run", str(recipe), "--dry-run", "--results-dir",
                             str(tmp_path / "results"), "--data-root", str(tmp_path / "data"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert "variant 'pim': input (64, 64) but the model was built for (32, 32)" in lines[0]
    assert not (tmp_path / "results").exists()


def test_profile_takes_the_options_as_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``image_size`` rather than ``input_size``: profile's own ``--input-size`` would take that flag."""
    code, out, err = finebench(monkeypatch, capsys, "profile", "--backbone", "timm:test_resnet", "--variant", "pim",
                               "--selections", "[24, 8, 2, 1]", "--fpn-size", "16", "--image-size", "32",
                               "--input-size", "32")
    assert code == 0, err
    assert "pim-s24-8-2-1-f16-i32" in out and "layer1:32@4 layer2:48@8 layer3:192@16 layer4:96@32" in out


def test_a_tiny_swin_recipe_dry_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    recipe = tiny_pim_recipe(tmp_path, "[48, 12, 3, 2]")
    code, out, err = finebench(monkeypatch, capsys, "run", str(recipe), "--dry-run", "--results-dir",
                               str(tmp_path / "results"), "--data-root", str(tmp_path / "data"))
    assert code == 0, err
    assert "pim-s48-12-3-2-f16" in out and "selections 48/12/3/2 · FPN 16" in out
    assert not (tmp_path / "results").exists()
