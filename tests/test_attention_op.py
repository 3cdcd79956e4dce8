"""The read-out operator (``readout = "custom_op"``) against the eager module it replaces."""

from __future__ import annotations

import pytest
import torch

from finebench.methods import build_model
from finebench.models.attention import AttentionModule
from finebench.models.attention_op import attention_readout

HEADS, CLASSES = 3, 5


def maps(dtype: torch.dtype, batch: int = 2, size: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, HEADS * (CLASSES + 2), size, size, generator=generator, dtype=dtype)


def test_opcheck_passes_the_operators_registration_checks() -> None:
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(attention_readout, (maps(dtype).requires_grad_(), HEADS))


def test_the_closed_form_backward_passes_float64_gradcheck() -> None:
    def logits_and_masks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_readout(x, HEADS)

    assert torch.autograd.gradcheck(logits_and_masks, (maps(torch.float64).requires_grad_(),))


def pair(dtype: torch.dtype) -> tuple[AttentionModule, AttentionModule]:
    torch.manual_seed(0)
    eager = AttentionModule(6, CLASSES, HEADS).to(dtype)
    op = AttentionModule(6, CLASSES, HEADS, readout="custom_op").to(dtype)
    op.load_state_dict(eager.state_dict())
    return eager, op


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)])
def test_outputs_and_gradients_equal_the_eager_modules(dtype: torch.dtype, rtol: float, atol: float) -> None:
    eager, op = pair(dtype)
    features = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for module in (eager, op):
        inputs = features.clone().requires_grad_()
        logits, masks = module(inputs)
        # a loss on both outputs, as training has (NLL on the logits, the overlap on the masks)
        loss = (logits * torch.linspace(-1, 1, CLASSES, dtype=dtype)).sum() + module.mask_overlap(masks)
        loss.backward()
        results.append((logits.detach(), masks.detach(), inputs.grad, module.conv.weight.grad))
    for got, expected in zip(results[1], results[0], strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


def test_a_model_with_the_operator_compiles_whole_and_trains_to_the_eager_gradients() -> None:
    """fullgraph: no graph break around the operator (aot_eager here; Inductor in the slow test)."""
    torch.manual_seed(0)
    options = {"attention_depth": 2, "attention_width": 2}
    eager = build_model("wrn", 10, "attention", options, {"depth": 10, "width": 1})
    op = build_model("wrn", 10, "attention", {**options, "readout": "custom_op"}, {"depth": 10, "width": 1})
    op.load_state_dict(eager.state_dict())
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for model in (eager, compiled):
        output = model(images)
        (output.log_probs.sum() + output.reg_loss).backward()
    for (name, expected), got in zip(eager.named_parameters(), op.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_inductor_compiles_the_operator_on_the_cpu() -> None:
    torch.manual_seed(0)
    model = build_model("wrn", 10, "attention", {"attention_depth": 2, "attention_width": 2, "readout": "custom_op"},
                        {"depth": 10, "width": 1})
    compiled = torch.compile(model, fullgraph=True)
    output = compiled(torch.randn(4, 3, 16, 16))
    (output.log_probs.sum() + output.reg_loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_under_bf16_autocast_the_operator_reads_out_in_float32_and_trains() -> None:
    """Autocast hands the operator bf16 maps: it reads them out in float32 (as the eager path's
    softmax is under autocast), and its backward runs whatever autocast state autograd restores."""
    eager, op = pair(torch.float32)
    features = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(3))
    results = []
    for module in (eager, op):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, masks = module(features)
            loss = logits.float().sum() + module.mask_overlap(masks).float()
        loss.backward()
        results.append((logits.float().detach(), module.conv.weight.grad))
    assert op(features)[0].dtype == torch.float32
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
