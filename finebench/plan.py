"""``finebench run``, before anything trains: the recipe's runs, their state on disk, what to do with each,
and every check that must pass before the first file is written.

Everything a user can get wrong (recipe, dataset name, unprepared data, missing weights, unreadable
run records) is checked here, so a bad input stops the command with nothing written. A run that is
already finished (or failed) is decided on without its lock, so a read-only results folder can be
rerun; ``finebench.runner`` costs each run's network (``finebench.cost``, which checks its model
options, still before anything is written), takes the lock, decides again under it, and trains.
The planner builds nothing: the model and loaders are built where the run executes (``finebench.factory``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from finebench.console import make_console
from finebench.data.root import DataRoot, choose_data_root
from finebench.errors import FinebenchError
from finebench.methods import get_method, variant_of_config
from finebench.recipe import LoadedRecipe, RunSpec, expand_runs
from finebench.recipe_sections import DatasetSection
from finebench.results import RunDir, RunState
from finebench.train.runtime import DistContext, resolve_device


def loader_choices(run: RunSpec, data_root: Path, ctx: DistContext, device: torch.device) -> dict[str, Any]:
    """What the run's loaders are built from (its own splits: on a k-fold dataset they depend on its held-out fold)."""
    dataset, train = run.dataset_section(), run.train_section()
    return dict(
        dataset=dataset.name, data_root=data_root, batch_size=train.batch_size, seed=run.seed,
        input_size=dataset.input_size, augmentation=dataset.augmentation, train_split=dataset.train_split,
        test_split=dataset.test_split, rank=ctx.rank, world_size=ctx.world_size,
        in_memory="auto",  # small images: decoded once, augmented in batches on the device
        device=device, decode=dataset.decode, color_jitter=dataset.color_jitter, resize=dataset.resize,
        normalize=dataset.normalize,
        validation=dataset.validation.model_dump() if dataset.validation is not None else None,
        sampler_factory=partial(get_method(run.variant_kind).batch_sampler, run.variant or variant_of_config(run.config)),
    )


def parse_share(text: str) -> tuple[int, int]:
    """``--share I/N`` (array task I of N, from 0) as ``(I, N)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise FinebenchError(f"--share {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise FinebenchError(f"--share {text!r}: expected 0 <= I < N")
    return index, count


@dataclass
class Plan:
    """A recipe's runs and where they stand on disk, as found before anything is locked or written."""

    runs: list[RunSpec]
    run_dirs: dict[str, RunDir]
    """Keyed by run id."""
    states: dict[str, RunState]
    chosen_root: DataRoot
    num_classes: int
    input_size: int
    """The networks' input side: the recipe's until ``preflight`` reads the data's (``cost.CostCache.of_plan``)."""

    @property
    def data_root(self) -> Path:
        return self.chosen_root.path


def plan_runs(
    loaded: LoadedRecipe, *, results_dir: Path, data_root: Path | None, only: Sequence[str],
    share: tuple[int, int] | None = None,
) -> Plan:
    """The runs ``only`` selects, their folders and states; a file where a results folder belongs stops here.

    ``share = (i, n)``: only the runs at positions i, i + n, i + 2n, ... of the recipe's expansion
    (array task i of n), so the tasks of a job array take disjoint runs without a shared lock.
    """
    from finebench.data.registry import get_spec

    runs = expand_runs(loaded, only)
    if share is not None:
        index, count = share
        runs = [run for position, run in enumerate(runs) if position % count == index]
    results_dir = Path(results_dir)
    chosen_root = choose_data_root(data_root, loaded.recipe.dataset.root)
    num_classes = get_spec(loaded.recipe.dataset.name).num_classes
    check_results_dir(results_dir, loaded.name)
    run_dirs = {run.run_id: RunDir(results_dir, loaded.name, run.run_id) for run in runs}
    states = {run.run_id: run_dirs[run.run_id].state() for run in runs}
    return Plan(runs, run_dirs, states, chosen_root, num_classes, loaded.input_size())


def preflight(loaded: LoadedRecipe, plan: Plan, to_train: Sequence[RunSpec], ctx: DistContext, quiet: bool) -> None:
    """Fail on unprepared data or missing weights before anything is written; prepare an embedded
    dataset on first use. Sets the plan's class count and input size from the data as the loaders
    read them (the runner then costs each run's network, which checks its model options)."""
    chosen_root, data_root = plan.chosen_root, plan.data_root
    check_data_root(chosen_root, loaded.recipe.dataset.name)
    weights = missing_weights(to_train)
    if weights:
        raise FinebenchError(f"{loaded.path}: {weights[0]}; or --set model.pretrained=none to train from scratch")
    if ctx.is_main:
        prepare_if_embedded(loaded.recipe.dataset.name, data_root, quiet)
    ctx.barrier()
    # Fail on unprepared data before anything is written.
    from finebench.data.loader import check_loaders

    device = resolve_device(loaded.recipe.train.device)
    # The loaders' own checks without their work: nothing is decoded or copied to the device here.
    checked = check_loaders(**loader_choices(to_train[0], data_root, ctx, device))
    for run in to_train[1:]:  # every held-out fold of a k-fold dataset must be there too
        if run.dataset_section() != to_train[0].dataset_section():
            _check_splits(run.dataset_section(), data_root)
    plan.num_classes = checked.num_classes
    plan.input_size = checked.input_size  # data.config.resolve_data_config's


def missing_weights(runs: Sequence[RunSpec]) -> list[str]:
    """One line per backbone whose pretrained weights are not where loading looks (never downloads)."""
    from finebench.models.registry import missing_pretrained_weights

    problems: dict[tuple[str, str | None], str] = {}
    for run in runs:
        model = run.config["model"]
        key = (model["backbone"], model.get("pretrained"))
        if key not in problems:
            problem = missing_pretrained_weights(*key)
            problems[key] = f"model.pretrained = {key[1]!r} for {key[0]}: {problem}" if problem else ""
    return [problem for problem in problems.values() if problem]


def check_results_dir(results_dir: Path, recipe_name: str) -> None:
    """A file where a results folder belongs is one line before anything runs, not an error mid-way."""
    for path in (results_dir, results_dir / recipe_name):
        if path.exists() and not path.is_dir():
            raise FinebenchError(f"--results-dir {results_dir}: {path} is a file, expected a folder")


def decide(state: RunState, *, retry_failed: bool, restart: bool) -> str:
    """``train`` or ``skipped-<state>``; damaged records stop the command unless ``restart`` discards them."""
    if state.kind == "finished":
        return "skipped-finished"
    if state.kind == "failed" and not (retry_failed or restart):
        return "skipped-failed"
    if state.kind == "damaged" and not restart:
        raise FinebenchError(state.problem or "unreadable run records")
    return "train"


@dataclass(frozen=True)
class RunSelection:
    """Which of a recipe's runs a command takes and what it does with those not finished: the
    CLI's ``--only``, ``--retry-failed``, ``--restart`` and ``--discard-finished``, passed as one
    object to every way of running (serial, ``--jobs``, ``--submit``)."""

    only: Sequence[str] = ()
    retry_failed: bool = False
    restart: bool = False
    discard_finished: bool = False

    def argv(self) -> list[str]:
        """The same selection as ``finebench run`` arguments (for the processes a command starts)."""
        return [*[arg for value in self.only for arg in ("--only", value)],
                *(["--retry-failed"] if self.retry_failed else []), *(["--restart"] if self.restart else []),
                *(["--discard-finished"] if self.discard_finished else [])]


def decide_runs(plan: Plan, selection: RunSelection) -> dict[str, str]:
    """Every planned run's decision (``decide``), keyed by run id; checked in full before anything is discarded.

    ``--restart`` throws away a run's checkpoint: where it holds every epoch done (a finished
    run whose summary.json was damaged, or one killed just before its summary was written), that is
    a trained model, so it takes ``discard_finished`` (``--discard-finished``) to do it; without
    ``--restart`` such a run resumes, trains nothing and gets its summary rebuilt."""
    decisions = {}
    for run in plan.runs:
        state, run_dir = plan.states[run.run_id], plan.run_dirs[run.run_id]
        decision = decide(state, retry_failed=selection.retry_failed, restart=selection.restart)
        if (decision == "train" and selection.restart and not selection.discard_finished
                and state.kind in ("resumable", "damaged")
                and run_dir.epochs_saved() >= run.train_section().epochs):
            raise FinebenchError(
                f"{run_dir.path}: its checkpoint holds all {run.train_section().epochs} epochs done, and --restart "
                "would discard the trained model; rerun without --restart to rebuild its summary, or add "
                "--discard-finished to train it again from epoch 1")
        decisions[run.run_id] = decision
    return decisions


def dataset_state(name: str, data_root: Path) -> str:
    """For ``--dry-run``: prepared, not prepared, or prepared on the first run (embedded datasets)."""
    from finebench.data.registry import get_spec
    from finebench.data.store import is_prepared

    if is_prepared(data_root, name):
        return "prepared"
    return "prepared on first run" if get_spec(name).offline else "not prepared"


def check_validation_splits(runs: Sequence[RunSpec], data_root: Path, source: Path) -> None:
    """Each run's validation split, resolved from a prepared store's labels (``run --dry-run``); an
    unprepared store is checked when the run starts (``preflight``)."""
    from finebench.data.loader import check_validation
    from finebench.data.store import is_prepared

    checked = []
    for run in runs:
        dataset = run.dataset_section()
        if dataset.validation is None or dataset in checked or not is_prepared(data_root, dataset.name):
            continue
        checked.append(dataset)
        try:
            check_validation(dataset.name, data_root, train_split=dataset.train_split,
                             test_split=dataset.test_split, validation=dataset.validation.model_dump())
        except FinebenchError as error:
            fold = f" (held-out fold {run.fold})" if run.fold is not None else ""
            raise FinebenchError(f"{source}{fold}: {error}") from None


def check_before_launch(loaded: LoadedRecipe, data_root: Path | None, world_size: int) -> None:
    """What every worker would reject, checked once before ``world_size`` workers start."""
    from finebench.data.loader import per_worker_batch
    from finebench.data.registry import get_spec
    from finebench.data.store import read_meta

    for batch_size in sorted({run.train_section().batch_size for run in expand_runs(loaded)}):
        per_worker_batch(batch_size, world_size)  # a method may train at its own batch size
    name = loaded.recipe.dataset.name
    chosen_root = choose_data_root(data_root, loaded.recipe.dataset.root)
    check_data_root(chosen_root, name)
    if not get_spec(name).offline:  # embedded datasets are prepared by rank 0
        read_meta(chosen_root.path, name)


def check_data_root(chosen: DataRoot, name: str) -> None:
    """A data root the user named must exist: ``run`` creates only the default one, for an embedded dataset."""
    from finebench.data.registry import get_spec
    from finebench.data.store import prepare_command

    path = chosen.path
    if path.exists() and not path.is_dir():
        raise FinebenchError(f"data root {chosen.describe()} is a file, expected a folder of prepared datasets")
    if not path.exists() and (chosen.origin != "default" or not get_spec(name).offline):
        raise FinebenchError(
            f"data root {chosen.describe()} does not exist: prepare the dataset there first "
            f"(`{prepare_command(name, path)}`) or point --data-root / FINEBENCH_DATA at its folder"
        )


def prepare_if_embedded(name: str, data_root: Path, quiet: bool) -> None:
    """Datasets shipped inside an installed package need no download, so a fresh install can
    ``finebench run recipes/quickstart.toml`` at once; anything else must be prepared explicitly."""
    from finebench.data.prepare import prepare_dataset
    from finebench.data.registry import get_spec
    from finebench.data.store import is_prepared

    if get_spec(name).offline and not is_prepared(data_root, name):
        if not quiet:
            make_console(stderr=True).print(f"{name} is not prepared in {data_root}: preparing it (embedded, no download)",
                                       highlight=False, soft_wrap=True)
        prepare_dataset(name, data_root, quiet=quiet, wait=True)  # a second `run` waits for the first's prepare


def _check_splits(dataset: DatasetSection, data_root: Path) -> None:
    """Fail on a split the store lacks (a fold missing) before anything is written."""
    from finebench.data.loader import split_dirs
    from finebench.data.store import read_meta, store_dir

    available = list(read_meta(data_root, dataset.name).get("splits", {}))
    for split in (dataset.train_split, dataset.test_split):
        split_dirs(store_dir(data_root, dataset.name), split, available, dataset.name)
