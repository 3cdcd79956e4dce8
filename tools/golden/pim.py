"""Golden tensors for ``pim`` from chou141253/FGVC-PIM.

Usage: python tools/golden/pim.py <checkout of chou141253/FGVC-PIM> [out dir]
Needs torchvision (the official ``pim_module.py`` imports its feature extraction).

What is compared, in two parts:

1. The backbone's stage features. The official bundled timm (0.4.12, patched so that
   ``SwinTransformer.forward`` returns the four stage outputs, merging included, without the final
   norm) is imported from the checkout's ``timm/`` folder; its ``SwinTransformer`` (the class of
   the official ``swin_large_patch4_window12_384_in22k``, whose entry point fixes the sizes) is
   built tiny (patch 4, 64 px, window 4, embedding 8, one block of one head per stage, no classifier), its float parameters filled from seeded generators
   (matrices N(0, 1/fan_in), LayerNorm scales 1 + 0.1 N, the rest 0.1 N), in eval mode (no
   stochastic depth). Written: that state dict (float32, the official key names: the test maps it
   with current timm's own ``checkpoint_filter_fn``) and the four outputs on two seeded images, in
   float64 and float32.
2. The official PIM head. The official ``PluginMoodel`` (models/pim_module/pim_module.py, imported
   whole: it runs nothing at import) is built as its Swin builder does (``return_nodes = None``,
   FPN ``Linear``/``Conv``, selector, combiner) on a stand-in backbone whose four outputs are fixed
   B x N x C stage tokens, held as parameters so that their gradients (what flows back into a
   backbone) are recorded too.

Head sizes, those of the tiny Swin tests/test_pim.py builds (64 px, patch 4, embedding 16, so its
merged stages): 4 images, 5 classes, stage tokens 64/16/4/4 (the last two equal, so the official
upsample there is an identity) with 32/64/128/128 channels, FPN width 16, selections 48/12/3/2 (65 in
all: two graph joints). The official initialisation under
``torch.manual_seed(0)``, then ``alpha1`` set to 0.5 (it starts at 0, which would leave the
adjacency's query/key path without gradient) and the combiner's dropout off (its masks are not
reproducible); train mode (BatchNorm on batch statistics).

The loss is the official ``main.py`` code itself: the ``for name in outs`` loop of ``train()`` is
taken from the file's syntax tree and executed on the model's outputs, with the CUB yaml's weights
(lambda_b 0.5, lambda_s 0, lambda_n 5, lambda_c 1) and ``update_freq`` 1 (the official 2 divides
the loss; finebench's accumulation weights each part by its share instead). Each term alone: the
same loop on that one output with every weight 1.

Written for the head, in float64 and in float32: the stage tokens; the state dict; the labels; the selection
(each stage's token order, recovered by matching the official selected and dropped logits to its
stage logits, exactly); the stage, selected and dropped logits and the combiner's; each loss term
and the total; the gradients of the total with respect to every parameter and the stage tokens.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    generated,
    git_dir,
    import_official,
    official_commit,
    official_file,
    write,
)

TOKENS, CHANNELS, WIDTH, CLASSES = (64, 16, 4, 4), (32, 64, 128, 128), 16, 5
SELECTIONS = (48, 12, 3, 2)
LABELS = [0, 3, 0, 1]
NAMES = [f"layer{i}" for i in range(1, 5)]
WEIGHTS = {"lambda_b": 0.5, "lambda_s": 0.0, "lambda_n": 5.0, "lambda_c": 1.0}


def stage_tokens() -> list[torch.Tensor]:
    """Float64 stage tokens, generator seed 40 + stage (the test reads them from the file)."""
    return [generated(40 + i, len(LABELS), n, c) for i, (n, c) in enumerate(zip(TOKENS, CHANNELS, strict=True))]


class StandIn(torch.nn.Module):
    """The backbone: the fixed stage tokens as a dict, whatever the image."""

    def __init__(self, tokens: list[torch.Tensor]) -> None:
        super().__init__()
        self.tokens = torch.nn.ParameterList(torch.nn.Parameter(t.clone()) for t in tokens)

    def forward(self, _images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t for name, t in zip(NAMES, self.tokens, strict=True)}


SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1),
        "num_classes": 0}
SWIN_IMAGES = (2, 3, 64, 64)
"""Two images from generator seed 7 (``generated``): the test regenerates them."""


def official_swin(checkout: str) -> dict[str, torch.Tensor]:
    """Part 1 (module docstring): the bundled timm's stage outputs and its state dict."""
    folder = Path(tempfile.mkdtemp())
    listing = subprocess.run([*git_dir(checkout), "ls-tree", "-r", "--name-only", "HEAD", "timm"], check=True,
                             capture_output=True, text=True).stdout.split()
    for path in listing:
        if path.endswith(".py"):
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(official_file(checkout, path))
    sys.path.insert(0, str(folder))
    import timm  # the official bundled copy (0.4.12, patched)

    assert Path(timm.__file__).is_relative_to(folder), timm.__file__
    torch.manual_seed(0)
    model = timm.models.swin_transformer.SwinTransformer(patch_size=4, **SWIN).eval()
    with torch.no_grad():
        for index, (name, tensor) in enumerate(model.state_dict().items()):
            if not tensor.is_floating_point() or "attn_mask" in name:
                continue
            values = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(200 + index))
            if tensor.dim() > 1:
                values = values / (tensor[0].numel() ** 0.5)
            elif name.endswith("weight"):
                values = 1 + 0.1 * values
            else:
                values = 0.1 * values
            tensor.copy_(values)
    out = {f"swin.state.{k}": v.clone() for k, v in model.state_dict().items()
           if v.is_floating_point() and "attn_mask" not in k}
    for dtype, prefix in ((torch.float64, "f64"), (torch.float32, "f32")):
        with torch.no_grad():
            stages = model.to(dtype)(generated(7, *SWIN_IMAGES).to(dtype))
        out.update({f"swin.{prefix}.{name}": value for name, value in stages.items()})
    return out


def official_module(checkout: str) -> Any:
    return import_official(checkout, "pim_official", {"pim_module.py": "models/pim_module/pim_module.py"},
                           "pim_module")


def official_loss_loop(checkout: str) -> ast.Module:
    """``for name in outs: ...`` of ``train()`` in the official main.py (main.py imports wandb and
    the data pipeline, so only this loop runs)."""
    tree = ast.parse(official_file(checkout, "main.py"))
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    loop = next(node for node in ast.walk(train) if isinstance(node, ast.For)
                and isinstance(node.iter, ast.Name) and node.iter.id == "outs")
    return ast.fix_missing_locations(ast.Module([loop], []))


def official_loss(loop: ast.Module, outs: dict[str, torch.Tensor], labels: torch.Tensor,
                  weights: dict[str, float]) -> torch.Tensor:
    args = SimpleNamespace(use_selection=True, use_fpn=True, use_combiner=True, num_classes=CLASSES,
                           device=torch.device("cpu"), **weights)
    namespace = {"outs": outs, "labels": labels, "args": args, "batch_size": labels.numel(), "loss": 0.0,
                 "nn": torch.nn, "F": torch.nn.functional, "torch": torch}
    exec(compile(loop, "official main.py", "exec"), namespace)  # noqa: S102 - the official code, by design
    return namespace["loss"]


def ranks_of(stage: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """B x N token order: the row of ``stage`` each selected, then dropped, row is a copy of."""
    rows = torch.cat([kept, dropped], dim=1)
    same = (rows[:, :, None, :] == stage[:, None, :, :]).all(dim=-1)
    assert bool((same.sum(dim=-1) == 1).all()), "a selected row matches no or several stage rows"
    return same.to(torch.int64).argmax(dim=-1)


def run(pim_module: Any, loop: ast.Module, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    tokens = [t.to(dtype) for t in stage_tokens()]
    backbone = StandIn(tokens)
    torch.manual_seed(0)
    model = pim_module.PluginMoodel(backbone=backbone, return_nodes=None, img_size=8, use_fpn=True, fpn_size=WIDTH,
                                    proj_type="Linear", upsample_type="Conv", use_selection=True,
                                    num_classes=CLASSES, num_selects=dict(zip(NAMES, SELECTIONS, strict=True)),
                                    use_combiner=True, comb_proj_size=None)
    with torch.no_grad():
        model.combiner.alpha1.fill_(0.5)
    model.combiner.dropout.p = 0.0
    model = model.to(dtype).train()
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    labels = torch.tensor(LABELS)
    outs = model(torch.zeros(len(LABELS), 3, 8, 8, dtype=dtype))
    out: dict[str, torch.Tensor] = {f"state.{k}": v for k, v in state.items()}
    for i, name in enumerate(NAMES):
        out[f"tokens.{i}"] = tokens[i]
        out[f"stage.{i}"] = outs[name]
        out[f"selected.{i}"] = outs[f"select_{name}"]
        out[f"dropped.{i}"] = outs[f"drop_{name}"]
        out[f"ranks.{i}"] = ranks_of(outs[name], outs[f"select_{name}"], outs[f"drop_{name}"])
    out["combiner"] = outs["comb_outs"]
    ones = dict.fromkeys(WEIGHTS, 1.0)
    for key, value in outs.items():
        out[f"term.{key}"] = official_loss(loop, {key: value}, labels, ones).reshape(1)
    loss = official_loss(loop, dict(outs), labels, WEIGHTS)
    out["loss"] = loss.reshape(1)
    model.zero_grad()
    loss.backward()
    out.update({f"grad.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    return {f"{prefix}.{k}": v.detach() for k, v in out.items()}


def main() -> None:
    checkout = sys.argv[1]
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parents[2] / "tests/data/golden/pim"
    pim_module = official_module(checkout)
    loop = official_loss_loop(checkout)
    tensors = {"labels": torch.tensor(LABELS)}
    tensors.update(run(pim_module, loop, torch.float64, "f64"))
    tensors.update(run(pim_module, loop, torch.float32, "f32"))
    tensors.update(official_swin(checkout))
    write(out, tensors, official_commit(checkout), "chou141253/FGVC-PIM")


if __name__ == "__main__":
    main()
