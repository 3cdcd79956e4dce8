"""Training-step time of each fine-grained peer method against the baseline on the same backbone,
beside its FLOP overhead (issue 19).

Every model runs finebench's own training step (``build_train_step``: forward, the method's loss,
or its own step where it has one, backward, SGD) on one in-memory batch, the variants interleaved
repeat by repeat so the load of a shared machine hits them alike; the time overhead is the
median of the per-repeat ratios. The FLOP overhead is ``finebench profile``'s (fvcore, the
test-time prediction as the method makes it), and the training cost is one test pass's share of it
(WS-DAN's prediction takes 2 passes, CAL's 8) times the method's backbone passes per training image.
Training-only work outside the prediction (MCL's two loss terms, PMG's jigsaws and three extra
optimiser steps, WS-DAN's crops, drops and centre update, API-Net's pair head) is in the time but
not in the FLOPs: that is part of what the gap shows. The batch's labels are class-balanced
(classes of 4 images as API-Net's sampler draws them; the others do not care).

    python benchmarks/peers_overhead.py                 # timm:resnet10t at 224 px, N = 200
    python benchmarks/peers_overhead.py --quick         # a smoke run
    python benchmarks/peers_overhead.py --backbone resnet50 --size 224 --batch 4
    python benchmarks/peers_overhead.py --only ws_dan cal   # some peers (each still against the baseline)
    python benchmarks/peers_overhead.py --backbone resnet50 --size 448 --batch 16 --precision bf16   # GPU
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

VARIANTS: list[tuple[str, str, dict]] = [
    ("bcnn-r512", "bcnn", {"reduce": 512}),
    ("mcl", "mcl", {}),
    ("pmg", "pmg", {}),
    ("ws_dan", "ws_dan", {}),
    ("cal", "cal", {}),
    ("api_net-f0", "api_net", {"freeze_backbone_epochs": 0}),  # the step after its frozen epochs
]
"""(table name, kind, options): the peers measured, each against the baseline."""


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--backbone", default="timm:resnet10t")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="+", choices=[label for label, _, _ in VARIANTS], default=None,
                        help="measure these peers only (default: all)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="training precision (bf16 for the GPU figures)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model (default eager: seven compilations would dwarf the steps)")
    args = parse_benchmark_arguments(parser)
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    batch, repeats, warmup = (2, 1, 1) if args.quick else (args.batch, args.repeats, 2)
    train = TrainSection(epochs=1, batch_size=batch, schedule="constant", precision=args.precision,
                         compile=args.compile)
    costs = {row.label: row for row in profile_variants(args.backbone, args.classes, args.size, variants)}
    steps = {}
    for label, kind, options in [("baseline", "baseline", {}), *variants]:
        torch.manual_seed(0)
        model = build_model(args.backbone, args.classes, kind, options)
        method = get_method(kind)
        steps[label] = build_train_step(model, train, method=method, steps_per_epoch=100)
    images, _ = synthetic_batch(batch, args.size, args.classes, device=steps["baseline"].device)
    labels = torch.arange(batch, device=images.device) // 4 % args.classes  # classes of 4 images
    print("peers_overhead: training-step time of each peer method vs the baseline, beside its FLOP overhead")
    print(machine_line())
    timings = time_side_by_side({label: (lambda s=step: s(images, labels)) for label, step in steps.items()},
                                items=batch, warmup=warmup, repeats=repeats, device=steps["baseline"].device)
    base = timings["baseline"]
    rows = [[args.backbone, args.size, args.classes, batch, "baseline", f"{base.median_s * 1000:.0f}",
             "+0.0%", "1", "+0.0%", "+0.0%", f"{base.spread_pct:.0f}%"]]
    for label, _, _ in variants:
        timing, cost = timings[label], costs[label]
        time_overhead = 100.0 * (paired_ratio(base, timing) - 1.0)
        per_pass = (1 + cost.flops_overhead_pct / 100) / cost.test_forward_passes
        train_flops = 100.0 * (cost.train_passes_per_image * per_pass - 1)
        rows.append([args.backbone, args.size, args.classes, batch, label, f"{timing.median_s * 1000:.0f}",
                     f"{cost.flops_overhead_pct:+.1f}%", str(cost.train_passes_per_image), f"{train_flops:+.1f}%",
                     f"{time_overhead:+.1f}%", f"{timing.spread_pct:.0f}%"])
    print(format_table(["backbone", "px", "N", "batch", "variant", "step ms", "test FLOP +%", "train passes",
                        "train FLOP +%", "step time +%", "spread"], rows))
    print("FLOPs: fvcore forward, one multiply-add = one flop; "
          "train FLOP +% = train passes x (1 + test FLOP +%) / test passes - 1")
    print(machine_line())


if __name__ == "__main__":
    main()
