"""The report's figures are written as non-empty PNG and SVG files, one set per dataset, and draw what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from test_report import ATTENTION_OPTIONS, write_run

from finebench import report
from finebench.report import plots


def _records(root: Path) -> Path:
    for seed, top1 in enumerate([90.0, 91.0]):
        write_run(root, variant="baseline", variant_name="baseline", seed=seed, top1=top1)
        write_run(root, variant="attention", variant_name="attention-ad3-aw4", seed=seed, top1=top1 + 1,
                  options=ATTENTION_OPTIONS, params=37_000_000, flops=5_250_000_000,
                  module_top1={"group2": 85.0, "group1": 70.0, "group0": 40.0},
                  module_flops={"group2": 5_200_000_000, "group1": 3_500_000_000, "group0": 1_750_000_000},
                  network_top1=89.0)
    write_run(root, variant="baseline", variant_name="baseline", seed=0, top1=70.0, dataset="cub200",
              backbone_label="WRN-50-2")
    return root


def test_write_plots_writes_every_figure_non_empty(tmp_path: Path) -> None:
    runs = report.load_runs([_records(tmp_path / "results")]).runs
    written = plots.write_plots(runs, tmp_path / "plots")
    names = {path.name for path in written}
    for stem in ("cost_accuracy_cifar10", "cost_accuracy_cub200", "learning_curves_cifar10",
                 "learning_curves_cub200", "early_prediction_cifar10"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    assert "early_prediction_cub200.png" not in names  # no attention run there
    for path in written:
        assert path.stat().st_size > 1000
    assert (tmp_path / "plots" / "cost_accuracy_cifar10.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "plots" / "early_prediction_cifar10.svg").read_bytes()[:2000]


def test_learning_curves_skip_bad_metric_lines_with_warning(tmp_path: Path) -> None:
    root = _records(tmp_path / "results")
    metrics = next(root.rglob("metrics.jsonl"))
    metrics.write_text(metrics.read_text() + '{"epoch": 4, "train_lo\n')
    runs = report.load_runs([root]).runs
    warnings: list[str] = []
    (tmp_path / "out").mkdir()
    written = plots.plot_learning_curves(runs, tmp_path / "out", warnings=warnings)
    assert written and any(str(metrics) in w for w in warnings)


def test_cli_report_plots_option(tmp_path: Path) -> None:
    root = _records(tmp_path / "results")
    done = subprocess.run([sys.executable, "-m", "finebench", "report", str(root), "--plots",
                           str(tmp_path / "figs")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "figs" / "cost_accuracy_cifar10.svg").stat().st_size > 0


def test_early_prediction_figure_orders_points_by_cost_and_draws_the_classifier_apart(tmp_path: Path) -> None:
    root = _records(tmp_path / "results")
    table = report.early_prediction_table(report.load_runs([root]).runs)
    figure = plots.early_prediction_figure(table, "cifar10")
    axes = figure.axes[0]
    path = next(line for line in axes.lines if line.get_label().startswith("attention-ad3-aw4 (n=2)"))
    star = next(line for line in axes.lines if "network classifier" in line.get_label())
    # The module taps and the full model, cheapest first: an early exit after each tap.
    assert list(path.get_xdata()) == [1.75, 3.5, 5.2, 5.25]
    assert list(path.get_ydata()) == [40.0, 70.0, 85.0, 91.5]
    assert star.get_marker() == "*" and star.get_linestyle() == "None"
    assert list(star.get_xdata()) == [5.24] and list(star.get_ydata()) == [89.0]
    labels = [text.get_text() for text in axes.texts]
    assert labels == ["group0", "group1", "group2", "full model"]


def test_learning_curves_use_whole_epochs_show_the_seed_spread_and_state_n(tmp_path: Path) -> None:
    runs = report.load_runs([_records(tmp_path / "results")]).runs
    figure = plots.learning_curves_figure(runs[runs["dataset"] == "cifar10"], "cifar10")
    loss = figure.axes[0]
    FigureCanvasAgg(figure).draw()
    assert all(float(tick).is_integer() for tick in loss.get_xticks())
    labels = [line.get_label() for line in loss.lines]
    assert labels == ["baseline (n=2)"]  # attention's mixture NLL + regulariser is another objective: its own panel
    assert [line.get_label() for line in figure.axes[1].lines] == ["attention-ad3-aw4 (n=2)"]
    # Seeds 0 and 1 differ by 0.1 in train loss: the band spans them at every epoch.
    band = loss.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() - band[:, 1].min() > 0.1


def test_every_early_prediction_label_is_inside_the_frame(tmp_path: Path) -> None:
    """Issue 22 item 10: the early-prediction plot cut the "full model" label at the frame's right edge."""
    table = report.early_prediction_table(report.load_runs([_records(tmp_path / "results")]).runs)
    figure = plots.early_prediction_figure(table, "cifar10")
    canvas = FigureCanvasAgg(figure)
    figure.tight_layout()
    canvas.draw()
    frame = figure.axes[0].bbox  # annotations are clipped at the axes' frame
    for text in figure.axes[0].texts:
        box = text.get_window_extent(canvas.get_renderer())
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text.get_text()


def test_the_cost_plot_keeps_every_point_inside_its_frame(tmp_path: Path) -> None:
    """Issue 22 item 10: the baseline point (the cheapest) sat on the axes' corner."""
    runs = report.load_runs([_records(tmp_path / "results")]).runs
    figure = plots.cost_accuracy_figure(runs[runs["dataset"] == "cifar10"], "cifar10")
    for axes in figure.axes:
        points = [xy for collection in axes.collections if isinstance(collection, PathCollection)
                  for xy in collection.get_offsets()]
        xs, ys = [x for x, _ in points], [y for _, y in points]
        (x0, x1), (y0, y1) = axes.get_xlim(), axes.get_ylim()
        pad_x, pad_y = 0.05 * (x1 - x0), 0.05 * (y1 - y0)
        assert x0 + pad_x < min(xs) and max(xs) < x1 - pad_x and y0 + pad_y < min(ys) and max(ys) < y1 - pad_y


def test_learning_curves_put_objectives_that_do_not_compare_on_panels_of_their_own(tmp_path: Path) -> None:
    """Issue 27: WS-DAN's loss (three CEs and a centre loss, about 11) and the baseline's CE (0.9) shared
    one axis. Cross-entropy methods share a panel; one epoch gets whole-epoch ticks around it."""
    root = tmp_path / "results"
    for variant in ("baseline", "se", "ws_dan", "pmg"):
        run_dir = write_run(root, variant=variant, variant_name=variant, seed=0, top1=80.0, epochs=1)
        loss = {"baseline": 0.9, "se": 0.8, "ws_dan": 11.2, "pmg": 4.0}[variant]
        text = (run_dir / "metrics.jsonl").read_text().replace('"train_loss": 2.0', f'"train_loss": {loss}')
        (run_dir / "metrics.jsonl").write_text(text)
    figure = plots.learning_curves_figure(report.load_runs([root]).runs, "cifar10")
    FigureCanvasAgg(figure).draw()
    panels = {axes.get_ylabel(): axes for axes in figure.axes}
    assert list(panels) == ["train loss: cross-entropy", "train loss: pmg objective", "train loss: ws_dan objective",
                            "test top-1 (%)"]
    shown = {label: sorted(line.get_label() for line in axes.lines) for label, axes in panels.items()}
    assert shown["train loss: cross-entropy"] == ["baseline (n=1)", "se (n=1)"]
    assert shown["train loss: ws_dan objective"] == ["ws_dan (n=1)"]
    assert panels["train loss: cross-entropy"].get_ylim()[1] < 2.0  # not stretched to WS-DAN's 11.2
    for axes in figure.axes:
        low, high = axes.get_xlim()
        assert (low, high) == (0.0, 2.0) and all(float(tick).is_integer() for tick in axes.get_xticks())
