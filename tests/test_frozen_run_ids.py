"""Run ids are a contract with users: code changes that do not change what a run computes keep
every shipped recipe's ids, so finished runs are never retrained after an upgrade."""

from __future__ import annotations

import json

from frozen_ids import FROZEN, current_ids


def test_every_shipped_recipe_keeps_its_run_ids() -> None:
    frozen = json.loads(FROZEN.read_text())
    current = current_ids()
    assert sorted(current) == sorted(frozen), "a recipe was added or removed: run tests/frozen_ids.py"
    for recipe, ids in frozen.items():
        assert current[recipe] == ids, f"{recipe}: run ids changed"
