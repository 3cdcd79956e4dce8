"""Every table and line ``finebench`` prints on a terminal, as rich tables: the CLI's listings, the run
command's plan and results, and the report's tables fitted to the terminal's width.

Pure presentation: each function takes what a command computed and returns a ``Table`` (or a line);
printing, files and exit codes stay with the caller. Only the recipe schema is imported, so the
report can use this module without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rich.table import Table
from rich.text import Text

from finebench.methods import MethodOptions, method_of, variant_of_config
from finebench.recipe import LoadedRecipe, RunSpec, held_out_folds
from finebench.train.threads import speed_conditions_differ

if TYPE_CHECKING:
    import pandas as pd


SPEED_MARK = "†"
"""Marks img/s figures measured under different threads or load (``speed_conditions_differ``): not ``*``,
which the report's gain column uses for significance."""


class RunOutcome(Protocol):
    """What a run's row shows (``finebench.outcomes.RunOutcome``), named here so this module imports no runner."""

    run: RunSpec
    status: str
    summary: dict[str, Any]
    state: str | None
    data: str | None


def backbone_label(backbone: str, options: Mapping[str, Any]) -> str:
    """``WRN-28-10`` for WRN, the registry name plus options for the rest."""
    if backbone == "wrn":
        return f"WRN-{options.get('depth', 28)}-{options.get('width', 10)}"
    extras = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{backbone}({extras})" if extras else backbone


def _fmt_count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def variant_settings(variant: MethodOptions) -> str:
    """A variant's options in the paper's terms: ``AD3 AW2 gates sigmoid output 50 reg_w 0.001``."""
    return method_of(variant).settings(variant)


def logged_settings(changes: Mapping[str, Mapping[str, Any]] | None) -> str:
    """What ``fidelity = "logged"`` changed for a variant (a dry run's "as logged" column):
    ``optimizer sgd, stem conv``; empty when nothing."""
    return ", ".join(f"{key} {value}" for part in ("train", "model", "model_options", "variant") for key, value in
                     (changes or {}).get(part, {}).items())


def _taps_cell(taps: Sequence[Mapping[str, Any]]) -> str:
    return " ".join(f"{tap['tap']}:{tap['channels']}@{tap['stride']}" for tap in taps) or "-"


def recipe_settings(loaded: LoadedRecipe) -> str:
    """Everything a run shares, on one line, so a dry run can be checked against a paper or a log."""
    recipe = loaded.recipe
    train, dataset, model = recipe.train, recipe.dataset, recipe.model
    lr = f"lr {train.lr:g}"
    if train.backbone_lr_mult != 1.0:
        lr += f" (backbone x{train.backbone_lr_mult:g})"
    schedule = train.schedule
    if train.schedule == "multistep":
        schedule = f"lr x{train.gamma:g} after epochs {'/'.join(map(str, train.milestones))}"
    elif train.schedule == "step":
        schedule = f"lr x{train.gamma:g} every {train.step_size} epochs"
    elif train.schedule == "exponential":
        schedule = f"lr x{train.gamma:g} per {train.step_size} epochs, continuously"
    if train.lr_updates == "epoch":
        schedule += " (updated at each epoch start)"
    optimizer = train.optimizer if train.optimizer == "adamw" else f"{train.optimizer} momentum {train.momentum:g}"
    batch = f"batch {train.batch_size}"
    if train.accumulation_steps > 1:
        batch += f" ({train.batch_size // train.accumulation_steps} x {train.accumulation_steps} accumulated)"
    folds = [fold for fold in held_out_folds(loaded) if fold is not None]
    data = f"{dataset.name} {loaded.input_size()}px"
    if folds:
        data += f", held-out folds {'/'.join(map(str, folds))} (one run each)"
    parts = [
        " / ".join(backbone_label(backbone, model.options) for backbone in model.backbones())
        + (f" ({model.pretrained})" if model.pretrained else ""),
        lr, optimizer, f"wd {train.weight_decay:g}", batch,
        f"{train.epochs} epochs" + (f" (the first {train.head_only_epochs} head only)" if train.head_only_epochs else ""),
        schedule,
        f"warm-up {train.warmup_epochs:g} epochs", f"eval every {train.eval_every}", f"precision {train.precision}",
    ]
    if train.batchnorm_group:
        parts.append(f"BatchNorm over groups of {train.batchnorm_group} images")
    parts.append(f"fidelity {recipe.fidelity}" + (" (log-time settings per variant below)" if recipe.logged
                                                   and recipe.fidelity == "logged" else ""))
    return " · ".join(parts)


def variant_table(outcomes: Sequence[RunOutcome], *, title: str) -> Table:
    """One row per variant of a dry run: its settings in the paper's terms, its taps and its cost,
    so a plan can be checked against a paper or a log before anything trains."""
    table = Table(title=title)
    several = len({outcome.run.backbone for outcome in outcomes}) > 1
    logged = any(outcome.run.config.get("logged") for outcome in outcomes)
    columns = ("variant", "settings") + ("as logged",) * logged + ("taps (channels@stride)", "params", "FLOPs")
    for column in ("backbone",) * several + columns:
        right = column in ("params", "FLOPs")
        table.add_column(column, justify="right" if right else "left", no_wrap=column not in ("variant", "as logged"))
    seen: set[tuple[str, str]] = set()
    for outcome in outcomes:
        run, summary = outcome.run, outcome.summary
        key = (run.backbone, run.variant_name)  # a recipe may list several backbones
        if key in seen:
            continue
        seen.add(key)
        as_logged = (logged_settings(run.config.get("logged")) or "-",) * logged
        table.add_row(*key[:several], run.variant_name, variant_settings(run.variant or variant_of_config(run.config)),
                      *as_logged,
                      _taps_cell(summary.get("taps") or []), _fmt_count(summary.get("params")),
                      _fmt_count(summary.get("flops")))
    return table


def outcome_table(outcomes: Sequence[RunOutcome], *, title: str, dry_run: bool = False) -> Table:
    """Variant beside variant: final-epoch test accuracy (no test-set selection), cost and time.

    The best epoch is shown only as ``best@epoch`` in its own column: it is selected on the test set.
    """
    table = Table(title=title)
    backbones = {outcome.run.backbone for outcome in outcomes}
    several = len(backbones) > 1  # a recipe that lists backbones: say which row is which
    with_folds = any(outcome.run.fold is not None for outcome in outcomes)
    columns = ["backbone"] * several + ["variant", *(["fold"] if with_folds else []), "seed", "run id"]
    if dry_run:
        columns += ["state", "dataset"]
    else:
        columns += ["status", "top-1", "top-5", "net top-1", "best@ep"]
    columns += ["params", "FLOPs"]
    marked = False
    if not dry_run:
        columns += ["time", "img/s", "threads", "load"]
        measured = [outcome.summary for outcome in outcomes if outcome.summary.get("images_per_s")]
        marked = speed_conditions_differ([(s.get("threads_used") or [], s.get("load_1min")) for s in measured])
        if marked:
            table.caption = (f"{SPEED_MARK} img/s measured with different thread counts or under a load from other processes "
                             "differing by more than a core: not a comparison of the variants")
            table.caption_justify = "left"
    for column in columns:
        left = column in ("backbone", "variant", "status", "run id", "state", "dataset")
        table.add_column(column, justify="left" if left else "right")

    def pct(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    for outcome in outcomes:
        summary = outcome.summary
        run = outcome.run
        cells = [run.backbone] * several + [
            run.variant_name, *([str(run.fold) if run.fold is not None else "-"] if with_folds else []),
            str(run.seed), run.run_id]
        if dry_run:
            cells += [outcome.state or "-", outcome.data or "-"]
        else:
            final = summary.get("final") or {}
            best = summary.get("best") or {}
            cells += [outcome.status, pct(final.get("test_top1")), pct(final.get("test_top5")),
                      pct(final.get("network_top1")), f"{pct(best.get('test_top1'))}@{best['epoch']}" if best else "-"]
        cells += [_fmt_count(summary.get("params")), _fmt_count(summary.get("flops"))]
        if not dry_run:
            seconds = summary.get("train_time_s")
            speed = f"{summary['images_per_s']:,.0f}{SPEED_MARK * marked}" if summary.get("images_per_s") else "-"
            load = summary.get("load_1min")
            cells += [f"{seconds:.0f}s" if isinstance(seconds, (int, float)) else "-", speed,
                      "/".join(map(str, summary.get("threads_used") or [])) or "-",
                      f"{load:.1f}" if isinstance(load, (int, float)) else "-"]
        table.add_row(*cells)
    return table


def rich_table(text: pd.DataFrame, title: str | None = None, caption: str | None = None) -> Table:
    """A rich Table of formatted cells: numbers never wrap, names fold rather than end in an ellipsis."""
    align = list(text.attrs.get("align", ["left"] * len(text.columns)))
    table = Table(title=title, caption=caption, header_style="bold", caption_justify="left")
    for column, side in zip(text.columns, align):
        table.add_column(str(column), justify=side, overflow="fold", no_wrap=side == "right")
    for row in text.itertuples(index=False):
        table.add_row(*(str(cell) for cell in row))
    return table


def terminal_tables(text: pd.DataFrame, width: int, title: str | None = None,
                    caption: str | None = None) -> list[Table | Text]:
    """The table as one or more rich tables that each fit ``width`` columns without cutting a cell.

    Name columns holding one value on every row move into the title; when the numbers still do
    not fit side by side, they are split over as few tables of even widths as fit, each repeating
    the name columns. ``caption`` (the notes) follows as text at the full width.
    """
    align = list(text.attrs.get("align", ["left"] * len(text.columns)))
    if len(text) > 1:
        constant = [c for c, side in zip(text.columns, align) if side == "left" and text[c].nunique() == 1]
        if constant and len(constant) < sum(side == "left" for side in align):
            lifted = " · ".join(f"{c} {text[c].iloc[0]}" for c in constant)
            title = f"{title}: {lifted}" if title else lifted
            align = [side for c, side in zip(text.columns, align) if c not in constant]
            text = text.drop(columns=constant)
    keys = [c for c, side in zip(text.columns, align) if side == "left"]
    values = [c for c, side in zip(text.columns, align) if side == "right"]

    def cost(column: str) -> int:  # cell width + padding + border; headers may wrap at spaces
        words = max((len(w) for w in str(column).split()), default=1)
        return max([words, *(len(str(v)) for v in text[column])]) + 3

    def split(budget: int) -> list[list[str]]:
        chunks: list[list[str]] = [[]]
        used = 0
        for column in values:
            if chunks[-1] and used + cost(column) > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(column)
            used += cost(column)
        return chunks

    budget = width - 1 - sum(cost(c) for c in keys)
    chunks = split(budget)
    if len(chunks) > 1:  # as many tables, but of even widths: no trailing table of one column
        even = -(-sum(cost(c) for c in values) // len(chunks))
        chunks = next((trial for target in range(even, budget + 1)
                       if len(trial := split(target)) == len(chunks)), chunks)
    tables = []
    for index, chunk in enumerate(chunks):
        part = text[keys + chunk].copy()
        part.attrs["align"] = ["left"] * len(keys) + ["right"] * len(chunk)
        suffix = f" ({index + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        tables.append(rich_table(part, title=f"{title or ''}{suffix}" or None))
    if caption:  # below the last table at the terminal's width, not wrapped to the table's
        tables.append(Text(caption, style="dim italic"))
    return tables


def backbones_table(infos: Sequence[Any]) -> Table:
    """``finebench models``: each backbone (``models.BackboneInfo``) with its defaults, taps and size."""
    table = Table(title="finebench backbones (params at the default options, incl. classifier)")
    for column in ("backbone", "defaults", "tap points (channels@stride)", "params"):
        table.add_column(column, justify="right" if column == "params" else "left", overflow="fold")
    for info in infos:
        defaults = [f"{k}={v}" for k, v in info.default_options.items()] + [f"N={info.num_classes}"]
        table.add_row(
            f"{info.name}\n[dim]{info.description}[/]", " ".join(defaults),
            " ".join(f"{t.name}:{t.channels}@{t.stride}" for t in info.tap_points),
            f"{info.params / 1e6:.2f}M",
        )
    table.caption = "Attend and Rectify uses the attention taps deepest first: " + "; ".join(
        f"{info.name}: {', '.join(info.attention_taps)}" for info in infos[:3]
    )
    return table


def taps_table(name: str, listing: Any) -> Table:
    """``finebench models --taps NAME``: one backbone's taps (``models.registry.TapListing``)."""
    table = Table(title=f"{name}: tap points", caption=(
        f"attention_depth = D uses the D deepest taps before the final stage; or name them: taps = [...]. "
        f"Final features: {listing.out_channels} channels."
    ))
    for column in ("tap", "channels", "stride", "joins at attention_depth"):
        table.add_column(column, justify="left" if column == "tap" else "right")
    for tap in listing.tap_points:
        depth = listing.attention_candidates.index(tap.name) + 1 if tap.name in listing.attention_candidates else None
        table.add_row(tap.name, str(tap.channels), str(tap.stride), str(depth) if depth else "-")
    return table


def profile_tables(report: Any, flop_convention: str) -> list[Table]:
    """``finebench profile``: the cost table (``profile.CostReport``), then one early-prediction table per variant."""
    options = ", ".join(f"{k}={v}" for k, v in report.backbone_options.items())
    name = f"{report.backbone} ({options})" if options else report.backbone
    table = Table(
        title=f"{name} · N={report.num_classes} · {report.input_size}×{report.input_size}",
        caption=f"FLOPs: {flop_convention}",
    )
    for column in ("variant", "taps (channels@stride)", "params", "params +%", "FLOPs", "FLOPs +%", "test passes",
                   "train passes"):
        table.add_column(column, justify="left" if column in ("variant", "taps (channels@stride)") else "right")
    for row in report.rows:
        table.add_row(
            row.label, " ".join(f"{t['tap']}:{t['channels']}@{t['stride']}" for t in row.taps) or "-",
            f"{row.params:,}", f"{row.params_overhead_pct:+.2f}%",
            f"{row.flops / 1e9:.3f} G", f"{row.flops_overhead_pct:+.2f}%",
            str(row.test_forward_passes), str(row.train_passes_per_image),
        )
    tables = [table]
    baseline_flops = report.rows[0].flops
    for label, costs in report.early_prediction.items():
        early_table = Table(title=f"{label}: early prediction with one module (backbone up to its tap + module)")
        for column in ("tap", "FLOPs", "% of baseline"):
            early_table.add_column(column, justify="left" if column == "tap" else "right")
        for tap, flops in costs.items():
            early_table.add_row(tap, f"{flops / 1e9:.3f} G", f"{100 * flops / baseline_flops:.1f}%")
        tables.append(early_table)
    return tables


def _human_bytes(size: int | None) -> str:
    if size is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _first_sentence(text: str) -> str:
    return text.split(". ", 1)[0].rstrip(".")


def datasets_table(rows: Sequence[Mapping[str, Any]], data_root: Any, *, wide: bool) -> Table:
    """``finebench datasets``; ``wide``: with the prose columns, which only fit a wide terminal
    (rich would otherwise squeeze the names out of a narrow table)."""
    table = Table(title=f"datasets (prepared in {data_root}; protocol and terms with --json)")
    table.add_column("name", no_wrap=True)
    table.add_column("classes", no_wrap=True, justify="right")
    table.add_column("splits")
    table.add_column("source")
    table.add_column("prepared")
    if wide:
        for column in ("terms", "protocol"):
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=40)
    for row in rows:
        splits = " / ".join(f"{k} {v:,}" for k, v in row["splits"].items()) or "folds"
        prepared = f"yes ({_human_bytes(row['size_bytes'])})" if row["prepared"] else "no"
        cells = [row["name"], str(row["classes"]), splits, row["source"], prepared]
        if wide:
            cells += [_first_sentence(row["terms"]), _first_sentence(row["protocol"])]
        table.add_row(*cells)
    return table


def duration(seconds: float | None) -> str:
    """``1h05m`` or ``4m09s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def bench_table(rows: Sequence[Any], *, title: str, caption: str) -> Table:
    """``finebench bench``: one row per variant (``bench.BenchRow``)."""
    table = Table(title=title, caption=caption)
    for column in ("variant", "batch", "precision", "img/s", "step", "compile", "images/epoch", "epoch", "run (all epochs)"):
        table.add_column(column, justify="left" if column in ("variant", "precision") else "right")
    for row in rows:
        table.add_row(
            row.variant, str(row.batch_size), row.precision + (" CL" if row.channels_last else ""),
            f"{row.images_per_s:,.1f}", f"{row.step_s * 1000:,.0f} ms", duration(row.compile_s),
            f"{row.train_images:,}" if row.train_images else "-", duration(row.epoch_s), duration(row.run_s),
        )
    return table


def eval_table(metrics: Mapping[str, Any]) -> Table:
    """``finebench eval``: the metrics of ``trained.evaluate_run``, one per row."""
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("loss", f"{metrics['test_loss']:.4f}"), ("top-1", f"{metrics['test_top1']:.2f}"),
            ("top-5", f"{metrics['test_top5']:.2f}"), ("mean per-class", f"{metrics['mean_class_top1']:.2f}")]
    if metrics.get("network_top1") is not None:
        rows.append(("network classifier top-1", f"{metrics['network_top1']:.2f}"))
    rows += [(f"module {tap} top-1", f"{value:.2f}") for tap, value in metrics["module_top1"].items()]
    if metrics.get("recorded_top1") is not None:
        rows.append(("top-1 the run recorded", f"{metrics['recorded_top1']:.2f}"))
    grouped = metrics.get("group_top1") or {}
    rows += [(f"{grouped['kind']} {group} top-1", "-" if value is None else f"{value:.2f}")
             for group, value in grouped.get("top1", {}).items()]
    for name, value in rows:
        table.add_row(name, value)
    return table


def run_tables(loaded: LoadedRecipe, outcomes: Sequence[RunOutcome], *, dry_run: bool, wall_s: float) -> list[Any]:
    """What ``finebench run`` prints at the end: for a dry run the shared settings (to check against a
    paper or a log) and the variants, then one row per run."""
    title = f"{loaded.name}: {'planned runs' if dry_run else 'results'}"
    if not dry_run:
        title += f" (top-1/top-5 at the final epoch; best@ep is selected on the test set; wall {wall_s:.0f}s)"
    parts: list[Any] = []
    if dry_run:
        parts += [f"{loaded.name}: {recipe_settings(loaded)}", variant_table(outcomes, title=f"{loaded.name}: variants")]
    return [*parts, outcome_table(outcomes, title=title, dry_run=dry_run)]
