"""How long ``finebench run RECIPE --dry-run`` takes to answer, against the least any costing must do.

The dry run prints every run's params and FLOPs, so it has to build each distinct network of the
recipe and run it once. The reference (the floor) does exactly that and nothing else: one process
that imports finebench, builds each distinct network (random weights) and runs one forward of one
blank image at the recipe's input size. Both are whole processes (start-up and imports included),
alternated repeat by repeat after a warm-up of each; the medians and their ratio are printed with
the CPU seconds and the load average before and after, which on a shared machine decides the figure.

    python benchmarks/dry_run.py                      # recipes/ablation_cifar100.toml (WRN-40-10), 3 repeats
    python benchmarks/dry_run.py --recipe recipes/cifar10.toml --repeats 5
    python benchmarks/dry_run.py --quick              # smoke run: the same recipe at WRN-10-1, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUICK_OVERRIDES = ["model.options.depth=10", "model.options.width=1"]


def floor(recipe: str, overrides: list[str]) -> None:
    """The reference's work: build each distinct network of the recipe and run it once (batch 1)."""
    import torch

    from finebench.data.registry import get_spec
    from finebench.methods import build_model_from_config, network_key
    from finebench.recipe import expand_runs, load_recipe

    loaded = load_recipe(recipe, overrides)
    num_classes, size = get_spec(loaded.recipe.dataset.name).num_classes, loaded.input_size()
    configs = {network_key(run.config): run.config for run in expand_runs(loaded)}
    for config in configs.values():
        model = build_model_from_config(config, num_classes, pretrained=False).eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    print(f"{len(configs)} networks")


def _timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/ablation_cifar100.toml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: WRN-10-1, one repeat")
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)  # the reference's own process
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor(args.recipe, args.overrides)
        return
    overrides = list(args.overrides)
    if args.quick:
        overrides, args.repeats = [*overrides, *QUICK_OVERRIDES], 1
    sets = [arg for value in overrides for arg in ("--set", value)]
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "dry run": [sys.executable, "-m", "finebench", "run", args.recipe, "--dry-run", "--results-dir", tmp, *sets],
            "floor": [sys.executable, str(Path(__file__).resolve()), "--floor", "--recipe", args.recipe, *sets],
        }
        load_before = os.getloadavg()
        for command in commands.values():  # warm-up: the file cache, not counted
            _timed(command)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name in (list(commands) if repeat % 2 == 0 else list(reversed(commands))):
                times[name].append(_timed(commands[name]))
        load_after = os.getloadavg()
    medians = {name: (float(np.median([w for w, _ in runs])), float(np.median([c for _, c in runs])))
               for name, runs in times.items()}
    cores = len(os.sched_getaffinity(0))
    print(f"{args.recipe} {' '.join(sets)}: {cores} usable cores, {args.repeats} repeat(s), medians")
    for name, (wall, cpu) in medians.items():
        print(f"{name:8} wall {wall:6.1f} s  cpu {cpu:6.1f} s  (wall per repeat: "
              f"{', '.join(f'{w:.1f}' for w, _ in times[name])})")
    (wall, cpu), (floor_wall, floor_cpu) = medians["dry run"], medians["floor"]
    print(f"dry run / floor = {wall / floor_wall:.2f}x wall, {cpu / floor_cpu:.2f}x cpu   "
          f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1-min)")


if __name__ == "__main__":
    main()
