"""Training-step time and peak memory of each transformer-era method against the plain ViT at the
same size, beside its FLOP overhead (issue 28).

Every model runs finebench's own training step (``build_train_step``: forward, the method's loss,
backward, SGD) on one in-memory batch, the variants interleaved repeat by repeat so the load of a
shared machine hits them alike; the time overhead is the median of the per-repeat ratios. Peak
memory is torch.profiler's memory timeline of one step (every live tensor: parameters, gradients,
activations kept for backward, temporaries; on the CPU, where no allocator statistics exist), its
overhead a ratio to the baseline's. The FLOP overhead is ``finebench profile``'s (fvcore on the
test-time prediction as the method makes it; TransFG's attention product under ``no_grad``
counts). The methods run on the CPU by default at a small size; ``--size 448`` with ``--backbone
timm:vit_base_patch16_224`` is the paper setting (a GPU, or much patience).

    python benchmarks/transformer_overhead.py              # ViT-S/16 and Swin-T at 224 px, N = 200
    python benchmarks/transformer_overhead.py --quick      # a smoke run
    python benchmarks/transformer_overhead.py --backbone timm:vit_base_patch16_224 --size 448 --batch 8
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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

VIT_VARIANTS: list[tuple[str, str, dict]] = [
    ("transfg", "transfg", {}),
    ("ielt", "ielt", {}),
]
"""(table name, kind, options): the ViT methods measured, each against the plain ViT."""
SWIN_VARIANTS: list[tuple[str, str, dict]] = [
    ("pim", "pim", {}),  # selections set per size in ``pim_selections``
]
"""... and the hierarchical one, against the plain Swin."""


def pim_selections(size: int) -> dict:
    """PIM's official 2048/512/128/32 fit Swin-L at 384 only: at other sizes keep the same shares of
    each stage's tokens (stride 8, 16, 32, 32: 2048/2304, 512/576, 128/144, 32/144)."""
    tokens = [(size // stride) ** 2 for stride in (8, 16, 32, 32)]
    return {"selections": [max(1, int(t * share)) for t, share in zip(tokens, (2048 / 2304, 512 / 576,
                                                                                  128 / 144, 32 / 144), strict=True)]}


def peak_memory_mib(step, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The largest total of live tensors during one training step, from the profiler's memory timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(images, labels)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA snapshots; the CPU view has no successor
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device=str(images.device))
        _, sizes = json.loads(path.read_text())
    return max(sum(point) for point in sizes) / 2**20


def measure(backbone: str, size: int, classes: int, batch: int, repeats: int, warmup: int, precision: str,
            variants: list[tuple[str, str, dict]]) -> list[list]:
    """The table rows of one backbone: its plain model, then each method against it."""
    backbone_options = {"img_size": size}
    train = TrainSection(epochs=1, batch_size=batch, schedule="constant", precision=precision)
    costs = {row.label: row for row in profile_variants(backbone, classes, size, variants, backbone_options)}
    steps = {}
    for label, kind, options in [("baseline", "baseline", {}), *variants]:
        torch.manual_seed(0)
        model = build_model(backbone, classes, kind, options, backbone_options)
        method = get_method(kind)
        steps[label] = build_train_step(model, train, method=method, steps_per_epoch=100)
    images, _ = synthetic_batch(batch, size, classes, device=steps["baseline"].device)
    labels = torch.arange(batch, device=images.device) // 2 % classes  # pairs of a class: the contrastive term acts
    timings = time_side_by_side({label: (lambda s=step: s(images, labels)) for label, step in steps.items()},
                                items=batch, warmup=warmup, repeats=repeats, device=steps["baseline"].device)
    memory = {label: peak_memory_mib(step, images, labels) for label, step in steps.items()}
    base = timings["baseline"]
    rows = [[backbone, size, batch, "baseline", f"{base.median_s * 1000:.0f}", "+0.0%", "+0.0%",
             f"{memory['baseline']:.0f}", "+0.0%", f"{base.spread_pct:.0f}%"]]
    for label, _, _ in variants:
        timing, cost = timings[label], costs[label]
        rows.append([backbone, size, batch, label, f"{timing.median_s * 1000:.0f}",
                     f"{cost.flops_overhead_pct:+.1f}%", f"{100.0 * (paired_ratio(base, timing) - 1.0):+.1f}%",
                     f"{memory[label]:.0f}", f"{100.0 * (memory[label] / memory['baseline'] - 1.0):+.1f}%",
                     f"{timing.spread_pct:.0f}%"])
    return rows


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--backbone", default="timm:vit_small_patch16_224")
    parser.add_argument("--swin", default="timm:swin_tiny_patch4_window7_224",
                        help="the hierarchical backbone PIM runs on ('none': skip it)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parse_benchmark_arguments(parser)
    batch, repeats, warmup = (2, 1, 1) if args.quick else (args.batch, args.repeats, 1)
    size = 96 if args.quick else args.size  # 6 x 6 patches: IELT's 24 votes a head need at least 24
    print("transformer_overhead: training-step time and peak memory of each method vs the plain ViT or Swin, "
          "beside FLOPs")
    print(machine_line())
    rows = measure(args.backbone, size, args.classes, batch, repeats, warmup, args.precision, VIT_VARIANTS)
    if args.swin != "none":
        pim = [(label, kind, {**options, **pim_selections(size)}) for label, kind, options in SWIN_VARIANTS]
        rows += measure(args.swin, size, args.classes, batch, repeats, warmup, args.precision, pim)
    print(format_table(["backbone", "px", "batch", "variant", "step ms", "test FLOP +%", "step time +%",
                        "peak MiB", "peak memory +%", "spread"], rows))
    print("FLOPs: fvcore forward, one multiply-add = one flop; peak: torch.profiler memory timeline of one step")
    print(machine_line())


if __name__ == "__main__":
    main()
