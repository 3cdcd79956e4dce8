"""Model FLOP utilisation: achieved FLOP/s of finebench's training step against the machine's matmul peak.

FLOPs of one step (forward + backward, optimiser excluded) are counted by torch's
``FlopCounterMode`` (two flops per multiply-add, the same convention as the peak: 2·n³ for an
n×n matmul). The peak is measured here, now, with the same threads and precision, so the ratio
says how close the step gets to what this machine can do.

    python benchmarks/mfu.py            # full run (about 2-3 minutes on 2 cores)
    python benchmarks/mfu.py --quick    # smoke run
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from finebench.bench import (
    benchmark_arguments,
    format_table,
    machine_line,
    parse_benchmark_arguments,
    synthetic_batch,
    time_side_by_side,
)
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(precision: str, size: int, device: torch.device, repeats: int) -> float:
    """Best FLOP/s of an n×n matmul in ``precision`` (the roof a conv net's step can approach)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, DTYPES[precision])
    b = torch.randn(size, size, generator=generator).to(device, DTYPES[precision])
    timing = time_side_by_side({"mm": lambda: torch.mm(a, b)}, items=1, warmup=2, repeats=repeats, device=device)["mm"]
    return 2 * size**3 / min(timing.seconds)


def step_flops(step, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Forward + backward FLOPs of one training step, counted while it runs."""
    with FlopCounterMode(display=False) as counter:
        step(images, labels)
    return counter.get_total_flops()


def main() -> None:
    parser = benchmark_arguments(__doc__)
    args = parse_benchmark_arguments(parser)
    # (label, backbone, options, variant, input, batch, num_classes)
    models = [
        ("WRN-16-4", "wrn", {"depth": 16, "width": 4}, "baseline", 32, 64, 10),
        ("WRN-16-4 A&R AD3 AW4", "wrn", {"depth": 16, "width": 4}, "attention", 32, 64, 10),
        ("ResNet-50", "resnet50", {}, "baseline", 224, 16, 1000),
    ]
    repeats, warmup, peak_size = 3, 1, 2048
    if args.quick:
        models = [(label, b, o, v, size, 2, n) for label, b, o, v, size, _, n in models]
        repeats, peak_size = 1, 512
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("mfu: achieved FLOP/s of the training step / measured matmul peak, same precision")
    print(machine_line())
    rows = []
    for precision in ("fp32", "bf16"):
        peak = matmul_peak(precision, peak_size, device, repeats + 2)
        rows.append([f"matmul {peak_size}x{peak_size}", precision, "-", "-", "-", f"{peak / 1e9:,.1f}", "1.00"])
        for label, backbone, options, variant, size, batch, num_classes in models:
            torch.manual_seed(0)
            model = build_model(backbone, num_classes, variant, None, options)
            train = TrainSection(epochs=1, batch_size=batch, schedule="constant", precision=precision,
                                 compile=False)  # FlopCounterMode counts the eager step
            step = build_train_step(model, train, method=get_method(variant), steps_per_epoch=100)
            images, labels = synthetic_batch(batch, size, num_classes, device=step.device)
            flops = step_flops(step, images, labels)
            timing = time_side_by_side({"step": lambda: step(images, labels)}, items=batch, warmup=warmup,
                                       repeats=repeats, device=device)["step"]
            achieved = flops / timing.median_s
            rows.append([label, precision, batch, f"{flops / batch / 1e9:.2f}", f"{timing.median_s * 1000:,.0f}",
                         f"{achieved / 1e9:,.1f}", f"{achieved / peak:.2f}"])
            del step, model
    print(format_table(["workload", "precision", "batch", "GFLOP/img (f+b)", "step ms", "GFLOP/s", "MFU"], rows))
    print("FLOPs: torch FlopCounterMode (2 per multiply-add), forward + backward; bf16 rows run the engine's "
          "bf16 autocast; MFU = GFLOP/s / the matmul peak of the same precision")


if __name__ == "__main__":
    main()
