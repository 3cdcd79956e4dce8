"""IELT (``finebench.methods.ielt``) against the official mobulan/IELT code's golden tensors
(tools/golden/ielt.py): the position-grid resize, the votes and selections of every layer and of
the cross-layer refinement, the CLS tokens, both logits, both loss terms, every gradient and one
dynamic-selection move; then the options, the one-line errors, the checkpointed selection state and
a training step through the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from float_tolerance import assert_agrees
from safetensors import safe_open
from safetensors.torch import load_file
from test_transfg import official_block_names

from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method, parse_options
from finebench.methods.ielt import (
    IELTClassifier,
    layer_counts,
    most_voted,
    updated_rates,
)
from finebench.train.step import TrainStep

GOLDEN = Path(__file__).parent / "data" / "golden" / "ielt" / "golden.safetensors"
BACKBONE = "timm:vit_tiny_patch16_224"
TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 4, "mlp_ratio": 2}
"""tools/golden/ielt.py's configuration: hidden 32, 4 heads, MLP 64, 4 blocks, patch 16."""
IMAGE = 128
SELECT = [16, 14, 12]
"""tools/golden/ielt.py's selection numbers for the 3 voting layers (total 42)."""

BLOCK_TERMS = 32 + 32 + 8 + 65 + 65 + 32 + 32 + 32 + 64
"""Per block: a LayerNorm, q/k/v, the 8-wide head scores, the softmax and weighted sum over at
most 65 tokens, the projection, a LayerNorm and the MLP (32 then 64 wide)."""
FORWARD_TERMS = 3 * 16 * 16 + 5 * BLOCK_TERMS + 2 * 32 + 32 + 5 + 32
"""Longest accumulation chain (tests/float_tolerance.py), image to logits: the 16 x 16 patch
convolution, 3 backbone blocks, the CLR and key blocks, their LayerNorms, the head, the softmax
over 5 classes and the 32-wide sum of each class's head weights."""
LOSS_TERMS = FORWARD_TERMS + 5 + 4
"""... the softmax over 5 classes and the mean over 4 images."""
GRADIENT_TERMS = 2 * LOSS_TERMS + 4 * 65
"""... back the same way, then a weight's gradient summed over the 4 images' 65 tokens."""


def official_names(name: str) -> list[str] | None:
    """finebench's state-dict name → the official ones (the fused q/k/v: three, in that order);
    None for what the official model lacks (the backbone's last block and final norm, the buffers)."""
    if name.startswith("classifier."):
        return ["head." + name.removeprefix("classifier.")]
    if name.startswith(("clr_norm.", "key_norm.")):
        return [("encoder.clr_encoder." if name.startswith("clr") else "encoder.") + name]
    fixed = {"backbone.model.patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
             "backbone.model.patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
             "backbone.model.cls_token": "embeddings.cls_token",
             "backbone.model.pos_embed": "embeddings.position_embeddings"}
    if name in fixed:
        return [fixed[name]]
    if name.startswith("clr_block."):
        block, rest = "encoder.clr_layer", name.removeprefix("clr_block.")
    elif name.startswith("key_block."):
        block, rest = "encoder.key_layer", name.removeprefix("key_block.")
    elif name.startswith("backbone.model.blocks."):
        index, rest = name.removeprefix("backbone.model.blocks.").split(".", 1)
        if int(index) == len(SELECT):
            return None
        block = f"encoder.layer.{index}"
    else:
        return None
    return official_block_names(block, rest)


def tiny_model(**options) -> IELTClassifier:
    model = build_model(BACKBONE, 5, "ielt", {"dropout": 0.0, "select_numbers": SELECT, **options},
                        {**TINY_VIT, "img_size": IMAGE})
    assert isinstance(model, IELTClassifier)
    return model


def golden_model(precision: str) -> tuple[dict[str, torch.Tensor], IELTClassifier]:
    """The finebench model holding the official weights (name map above), in training mode."""
    everything = load_file(GOLDEN)
    golden = {k.removeprefix(f"{precision}."): v for k, v in everything.items() if k.startswith(f"{precision}.")}
    golden["labels"] = everything["labels"]
    model = tiny_model()
    dtype = torch.float64 if precision == "f64" else torch.float32
    state = model.state_dict()
    for name in state:
        names = official_names(name)
        if names is not None:  # float32 values widened: .to(dtype) below is exact for the float32 run
            state[name] = torch.cat([everything[f"f64.state.{o}"] for o in names])
    model.load_state_dict(state)
    return golden, model.to(dtype).train()


def images(dtype: torch.dtype) -> torch.Tensor:
    """tools/golden/ielt.py's images (common.generated(7, ...))."""
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)


def official_selections(golden: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [golden[f"selected.{layer}"] for layer in range(len(SELECT))]


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "mobulan/IELT", "commit": "b185111782d4a5f1e835060377022a7355bd5eec"}


def test_the_position_grid_is_resized_as_the_official_scipy_zoom() -> None:
    """tools/golden/transfg.py's pretrained embedding (seed 1003, a 14 x 14 grid, rounded to float32
    as the npz is) resized to the 8 x 8 grid of 128 px. SciPy interpolates in float64 and rounds to
    float32 once, so the formula is compared in float64 (two-point linear interpolation, then that
    rounding). In float32, torch's interpolation weights themselves round (positions up to 13 x
    13/7): about 1e-6 relative, far below what training notices."""
    pretrained = (0.1 * torch.randn(1, 197, 32, generator=torch.Generator().manual_seed(1003),
                                    dtype=torch.float64)).float().double()
    method = get_method("ielt")
    options = parse_options("ielt", {"select_numbers": SELECT})
    backbone = method.build_backbone(BACKBONE, {**TINY_VIT, "img_size": IMAGE}, options)
    assert tuple(backbone.model.pos_embed.shape) == (1, 197, 32)  # built at the pretrained size
    backbone.model.pos_embed.data = pretrained
    model = method.attach(backbone, 5, options)
    official = load_file(GOLDEN)["f64.state.embeddings.position_embeddings"].float()
    assert_agrees(model.backbone.model.pos_embed.detach().float(), official, terms=2)
    assert model.backbone.model.patch_embed.proj.stride == (16, 16)  # non-overlapping


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_every_layer_votes_as_the_official_and_keeps_equally_voted_tokens(precision: str) -> None:
    """The discrete decisions first: each layer's smoothed votes are the official's exactly, and the
    tokens kept have, rank by rank, the official's votes (which of equally voted tokens comes first
    is the sort's: the official CUDA order is not reproducible, so the next test feeds it in)."""
    golden, model = golden_model(precision)
    output = model(images(model.classifier.weight.dtype))
    chosen, votes = output.aux[4], output.aux[5]
    assert list(model.select_counts()) == SELECT
    for layer, ours in enumerate(chosen.split(SELECT, dim=1)):
        assert torch.equal(votes[:, layer], golden[f"votes.{layer}"])
        official = golden[f"selected.{layer}"]
        assert torch.equal(votes[:, layer].gather(1, ours - 1), votes[:, layer].gather(1, official - 1))
        assert torch.equal(ours, most_voted(votes[:, layer], SELECT[layer]))


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_with_the_official_selections_outputs_losses_and_gradients_equal_the_official(precision: str) -> None:
    golden, model = golden_model(precision)
    dtype = model.classifier.weight.dtype
    kept: dict[str, torch.Tensor] = {}
    model.clr_norm.register_forward_hook(lambda _m, _i, out: kept.__setitem__("clr", out[:, 0]))
    model.key_norm.register_forward_hook(lambda _m, _i, out: kept.__setitem__("key", out[:, 0]))
    output = model(images(dtype), selected=official_selections(golden), key_selected=golden["key_selected"])
    complement, weight, key_selected, key_votes = output.aux[:4]
    assert torch.equal(key_votes, golden["key_votes"])  # the CLR stage's votes, exactly
    assert torch.equal(key_votes.gather(1, most_voted(key_votes, 24) - 1),
                       key_votes.gather(1, golden["key_selected"] - 1))
    assert torch.equal(key_selected, golden["key_selected"])
    assert_agrees(kept["clr"].detach(), golden["clr_cls"], FORWARD_TERMS)
    assert_agrees(kept["key"].detach(), golden["key_cls"], FORWARD_TERMS)
    assert_agrees(output.logits.detach(), golden["logits"], FORWARD_TERMS)
    assert_agrees(complement.detach(), golden["complement_logits"], FORWARD_TERMS)
    labels = golden["labels"]
    for term, logits in (("loss_part", output.logits), ("loss_complement", complement)):
        ce = torch.nn.functional.cross_entropy(logits, labels)
        assert_agrees(ce.detach().reshape(1), golden[term], LOSS_TERMS)
    loss = get_method("ielt").loss(output, labels)
    assert loss.dtype == dtype and float(weight) == 0.4
    assert_agrees(loss.detach().reshape(1), golden["loss"], LOSS_TERMS)
    loss.backward()
    for name, parameter in model.named_parameters():
        names = official_names(name)
        if names is None:  # the backbone's last block and final norm: not read
            assert parameter.grad is None, name
            assert name in model.unused_parameter_names()
            continue
        assert_agrees(parameter.grad, torch.cat([golden[f"grad.{o}"] for o in names]), GRADIENT_TERMS, msg=name)


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_a_dynamic_selection_move_equals_the_official(precision: str) -> None:
    """``count_patch`` and ``update_layer_select`` on the forward's key tokens, from the initial
    rates: the official keeps them in float32 (a plain tensor the model's dtype never changes),
    and so does finebench, so both precisions agree bit for bit."""
    golden, model = golden_model(precision)
    assert torch.equal(model.select_rate.float(), golden["rate_before"])
    counts = layer_counts(golden["rate_before"], 42, golden["key_selected"])
    assert torch.equal(counts, golden["layer_count"].long())
    assert torch.equal(updated_rates(golden["rate_before"], counts, 0.001), golden["rate_after"])
    model.update_rates(golden["key_selected"])
    assert torch.equal(model.select_rate.float(), golden["rate_after"])


def test_rounded_boundaries_credit_each_key_token_to_the_layer_it_was_kept_from() -> None:
    """Shares 0.39/0.33/0.28 of 42: 16.38, 13.86, 11.76 tokens, of which round() keeps 16, 14, 12.
    CLR positions 16 and 30 (the first kept tokens of the second and third layers) are credited
    officially to the first and second layers (16 < 16.38, 30 < 30.24); with the fix to their own."""
    rates = torch.tensor([0.39, 0.33, 0.28])
    key = torch.tensor([[17, 42, 1, 31]])  # 1-based: positions 16, 41, 0, 30
    assert layer_counts(rates, 42, key).tolist() == [2, 1, 1]
    assert layer_counts(rates, 42, key, rounded=True).tolist() == [1, 1, 2]
    for rounded, credited in ((False, [1, 1, 0]), (True, [0, 1, 1])):
        model = tiny_model(rounded_boundaries=rounded)
        model.select_rate.copy_(rates)
        model.update_rates(torch.tensor([[17, 31]]))
        assert torch.equal(model.select_rate, updated_rates(rates, torch.tensor(credited), 0.001))
    assert get_method("ielt").table_name(parse_options("ielt", {"rounded_boundaries": True})) == \
        "ielt-rounded-boundaries"


def test_the_warm_up_is_counted_in_epochs_of_training_forwards() -> None:
    """update_after_epochs = 2 with 3 forwards an epoch: the official ``count >= 2 x 3`` first
    holds at the 6th training forward (the last of epoch 2); evaluation forwards do not count."""
    model = tiny_model(update_after_epochs=2).train()
    batch = images(torch.float32)[:2]
    start = model.select_rate.clone()
    with torch.no_grad():
        for epoch, forwards in ((1, 3), (2, 3)):
            model.start_step(epoch)
            for _ in range(forwards):
                before = model.select_rate.clone()
                model(batch)
                moved = not torch.equal(model.select_rate, before)
                assert moved is (int(model.training_forwards) == 6), int(model.training_forwards)
            model.eval()
            model(batch)
            model.train()
    assert int(model.warm_forwards) == 6 and int(model.training_forwards) == 6
    assert not torch.equal(model.select_rate, start)
    static = tiny_model(update_after_epochs=0, dynamic_selection=False).train()
    with torch.no_grad():
        static(batch)
    assert torch.equal(static.select_rate, start)


def test_the_selection_state_survives_a_state_dict_round_trip() -> None:
    """Unlike the official (a plain tensor, reset on resume), the shares and the forward counts are
    buffers: a checkpoint keeps them and a resumed model selects as the saved one."""
    model = tiny_model(update_after_epochs=0).train()
    with torch.no_grad():
        for _ in range(3):
            model(images(torch.float32)[:2])
    state = model.state_dict()
    assert {"select_rate", "training_forwards", "warm_forwards"} <= set(state)
    assert not torch.equal(state["select_rate"], torch.tensor(SELECT) / 42)
    resumed = tiny_model(update_after_epochs=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.select_rate, model.select_rate)
    assert int(resumed.training_forwards) == 3 and resumed.select_counts() == model.select_counts()


def test_the_head_starts_at_zero_and_the_extra_blocks_fresh_unless_copied_from_the_last() -> None:
    torch.manual_seed(0)
    pretrained = build_model(BACKBONE, 5, "baseline", None, TINY_VIT).backbone.model
    method = get_method("ielt")
    for copied in (False, True):
        options = parse_options("ielt", {"select_numbers": SELECT, "extra_blocks_from_last": copied})
        backbone = method.build_backbone(BACKBONE, {**TINY_VIT, "img_size": IMAGE}, options)
        backbone.model.load_state_dict(pretrained.state_dict())
        model = method.attach(backbone, 5, options)
        assert not model.classifier.weight.any() and not model.classifier.bias.any()
        for block in (model.clr_block, model.key_block):
            assert block is not model.backbone.model.blocks[-1]
            assert torch.equal(block.mlp.fc1.weight, pretrained.blocks[-1].mlp.fc1.weight) is copied
            assert torch.equal(block.attn.qkv.weight, pretrained.blocks[-1].attn.qkv.weight) is copied
        assert not torch.equal(model.clr_block.mlp.fc1.weight, model.key_block.mlp.fc1.weight) or copied
        unused = model.unused_parameter_names()
        assert "backbone.model.blocks.3.mlp.fc1.weight" in unused and "backbone.model.norm.weight" in unused
        assert not any(name.startswith("backbone.model.blocks.2.") for name in unused)


def test_options_and_table_names() -> None:
    method = get_method("ielt")
    assert (method.test_forward_passes, method.train_passes_per_image) == (1, 1)
    default = parse_options("ielt", {})
    assert default.select_numbers is None and default.votes_per_head == 24 and default.complement_weight == 0.4
    assert method.table_name(default) == "ielt"
    assert method.settings(default) == ("select 16,14,12,10,8,6,8,10,12,14,16 · 24 votes/head · 24 key tokens · "
                                        "complement weight 0.4 · dynamic after 10 epochs, step 0.001 · dropout 0.1")
    assert method.table_name(parse_options("ielt", {"extra_blocks_from_last": True})) == "ielt-from-last"
    assert method.table_name(parse_options("ielt", {"select_numbers": [3, 2], "dynamic_selection": False,
                                                    "votes_per_head": 12})) == "ielt-sel3-2-static-votes_per_head12"
    with pytest.raises(FinebenchError, match=r"select_numbers\.0"):
        parse_options("ielt", {"select_numbers": [0, 2]})


@pytest.mark.parametrize(("backbone", "options", "variant", "message"), [
    ("timm:resnet10t", None, {}, r"^variant 'ielt' on timm:resnet10t: expected a timm Vision Transformer"),
    ("wrn", {"depth": 10, "width": 1}, {}, r"^variant 'ielt' on wrn: expected a timm Vision Transformer"),
    (BACKBONE, {**TINY_VIT, "depth": 2}, {}, r"^variant 'ielt' on the backbone: .* with at least 3 blocks$"),
    (BACKBONE, TINY_VIT, {}, (r"^variant 'ielt': the official select_numbers have 11 entries but the backbone has 4 "
                              r"blocks; expected 3 \(one per block before the last\)$")),
    (BACKBONE, TINY_VIT, {"select_numbers": [4, 4]}, (r"^variant 'ielt': select_numbers has 2 entries but the "
                                                      r"backbone has 4 blocks; expected 3")),
    (BACKBONE, {**TINY_VIT, "img_size": 64}, {"select_numbers": SELECT},
     r"^variant 'ielt': votes_per_head 24 exceeds the 16 patch tokens of input_size 64 \(patch 16\)"),
])
def test_one_line_errors_name_what_works(backbone: str, options: dict | None, variant: dict, message: str) -> None:
    with pytest.raises(FinebenchError, match=message) as error:
        build_model(backbone, 5, "ielt", variant, options)
    assert "\n" not in str(error.value)


def test_the_wrong_input_size_is_a_one_line_error() -> None:
    model = tiny_model().eval()
    with pytest.raises(FinebenchError, match=r"^variant 'ielt': input \(64, 64\) but the model was built for "
                                             r"\(128, 128\)"):
        model(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_training_step_through_the_engine(accumulation: int) -> None:
    """The method's own step: each micro-batch is a training forward, the loss is the two-term
    objective, every parameter the model reads moves (the zero head first, so two steps), and at
    epoch 2 with update_after_epochs = 1 the shares start to move."""
    torch.manual_seed(0)
    model = tiny_model(update_after_epochs=1).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(model, optimizer, None, torch.device("cpu"), accumulation_steps=accumulation,
                     method=get_method("ielt"))
    batch, labels = images(torch.float32)[:4], torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        loss, correct = step(batch, labels)
        assert torch.isfinite(loss) and 0 <= int(correct) <= 4
    assert int(model.training_forwards) == 2 * accumulation and int(model.warm_forwards) == -1
    unused = set(model.unused_parameter_names())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) is (name in unused), name
    rates = model.select_rate.clone()
    step.epoch = 2
    step(batch, labels)
    assert int(model.warm_forwards) == 2 * accumulation
    assert not torch.equal(model.select_rate, rates)
    assert get_method("ielt").objective == "ielt objective"



def test_training_steps_repeat_bit_for_bit_on_two_threads() -> None:
    """Gathering the kept tokens (distinct rows per image) and the votes (sums of ones) leave
    nothing to the order of a multi-threaded reduction: two steps with moving shares repeat."""
    def steps() -> torch.Tensor:
        torch.manual_seed(0)
        model = tiny_model(update_after_epochs=0).train()
        torch.nn.init.normal_(model.classifier.weight, std=0.1)
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"),
                         method=get_method("ielt"))
        for _ in range(2):
            step(images(torch.float32), torch.tensor([0, 1, 2, 3]))
        return torch.cat([model.select_rate, *(p.detach().flatten() for p in model.parameters())])

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(steps(), steps())
    finally:
        torch.set_num_threads(before)


def _ddp_steps(rank: int | None) -> dict[str, torch.Tensor]:
    """Two engine steps on the 4-image batch, or on this rank's half of it under DDP (finebench's own
    wrapper: the backbone's unread last block and norm named to DDP as ignored)."""
    from finebench.train.distributed import DDPContext

    torch.manual_seed(0)
    model = tiny_model()
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    wrapped = model if rank is None else DDPContext(rank=rank, world_size=2).wrap(model)
    step = TrainStep(wrapped, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"),
                     method=get_method("ielt"))
    batch, labels = images(torch.float32), torch.tensor([0, 1, 2, 3])
    if rank is not None:
        batch, labels = batch[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2]
    for _ in range(2):
        step(batch, labels)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.slow
def test_under_ddp_the_ranks_step_together_as_one_process_on_the_whole_batch() -> None:
    """No hang on the parameters IELT never reads (DDP ignores them), and the all-reduced step is
    the whole batch's (no BatchNorm: only the summation order differs, float32 to 1e-6)."""
    from gloo import on_two_workers

    results = on_two_workers(_ddp_steps)
    expected = _ddp_steps(None)
    for name, value in expected.items():
        assert torch.equal(results[0][name], results[1][name]), name
        torch.testing.assert_close(results[0][name], value, rtol=1e-5, atol=1e-6, msg=name)

@pytest.mark.slow
def test_a_recipe_trains_ielt_beside_the_baseline_from_the_cli_and_checkpoints_its_selection_state(
        tmp_path: Path) -> None:
    """ViT-Ti/16's layout narrowed (4 blocks, 4 x 4 patches at 32 px: 8 x 8 tokens), a fixed-size
    ViT: ``run --dry-run``, two epochs of ``run`` and ``profile``. The dynamic selection starts in
    epoch 2 (update_after_epochs = 1) and the checkpoint holds the moved shares; the counts leave
    out the backbone's unused last block and norm."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "ielt.toml"
    text = tiny_recipe(variants=("baseline", "ielt"), input_size=32, epochs=2, batch_size=8, lr=0.01,
                       backbone=BACKBONE, extra_train="threads = 1", extra_model='pretrained = "none"',
                       model_options="{ embed_dim = 32, depth = 4, num_heads = 4, mlp_ratio = 2, patch_size = 4, "
                                     "img_size = 32 }")
    recipe.write_text(text.replace('kind = "ielt"', 'kind = "ielt"\nselect_numbers = [16, 14, 12]\n'
                                                    'update_after_epochs = 1'))
    results = tmp_path / "results"
    name = "ielt-sel16-14-12-update_after_epochs1"

    def finebench(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "finebench", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=600, check=False, env={**os.environ, "COLUMNS": "250"})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    dry = finebench("run", str(recipe), "--data-root", str(root), "--results-dir", str(results), "--dry-run")
    assert dry.count("│ new ") == 2 and name in dry, dry
    finebench("run", str(recipe), "--data-root", str(root), "--results-dir", str(results), "-q")
    summaries = {json.loads(path.read_text())["variant_name"]: path for path in results.glob("ielt/*/summary.json")}
    assert sorted(summaries) == ["baseline", name]
    assert json.loads(summaries[name].read_text())["status"] == "finished"
    state = torch.load(summaries[name].parent / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert int(state["training_forwards"]) == 2 * 4 and int(state["warm_forwards"]) == 4  # 32 images / 8
    assert not torch.equal(state["select_rate"], torch.tensor(SELECT) / 42)
    rows = {row["label"]: row for row in json.loads(finebench("profile", str(recipe), "--json"))["rows"]}
    model = build_model(BACKBONE, 10, "ielt", {"select_numbers": SELECT}, {**TINY_VIT, "patch_size": 4, "img_size": 32})
    unused = set(model.unused_parameter_names())
    assert rows[name]["params"] == sum(p.numel() for key, p in model.named_parameters() if key not in unused)
    assert rows[name]["flops"] > rows["baseline"]["flops"] > 0
