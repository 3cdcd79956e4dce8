"""Top-level aten operations per training step: what Attend and Rectify adds to the baseline.

On a GPU an eager training step launches about one kernel per aten operation, and when the
operations are small the GPU waits for Python to launch them (issue 15: A&R on WRN-28-10 cost
+71% step time for +2.4% FLOPs eager, +1.9% compiled). The count of operations dispatched by
the host is the CPU-measurable proxy: it does not depend on the machine's load, so it is exact
here where timings are noise. Counted with ``torch.profiler`` over one ``TrainStep`` (forward,
loss, backward, optimiser, scheduler; after two warm-up steps): an operation is top-level when
no other aten operation encloses it, so a composite's internals count once.

    python benchmarks/op_count.py                      # WRN-16-1, AD3 AW4, N=10, fp32
    python benchmarks/op_count.py --detail             # plus the per-operation difference
    python benchmarks/op_count.py --depth 28 --width 10 --precision auto

Reference (issue 15, before the fused-head rewrite): 403 baseline vs 750 with A&R.
"""

from __future__ import annotations

import collections

import torch
from torch.profiler import ProfilerActivity, profile

from finebench.bench import benchmark_arguments, format_table, machine_line, parse_benchmark_arguments, synthetic_batch
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step


def _is_top_level(event: object) -> bool:
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return event.name.startswith("aten::")  # type: ignore[attr-defined]


def count_step_ops(
    variant: str, *, depth: int, width: int, num_classes: int, attention: dict, precision: str, batch: int = 8
) -> collections.Counter[str]:
    """Top-level aten operations of one training step, by name (the third step: warm caches)."""
    torch.manual_seed(0)
    model = build_model("wrn", num_classes, variant, attention if variant == "attention" else None,
                        {"depth": depth, "width": width})
    train = TrainSection(epochs=1, batch_size=batch, schedule="constant", precision=precision, device="cpu")
    step = build_train_step(model, train, method=get_method(variant), steps_per_epoch=10)
    images, labels = synthetic_batch(batch, 32, num_classes)
    for _ in range(2):
        step(images, labels)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(images, labels)
    return collections.Counter(event.name for event in prof.events() if _is_top_level(event))


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--attention-depth", type=int, default=3)
    parser.add_argument("--attention-width", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "auto", "bf16"))
    parser.add_argument("--detail", action="store_true", help="also list the operations A&R adds, by name")
    args = parse_benchmark_arguments(parser)
    attention = {"attention_depth": args.attention_depth, "attention_width": args.attention_width}
    print(f"op_count: top-level aten operations per training step, WRN-{args.depth}-{args.width} "
          f"AD{args.attention_depth} AW{args.attention_width} N={args.classes}, {args.precision}, CPU")
    print(machine_line())
    counts = {
        variant: count_step_ops(variant, depth=args.depth, width=args.width, num_classes=args.classes,
                                attention=attention, precision=args.precision)
        for variant in ("baseline", "attention")
    }
    base, attn = sum(counts["baseline"].values()), sum(counts["attention"].values())
    print(format_table(["baseline", "attention", "added", "ratio"], [[base, attn, attn - base, f"{attn / base:.2f}"]]))
    if args.detail:
        added = counts["attention"].copy()
        added.subtract(counts["baseline"])
        rows = [[name, n] for name, n in sorted(added.items(), key=lambda kv: (-kv[1], kv[0])) if n]
        print(format_table(["operation", "added"], rows))


if __name__ == "__main__":
    main()
