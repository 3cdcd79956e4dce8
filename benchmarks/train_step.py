"""images/s of finebench's training step against a minimal hand-written PyTorch loop, same model and data.

Both sides train the same model object on the same batch already in memory, at the same
precision: the plain loop is autocast forward, loss, ``zero_grad``/``backward``/``step``; the
engine's ``TrainStep`` adds what a real run needs (LR schedule step, the grad scaler hook,
on-device accuracy counting, the memory-format copy). Target: finebench / plain >= 0.97 in fp32.

    python benchmarks/train_step.py               # WRN-16-4 (32x32, batch 128), ResNet-50 (224, batch 32); ~3 min on 2 cores
    python benchmarks/train_step.py --precision auto
    python benchmarks/train_step.py --quick       # smoke run
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finebench.bench import (
    benchmark_arguments,
    format_table,
    machine_line,
    paired_ratio,
    parse_benchmark_arguments,
    synthetic_batch,
    time_side_by_side,
)
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.runtime import autocast
from finebench.train.step import build_train_step
from finebench.train.optim import build_optimizer

TARGET = 0.97


def plain_loop_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, precision: str):
    """The loop a PyTorch user writes by hand: the reference the engine is measured against."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(images).logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def compare(label: str, backbone: str, options: dict, size: int, batch: int, num_classes: int,
            precision: str, warmup: int, repeats: int) -> list:
    torch.manual_seed(0)
    model = build_model(backbone, num_classes, "baseline", None, options)
    train = TrainSection(epochs=1, batch_size=batch, schedule="constant", precision=precision,
                         compile=False, channels_last=False)  # the plain loop is eager NCHW too
    engine = build_train_step(model, train, method=get_method("baseline"), steps_per_epoch=100)
    # Same model and the same optimiser settings (SGD Nesterov, weight decay, momentum) as the engine's.
    plain = plain_loop_step(model, build_optimizer(model, train), engine.device, engine.precision)
    images, labels = synthetic_batch(batch, size, num_classes, device=engine.device)
    timings = time_side_by_side(
        {"finebench": lambda: engine(images, labels), "plain": lambda: plain(images, labels)},
        items=batch, warmup=warmup, repeats=repeats, device=engine.device,
    )
    ours, reference = timings["finebench"], timings["plain"]
    ratio = paired_ratio(ours, reference)
    return [label, size, batch, engine.precision, f"{ours.per_s:,.1f}", f"{reference.per_s:,.1f}", f"{ratio:.3f}",
            "yes" if ratio >= TARGET else "NO", f"{max(ours.spread_pct, reference.spread_pct):.0f}%"]


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "auto", "bf16"))
    args = parse_benchmark_arguments(parser)
    # (label, backbone, options, input size, batch, classes, warmup, repeats)
    configs = [
        ("WRN-16-4", "wrn", {"depth": 16, "width": 4}, 32, 128, 10, 2, 9),
        ("ResNet-50", "resnet50", {}, 224, 32, 1000, 1, 6),
    ]
    if args.quick:
        configs = [(label, b, o, size, 2, n, 1, 1) for label, b, o, size, _, n, _, _ in configs]
    print("train_step: finebench's training step vs a hand-written PyTorch loop (same model, batch in memory)")
    print(machine_line())
    rows = [compare(*config[:6], args.precision, *config[6:]) for config in configs]
    print(format_table(["model", "input", "batch", "precision", "finebench img/s", "plain img/s",
                        "finebench/plain", f">= {TARGET}", "spread"], rows))
    print("img/s: median of interleaved repeats after warm-up; ratio: median of the per-repeat ratios; "
          "spread = (max-min)/median of the noisier side")


if __name__ == "__main__":
    main()
