"""TransFG (``finebench.methods.transfg``) against the official TACJu/TransFG code's golden tensors
(tools/golden/transfg.py): the position-grid resize, the selected tokens, the part CLS, the logits,
both loss terms and every gradient; then the options, the one-line errors and the training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from float_tolerance import assert_agrees
from safetensors import safe_open
from safetensors.torch import load_file

from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method, parse_options
from finebench.methods.transfg import TransFGClassifier, contrastive_loss

GOLDEN = Path(__file__).parent / "data" / "golden" / "transfg" / "golden.safetensors"
BACKBONE = "timm:vit_tiny_patch16_224"
TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 4, "mlp_ratio": 2}
"""tools/golden/transfg.py's configuration: hidden 32, 4 heads, MLP 64, 4 blocks, patch 16."""
IMAGE = 64

FORWARD_TERMS = 3 * 16 * 16 + 4 * (32 + 32 + 8 + 26 + 26 + 32 + 32 + 32 + 64) + 32
"""Longest accumulation chain (tests/float_tolerance.py), image to logits: the 16 x 16 patch
convolution, then per block a LayerNorm, q/k/v, the 8-wide head scores, the softmax and the
weighted sum over 26 tokens, the projection, a LayerNorm and the MLP (32 then 64 wide); the head."""
LOSS_TERMS = FORWARD_TERMS + 5 + 4 + 32 + 16
"""... the softmax over 5 classes and the mean over 4 images; the CLS norm and 4 x 4 cosines."""
GRADIENT_TERMS = 2 * LOSS_TERMS + 4 * 26
"""... back the same way, then a weight's gradient summed over the 4 images' 26 tokens."""


def official_name(name: str) -> list[str]:
    """finebench's state-dict name → the official ones (the fused q/k/v: three, in that order)."""
    blocks = 4
    name = name.removeprefix("backbone.model.")
    if name.startswith("classifier."):
        return ["part_head." + name.removeprefix("classifier.")]
    fixed = {"patch_embed.proj.weight": "transformer.embeddings.patch_embeddings.weight",
             "patch_embed.proj.bias": "transformer.embeddings.patch_embeddings.bias",
             "cls_token": "transformer.embeddings.cls_token",
             "pos_embed": "transformer.embeddings.position_embeddings",
             "norm.weight": "transformer.encoder.part_norm.weight", "norm.bias": "transformer.encoder.part_norm.bias"}
    if name in fixed:
        return [fixed[name]]
    _, index, rest = name.split(".", 2)
    block = "transformer.encoder." + ("part_layer" if int(index) == blocks - 1 else f"layer.{index}")
    return official_block_names(block, rest)


def official_block_names(block: str, rest: str) -> list[str]:
    """A timm ViT block's parameter (``rest``: ``attn.qkv.weight``, ``mlp.fc1.bias``, ...) under the
    official ``Block`` at ``block`` (TransFG's, which IELT's code shares; the fused q/k/v: three)."""
    if rest.startswith("attn.qkv."):
        return [f"{block}.attn.{part}.{rest.rsplit('.', 1)[1]}" for part in ("query", "key", "value")]
    parts = {"norm1": "attention_norm", "norm2": "ffn_norm", "attn.proj": "attn.out", "mlp.fc1": "ffn.fc1",
             "mlp.fc2": "ffn.fc2"}
    module, leaf = rest.rsplit(".", 1)
    return [f"{block}.{parts[module]}.{leaf}"]


def golden_model(precision: str) -> tuple[dict[str, torch.Tensor], TransFGClassifier]:
    """The finebench model holding the official weights after ``load_from`` (name map above)."""
    everything = load_file(GOLDEN)
    golden = {k.removeprefix(f"{precision}."): v for k, v in everything.items() if k.startswith(f"{precision}.")}
    model = build_model(BACKBONE, 5, "transfg", {"dropout": 0.0}, {**TINY_VIT, "img_size": IMAGE})
    dtype = torch.float64 if precision == "f64" else torch.float32
    state = {name: torch.cat([golden[f"state.{o}"] for o in official_name(name)])
             for name in model.state_dict()}
    model.load_state_dict(state)
    return golden, model.to(dtype).train()


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "TACJu/TransFG", "commit": "9336fba46a4ac8ed2e33072c5f74ab459b114e4a"}


def test_the_position_grid_is_resized_as_the_official_scipy_zoom() -> None:
    """tools/golden/transfg.py's pretrained embedding (seed 1003, a 14 x 14 grid, rounded to float32
    as the npz is) resized to the 5 x 5 grid of 64 px at stride 12: the official zoom's output is
    float32, two-point linear interpolation."""
    pretrained = (0.1 * torch.randn(1, 197, 32, generator=torch.Generator().manual_seed(1003),
                                    dtype=torch.float64)).float().double()
    method = get_method("transfg")
    options = parse_options("transfg", {})
    backbone = method.build_backbone(BACKBONE, {**TINY_VIT, "img_size": IMAGE}, options)
    assert tuple(backbone.model.pos_embed.shape) == (1, 197, 32)  # built at the pretrained size
    backbone.model.pos_embed.data = pretrained.float()
    model = method.attach(backbone, 5, options)
    official = load_file(GOLDEN)["f32.state.transformer.embeddings.position_embeddings"]
    assert_agrees(model.backbone.model.pos_embed.detach(), official, terms=2)
    assert model.backbone.model.patch_embed.proj.stride == (12, 12)


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_selection_outputs_losses_and_gradients_equal_the_official(precision: str) -> None:
    golden, model = golden_model(precision)
    dtype = torch.float64 if precision == "f64" else torch.float32
    images = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    labels = golden["labels"] if "labels" in golden else load_file(GOLDEN)["labels"]
    output = model(images)
    cls, selected, margin, weight = output.aux
    assert torch.equal(selected, golden["selected"])  # the discrete decisions first, exactly
    assert_agrees(cls.detach(), golden["part_cls"], FORWARD_TERMS)
    assert_agrees(output.logits.detach(), golden["logits"], FORWARD_TERMS)
    ce = torch.nn.functional.cross_entropy(output.logits, labels)
    assert_agrees(ce.detach().reshape(1), golden["ce"], LOSS_TERMS)
    assert_agrees(contrastive_loss(cls, labels, margin).detach().reshape(1).to(dtype), golden["contrast"], LOSS_TERMS)
    loss = get_method("transfg").loss(output, labels)
    assert_agrees(loss.detach().reshape(1).to(dtype), golden["loss"], LOSS_TERMS)
    assert (float(margin), float(weight)) == pytest.approx((0.4, 1.0))
    loss.backward()
    for name, parameter in model.named_parameters():
        expected = torch.cat([golden[f"grad.{o}"] for o in official_name(name)])
        assert_agrees(parameter.grad, expected, GRADIENT_TERMS, msg=name)


def test_fed_selections_replace_the_argmax() -> None:
    golden, model = golden_model("f64")
    images = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    other = torch.ones_like(golden["selected"])
    chosen = model(images, selected=other)
    assert torch.equal(chosen.aux[1], other)
    assert not torch.allclose(chosen.logits, model(images).logits)


def test_the_contrastive_term_is_the_official_formula_on_a_worked_example() -> None:
    """Two identical unit vectors of one class and an orthogonal one of another: the pulled pairs
    cost 0, the pushed ones max(0 - 0.4, 0) = 0; a third vector at cosine 0.8 with the first costs
    2 x (0.8 - 0.4) twice over (both orders, both copies)."""
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert float(contrastive_loss(features, torch.tensor([0, 0, 1]), 0.4)) == 0.0
    near = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6]])
    assert float(contrastive_loss(near, torch.tensor([0, 0, 1]), 0.4)) == pytest.approx(4 * 0.4 / 9)


def test_the_part_block_starts_fresh_unless_asked_and_the_norm_is_kept() -> None:
    """Weights load into the backbone at its pretrained size, then ``attach`` re-draws the last block
    (the official loader skips ``part_layer``) unless ``pretrained_part_block``; the final norm stays."""
    torch.manual_seed(0)
    pretrained = build_model(BACKBONE, 5, "baseline", None, TINY_VIT).backbone.model
    method = get_method("transfg")
    for keep in (False, True):
        options = parse_options("transfg", {"pretrained_part_block": keep})
        backbone = method.build_backbone(BACKBONE, {**TINY_VIT, "img_size": IMAGE}, options)
        backbone.model.load_state_dict(pretrained.state_dict())
        ours = method.attach(backbone, 5, options).backbone.model
        assert torch.equal(ours.blocks[-1].mlp.fc1.weight, pretrained.blocks[-1].mlp.fc1.weight) is keep
        assert torch.equal(ours.blocks[-1].attn.qkv.weight, pretrained.blocks[-1].attn.qkv.weight) is keep
        assert torch.equal(ours.blocks[0].mlp.fc1.weight, pretrained.blocks[0].mlp.fc1.weight)
        assert torch.equal(ours.norm.weight, pretrained.norm.weight)
        if not keep:  # the official MLP biases: N(0, 1e-6)
            assert ours.blocks[-1].mlp.fc1.bias.abs().max() < 1e-5


def test_options_and_table_names() -> None:
    method = get_method("transfg")
    assert (method.test_forward_passes, method.train_passes_per_image) == (1, 1)
    assert method.table_name(parse_options("transfg", {})) == "transfg"
    assert method.table_name(parse_options("transfg", {"stride": 16, "margin": 0.3})) == "transfg-s16-margin0.3"


@pytest.mark.parametrize(("backbone", "options", "variant", "message"), [
    ("timm:resnet10t", None, {}, r"^variant 'transfg' on timm:resnet10t: expected a timm Vision Transformer"),
    ("wrn", {"depth": 10, "width": 1}, {}, r"^variant 'transfg' on wrn: expected a timm Vision Transformer"),
    (BACKBONE, TINY_VIT, {"stride": 20}, r"^variant 'transfg': stride 20 is larger than the patch 16; expected 1 to 16"),
])
def test_one_line_errors_name_what_works(backbone: str, options: dict | None, variant: dict, message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        build_model(backbone, 5, "transfg", variant, options)


def test_the_wrong_input_size_is_a_one_line_error() -> None:
    model = build_model(BACKBONE, 5, "transfg", {}, {**TINY_VIT, "img_size": IMAGE}).eval()
    with pytest.raises(FinebenchError, match=r"^variant 'transfg': input \(32, 32\) but the model was built for "
                                             r"\(64, 64\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_transfg_profiles_dry_runs_and_trains_an_epoch_from_the_cli(tmp_path: Path) -> None:
    """Issue 28's smoke check on the tests' tiny data: a three-block ViT-Ti at 32 px (stride 12: 2 x 2
    tokens), baseline and transfg, through profile, the dry run, one epoch, and the report."""
    from tiny_data import prepare_tiny_bars, tiny_recipe
    from typer.testing import CliRunner

    from finebench.cli import app

    data_root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "transfg.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "transfg"), input_size=32, backbone=BACKBONE,
                                  model_options="{ img_size = 32, depth = 3 }", extra_model='pretrained = "none"',
                                  extra_train="threads = 1"))

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
        assert result.exit_code == 0, (result.output, result.exception)
        return result.stdout

    baseline, transfg = json.loads(invoke("profile", str(recipe), "--json"))["rows"]
    # the attention product costs FLOPs; the part block is the last block and the head the same: no parameters
    assert transfg["flops"] > baseline["flops"] and transfg["params"] == baseline["params"]
    results = tmp_path / "results"
    assert invoke("run", str(recipe), "--data-root", str(data_root), "--results-dir", str(results),
                  "--dry-run").count("│ new ") == 2
    invoke("run", str(recipe), "--data-root", str(data_root), "--results-dir", str(results), "--quiet")
    summaries = {s["variant"]: s for s in (json.loads(p.read_text()) for p in results.glob("*/*/summary.json"))}
    assert summaries["transfg"]["status"] == "finished" and summaries["transfg"]["flops"] == transfg["flops"]
    assert "transfg" in invoke("report", str(results), "--format", "csv")
