"""Behaviour check for refactors: train the tiny recipes beside this file with one source tree and
write every run's metrics.jsonl rows (minus the fields that describe the machine) to one JSON file;
``compare`` then says whether two such files are identical, run by run and row by row.

A refactor that claims "nothing a run computes changes" runs this on the commit before and after:

    python tools/behaviour/check.py run --src /path/to/old/checkout --out /tmp/before.json
    python tools/behaviour/check.py run --src . --out /tmp/after.json
    python tools/behaviour/check.py compare /tmp/before.json /tmp/after.json

``--mode accumulate`` adds ``train.accumulation_steps = 2``; ``--mode gloo`` trains each run on two
Gloo workers (``--nproc-per-node 2``). The recipes pin ``train.threads = 1`` so that the float
reductions run in one order on any machine; the data are the tests' bars (tests/tiny_data.py),
prepared through the source tree's own store into a temporary data root.

It lives outside the package because it runs two checkouts side by side (``PYTHONPATH=SRC``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MACHINE_FIELDS = {"epoch_time_s", "images_per_s", "threads", "load_1min"}
"""Fields that say how the machine ran an epoch (finebench.results.MACHINE_FIELDS of today), not what it computed."""
MODES = {"plain": [], "accumulate": ["--set", "train.accumulation_steps=2"], "gloo": ["--nproc-per-node", "2"]}
TRAIN_IMAGES, TEST_IMAGES = 320, 80


def run(source: Path, out: Path, mode: str, recipes: list[str]) -> int:
    environment = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="behaviour-") as scratch:
        data, results = Path(scratch) / "data", Path(scratch) / "results"
        prepare = ("import sys; from pathlib import Path; sys.path.insert(0, 'tests'); "
                   f"from tiny_data import prepare_tiny_bars; prepare_tiny_bars(Path({str(data)!r}), "
                   f"{TRAIN_IMAGES}, {TEST_IMAGES})")
        subprocess.run([sys.executable, "-c", prepare], cwd=source, env=environment, check=True)
        rows: dict[str, list[dict]] = {}
        failed = 0
        for name in recipes:
            recipe = HERE / f"{name}.toml"
            command = [sys.executable, "-m", "finebench.cli", "run", str(recipe), "--results-dir", str(results),
                       "--data-root", str(data), "-q", *MODES[mode]]
            finished = subprocess.run(command, cwd=source, env=environment)
            if finished.returncode:
                print(f"{name}: finebench run exited {finished.returncode}", file=sys.stderr)
                failed += 1
        for metrics in sorted(results.glob("*/*/metrics.jsonl")):
            key = f"{metrics.parent.parent.name}/{metrics.parent.name}"
            rows[key] = [{field: value for field, value in json.loads(line).items() if field not in MACHINE_FIELDS}
                         for line in metrics.read_text().splitlines() if line.strip()]
    out.write_text(json.dumps({"mode": mode, "runs": rows}, indent=1, sort_keys=True))
    print(f"{len(rows)} runs written to {out}")
    return 1 if failed else 0


def compare(before: Path, after: Path, without: frozenset[str] = frozenset()) -> int:
    """``without``: fields left out of both files' rows (a field a change adds on purpose)."""
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    for runs in (old["runs"], new["runs"]):
        for key, rows in runs.items():
            runs[key] = [{field: value for field, value in row.items() if field not in without} for row in rows]
    differences = 0
    for key in sorted(set(old["runs"]) | set(new["runs"])):
        if key not in new["runs"] or key not in old["runs"]:
            print(f"{key}: only in {before if key in old['runs'] else after}")
            differences += 1
        elif old["runs"][key] != new["runs"][key]:
            for index, (a, b) in enumerate(zip(old["runs"][key], new["runs"][key], strict=False)):
                changed = {field for field in set(a) | set(b) if a.get(field) != b.get(field)}
                if changed:
                    print(f"{key} row {index}: " + ", ".join(f"{f}: {a.get(f)} -> {b.get(f)}" for f in sorted(changed)))
            if len(old["runs"][key]) != len(new["runs"][key]):
                print(f"{key}: {len(old['runs'][key])} rows -> {len(new['runs'][key])}")
            differences += 1
    print(f"{len(old['runs'])} runs before, {len(new['runs'])} after, {differences} differ")
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--src", type=Path, required=True, help="source tree (a checkout of finebench)")
    runner.add_argument("--out", type=Path, required=True)
    runner.add_argument("--mode", choices=sorted(MODES), default="plain")
    runner.add_argument("--recipes", nargs="*", default=sorted(path.stem for path in HERE.glob("*.toml")))
    comparer = commands.add_parser("compare")
    comparer.add_argument("before", type=Path)
    comparer.add_argument("after", type=Path)
    comparer.add_argument("--without", nargs="*", default=[], help="fields to leave out of both (new on purpose)")
    arguments = parser.parse_args()
    if arguments.command == "run":
        return run(arguments.src.resolve(), arguments.out, arguments.mode, arguments.recipes)
    return compare(arguments.before, arguments.after, frozenset(arguments.without))


if __name__ == "__main__":
    sys.exit(main())
