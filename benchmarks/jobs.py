"""What ``finebench run RECIPE --jobs N`` buys on this machine: wall time of a recipe's runs, serial
against N jobs, in one invocation (the two are timed back to back, serial first, then alternated).

The recipe: 4 one-thread runs (WRN-10-1, 2 variants x 2 seeds, fp32, CPU) on the embedded mnist5k
(5,000 training images, 28 px), prepared once into a temporary folder. The ratio serial / jobs is
the point: above 1 when the jobs' cores are free, about 1 when other processes already keep every
core busy, below 1 when the runs are too short to pay for each job's start (import, data, costs). The load average is printed beside it, read before and
after, since on a shared machine it decides the figure.

    python benchmarks/jobs.py                 # --jobs 2, 3 epochs, two repeats of each (3 minutes on 2 cores)
    python benchmarks/jobs.py --jobs 4 --repeats 1 --epochs 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPE = """
seeds = [0, 1]
[dataset]
name = "mnist5k"
input_size = 28
augmentation = "none"
[model]
backbone = "wrn"
options = {{ depth = 10, width = 1 }}
[[variants]]
kind = "baseline"
[[variants]]
kind = "attention"
attention_depth = 2
attention_width = 2
[train]
epochs = {epochs}
batch_size = 32
eval_batch_size = 100
lr = 0.05
schedule = "constant"
precision = "fp32"
threads = 1
device = "cpu"
"""


def _timed_run(recipe: Path, results: Path, data_root: Path, jobs: int) -> float:
    command = [sys.executable, "-m", "finebench", "run", str(recipe), "--results-dir", str(results),
               "--data-root", str(data_root), "--quiet"]
    if jobs > 1:
        command += ["--jobs", str(jobs)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: one epoch, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats = 1, 1

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data_root = _prepare(tmp_path / "data")
        recipe = tmp_path / "jobs.toml"
        recipe.write_text(RECIPE.format(epochs=args.epochs))
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"serial": [], "jobs": []}
        for repeat in range(args.repeats):
            order = ("serial", "jobs") if repeat % 2 == 0 else ("jobs", "serial")
            for kind in order:
                results = tmp_path / f"results-{kind}-{repeat}"
                times[kind].append(_timed_run(recipe, results, data_root, args.jobs if kind == "jobs" else 1))
        load_after = os.getloadavg()
    serial, jobs = float(np.median(times["serial"])), float(np.median(times["jobs"]))
    cores = len(os.sched_getaffinity(0))
    print(f"4 one-thread runs of WRN-10-1 on mnist5k, {args.epochs} epoch(s) each; {cores} usable cores")
    print(f"serial      {serial:7.1f} s  (repeats: {', '.join(f'{t:.1f}' for t in times['serial'])})")
    print(f"--jobs {args.jobs:<4} {jobs:7.1f} s  (repeats: {', '.join(f'{t:.1f}' for t in times['jobs'])})")
    print(f"serial / jobs = {serial / jobs:.2f}x   load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          f"(1-min)")



def _prepare(root: Path) -> Path:
    """The embedded mnist5k (no download), prepared once so neither side pays for it."""
    subprocess.run([sys.executable, "-m", "finebench", "prepare", "mnist5k", "--data-root", str(root), "--quiet"],
                   check=True)
    return root

if __name__ == "__main__":
    main()
