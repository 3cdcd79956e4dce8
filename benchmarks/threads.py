"""What ``train.threads = "auto"`` buys on a shared machine.

The quickstart's training step (WRN-10-1, 60x60, batch 32, default precision) with torch's default
thread count (one per core), with one thread, and with the count the auto rule picks at that moment,
interleaved step by step; first on the machine as it is, then beside CPU-bound processes (one, then
one per core), as when other jobs share the cores. The ratio auto / torch default is the point:
about 1 on an idle machine, well above 1 on a busy one.

    python benchmarks/threads.py            # a few minutes on 2 cores (longer the busier they are)
    python benchmarks/threads.py --quick    # smoke run
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from finebench.bench import (
    benchmark_arguments,
    format_table,
    machine_line,
    paired_ratio,
    synthetic_batch,
    time_side_by_side,
)
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step
from finebench.train.threads import choose_threads

TORCH_DEFAULT = torch.get_num_threads()
"""Read before anything sets it: what a run got before ``auto``."""
BATCH, SIZE = 32, 60


def _busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    args = benchmark_arguments(__doc__).parse_args()  # --threads is ignored: the thread count is what varies
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    conditions = [("as is", 0), ("1 busy process", 1)] + ([] if args.quick else [(f"{cores} busy processes", cores)])
    repeats, warmup = (2, 1) if args.quick else (10, 2)
    os.environ.pop("OMP_NUM_THREADS", None)  # let the rule measure
    torch.manual_seed(0)
    model = build_model("wrn", 10, "baseline", None, {"depth": 10, "width": 1})
    step = build_train_step(model, TrainSection(epochs=1, batch_size=BATCH, schedule="constant"),
                            method=get_method("baseline"), steps_per_epoch=100)
    images, labels = synthetic_batch(BATCH, SIZE, 10, device=step.device)

    def at(threads: int):
        def run() -> None:
            torch.set_num_threads(threads)
            step(images, labels)
        return run

    rows = []
    for label, busy in conditions:
        hogs = _busy_processes(busy)
        try:
            time.sleep(1.0 if busy else 0.0)  # let them start spinning before the rule looks
            choice = choose_threads("auto")
            load = os.getloadavg()[0]
            timings = time_side_by_side(
                {"default": at(TORCH_DEFAULT), "one": at(1), "auto": at(choice.threads)},
                items=BATCH, warmup=warmup, repeats=repeats, device=step.device,
            )
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        rows.append([
            label, f"{load:.1f}", choice.threads, f"{timings['default'].per_s:,.0f}", f"{timings['one'].per_s:,.0f}",
            f"{timings['auto'].per_s:,.0f}", f"{paired_ratio(timings['auto'], timings['default']):.2f}",
        ])
    print(format_table(
        ["machine", "load 1-min", "auto threads", f"img/s {TORCH_DEFAULT} threads (torch default)", "img/s 1 thread",
         "img/s auto", "auto vs torch default"],
        rows,
    ))
    print(f"quickstart step: WRN-10-1 {SIZE}x{SIZE} batch {BATCH}, {step.precision}; {machine_line()}")


if __name__ == "__main__":
    main()
