"""Writes tests/data/frozen_run_ids.json: the run id of every run of every shipped recipe.

Run it only when an issue changes a recipe's settings on purpose (and say so in the changelog);
a change of code that does not change what a run computes must leave this file as it is.

    python tests/frozen_ids.py
"""

from __future__ import annotations

import json
from pathlib import Path

from finebench.recipe import expand_runs, load_recipe

ROOT = Path(__file__).resolve().parents[1]
FROZEN = ROOT / "tests" / "data" / "frozen_run_ids.json"


def current_ids() -> dict[str, list[str]]:
    """``recipe file -> ["backbone/variant/seedS[/foldF]=run_id", ...]`` in run order."""
    ids: dict[str, list[str]] = {}
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        runs = expand_runs(load_recipe(path, check_dataset=False))
        ids[path.name] = [
            f"{run.config['model']['backbone']}/{run.variant_name}/seed{run.seed}"
            + (f"/fold{run.fold}" if run.fold is not None else "")
            + f"={run.run_id}"
            for run in runs
        ]
    return ids


if __name__ == "__main__":
    FROZEN.write_text(json.dumps(current_ids(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FROZEN}")
