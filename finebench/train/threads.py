"""How many CPU threads a run's tensor ops use, so a busy machine slows a run down instead of stalling it.

torch's default is one intra-op thread per core. On cores that other processes also use, every
parallel op then waits for its slowest thread, which the scheduler has just handed to someone else
(README.md, "On a shared machine", has the figures). ``train.threads = "auto"`` (the
default) counts the cores that are idle right now and uses that many threads (at least one), split
between the workers of a distributed run on this machine; ``OMP_NUM_THREADS`` in the environment is
taken as the user's own choice. A number pins the count.

Under ``"auto"`` the count is decided again at the start of every epoch (the runner's first choice
covers the first epoch), so a run that started while the machine was busy speeds up once it is
not. A thread count changes the order of floating-point sums on the CPU, so there a run's numbers
then depend on the load it met; ``"auto-once"`` decides once, at the run's first start, and a
resumed run keeps that count (``previous``), which keeps kill-and-resume bit-identical. On a GPU
the model's arithmetic does not run on these threads and both give the same numbers.

Each epoch's row in metrics.jsonl records the count and the 1-minute load average
(``load_1min``, the run's own threads included), so speeds measured under different conditions
are marked as such (``speed_conditions_differ``).
"""

from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

import torch

SAMPLE_S = 0.25
"""How long the idle cores are watched: long enough for 25 scheduler ticks per core, short beside an epoch."""
ROUND_UP_FROM = 0.7
"""Idle fraction of a core that still counts as a whole idle core (our own start-up noise costs ~0.1-0.2)."""


AUTO = "auto"
"""Decided at every epoch start (the recipe default)."""
AUTO_ONCE = "auto-once"
"""Decided at the run's first start and kept by its resumes (bit-identical kill-and-resume on the CPU)."""
OTHER_LOAD_TOLERANCE = 1.0
"""Cores of load from other processes by which two measurements may differ and still compare."""


def decided_each_epoch(setting: int | str | None) -> bool:
    return setting == AUTO


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def speed_conditions_differ(conditions: list[tuple[list[int], float | None]]) -> bool:
    """Whether img/s figures measured under these conditions compare: each is (thread counts the
    run's epochs used, its mean 1-minute load). They differ when the counts differ, or when the load
    from other processes (load minus the run's own threads) differs by more than a core."""
    counts = {tuple(sorted(set(threads))) for threads, _ in conditions if threads}
    if len(counts) > 1:
        return True
    others = [load - max(threads) for threads, load in conditions if threads and load is not None]
    return bool(others) and max(others) - min(others) > OTHER_LOAD_TOLERANCE


class ThreadChoice(NamedTuple):
    threads: int
    rule: str
    """Why: recorded in the run's summary.json (``threads_rule``)."""


def _usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return list(range(os.cpu_count() or 1))


def _cpu_times(cores: list[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over ``cores`` from /proc/stat, or None where it is not readable."""
    wanted = {f"cpu{core}" for core in cores}
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            lines = [line.split() for line in handle if line.startswith("cpu")]
    except OSError:
        return None
    idle = total = 0.0
    for fields in lines:
        if fields[0] in wanted:
            values = [float(v) for v in fields[1:]]
            idle += values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
            total += sum(values[:8])  # guest time is already inside user time
    return (idle, total) if total else None


def idle_cores(cores: list[int] | None = None, sample_s: float = SAMPLE_S) -> tuple[float, str]:
    """Cores of ``cores`` (default: those this process may run on) left idle by everything else, and how it was measured.

    /proc/stat over ``sample_s`` on Linux (only our cores count, so a container pinned to 2 cores of a
    busy 64-core host sees its own 2); elsewhere the 1-minute load average, scaled to our share of cores.
    """
    cores = cores if cores is not None else _usable_cores()
    before = _cpu_times(cores)
    if before is not None:
        time.sleep(sample_s)
        after = _cpu_times(cores)
        if after is not None and after[1] > before[1]:
            fraction = (after[0] - before[0]) / (after[1] - before[1])
            return len(cores) * fraction, f"/proc/stat over {sample_s:g} s"
    try:
        load = os.getloadavg()[0] * len(cores) / (os.cpu_count() or len(cores))
    except OSError:
        return float(len(cores)), "no load measure"
    return max(0.0, len(cores) - load), "1-min load average"


def choose_threads(setting: int | str | None, *, previous: int | None = None, workers_here: int = 1) -> ThreadChoice:
    """The intra-op thread count for ``train.threads`` (a number, ``"auto"``, or None for torch's default).

    ``previous``: the count a resumed run started with, kept under ``"auto-once"`` for bit-identical results.
    ``workers_here``: processes of one distributed job on this machine, which share the idle cores.
    """
    if isinstance(setting, int):
        return ThreadChoice(setting, "train.threads")
    if setting is None:
        return ThreadChoice(torch.get_num_threads(), "torch default")
    if setting == AUTO_ONCE and previous is not None and previous >= 1:
        return ThreadChoice(previous, "auto-once, kept from the run's first start (bit-identical resume)")
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:  # the user (or a scheduler) already decided
        return ThreadChoice(int(omp), "auto: OMP_NUM_THREADS")
    cores = _usable_cores()
    idle, how = idle_cores(cores)
    split = f" shared by {workers_here} workers" if workers_here > 1 else ""
    return ThreadChoice(threads_for(idle, len(cores), workers_here),
                        f"{setting}: {idle:.1f} of {len(cores)} cores idle ({how}){split}")


def threads_for(idle: float, cores: int, workers_here: int = 1) -> int:
    """The rule: one thread per idle core (a core at least ``ROUND_UP_FROM`` idle counts), at least one."""
    per_worker = idle / max(1, workers_here)
    return max(1, min(cores, math.floor(per_worker + (1 - ROUND_UP_FROM))))


def apply_threads(setting: int | str | None, *, previous: int | None = None, workers_here: int = 1) -> ThreadChoice:
    """Choose and set the count (``torch.set_num_threads``); returns the choice for the records."""
    choice = choose_threads(setting, previous=previous, workers_here=workers_here)
    torch.set_num_threads(choice.threads)
    return choice
