"""Attend and Rectify: masks, parameter cost, regulariser, gradients, mixing, authors' weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods import build_model
from finebench.models import convert_authors_state_dict, load_authors_state_dict
from finebench.models.attention import HEAD_WEIGHT_NAMES, AttentionModule, fuse_head_weights

torch.set_num_threads(1)

WRN_TINY = {"depth": 10, "width": 1}


def attention_model(num_classes: int = 10, **options: object) -> nn.Module:
    options = {"attention_depth": 3, "attention_width": 2, **options}
    torch.manual_seed(0)
    return build_model("wrn", num_classes, "attention", options, WRN_TINY)


def images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine terms, so eval-mode comparisons exercise them."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


# ---- the module ------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "heads", "classes", "size"), [(8, 1, 10, 8), (16, 4, 10, 5), (12, 3, 100, 7)])
def test_masks_sum_to_one_over_space_for_every_head(channels: int, heads: int, classes: int, size: int) -> None:
    module = AttentionModule(channels, classes, heads)
    _, masks = module(torch.randn(3, channels, size, size))
    assert masks.shape == (3, heads, size, size)
    assert torch.allclose(masks.sum((2, 3)), torch.ones(3, heads), atol=1e-6)
    assert (masks >= 0).all()


def test_masks_of_every_module_of_a_model_sum_to_one() -> None:
    model = attention_model(attention_width=3).eval()
    seen = []
    for module in model.attention.attention_modules:
        module.register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
    model(images())
    assert len(seen) == 3
    for masks in seen:
        assert torch.allclose(masks.sum((2, 3)), torch.ones(masks.shape[:2]), atol=1e-6)


def test_module_output_is_the_head_weighted_sum_of_mask_weighted_class_maps() -> None:
    """A loop over heads, written from docs/MECHANISM.md §1, against forward and ``head_weights``."""
    torch.manual_seed(0)
    channels, heads, classes = 6, 3, 5
    module = AttentionModule(channels, classes, heads)
    features = torch.randn(2, channels, 4, 5)
    logits, masks = module(features)
    weights = module.head_weights(features, masks)
    class_maps = F.conv2d(features, module.output_weight, padding=1).view(2, heads, classes, 4, 5)
    gate_scores = F.conv2d(features, module.gate_weight, padding=1)
    expected_weights = F.softmax(torch.tanh(torch.stack(
        [(gate_scores[:, k] * masks[:, k]).sum((1, 2)) for k in range(heads)], dim=1)), dim=1)
    expected = sum(
        expected_weights[:, k : k + 1] * (class_maps[:, k] * masks[:, k].unsqueeze(1)).sum((2, 3))
        for k in range(heads)
    )
    assert torch.allclose(weights, expected_weights, atol=1e-6)
    assert torch.allclose(weights.sum(1), torch.ones(2), atol=1e-6)
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize(("channels", "heads", "classes"), [(16, 4, 10), (160, 4, 100), (7, 2, 3)])
def test_module_parameter_count_is_9_c_k_n_plus_2(channels: int, heads: int, classes: int) -> None:
    module = AttentionModule(channels, classes, heads)
    assert sum(p.numel() for p in module.parameters()) == 9 * channels * heads * (classes + 2)


def test_model_overhead_is_modules_plus_global_gate() -> None:
    baseline = build_model("wrn", 10, backbone_options=WRN_TINY)
    model = attention_model(attention_width=4)
    channels = [64, 32, 16]  # group2, group1, group0 of WRN-10-1
    modules = sum(9 * c * 4 * (10 + 2) for c in channels)
    gate = 64 * 4 + 2 * 4  # Linear(C_last, D+1) without bias + BN1d affine
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) - count(baseline) == modules + gate


def test_reg_loss_matches_a_hand_computed_example() -> None:
    module = AttentionModule(4, 10, heads=2)
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0] = 1 / 16  # uniform: every 2x2-pooled cell is 1/16
    masks[0, 1, 0, 0] = 1.0  # all mass in one pixel: pooled cells (1/4, 0, 0, 0)
    # Gram off-diagonal entries: (1/16)(1/4) = 1/64 twice; diagonal zeroed; mean over the 2x2 entries.
    expected = 2 * (1 / 64) ** 2 / 4
    assert module.mask_overlap(masks).item() == pytest.approx(expected, rel=1e-6)


def test_reg_loss_is_weighted_and_averaged_over_modules_in_training_only() -> None:
    model = attention_model(reg_w=0.5).train()
    overlaps = []
    for module in model.attention.attention_modules:
        module.register_forward_hook(lambda m, _i, out: overlaps.append(m.mask_overlap(out[1])))
    output = model(images())
    assert output.reg_loss is not None and output.reg_loss.dim() == 0
    assert output.reg_loss.item() == pytest.approx(0.5 * sum(o.item() for o in overlaps) / 3, rel=1e-5)
    assert model.eval()(images()).reg_loss is None


@pytest.mark.parametrize("gates", ["softmax", "sigmoid", "none"])
def test_gradients_reach_every_attention_parameter(gates: str) -> None:
    model = attention_model(gates=gates, reg_w=1e-3).train()
    output = model(images())
    loss = F.nll_loss(output.log_probs, torch.tensor([0, 1, 2, 3])) + output.reg_loss
    loss.backward()
    for name, parameter in model.attention.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ---- mixing -----------------------------------------------------------------------------------


def sources_log_probs(output) -> torch.Tensor:  # noqa: ANN001
    return F.log_softmax(torch.stack([*output.module_logits, output.logits], dim=1), dim=2)


def test_softmax_gates_weigh_sources_with_a_convex_combination() -> None:
    output = attention_model(gates="softmax").eval()(images())
    assert output.gates.shape == (4, 4)
    assert torch.allclose(output.gates.sum(1), torch.ones(4), atol=1e-6)
    expected = (sources_log_probs(output) * output.gates.unsqueeze(2)).sum(1)
    assert torch.allclose(output.log_probs, expected, atol=1e-6)


def test_sigmoid_gates_are_sigmoids_normalised_by_their_sum() -> None:
    model = attention_model(gates="sigmoid").eval()
    output = model(images())
    pooled = []
    model.classifier.register_forward_hook(lambda _m, inputs, _o: pooled.append(inputs[0]) and None)
    model(images())
    squashed = torch.sigmoid(model.attention.global_gate(pooled[0]))
    assert torch.allclose(output.gates, squashed / (1e-6 + squashed.sum(1, keepdim=True)), atol=1e-6)
    expected = (sources_log_probs(output) * output.gates.unsqueeze(2)).sum(1)
    assert torch.allclose(output.log_probs, expected, atol=1e-6)


def test_no_gates_is_the_plain_mean_of_the_sources() -> None:
    model = attention_model(gates="none").eval()
    assert model.attention.global_gate is None
    output = model(images())
    assert output.gates is None
    assert torch.allclose(output.log_probs, sources_log_probs(output).mean(1), atol=1e-6)


def test_output_mode_50_averages_the_module_mixture_with_the_network_at_one_half() -> None:
    model = attention_model(output_mode="50").eval()
    assert model.attention.global_gate.linear.out_features == 3  # modules only
    output = model(images())
    module_log_probs = F.log_softmax(torch.stack(output.module_logits, dim=1), dim=2)
    module_weights = output.gates[:, :3] * 2
    assert torch.allclose(output.gates[:, 3], torch.full((4,), 0.5))
    mixture = (module_log_probs * module_weights.unsqueeze(2)).sum(1)
    expected = 0.5 * mixture + 0.5 * F.log_softmax(output.logits, dim=1)
    assert torch.allclose(output.log_probs, expected, atol=1e-6)


# ---- structure --------------------------------------------------------------------------------


def test_attention_off_leaves_the_plain_backbone_output_unchanged() -> None:
    torch.manual_seed(0)
    baseline = build_model("wrn", 10, backbone_options=WRN_TINY)
    model = attention_model()
    result = model.load_state_dict(baseline.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("attention.") for k in result.missing_keys)
    randomise_batchnorm(baseline)
    model.load_state_dict(baseline.state_dict(), strict=False)
    baseline.eval(), model.eval()
    x = images()
    plain = baseline(x)
    assert plain.module_logits == () and plain.gates is None and plain.reg_loss is None
    assert torch.allclose(plain.log_probs, F.log_softmax(plain.logits, dim=1))
    assert torch.equal(model(x).logits, plain.logits)


def test_taps_follow_the_authors_order_deepest_first() -> None:
    assert attention_model(attention_depth=1).attention_taps == ["group2"]
    assert attention_model(attention_depth=3).attention_taps == ["group2", "group1", "group0"]
    imagenet = build_model("resnet18", 5, "attention", {"attention_depth": 2}, pretrained=None)
    assert imagenet.attention_taps == ["layer3", "layer2"]
    with pytest.raises(FinebenchError, match="attention_depth=4"):
        attention_model(attention_depth=4)


@pytest.mark.parametrize("depth, taps, channels", [
    (1, ["layer3"], [1024]),
    (2, ["layer3", "layer2"], [1024, 512]),
    (3, ["layer3", "layer2", "layer1"], [1024, 512, 256]),
])
def test_wide_resnet50_2_attaches_modules_deepest_first_as_the_authors(depth, taps, channels) -> None:
    # the authors' WRN-50-2: att2 (1024 channels, group2 = layer3) first, then att1, att0
    with torch.device("meta"):
        model = build_model("wide_resnet50_2", 200, "attention", {"attention_depth": depth})
    assert model.attention_taps == taps
    assert [m.conv.in_channels for m in model.attention.attention_modules] == channels
    assert [t["tap"] for t in model.tap_summary()] == taps


def test_each_module_reads_the_output_of_its_stage() -> None:
    model = build_model("resnet18", 5, "attention", {"attention_depth": 2}).eval()
    stage_outputs, module_inputs = {}, {}
    for stage in ("layer2", "layer3"):
        getattr(model.backbone, stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: stage_outputs.__setitem__(stage, out))
    for tap, module in zip(model.attention_taps, model.attention.attention_modules, strict=True):
        module.register_forward_hook(lambda _m, inputs, _o, tap=tap: module_inputs.__setitem__(tap, inputs[0]))
    model(torch.randn(1, 3, 64, 64))
    assert set(module_inputs) == {"layer3", "layer2"}
    for tap, features in module_inputs.items():
        assert features is stage_outputs[tap]


def test_early_prediction_equals_the_modules_output_in_the_full_pass() -> None:
    model = attention_model().eval()
    randomise_batchnorm(model)
    x = images()
    output = model(x)
    for tap, logits in zip(model.attention_taps, output.module_logits, strict=True):
        assert torch.allclose(model.early_prediction(x, tap), logits, atol=1e-6)


def test_channels_last_and_bf16_autocast_give_the_same_prediction() -> None:
    model = attention_model().eval()
    x = images()
    reference = model(x).log_probs
    model_cl = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model_cl(x.to(memory_format=torch.channels_last)).log_probs
    assert fast.shape == reference.shape
    assert fast.dtype == torch.float32  # the mixture of log-probabilities is not rounded to bf16
    assert ((fast - reference).abs() <= 0.1 * reference.abs() + 0.1).all()  # bf16 keeps ~3 digits


# ---- the authors' model, rebuilt from their description, and the weight converter ---------------


class AuthorsReference(nn.Module):
    """WideResNetAttention as prlz77/attend-and-rectify computes it, with their parameter names.

    Written here from the published description (element-wise mask products, no einsum), so
    that the converter and finebench's numerics are checked against an independent version.
    """

    def __init__(self, depth: int, width: int, classes: int, ad: int, aw: int, reg_w: float, gate: str) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.n, self.aw, self.classes, self.reg_w, self.gate, self.ad = n, aw, classes, reg_w, gate, ad
        self.conv0 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        previous = 16
        for g, w in enumerate(widths):
            group = nn.Module()
            for i in range(n):
                block = nn.Module()
                c_in = previous if i == 0 else w
                block.conv0 = nn.Conv2d(c_in, w, 3, stride=(1 if g == 0 or i > 0 else 2), padding=1, bias=False)
                block.bn0 = nn.BatchNorm2d(c_in)
                block.conv1 = nn.Conv2d(w, w, 3, padding=1, bias=False)
                block.bn1 = nn.BatchNorm2d(w)
                if c_in != w:
                    block.conv_reduce = nn.Conv2d(c_in, w, 1, stride=(1 if g == 0 else 2), bias=False)
                setattr(group, f"block_{i}", block)
            setattr(self, f"group_{g}", group)
            previous = w
        self.bn_g2 = nn.BatchNorm2d(widths[2])
        self.classifier = nn.Linear(widths[2], classes)
        self.layers = [2 - i for i in range(ad)]
        for g in self.layers:
            att = nn.Module()
            att.att_head = nn.Module()
            att.att_head.conv = nn.Conv2d(widths[g], aw, 3, padding=1, bias=False)
            att.att_head.register_buffer("diag", (1 - torch.eye(aw)).view(1, aw, aw))
            att.out_head = nn.Module()
            att.out_head.conv = nn.Conv2d(widths[g], aw * classes, 3, padding=1, bias=False)
            att.score = nn.Module()
            att.score.conv = nn.Conv2d(widths[g], aw, 3, padding=1, bias=False)
            setattr(self, f"att{g}", att)
        self.output_gate = nn.Module()
        self.output_gate.gates = nn.Linear(widths[2], ad + 1, bias=False)
        self.output_gate.bn = nn.BatchNorm1d(ad + 1)

    def block(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(block.bn0(x))
        z = block.conv1(F.relu(block.bn1(block.conv0(pre))))
        return z + (block.conv_reduce(x) if hasattr(block, "conv_reduce") else x), pre

    def attend(self, att: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        mask = F.softmax(att.att_head.conv(x).view(b, self.aw, h * w), 2)
        pooled = F.avg_pool2d(mask.view(b, self.aw, h, w), 2, 2).view(b, self.aw, -1)
        reg = ((torch.bmm(pooled, pooled.transpose(1, 2)) * att.att_head.diag).view(-1) ** 2).mean()
        mask = mask.view(b, self.aw, 1, h * w)
        out = (att.out_head.conv(x).view(b, self.aw, self.classes, h * w) * mask).sum(3)
        scores = F.softmax(torch.tanh((att.score.conv(x).view(b, self.aw, 1, h * w) * mask).sum(3)), 1)
        return (out * scores).sum(1, keepdim=True), reg * self.reg_w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = F.relu(self.bn0(self.conv0(x)))
        taps = []
        for g in range(3):
            for i in range(self.n):
                x, pre = self.block(getattr(getattr(self, f"group_{g}"), f"block_{i}"), x)
                if i == 0 and g > 0:
                    taps.append(pre)
        final = F.relu(self.bn_g2(x))
        taps.append(final)
        outputs, regs = zip(*(self.attend(getattr(self, f"att{g}"), taps[g]) for g in self.layers), strict=True)
        pooled = F.avg_pool2d(final, 8, 1, 0).view(x.size(0), -1)
        gates = torch.tanh(self.output_gate.bn(self.output_gate.gates(pooled)))
        stacked = F.log_softmax(torch.cat([*outputs, self.classifier(pooled).unsqueeze(1)], 1), dim=2)
        if self.gate == "softmax":
            mixed = (stacked * F.softmax(gates, 1).unsqueeze(2)).sum(1)
        else:
            sig = torch.sigmoid(gates).unsqueeze(2)
            mixed = (stacked * sig).sum(1) / (1e-6 + sig.sum(1))
        reg = sum(regs) / self.ad if self.training and self.reg_w > 0 else None
        return mixed, reg


ISSUE_KEYS_WRN_16_1_AD3 = (
    {"conv0.weight", "classifier.weight", "classifier.bias", "output_gate.gates.weight"}
    | {f"bn0.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    | {f"bn_g2.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    | {f"output_gate.bn.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
)


def authors_reference(gate: str = "softmax", reg_w: float = 1e-3, width: int = 1, ad: int = 3) -> AuthorsReference:
    torch.manual_seed(3)
    reference = AuthorsReference(16, width, 10, ad, 2, reg_w, gate)
    for module in reference.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
    randomise_batchnorm(reference)
    return reference


def test_reference_has_the_authors_key_names() -> None:
    keys = set(authors_reference().state_dict())
    assert ISSUE_KEYS_WRN_16_1_AD3 <= keys
    assert "group_1.block_0.conv_reduce.weight" in keys and "group_0.block_0.conv_reduce.weight" not in keys
    assert keys >= {f"att{g}.{k}" for g in range(3) for k in
                    ("att_head.conv.weight", "att_head.diag", "out_head.conv.weight", "score.conv.weight")}
    state = authors_reference().state_dict()
    assert state["group_1.block_0.bn0.weight"].shape == (16,)  # bn0 normalises the block's input
    assert state["att0.out_head.conv.weight"].shape == (2 * 10, 16, 3, 3)
    assert state["output_gate.gates.weight"].shape == (4, 64)


@pytest.mark.parametrize(("gate", "width", "ad"), [("softmax", 1, 3), ("sigmoid", 1, 3), ("softmax", 2, 2)])
def test_authors_weights_load_strictly_and_reproduce_their_output(gate: str, width: int, ad: int) -> None:
    reference = authors_reference(gate, width=width, ad=ad).eval()
    model = load_authors_state_dict(reference.state_dict(), 16, width, 10, ad, 2, gate, reg_w=1e-3).eval()
    x = images(size=32)
    expected, _ = reference(x)
    assert torch.allclose(model(x).log_probs, expected, atol=1e-5)


def test_authors_weights_reproduce_their_reg_loss_in_training() -> None:
    reference = authors_reference(reg_w=0.1).train()
    model = load_authors_state_dict(reference.state_dict(), 16, 1, 10, 3, 2, reg_w=0.1).train()
    x = images(batch=6)
    expected_output, expected_reg = reference(x)
    output = model(x)
    assert torch.allclose(output.log_probs, expected_output, atol=1e-5)
    assert output.reg_loss.item() == pytest.approx(expected_reg.item(), rel=1e-5)


def test_converter_round_trips_every_key_of_the_authors_state_dict() -> None:
    state = authors_reference().state_dict()
    model = build_model("wrn", 10, "attention", {"attention_width": 2}, {"depth": 16, "width": 1})
    converted = convert_authors_state_dict(state, model.attention_taps)
    fused = {k for k in model.state_dict() if k.endswith(".conv.weight") and k.startswith("attention.")}
    separate = {k.replace(".conv.weight", f".{name}.weight") for k in fused for name in HEAD_WEIGHT_NAMES}
    assert set(converted) == set(model.state_dict()) - fused | separate  # nothing missing, nothing extra
    assert len(converted) == len(state) - 3  # only the three constant diag buffers are dropped
    for key, value in state.items():
        if not key.endswith("diag"):
            assert any(v is value for v in converted.values()), key


def test_converter_rejects_unknown_keys_and_mismatched_shapes() -> None:
    state = authors_reference().state_dict()
    with pytest.raises(FinebenchError, match="no finebench counterpart"):
        convert_authors_state_dict({**state, "mystery.weight": torch.zeros(1)}, ["group2", "group1", "group0"])
    with pytest.raises(FinebenchError, match="do not fit"):
        load_authors_state_dict(state, 16, 1, 100, 3, 2)


# ---- the fused head weight ------------------------------------------------------------------------


def three_convolution_module(module: AttentionModule) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
    """The module's heads as the three separate convolutions the authors (and older finebench) used."""
    heads, classes = module.heads, module.num_classes
    channels = module.conv.in_channels
    convs = tuple(nn.Conv2d(channels, rows, 3, padding=1, bias=False) for rows in (heads, heads * classes, heads))
    for conv, weight in zip(convs, (module.attention_weight, module.output_weight, module.gate_weight), strict=True):
        conv.weight.data.copy_(weight)
    return convs


def test_fused_head_weight_is_one_parameter_and_splits_back_into_the_three_heads() -> None:
    module = AttentionModule(5, 7, heads=3)
    assert [name for name, _ in module.named_parameters()] == ["conv.weight"]
    parts = [torch.randn(rows, 5, 3, 3) for rows in (3, 21, 3)]
    module.conv.weight.data.copy_(fuse_head_weights(*parts))
    assert torch.equal(module.attention_weight, parts[0])
    assert torch.equal(module.output_weight, parts[1])
    assert torch.equal(module.gate_weight, parts[2])


def test_state_dict_with_separate_head_weights_loads_into_the_fused_module() -> None:
    torch.manual_seed(0)
    source = AttentionModule(6, 4, heads=2)
    attention, output, gate = three_convolution_module(source)
    legacy = {"attention_head.weight": attention.weight, "output_head.weight": output.weight,
              "gate_head.weight": gate.weight}
    target = AttentionModule(6, 4, heads=2)
    target.load_state_dict(legacy, strict=True)
    assert torch.equal(target.conv.weight, source.conv.weight)
    with pytest.raises(RuntimeError, match="conv.weight"):  # an incomplete set is not silently dropped
        AttentionModule(6, 4, heads=2).load_state_dict({"attention_head.weight": attention.weight}, strict=True)


def test_fused_forward_equals_three_separate_convolutions() -> None:
    """The pre-fusion computation (three convolutions, per-head sums) against the fused forward, in training."""
    torch.manual_seed(1)
    module = AttentionModule(6, 5, heads=3)
    attention, output, gate = three_convolution_module(module)
    features = torch.randn(2, 6, 4, 6)
    masks = F.softmax(attention(features).flatten(2), dim=2)
    reads = torch.einsum("bknp,bkp->bkn", output(features).flatten(2).unflatten(1, (3, 5)), masks)
    weights = F.softmax(torch.tanh(torch.einsum("bkp,bkp->bk", gate(features).flatten(2), masks)), dim=1)
    logits, fused_masks = module(features)
    assert torch.allclose(fused_masks.flatten(2), masks, atol=1e-6)
    assert torch.allclose(logits, torch.einsum("bkn,bk->bn", reads, weights), atol=1e-5)


def test_a_float64_model_mixes_in_float64() -> None:
    """as_float32 lifts autocast's half-precision scores to float32 but never rounds a float64
    model down: its log-probabilities stay float64 and equal a float64 recomputation of the mixture."""
    from finebench.methods import build_model

    torch.manual_seed(0)
    model = build_model("wrn", 10, "attention", {"attention_depth": 2, "attention_width": 2},
                        {"depth": 10, "width": 1}).double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    output = model(images)
    assert output.log_probs.dtype == torch.float64
    single = model.float()(images.float()).log_probs
    assert not torch.equal(output.log_probs.float(), single)  # float64 is not float32 rounded
    torch.testing.assert_close(output.log_probs.float(), single, rtol=1e-4, atol=1e-5)
