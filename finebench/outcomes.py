"""What ``finebench run`` says of each run when it ends (``RunOutcome``), and its exit code.

The serial runner makes the outcomes as it trains; ``--jobs`` and ``--submit local`` read them
from the records the processes they started left (``outcomes_on_disk``). Either way the command's
exit code is ``exit_code``'s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finebench.plan import Plan
from finebench.recipe import RunSpec


@dataclass
class RunOutcome:
    run: RunSpec
    path: Path | None
    status: str
    """finished | failed | skipped-finished | skipped-failed | locked | planned; under ``--jobs`` also
    stopped (the job training it stopped or died: the run is as its last saved epoch left it)"""
    summary: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    """Dry runs: the run's state on disk (``RunState.kind``: running, new, resumable, finished, failed, damaged)."""
    data: str | None = None
    """Dry runs: whether the dataset is prepared (prepared, not prepared, prepared on first run)."""


EXIT_FAILED = 1
"""``finebench run`` exit code when a run failed (now or in an earlier invocation)."""
EXIT_LOCKED = 3
"""``finebench run`` exit code when runs were left to another process that holds their lock."""


def exit_code(outcomes: Sequence[RunOutcome]) -> int:
    """0 only when every run is finished (now or earlier), so ``finebench run R && next`` is safe."""
    statuses = {outcome.status for outcome in outcomes}
    if statuses & {"failed", "skipped-failed", "stopped"}:
        return EXIT_FAILED
    if "locked" in statuses:
        return EXIT_LOCKED
    return 0


def outcomes_on_disk(plan: Plan, decisions: Mapping[str, str], stopped: Collection[str] = ()) -> list[RunOutcome]:
    """Each planned run's outcome read from its records, after other processes trained them
    (``--jobs``, ``--submit local``): skipped as decided before they started, else as the records
    now stand; ``stopped``: runs whose process stopped or died while training them (its own line
    said why); any other run none of them finished is ``locked`` (another process holds it, or they
    stopped before it)."""
    outcomes = []
    for run in plan.runs:
        run_dir = plan.run_dirs[run.run_id]
        state = run_dir.state()
        if plan.states[run.run_id].kind == "finished":
            status = "skipped-finished"
        elif decisions[run.run_id] == "skipped-failed":
            status = "skipped-failed"
        elif state.kind in ("finished", "failed"):
            status = state.kind
        elif run.run_id in stopped:
            status = "stopped"
        else:
            status = "locked"
        outcomes.append(RunOutcome(run, run_dir.path, status,
                                   run_dir.summary() or {} if status not in ("locked", "stopped") else {}))
    return outcomes
