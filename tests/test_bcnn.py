"""B-CNN (``finebench.methods.bcnn``): the head against HaoMood/bilinear-cnn's golden tensors, and
the method on every backbone family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from finebench.methods import build_model, get_method, parse_options
from finebench.methods.bcnn import BilinearHead

GOLDEN = Path(__file__).parent / "data" / "golden" / "bcnn" / "golden.safetensors"
FAMILIES = [("wrn", {"depth": 10, "width": 1}), ("resnext_cifar", {"depth": 11, "cardinality": 2, "base_width": 4}),
            ("timm:resnet10t", None), ("torchvision:resnet18", None)]


def generated(seed: int, *shape: int, scale: float = 1.0, relu: bool = False) -> torch.Tensor:
    """The golden script's seeded float64 inputs (tools/golden/common.py states the same rule)."""
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return values.clamp_min(0) if relu else values


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "HaoMood/bilinear-cnn",
                                   "commit": "bcc2883c43c1f5fad1b58b906014354876d76911"}


def test_the_haomood_square_root_equals_the_official_port_in_float64() -> None:
    golden = load_file(GOLDEN)
    x = generated(0, 2, 512, 28, 28, relu=True).requires_grad_(True)
    assert torch.equal(x.detach().sum().reshape(1), golden["x_checksum"])
    head = BilinearHead(512, 200, sqrt="haomood").double()
    with torch.no_grad():
        head.fc.weight.copy_(generated(1, 200, 512**2, scale=0.003))
        head.fc.bias.copy_(generated(2, 200, scale=0.01))
    logits = head(x)
    loss = F.cross_entropy(logits, golden["labels"])
    loss.backward()
    close = {"rtol": 1e-10, "atol": 1e-13}
    torch.testing.assert_close(logits, golden["logits"], **close)
    torch.testing.assert_close(loss.reshape(1), golden["loss"], **close)
    torch.testing.assert_close(x.grad[:, :8], golden["grad_x_head"], **close)
    torch.testing.assert_close(x.grad.norm().reshape(1), golden["grad_x_norm"], **close)
    torch.testing.assert_close(head.fc.bias.grad, golden["grad_fc_bias"], **close)
    torch.testing.assert_close(head.fc.weight.grad[:8, :512], golden["grad_fc_weight_head"], **close)


def test_the_signed_root_is_the_papers_and_differs_from_the_port() -> None:
    x = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]], dtype=torch.float64)  # 1 channel: gram = mean(x²)
    signed = BilinearHead(1, 2).double().pool(x)
    assert signed.item() == pytest.approx(1.0)  # one entry, L2-normalised
    many = generated(3, 2, 4, 3, 3)  # negative entries in the Gram matrix
    pooled = BilinearHead(4, 2).double().pool(many)
    flat = many.flatten(2)
    gram = (flat @ flat.transpose(1, 2)).flatten(1) / 9
    expected = F.normalize(gram.sign() * gram.abs().sqrt())
    torch.testing.assert_close(pooled, expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(BilinearHead(4, 2, sqrt="haomood").double().pool(many.relu()),
                              BilinearHead(4, 2).double().pool(many.relu()), atol=1e-4)


def test_options_name_the_table_rows_and_reject_bad_values() -> None:
    method = get_method("bcnn")
    assert method.table_name(parse_options("bcnn", {})) == "bcnn"
    assert method.table_name(parse_options("bcnn", {"sqrt": "haomood", "reduce": 512})) == "bcnn-haomood-r512"
    with pytest.raises(Exception, match="sqrt"):
        parse_options("bcnn", {"sqrt": "cube"})
    with pytest.raises(Exception, match="reduce"):
        parse_options("bcnn", {"reduce": 0})


@pytest.mark.parametrize(("backbone", "options"), FAMILIES)
def test_bcnn_attaches_on_every_family_and_a_training_step_moves_the_head(backbone: str, options: dict | None) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, 5, "bcnn", {"reduce": 8}, options).train()
    head_before = model.head.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    output = model(torch.randn(2, 3, 32, 32))
    assert output.logits.shape == (2, 5) and model.head.fc.in_features == 64
    loss = get_method("bcnn").loss(output, torch.tensor([0, 4]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.head.fc.weight, head_before)
    assert not hasattr(model, "classifier")  # the bilinear fc is the only classifier


def test_bcnn_pools_the_tap_it_is_given_and_names_the_taps_there_are_when_it_does_not_exist() -> None:
    """The paper pools VGG-16's relu5_3, a tap before the deepest (pool5): ``tap`` chooses it."""
    model = build_model("wrn", 5, "bcnn", {"tap": "group1"}, {"depth": 10, "width": 1})
    assert model.tap == "group1" and model.head.fc.in_features == 32**2  # group1 has 32 channels
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 5)
    assert get_method("bcnn").table_name(parse_options("bcnn", {"tap": "group1"})) == "bcnn-group1"
    with pytest.raises(Exception, match=r"tap 'relu5_3' is not one of its tap points; expected one of group0, group1, group2"):
        build_model("wrn", 5, "bcnn", {"tap": "relu5_3"}, {"depth": 10, "width": 1})


def test_bcnn_on_a_torchvision_model_takes_any_graph_node_as_its_tap() -> None:
    model = build_model("torchvision:mobilenet_v3_small", 5, "bcnn", {"tap": "features.11.block.0", "reduce": 4})
    assert model.tap == "features.11.block.0" and model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 5)
    with pytest.raises(Exception, match=r"tap 'nope' is not one of its tap points; .*; or a graph node name"):
        build_model("torchvision:mobilenet_v3_small", 5, "bcnn", {"tap": "nope"})
