"""The ``finebench`` command line: thin Typer commands that parse, then call one function each.

All work lives in the module for that job, so everything here is also callable from Python.
Errors a user can cause arrive as ``FinebenchError`` and leave as one line plus a non-zero exit;
``--debug`` keeps the traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from finebench.errors import FinebenchError

app = typer.Typer(
    name="finebench",
    help="Benchmarking suite for fine-grained image recognition: prepare datasets, train baseline "
    "and attention-augmented backbones from TOML recipes, and report paper-style tables.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    _state["debug"] = debug


# ---- models and cost (issue 2) -------------------------------------------------------------


@app.command("models")
def models_command(
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the backbones, their tap points (channels @ stride) and parameter counts."""
    import dataclasses
    import json

    from rich.table import Table

    from finebench.models import list_backbones

    infos = list_backbones()
    if json_output:
        typer.echo(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
        return
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
    Console().print(table)


@app.command("profile")
def profile_command(
    recipe: str | None = typer.Argument(None, help="A recipe TOML: profile its backbone, dataset and variants."),
    backbone: str | None = typer.Option(None, "--backbone", help="Backbone name (see `finebench models`)."),
    depth: int | None = typer.Option(None, "--depth", help="wrn / resnext_cifar depth."),
    width: int | None = typer.Option(None, "--width", help="wrn width k."),
    cardinality: int | None = typer.Option(None, "--cardinality", help="resnext_cifar cardinality."),
    base_width: int | None = typer.Option(None, "--base-width", help="resnext_cifar base width."),
    num_classes: int = typer.Option(10, "--num-classes", help="Number of classes N."),
    input_size: int = typer.Option(32, "--input-size", help="Square input side in pixels."),
    variant: list[str] = typer.Option(
        [], "--variant", help="attention, se or cbam; repeat for several (default: attention)."
    ),
    attention_depth: int = typer.Option(3, "--attention-depth", help="Attention modules AD."),
    attention_width: int = typer.Option(4, "--attention-width", help="Heads per module AW."),
    gates: str = typer.Option("softmax", "--gates", help="softmax, sigmoid or none."),
    output_mode: str = typer.Option("mixture", "--output-mode", help="mixture or 50."),
    reduction: int = typer.Option(16, "--reduction", help="SE / CBAM reduction."),
    overrides: list[str] = typer.Option([], "--set", help="Recipe override a.b=value (with a recipe)."),
    early: bool = typer.Option(False, "--early", help="Also the FLOPs of predicting with each module alone."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters and FLOPs of the baseline and each variant, with the overhead in percent.

    FLOPs are fvcore's: one multiply-add counts as one flop.
    """
    import json

    from rich.table import Table

    from finebench.profile import FLOP_CONVENTION, profile_recipe, profile_spec

    if recipe is not None:
        report = profile_recipe(recipe, overrides, early)
    elif backbone is None:
        raise FinebenchError("finebench profile: give a recipe path or --backbone NAME")
    else:
        given = {"depth": depth, "width": width, "cardinality": cardinality, "base_width": base_width}
        per_variant = {
            "attention": {"attention_depth": attention_depth, "attention_width": attention_width,
                          "gates": gates, "output_mode": output_mode},
            "se": {"reduction": reduction},
            "cbam": {"reduction": reduction},
        }
        variants = []
        for kind in variant or ["attention"]:
            options = per_variant.get(kind, {})
            label = f"attention-ad{attention_depth}-aw{attention_width}" if kind == "attention" else kind
            variants.append((label, kind, options))
        report = profile_spec(
            backbone, num_classes, input_size, variants, {k: v for k, v in given.items() if v is not None}, early
        )
    if json_output:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    options = ", ".join(f"{k}={v}" for k, v in report.backbone_options.items())
    name = f"{report.backbone} ({options})" if options else report.backbone
    table = Table(
        title=f"{name} · N={report.num_classes} · {report.input_size}×{report.input_size}",
        caption=f"FLOPs: {FLOP_CONVENTION}",
    )
    for column in ("variant", "params", "params +%", "FLOPs", "FLOPs +%"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in report.rows:
        table.add_row(
            row.label, f"{row.params:,}", f"{row.params_overhead_pct:+.2f}%",
            f"{row.flops / 1e9:.3f} G", f"{row.flops_overhead_pct:+.2f}%",
        )
    Console().print(table)
    baseline_flops = report.rows[0].flops
    for label, costs in report.early_prediction.items():
        early_table = Table(title=f"{label}: early prediction with one module (backbone up to its tap + module)")
        for column in ("tap", "FLOPs", "% of baseline"):
            early_table.add_column(column, justify="left" if column == "tap" else "right")
        for tap, flops in costs.items():
            early_table.add_row(tap, f"{flops / 1e9:.3f} G", f"{100 * flops / baseline_flops:.1f}%")
        Console().print(early_table)


# ---- datasets (issue 3) --------------------------------------------------------------------

from pathlib import Path  # noqa: E402  (kept inside this section: cli.py is shared by sections)
from typing import Optional  # noqa: E402

_DATA_ROOT_HELP = "Folder of prepared datasets (env FINEBENCH_DATA; default data/)."


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


@app.command("datasets")
def datasets_command(
    data_root: Path = typer.Option(Path("data"), "--data-root", envvar="FINEBENCH_DATA", help=_DATA_ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List every known dataset: classes, splits, protocol, terms, source, and whether it is prepared here."""
    import json

    from rich.table import Table

    from finebench.data.prepare import dataset_overview

    rows = dataset_overview(data_root)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    # prose columns only where they fit: rich would otherwise squeeze the names out of a narrow table
    wide = console.width >= 150
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
    console.print(table)


@app.command("prepare")
def prepare_command(
    name: str = typer.Argument(..., help="Dataset name (see `finebench datasets`)."),
    data_root: Path = typer.Option(Path("data"), "--data-root", envvar="FINEBENCH_DATA", help=_DATA_ROOT_HELP),
    source: str = typer.Option("official", "--source", help="official (URLs, --from, --mirror) or hub (Hugging Face Hub copy)."),
    from_path: Optional[Path] = typer.Option(None, "--from", help="Folder or file holding the official archives, or their extracted layout."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Base URL that replaces each source URL by <mirror>/<filename>."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already prepared (old store replaced only when the new one is complete)."),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="Resize so the longest image side is at most N pixels."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Download (or take --from), verify, extract and store a dataset under DATA_ROOT/NAME."""
    from finebench.data.prepare import prepare_dataset

    prepare_dataset(
        name, data_root, source=source, from_path=from_path, mirror=mirror, force=force, max_side=max_side, quiet=quiet
    )


# ---- training (issues 4, 6, 7) -------------------------------------------------------------


@app.command("run")
def run_command(
    recipe: str = typer.Argument(..., help="Recipe TOML file, e.g. recipes/quickstart.toml."),
    results_dir: str = typer.Option("results", "--results-dir", help="Runs land in RESULTS_DIR/<recipe>/<run-id>/."),
    data_root: str | None = typer.Option(None, "--data-root", help="Prepared datasets folder (default: the recipe's dataset.root, else data)."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override KEY=VALUE, e.g. --set train.epochs=1 (repeatable)."),
    only: list[str] = typer.Option([], "--only", help="Run only this variant (name or kind; repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded runs with ids, params and FLOPs; train nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output; the final table still prints."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Train again runs recorded as failed."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Train with N data-parallel workers on this machine (torchrun; one GPU each on CUDA). Leave it out under torchrun."),
    dist_timeout: float = typer.Option(1800.0, "--dist-timeout", help="Seconds a worker waits for the others before the job fails (distributed runs)."),
) -> None:
    """Train every variant × seed of a recipe; finished runs are skipped, interrupted ones resumed.

    Several workers: --nproc-per-node N on this machine, or torchrun ... -m finebench run RECIPE on each machine. The recipe's batch size is the global batch.
    """
    import time
    from pathlib import Path

    from finebench.recipe import load_recipe
    from finebench.runner import check_before_launch, outcome_table, run_recipe
    from finebench.train.distributed import distributed_context, launch_workers

    loaded = load_recipe(recipe, overrides)
    if nproc_per_node > 1 and not dry_run:
        check_before_launch(loaded, Path(data_root) if data_root else None, nproc_per_node)
        worker_argv = [
            *(["--debug"] if _state["debug"] else []), "run", recipe, "--results-dir", results_dir,
            *(["--data-root", data_root] if data_root else []),
            *[arg for value in overrides for arg in ("--set", value)],
            *[arg for value in only for arg in ("--only", value)],
            *(["--quiet"] if quiet else []), *(["--retry-failed"] if retry_failed else []),
            "--dist-timeout", str(dist_timeout),
        ]
        launch_workers(nproc_per_node, worker_argv)
        return
    started = time.perf_counter()
    train = loaded.recipe.train
    with distributed_context(train.device, sync_batchnorm=train.sync_batchnorm, timeout_s=dist_timeout) as ctx:
        outcomes = run_recipe(
            loaded,
            results_dir=Path(results_dir),
            data_root=Path(data_root) if data_root else None,
            only=only,
            dry_run=dry_run,
            quiet=quiet,
            retry_failed=retry_failed,
            ctx=ctx,
        )
    wall = time.perf_counter() - started
    title = f"{loaded.name}: {'planned runs' if dry_run else 'results'}"
    if not dry_run:
        title += f" (top-1/top-5 at the final epoch; best@ep is selected on the test set; wall {wall:.0f}s)"
    stdout = Console()
    table_console = stdout if stdout.is_terminal else Console(width=150)  # files and pipes: no wrapping
    if ctx.is_main:
        table_console.print(outcome_table(outcomes, title=title, dry_run=dry_run))
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


@app.command("bench")
def bench_command(
    recipe: str = typer.Argument(..., help="Recipe TOML file whose variants to time."),
    images: int = typer.Option(256, "--images", help="Images to time per variant (rounded up to whole batches)."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override KEY=VALUE, e.g. --set train.batch_size=64."),
    only: list[str] = typer.Option([], "--only", help="Time only this variant (name or kind; repeatable)."),
    data_root: str | None = typer.Option(None, "--data-root", help="Prepared datasets folder, for the epoch size (default: the recipe's dataset.root)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Time each variant's training step (random in-memory batches) and estimate the time per epoch."""
    import json

    from rich.table import Table

    from finebench.bench import bench_recipe, machine_line

    status = Console(stderr=True, quiet=json_output)
    rows = bench_recipe(
        recipe, overrides, images=images, only=only, data_root=data_root,
        on_variant=lambda name: status.print(f"timing {name} ...", highlight=False),
    )
    if json_output:
        typer.echo(json.dumps({"machine": machine_line(), "rows": [row.as_dict() for row in rows]}, indent=2))
        return

    def duration(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        hours, rest = divmod(round(seconds), 3600)
        return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

    table = Table(title=f"{recipe}: training-step speed", caption=machine_line())
    for column in ("variant", "batch", "precision", "img/s", "step", "compile", "images/epoch", "epoch", "run (all epochs)"):
        table.add_column(column, justify="left" if column in ("variant", "precision") else "right")
    for row in rows:
        table.add_row(
            row.variant, str(row.batch_size), row.precision + (" CL" if row.channels_last else ""),
            f"{row.images_per_s:,.1f}", f"{row.step_s * 1000:,.0f} ms", duration(row.compile_s),
            f"{row.train_images:,}" if row.train_images else "-", duration(row.epoch_s), duration(row.run_s),
        )
    Console().print(table)


# ---- report and attention maps (issue 5) ---------------------------------------------------


def _emit_table(table, fmt: str, output, title: str, wide: bool = False) -> None:  # noqa: ANN001 (pandas, Path)
    """A rich table on a terminal, plain text when piped or written to a file (-o)."""
    from finebench import report as report_module
    from finebench.results import atomic_write_bytes

    if output is not None:
        atomic_write_bytes(output, report_module.render(table, fmt, wide=wide).encode())
        err_console.print(f"wrote {output}", highlight=False)
        return
    stdout = Console()
    if fmt == "markdown" and stdout.is_terminal and not table.empty:
        text = report_module.wide_view(table) if wide else report_module.format_table(table)
        stdout.print(report_module.rich_table(text, title=title, caption=report_module.table_note(table)))
        return
    sys.stdout.write(report_module.render(table, fmt, wide=wide))
    if fmt == "markdown":
        sys.stdout.write(f"\n{report_module.table_note(table)}\n\n")


@app.command("report")
def report_command(
    paths: list[str] = typer.Argument(None, help="Results folders, run folders or summary.json files \\[default: results]."),
    by: list[str] = typer.Option(None, "--by", help="Grouping columns, repeated or comma-separated, e.g. --by dataset,AD,AW \\[default: dataset,backbone_label]."),
    fmt: str = typer.Option("markdown", "--format", "-f", help="markdown | csv | latex | json."),
    output: str = typer.Option(None, "--output", "-o", help="Write the table to this file (--early adds FILE_early)."),
    error: bool = typer.Option(False, "--error", help="Error rate instead of accuracy (the paper's CIFAR tables)."),
    reference: bool = typer.Option(False, "--reference", help="Show the authors' number for each experiment beside it."),
    reference_file: list[str] = typer.Option(None, "--reference-file", help="Reference CSV(s) instead of results/reference/."),
    best: bool = typer.Option(False, "--best", help="Best-epoch test accuracy (optimistic, as the authors' logs) instead of final."),
    early: bool = typer.Option(False, "--early", help="Also the early-prediction table: each module alone against its FLOPs."),
    plots: str = typer.Option(None, "--plots", help="Write accuracy/cost, learning-curve and early-prediction plots (PNG, SVG) here."),
    long: bool = typer.Option(False, "--long", help="One row per variant instead of the paper layout (one row per dataset × backbone, a column block per variant); the default with --by."),
) -> None:
    """Aggregate every run record into a paper-style table: mean ± std over seeds, gains, overheads."""
    from pathlib import Path

    from rich.markup import escape

    from finebench import report as report_module

    if fmt not in report_module.FORMATS:
        raise FinebenchError(f"--format {fmt!r}: expected one of {', '.join(report_module.FORMATS)}")
    result = report_module.make_report(
        paths or ["results"],
        by=report_module.split_by(by),
        error=error,
        reference=reference_file or reference,
        selection="best" if best else "final",
        early=early,
    )
    for warning in result.loaded.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if not result.loaded.failed.empty:
        err_console.print(f"[red]{len(result.loaded.failed)} failed run(s), not in the table:[/]")
        for row in report_module.failed_table(result.loaded.failed).itertuples(index=False):
            err_console.print(escape(f"  {row.Recipe}/{row.Run} {row.Dataset} {row.Backbone} {row.Variant} "
                                     f"seed {row.Seed}: {row.Reason}"), highlight=False, soft_wrap=True)
    output_path = Path(output) if output else None
    # the paper's layout unless the user groups by options (an ablation reads better one row per setting)
    wide = not long and not by
    _emit_table(result.table, fmt, output_path, "finebench report", wide=wide)
    if result.early is not None:
        early_path = output_path.with_name(f"{output_path.stem}_early{output_path.suffix}") if output_path else None
        _emit_table(result.early, fmt, early_path, "early prediction")
    if plots:
        from finebench.plots import write_plots

        plot_warnings: list[str] = []
        written = write_plots(result.loaded.runs, Path(plots), error=error, warnings=plot_warnings)
        for warning in plot_warnings:
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        err_console.print(f"wrote {len(written)} plot files to {plots}", highlight=False)


@app.command("attend")
def attend_command(
    run_dir: str = typer.Argument(..., help="A finished attention run folder (config.json, summary.json, last.pt)."),
    images: list[str] = typer.Argument(None, help="Image files to look at."),
    split: str = typer.Option(None, "--split", help="Also take images from this prepared split (e.g. test)."),
    n: int = typer.Option(16, "--n", help="How many images of --split, spread evenly over it."),
    out: str = typer.Option(None, "--out", help="Output folder \\[default: RUN_DIR/attention_maps]."),
    data_root: str = typer.Option(None, "--data-root", help="Prepared datasets folder \\[default: the run's dataset.root]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Draw each head's attention mask, the gates and every module's top predictions per image."""
    from finebench.attend import attend

    written = attend(run_dir, images or [], split=split, n=n, out_dir=out, data_root=data_root, device=device)
    folder = written[0].parent if written else out
    err_console.print(f"wrote {len(written)} attention map(s) to {folder}", highlight=False)


def main() -> None:
    """Console-script entry point: turn user errors into one clear line and exit code."""
    try:
        app(standalone_mode=False)
    except FinebenchError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as error:  # usage errors: typer >= 0.20 vendors click, so its exceptions are typer's
        import click

        if isinstance(error, typer.TyperException | click.ClickException):
            show = getattr(error, "show", None)
            if show is not None:
                show()
            else:
                err_console.print(f"[bold red]error:[/] {error.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
