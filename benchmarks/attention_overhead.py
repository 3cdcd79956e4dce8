"""Wall time of a training step with Attend and Rectify against the baseline, beside the FLOP overhead.

For WRN-16-4 and WRN-28-10 with AD3 AW4 and CIFAR-10 / CIFAR-100 heads, every model runs
finebench's own training step (forward, NLL on the mixture + regulariser, backward, SGD) on the
same in-memory batch, interleaved, at the engine's default precision. The FLOP overhead is
``finebench profile``'s (fvcore, forward). Target: time overhead <= FLOP overhead + 5 points.

WRN-28-10 (5.2 GMAC per 32x32 image) is huge for a 2-core CPU: it runs at a small batch and
few repeats so the script stays under 5 minutes; the script says so when it does.

    python benchmarks/attention_overhead.py            # the full table (about 3 minutes on 2 cores)
    python benchmarks/attention_overhead.py --quick    # a smoke run (tiny batches, one repeat)
"""

from __future__ import annotations

import torch

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
from finebench.profile import profile_variants
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

ATTENTION = {"attention_depth": 3, "attention_width": 4}
TARGET_MARGIN_POINTS = 5.0


def step_for(depth: int, width: int, num_classes: int, variant: str, train: TrainSection):
    torch.manual_seed(0)
    model = build_model("wrn", num_classes, variant, ATTENTION if variant == "attention" else None,
                        {"depth": depth, "width": width})
    return build_train_step(model, train, method=get_method(variant), steps_per_epoch=100)


def measure(depth: int, width: int, batch: int, warmup: int, repeats: int, precision: str, channels_last: bool):
    """Rows (backbone, N, FLOP overhead %, time overhead %, step times) for CIFAR-10 and CIFAR-100 heads."""
    train = TrainSection(epochs=1, batch_size=batch, schedule="constant", precision=precision,
                         channels_last=channels_last)
    rows = []
    for num_classes in (10, 100):
        flops = profile_variants("wrn", num_classes, 32, [("attention", "attention", ATTENTION)],
                                 {"depth": depth, "width": width})
        steps = {variant: step_for(depth, width, num_classes, variant, train) for variant in ("baseline", "attention")}
        images, labels = synthetic_batch(batch, 32, num_classes, device=steps["baseline"].device)
        timings = time_side_by_side(
            {name: (lambda s=step: s(images, labels)) for name, step in steps.items()},
            items=batch, warmup=warmup, repeats=repeats, device=steps["baseline"].device,
        )
        base, attn = timings["baseline"], timings["attention"]
        time_overhead = 100.0 * (paired_ratio(base, attn) - 1.0)  # attention time / baseline time, per repeat
        flop_overhead = flops[1].flops_overhead_pct
        rows.append([
            f"WRN-{depth}-{width}", num_classes, batch, steps["baseline"].precision,
            f"{base.median_s * 1000:.0f}", f"{attn.median_s * 1000:.0f}",
            f"{flop_overhead:+.1f}%", f"{time_overhead:+.1f}%",
            f"{time_overhead - flop_overhead:+.1f}", "yes" if time_overhead <= flop_overhead + TARGET_MARGIN_POINTS else "NO",
            f"{max(base.spread_pct, attn.spread_pct):.0f}%",
        ])
    return rows


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--skip-wrn28", action="store_true", help="only WRN-16-4")
    args = parse_benchmark_arguments(parser)
    # (depth, width, batch, warmup, repeats)
    configs = [(16, 4, 32, 2, 9), (28, 10, 8, 1, 5)]
    if args.quick:
        configs = [(16, 4, 4, 1, 1), (28, 10, 2, 1, 1)]
    if args.skip_wrn28:
        configs = configs[:1]
    print("attention_overhead: training-step time of Attend and Rectify (AD3 AW4) vs the baseline")
    print(machine_line())
    if not args.quick and not args.skip_wrn28:
        print("note: WRN-28-10 runs at batch 8 with 5 repeats to fit in 5 minutes on 2 CPU cores")
    rows = []
    for depth, width, batch, warmup, repeats in configs:
        rows += measure(depth, width, batch, warmup, repeats, args.precision, args.channels_last)
    print(format_table(
        ["backbone", "N", "batch", "precision", "base ms", "attn ms", "FLOP +%", "time +%", "time-FLOP pts",
         "target met", "spread"],
        rows,
    ))
    print(f"target: time overhead <= FLOP overhead + {TARGET_MARGIN_POINTS:.0f} points "
          "(FLOPs: fvcore forward, one multiply-add = one flop)")


if __name__ == "__main__":
    main()
