"""Use a trained run: rebuild its model from ``config.json`` + ``last.pt``, evaluate it again
(``finebench eval``) or ship it as ``model.safetensors`` + ``config.json`` (``finebench export``).

The model is rebuilt through ``finebench.models.build_model_from_config``, the one place the
trainer builds it, and fed through the loader's own evaluation transform, so ``eval`` on the run's
test split repeats the run's final evaluation (same images, order, batches and precision).
An export is the layout timm and the Hugging Face Hub ship models in: safetensors weights (no
pickle, so loading runs no code) and a JSON config that ``load_exported`` turns back into the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finebench.data.root import resolve_data_root
from finebench.errors import FinebenchError
from finebench.methods import build_model_from_config, get_method
from finebench.models.base import read_state_dict
from finebench.results import RunDir

EXPORT_FORMAT = "finebench-model"
EXPORT_VERSION = 1
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
    """Rebuild a run's model from config.json and load the weights of ``last.pt``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinebenchError(f"{run_dir}: no such run folder; expected results/<recipe>/<run-id>")
    config = read_record(RunDir.at(run_dir).config_path)
    summary = read_record(RunDir.at(run_dir).summary_path)
    num_classes = summary.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise FinebenchError(f"{run_dir / 'summary.json'}: num_classes is {num_classes!r}; expected an integer")
    checkpoint_path = RunDir.at(run_dir).checkpoint_path
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

    Returns the engine's metrics plus ``mean_class_top1``, ``confusion``, ``split``, ``images`` and
    ``recorded_top1`` (the run's own final test top-1, for comparison).
    """
    from finebench.data.loader import build_eval_loader
    from finebench.report.stats import mean_class_accuracy
    from finebench.train.engine import compile_model, configure_backends, evaluate, resolve_device

    try:
        torch_device = resolve_device(device)
    except RuntimeError as error:
        raise FinebenchError(f"--device {device!r}: {error}; expected auto, cpu, cuda or cuda:N") from None
    run = load_trained_run(run_dir, torch_device)
    method = get_method(run.config["variant"]["kind"])  # the model was built from it, so it is there
    dataset = run.config.get("dataset") or {}
    train = run.config.get("train") or {}
    name = dataset.get("name") or run.summary.get("dataset")
    split = split or dataset.get("test_split") or "test"
    loader, _ = build_eval_loader(
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
                       mixture=method.mixture, method=method, confusion=True)
    metrics["mean_class_top1"] = mean_class_accuracy(metrics["confusion"])
    final = run.summary.get("final") or {}
    metrics.update(split=split, images=len(loader.dataset), precision=precision,
                   recorded_top1=final.get("test_top1"))
    return metrics


# ---- export ----------------------------------------------------------------------------------


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``model.safetensors`` and ``config.json`` (default folder: RUN_DIR/export)."""
    from safetensors.torch import save_model

    from finebench.results import atomic_write_json

    run = load_trained_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    temporary = out / f".{WEIGHTS_FILE}.tmp"
    save_model(run.model, str(temporary), metadata={"format": "pt"})
    # safetensors creates its file private (0600); a model to ship gets the mode open() would give.
    mask = os.umask(0)
    os.umask(mask)
    temporary.chmod(0o666 & ~mask)
    temporary.replace(weights)
    model_section = dict(run.config.get("model") or {})
    model_section["pretrained"] = None  # the weights are in model.safetensors
    dataset = run.config.get("dataset") or {}
    final = run.summary.get("final") or {}
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "finebench_version": run.summary.get("finebench_version"),
        "num_classes": run.num_classes,
        "classes": _classes(run),
        "model": model_section,
        "variant": run.config.get("variant"),
        "input_size": run.summary.get("input_size") or dataset.get("input_size"),
        "dataset": {k: dataset.get(k) for k in ("name", "input_size", "augmentation")},
        "source_run": {"run_id": run.summary.get("run_id"), "recipe": run.summary.get("recipe"),
                       "seed": run.summary.get("seed"), "test_top1": final.get("test_top1"),
                       "git_commit": run.summary.get("git_commit")},
    }
    atomic_write_json(out / CONFIG_FILE, config)
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


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of an export folder, rebuilt with ``finebench.models`` and its weights loaded."""
    from safetensors.torch import load_model

    folder = Path(path)
    config = read_record(folder / CONFIG_FILE)
    if config.get("format") != EXPORT_FORMAT:
        raise FinebenchError(f"{folder / CONFIG_FILE}: format {config.get('format')!r}; expected {EXPORT_FORMAT!r}")
    model = build_model_from_config(config, int(config["num_classes"]), pretrained=False)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FinebenchError(f"{weights}: not found; expected the weights beside {CONFIG_FILE}")
    load_model(model, str(weights), strict=True)
    return model.to(device).eval()
