"""The report's figures: accuracy against cost, learning curves and early prediction, per dataset.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas rather than pyplot, so
nothing depends on a display or on pyplot's global state (safe in threads and on servers).
Every figure is written as PNG (for a quick look) and SVG (for the paper).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finebench.report import early_prediction_table, load_metrics

SUFFIXES: tuple[str, ...] = ("png", "svg")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "unnamed"


def _save(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    written = []
    for suffix in SUFFIXES:
        path = out_dir / f"{stem}.{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        figure.savefig(tmp, format=suffix, dpi=150)
        tmp.replace(path)
        written.append(path)
    return written


def _series_label(backbone: str, variant: str, several_backbones: bool) -> str:
    return f"{backbone} {variant}" if several_backbones else str(variant)


def _finish_axes(axes: Axes, xlabel: str, ylabel: str, title: str) -> None:
    """The same labels, grid and legend on every panel; no empty legend box on a panel without data."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.has_data():
        axes.legend(fontsize=7)


def plot_cost_accuracy(runs: pd.DataFrame, out_dir: Path, error: bool = False) -> list[Path]:
    """Accuracy against FLOPs and against parameters: a faint point per run, mean ± std per variant."""
    written: list[Path] = []
    metric = "Error (%)" if error else "Top-1 (%)"
    for dataset, data in runs.groupby("dataset", sort=True):
        data = data.assign(value=100.0 - data["top1"] if error else data["top1"])
        several = data["backbone_label"].nunique() > 1
        figure = Figure(figsize=(11, 4.5))
        for index, (cost, unit, scale) in enumerate((("flops", "GFLOPs", 1e9), ("params", "M params", 1e6))):
            axes = figure.add_subplot(1, 2, index + 1)
            for (backbone, variant), series in data.groupby(["backbone_label", "variant_name"], sort=True):
                x = pd.to_numeric(series[cost], errors="coerce") / scale
                if x.isna().all():
                    continue
                label = _series_label(backbone, variant, several)
                points = axes.scatter(x, series["value"], alpha=0.35, s=14)
                std = series["value"].std(ddof=1) if len(series) > 1 else 0.0
                axes.errorbar(x.mean(), series["value"].mean(), yerr=std, fmt="o", capsize=4,
                              color=points.get_facecolor()[0][:3], label=f"{label} (n={len(series)})")
            _finish_axes(axes, unit, metric, f"{dataset}: {metric} vs {unit}")
        written += _save(figure, out_dir, f"cost_accuracy_{_slug(dataset)}")
    return written


def plot_learning_curves(runs: pd.DataFrame, out_dir: Path, warnings: list[str] | None = None) -> list[Path]:
    """Train loss and test top-1 per epoch, a line per variant (mean over its seeds)."""
    written: list[Path] = []
    for dataset, data in runs.groupby("dataset", sort=True):
        curves = []
        for run in data.itertuples():
            metrics, problems = load_metrics(run.run_dir)
            if warnings is not None:
                warnings.extend(problems)
            if metrics.empty:
                continue
            curves.append(metrics.assign(backbone_label=run.backbone_label, variant_name=run.variant_name))
        if not curves:
            continue
        table = pd.concat(curves, ignore_index=True)
        several = table["backbone_label"].nunique() > 1
        figure = Figure(figsize=(11, 4.5))
        for index, (column, label) in enumerate((("train_loss", "train loss"), ("test_top1", "test top-1 (%)"))):
            axes = figure.add_subplot(1, 2, index + 1)
            if column not in table:
                continue
            for (backbone, variant), series in table.groupby(["backbone_label", "variant_name"], sort=True):
                mean = pd.to_numeric(series[column], errors="coerce").groupby(series["epoch"]).mean()
                axes.plot(mean.index, mean.values, marker="o", markersize=3,
                          label=_series_label(backbone, variant, several))
            _finish_axes(axes, "epoch", label, f"{dataset}: {label}")
        written += _save(figure, out_dir, f"learning_curves_{_slug(dataset)}")
    return written


def plot_early_prediction(runs: pd.DataFrame, out_dir: Path, error: bool = False) -> list[Path]:
    """Each module's accuracy alone against the cumulative FLOPs to its tap, then the full model."""
    table = early_prediction_table(runs, error=error)
    if table.empty:
        return []
    metric = "error" if error else "top1"
    written: list[Path] = []
    for dataset, data in table.groupby("dataset", sort=True):
        figure = Figure(figsize=(6.5, 4.5))
        axes = figure.add_subplot(1, 1, 1)
        several = data["backbone_label"].nunique() > 1
        for (backbone, variant), series in data.groupby(["backbone_label", "variant_name"], sort=True):
            series = series.dropna(subset=["flops"])
            x = series["flops"] / 1e9
            std = series[f"{metric}_std"].fillna(0.0)
            line = axes.errorbar(x, series[f"{metric}_mean"], yerr=std, marker="o", capsize=3,
                                 label=_series_label(backbone, variant, several))
            for xi, yi, source in zip(x, series[f"{metric}_mean"], series["source"]):
                if not (math.isnan(xi) or math.isnan(yi)):
                    axes.annotate(str(source), (xi, yi), fontsize=7, xytext=(4, -10),
                                  textcoords="offset points", color=line.lines[0].get_color())
        _finish_axes(axes, "cumulative GFLOPs to the classifier", "Error (%)" if error else "Top-1 (%)",
                     f"{dataset}: early prediction")
        written += _save(figure, out_dir, f"early_prediction_{_slug(dataset)}")
    return written


def write_plots(runs: pd.DataFrame, out_dir: str | Path, error: bool = False,
                warnings: list[str] | None = None) -> list[Path]:
    """Every figure of the report into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if runs.empty:
        return []
    written: list[Path] = []
    written += plot_cost_accuracy(runs, out, error=error)
    written += plot_learning_curves(runs, out, warnings=warnings)
    written += plot_early_prediction(runs, out, error=error)
    return written

