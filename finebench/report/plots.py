"""The report's figures: accuracy against cost, learning curves and early prediction, per dataset.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas rather than pyplot, so
nothing depends on a display or on pyplot's global state (safe in threads and on servers).
Every figure is written as PNG (for a quick look) and SVG (for the paper), states the number of
runs behind each series, and keeps its tick labels apart (a few ticks, whole epochs).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from finebench.atomic import atomic_write, make_folder
from finebench.data.root import resolve_data_root
from finebench.data.store import read_meta, store_dir
from finebench.errors import FinebenchError
from finebench.methods import METHODS
from finebench.report.ranks import ALPHA, Ranks, cliques
from finebench.report.records import load_metrics
from finebench.report.stats import mean_ci
from finebench.report.tables import early_prediction_table
from finebench.results import RunDir, read_json

SUFFIXES: tuple[str, ...] = ("png", "svg")
NETWORK_CLASSIFIER = "network classifier"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "unnamed"


def _save(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    written = []
    for suffix in SUFFIXES:
        path = out_dir / f"{stem}.{suffix}"
        atomic_write(path, lambda handle, suffix=suffix: figure.savefig(handle, format=suffix, dpi=150))
        written.append(path)
    return written


def _series_label(backbone: str, variant: str, several_backbones: bool, n: int) -> str:
    name = f"{backbone} {variant}" if several_backbones else str(variant)
    return f"{name} (n={n})"


def _finish_axes(axes: Axes, xlabel: str, ylabel: str, title: str, integer_x: bool = False) -> None:
    """The same labels, grid and legend on every panel; few ticks so their labels never overlap."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=integer_x, min_n_ticks=2))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=6))
    if axes.has_data() and axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)


def cost_accuracy_figure(data: pd.DataFrame, dataset: str, error: bool = False) -> Figure:
    """One dataset's accuracy against FLOPs and against parameters: a faint point per run, mean ±
    95% CI per variant."""
    metric = "Error (%)" if error else "Top-1 (%)"
    data = data.assign(value=100.0 - data["top1"] if error else data["top1"])
    several = data["backbone_label"].nunique() > 1
    figure = Figure(figsize=(11, 4.5))
    for index, (cost, unit, scale) in enumerate((("flops", "GFLOPs", 1e9), ("params", "M params", 1e6))):
        axes = figure.add_subplot(1, 2, index + 1)
        for (backbone, variant), series in data.groupby(["backbone_label", "variant_name"], sort=True):
            x = pd.to_numeric(series[cost], errors="coerce") / scale
            if x.isna().all():
                continue
            summary = mean_ci(series["value"])
            points = axes.scatter(x, series["value"], alpha=0.35, s=14)
            yerr = 0.0 if math.isnan(summary.half_width) else summary.half_width
            axes.errorbar(x.mean(), summary.mean, yerr=yerr, fmt="o", capsize=4,
                          color=points.get_facecolor()[0][:3],
                          label=_series_label(backbone, variant, several, summary.n))
        axes.margins(0.15)  # the cheapest point (the baseline) inside the frame, not on its corner
        _finish_axes(axes, unit, metric, f"{dataset}: {metric} vs {unit} (bars: 95% CI)")
    return figure


def plot_cost_accuracy(runs: pd.DataFrame, out_dir: Path, error: bool = False) -> list[Path]:
    """One cost/accuracy figure per dataset."""
    written: list[Path] = []
    for dataset, data in runs.groupby("dataset", sort=True):
        written += _save(cost_accuracy_figure(data, str(dataset), error), out_dir, f"cost_accuracy_{_slug(dataset)}")
    return written


def learning_curves_figure(runs: pd.DataFrame, title: str, warnings: list[str] | None = None) -> Figure | None:
    """Train loss and test top-1 per epoch of ``runs``: the mean over seeds and a min–max band.

    The train loss gets one panel per objective (``Method.objective``): methods with their own loss
    (WS-DAN's three CEs and centre loss near 11, PMG's sum of four step losses) on the baseline's
    cross-entropy axis would flatten it. Separate panels rather than normalised curves, because a
    reader checks a loss's own value (CE starts near ln N; a log's numbers) and the shape of each.
    """
    curves = []
    for run in runs.itertuples():
        metrics, problems = load_metrics(run.run_dir)
        if warnings is not None:
            warnings.extend(problems)
        if not metrics.empty:
            method = METHODS.get(run.variant)
            curves.append(metrics.assign(backbone_label=run.backbone_label, variant_name=run.variant_name,
                                         run_id=run.run_id,
                                         objective=method.objective if method else f"{run.variant} objective"))
    if not curves:
        return None
    table = pd.concat(curves, ignore_index=True)
    several = table["backbone_label"].nunique() > 1
    objectives = sorted(table["objective"].unique(), key=lambda name: (name != "cross-entropy", name))
    panels = [("train_loss", f"train loss: {objective}", table[table["objective"] == objective])
              for objective in objectives] + [("test_top1", "test top-1 (%)", table)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5.5 * columns, 4.5 * rows))
    epochs = pd.to_numeric(table["epoch"], errors="coerce").dropna().unique()
    for index, (column, label, data) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        if column in data:
            for (backbone, variant), series in data.groupby(["backbone_label", "variant_name"], sort=True):
                values = pd.to_numeric(series[column], errors="coerce").groupby(series["epoch"])
                mean, low, high = values.mean(), values.min(), values.max()
                line = axes.plot(mean.index, mean.values, marker="o", markersize=3,
                                 label=_series_label(backbone, variant, several, series["run_id"].nunique()))
                axes.fill_between(mean.index, low.values, high.values, alpha=0.2, color=line[0].get_color())
        if len(epochs) == 1:  # one epoch: a point between whole epochs, not an axis from 0.96 to 1.04
            axes.set_xlim(epochs[0] - 1, epochs[0] + 1)
        _finish_axes(axes, "epoch", label, f"{title}: {label} (band: min–max over seeds)", integer_x=True)
    return figure


def plot_learning_curves(runs: pd.DataFrame, out_dir: Path, warnings: list[str] | None = None) -> list[Path]:
    """One learning-curve figure per dataset."""
    written: list[Path] = []
    for dataset, data in runs.groupby("dataset", sort=True):
        figure = learning_curves_figure(data, str(dataset), warnings)
        if figure is not None:
            written += _save(figure, out_dir, f"learning_curves_{_slug(dataset)}")
    return written


def early_prediction_figure(table: pd.DataFrame, dataset: str, error: bool = False) -> Figure:
    """One dataset's early-prediction panel from ``early_prediction_table``.

    The attention modules and the full model form one line in order of cost (an early exit after
    each tap); the network's own classifier is not on that path (it needs the whole backbone but
    no module), so it is a separate star marker of the same colour.
    """
    metric = "error" if error else "top1"
    data = table[table["dataset"] == dataset]
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    several = data["backbone_label"].nunique() > 1
    split = "setting" in data and (data["setting"] != "").any()
    labels: list[tuple[float, float, str, Any]] = []
    for key, series in data.groupby(["backbone_label", "variant_name", *(["setting"] if split else [])], sort=True):
        backbone, variant = key[0], f"{key[1]} {key[2]}".strip() if split else key[1]
        series = series.dropna(subset=["flops"])
        n = int(series["n"].max()) if len(series) else 0
        path = series[series["source"] != NETWORK_CLASSIFIER].sort_values("flops", kind="stable")
        x, y = path["flops"] / 1e9, path[f"{metric}_mean"]
        (line,) = axes.plot(x, y, marker="o", label=_series_label(backbone, variant, several, n))
        axes.errorbar(x, y, yerr=path[f"{metric}_ci"].fillna(0.0), fmt="none", capsize=3, color=line.get_color())
        labels += [(xi, yi, str(source), line.get_color()) for xi, yi, source in zip(x, y, path["source"])]
        network = series[series["source"] == NETWORK_CLASSIFIER]
        if not network.empty:
            axes.plot(network["flops"] / 1e9, network[f"{metric}_mean"], linestyle="none", marker="*",
                      markersize=11, color=line.get_color(), label=f"{variant}: {NETWORK_CLASSIFIER}")
    axes.margins(x=0.12, y=0.12)
    # Labels right of and below their point, except in the right half of the plot (the full model
    # is the costliest point), where they go left and above: past the frame they would be cut off,
    # and below they would cover the network classifier's star.
    low, high = axes.get_xlim()
    for xi, yi, text, color in labels:
        right_half = xi > (low + high) / 2
        axes.annotate(text, (xi, yi), fontsize=7, xytext=(-4, 6) if right_half else (4, -10),
                      textcoords="offset points", ha="right" if right_half else "left", color=color)
    _finish_axes(axes, "GFLOPs to reach the classifier", "Error (%)" if error else "Top-1 (%)",
                 f"{dataset}: early prediction (bars: 95% CI)")
    return figure


def plot_early_prediction(runs: pd.DataFrame, out_dir: Path, error: bool = False) -> list[Path]:
    """Each module's accuracy alone against the cumulative FLOPs to its tap, then the full model."""
    table = early_prediction_table(runs, error=error)
    if table.empty:
        return []
    written: list[Path] = []
    for dataset in sorted(table["dataset"].unique()):
        written += _save(early_prediction_figure(table, dataset, error), out_dir,
                         f"early_prediction_{_slug(dataset)}")
    return written


def write_plots(runs: pd.DataFrame, out_dir: str | Path, error: bool = False,
                warnings: list[str] | None = None) -> list[Path]:
    """Every figure of the report into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    make_folder(out)
    if runs.empty:
        return []
    written: list[Path] = []
    written += plot_cost_accuracy(runs, out, error=error)
    written += plot_learning_curves(runs, out, warnings=warnings)
    written += plot_early_prediction(runs, out, error=error)
    return written


def critical_difference_figure(ranks: Ranks) -> Figure:
    """Demšar's critical-difference diagram: methods on an axis of average rank (1, the best, at the
    left), the Nemenyi critical difference as a bar above it, and a thick line under every group of
    methods the test does not tell apart."""
    average = ranks.average_ranks
    count = len(average)
    half = (count + 1) // 2
    figure = Figure(figsize=(7, 1.6 + 0.3 * half))
    axes = figure.add_subplot()
    axes.set_xlim(0.5, count + 0.5)
    axes.set_ylim(-(half + 1.5), 2.2)
    axes.axis("off")
    axes.hlines(0, 1, count, color="black", linewidth=1)
    for tick in range(1, count + 1):
        axes.vlines(tick, 0, 0.2, color="black", linewidth=1)
        axes.text(tick, 0.35, str(tick), ha="center", va="bottom", fontsize=8)
    critical = ranks.critical_difference
    axes.hlines(1.5, 1, min(1 + critical, count), color="black", linewidth=1.5)
    axes.text(1 + critical / 2, 1.65, f"CD = {critical:.2f}", ha="center", va="bottom", fontsize=8)
    for index, (method, rank) in enumerate(average.items()):
        left = index < half
        depth = -(index + 1 if left else count - index) * 0.8
        end = 0.6 if left else count + 0.4
        axes.plot([rank, rank, end], [0, depth, depth], color="black", linewidth=0.8)
        axes.text(end, depth, f"{method} ({rank:.2f}) " if left else f" ({rank:.2f}) {method}",
                  ha="right" if left else "left", va="center", fontsize=8)
    for level, group in enumerate(cliques(average, critical)):
        axes.hlines(-0.25 - 0.2 * level, average[group[0]] - 0.05, average[group[-1]] + 0.05, color="black",
                    linewidth=3)
    axes.set_title(f"Average rank over {len(ranks.datasets)} datasets (Friedman p = {ranks.friedman_p:.3g}; "
                   f"Nemenyi, alpha = {ALPHA:g})", fontsize=9)
    return figure


def plot_critical_difference(ranks: Ranks, out_dir: str | Path) -> list[Path]:
    """The critical-difference diagram as ``critical_difference.png`` and ``.svg`` in ``out_dir``."""
    out = Path(out_dir)
    make_folder(out)
    return _save(critical_difference_figure(ranks), out, "critical_difference")


THUMBNAILS_PER_SIDE = 6
"""Images shown for each side of a disagreement figure (the first by id: a stable choice)."""


def _split_images(data_root: Path, dataset: str, split: str, ids: list[int]) -> list[Any]:
    """The images ``ids`` of a prepared split (``a+b`` counts on from the first) as RGB PIL images."""
    import datasets

    from finebench.data.loader import (
        split_dirs,  # torch: only where thumbnails are drawn
    )

    meta = read_meta(data_root, dataset)
    stores = [datasets.load_from_disk(str(folder))
              for folder in split_dirs(store_dir(data_root, dataset), split, list(meta.get("splits", {})), dataset)]
    images = []
    for index in ids:
        for store in stores:
            if index < len(store):
                images.append(store[int(index)]["image"].convert("RGB"))
                break
            index -= len(store)
    return images


def disagreement_figure(a: str, b: str, title: str, sides: list[tuple[str, list[int], list[Any], list[str]]]) -> Figure:
    """Thumbnails in two rows, one per side: the images that side classifies right and the other wrong."""
    columns = max(1, max(len(images) for _, _, images, _ in sides))
    figure = Figure(figsize=(1.6 * columns, 2.1 * len(sides) + 0.4))
    figure.suptitle(title, fontsize=9)
    for row, (label, ids, images, captions) in enumerate(sides):
        for column in range(columns):
            axes = figure.add_subplot(len(sides), columns, row * columns + column + 1)
            axes.set_xticks([])
            axes.set_yticks([])
            if column < len(images):
                axes.imshow(images[column])
                axes.set_title(f"#{ids[column]}\n{captions[column]}", fontsize=6)
            else:
                axes.set_axis_off()
            if column == 0:
                axes.set_ylabel(label, fontsize=7)
                if not images:
                    axes.set_axis_on()
                    axes.text(0.5, 0.5, "none", ha="center", va="center", transform=axes.transAxes, fontsize=8)
    return figure


def plot_disagreement(pairs: list[Any], a: str, b: str, out_dir: str | Path,
                      warnings: list[str] | None = None) -> list[Path]:
    """One figure per compared pair (``report.disagree.Pair``): up to ``THUMBNAILS_PER_SIDE`` images
    only A gets right and as many only B does, read from the prepared store the runs tested on. A
    store that is not there leaves that figure out with a warning; the table stands without it."""
    out = Path(out_dir)
    make_folder(out)
    written: list[Path] = []
    for pair in pairs:
        try:
            dataset_section = read_json(RunDir.at(pair.a_dir).config_path).get("dataset") or {}
            data_root = resolve_data_root(None, dataset_section.get("root"))
            dataset = dataset_section.get("name") or pair.key.get("dataset")
            split = pair.a.split or dataset_section.get("test_split") or "test"
            classes = list(read_meta(data_root, str(dataset)).get("classes") or [])
        except (OSError, ValueError, AttributeError, FinebenchError) as error:
            if warnings is not None:
                warnings.append(f"{pair.a_dir}: the thumbnails are left out: the prepared store cannot be read ({error})")
            continue
        a_correct, b_correct = pair.a.correct(), pair.b.correct()
        sides = []
        for label, mask, winner in ((f"only {a} right", a_correct & ~b_correct, pair.a),
                                    (f"only {b} right", b_correct & ~a_correct, pair.b)):
            ids = [int(i) for i in pair.a.ids[mask][:THUMBNAILS_PER_SIDE]]
            loser = pair.b if winner is pair.a else pair.a
            position = np.searchsorted(pair.a.ids, ids)
            captions = [f"{_name(classes, int(winner.labels[i]))}\n(other: {_name(classes, int(loser.classes['test_top1'][i, 0]))})"
                        for i in position]
            try:
                images = _split_images(data_root, str(dataset), split, ids)
            except (OSError, ValueError, FinebenchError) as error:
                if warnings is not None:
                    warnings.append(f"{pair.a_dir}: the thumbnails are left out: the prepared store cannot be read ({error})")
                break
            sides.append((f"{label}\n({int(mask.sum())} images)", ids, images, captions))
        else:
            key = "_".join(_slug(value) for value in pair.key.values() if value is not None)
            where = " · ".join(f"{k} {v}" if k in ("seed", "fold") else str(v) for k, v in pair.key.items()
                               if v is not None)
            title = (f"{a} vs {b}: {where}\nimages only one of them classifies right "
                     "(caption: id, true class, the other's guess)")
            written += _save(disagreement_figure(a, b, title, sides), out,
                             f"disagree_{_slug(a)}_vs_{_slug(b)}_{key}")
    return written


def _name(classes: list[str], index: int) -> str:
    return str(classes[index]) if 0 <= index < len(classes) else str(index)
