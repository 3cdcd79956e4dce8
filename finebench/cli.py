"""The ``finebench`` command line: thin Typer commands that parse, then call one function each.

All work lives in the module for that job, so everything here is also callable from Python.
Errors a user can cause arrive as ``FinebenchError`` and leave as one line plus a non-zero exit;
``--debug`` keeps the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core
from rich.markup import escape

import finebench
from finebench.console import make_console
from finebench.errors import FinebenchError, Interrupted


def _follow_conventions(params: list[Any]) -> None:
    """Help as users of other CLIs expect it: a flag shows no ``<bool>`` type, an argument its NAME."""
    for param in params:
        if param.param_type_name == "option" and getattr(param, "is_bool_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = (param.name or "").upper()


class _Conventional:
    """Mixin for a Typer command or group: its parameters, help option included, follow the conventions."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _follow_conventions(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        _follow_conventions([option] if option is not None else [])
        return option


class ConventionalCommand(_Conventional, typer.core.TyperCommand):
    """A Typer command whose usage line reads ``RECIPE`` / ``[PATHS]...`` (click's convention), not ``{recipe}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar or (param.name or "").upper()
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class ConventionalGroup(_Conventional, typer.core.TyperGroup):
    pass


class FinebenchApp(typer.Typer):
    """Every command, also ones added later, gets ``ConventionalCommand``."""

    def command(
        self, *args: Any, cls: type[typer.core.TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return super().command(*args, cls=cls or ConventionalCommand, **kwargs)


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
    import dataclasses
    import json

    from finebench.models import list_backbones
    from finebench.terminal import backbones_table

    if taps is not None:
        _print_taps(taps, json_output)
        return
    if methods:
        _print_methods(json_output)
        return
    infos = list_backbones()
    if json_output:
        typer.echo(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
        return
    make_console().print(backbones_table(infos))
    make_console().print("Any timm or torchvision CNN works too: timm:<name>, torchvision:<name> (see --taps NAME).")


def _print_methods(json_output: bool) -> None:
    import json

    from rich.table import Table

    from finebench.methods import list_methods

    infos = list_methods()
    if json_output:
        typer.echo(json.dumps(infos, indent=2))
        return
    table = Table(title="finebench methods (a recipe's variants.kind; options with their defaults)")
    for column in ("kind", "options", "test passes", "train passes"):
        table.add_column(column, justify="right" if "passes" in column else "left", overflow="fold")
    for info in infos:
        options = " ".join(f"{k}={v!r}" for k, v in info["options"].items()) or "-"
        table.add_row(f"{info['kind']}\n[dim]{info['description']}[/]", options, str(info["test_forward_passes"]),
                      str(info["train_passes_per_image"]))
    make_console().print(table)


def _print_taps(name: str, json_output: bool) -> None:
    import dataclasses
    import json

    from finebench.models.registry import list_taps
    from finebench.terminal import taps_table

    listing = list_taps(name)
    if json_output:
        typer.echo(json.dumps(dataclasses.asdict(listing), indent=2))
        return
    make_console().print(taps_table(name, listing))


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
    from finebench.recipe import MAX_INPUT_SIZE

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
    import time

    from finebench.jobs import JsonProgress, stop_as_on_ctrl_c
    from finebench.plan import RunSelection, check_before_launch, parse_share
    from finebench.recipe import load_recipe
    from finebench.runner import exit_code, run_recipe
    from finebench.train.distributed import distributed_context, launch_workers

    if job_of:
        stop_as_on_ctrl_c()
    loaded = load_recipe(recipe, overrides)
    share_of = parse_share(share) if share else None
    selection = RunSelection(tuple(only), retry_failed, restart, discard_finished)
    run_argv = [
        *(["--debug"] if _state["debug"] else []), "run", recipe, "--results-dir", results_dir,
        *(["--data-root", data_root] if data_root else []),
        *[arg for value in overrides for arg in ("--set", value)],
        *selection.argv(), *(["--quiet"] if quiet else []), "--dist-timeout", str(dist_timeout),
    ]
    if sum([jobs > 1, submit is not None, nproc_per_node > 1]) > 1:
        raise FinebenchError("--jobs, --submit and --nproc-per-node: give one of them (--submit takes --gpus-per-run)")
    if submit is not None and not dry_run:
        _submit_run(loaded, run_argv, cluster=submit, results_dir=Path(results_dir),
                    data_root=Path(data_root) if data_root else None, selection=selection, partition=partition,
                    gpus_per_run=gpus_per_run, time_limit_min=time_limit, array_parallelism=array_parallelism,
                    array_tasks=array_tasks, quiet=quiet)
        return
    if nproc_per_node > 1 and not dry_run:
        check_before_launch(loaded, Path(data_root) if data_root else None, nproc_per_node)
        launch_workers(nproc_per_node, [*run_argv, *(["--share", share] if share else [])])
        return
    started = time.perf_counter()
    if jobs > 1 and not dry_run:
        from finebench.jobs import run_jobs

        outcomes, code = run_jobs(
            loaded, count=jobs, child_args=run_argv, results_dir=Path(results_dir),
            data_root=Path(data_root) if data_root else None, selection=selection, quiet=quiet,
        )
        _print_run_tables(loaded, outcomes, dry_run=False, wall=time.perf_counter() - started)
        if code:
            raise typer.Exit(code)
        return
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
            restart=restart,
            discard_finished=discard_finished,
            ctx=ctx,
            share=share_of,
            since=job_of,
            make_progress=JsonProgress if job_of else None,
        )
    if ctx.is_main and not job_of:  # a job of --jobs leaves the table to the command that started it
        _print_run_tables(loaded, outcomes, dry_run=dry_run, wall=time.perf_counter() - started)
    code = exit_code(outcomes)
    if code:
        raise typer.Exit(code)


def _submit_run(loaded: Any, run_argv: list[str], *, cluster: str, quiet: bool, **options: Any) -> None:
    """``run --submit``: queue the runs still to train as a job array; on this machine (``local``)
    wait for the tasks as a plain run waits for its runs, then print the same results table."""
    import time

    from finebench.cluster import submit as submit_array
    from finebench.plan import size_warnings, warn_sizes
    from finebench.runner import exit_code, outcomes_on_disk

    started = time.perf_counter()
    status = make_console(stderr=True, quiet=quiet, soft_wrap=True)
    submission = submit_array(loaded, run_argv, cluster=cluster, **options)
    skipped = submission.skipped
    if skipped:
        failed_note = " (--retry-failed resumes them)" if skipped["failed"] else ""
        status.print(f"{loaded.name}: skipped {', '.join(f'{n} {kind}' for kind, n in sorted(skipped.items()))} "
                     f"run(s) done earlier{failed_note}", highlight=False)
    if submission.shares and not quiet:
        warn_sizes(size_warnings(submission.plan, [run for share in submission.shares for run in share.runs]), status)
    if cluster != "local":
        ids = ", ".join(job.job_id for job in submission.jobs.values()) or "nothing (every run is finished or failed)"
        err_console.print(f"{loaded.name}: submitted {len(submission.jobs)} array task(s): {ids}; "
                          f"rerun the same command to resume what a dead task left", highlight=False, soft_wrap=True)
        return
    ended = []
    if submission.shares:
        status.print(f"{loaded.name}: {len(submission.shares)} array task(s) on this machine, at most "
                     f"{submission.parallelism} at once; logs in {submission.executor.folder}", highlight=False)
        ended = submission.wait(status)
    outcomes = outcomes_on_disk(submission.plan, submission.decisions)
    failed = [end for end in ended if end.error is not None]
    left = {run.run_id for end in failed for run in end.share.runs}
    for outcome in outcomes:
        if outcome.run.run_id in left and outcome.status == "locked":
            outcome.status = "task failed"  # resumable: the same command resumes it
    _print_run_tables(loaded, outcomes, dry_run=False, wall=time.perf_counter() - started)
    for end in failed:
        err_console.print(f"{loaded.name}: {end.share.describe()} failed ({end.error}); its log: {end.log}; "
                          "rerun the same command to resume its runs", highlight=False, soft_wrap=True)
    code = 1 if failed else exit_code(outcomes)
    if code:
        raise typer.Exit(code)


def _print_run_tables(loaded: Any, outcomes: Any, *, dry_run: bool, wall: float) -> None:
    from finebench.terminal import run_tables

    stdout = make_console()
    for part in run_tables(loaded, outcomes, dry_run=dry_run, wall_s=wall):
        if isinstance(part, str):
            stdout.print(part, soft_wrap=True, highlight=False)
        else:
            stdout.print(part)


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
    from finebench import report as report_module

    if fmt not in report_module.FORMATS:
        raise FinebenchError(f"--format {fmt!r}: expected one of {', '.join(report_module.FORMATS)}")
    if disagree and all(disagree):
        _report_disagreement(paths or ["results"], disagree, report_module.split_by(by), fmt, output, plots)
        return
    result = report_module.make_report(
        paths or ["results"],
        by=report_module.split_by(by),
        error=error,
        reference=reference_file or reference,
        selection="best" if best else "final",
        early=early,
        speed=speed,
        predictions=predictions,
    )
    ranked = report_module.rank_methods(result.loaded.runs, error=error) if ranks else None  # fails before any output
    reproduction = (report_module.reproduction_table(result.loaded.runs, report_module.reproduction_reference(reference_file))
                    if reproduce else None)  # as the ranks: a bad reference table stops before any output
    output_path = Path(output) if output else None
    # the paper's layout unless the user groups by options (an ablation reads better one row per setting)
    wide = not long and not by
    report_module.emit_table(result.table, fmt, output_path, "finebench report", wide=wide, status=err_console)
    if result.early is not None:
        early_path = output_path.with_name(f"{output_path.stem}_early{output_path.suffix}") if output_path else None
        report_module.emit_table(result.early, fmt, early_path, "early prediction", status=err_console)
    if result.predictions is not None:
        path = output_path.with_name(f"{output_path.stem}_predictions{output_path.suffix}") if output_path else None
        report_module.emit_table(result.predictions, fmt, path, "predictions", status=err_console)
    if groups:
        path = output_path.with_name(f"{output_path.stem}_groups{output_path.suffix}") if output_path else None
        result.loaded.warnings.extend(report_module.emit_groups(result.loaded.runs, fmt, path, error, err_console,
                                                                      data_root=data_root))
    if ranked is not None:
        ranks_path = output_path.with_name(f"{output_path.stem}_ranks{output_path.suffix}") if output_path else None
        report_module.emit_ranks(ranked, fmt, ranks_path, error=error, status=err_console)
    if reproduction is not None:
        path = output_path.with_name(f"{output_path.stem}_reproduce{output_path.suffix}") if output_path else None
        report_module.emit_reproduction(reproduction, fmt, path, status=err_console)
    # what the tables leave out, listed under them where it is read last
    for warning in result.loaded.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if not result.loaded.failed.empty:
        err_console.print(f"[red]{len(result.loaded.failed)} failed run(s), not in the table:[/]")
        for row in report_module.failed_table(result.loaded.failed).itertuples(index=False):
            err_console.print(escape(f"  {row.Recipe}/{row.Run} {row.Dataset} {row.Backbone} {row.Variant} "
                                     f"seed {row.Seed}: {row.Reason}"), highlight=False, soft_wrap=True)
    if not result.loaded.running.empty:
        err_console.print(f"[cyan]{len(result.loaded.running)} unfinished run(s), not in the table:[/]")
        for line in report_module.running_lines(result.loaded.running):
            err_console.print(escape(f"  {line}"), highlight=False, soft_wrap=True)
    if plots:
        from finebench.report.plots import plot_critical_difference, write_plots

        plot_warnings: list[str] = []
        written = write_plots(result.loaded.runs, Path(plots), error=error, warnings=plot_warnings)
        if ranked is not None:
            written += plot_critical_difference(ranked, Path(plots))
        for warning in plot_warnings:
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        err_console.print(f"wrote {len(written)} plot files to {plots}", highlight=False)


def _report_disagreement(paths: list[str], variants: tuple[str, str], by: list[str] | None, fmt: str,
                         output: str | None, plots: str | None) -> None:
    """``report --disagree A B``: the table, then (``--plots``) the thumbnails, then what was left out."""
    from finebench import report as report_module

    a, b = variants
    pairs = report_module.disagreement(paths, a, b, by)
    report_module.emit_disagreement(pairs, a, b, fmt, Path(output) if output else None, status=err_console)
    if plots:
        from finebench.report.plots import plot_disagreement

        warnings: list[str] = []
        written = plot_disagreement(pairs, a, b, Path(plots), warnings)
        for warning in warnings:
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        err_console.print(f"wrote {len(written)} plot files to {plots}", highlight=False)


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
