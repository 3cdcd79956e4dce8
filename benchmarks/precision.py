"""What finebench's default precision and memory format buy over plain fp32 NCHW, and what they cost.

Speed: the engine's training step of WRN-16-4 (32x32, batch 64) at ``precision = "auto"`` with
the default memory format (what a recipe gets when it says nothing), against fp32 NCHW, with
bf16 + channels_last beside them as the alternative the default did not pick, interleaved.

Accuracy: the same short, fixed training (WRN-10-1 on the offline ``mnist5k`` digits, prepared into
a temporary folder by ``finebench prepare``'s own code, 2 epochs, seed 0) once in fp32 and once
with the defaults, through the real loader and ``fit``, so the speed-up is seen to cost no accuracy.

    python benchmarks/precision.py            # about 3-4 minutes on 2 cores
    python benchmarks/precision.py --quick    # smoke run
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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
from finebench.data.loader import build_loaders
from finebench.data.prepare import prepare_dataset
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.fit import fit
from finebench.train.rng import seed_everything
from finebench.train.step import build_train_step

BATCH = 128
DEFAULTS = TrainSection(epochs=1, batch_size=1, schedule="constant")
"""A recipe's train section with nothing said: its precision and channels_last are the defaults."""


def speed(batch: int, warmup: int, repeats: int) -> list[list]:
    settings = {
        "fp32 NCHW": ("fp32", False),
        "default": (DEFAULTS.precision, DEFAULTS.channels_last),
        "bf16 channels_last": ("bf16", True),
    }
    steps = {}
    for name, (precision, channels_last) in settings.items():
        torch.manual_seed(0)
        model = build_model("wrn", 10, "baseline", None, {"depth": 16, "width": 4})
        train = TrainSection(epochs=1, batch_size=batch, schedule="constant", precision=precision,
                             channels_last=channels_last)
        steps[name] = build_train_step(model, train, method=get_method("baseline"), steps_per_epoch=100)
    device = next(iter(steps.values())).device
    images, labels = synthetic_batch(batch, 32, 10, device=device)
    timings = time_side_by_side({name: (lambda s=step: s(images, labels)) for name, step in steps.items()},
                                items=batch, warmup=warmup, repeats=repeats, device=device)
    reference = timings["fp32 NCHW"]
    default = steps["default"]  # named after what "auto" resolved to on this machine
    label = f"default ({default.precision}{', channels_last' if default.channels_last else ''})"
    return [[label if name == "default" else name, steps[name].precision, f"{t.per_s:,.1f}",
             f"{paired_ratio(t, reference):.2f}x", f"{t.spread_pct:.0f}%"] for name, t in timings.items()]


def accuracy(data_root: Path, epochs: int, train_limit: int | None) -> list[list]:
    prepare_dataset("mnist5k", data_root, quiet=True)
    rows = []
    for name, precision, channels_last in (("fp32 NCHW", "fp32", False),
                                           ("default", DEFAULTS.precision, DEFAULTS.channels_last)):
        seed_everything(0)
        model = build_model("wrn", 10, "baseline", None, {"depth": 10, "width": 1})
        loaders = build_loaders("mnist5k", data_root, batch_size=BATCH, eval_batch_size=500, seed=0)
        train_loader = loaders.train
        if train_limit is not None:
            subset = torch.utils.data.Subset(loaders.train.dataset, range(train_limit))
            train_loader = torch.utils.data.DataLoader(subset, batch_size=BATCH, shuffle=True,
                                                       collate_fn=loaders.train.collate_fn)
        train = TrainSection(epochs=epochs, batch_size=BATCH, lr=0.1, schedule="cosine", precision=precision,
                             channels_last=channels_last, weight_decay=5e-4, eval_every=epochs)
        result = fit(model, train_loader, loaders.test, train, method=get_method("baseline"))
        final = result.rows[-1]
        rows.append([name, result.precision, epochs, f"{final['test_top1']:.2f}", f"{final['test_loss']:.4f}",
                     f"{result.train_time_s:.1f}"])
    return rows


def main() -> None:
    parser = benchmark_arguments(__doc__)
    args = parse_benchmark_arguments(parser)
    print("precision: finebench's default precision/memory format vs fp32 NCHW")
    print(machine_line())
    batch, warmup, repeats, epochs, limit = 64, 1, 3, 2, None
    if args.quick:
        batch, warmup, repeats, epochs, limit = 4, 1, 1, 1, 128
    print(f"speed: WRN-16-4 training step, 32x32, batch {batch}")
    print(format_table(["setting", "precision", "img/s", "vs fp32", "spread"], speed(batch, warmup, repeats)))
    print(f"accuracy: WRN-10-1 on mnist5k, {epochs} epochs, batch {BATCH}, seed 0, cosine lr 0.1 (test split, final epoch)")
    with tempfile.TemporaryDirectory(prefix="finebench-precision-") as folder:
        rows = accuracy(Path(folder), epochs, limit)
    print(format_table(["setting", "precision", "epochs", "test top-1 %", "test loss", "train s"], rows))


if __name__ == "__main__":
    main()
