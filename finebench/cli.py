"""The ``finebench`` command line: thin Typer commands that parse, then call one function each.

All work lives in the module for that job, so everything here is also callable from Python.
Errors a user can cause arrive as ``FinebenchError`` and leave as one line plus a non-zero exit;
``--debug`` keeps the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

import finebench
from finebench.console import make_console
from finebench.errors import FinebenchError, Interrupted
from finebench.typer_conventions import ConventionalGroup, FinebenchApp

app = FinebenchApp(
    name="finebench",
    help="Benchmarking suite for fine-grained image recognition: prepare datasets, train baseline "
    "and attention-augmented backbones from TOML recipes, and report paper-style tables.",
    cls=ConventionalGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = make_console(stderr=True)
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"finebench {finebench.__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the finebench version and exit."
    ),
) -> None:
    _state["debug"] = debug


@app.command("models")
def models_command(
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    taps: str | None = typer.Option(
        None, "--taps", metavar="NAME",
        help="Show one backbone's taps, e.g. timm:convnext_tiny or torchvision:mobilenet_v3_large.",
    ),
    methods: bool = typer.Option(False, "--methods", help="List the methods (recipe variant kinds) and their options."),
) -> None:
    """List the backbones, their tap points (channels @ stride) and parameter counts."""
    from finebench.listing import print_models

    print_models(taps=taps, methods=methods, json_output=json_output)


@app.command("profile", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile_command(
    ctx: typer.Context,
    recipe: str | None = typer.Argument(None, help="A recipe TOML: profile its backbone, dataset and variants."),
    backbone: str | None = typer.Option(None, "--backbone", help="Backbone name (see `finebench models`)."),
    depth: int | None = typer.Option(None, "--depth", help="wrn / resnext_cifar depth."),
    width: int | None = typer.Option(None, "--width", help="wrn width k."),
    cardinality: int | None = typer.Option(None, "--cardinality", help="resnext_cifar cardinality."),
    base_width: int | None = typer.Option(None, "--base-width", help="resnext_cifar base width."),
    num_classes: int = typer.Option(10, "--num-classes", help="Number of classes N."),
    input_size: int = typer.Option(32, "--input-size", help="Square input side in pixels."),
    variant: list[str] = typer.Option(
        [], "--variant", help="A method (see `finebench models --methods`); repeat for several (default: attention). "
        "Its options follow as --option-name VALUE, e.g. --attention-depth 2 --gates sigmoid or --reduction 8.",
    ),
    overrides: list[str] = typer.Option([], "--set", help="Recipe override a.b=value (with a recipe)."),
    early: bool = typer.Option(False, "--early", help="Also the FLOPs of predicting with each module alone."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters and FLOPs of the baseline and each variant, with the overhead in percent.

    FLOPs are fvcore's: one multiply-add counts as one flop. Each method's options are flags named
    after its recipe options (`finebench models --methods` lists them).
    """
    import json

    from finebench.profile import (
        FLOP_CONVENTION,
        method_variants,
        profile_recipe_backbones,
        profile_spec,
    )
    from finebench.terminal import profile_tables


    method_flags = list(ctx.args)
    if recipe is not None and recipe.startswith("--"):  # an unknown option (a method's) taken as the recipe
        recipe, method_flags = None, [recipe, *method_flags]
    if recipe is not None and method_flags:
        raise typer.BadParameter(f"{' '.join(method_flags)}: method options go in the recipe (or --set)", ctx)
    try:  # an option no listed method has is a usage error, as an unknown option is
        variants = method_variants(variant, method_flags) if recipe is None else []
    except FinebenchError as error:
        raise typer.BadParameter(str(error).removeprefix("finebench profile: "), ctx) from None
    from finebench.recipe_sections import MAX_INPUT_SIZE

    if not 1 <= input_size <= MAX_INPUT_SIZE:  # the recipe's bound on dataset.input_size, for the same reason
        raise typer.BadParameter(f"{input_size}: expected 1 to {MAX_INPUT_SIZE} pixels a side", ctx,
                                 param_hint="'--input-size'")
    if recipe is None and overrides:  # nothing to override: say so rather than profile without it
        raise typer.BadParameter(f"--set {overrides[0]}: --set changes a recipe's settings; give the recipe "
                                 "(finebench profile RECIPE --set ...) or use --backbone's own options", ctx)
    if recipe is not None:
        reports = profile_recipe_backbones(recipe, overrides, early)
    elif backbone is None:
        raise FinebenchError("finebench profile: give a recipe path or --backbone NAME")
    else:
        given = {"depth": depth, "width": width, "cardinality": cardinality, "base_width": base_width}
        reports = [profile_spec(
            backbone, num_classes, input_size, variants, {k: v for k, v in given.items() if v is not None}, early
        )]
    if json_output:  # one backbone: its report, as always; a recipe listing several: a list of them
        dumped = [report.as_dict() for report in reports]
        typer.echo(json.dumps(dumped[0] if len(dumped) == 1 else dumped, indent=2))
        return
    for report in reports:
        for table in profile_tables(report, FLOP_CONVENTION):
            make_console().print(table)


_DATA_ROOT_HELP = "Folder of prepared datasets \\[default: $FINEBENCH_DATA, else data]."


@app.command("datasets")
def datasets_command(
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=_DATA_ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List every known dataset: classes, splits, protocol, terms, source, and whether it is prepared here."""
    import json

    from finebench.data.prepare import dataset_overview
    from finebench.data.root import resolve_data_root
    from finebench.terminal import datasets_table

    data_root = resolve_data_root(data_root)
    rows = dataset_overview(data_root)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = make_console()
    console.print(datasets_table(rows, data_root, wide=console.width >= 150))


@app.command("prepare")
def prepare_command(
    name: str = typer.Argument(..., help="Dataset name (see `finebench datasets`)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=_DATA_ROOT_HELP),
    source: str = typer.Option("official", "--source", help="official (URLs, --from, --mirror) or hub (Hugging Face Hub copy)."),
    from_path: Optional[Path] = typer.Option(None, "--from", help="Folder or file holding the official archives, or their extracted layout."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Base URL that replaces each source URL by <mirror>/<filename>."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already prepared (old store replaced only when the new one is complete)."),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="Resize so the longest image side is at most N pixels."),
    short_side: Optional[int] = typer.Option(
        None, "--short-side", help="Resize so the shortest image side is at most N pixels (256: training scale of the 224 recipes)."
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Processes for the per-image work (default: one per core; 1: in-process)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Download (or take --from), verify, and store a dataset under DATA_ROOT/NAME; image archives that can be are
    streamed, not extracted. Run again after an interruption, it continues from the last finished shard."""
    from finebench.data.prepare import prepare_dataset
    from finebench.data.root import resolve_data_root

    prepare_dataset(
        name, resolve_data_root(data_root), source=source, from_path=from_path, mirror=mirror, force=force,
        max_side=max_side, quiet=quiet, short_side=short_side, workers=workers,
    )


@app.command("run")
def run_command(
    recipe: str = typer.Argument(..., help="Recipe TOML file, e.g. recipes/quickstart.toml."),
    results_dir: str = typer.Option("results", "--results-dir", help="Runs land in RESULTS_DIR/<recipe>/<run-id>/."),
    data_root: str | None = typer.Option(None, "--data-root", help="Prepared datasets folder \\[default: $FINEBENCH_DATA, else the recipe's dataset.root, else data]."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override KEY=VALUE, e.g. --set train.epochs=1 (repeatable)."),
    only: list[str] = typer.Option([], "--only", help="Run only this variant (name or kind; repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded runs with ids, state (new, resumable, finished, failed), whether the dataset is prepared, params and FLOPs; train nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output; the final table still prints."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Resume runs recorded as failed from their last checkpoint."),
    restart: bool = typer.Option(False, "--restart", help="Discard the checkpoint and records of every selected run that is not finished (interrupted, failed or unreadable) and train it from epoch 1; finished runs are kept."),
    discard_finished: bool = typer.Option(False, "--discard-finished", help="With --restart: also discard runs whose records show every epoch done (their summary was damaged), training them again."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Train with N data-parallel workers on this machine (torchrun; one GPU each on CUDA). Leave it out under torchrun."),
    dist_timeout: float = typer.Option(1800.0, "--dist-timeout", help="Seconds a worker waits for the others before the job fails (distributed runs)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Train N runs at once, one process each (round-robin over the visible GPUs; on a CPU each gets its share of the cores)."),
    submit: str | None = typer.Option(None, "--submit", help="slurm: submit the runs as a job array (submitit, pip install 'finebench\\[slurm]'); local: the same path on this machine."),
    partition: str | None = typer.Option(None, "--partition", help="Slurm partition (with --submit)."),
    gpus_per_run: int = typer.Option(1, "--gpus-per-run", min=0, help="GPUs per array task; more than one trains each run with DDP (with --submit)."),
    time_limit: int = typer.Option(24 * 60, "--time-limit", min=1, help="Minutes per array task; one that reaches it is requeued and resumes (with --submit)."),
    array_parallelism: int | None = typer.Option(None, "--array-parallelism", min=1, help="Array tasks running at once \\[default: all] (with --submit)."),
    array_tasks: int | None = typer.Option(None, "--array-tasks", min=1, help="Array tasks; task i takes the runs at positions i mod N \\[default: one per run] (with --submit)."),
    share: str | None = typer.Option(None, "--share", hidden=True, help="I/N: only the runs at positions I mod N (one array task)."),
    job_of: str | None = typer.Option(None, "--job-of", hidden=True, help="One job of --jobs started at this UTC time: progress as JSON lines, no table."),
) -> None:
    """Train every variant × seed of a recipe; finished runs are skipped, interrupted ones resumed.

    Several runs at once: --jobs N on this machine, --submit slurm on a cluster. Several workers for each run: --nproc-per-node N on this machine, or torchrun ... -m finebench run RECIPE on each machine. The recipe's batch size is the global batch.

    Exit status: 0 when every run is finished (now or earlier); 1 when a run failed (its loss became non-finite, now or earlier) or a disk error stopped it; 2 for bad input (recipe, options, unreadable records); 3 when runs were left to another process training them; 130 when interrupted (Ctrl-C), the run then resumes on the next invocation. With --jobs: 1 also when a job was killed (its run resumes); 143 for SIGTERM, 129 for a hangup.
    """
    from finebench.launch import Launch, run_recipe_command
    from finebench.plan import RunSelection

    code = run_recipe_command(
        recipe, overrides, results_dir=results_dir, data_root=data_root,
        selection=RunSelection(tuple(only), retry_failed, restart, discard_finished),
        launch=Launch(nproc_per_node=nproc_per_node, dist_timeout=dist_timeout, jobs=jobs, submit=submit,
                      partition=partition, gpus_per_run=gpus_per_run, time_limit_min=time_limit,
                      array_parallelism=array_parallelism, array_tasks=array_tasks, share=share, job_of=job_of),
        dry_run=dry_run, quiet=quiet, debug=_state["debug"],
    )
    if code:
        raise typer.Exit(code)


@app.command("bench")
def bench_command(
    recipe: str = typer.Argument(..., help="Recipe TOML file whose variants to time."),
    images: int = typer.Option(256, "--images", help="Images to time per variant (rounded up to whole batches)."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override KEY=VALUE, e.g. --set train.batch_size=64."),
    only: list[str] = typer.Option([], "--only", help="Time only this variant (name or kind; repeatable)."),
    data_root: str | None = typer.Option(None, "--data-root", help="Prepared datasets folder, for the epoch size \\[default: $FINEBENCH_DATA, else the recipe's dataset.root, else data]."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    jobs: int = typer.Option(1, "--jobs", help="Estimate the whole recipe with N runs at once (as run --jobs N)."),
    job_slowdown: float = typer.Option(1.0, "--job-slowdown", help="How much slower one job trains beside the others (1 = the optimistic bound; measure it with benchmarks/jobs.py)."),
) -> None:
    """Time each variant's training step (random in-memory batches), estimate the time per epoch and to the finished table."""
    import json
    from collections import Counter

    from finebench.bench import bench_recipe, machine_line, recipe_estimate
    from finebench.recipe import expand_runs, load_recipe
    from finebench.terminal import bench_table

    status = make_console(stderr=True, quiet=json_output)
    rows = bench_recipe(
        recipe, overrides, images=images, only=only, data_root=data_root,
        on_variant=lambda name: status.print(f"timing {name} ...", highlight=False),
    )
    runs = Counter(run.variant_name for run in expand_runs(load_recipe(recipe, overrides), only))
    estimate = recipe_estimate(rows, runs, jobs=jobs, job_slowdown=job_slowdown)
    if json_output:
        typer.echo(json.dumps({"machine": machine_line(), "rows": [row.as_dict() for row in rows],
                               "recipe_estimate": vars(estimate)}, indent=2))
        return

    make_console().print(bench_table(rows, title=f"{recipe}: training-step speed", caption=machine_line()))
    make_console().print(estimate.describe(), highlight=False)


@app.command("report")
def report_command(
    paths: list[str] = typer.Argument(None, help="Results folders, run folders or summary.json files \\[default: results]."),
    by: list[str] = typer.Option(None, "--by", help="Grouping columns, repeated or comma-separated, e.g. --by dataset,AD,AW \\[default: dataset,backbone_label]."),
    fmt: str = typer.Option("markdown", "--format", "-f", help="markdown | csv | latex | json."),
    output: str = typer.Option(None, "--output", "-o", help="Write the table to this file (--early adds FILE_early, --predictions FILE_predictions, --groups FILE_groups)."),
    error: bool = typer.Option(False, "--error", help="Error rate instead of accuracy (the paper's CIFAR tables)."),
    reference: bool = typer.Option(False, "--reference", help="The authors' number beside each row whose settings their log states (last epoch; best epoch with --best)."),
    reference_file: list[str] = typer.Option(None, "--reference-file", help="Reference CSV(s) instead of results/reference/."),
    best: bool = typer.Option(False, "--best", help="Best-epoch test accuracy (optimistic, as the authors' logs) instead of final."),
    early: bool = typer.Option(False, "--early", help="Also the early-prediction table: each module alone against its FLOPs."),
    plots: str = typer.Option(None, "--plots", help="Write accuracy/cost, learning-curve and early-prediction plots (PNG, SVG) here."),
    speed: bool = typer.Option(False, "--speed", help="Also the training throughput (img/s; depends on the machine's load at the time)."),
    predictions: bool = typer.Option(False, "--predictions", help="Also every prediction a method records beside its top-1 (PMG's heads and their sum, WS-DAN's crop-refined prediction)."),
    groups: bool = typer.Option(False, "--groups", help="Also top-1 per group of test images (iNat's supercategory) of each method, from the runs' per-image predictions and the store's group column."),
    data_root: str = typer.Option(None, "--data-root", help="With --groups: the prepared datasets folder \\[default: $FINEBENCH_DATA, else the root each run recorded]."),
    long: bool = typer.Option(False, "--long", help="One row per variant instead of the paper layout (one row per dataset × backbone, a column block per variant); the default with --by."),
    ranks: bool = typer.Option(False, "--ranks", help="Also each method's average rank across datasets, the Friedman test and the Nemenyi critical difference (with --plots, its diagram)."),
    reproduce: bool = typer.Option(False, "--reproduce", help="Also each reference number (paper, official code, re-implementation; --reference-file or results/reference/) beside finebench's mean ± CI under the same selection rule, the difference and whether it lies inside the interval."),
    disagree: Optional[tuple[str, str]] = typer.Option(None, "--disagree", metavar="A B", help="Instead: variants A and B image by image, per dataset, backbone and seed: McNemar's exact test and a paired bootstrap CI of the top-1 difference (with --plots, thumbnails of the images only one gets right)."),
) -> None:
    """Aggregate every run record into a paper-style table: mean ± 95% CI over seeds (and folds),
    mean per-class accuracy, paired gains with p-values, overheads."""
    from finebench.report.command import report_command as make_tables

    make_tables(paths or ["results"], by=by, fmt=fmt, output=output, error=error, reference=reference,
                reference_file=reference_file, best=best, early=early, plots=plots, speed=speed,
                predictions=predictions, groups=groups, data_root=data_root, long=long, ranks=ranks,
                reproduce=reproduce, disagree=disagree)


@app.command("attend")
def attend_command(
    run_dir: str = typer.Argument(..., help="A finished run folder (config.json, summary.json, last.pt) of a method that draws attention maps: attention (Attend and Rectify), ws_dan or cal."),
    images: list[str] = typer.Argument(None, help="Image files to look at."),
    split: str = typer.Option(None, "--split", help="Also take images from this prepared split (e.g. test)."),
    n: int = typer.Option(16, "--n", help="How many images of --split, spread evenly over it."),
    out: str = typer.Option(None, "--out", help="Output folder \\[default: RUN_DIR/attention_maps]."),
    data_root: str = typer.Option(None, "--data-root", help="Prepared datasets folder \\[default: $FINEBENCH_DATA, else the root recorded in the run's config.json, else data]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Draw a trained model's attention maps and its top predictions per image: each head's mask, the gates
    and every module's prediction for attention runs; the attention maps, the test crop box and the test
    prediction beside each pass's for ws_dan and cal runs."""
    from finebench.attend import attend

    written = attend(run_dir, images or [], split=split, n=n, out_dir=out, data_root=data_root, device=device)
    folder = written[0].parent if written else out
    err_console.print(f"wrote {len(written)} attention map(s) to {folder}", highlight=False)


@app.command("eval")
def eval_command(
    run_dir: str = typer.Argument(..., help="A run folder (config.json, summary.json, last.pt)."),
    split: str = typer.Option(None, "--split", help="Prepared split to evaluate \\[default: the run's test split]."),
    data_root: str = typer.Option(None, "--data-root", help="Prepared datasets folder \\[default: the run's dataset.root]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON (with the confusion matrix) instead of a table."),
) -> None:
    """Evaluate a run's checkpoint again and print the metrics its final evaluation printed."""
    import json

    from finebench.terminal import eval_table
    from finebench.trained import evaluate_run

    metrics = evaluate_run(run_dir, split=split, data_root=data_root, device=device)
    if json_output:
        typer.echo(json.dumps(metrics, indent=2))
        return
    console = make_console()
    console.print(f"{run_dir}: {metrics['split']} split, {metrics['images']:,} images, {metrics['precision']}",
                  highlight=False, soft_wrap=True)
    console.print(eval_table(metrics))
    err_console.print(f"wrote {metrics['predictions_file']}", highlight=False, soft_wrap=True)


@app.command("export")
def export_command(
    run_dir: str = typer.Argument(..., help="A run folder (config.json, summary.json, last.pt)."),
    out: str = typer.Option(None, "--out", help="Output folder \\[default: RUN_DIR/export]."),
    data_root: str = typer.Option(None, "--data-root", help="Prepared datasets folder, whose meta.json settles the test transform \\[default: the run's dataset.root]."),
) -> None:
    """Write the run's model as model.safetensors plus a config.json that finebench.trained.load_exported rebuilds."""
    from finebench.trained import export_run

    written = export_run(run_dir, out, data_root=data_root)
    err_console.print(f"wrote {', '.join(str(path) for path in written)}", highlight=False)


def main() -> None:
    """Console-script entry point: one line and a non-zero exit for every error a user can cause.

    ``app(standalone_mode=False)`` returns a command's exit code (``typer.Exit``, 130 for Ctrl-C)
    instead of exiting, so it is passed on here; without it every run would exit 0.
    """
    try:
        code = app(standalone_mode=False)
    except FinebenchError as error:
        if _state["debug"]:
            raise
        prefix = "interrupted:" if isinstance(error, Interrupted) else "[bold red]error:[/]"
        err_console.print(f"{prefix} {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except OSError as error:  # a full disk, a read-only or missing folder: str() names the file
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
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
    if code == 130:
        err_console.print("interrupted", highlight=False)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
