"""Training-step time of Attend and Rectify with its read-out as ordinary ops ("eager") against the
read-out operator (``readout = "custom_op"``, finebench/models/attention_op.py), eager and compiled.

Issue 21 chooses between them by measurement: ``compile = "auto"`` compiles A&R only once the
operator (or another fix) makes compiled A&R faster than eager on a GPU. Each pair runs finebench's
own training step on the same in-memory batch, interleaved, each repeat at least ``--min-repeat-s``
seconds, and the ratio printed is the median of the per-repeat ratios of the very timings shown.

    python benchmarks/attention_readout.py --quick                 # CPU smoke run
    python benchmarks/attention_readout.py --depth 28 --width 10   # the GPU measurement (N = 10, 100)
"""

from __future__ import annotations

import torch

from finebench.bench import (
    benchmark_arguments,
    calls_for_duration,
    format_table,
    machine_line,
    paired_ratio,
    parse_benchmark_arguments,
    synthetic_batch,
    time_side_by_side,
)
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step


def step_for(depth: int, width: int, num_classes: int, readout: str, train: TrainSection):
    torch.manual_seed(0)
    options = {"attention_depth": 3, "attention_width": 4, "readout": readout}
    model = build_model("wrn", num_classes, "attention", options, {"depth": depth, "width": width})
    return build_train_step(model, train, method=get_method("attention"), steps_per_epoch=100)


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 16 on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-repeat-s", type=float, default=0.5)
    args = parse_benchmark_arguments(parser)
    cuda = torch.cuda.is_available()
    batch = args.batch or (128 if cuda else 16)
    depth, width, repeats, min_repeat_s = args.depth, args.width, args.repeats, args.min_repeat_s
    compile_modes = (False, True)
    if args.quick:
        depth, width, batch, repeats, min_repeat_s, compile_modes = 10, 1, 4, 1, 0.0, (False,)
    print("attention_readout: A&R training step, read-out as eager ops vs the custom operator")
    print(machine_line())
    rows = []
    for num_classes in (10, 100):
        for compiled in compile_modes:
            train = TrainSection(epochs=1, batch_size=batch, schedule="constant", compile=compiled)
            steps = {readout: step_for(depth, width, num_classes, readout, train) for readout in ("eager", "custom_op")}
            images, labels = synthetic_batch(batch, 32, num_classes, device=steps["eager"].device)
            calls = calls_for_duration(lambda: steps["eager"](images, labels), images.device, min_repeat_s)
            steps["custom_op"](images, labels)  # its warm-up / compilation too
            timings = time_side_by_side(
                {name: (lambda s=step: s(images, labels)) for name, step in steps.items()},
                items=batch, warmup=1, repeats=repeats, calls_per_repeat=calls, device=steps["eager"].device,
            )
            eager, op = timings["eager"], timings["custom_op"]
            rows.append([f"WRN-{depth}-{width}", num_classes, batch, steps["eager"].precision,
                         "compiled" if compiled else "eager", calls,
                         f"{eager.median_s * 1000:.1f}", f"{op.median_s * 1000:.1f}",
                         f"{paired_ratio(op, eager):.3f}", f"{max(eager.spread_pct, op.spread_pct):.0f}%"])
    print(format_table(["backbone", "N", "batch", "precision", "mode", "steps/repeat", "eager ms/repeat",
                        "op ms/repeat", "op speed / eager", "spread"], rows))
    print("op speed / eager > 1: the operator is faster (median of per-repeat ratios of the timings above)")


if __name__ == "__main__":
    main()
