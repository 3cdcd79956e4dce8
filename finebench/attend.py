"""``finebench attend``: draw where a trained Attend and Rectify model looks, like the paper's figures.

For each image: the input, every head's mask of every module upsampled and overlaid on it, the
gates (each head's weight inside its module and each source's weight in the global mixture) and
the top predictions of each module, of the network's own classifier and of the mixture. A method
whose maps are not Attend and Rectify modules (WS-DAN, CAL) says what to draw through
``Method.maps_to_draw``: a row of maps, a box on the input and named predictions.

The masks are read with forward hooks on the ``AttentionModule``s, so the model code stays as it
is trained; the per-head gate weights, which forward does not return, come from the module's
public ``head_weights`` (the very formula its forward pass uses).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from finebench.atomic import atomic_write, make_folder
from finebench.errors import FinebenchError
from finebench.methods import METHODS, method_of, variant_of_config
from finebench.methods.base import MapsToDraw
from finebench.results import RunDir
from finebench.trained import TrainedRun, load_trained_run, read_record, run_data_root

TOP_K = 3
HEAD_WEIGHT_SHOWN_FROM = 0.01
"""Spread of a module's head weights on an image below which they are left off its heads' titles
(they would all read the same at two decimals: 0.50 in a trained CIFAR run)."""


@dataclass
class AttentionCapture:
    """What one batch made the attention modules do, in the model's source order (deepest first)."""

    taps: list[str]
    masks: list[torch.Tensor] = field(default_factory=list)
    """Per module: B×K×H×W spatial masks (each sums to 1 over H·W)."""
    head_weights: list[torch.Tensor] = field(default_factory=list)
    """Per module: B×K weights of its heads (the module gate)."""
    head_log_probs: list[torch.Tensor] = field(default_factory=list)
    """Per module: B×K×N, each head's own class prediction."""
    module_log_probs: list[torch.Tensor] = field(default_factory=list)
    network_log_probs: torch.Tensor | None = None
    mixture_log_probs: torch.Tensor | None = None
    source_gates: torch.Tensor | None = None
    """B×(D+1) global gate weights (modules, then the network), or None without gates."""


def load_attention_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild a run's model from config.json and load ``last.pt``; it must be an attention run."""
    run_dir = Path(run_dir)
    config = read_record(RunDir.at(run_dir).config_path)
    variant = config.get("variant")
    kind = variant.get("kind") if isinstance(variant, dict) else None
    if kind not in METHODS or not METHODS[kind].draws_attention_maps:
        raise FinebenchError(
            f"{run_dir / 'config.json'}: variant.kind is {kind!r}; attention maps need a run of {_map_methods()}"
        )
    return load_trained_run(run_dir, device)


def _map_methods() -> str:
    """The kinds whose models have attention maps to draw (``Method.draws_attention_maps``)."""
    return " or ".join(repr(kind) for kind, method in METHODS.items() if method.draws_attention_maps)


@contextmanager
def _hooks(model: nn.Module, capture: AttentionCapture) -> Iterator[None]:
    from finebench.models.attention import AttentionModule

    modules = [m for m in model.modules() if isinstance(m, AttentionModule)]
    if not modules:
        raise FinebenchError(f"the model has no attention modules; attention maps need a run of {_map_methods()}")

    def record(module: AttentionModule, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        _, masks = output
        capture.masks.append(masks.detach().float().cpu())
        capture.head_weights.append(module.head_weights(inputs[0], masks).detach().float().cpu())
        capture.head_log_probs.append(F.log_softmax(module.head_outputs(inputs[0], masks).float(), dim=2).cpu())

    handles = [module.register_forward_hook(record) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_attention(model: nn.Module, images: torch.Tensor) -> AttentionCapture:
    """Run one batch and keep masks, gates and every source's predictions."""
    from finebench.models.network import unwrap

    classifier = unwrap(model)
    capture = AttentionCapture(taps=list(classifier.attention_taps))
    with _hooks(classifier, capture):
        output = classifier(images)
    capture.module_log_probs = [F.log_softmax(logits.float(), dim=1).cpu() for logits in output.module_logits]
    capture.network_log_probs = F.log_softmax(output.logits.float(), dim=1).cpu()
    # The mixture is not normalised (docs/MECHANISM.md §1): renormalise before reading it as probabilities.
    capture.mixture_log_probs = F.log_softmax(output.log_probs.float(), dim=1).cpu()
    capture.source_gates = output.gates.float().cpu() if output.gates is not None else None
    return capture


# ---- inputs -------------------------------------------------------------------------------


@dataclass
class Preprocess:
    """The run's evaluation transform (the loader's own), returning what the network saw too."""

    transform: Any

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        """(normalised C×H×W tensor, the H×W×3 uint8 picture the network saw)."""
        shown = self.transform(image)
        return self.transform.normalise(shown), shown


def eval_preprocess(config: dict[str, Any], meta: dict[str, Any] | None) -> Preprocess:
    """The evaluation transform of the data loader for this run's dataset settings."""
    from finebench.data.config import meta_without_store
    from finebench.data.loader import eval_transform

    dataset = config.get("dataset", {})
    input_size = dataset.get("input_size") or config.get("input_size")
    if meta is None:
        meta = meta_without_store(dataset.get("name"), input_size)
    return Preprocess(eval_transform(meta, dataset.get("augmentation", "auto"), input_size,
                                     resize=dataset.get("resize"), normalize=dataset.get("normalize")))


def _read_meta(data_root: Path, name: str | None) -> dict[str, Any] | None:
    """The prepared store's meta.json, or None where the run's dataset is not prepared here."""
    from finebench.data.store import is_prepared, read_meta

    if not name or not is_prepared(data_root, name):
        return None
    return read_meta(data_root, name)


def images_from_files(paths: Sequence[str | Path]) -> list[tuple[str, Image.Image, int | None]]:
    """(name, image, label unknown) for image files given on the command line."""
    loaded = []
    for raw in paths:
        path = Path(raw)
        try:
            with Image.open(path) as image:
                loaded.append((path.stem, image.convert("RGB"), None))
        except FileNotFoundError:
            raise FinebenchError(f"{path}: no such image file") from None
        except OSError as error:
            raise FinebenchError(f"{path}: not a readable image ({error})") from None
    return loaded


def images_from_split(data_root: Path, dataset: str, split: str, n: int) -> list[tuple[str, Image.Image, int | None]]:
    """``n`` images spread evenly over a prepared split, so several classes show up."""
    import datasets

    from finebench.data.store import prepare_command

    split_dir = data_root / dataset / split
    if not split_dir.is_dir():
        raise FinebenchError(f"{split_dir}: no prepared split {split!r} of {dataset!r}; "
                              f"run `{prepare_command(dataset, data_root)}` or give --data-root")
    store = datasets.load_from_disk(str(split_dir))
    if len(store) == 0:
        raise FinebenchError(f"{split_dir}: the split is empty")
    count = min(n, len(store))
    indices = sorted({int(i) for i in np.linspace(0, len(store) - 1, count)})
    picked = store.select(indices)
    return [(f"{split}_{index:06d}", row["image"].convert("RGB"), int(row["label"]))
            for index, row in zip(indices, picked)]


def _unique_names(samples: list[tuple[str, Image.Image, int | None]]) -> list[tuple[str, Image.Image, int | None]]:
    """a/cat.jpg and b/cat.jpg must not overwrite each other's figure."""
    seen: dict[str, int] = {}
    unique = []
    for name, image, label in samples:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append((name if count == 0 else f"{name}_{count}", image, label))
    return unique


# ---- drawing ------------------------------------------------------------------------------


def _top(log_probs: torch.Tensor, classes: Sequence[str] | None, k: int = 0) -> str:
    """The ``k`` (default ``TOP_K``) most probable classes with their probability, one a line."""
    probs = log_probs.exp()
    values, indices = probs.topk(min(k or TOP_K, probs.numel()))
    names = [classes[i] if classes and i < len(classes) else str(i) for i in indices.tolist()]
    return "\n".join(f"{name[:22]} {value * 100:.1f}%" for name, value in zip(names, values.tolist()))


def save_png(figure: Figure, path: Path) -> Path:
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    return path


def _input_panel(axes: Any, picture: np.ndarray, classes: Sequence[str] | None, label: int | None,
                 what: str = "input") -> None:
    """The picture the network saw, titled with its true class when known."""
    axes.imshow(picture)
    truth = "" if label is None else f"\ntrue: {classes[label] if classes and label < len(classes) else label}"
    axes.set_title(f"{what}{truth}", fontsize=8)
    axes.axis("off")


def _overlay(axes: Any, picture: np.ndarray, mask: np.ndarray, title: str) -> None:
    """One map over the picture, stretched to its own range (a flat map draws as nothing)."""
    span = float(mask.max() - mask.min())
    mask = (mask - mask.min()) / span if span > 0 else np.zeros_like(mask)
    axes.imshow(picture)
    axes.imshow(mask, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    axes.set_title(title, fontsize=7)
    axes.axis("off")


def attention_figure(picture: np.ndarray, capture: AttentionCapture, index: int,
                     classes: Sequence[str] | None = None, label: int | None = None) -> Figure:
    """Input and predictions on top, then a row per module with each head's overlay and its own top class."""
    modules = len(capture.masks)
    heads = max(mask.shape[1] for mask in capture.masks)
    columns = heads + 1
    figure = Figure(figsize=(2.3 * columns, 2.4 * (modules + 1)))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(modules + 1, columns)
    height, width = picture.shape[:2]
    gates = capture.source_gates[index] if capture.source_gates is not None else None
    # a module's head weights are shown only where they tell its heads apart at the title's precision
    head_weights_differ = [bool(weights[index].max() - weights[index].min() >= HEAD_WEIGHT_SHOWN_FROM)
                           for weights in capture.head_weights]

    def gate_text(source: int) -> str:
        return f"gate {gates[source]:.2f}" if gates is not None else "gate: mean"

    _input_panel(figure.add_subplot(grid[0, 0]), picture, classes, label)
    summary = figure.add_subplot(grid[0, 1:])
    summary.axis("off")
    assert capture.mixture_log_probs is not None and capture.network_log_probs is not None
    summary.text(0.0, 1.0, "network (rectified mixture)\n" + _top(capture.mixture_log_probs[index], classes),
                 va="top", fontsize=8, family="monospace")
    summary.text(0.5, 1.0, f"network classifier ({gate_text(modules)})\n"
                 + _top(capture.network_log_probs[index], classes), va="top", fontsize=8, family="monospace")

    for row, (tap, masks, weights) in enumerate(zip(capture.taps, capture.masks, capture.head_weights), start=1):
        text_axes = figure.add_subplot(grid[row, 0])
        text_axes.axis("off")
        text_axes.text(0.0, 1.0, f"module {tap}\n{gate_text(row - 1)}\n"
                       + _top(capture.module_log_probs[row - 1][index], classes),
                       va="top", fontsize=7, family="monospace")
        upsampled = F.interpolate(masks[index : index + 1], size=(height, width), mode="bilinear",
                                  align_corners=False)[0]
        for head in range(masks.shape[1]):
            says = _top(capture.head_log_probs[row - 1][index, head], classes, 1)
            weight = f"  w={weights[index, head]:.2f}" if head_weights_differ[row - 1] else ""
            _overlay(figure.add_subplot(grid[row, head + 1]), picture, upsampled[head].numpy(),
                     f"{tap} head {head}{weight}\n{says}")
    legend = ["under each head: its own top class", "gate: a source's weight in the network's mixture (global gate)"]
    if any(head_weights_differ):
        legend.insert(1, "w: a head's weight inside its module (module gate)")
    figure.suptitle("\n".join(legend), fontsize=7, y=0.005, va="bottom")  # a line each: narrow figures cut one long line
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure


def maps_figure(picture: np.ndarray, drawn: MapsToDraw, index: int,
                classes: Sequence[str] | None = None, label: int | None = None) -> Figure:
    """A method's ``MapsToDraw`` (WS-DAN, CAL): the input (with its box) and the predictions on top,
    then each map overlaid on the input."""
    from matplotlib.patches import Rectangle

    columns = max(drawn.maps.shape[1], 2)
    figure = Figure(figsize=(2.3 * columns, 2.4 * 2))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, columns)
    height, width = picture.shape[:2]
    axes = figure.add_subplot(grid[0, 0])
    _input_panel(axes, picture, classes, label, "input + crop box" if drawn.boxes is not None else "input")
    if drawn.boxes is not None:
        top, bottom, left, right = drawn.boxes[index]
        axes.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, color="lime", lw=1.5))
    summary = figure.add_subplot(grid[0, 1:])
    summary.axis("off")
    for column, (name, log_probs) in enumerate(drawn.log_probs.items()):
        summary.text(column / max(len(drawn.log_probs), 1), 1.0, f"{name}\n" + _top(log_probs[index], classes),
                     va="top", fontsize=8, family="monospace")
    upsampled = F.interpolate(drawn.maps[index : index + 1].float().cpu(), size=(height, width), mode="bilinear",
                              align_corners=False)[0]
    for column in range(drawn.maps.shape[1]):
        _overlay(figure.add_subplot(grid[1, column]), picture, upsampled[column].numpy(), drawn.captions[index][column])
    figure.suptitle(drawn.title, fontsize=7, y=0.005, va="bottom")
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    return figure


def attend(
    run_dir: str | Path,
    images: Sequence[str | Path] = (),
    *,
    split: str | None = None,
    n: int = 16,
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> list[Path]:
    """Write one attention-map PNG per image (files, or ``n`` images of a prepared split)."""
    from finebench.train.runtime import resolve_device

    if not images and not split:
        raise FinebenchError("no images: give image files or --split NAME (with --n)")
    if n < 1:
        raise FinebenchError(f"--n {n}: expected at least 1 image")
    try:
        torch_device = resolve_device(device)
    except RuntimeError as error:
        raise FinebenchError(f"--device {device!r}: {error}; expected auto, cpu, cuda or cuda:N") from None
    run = load_attention_run(run_dir, torch_device)
    method = method_of(variant_of_config(run.config))
    dataset = run.config.get("dataset", {}).get("name") or run.summary.get("dataset")
    root = run_data_root(run.config, data_root)
    meta = _read_meta(root, dataset)
    classes = list(meta["classes"]) if meta and meta.get("classes") else None
    samples = images_from_files(images) if images else []
    if split:
        samples += images_from_split(root, dataset, split, n)
    samples = _unique_names(samples)
    preprocess = eval_preprocess(run.config, meta)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "attention_maps"
    make_folder(out)
    written: list[Path] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prepared = [preprocess(image) for _, image, _ in chunk]
        batch = torch.stack([tensor for tensor, _ in prepared]).to(torch_device)
        with torch.no_grad():
            drawn = method.maps_to_draw(run.model, batch)
        capture = capture_attention(run.model, batch) if drawn is None else None
        for index, ((name, _, label), (_, picture)) in enumerate(zip(chunk, prepared)):
            path = out / f"{name}.png"
            figure = (maps_figure(picture, drawn, index, classes, label) if drawn is not None
                      else attention_figure(picture, capture, index, classes, label))
            written.append(save_png(figure, path))
    return written

