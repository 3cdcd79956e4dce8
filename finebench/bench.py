"""Speed measurement: side-by-side timing helpers and ``finebench bench RECIPE``.

Why side by side: on a shared machine the speed drifts by more than the few percent a benchmark
wants to resolve, so every comparison here runs its candidates interleaved (A, B, A, B, ...) in
one process and reports the median of several timed repeats after warm-up. A ratio of two such
medians is far steadier than two numbers taken minutes apart.

``bench_recipe`` times the real training step (``finebench.train.step.TrainStep``: forward,
loss, backward, optimiser, at the recipe's precision and memory format) of each variant on
in-memory batches, so a user can size a run before launching it. It reads no data and needs no
weights: speed does not depend on either. It builds the step as ``fit`` does (the same resolved
compile and channels_last settings, the same cuDNN settings) and, as ``fit`` does, times a step
that compiles apart from the rest, so its images/s predicts a run's first epoch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finebench.errors import FinebenchError


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed repeat; each repeat processed ``items`` items (images, samples)."""

    seconds: tuple[float, ...]
    items: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_s(self) -> float:
        """Items per second at the median repeat."""
        return self.items / self.median_s

    @property
    def spread_pct(self) -> float:
        """(max - min) / median of the repeats, in percent: how noisy the measurement was."""
        return 100.0 * (max(self.seconds) - min(self.seconds)) / self.median_s


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    items: int,
    warmup: int = 2,
    repeats: int = 5,
    calls_per_repeat: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time each zero-argument callable, interleaved repeat by repeat; ``items`` per call.

    Every candidate first runs ``warmup`` untimed calls (allocator, kernels, autotuning, caches);
    then each repeat times ``calls_per_repeat`` calls of each candidate in turn, in reversed order
    every other repeat (A B, B A, ...) so a drifting machine load favours no candidate.
    """
    if repeats < 1 or calls_per_repeat < 1 or warmup < 0:
        raise ValueError("repeats and calls_per_repeat must be >= 1 and warmup >= 0")
    for run in candidates.values():
        for _ in range(warmup):
            run()
        synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for repeat in range(repeats):
        order = list(candidates.items())
        for name, run in order if repeat % 2 == 0 else reversed(order):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls_per_repeat):
                run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values), items * calls_per_repeat) for name, values in seconds.items()}


def calls_for_duration(run: Callable[[], Any], device: torch.device | str | None, min_repeat_s: float) -> int:
    """Calls per repeat so that one repeat lasts at least ``min_repeat_s``: repeats of a few short
    steps (60-90 ms) spread 17-34 % on a GPU, which a ratio of two such timings cannot carry."""
    run()  # warm-up (and any compilation)
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return max(1, int(min_repeat_s / max(time.perf_counter() - start, 1e-6)) + 1)


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over repeats of the per-repeat speed ratio numerator/denominator.

    The two timings of one repeat ran back to back under the same load, so their ratio is far
    steadier than the ratio of two medians when other processes come and go.
    """
    per_repeat = [
        (numerator.items / a) / (denominator.items / b)
        for a, b in zip(numerator.seconds, denominator.seconds, strict=True)
    ]
    return statistics.median(per_repeat)


def benchmark_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options every script in benchmarks/ shares: ``--quick`` (smoke run) and ``--threads``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny batches, one repeat")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier when other processes share the cores")
    return parser


def parse_benchmark_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def machine_line() -> str:
    """What the numbers were measured on, including the load at the time (a shared machine's noise)."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu}"
    return (
        f"{device}; {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"load average {load}"
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table: benchmarks print to logs and pipes, where rich markup is noise."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text_rows)) if text_rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in text_rows]
    return "\n".join(lines)


def synthetic_batch(
    batch_size: int, input_size: int, num_classes: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images and labels, already on the device (what an ideal loader hands over)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


# ---- finebench bench RECIPE ---------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRow:
    variant: str
    batch_size: int
    input_size: int
    precision: str
    channels_last: bool
    images_per_s: float
    step_s: float
    spread_pct: float
    compiled: bool
    compile_s: float | None
    """Wall time of the first step, which compiled the model; None when not compiled."""
    train_images: int | None
    """Images per epoch (the prepared split, else the dataset's official size); None when unknown."""
    epoch_s: float | None
    run_s: float | None
    """Estimated training time of one run (epochs × epoch, evaluation not included)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _train_split_size(dataset: Any, data_root: Any) -> int | None:
    """Images in the recipe's train split(s): from the prepared store if there is one, else the spec."""
    from finebench.data import store
    from finebench.data.registry import get_spec
    from finebench.data.root import resolve_data_root

    names = [part.strip() for part in dataset.train_split.split("+") if part.strip()]
    root = resolve_data_root(data_root, dataset.root)
    sizes: Mapping[str, int] = get_spec(dataset.name).split_sizes
    if store.is_prepared(root, dataset.name):
        sizes = store.read_meta(root, dataset.name).get("splits", {}) or sizes
    if not names or any(name not in sizes for name in names):
        return None
    return sum(int(sizes[name]) for name in names)


def bench_recipe(
    path: str,
    overrides: Sequence[str] = (),
    *,
    images: int = 256,
    warmup_steps: int = 2,
    only: Sequence[str] = (),
    data_root: str | None = None,
    on_variant: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time the training step of each variant of a recipe on about ``images`` images.

    Steps run at the recipe's batch size, precision, memory format and compile setting, on
    random in-memory batches. A compiled model's first step (the compilation) is timed apart;
    then ``warmup_steps`` untimed steps (cuDNN's algorithm search, the allocator) precede the
    timed ones.
    """
    from finebench.data.registry import get_spec
    from finebench.methods import build_model_from_config, method_of, variant_of_config
    from finebench.recipe import expand_runs, load_recipe
    from finebench.train.runtime import synchronize_device
    from finebench.train.step import build_train_step
    from finebench.train.threads import apply_threads

    if images < 1:
        raise FinebenchError(f"--images {images}: expected a positive number of images to time")
    loaded = load_recipe(path, overrides)
    train, dataset = loaded.recipe.train, loaded.recipe.dataset
    input_size = loaded.input_size()
    num_classes = get_spec(dataset.name).num_classes
    train_images = _train_split_size(dataset, data_root)
    apply_threads(train.threads)  # as ``run`` does, so the estimate matches the run
    seen: set[tuple[str, str]] = set()
    rows = []
    for run in expand_runs(loaded, only):
        if (run.backbone, run.variant_name) in seen:  # seeds do not change the speed
            continue
        seen.add((run.backbone, run.variant_name))
        if on_variant is not None:
            on_variant(run.variant_name)
        torch.manual_seed(run.seed)
        try:  # random weights: they do not change the speed
            model = build_model_from_config(run.config, num_classes, pretrained=False)
        except FinebenchError as error:
            raise FinebenchError(f"{loaded.path}: model: {error}") from None
        method = method_of(run.variant or variant_of_config(run.config))
        own = run.train or train  # a method's own train settings (batch size, epochs) where its paper differs
        steps_per_epoch = max(1, -(-(train_images or own.batch_size) // own.batch_size))
        timed_steps = max(1, -(-images // own.batch_size))
        step = build_train_step(model, own, method=method, steps_per_epoch=steps_per_epoch)
        batch = synthetic_batch(own.batch_size, input_size, num_classes, seed=run.seed, device=step.device)
        compile_s = None
        if step.compiling(batch[0]):
            synchronize_device(step.device)
            start = time.perf_counter()
            step(*batch)
            synchronize_device(step.device)
            compile_s = time.perf_counter() - start
        timing = time_side_by_side(
            {run.variant_name: lambda: step(*batch)}, items=own.batch_size, warmup=warmup_steps,
            repeats=timed_steps, device=step.device,
        )[run.variant_name]
        epoch_s = train_images / timing.per_s if train_images else None
        rows.append(
            BenchRow(
                run.variant_name, own.batch_size, input_size, step.precision, step.channels_last,
                timing.per_s, timing.median_s, timing.spread_pct, step.compiled, compile_s,
                train_images, epoch_s, epoch_s * own.epochs if epoch_s is not None else None,
            )
        )
        del step, model, batch
    return rows


@dataclass(frozen=True)
class RecipeEstimate:
    """Time to a recipe's finished table when ``jobs`` runs train at once (``finebench run --jobs``)."""

    runs: int
    jobs: int
    job_slowdown: float
    compile_graphs: int
    seconds: float | None
    """None when some variant's run time is unknown (its dataset's size is unknown)."""
    compiled: tuple[str, ...] = ()
    """The variants whose step compiled: only their runs pay for compiled graphs."""
    variants: tuple[str, ...] = ()
    """Every variant the estimate covers, in the recipe's order."""

    def describe(self) -> str:
        what = ("unknown (the training split's size is unknown)" if self.seconds is None
                else f"{self.seconds / 3600:.2f} h")
        return (f"whole recipe, {self.runs} runs on {self.jobs} job(s): {what} — {self._compile_part()}, each "
                f"job {self.job_slowdown:g}x slower than alone; evaluation and data loading not included")

    def _compile_part(self) -> str:
        """What the estimate counts besides steps; nothing compiled (eager, as on CPU by default) says so."""
        if not self.compiled:
            return "training steps only (nothing compiled)"
        part = f"training steps plus {self.compile_graphs} compiled graph(s) per run"
        return part if self.compiled == tuple(self.variants) else f"{part} of {', '.join(self.compiled)}"


def recipe_estimate(rows: Sequence[BenchRow], runs_per_variant: Mapping[str, int], *, jobs: int = 1,
                    job_slowdown: float = 1.0, compile_graphs: int = 4) -> RecipeEstimate:
    """Longest-first schedule of every run over ``jobs`` concurrent jobs (the makespan).

    Each run costs its variant's measured ``run_s`` times ``job_slowdown`` (how much slower one job
    trains beside the others: 1.0 is the optimistic bound; measure it with benchmarks/jobs.py or on
    the GPU) plus ``compile_graphs`` times the measured compile time (a static-shape run compiles
    train and eval graphs, full and last batch: 4). Written by hand: a greedy makespan is ten lines
    and no scheduling library is a dependency here.
    """
    if jobs < 1:
        raise FinebenchError(f"--jobs {jobs}: expected at least 1")
    if job_slowdown < 1.0:
        raise FinebenchError(f"--job-slowdown {job_slowdown}: expected a factor >= 1 (jobs do not speed each other up)")
    by_variant = {row.variant: row for row in rows}
    variants = tuple(runs_per_variant)
    compiled = tuple(v for v in variants if v in by_variant and by_variant[v].compile_s is not None)
    costs: list[float] = []
    for variant, count in runs_per_variant.items():
        row = by_variant.get(variant)
        if row is None or row.run_s is None:
            return RecipeEstimate(sum(runs_per_variant.values()), jobs, job_slowdown, compile_graphs, None,
                                  compiled, variants)
        costs += [row.run_s * job_slowdown + compile_graphs * (row.compile_s or 0.0)] * count
    loads = [0.0] * jobs
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return RecipeEstimate(len(costs), jobs, job_slowdown, compile_graphs, max(loads) if costs else 0.0,
                          compiled, variants)
