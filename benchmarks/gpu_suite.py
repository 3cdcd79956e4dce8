"""The GPU benchmark of issue 15 in one command, for a machine with one GPU: under 6 minutes.

It prints, as each figure is measured:

1. ``peak``: the bf16 matmul peak of the device (the roof of every MFU below).
2. ``eager``: finebench's training step (``TrainStep``) against a hand-written PyTorch loop in the
   same process on the same model and batch; Attend and Rectify's time overhead beside its FLOP
   overhead (WRN-28-10 at N = 10 and 100, WRN-50-2 at 224 with N = 120); channels_last against
   NCHW; MFU of every step; evaluation speed.
3. ``compiled``: the same as 2 with ``torch.compile`` (WRN-28-10, N = 10), compile time apart.
4. ``loader``: training batches/s of the data path at 224 from synthetic 500x375 JPEGs it writes
   itself (the GPU JPEG path ``finebench.data.gpu_decode``, timed by ``finebench.data.throughput``,
   where it exists, else the worker path) against the WRN-50-2 + A&R step it feeds.
5. ``compiled_more``: compiled WRN-28-10 N = 100 and WRN-50-2, while the time budget lasts.
6. ``table``: the estimated time of the paper's CIFAR-10 table (baseline + A&R, 3 seeds, 200
   epochs) with the defaults, from the figures above.

It gets one shot on a lent machine, so each part runs in its own process with a time limit taken
from one global budget: a part that fails, hangs or runs out of time is reported in one line and
the next part runs. Everything comes from the project (random weights, synthetic data); nothing
is downloaded. The figures of earlier parts pass to later ones through a JSON file (``--state``).

    python benchmarks/gpu_suite.py                     # the whole suite, 345 s budget
    python benchmarks/gpu_suite.py --parts eager,table  # some parts
    python benchmarks/gpu_suite.py --quick             # smoke run with tiny models (CPU: the slow tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finebench.bench import Timing, calls_for_duration, machine_line, paired_ratio, synthetic_batch, time_side_by_side
from finebench.profile import profile_model
from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.runtime import autocast, resolve_channels_last, resolve_compile, resolve_precision, synchronize_device
from finebench.train.step import build_train_step
from finebench.train.optim import build_optimizer

PARTS = ("peak", "eager", "compiled", "loader", "compiled_more", "table")
PART_LIMIT_S = {"peak": 40, "eager": 150, "compiled": 240, "loader": 120, "compiled_more": 300}
"""Most seconds a part may take (each is also capped by what is left of the global budget)."""
RESERVED_S = {"loader": 50}
"""Seconds kept back for a later part while an earlier one runs, so a slow compile cannot starve it."""
MIN_PART_S = 15
"""A part is not started with less time than this left."""
ATTENTION = {"attention_depth": 3, "attention_width": 4}
TARGET_POINTS = 5.0
"""Issue 15: A&R time overhead at most its FLOP overhead + 5 points, eager and compiled."""
LOADER_TARGET = 1.5
"""Issue 15: the loader delivers at least 1.5x the images/s of the WRN-50-2 + A&R step it feeds."""
CIFAR_TABLE = {"seeds": 3, "epochs": 200, "train_images": 50_000, "test_images": 10_000}


@dataclass(frozen=True)
class Config:
    """One backbone at one input size and batch; ``classes`` are the head sizes to compare."""

    key: str
    """"cifar" or "fine": where its results are filed."""
    label: str
    backbone: str
    options: dict[str, Any]
    input_size: int
    batch: int
    classes: tuple[int, ...]


def configs(quick: bool) -> dict[str, Config]:
    if quick:  # the same code on models a 2-core CPU runs in seconds
        return {
            "cifar": Config("cifar", "WRN-10-1 (quick)", "wrn", {"depth": 10, "width": 1}, 32, 4, (10, 100)),
            "fine": Config("fine", "ResNet-18 64px (quick)", "resnet18", {}, 64, 2, (120,)),
        }
    return {
        "cifar": Config("cifar", "WRN-28-10", "wrn", {"depth": 28, "width": 10}, 32, 128, (10, 100)),
        "fine": Config("fine", "WRN-50-2 224", "wide_resnet50_2", {}, 224, 128, (120,)),
    }


def say(text: str = "") -> None:
    print(text, flush=True)


class RowPrinter:
    """Prints a header once, then each row the moment it is measured (one shot: partial output counts).

    ``columns`` are (header, width); a negative width left-aligns (text), a positive one right-aligns.
    """

    def __init__(self, columns: list[tuple[str, int]]) -> None:
        self.widths = [width for _, width in columns]
        say(self.line([header for header, _ in columns]))

    def line(self, cells: list[Any]) -> str:
        return "  ".join(str(cell).ljust(-w) if w < 0 else str(cell).rjust(w)
                         for cell, w in zip(cells, self.widths, strict=True)).rstrip()

    def __call__(self, *cells: Any) -> None:
        say(self.line(list(cells)))


# ---- measurement helpers ---------------------------------------------------------------------


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_matmul_peak(quick: bool) -> float:
    """Best FLOP/s of a square bf16 matmul (2·n³ flops), the roof for MFU."""
    dev, size = device(), (512 if quick else 8192)
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    timing = time_side_by_side({"mm": lambda: torch.mm(a, b)}, items=1, warmup=3, repeats=3 if quick else 10,
                               calls_per_repeat=1 if quick else 10, device=dev)["mm"]
    return 2 * size**3 * (1 if quick else 10) / min(timing.seconds)


def loss_of(output: Any, labels: torch.Tensor, attention: bool) -> torch.Tensor:
    """The loss a user writes by hand: NLL on the mixture + regulariser (A&R), else cross-entropy."""
    if not attention:
        return F.cross_entropy(output.logits.float(), labels)
    loss = F.nll_loss(output.log_probs.float(), labels)
    return loss + output.reg_loss.float() if output.reg_loss is not None else loss


def step_flops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, attention: bool, precision: str) -> int:
    """Forward + backward FLOPs of one step (torch's FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast(images.device, precision):
            loss = loss_of(model(images), labels, attention)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def hand_written_step(model: torch.nn.Module, train: TrainSection, dev: torch.device, precision: str,
                      attention: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A plain PyTorch training loop's body, with the engine's optimiser settings."""
    optimizer = build_optimizer(model, train)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(dev, precision):
            loss = loss_of(model(images), labels, attention)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed_first_call(run: Callable[[], Any], dev: torch.device) -> float:
    synchronize_device(dev)
    start = time.perf_counter()
    run()
    synchronize_device(dev)
    return time.perf_counter() - start


@dataclass
class Candidate:
    name: str
    run: Callable[[], Any]
    flops: int
    first_call_s: float = 0.0


def make_candidates(config: Config, num_classes: int, variant: str, *, compiled: bool, channels_last: bool,
                    with_loop: bool) -> list[Candidate]:
    """The engine's step (and a hand-written loop on the same model) for one variant and memory format."""
    dev = device()
    attention = variant == "attention"
    torch.manual_seed(0)
    model = build_model(config.backbone, num_classes, variant, ATTENTION if attention else None, config.options)
    train = TrainSection(epochs=1, batch_size=config.batch, schedule="constant", compile=compiled,
                         channels_last=channels_last, device=dev.type)
    step = build_train_step(model, train, method=get_method(variant), steps_per_epoch=100)
    images, labels = synthetic_batch(config.batch, config.input_size, num_classes, device=dev)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    flops = step_flops(model, images, labels, attention, step.precision)
    fmt = "CL" if channels_last else "NCHW"
    mode = "compiled" if compiled else "eager"
    key = f"{variant}/{fmt}/{mode}"
    engine = Candidate(f"engine {key}", lambda: step(images, labels), flops)
    engine.first_call_s = timed_first_call(engine.run, dev)
    out = [engine]
    if with_loop:
        # a plain PyTorch loop with a model of its own (same weights), compiled by itself when the
        # engine's is: the ratio then measures the engine against real hand-written training
        torch.manual_seed(0)
        own = build_model(config.backbone, num_classes, variant, ATTENTION if attention else None, config.options)
        own.load_state_dict(model.state_dict())
        own.to(dev).train()
        if channels_last:
            own.to(memory_format=torch.channels_last)
        looped = torch.compile(own) if compiled else own
        loop = hand_written_step(looped, train, dev, step.precision, attention)
        candidate = Candidate(f"loop {key}", lambda: loop(images, labels), flops)
        candidate.first_call_s = timed_first_call(candidate.run, dev)
        out.append(candidate)
    return out


MIN_REPEAT_S = 0.5
"""Each timed repeat lasts at least this long (issue 21: 5-step repeats of 60-90 ms spread 17-34 %)."""


def time_candidates(candidates: list[Candidate], batch: int, quick: bool) -> dict[str, Timing]:
    """Interleaved repeats (finebench.bench) of at least ``MIN_REPEAT_S`` each, after the first call
    each candidate already made; the printed img/s and every ratio come from these timings."""
    calls = 1 if quick else calls_for_duration(candidates[0].run, device(), MIN_REPEAT_S)
    return time_side_by_side({c.name: c.run for c in candidates}, items=batch, warmup=1 if quick else 3,
                             repeats=2 if quick else 5, calls_per_repeat=calls, device=device())


def free() -> None:
    """Hand the memory of the models just timed back before the next ones are built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- parts ------------------------------------------------------------------------------------------


@dataclass
class Part:
    """What a part's functions share: the figures of earlier parts, its own results (saved to the
    state file after every measurement, so a part stopped at its limit keeps what it measured)."""

    state: dict[str, Any]
    results: dict[str, Any]
    state_path: Path
    name: str
    quick: bool
    deadline: float

    def save(self) -> None:
        current = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        current[self.name] = self.results
        self.state_path.write_text(json.dumps(current, default=float))

    def attempt(self, label: str, measure: Callable[[], Any]) -> Any:
        """Run one measurement; on failure print it and go on (one shot: the rest still counts)."""
        try:
            value = measure()
        except Exception:  # noqa: BLE001
            say(f"  {label}: FAILED\n{traceback.format_exc(limit=4)}")
            free()
            return None
        self.save()
        return value


def part_peak(part: Part) -> None:
    dev = device()
    compiled = {v: resolve_compile("auto", dev, attention=v == "attention") for v in ("baseline", "attention")}
    layouts = {v: resolve_channels_last("auto", dev, compiled=compiled[v], attention=v == "attention")
               for v in ("baseline", "attention")}
    say(f"defaults on {dev.type}: precision {resolve_precision('auto', dev)}, compile baseline "
        f"{compiled['baseline']} / A&R {compiled['attention']}, channels_last "
        f"baseline {layouts['baseline']} / A&R {layouts['attention']}")
    peak = bf16_matmul_peak(part.quick)
    part.results["bf16_flops"] = peak
    say(f"bf16 matmul peak: {peak / 1e12:,.2f} TFLOP/s")


def measure_config(part: Part, config: Config, num_classes: int, *, compiled: bool, formats: tuple[bool, ...],
                   with_loop: bool, printer: RowPrinter) -> dict:
    """Engine (and loop) img/s, MFU and A&R overheads of one backbone and head size.

    Each variant is built (compiled), timed and printed before the next is built, so a part
    stopped at its limit has printed what it measured; the overhead then comes from a second,
    interleaved timing of the two engine steps.
    """
    peak = part.state.get("peak", {}).get("bf16_flops")
    results: dict[str, Any] = part.results.setdefault(f"{config.key}/{num_classes}", {})
    mode = "compiled" if compiled else "eager"
    for channels_last in formats:
        fmt = "CL" if channels_last else "NCHW"
        engines: dict[str, Candidate] = {}
        for variant in ("baseline", "attention"):
            candidates = make_candidates(config, num_classes, variant, compiled=compiled,
                                         channels_last=channels_last, with_loop=with_loop)
            timings = time_candidates(candidates, config.batch, part.quick)
            for candidate in candidates:
                timing = timings[candidate.name]
                mfu = candidate.flops * timing.per_s / config.batch / peak if peak else float("nan")
                results[candidate.name] = {"images_per_s": timing.per_s, "flops": candidate.flops,
                                           "first_call_s": candidate.first_call_s, "mfu": mfu}
                vs_loop = ""
                if candidate.name.startswith("engine") and with_loop:
                    vs_loop = f"{paired_ratio(timing, timings[candidate.name.replace('engine', 'loop', 1)]):.3f}"
                printer(config.label, num_classes, candidate.name, f"{timing.per_s:,.0f}", vs_loop, f"{mfu:.2f}",
                        f"{candidate.first_call_s:.1f}", f"{timing.spread_pct:.0f}%")
            part.save()
            engines[variant] = candidates[0]
            del candidates, timings
        timings = time_candidates(list(engines.values()), config.batch, part.quick)
        base, attn = (timings[engines[v].name] for v in ("baseline", "attention"))
        time_overhead = 100.0 * (paired_ratio(base, attn) - 1.0)
        # one FLOP convention, every table's: fvcore, forward, one multiply-add = one flop
        fvcore = {variant: profile_model(build_model(config.backbone, num_classes, variant,
                                                     ATTENTION if variant == "attention" else None, config.options),
                                         config.input_size).flops for variant in ("baseline", "attention")}
        flop_overhead = 100.0 * (fvcore["attention"] / fvcore["baseline"] - 1.0)
        met = "yes" if time_overhead <= flop_overhead + TARGET_POINTS else "NO"
        results[f"overhead/{fmt}/{mode}"] = {"time_pct": time_overhead, "flop_pct": flop_overhead,
                                             "baseline_images_per_s": base.per_s, "attention_images_per_s": attn.per_s}
        say(f"  -> A&R overhead {config.label} N={num_classes} {fmt} {mode}: baseline {base.per_s:,.0f} vs A&R "
            f"{attn.per_s:,.0f} img/s (these timings: median of per-repeat ratios {time_overhead:+.1f}%) vs fvcore "
            f"FLOPs {flop_overhead:+.1f}% (target <= FLOPs + {TARGET_POINTS:.0f} points: {met})")
        part.save()
        del engines, timings, base, attn
        free()
        if time.time() > part.deadline and channels_last != formats[-1]:
            say("  (budget reached: the remaining memory format is skipped)")
            break
    return results


def eval_speed(config: Config, num_classes: int, variant: str, quick: bool) -> float:
    """Evaluation images/s (eager forward, no grad, eval mode, at the resolved defaults)."""
    dev = device()
    attention = variant == "attention"
    torch.manual_seed(0)
    model = build_model(config.backbone, num_classes, variant, ATTENTION if attention else None, config.options)
    train = TrainSection(epochs=1, batch_size=config.batch, schedule="constant", compile=False, device=dev.type)
    step = build_train_step(model, train, method=get_method(variant), steps_per_epoch=100)
    model.eval()
    images, _ = synthetic_batch(config.batch, config.input_size, num_classes, device=dev)
    if step.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), autocast(dev, step.precision):
            model(images)

    return time_side_by_side({"eval": forward}, items=config.batch, warmup=2, repeats=3 if quick else 5,
                             calls_per_repeat=1 if quick else 5, device=dev)["eval"].per_s


HEADERS = [("model", -22), ("N", 4), ("candidate", -29), ("img/s", 9), ("engine/loop", 11), ("MFU", 5),
           ("1st call s", 10), ("spread", 6)]


def part_eager(part: Part) -> None:
    cfgs = configs(part.quick)
    say(f"eager, precision {resolve_precision('auto', device())}; engine/loop: paired ratio of img/s (target >= 0.97); "
        "MFU: step FLOPs x steps/s / bf16 matmul peak; '1st call s' includes cuDNN's algorithm search")
    printer = RowPrinter(HEADERS)
    cifar, fine = cfgs["cifar"], cfgs["fine"]
    todo = [(cifar, n, n == cifar.classes[0]) for n in cifar.classes] + [(fine, n, False) for n in fine.classes]
    for config, num_classes, with_loop in todo:
        # Both formats where the loop runs and on WRN-50-2 (what channels_last "auto" rests on); quick:
        # where the loop runs only, enough to run every line of code.
        both = with_loop or (config.key == "fine" and not part.quick)
        formats = (True, False) if both else (True,)
        part.attempt(f"{config.label} N={num_classes}", lambda c=config, n=num_classes, w=with_loop, f=formats:
                     measure_config(part, c, n, compiled=False, formats=f, with_loop=w, printer=printer))
    evals: dict[str, float] = part.results.setdefault("eval_images_per_s", {})
    for variant in ("baseline", "attention"):
        speed = part.attempt(f"evaluation {variant}", lambda v=variant: eval_speed(cifar, cifar.classes[0], v, part.quick))
        if speed is not None:
            evals[variant] = speed
            say(f"evaluation (eager, no grad, 'auto' format) {cifar.label} N={cifar.classes[0]} {variant}: "
                f"{speed:,.0f} img/s")
    part.save()


def part_compiled(part: Part) -> None:
    cifar = configs(part.quick)["cifar"]
    say("compiled (torch.compile, static shapes, channels_last as 'auto' picks when compiled); "
        "'1st call s' of an engine row is its compile time")
    printer = RowPrinter(HEADERS)
    part.attempt(f"{cifar.label} N={cifar.classes[0]}", lambda: measure_config(
        part, cifar, cifar.classes[0], compiled=True, formats=(True,), with_loop=True, printer=printer))


def part_compiled_more(part: Part) -> None:
    cfgs = configs(part.quick)
    compiled = part.state.get("compiled", {}).get(f"cifar/{cfgs['cifar'].classes[0]}", {})
    times = [r.get("first_call_s", 0.0) for k, r in compiled.items() if k.startswith("engine")]
    compile_s = max(times, default=60.0)
    source = f"{cfgs['cifar'].label} compiled in {compile_s:.0f} s" if times else f"assumed {compile_s:.0f} s a compile"
    say(f"compiled, more models while the budget lasts ({source})")
    printer = RowPrinter(HEADERS)
    todo = [(cfgs["cifar"], n) for n in cfgs["cifar"].classes[1:]] + [(cfgs["fine"], n) for n in cfgs["fine"].classes]
    for config, num_classes in todo:
        needed = 2.5 * compile_s * (2.0 if config.key == "fine" else 1.0)
        if time.time() + needed > part.deadline:
            say(f"  skipped {config.label} N={num_classes}: about {needed:.0f} s needed, "
                f"{max(0.0, part.deadline - time.time()):.0f} s left")
            continue
        part.attempt(f"{config.label} N={num_classes}", lambda c=config, n=num_classes: measure_config(
            part, c, n, compiled=True, formats=(True,), with_loop=False, printer=printer))


def part_loader(part: Part) -> None:
    """Images/s of the 224 data path against the WRN-50-2 + A&R step it feeds."""
    quick, dev = part.quick, device()
    fine = configs(quick)["fine"]
    workers = 1 if quick else min(12, max(1, (os.cpu_count() or 2) - 2))
    source = (200, 150) if quick else (500, 375)
    images = 32 if quick else 1024
    batch = 8 if quick else 128
    results = part.results
    try:
        from finebench.data import throughput
    except ImportError as error:  # the GPU JPEG path is not in this tree: the worker path alone
        say(f"finebench.data.throughput not available ({error}); timing the worker path only")
        throughput = None
    with tempfile.TemporaryDirectory(prefix="finebench-gpu-suite-") as folder:
        if throughput is not None:
            for path in ("device", "workers"):
                measured = part.attempt(f"loader {path}", lambda p=path: throughput.measure_throughput(
                    dev, path=p, source_size=source, images=images, input_size=fine.input_size, batch_size=batch,
                    workers=workers, repeats=1 if quick else 3, folder=Path(folder)))
                if measured is not None:
                    results[path] = measured.images_per_s
                    say(f"loader ({path} path, {workers} workers, {source[0]}x{source[1]} JPEG -> "
                        f"{fine.input_size}): {measured.images_per_s:,.0f} img/s")
            check = part.attempt("pixel check", lambda: throughput.compare_with_workers(
                dev, images=16 if quick else 64, input_size=fine.input_size,
                source_size=(160, 120) if quick else (400, 300), folder=Path(folder)))
            if check is not None:
                results["pixel_check"] = check
                say(f"device path vs worker path pixels: max {check['max_grey_levels']:.2f}, "
                    f"mean {check['mean_grey_levels']:.3f} grey levels over {check['images']} images")
        else:
            speed = part.attempt("loader workers", lambda: worker_path_throughput(
                Path(folder), source, images, fine.input_size, batch, workers, quick))
            if speed is not None:
                results["workers"] = speed
                say(f"loader (workers path, {workers} workers, {source[0]}x{source[1]} JPEG -> {fine.input_size}): "
                    f"{speed:,.0f} img/s")
    step = best_step_speed(part.state, fine)
    if step is None:
        step = part.attempt("step", lambda: measure_fine_attention_step(fine, quick))
        if step is None:
            return
        say(f"step it feeds ({fine.label} A&R N={fine.classes[0]}, engine, eager CL): {step:,.0f} img/s")
    else:
        say(f"step it feeds ({fine.label} A&R N={fine.classes[0]}, fastest measured above): {step:,.0f} img/s")
    results["step_images_per_s"] = step
    for path in ("device", "workers"):
        if path in results:
            ratio = results[path] / step
            say(f"  -> loader ({path}) / step: {ratio:.2f}x (target >= {LOADER_TARGET}x: "
                f"{'yes' if ratio >= LOADER_TARGET else 'NO'})")
    part.save()


def worker_path_throughput(root: Path, source: tuple[int, int], count: int, size: int, batch: int, workers: int,
                           quick: bool) -> float:
    """The present worker loader over a store of synthetic JPEGs written by benchmarks/loader.py's code."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import loader as loader_bench  # benchmarks/loader.py: synthetic photos and the real prepare path

    from finebench.data.loader import build_loaders

    files = loader_bench.write_image_folder(root / "jpeg", count, source[0], source[1], seed=0)
    loader_bench.prepare_store("gpu_suite_jpeg", root / "data", files, files[:4])
    train = build_loaders("gpu_suite_jpeg", root / "data", batch_size=batch, workers=workers, input_size=size,
                          augmentation="imagenet", pin_memory=torch.cuda.is_available()).train
    dev = device()
    seconds = []
    for repeat in range(2 if quick else 4):
        start, seen = time.perf_counter(), 0
        for images, _ in train:
            images.to(dev, non_blocking=True)
            seen += len(images)
        synchronize_device(dev)
        if repeat:
            seconds.append(time.perf_counter() - start)
    return seen / min(seconds)


def best_step_speed(state: dict, fine: Config) -> float | None:
    """Fastest img/s measured for the fine-grained A&R step in the eager or compiled parts."""
    speeds = [
        result["images_per_s"]
        for part in ("eager", "compiled_more")
        for name, result in state.get(part, {}).get(f"fine/{fine.classes[0]}", {}).items()
        if name.startswith("engine attention")
    ]
    return max(speeds) if speeds else None


def measure_fine_attention_step(fine: Config, quick: bool) -> float:
    candidates = make_candidates(fine, fine.classes[0], "attention", compiled=False, channels_last=True,
                                 with_loop=False)
    return time_candidates(candidates, fine.batch, quick)[candidates[0].name].per_s


def table_estimate(state: dict, quick: bool) -> None:
    """Hours of the paper's CIFAR-10 table with finebench's defaults on this device."""
    cifar = configs(quick)["cifar"]
    key = f"cifar/{cifar.classes[0]}"
    compiled, eager = state.get("compiled", {}).get(key), state.get("eager", {}).get(key)
    evals = state.get("eager", {}).get("eval_images_per_s")
    if (compiled is None and eager is None) or not evals:
        say("table estimate: needs the eager part (and the compiled part on CUDA)")
        return
    total_s = 0.0
    parts, modes = [], []
    for variant in ("baseline", "attention"):
        wants_compile = resolve_compile("auto", device(), attention=variant == "attention")
        source, mode = (compiled, "compiled") if wants_compile and compiled else (eager, "eager")
        if source is None:
            say(f"table estimate: no {mode} {variant} figure measured")
            return
        modes.append(f"{variant} {mode}")
        auto_cl = resolve_channels_last("auto", device(), compiled=mode == "compiled", attention=variant == "attention")
        fmt = "CL" if auto_cl else "NCHW"  # the memory format "auto" picks; else the one measured
        result = source.get(f"engine {variant}/{fmt}/{mode}") or source.get(f"engine {variant}/CL/{mode}")
        if result is None:
            say(f"table estimate: no {variant} figure measured")
            return
        epoch_s = CIFAR_TABLE["train_images"] / result["images_per_s"] + CIFAR_TABLE["test_images"] / evals[variant]
        run_s = CIFAR_TABLE["epochs"] * epoch_s + (result["first_call_s"] if mode == "compiled" else 0.0)
        total_s += CIFAR_TABLE["seeds"] * run_s
        parts.append(f"{variant} {result['images_per_s']:,.0f} img/s -> {run_s / 3600:.2f} h a run")
    say(f"CIFAR-10 table (baseline + A&R, {CIFAR_TABLE['seeds']} seeds, {CIFAR_TABLE['epochs']} epochs, "
        f"{cifar.label}, defaults: {', '.join(modes)}): {total_s / 3600:.2f} h on this device ({'; '.join(parts)}; "
        "evaluation at the eager speed, data loading assumed free: the in-memory path)")


# ---- driver -------------------------------------------------------------------------------------------


PART_FUNCTIONS: dict[str, Callable[[Part], None]] = {
    "peak": part_peak, "eager": part_eager, "loader": part_loader, "compiled": part_compiled,
    "compiled_more": part_compiled_more,
}


def run_part(name: str, state_path: Path, quick: bool, deadline: float) -> None:
    """In the child process: one part, its results merged into the state file as they come."""
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    part = Part(state, {}, state_path, name, quick, deadline)
    PART_FUNCTIONS[name](part)
    part.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models and data")
    parser.add_argument("--budget-s", type=float, default=None, help="global time budget (default 345; 540 quick)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--state", type=Path, default=None, help="JSON file the parts share (default: temporary)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child process: run this part only
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part is not None:
        run_part(args.part, args.state, args.quick, args.deadline)
        return

    wanted = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in wanted if part not in PARTS]
    if unknown:
        parser.error(f"--parts {','.join(unknown)}: unknown; choose from {','.join(PARTS)}")
    budget = args.budget_s if args.budget_s is not None else (540.0 if args.quick else 345.0)
    start = time.time()
    deadline = start + budget
    say(f"gpu_suite{' (quick)' if args.quick else ''}: budget {budget:.0f} s; {machine_line()}; "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    with tempfile.TemporaryDirectory(prefix="finebench-gpu-suite-") as folder:
        state_path = args.state or Path(folder) / "state.json"
        for index, part in enumerate(wanted):
            say(f"\n== {part} ({time.time() - start:.0f} s elapsed)")
            if part == "table":
                try:
                    table_estimate(json.loads(state_path.read_text()) if state_path.exists() else {}, args.quick)
                except Exception:  # noqa: BLE001 - one shot: report and go on
                    say(f"table: failed\n{traceback.format_exc(limit=3)}")
                continue
            left = deadline - time.time() - sum(RESERVED_S.get(later, 0) for later in wanted[index + 1 :])
            if left < MIN_PART_S:
                say(f"{part}: skipped, {left:.0f} s of the budget left")
                continue
            limit = min(PART_LIMIT_S[part] * (4 if args.quick else 1), left)
            command = [sys.executable, __file__, "--part", part, "--state", str(state_path),
                       "--deadline", str(time.time() + limit * 0.8)] + (["--quick"] if args.quick else [])
            part_start = time.time()
            # Its own session, so that a part stopped at its limit takes its compile workers with it.
            child = subprocess.Popen(command, start_new_session=True)
            try:
                code = child.wait(timeout=limit)
                outcome = "done" if code == 0 else f"FAILED (exit {code}; its traceback is above)"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                outcome = f"STOPPED after its {limit:.0f} s limit"
            say(f"{part}: {outcome} in {time.time() - part_start:.0f} s")
    say(f"\ngpu_suite: finished in {time.time() - start:.0f} s; {machine_line()}")


if __name__ == "__main__":
    main()
