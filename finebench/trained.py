"""Use a trained run: rebuild its model from ``config.json`` + ``last.pt``, evaluate it again
(``finebench eval``) or ship it as ``model.safetensors`` + ``config.json`` (``finebench export``).

The model is rebuilt through ``finebench.models.build_model_from_config``, the one place the
trainer builds it, and fed through the loader's own evaluation transform, so ``eval`` on the run's
test split repeats the run's final evaluation (same images, order, batches and precision).
An export is the layout timm and the Hugging Face Hub ship models in: safetensors weights (no
pickle, so loading runs no code) and a JSON config that ``load_exported`` turns back into the model
as its run evaluated it: the method's test-time prediction and the test transform the loader
resolved (``export_run`` documents the format), so the export reproduces the recorded test top-1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from finebench.data.root import resolve_data_root
from finebench.errors import FinebenchError
from finebench.methods import (
    Method,
    build_model_from_config,
    method_of,
    variant_of_config,
)
from finebench.models.output import ModelOutput
from finebench.models.base import read_state_dict
from finebench.results import RunDir

if TYPE_CHECKING:
    from PIL import Image

    from finebench.data.presets import EvalTransform

EXPORT_FORMAT = "finebench-model"
EXPORT_VERSION = 2
"""2: config.json carries the test transform (``preprocessing``); the model predicts with its method."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class TrainedRun:
    """A run's model (eval mode) and the records that describe it."""

    model: nn.Module
    config: dict[str, Any]
    summary: dict[str, Any]
    run_dir: Path
    num_classes: int


def read_record(path: Path) -> dict[str, Any]:
    """A run's JSON record as a dict; a missing or broken file is a user error naming it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinebenchError(f"{path}: not found; expected a run folder of `finebench run`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinebenchError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise FinebenchError(f"{path}: holds a JSON {type(record).__name__}; expected an object")
    return record


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dicts saved from DDP or torch.compile carry ``module.``/``_orig_mod.`` prefixes."""
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def load_trained_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild a run's model from config.json and load the weights its test numbers came from:
    ``best.pt`` for a ``train.select = "best_validation"`` run (the selected epoch), else ``last.pt``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinebenchError(f"{run_dir}: no such run folder; expected results/<recipe>/<run-id>")
    config = read_record(RunDir.at(run_dir).config_path)
    summary = read_record(RunDir.at(run_dir).summary_path)
    num_classes = summary.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise FinebenchError(f"{run_dir / 'summary.json'}: num_classes is {num_classes!r}; expected an integer")
    records = RunDir.at(run_dir)
    selected = (config.get("train") or {}).get("select") == "best_validation"
    checkpoint_path = records.best_path if selected else records.checkpoint_path
    if not checkpoint_path.is_file():
        raise FinebenchError(f"{checkpoint_path}: not found; the run has no checkpoint")
    state = read_state_dict(checkpoint_path, "run checkpoint", keys=("model",))
    model = build_model_from_config(config, num_classes, pretrained=False)
    try:
        model.load_state_dict(strip_wrappers(state))
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise FinebenchError(f"{checkpoint_path}: weights do not fit the model of config.json ({first})") from None
    return TrainedRun(model.to(device).eval(), config, summary, run_dir, num_classes)


def run_data_root(config: dict[str, Any], data_root: str | Path | None) -> Path:
    """The one data-root rule (``--data-root``, FINEBENCH_DATA, then the root the run trained from)."""
    return resolve_data_root(data_root, (config.get("dataset") or {}).get("root"))


# ---- eval ------------------------------------------------------------------------------------


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """The run's metrics on ``split`` (default: the split it was tested on), with its precision.

    Returns the engine's metrics plus ``mean_class_top1``, ``confusion``, ``split``, ``images``,
    ``recorded_top1`` (the run's own final test top-1, for comparison), ``group_top1`` (top-1 per
    supercategory) where the store's classes each belong to one group, and ``predictions_file``: the
    per-image predictions written into the run folder (``RunDir.predictions_path(split)``: a file
    of its own, so the run's record of its final evaluation stays as it was) and ``test_set_digest``.
    """
    from finebench.data.loader import build_eval_loader
    from finebench.predictions import write_predictions
    from finebench.report.stats import group_accuracy, mean_class_accuracy
    from finebench.train.evaluate import evaluate
    from finebench.train.runtime import compile_model, configure_backends, resolve_device

    try:
        torch_device = resolve_device(device)
    except RuntimeError as error:
        raise FinebenchError(f"--device {device!r}: {error}; expected auto, cpu, cuda or cuda:N") from None
    run = load_trained_run(run_dir, torch_device)
    method = method_of(variant_of_config(run.config))  # the model was built from it, so it is there
    dataset = run.config.get("dataset") or {}
    train = run.config.get("train") or {}
    name = dataset.get("name") or run.summary.get("dataset")
    split = split or dataset.get("test_split") or "test"
    loader, meta = build_eval_loader(
        name, run_data_root(run.config, data_root), split,
        batch_size=int(train.get("eval_batch_size") or train.get("batch_size") or 256),
        input_size=dataset.get("input_size"), augmentation=dataset.get("augmentation", "auto"),
        resize=dataset.get("resize"), normalize=dataset.get("normalize"),
    )
    precision = run.summary.get("precision") or "fp32"
    # The run's own evaluation ran with the memory format and compilation it resolved to; on a GPU
    # they change kernels (and so bf16 rounding), so evaluate as the run did when the device allows.
    same_device_type = torch_device.type == str(run.summary.get("device") or "cpu").split()[0].split(":")[0]
    channels_last = bool(run.summary.get("channels_last")) and same_device_type
    model = run.model  # on torch_device already (load_trained_run)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    configure_backends(torch_device)
    if run.summary.get("compile") and same_device_type:
        model = compile_model(model)
    metrics = evaluate(model, loader, device=torch_device, precision=precision, channels_last=channels_last,
                       method=method, confusion=True, per_image=True)
    metrics["mean_class_top1"] = mean_class_accuracy(metrics["confusion"])
    per_image = replace(metrics.pop("per_image"), split=split)
    predictions_path = RunDir.at(run.run_dir).predictions_path(split)
    write_predictions(predictions_path, per_image)
    metrics.update(predictions_file=str(predictions_path), test_set_digest=per_image.digest)
    groups = meta.get("groups") or {}
    if groups.get("of_class") is not None:  # the store says which group (supercategory) each class is in
        accuracies = group_accuracy(metrics["confusion"], groups["of_class"], len(groups["names"]))
        metrics["group_top1"] = {  # None: no image of that group in the split (JSON has no NaN)
            "kind": groups["kind"], "top1": {g: None if math.isnan(a) else a for g, a in zip(groups["names"], accuracies)},
        }
    final = run.summary.get("final") or {}
    metrics.update(split=split, images=len(loader.dataset), precision=precision,
                   recorded_top1=final.get("test_top1"))
    return metrics


# ---- export ----------------------------------------------------------------------------------


class ExportedModel(nn.Module):
    """An exported model that predicts as its run's evaluation did.

    ``forward(images)`` is the method's test-time prediction (``Method.predict``: WS-DAN's raw and
    crop views, CAL's eight views, ...; a plain ``model(images)`` for the others), a ``ModelOutput``;
    ``scores(images)`` is what the run's top-1 read (``Method.scores``: the mixture's
    log-probabilities for Attend and Rectify, else the logits); ``transform(image)`` turns a PIL
    image (as ``Image.open`` gives it) into the normalised C×H×W tensor the run's test loader fed.
    The network itself is ``network`` (its weights are ``model.safetensors``).
    """

    def __init__(self, network: nn.Module, method: Method, preprocess: EvalTransform, config: dict[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.method = method
        self.preprocess = preprocess
        self.config = config

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.method.predict(self.network, images)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """B × classes, float32: the argmax is the top-1 the run recorded."""
        return self.method.scores(self(images)).float()

    def transform(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess.normalise(self.preprocess(image))


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, *,
               data_root: str | Path | None = None) -> list[Path]:
    """Write ``model.safetensors`` and ``config.json`` (default folder: RUN_DIR/export).

    config.json (``format`` "finebench-model", ``format_version`` 2) holds what ``load_exported``
    needs to predict as the run's test evaluation did:

    * ``model`` / ``variant``: the network and the method (whose ``predict`` gives the test
      prediction, every pass of it); ``num_classes``, ``classes``;
    * ``preprocessing``: the run's test transform as the loader resolved it (from the run's
      ``dataset`` settings and the store's meta.json, hence ``data_root``): ``kind`` "imagenet"
      (resize, then a centre crop of ``size`` px), "cifar" or "none" (resize to ``size`` × ``size``
      where the image differs); ``resize``: the shorter side (int), an exact [height, width], or
      the square side; ``mean`` / ``std``: per RGB channel, applied as ``(pixel / 255 - mean) / std``;
    * ``dataset``: the run's own settings (name, input_size, augmentation, resize, normalize, e.g.
      "half"), for reading;
    * ``source_run``: its id, recipe, seed, ``test_top1`` (measured at ``precision`` on ``device``)
      and commit.
    """
    from finebench.data.loader import eval_transform
    from finebench.data.store import read_meta

    run = load_trained_run(run_dir)
    dataset = run.config.get("dataset") or {}
    name = dataset.get("name") or run.summary.get("dataset")
    meta = read_meta(run_data_root(run.config, data_root), name)
    preprocess = eval_transform(meta, dataset.get("augmentation", "auto"), dataset.get("input_size"),
                                resize=dataset.get("resize"), normalize=dataset.get("normalize"))
    model_section = dict(run.config.get("model") or {})
    model_section["pretrained"] = None  # the weights are in model.safetensors
    final = run.summary.get("final") or {}
    config = {
        "finebench_version": run.summary.get("finebench_version"),
        "num_classes": run.num_classes,
        "classes": _classes(run),
        "model": model_section,
        "variant": run.config.get("variant"),
        "input_size": run.summary.get("input_size") or dataset.get("input_size"),
        "preprocessing": preprocessing_record(preprocess),
        "dataset": {k: dataset.get(k) for k in ("name", "input_size", "augmentation", "resize", "normalize")},
        "source_run": {"run_id": run.summary.get("run_id"), "recipe": run.summary.get("recipe"),
                       "seed": run.summary.get("seed"), "test_top1": final.get("test_top1"),
                       "precision": run.summary.get("precision"), "device": run.summary.get("device"),
                       "git_commit": run.summary.get("git_commit")},
    }
    return write_export(run.model, config, Path(out_dir) if out_dir is not None else run.run_dir / "export")


def preprocessing_record(transform: EvalTransform) -> dict[str, Any]:
    """config.json's ``preprocessing``: the resolved test transform's fields as JSON (``load_exported``
    rebuilds the same ``EvalTransform`` from them; floats round-trip exactly through JSON)."""
    resize = list(transform.resize) if isinstance(transform.resize, tuple) else transform.resize
    return {**asdict(transform), "resize": resize, "mean": list(transform.mean), "std": list(transform.std)}


def write_export(network: nn.Module, config: dict[str, Any], out: Path) -> list[Path]:
    """``model.safetensors`` of ``network`` and ``config.json`` (``config`` stamped with the format)
    into ``out``; ``config`` needs what ``load_exported`` reads: model, variant, num_classes, preprocessing."""
    from safetensors.torch import save_model

    from finebench.results import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    temporary = out / f".{WEIGHTS_FILE}.tmp"
    save_model(network, str(temporary), metadata={"format": "pt"})
    # safetensors creates its file private (0600); a model to ship gets the mode open() would give.
    mask = os.umask(0)
    os.umask(mask)
    temporary.chmod(0o666 & ~mask)
    temporary.replace(weights)
    atomic_write_json(out / CONFIG_FILE, {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, **config})
    return [weights, out / CONFIG_FILE]


def _classes(run: TrainedRun) -> list[str] | None:
    """Class names from the run's confusion record (saved at its final evaluation), when there is one."""
    path = RunDir.at(run.run_dir).confusion_path
    if not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text(encoding="utf-8")).get("classes")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return classes if isinstance(classes, list) else None


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """The model of an export folder (eval mode): its network rebuilt with ``finebench.models`` and
    its weights loaded, predicting with its method's test-time passes and carrying the run's test
    transform (see ``ExportedModel``; the config.json format: ``export_run``)."""
    from safetensors.torch import load_model

    from finebench.data.config import as_resize
    from finebench.data.presets import EvalTransform

    folder = Path(path)
    config_path = folder / CONFIG_FILE
    config = read_record(config_path)
    if config.get("format") != EXPORT_FORMAT:
        raise FinebenchError(f"{config_path}: format {config.get('format')!r}; expected {EXPORT_FORMAT!r}")
    if config.get("format_version") != EXPORT_VERSION:
        raise FinebenchError(f"{config_path}: format_version {config.get('format_version')!r}; expected "
                             f"{EXPORT_VERSION} (export the run again with `finebench export RUN_DIR`)")
    try:
        section = config["preprocessing"]
        preprocess = EvalTransform(section["kind"], section["size"], as_resize(section["resize"]),
                                   tuple(section["mean"]), tuple(section["std"]))
        method = method_of(variant_of_config(config))
        num_classes = int(config["num_classes"])
    except (KeyError, TypeError, ValueError) as error:
        raise FinebenchError(f"{config_path}: unusable preprocessing, variant or num_classes ({error!r}); "
                             f"expected the config.json `finebench export` writes") from None
    network = build_model_from_config(config, num_classes, pretrained=False)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FinebenchError(f"{weights}: not found; expected the weights beside {CONFIG_FILE}")
    load_model(network, str(weights), strict=True)
    return ExportedModel(network, method, preprocess, config).to(device).eval()
