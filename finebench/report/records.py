"""Run records → one DataFrame row per run: read every ``summary.json``, its config and confusion matrix.

The report reads only what ``finebench run`` wrote, so it can be rerun at any time while trainings
go on. A record that cannot be read is skipped with a warning that names its file: one corrupt
file must never cost the researcher the whole table.

Each run also gets its *settings*: the resolved config flattened to dotted keys (``train.lr``,
``variant.options.attention_depth``), minus what only says where or how fast a run went and minus
the seed and the k-fold held-out fold. Two runs share a table row only when their settings are
equal, so runs that differ in anything but the seed (and fold) are never pooled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from pydantic import ValidationError

from finebench.errors import FinebenchError
from finebench.methods import METHODS
from finebench.recipe import RUN_ID_EXCLUDE, Recipe
from finebench.recipe_sections import DatasetSection, ModelSection
from finebench.results import RunDir, RunState
from finebench.train_settings import TrainSection
from finebench.report.stats import mean_class_accuracy
from finebench.summary import BestMetrics, RunSummary


# Settings that change where or how fast a run goes, or which repetition it is, but not what it
# computes: the run id's own rule, plus the repetition axes the report pools over.
IGNORED_SETTINGS: tuple[str, ...] = (
    "seed", "recipe", "dataset.fold", *(f"{section}.{key}" for section, key in RUN_ID_EXCLUDE),
)


class LoadedRuns(NamedTuple):
    runs: pd.DataFrame
    """One row per finished run (see ``RUN_COLUMNS``; variant options and dotted settings as columns)."""
    failed: pd.DataFrame
    """One row per failed run: where, what and why."""
    running: pd.DataFrame
    """One row per run not finished nor failed: where, how far, and its ``state`` (``RunState.kind``:
    running while a live process trains it, else what a rerun does with it)."""
    warnings: list[str]
    """One line per record skipped, naming its file."""


RUN_COLUMNS: tuple[str, ...] = (
    "run_dir", "recipe", "run_id", "dataset", "num_classes", "backbone", "backbone_label",
    "variant", "variant_name", "seed", "fold", "epochs", "epochs_completed", "top1", "top5",
    "mean_class_top1", "best_top1", "best_epoch", "selected_top1", "selected_epoch", "selected_val_top1", "network_top1", "module_top1", "module_flops",
    "params", "flops", "params_baseline", "flops_baseline", "params_overhead_pct", "flops_overhead_pct",
    "size_warnings", "predictions", "images_per_s", "threads_used", "load_1min", "train_time_s", "device", "precision", "dropout", "settings",
    "base_settings", "pretrained_tag", "pretrained_sha256", "pretraining",
)
FAILED_COLUMNS: tuple[str, ...] = (
    "run_dir", "recipe", "run_id", "dataset", "backbone_label", "variant_name", "seed",
    "epochs_completed", "failure_reason",
)
RUNNING_COLUMNS: tuple[str, ...] = (
    "run_dir", "recipe", "run_id", "dataset", "backbone_label", "variant_name", "seed", "fold",
    "epochs_completed", "epochs", "last_top1", "state", "problem",
)


def find_summaries(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``summary.json`` at or below ``paths`` (a results folder, a run folder or the file).

    A path that does not exist, or holds no run record, is the user's error: a typo, or a folder
    other than the results folder, would otherwise give an empty table and exit 0.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if path.name != RunDir.SUMMARY_FILE:
                raise FinebenchError(f"{path}: a file, not a run record; expected a results folder, a run folder "
                                     f"or a {RunDir.SUMMARY_FILE}")
            found.append(path)
        elif path.is_dir():
            below = sorted(path.rglob(RunDir.SUMMARY_FILE))
            if not below:
                raise FinebenchError(f"{path}: no run records in this folder (no {RunDir.SUMMARY_FILE} at or below "
                                     "it); expected a results folder of `finebench run` or one of its run folders")
            found.extend(below)
        else:
            raise FinebenchError(f"{path}: no such file or folder; expected a results folder, a run folder or a summary.json")
    return sorted(set(found))


def load_runs(paths: Iterable[str | Path] = ("results",)) -> LoadedRuns:
    """Read every run record below ``paths``; unreadable records become warnings, never errors."""
    summaries = find_summaries(paths)
    problems: list[str] = []
    seen: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    failed_rows: list[dict[str, Any]] = []
    running_rows: list[dict[str, Any]] = []
    for summary_path in summaries:
        try:
            raw = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(f"{summary_path}: skipped, not readable JSON ({error})")
            continue
        try:
            summary = RunSummary.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(top level)"
            problems.append(f"{summary_path}: skipped, field {field!r}: {first['msg']}")
            continue
        run_dir = summary_path.parent
        if summary.run_id in seen:
            # A copied results folder would otherwise count one seed twice.
            problems.append(f"{summary_path}: skipped, run {summary.run_id} already read from {seen[summary.run_id]}")
            continue
        seen[summary.run_id] = summary_path
        # A finished record is a result; for the rest the run folder's state says whether a live
        # process still trains it, in the word ``run --dry-run`` shows for it.
        state = RunState("finished") if summary.status == "finished" else RunDir.at(run_dir).state()
        try:
            if state.kind == "failed":
                failed_rows.append(_text_safe(_failed_row(summary, run_dir), summary_path, problems))
            elif summary.status != "finished":
                config, _ = _run_config(run_dir)
                running_rows.append(_text_safe(_running_row(summary, run_dir, config, state), summary_path, problems))
            elif summary.final is None:
                problems.append(f"{summary_path}: skipped, status 'finished' but no 'final' metrics")
            else:
                config, problem = _run_config(run_dir)
                if problem:
                    # Grouped by its summary alone, the run would make a configuration of its own.
                    problems.append(f"{problem}; the run is left out of the tables")
                    continue
                rows.append(_text_safe(_run_row(summary, run_dir, config, problems), summary_path, problems))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as error:
            # whatever else is odd in one record (a value of a type no record was written with) costs
            # that record, never the table
            problems.append(f"{summary_path}: skipped, {type(error).__name__}: {error}")
    runs = pd.DataFrame(rows)
    if runs.empty:
        runs = pd.DataFrame(columns=list(RUN_COLUMNS))
    failed = pd.DataFrame(failed_rows, columns=list(FAILED_COLUMNS))
    running = pd.DataFrame(running_rows, columns=list(RUNNING_COLUMNS))
    return LoadedRuns(runs, failed, running, problems)


def _text_safe(row: dict[str, Any], summary_path: Path, problems: list[str]) -> dict[str, Any]:
    """The row with every string made UTF-8 text: a folder or recipe name of non-UTF-8 bytes reaches
    Python as lone surrogates, which pyarrow (and every writer of the table) refuses. Such bytes are
    shown as ``\\xff`` escapes and the record is named in a warning."""
    changed = False

    def clean(value: Any) -> Any:
        nonlocal changed
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                changed = True
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            return value
        if isinstance(value, dict):
            return {clean(key): clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(clean(item) for item in value)
        return value

    cleaned = clean(row)
    if changed:
        problems.append(f"{summary_path}: names or fields that are not UTF-8 text are shown with \\x escapes")
    return cleaned


def method_predictions(extra: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers a method recorded beyond top-1 (summary.json ``final``'s other fields, a dict's
    entries as ``key.entry``): PMG's heads, WS-DAN's crop-refined prediction."""
    found: dict[str, float] = {}
    for key, value in extra.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(method_predictions(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


CONFIG_SECTIONS: tuple[str, ...] = ("dataset", "model", "variant", "train")
"""The sections of config.json a run's settings come from; every run writes them."""


def _run_config(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The resolved config (config.json beside summary.json), or ``{}`` and one line naming the file and
    what is wrong with it: missing, not JSON, or without one of ``CONFIG_SECTIONS``."""
    path = RunDir.at(run_dir).config_path
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"{path}: missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return {}, f"{path}: not readable JSON ({error})"
    if not isinstance(config, dict):
        return {}, f"{path}: holds a JSON {type(config).__name__}; expected an object"
    missing = [section for section in CONFIG_SECTIONS if not isinstance(config.get(section), dict)]
    if missing:
        return {}, f"{path}: no {', '.join(repr(section) for section in missing)} section; expected an object for each"
    return config, None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}``; lists become JSON text (hashable)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def run_settings(summary: RunSummary, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the run computes, as dotted keys; the summary fills in what a sparse config leaves out."""
    settings = flatten(config)
    known = {
        "dataset.name": summary.dataset,
        "model.backbone": summary.backbone,
        "model.label": summary.backbone_label,
        "variant.kind": summary.variant,
        "variant.name": summary.variant_name,
        "train.epochs": summary.epochs,
        **{f"variant.options.{k}": v for k, v in flatten(summary.variant_options).items()},
    }
    for key, value in known.items():
        settings.setdefault(key, value)
    ignored = set(IGNORED_SETTINGS) | {key for key, value in settings.items() if _at_schema_default(key, value)}
    if run_fold(config, summary) is not None:
        # On a k-fold protocol the splits follow from the held-out fold: they vary with it.
        ignored |= {"dataset.train_split", "dataset.test_split"}
    return {k: v for k, v in settings.items() if k not in ignored}


ADDED_SETTINGS: dict[str, Any] = {
    "fidelity": Recipe.model_fields["fidelity"].default,
    "train.batchnorm_group": TrainSection.model_fields["batchnorm_group"].default,
    "model.batchnorm_init": ModelSection.model_fields["batchnorm_init"].default,
    "dataset.validation": DatasetSection.model_fields["validation"].default,
    "train.select": TrainSection.model_fields["select"].default,
    **{f"variant.options.{name}": method.Options.model_fields[name].default
       for method in METHODS.values() for name in method.options_added_later},
}
"""Settings added after runs were recorded (issues 20, 27 and 29), with their schema defaults."""


def _at_schema_default(key: str, value: Any) -> bool:
    """A setting added later, at its default, or a record derived from the others (``logged.*``):
    runs written before the setting existed lack it and must group with runs that hold its
    default, as their run ids already do (ids hash only what differs from the defaults)."""
    return key.startswith("logged.") or (key in ADDED_SETTINGS and value == ADDED_SETTINGS[key])


def fingerprint(settings: Mapping[str, Any]) -> str:
    return json.dumps(dict(sorted(settings.items())), default=str)


def run_fold(config: Mapping[str, Any], summary: RunSummary | None = None) -> int | None:
    """The held-out fold of a k-fold run (``dataset.fold``, else summary.json's ``fold``); None on a fixed split."""
    fold = (config.get("dataset") or {}).get("fold") if isinstance(config.get("dataset"), dict) else None
    if fold is None and summary is not None:
        fold = (summary.model_extra or {}).get("fold")
    return int(fold) if isinstance(fold, (int, float)) and not isinstance(fold, bool) else None


def _overhead_pct(value: float | None, baseline: float | None) -> float:
    if value is None or not baseline:
        return math.nan
    return (value / baseline - 1.0) * 100.0


def _mean_class(summary: RunSummary, run_dir: Path, problems: list[str]) -> float:
    """From the saved confusion matrix (the record itself), else the summary's copy of the figure."""
    try:
        matrix = RunDir.at(run_dir).read_confusion()
    except FinebenchError as error:
        problems.append(f"{error}: ignored")
        matrix = None
    if matrix is not None:
        return mean_class_accuracy(matrix)
    value = summary.final.mean_class_top1 if summary.final is not None else None
    return math.nan if value is None else float(value)


def _run_row(summary: RunSummary, run_dir: Path, config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    final = summary.final
    assert final is not None
    best = summary.best or BestMetrics()
    settings = run_settings(summary, config)
    row: dict[str, Any] = {
        "run_dir": str(run_dir),
        "recipe": summary.recipe,
        "run_id": summary.run_id,
        "dataset": summary.dataset,
        "num_classes": summary.num_classes,
        "backbone": summary.backbone,
        "backbone_label": summary.backbone_label,
        "variant": summary.variant,
        "variant_name": summary.variant_name,
        "seed": summary.seed,
        "fold": run_fold(config, summary),
        "epochs": summary.epochs,
        "epochs_completed": summary.epochs_completed,
        "top1": final.test_top1,
        "top5": final.test_top5,
        "mean_class_top1": _mean_class(summary, run_dir, problems),
        "best_top1": best.test_top1,
        "best_epoch": best.epoch,
        # train.select = "best_validation": the test top-1 of the epoch chosen on the validation split
        "selected_top1": summary.selected.test_top1 if summary.selected is not None else None,
        "selected_epoch": summary.selected.epoch if summary.selected is not None else None,
        "selected_val_top1": summary.selected.val_top1 if summary.selected is not None else None,
        "network_top1": final.network_top1,
        "module_top1": dict(final.module_top1),
        "predictions": {**method_predictions(final.model_extra or {}),
                        **method_predictions((summary.model_extra or {}).get("method_training") or {})},
        "module_flops": dict(summary.module_flops),
        "params": summary.params,
        "flops": summary.flops,
        "params_baseline": summary.params_baseline,
        "flops_baseline": summary.flops_baseline,
        "params_overhead_pct": _overhead_pct(summary.params, summary.params_baseline),
        "flops_overhead_pct": _overhead_pct(summary.flops, summary.flops_baseline),
        "size_warnings": list(summary.size_warnings),
        "images_per_s": summary.images_per_s,
        "threads_used": list((summary.model_extra or {}).get("threads_used") or []),
        "load_1min": (summary.model_extra or {}).get("load_1min"),
        "train_time_s": summary.train_time_s,
        "device": summary.device,
        "precision": summary.precision,
        "dropout": _run_dropout(summary, config),
        **_pretrained(summary),
        "settings": fingerprint(settings),
        # What a baseline must share with a variant to be its baseline: everything but the variant.
        "base_settings": fingerprint({k: v for k, v in settings.items() if not k.startswith("variant.")}),
    }
    for option, value in summary.variant_options.items():
        column = option if option not in row else f"option_{option}"
        row[column] = value if not isinstance(value, (list, dict)) else json.dumps(value)
    for key, value in settings.items():
        row.setdefault(key, value)
    return row


def _pretrained(summary: RunSummary) -> dict[str, Any]:
    """The weights the run started from (``models.provenance``); None for records written before runs
    recorded them."""
    record = (summary.model_extra or {}).get("pretrained")
    record = record if isinstance(record, dict) else {}
    return {"pretrained_tag": record.get("tag"), "pretrained_sha256": record.get("sha256"),
            "pretraining": record.get("pretraining")}


def _failed_row(summary: RunSummary, run_dir: Path) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir), "recipe": summary.recipe, "run_id": summary.run_id,
        "dataset": summary.dataset, "backbone_label": summary.backbone_label,
        "variant_name": summary.variant_name, "seed": summary.seed,
        "epochs_completed": summary.epochs_completed,
        "failure_reason": summary.failure_reason or "(no reason recorded)",
    }


def _running_row(summary: RunSummary, run_dir: Path, config: dict[str, Any], state: RunState) -> dict[str, Any]:
    last = summary.final.test_top1 if summary.final is not None else None
    return {
        "run_dir": str(run_dir), "recipe": summary.recipe, "run_id": summary.run_id,
        "dataset": summary.dataset, "backbone_label": summary.backbone_label,
        "variant_name": summary.variant_name, "seed": summary.seed, "fold": run_fold(config, summary),
        "epochs_completed": summary.epochs_completed or 0, "epochs": summary.epochs, "last_top1": last,
        "state": state.kind, "problem": state.problem,
    }


def _run_dropout(summary: RunSummary, config: Mapping[str, Any]) -> float:
    """The run's dropout rate, a setting some reference numbers state; 0 when the run sets none."""
    if "dropout" in summary.variant_options:
        return float(summary.variant_options["dropout"])
    found = _find_key(config, ("dropout", "drop_rate", "dropout_rate"))
    try:
        return float(found) if found is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _find_key(tree: Any, keys: Sequence[str]) -> Any:
    """First value under any of ``keys`` in a nested config, without assuming its layout."""
    if isinstance(tree, dict):
        for key in keys:
            if key in tree and not isinstance(tree[key], (dict, list)):
                return tree[key]
        for value in tree.values():
            found = _find_key(value, keys)
            if found is not None:
                return found
    elif isinstance(tree, list):
        for value in tree:
            found = _find_key(value, keys)
            if found is not None:
                return found
    return None


def load_metrics(run_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A run's ``metrics.jsonl`` as one row an epoch; bad lines (a crash mid-write) are skipped and named."""
    try:
        rows, problems = RunDir.at(Path(run_dir)).read_metrics_lenient()
    except OSError as error:
        return pd.DataFrame(), [f"{RunDir.at(Path(run_dir)).metrics_path}: skipped, not readable ({error})"]
    return pd.DataFrame(rows), [f"{problem}: line skipped" for problem in problems]
