"""Write golden tensors from the authors' code at one commit, for finebench's fidelity options.

The authors' code never enters finebench: this script imports it from a checkout given on the
command line (e.g. ``git --git-dir=<bare clone> worktree add /tmp/pa-ea7d4af ea7d4af``, or a
``git archive`` of that commit unpacked), builds their model with fixed seeds and tiny widths,
runs one training-mode forward and backward and one evaluation forward, and saves the inputs,
their weights (under their own parameter names), outputs, losses and gradients to
``OUT/<commit>/<case>.safetensors`` (tensors ``state_dict.<their name>``, ``grads.<their name>``,
``input``, ``labels``, outputs and losses; the metadata holds the commit, case and arguments). ``tests/test_fidelity_golden.py`` loads them into finebench's model
with the matching options and compares.

Cases (each needs its file in the checkout):
  baseline   models/wide_resnet_cifar.py ``WideResNet`` (the CIFAR baselines' model, 844c4f8)
  attention  models/wide_resnet_cifar_painless.py ``WideResNetAttention`` (the CIFAR attention runs)
  module     modules/attention.py ``AttentionModule`` alone, its regulariser included (fine-grained runs)

Usage:
  python tools/golden_authors.py CHECKOUT --commit ea7d4af --cases attention --out tests/data/golden/authors
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

DEPTH, WIDTH, CLASSES, BATCH = 10, 0.25, 5, 2
"""WRN-10 at a quarter width (4/8/16 channels): every layer exists, the file stays small."""
ATTENTION = {"attention_depth": 3, "attention_width": 2, "reg_w": 0.5, "attention_output": "all",
             "attention_type": "softmax"}
"""reg_w large enough that the regulariser moves the gradients visibly at this size."""


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm weights and biases away from 1 and 0, so a misplaced BatchNorm shows in the outputs."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)


def build(case: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    if case == "baseline":
        model = importlib.import_module("models.wide_resnet_cifar").WideResNet(DEPTH, WIDTH, CLASSES)
        return model, {"depth": DEPTH, "width": WIDTH, "num_classes": CLASSES}
    if case == "attention":
        cls = importlib.import_module("models.wide_resnet_cifar_painless").WideResNetAttention
        args: dict[str, Any] = {"depth": DEPTH, "width": WIDTH, "num_classes": CLASSES, **ATTENTION}
        if "dropout" in inspect.signature(cls).parameters:
            args["dropout"] = 0.0
        return cls(**args), args
    if case == "module":
        cls = importlib.import_module("modules.attention").AttentionModule
        args = {"in_ch": 8, "nlabels": CLASSES, "nheads": 3, "reg_w": 1.0}
        return cls(**args), args
    raise SystemExit(f"unknown case {case!r}: expected baseline, attention or module")


def run_case(case: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model, args = build(case)
    randomise_batchnorm(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shape = (BATCH, 8, 8, 8) if case == "module" else (BATCH, 3, 32, 32)
    images = torch.randn(shape)
    labels = torch.randint(0, CLASSES, (BATCH,))
    model.train()
    out = model(images)
    record: dict[str, Any] = {"case": case, "args": args, "state_dict": state, "input": images, "labels": labels}
    if case == "baseline":
        log_probs = F.log_softmax(out, dim=1)
        loss = F.nll_loss(log_probs, labels)
    elif case == "attention":
        log_probs, reg = out
        record["reg_loss"] = reg.detach().clone()
        loss = F.nll_loss(log_probs, labels) + reg
    else:
        module_logits = out.view(BATCH, CLASSES)
        reg = model.reg_loss()
        record["reg_loss"] = reg.detach().clone()
        log_probs = F.log_softmax(module_logits, dim=1)
        record["module_logits"] = module_logits.detach().clone()
        loss = F.nll_loss(log_probs, labels) + reg
    loss.backward()
    record["train_log_probs"] = log_probs.detach().clone()
    record["loss"] = loss.detach().clone()
    record["grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    if case != "module":
        model.eval()
        with torch.no_grad():
            out = model(images)
        record["eval_log_probs"] = (out[0] if isinstance(out, tuple) else F.log_softmax(out, dim=1)).clone()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="the authors' code at COMMIT (a worktree or an unpacked archive)")
    parser.add_argument("--commit", required=True, help="the commit the checkout holds (names the output folder)")
    parser.add_argument("--cases", default="attention", help="comma-separated: baseline, attention, module")
    parser.add_argument("--out", type=Path, default=Path("tests/data/golden/authors"))
    ns = parser.parse_args()
    if (ns.checkout / ".git").exists():
        head = subprocess.run(["git", "-C", str(ns.checkout), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        if not head.startswith(ns.commit):
            raise SystemExit(f"{ns.checkout} holds {head}, not --commit {ns.commit}")
    sys.path.insert(0, str(ns.checkout.resolve()))
    warnings.filterwarnings("ignore")  # their 2018 code calls deprecated torch functions
    folder = ns.out / ns.commit
    folder.mkdir(parents=True, exist_ok=True)
    for case in ns.cases.split(","):
        record = run_case(case)
        tensors = {key: value.contiguous() for key, value in record.items() if isinstance(value, torch.Tensor)}
        for group in ("state_dict", "grads"):
            tensors.update({f"{group}.{name}": value.contiguous() for name, value in record[group].items()})
        metadata = {"commit": ns.commit, "case": case, "args": json.dumps(record["args"]), "torch": str(torch.__version__)}
        path = folder / f"{case}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        print(f"{path}: loss {float(record['loss']):.6f}")


if __name__ == "__main__":
    main()
