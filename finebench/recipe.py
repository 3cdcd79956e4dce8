"""Recipes: a TOML file that says what to train, validated before anything runs.

A recipe names one dataset and one backbone, a list of variants (baseline, Attend and Rectify
settings, peer plug-ins) and a list of seeds; ``expand_runs`` turns it into one ``RunSpec`` per
variant × seed, and on a k-fold dataset (adience, uec_food100) per held-out fold too. Every
problem (unknown key, wrong type, impossible value, unknown dataset) is a ``FinebenchError``
naming the file, the dotted field path and what was expected, raised before a single file is
written.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finebench.errors import FinebenchError
from finebench.methods import METHODS, MethodOptions, method_of
from finebench.overrides import apply_overrides
from finebench.recipe_sections import DatasetSection, ModelSection
from finebench.train_settings import Section as _Section
from finebench.train_settings import TrainSection

RUN_ID_EXCLUDE = (
    ("dataset", "root"), ("train", "workers"), ("train", "threads"), ("train", "log_every"),
    ("train", "compile"), ("train", "channels_last"),
)
"""Settings that change where or how fast a run goes but not what it computes."""


Variant = Annotated[
    Union[tuple(method.Options for method in METHODS.values())],  # type: ignore[valid-type]
    Field(discriminator="kind"),
]
"""A ``[[variants]]`` entry: the options of one registered method (``finebench.methods``), by ``kind``."""


def variant_options(variant: MethodOptions) -> dict[str, Any]:
    """The keyword options a variant passes to ``build_model`` (everything but kind and name)."""
    return variant.options()


def variant_name(variant: MethodOptions) -> str:
    """A readable name, unique within a recipe for distinct settings: ``attention-ad3-aw4``."""
    return variant.name or method_of(variant).table_name(variant)


LOGGED_TRAIN_KEYS = (
    "optimizer", "momentum", "lr", "weight_decay", "backbone_lr_mult", "schedule", "milestones", "step_size",
    "gamma", "warmup_epochs", "min_lr", "label_smoothing", "grad_clip", "batchnorm_group", "head_only_epochs",
    "lr_updates",
)
"""``train`` settings a ``[logged.<variant>]`` table may change: those only the training loop
reads (batch size, devices and loaders stay the recipe's, shared by every variant)."""

LOGGED_MODEL_KEYS = ("batchnorm_init",)
"""``model`` settings a ``[logged.<variant>]`` table may change: how the variant's network starts
(the backbone and its weights stay the recipe's; backbone options are ``model_options``)."""


class LoggedSettings(_Section):
    """How the code that produced one variant's logged run differed from the released code.

    Applied on top of the recipe's own settings when ``fidelity = "logged"``; the recipe's own
    settings are the released code's, so ``fidelity = "released"`` needs no table at all.
    """

    train: dict[str, Any] = Field(default_factory=dict)
    """``train`` settings (``LOGGED_TRAIN_KEYS``), e.g. ``{optimizer = "sgd"}`` for plain momentum."""
    model: dict[str, Any] = Field(default_factory=dict)
    """``model`` settings (``LOGGED_MODEL_KEYS``), e.g. ``{batchnorm_init = "uniform"}`` for PyTorch 0.4's."""
    model_options: dict[str, Any] = Field(default_factory=dict)
    """Backbone options merged into ``model.options``, e.g. ``{stem = "conv"}``."""
    variant: dict[str, Any] = Field(default_factory=dict)
    """Variant options, e.g. ``{reg_masks = "full"}``."""

    @field_validator("train", "model")
    @classmethod
    def _check_keys(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        allowed = LOGGED_TRAIN_KEYS if info.field_name == "train" else LOGGED_MODEL_KEYS
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"{unknown} cannot differ per variant; expected keys among {', '.join(allowed)}")
        return value


def check_results_name(name: str) -> str:
    """A recipe name becomes a folder under the results folder and a text column of every record and
    report, so it must be one plain folder name and UTF-8 text (a file name of other bytes reaches
    Python as lone surrogates, which JSON, TensorBoard and pyarrow refuse mid-run)."""
    example = "e.g. 'wrn_cifar10'"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"is not UTF-8 text (the file name has bytes of another encoding): rename it, {example}") from None
    if name != name.strip():
        raise ValueError(f"starts or ends with whitespace: expected a name without it, {example}")
    if name in ("", ".", "..") or any(char in name for char in "/\\\0"):
        raise ValueError(f"cannot name a results folder: expected one folder name without '/', '\\' or '..', {example}")
    return name


class Recipe(_Section):
    name: str | None = None
    """The results folder of the recipe's runs (default: the recipe file's name without .toml)."""
    description: str = ""
    dataset: DatasetSection
    model: ModelSection
    variants: Annotated[list[Variant], Field(min_length=1)]
    train: TrainSection
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0])
    fidelity: Literal["released", "logged"] = "released"
    """``released``: every variant trains as the authors' released code does (the recipe's own
    settings). ``logged``: each variant named in ``logged`` trains as the code that produced its
    logged run did (docs/MECHANISM.md §4)."""
    logged: dict[str, LoggedSettings] = Field(default_factory=dict)
    """Variant name or kind -> its log-time settings (a name's table overrides its kind's)."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return None if value is None else check_results_name(value)

    @model_validator(mode="after")
    def _check_unique(self) -> Recipe:
        names = [variant_name(v) for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique, {duplicates} repeat (set `name` on each)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        known = set(names) | {v.kind for v in self.variants}
        unknown = sorted(set(self.logged) - known)
        if unknown:
            raise ValueError(f"logged: {unknown} name no variant; expected variant names or kinds among {sorted(known)}")
        for variant in self.variants:  # every variant's log-time settings must validate, logged or not
            try:
                effective_settings(self, variant, fidelity="logged")
            except ValidationError as error:
                tables = list(dict.fromkeys(k for k in (variant.kind, variant_name(variant)) if k in self.logged))
                problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']} (got {item.get('input')!r})"
                                     for item in error.errors())
                raise ValueError(f"logged.{' / logged.'.join(tables)} gives variant {variant_name(variant)!r} "
                                 f"invalid settings: {problems}") from None
        return self


def effective_settings(
    recipe: Recipe, variant: BaseModel, *, fidelity: str | None = None
) -> tuple[TrainSection, ModelSection, BaseModel]:
    """The ``train``, ``model`` and variant settings one variant trains with: the recipe's own
    (``fidelity = "released"``) or those overlaid with its ``logged`` tables, kind first, then name."""
    changes = logged_changes(recipe, variant, fidelity=fidelity)
    if not changes:
        return recipe.train, recipe.model, variant
    train = TrainSection.model_validate({**recipe.train.model_dump(exclude_unset=True), **changes["train"]})
    model = recipe.model.model_copy(update={"options": {**recipe.model.options, **changes["model_options"]}})
    if changes["model"]:  # validated, as the train settings are (model_copy alone checks nothing)
        model = ModelSection.model_validate({**model.model_dump(exclude_unset=True), **changes["model"]})
    changed = type(variant).model_validate({**variant.model_dump(exclude_unset=True), **changes["variant"]})
    return train, model, changed


def logged_changes(recipe: Recipe, variant: BaseModel, *, fidelity: str | None = None) -> dict[str, dict[str, Any]]:
    """The log-time settings ``fidelity = "logged"`` lays over one variant (``train``, ``model``,
    ``model_options``, ``variant``); empty when released or when no table names the variant."""
    if (fidelity or recipe.fidelity) == "released":
        return {}
    tables = [recipe.logged[key] for key in (variant.kind, variant_name(variant)) if key in recipe.logged]
    if not tables:
        return {}
    merged: dict[str, dict[str, Any]] = {"train": {}, "model": {}, "model_options": {}, "variant": {}}
    for table in tables:
        for part in merged:
            merged[part].update(getattr(table, part))
    return merged


@dataclass(frozen=True)
class RunSpec:
    """One training run: a recipe with one variant and one seed, and its stable id."""

    recipe_name: str
    variant_kind: str
    variant_name: str
    seed: int
    config: dict[str, Any]
    """The resolved run config (written as config.json)."""
    run_id: str = field(default="")
    fold: int | None = None
    """The held-out fold on a k-fold dataset (also ``config["dataset"]["fold"]``); None otherwise."""
    variant: MethodOptions | None = None
    """The typed variant (its method: ``finebench.methods.method_of``); ``config["variant"]`` is its dump."""
    train: TrainSection | None = None
    """The run's train settings: the recipe's, or what its method's ``train_settings`` made of them."""

    model: ModelSection | None = None
    """The run's model section (one backbone; the variant's log-time settings applied)."""

    def train_section(self) -> TrainSection:
        """This run's training settings: the recipe's, its variant's log-time ones (``fidelity``), or
        what its method's ``train_settings`` made of them."""
        return self.train if self.train is not None else TrainSection.model_validate(self.config["train"])

    def model_section(self) -> ModelSection:
        return self.model if self.model is not None else ModelSection.model_validate(self.config["model"])

    def dataset_section(self) -> DatasetSection:
        """The run's dataset settings, its held-out fold's splits included (the fold itself is ``fold``)."""
        return DatasetSection.model_validate({k: v for k, v in self.config["dataset"].items() if k != "fold"})

    @property
    def backbone(self) -> str:
        """The run's one backbone (a recipe listing several expands into runs of each)."""
        return str(self.model_section().backbone)


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    name: str
    path: Path

    def input_size(self) -> int:
        """The input size before the store is read (``data.config.planned_input_size``: the recipe's,
        else the dataset spec's default), for the dry run's costs and tables."""
        from finebench.data.config import planned_input_size
        from finebench.data.registry import get_spec

        dataset = self.recipe.dataset
        return planned_input_size({"input_size": dataset.input_size}, get_spec(dataset.name))


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest magnitude a float setting may have: training hands every one to torch as a float32
(an lr of 1e39 stops the first optimiser step with "value cannot be converted to type float")."""


def _beyond_float32(data: Any, where: str = "") -> list[str]:
    """One problem per finite float in the raw recipe that float32 cannot hold, by its dotted path.

    Checked on the raw data, so settings pydantic types as ``Any`` (``model.options``, ``logged``
    tables) are covered too; inf and nan are the schema's (``allow_inf_nan=False``) to refuse."""
    if isinstance(data, dict):
        return [problem for key, value in data.items() for problem in _beyond_float32(value, f"{where}.{key}")]
    if isinstance(data, list):
        return [problem for index, value in enumerate(data) for problem in _beyond_float32(value, f"{where}.{index}")]
    if isinstance(data, float) and math.isfinite(data) and abs(data) > FLOAT32_MAX:
        return [(f"{where.lstrip('.')}: expected a finite float32 value (magnitude at most {FLOAT32_MAX:.4g}), "
                 f"got {data!r}")]
    return []


def _unknown_variant_key(kind: str, key: str, index: int, entry: Any) -> str:
    """Why ``key`` is no option of variant ``index`` (a ``kind``), and the options that are."""
    named = entry.get("name") if isinstance(entry, dict) else None
    variant = f"variant {index} (kind {kind}" + (f", name {named!r})" if isinstance(named, str) else ")")
    options = [name for name in METHODS[kind].Options.model_fields if name not in ("kind", "name")]
    owners = [other for other, method in METHODS.items() if other != kind and key in method.Options.model_fields]
    if owners:
        why = f"an option of {', '.join(owners)}, not of {kind}"
    else:
        why = f"not an option of {kind}"
        close = difflib.get_close_matches(key, options, n=1)
        if close:
            why += f" (did you mean {close[0]!r}?)"
    known = f"{kind}'s options: {', '.join(options)} (and name)" if options else f"{kind} takes no options (only name)"
    return f"unknown key {key!r} in {variant}: {why}; {known}"


def _validation_problems(error: ValidationError, data: Mapping[str, Any]) -> list[str]:
    """One line per problem pydantic found, by dotted path into the recipe."""
    problems = []
    for item in error.errors():
        loc = list(item["loc"])
        # pydantic inserts a discriminated variant's kind after its index (variants.1.ws_dan.x): not a key of the recipe
        if loc[:1] == ["variants"] and len(loc) > 2 and loc[2] in METHODS:
            kind = str(loc.pop(2))
        else:
            kind = None
        where = ".".join(map(str, loc)) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden" and kind is not None and len(loc) == 3:
            entries = data.get("variants")
            entry = entries[loc[1]] if isinstance(entries, list) and isinstance(loc[1], int) else None
            message = _unknown_variant_key(kind, str(loc[2]), int(loc[1]), entry)
        elif item["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in item and item["type"] != "missing" and not isinstance(item["input"], dict):
            message += f" (got {item['input']!r})"
        problems.append(f"{where}: {message}")
    return problems


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *, check_dataset: bool = True) -> LoadedRecipe:
    """Read, override and validate a recipe; the one place a recipe file becomes a ``Recipe``."""
    path = Path(path)
    if path.is_dir():
        raise FinebenchError(f"{path}: is a folder, expected a recipe .toml file (e.g. {path / 'quickstart.toml'})")
    if not path.is_file():
        raise FinebenchError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise FinebenchError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}): "
            "TOML recipes must be saved as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise FinebenchError(f"{path}: not valid TOML: {error}") from None
    apply_overrides(data, overrides, str(path))
    problems = _beyond_float32(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        problems += _validation_problems(error, data)
    if problems:
        raise FinebenchError(f"{path}: " + "; ".join(problems))
    if recipe.train.select == "best_validation" and recipe.dataset.validation is None:
        raise FinebenchError(f'{path}: train.select = "best_validation" needs a validation split: set '
                             'dataset.validation = { fraction = 0.1 } (carved from the training split) or '
                             '{ split = "val" } (a split of the store), or select = "last"')
    if check_dataset:
        from finebench.data.registry import get_spec

        try:
            spec = get_spec(recipe.dataset.name)
        except FinebenchError as error:
            raise FinebenchError(f"{path}: dataset.name: {error}") from None
        _check_folds(recipe.dataset, spec.folds, path)
        _check_validation_split(recipe.dataset, spec.folds, sorted(spec.split_sizes), path)
    name = recipe.name or path.stem
    try:
        check_results_name(name)
    except ValueError as error:
        raise FinebenchError(f"{path}: the recipe name {name!r} (from the file name) {error}; set `name`") from None
    return LoadedRecipe(recipe=recipe, name=name, path=path)


def _check_folds(dataset: DatasetSection, folds: int, path: Path) -> None:
    """A k-fold dataset chooses its splits per fold; a fixed-split one has no folds to choose."""
    defaults = DatasetSection(name=dataset.name)
    if not folds:
        if dataset.folds is not None:
            raise FinebenchError(
                f"{path}: dataset.folds: {dataset.name} has a fixed train/test split, not folds; remove the key"
            )
        return
    for key in ("train_split", "test_split"):
        if getattr(dataset, key) != getattr(defaults, key):
            raise FinebenchError(
                f"{path}: dataset.{key}: {dataset.name} is a {folds}-fold dataset whose runs train on all "
                f"folds but the held-out one; remove {key} and choose folds with dataset.folds (0..{folds - 1})"
            )
    chosen = dataset.folds
    if chosen is not None and (not chosen or len(set(chosen)) != len(chosen) or max(chosen) >= folds):
        raise FinebenchError(
            f"{path}: dataset.folds: got {dataset.folds}; expected distinct fold indices in 0..{folds - 1} "
            f"({dataset.name} has {folds} folds)"
        )


def _check_validation_split(dataset: DatasetSection, folds: int, splits: list[str], path: Path) -> None:
    """A named validation split must be one of the dataset's and apart from its train and test splits."""
    from finebench.data.validation import split_overlap

    named = dataset.validation.split if dataset.validation is not None else None
    if named is None:
        return
    if folds:
        raise FinebenchError(f"{path}: dataset.validation.split: {dataset.name} is a {folds}-fold dataset; "
                             "carve each fold's validation images from its training folds with "
                             "dataset.validation = { fraction = 0.1 }")
    unknown = [part for part in named.split("+") if splits and part.strip() not in splits]
    if unknown:
        raise FinebenchError(f"{path}: dataset.validation.split: {dataset.name} has no split {unknown[0]!r} "
                             f"(its splits: {', '.join(splits)}); use dataset.validation = "
                             "{ fraction = 0.1 } to carve one from the training split")
    problem = split_overlap(named, dataset.train_split, dataset.test_split)
    if problem:
        raise FinebenchError(f"{path}: dataset.validation.split = {named!r}: {problem}")


def held_out_folds(loaded: LoadedRecipe) -> list[int | None]:
    """The folds a recipe holds out, one run each; ``[None]`` for a fixed train/test split."""
    from finebench.data.registry import get_spec

    recipe = loaded.recipe
    folds = get_spec(recipe.dataset.name).folds
    if not folds:
        return [None]
    _check_folds(recipe.dataset, folds, loaded.path)
    return list(recipe.dataset.folds) if recipe.dataset.folds is not None else list(range(folds))


def fold_dataset(dataset: Mapping[str, Any], fold: int | None, folds: int) -> dict[str, Any]:
    """The resolved ``dataset`` section of one run: without ``folds``; on a k-fold dataset with
    ``fold`` and the splits it implies (train ``fold1+fold2+...``, test ``fold0``)."""
    resolved = {key: value for key, value in dataset.items() if key != "folds"}
    if fold is not None:
        resolved["train_split"] = "+".join(f"fold{index}" for index in range(folds) if index != fold)
        resolved["test_split"] = f"fold{fold}"
        resolved["fold"] = fold
    return resolved


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def run_id_for(config: Mapping[str, Any]) -> str:
    """A stable 12-hex id: the hash of what the run computes (paths and worker counts excluded)."""
    trimmed = json.loads(_canonical(config))
    for section, key in RUN_ID_EXCLUDE:
        trimmed.get(section, {}).pop(key, None)
    return hashlib.sha256(_canonical(trimmed).encode()).hexdigest()[:12]


def expand_runs(loaded: LoadedRecipe, only: Sequence[str] = ()) -> list[RunSpec]:
    """One run per variant × seed (× held-out fold on a k-fold dataset), in recipe order; ``only``
    keeps variants by name or kind. A list of backbones runs the whole grid on each, as if each had
    its own recipe of this name."""
    from finebench.data.registry import get_spec

    recipe = loaded.recipe
    if not isinstance(recipe.model.backbone, str):
        return [run for backbone in recipe.model.backbones() for run in expand_runs(
            LoadedRecipe(recipe.model_copy(update={"model": recipe.model.model_copy(update={"backbone": backbone})}),
                         loaded.name, loaded.path), only)]
    variants = list(recipe.variants)
    if only:
        known = {variant_name(v) for v in variants} | {v.kind for v in variants}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise FinebenchError(
                f"--only {', '.join(unknown)}: not a variant of {loaded.path}; choose from {sorted(known)}"
            )
        variants = [v for v in variants if variant_name(v) in only or v.kind in only]
    shared = {"variants", "seeds", "name", "description", "fidelity", "logged"}
    fold_count = get_spec(recipe.dataset.name).folds
    held_out = held_out_folds(loaded)
    runs = []
    for base_variant in variants:
        name = variant_name(base_variant)  # the recipe's name for it, whatever its log-time settings
        train, model, variant = effective_settings(recipe, base_variant)
        changes = logged_changes(recipe, base_variant)
        effective = recipe.model_copy(update={"train": train, "model": model})
        base = {**effective.model_dump(mode="json", exclude=shared), "fidelity": recipe.fidelity}
        # The id hashes only what differs from the schema's defaults, so a setting added to the
        # schema later (with a default that keeps old behaviour) does not orphan existing runs;
        # ``fidelity`` itself is not hashed, only the settings it selects.
        base_for_id = effective.model_dump(mode="json", exclude=shared, exclude_defaults=True)
        options_for_id = variant.model_dump(mode="json", exclude={"kind", "name"}, exclude_defaults=True)
        run_train = method_of(variant).train_settings(train, variant)
        # a method's own train settings enter config and id only where they differ (ids stay put)
        own_train = {} if run_train == train else {"train": run_train.model_dump(mode="json")}
        own_train_for_id = {} if run_train == train else {"train": run_train.model_dump(mode="json", exclude_defaults=True)}
        for seed in recipe.seeds:
            for fold in held_out:
                variant_entry = {"kind": variant.kind, "name": name, "options": variant_options(variant)}
                config = {"recipe": loaded.name, **base, **own_train,
                          "dataset": fold_dataset(base["dataset"], fold, fold_count),
                          "variant": variant_entry, "seed": seed}
                if changes:
                    config["logged"] = changes  # what fidelity = "logged" changed (the sections hold the result)
                basis = {"recipe": loaded.name, **base_for_id, **own_train_for_id,
                         "dataset": fold_dataset(base_for_id["dataset"], fold, fold_count),
                         "variant": {**variant_entry, "options": options_for_id}, "seed": seed}
                runs.append(RunSpec(loaded.name, variant.kind, name, seed, config, run_id_for(basis), fold,
                                    variant, run_train, model))
    return runs
