"""The training engine on tiny in-memory data: records, resume, NaN guard, precision, optimiser."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finebench.methods import Method, get_method
from finebench.models.output import ModelOutput
from finebench.results import RunDir
from finebench.train.evaluate import evaluate
from finebench.train.fit import fit
from finebench.train.optim import lr_factor_fn
from finebench.train.progress import SilentProgress
from finebench.train.rng import seed_everything
from finebench.train.runtime import (
    resolve_channels_last,
    resolve_compile,
    resolve_precision,
)
from finebench.train.step import TrainStep, build_train_step
from finebench.train_settings import MACHINE_FIELDS, TrainSection

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 4


class TinyNet(nn.Module):
    """A conv net with the ModelOutput contract; ``mixture`` adds two gated 'modules' and a reg loss."""

    attention_taps = ["tap_b", "tap_a"]

    def __init__(self, mixture: bool = False) -> None:
        super().__init__()
        self.mixture = mixture
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, NUM_CLASSES)
        self.modules_fc = nn.ModuleList(nn.Linear(8, NUM_CLASSES) for _ in range(2))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        pooled = self.drop(F.relu(self.conv(x)).mean(dim=(2, 3)))
        logits = self.fc(pooled)
        if not self.mixture:
            return ModelOutput(F.log_softmax(logits, 1), logits)
        module_logits = tuple(m(pooled) for m in self.modules_fc)
        stacked = torch.stack([*module_logits, logits], 1).log_softmax(-1)
        log_probs = torch.logsumexp(stacked + math.log(1 / 3), dim=1)
        reg = pooled.pow(2).mean() * 1e-3 if self.training else None
        return ModelOutput(log_probs, logits, module_logits, None, reg)


def make_data(n: int = 48, nan_at: int | None = None) -> TensorDataset:
    generator = torch.Generator().manual_seed(123)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.randn(n, 3, 8, 8, generator=generator) + labels[:, None, None, None].float()
    if nan_at is not None:
        images[nan_at] = float("nan")
    return TensorDataset(images, labels)


def make_loaders(seed: int, **kwargs):
    train = DataLoader(make_data(**kwargs), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    test = DataLoader(make_data(24), batch_size=16)
    return train, test


def train_cfg(**overrides) -> TrainSection:
    base = dict(epochs=3, batch_size=8, lr=0.05, schedule="cosine", warmup_epochs=0.5, precision="fp32", log_every=2)
    return TrainSection(**{**base, **overrides})


def method_for(mixture: bool) -> Method:
    """The method whose hooks train ``TinyNet(mixture)``: Attend and Rectify's mixture, or the baseline."""
    return get_method("attention" if mixture else "baseline")


def run_fit(store, *, mixture=False, seed=0, progress=None, **train_overrides):
    seed_everything(seed)
    model = TinyNet(mixture)
    train_loader, test_loader = make_loaders(seed)
    return fit(model, train_loader, test_loader, train_cfg(**train_overrides), method=method_for(mixture),
               store=store, progress=progress)


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in MACHINE_FIELDS} for row in rows]


CONTRACT_KEYS = {"epoch", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr",
                 "epoch_time_s", "images_per_s", "threads", "load_1min", "network_top1", "module_top1", "train_ce"}


def test_fit_writes_one_metrics_row_per_epoch_with_the_contract_keys(tmp_path):
    store = RunDir(tmp_path, "r", "id")
    result = run_fit(store)
    assert result.status == "finished" and result.epochs_completed == 3
    rows = store.read_metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert all(set(row) == CONTRACT_KEYS for row in rows)
    assert rows[-1]["network_top1"] is None and rows[-1]["module_top1"] == {}
    assert 0 <= rows[-1]["test_top1"] <= rows[-1]["test_top5"] <= 100
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_attention_runs_report_network_and_per_module_accuracy(tmp_path):
    result = run_fit(RunDir(tmp_path, "r", "id"), mixture=True)
    final = result.rows[-1]
    assert set(final["module_top1"]) == {"tap_b", "tap_a"}
    assert 0 <= final["network_top1"] <= 100


def test_eval_every_skips_test_metrics_but_always_evaluates_the_last_epoch(tmp_path):
    result = run_fit(RunDir(tmp_path, "r", "id"), epochs=3, eval_every=2)
    assert [row["epoch"] for row in result.rows] == [2, 3]


class Interrupt(Exception):
    pass


class InterruptIn:
    """Stops training in the middle of an epoch, after the previous epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.stop_epoch, self.epoch = epoch, 0

    def start_epoch(self, epoch, epochs, steps):
        self.epoch = epoch

    def update(self, steps_done, **_):
        if self.epoch == self.stop_epoch and steps_done >= 2:
            raise Interrupt

    def end_epoch(self, row):
        pass

    def message(self, text):
        pass


@pytest.mark.parametrize("mixture", [False, True])
def test_resume_after_interruption_repeats_the_uninterrupted_run_exactly(tmp_path, mixture):
    reference = run_fit(RunDir(tmp_path / "a", "r", "id"), mixture=mixture, epochs=4)
    store = RunDir(tmp_path / "b", "r", "id")
    with pytest.raises(Interrupt):
        run_fit(store, mixture=mixture, epochs=4, progress=InterruptIn(3))
    assert [row["epoch"] for row in store.read_metrics()] == [1, 2]
    resumed = run_fit(store, mixture=mixture, epochs=4, seed=99)  # a wrong seed must not matter on resume
    assert comparable(resumed.rows) == comparable(reference.rows)
    assert comparable(store.read_metrics()) == comparable(reference.rows)


def test_checkpoint_loads_with_weights_only(tmp_path):
    store = RunDir(tmp_path, "r", "id")
    run_fit(store, epochs=1)
    state = torch.load(store.checkpoint_path, weights_only=True)
    assert state["epoch"] == 1 and "model" in state and "rng" in state


def test_nan_loss_fails_the_run_with_the_step_that_went_wrong(tmp_path):
    seed_everything(0)
    train_loader = DataLoader(make_data(nan_at=20), batch_size=8, shuffle=False)
    _, test_loader = make_loaders(0)
    result = fit(TinyNet(), train_loader, test_loader, train_cfg(), method=method_for(False), store=RunDir(tmp_path, "r", "i"))
    assert result.status == "failed"
    assert result.failure_reason == "loss became nan at epoch 1 step 2"
    assert result.epochs_completed == 0


def test_training_loss_is_cross_entropy_for_plain_models_and_nll_plus_reg_for_mixtures():
    logits = torch.randn(5, NUM_CLASSES)
    labels = torch.tensor([0, 1, 2, 3, 0])
    plain = ModelOutput(logits.log_softmax(1), logits)
    assert torch.allclose(method_for(False).loss(plain, labels), F.cross_entropy(logits, labels))
    mixed = ModelOutput(logits.log_softmax(1) - 0.1, logits, reg_loss=torch.tensor(0.5))
    expected = F.nll_loss(logits.log_softmax(1) - 0.1, labels) + 0.5
    assert torch.allclose(method_for(True).loss(mixed, labels), expected)


def test_evaluate_counts_top1_and_top5_exactly():
    class Fixed(nn.Module):
        def forward(self, x):
            logits = x.flatten(1)
            return ModelOutput(logits.log_softmax(1), logits)

    images = torch.eye(6)[[0, 1, 2, 3]].reshape(4, 6, 1, 1)  # predicts class i for image i
    labels = torch.tensor([0, 1, 5, 5])
    metrics = evaluate(Fixed(), [(images, labels)], device=torch.device("cpu"), method=method_for(False))
    assert metrics["test_top1"] == pytest.approx(50.0)
    assert metrics["test_top5"] == pytest.approx(100.0)


def test_evaluate_confusion_matrix_counts_true_class_by_predicted_class():
    class Fixed(nn.Module):
        def forward(self, x):
            logits = x.flatten(1)
            return ModelOutput(logits.log_softmax(1), logits)

    images = torch.eye(3)[[0, 1, 2, 2, 0]].reshape(5, 3, 1, 1)  # predicts class i for a one-hot at i
    labels = torch.tensor([0, 1, 1, 2, 2])
    batches = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    metrics = evaluate(Fixed(), batches, device=torch.device("cpu"), method=method_for(False), confusion=True)
    assert metrics["confusion"] == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert "confusion" not in evaluate(Fixed(), batches, device=torch.device("cpu"), method=method_for(False))


def test_fit_returns_the_final_confusion_matrix_and_calls_on_epoch_after_each_epoch(tmp_path):
    seen = []
    seed_everything(0)
    train_loader, test_loader = make_loaders(0)
    result = fit(TinyNet(), train_loader, test_loader, train_cfg(epochs=2, eval_every=2), method=method_for(False),
                 on_epoch=lambda row, rows: seen.append((row["epoch"], "test_top1" in row, len(rows))))
    assert seen == [(1, False, 0), (2, True, 1)]
    matrix = torch.tensor(result.confusion)
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES) and int(matrix.sum()) == 24
    assert 100 * int(matrix.trace()) / 24 == pytest.approx(result.rows[-1]["test_top1"])
    assert "confusion" not in result.rows[-1]


def test_precision_auto_is_fp32_or_bf16_and_explicit_choices_are_kept():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) in {"fp32", "bf16"}
    assert resolve_precision("fp32", cpu) == "fp32"


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_train_step_runs_on_in_memory_batches(precision):
    torch.manual_seed(0)
    step = build_train_step(TinyNet(), train_cfg(precision=precision, grad_clip=1.0, channels_last=True),
                            method=method_for(False), steps_per_epoch=10)
    assert isinstance(step, TrainStep)
    images, labels = make_data(16).tensors
    losses = [step(images, labels)[0].item() for _ in range(10)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_schedules_warm_up_then_decay_at_the_milestones():
    factor = lr_factor_fn(train_cfg(epochs=10, schedule="multistep", milestones=[4, 8], gamma=0.2,
                                    warmup_epochs=1), steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(39) == 1.0 and factor(40) == pytest.approx(0.2) and factor(80) == pytest.approx(0.04)
    cosine = lr_factor_fn(train_cfg(epochs=10, schedule="cosine", warmup_epochs=0), steps_per_epoch=10)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)


def test_the_exponential_decay_is_cals_official_per_iteration_formula():
    """CAL (raoyongming/CAL train_distributed.py): lr = 1e-3 * 0.9 ** ((epoch + i / N) / 2)."""
    steps = 7
    factor = lr_factor_fn(train_cfg(epochs=6, schedule="exponential", gamma=0.9, step_size=2, warmup_epochs=0), steps_per_epoch=steps)
    for epoch in range(6):
        for i in range(steps):
            assert factor(epoch * steps + i) == pytest.approx(0.9 ** ((epoch + i / steps) / 2), rel=1e-12)


def test_lr_updates_per_epoch_is_pmgs_official_cosine():
    """PMG (its train.py's cosine_anneal_schedule): lr0 / 2 * (cos(pi * epoch / epochs) + 1), set at
    each epoch start and held through the epoch."""
    steps, epochs = 5, 8
    factor = lr_factor_fn(train_cfg(epochs=epochs, schedule="cosine", lr_updates="epoch", warmup_epochs=0), steps_per_epoch=steps)
    for epoch in range(epochs):
        expected = 0.5 * (math.cos(math.pi * epoch / epochs) + 1)
        assert [factor(epoch * steps + i) for i in range(steps)] == pytest.approx([expected] * steps, rel=1e-12)
    per_batch = lr_factor_fn(train_cfg(epochs=epochs, schedule="cosine", warmup_epochs=0), steps_per_epoch=steps)
    assert per_batch(steps + 2) < factor(steps + 2)  # per batch, the lr has moved on within the epoch


def test_lr_updates_per_epoch_with_a_schedule_it_cannot_change_is_refused():
    with pytest.raises(ValueError, match="lr_updates 'epoch' changes nothing with schedule 'multistep'"):
        train_cfg(epochs=4, schedule="multistep", milestones=[2], lr_updates="epoch")


def test_rich_progress_prints_one_line_per_finished_epoch(tmp_path):
    import io

    from rich.console import Console

    from finebench.train.progress import RichProgress

    buffer = io.StringIO()
    progress = RichProgress("baseline seed 0", Console(file=buffer, force_terminal=True, width=200))
    try:
        run_fit(None, epochs=2, progress=progress)
    finally:
        progress.close()
    lines = [line for line in buffer.getvalue().splitlines() if "top-1" in line]
    assert len(lines) == 2 and "baseline seed 0 epoch 2: train loss" in lines[1] and "img/s" in lines[1]



class SlowLoader:
    """A loader whose every batch takes ``seconds``: a stand-in for a method with long steps."""

    def __init__(self, loader, seconds: float) -> None:
        self.loader, self.seconds = loader, seconds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.seconds)
            yield batch


class UpdateRecorder(SilentProgress):
    def __init__(self) -> None:
        self.updates: list[tuple[float, int]] = []

    def update(self, steps_done, *, images_per_s, loss, lr):
        self.updates.append((time.perf_counter(), steps_done))


def test_progress_updates_by_time_not_by_log_every_and_records_the_same(monkeypatch):
    """6 steps of 0.1 s with log_every 100 (never reached) and a display interval of 0.25 s: the display
    moves mid-epoch, at least 0.25 s apart (time.sleep and perf_counter: no tolerance needed), and the
    recorded row is the one log_every 2 records."""
    import finebench.train.fit as engine  # the fit loop's module, patched below

    monkeypatch.setattr(engine, "DISPLAY_EVERY_S", 0.25, raising=False)
    seed_everything(0)
    model = TinyNet(False)
    train_loader, test_loader = make_loaders(0)
    recorder = UpdateRecorder()
    start = time.perf_counter()
    result = fit(model, SlowLoader(train_loader, 0.1), test_loader, train_cfg(epochs=1, log_every=100),
                 method=method_for(False), progress=recorder)
    steps = [done for _, done in recorder.updates]
    assert steps[0] < len(train_loader) and steps[-1] == len(train_loader) and steps == sorted(set(steps))
    times = [start] + [moment for moment, _ in recorder.updates[:-1]]
    assert all(later - earlier >= 0.25 for earlier, later in itertools.pairwise(times))
    assert comparable(result.rows) == comparable(run_fit(None, epochs=1, log_every=2).rows)


@pytest.mark.parametrize("mixture", [False, True])
def test_accumulated_micro_batches_take_the_whole_batchs_step(mixture):
    # dropout off (eval) so both steps see the same function; the gradient must be the batch's own
    images, labels = make_data(16).tensors
    steps, seen = {}, {}
    for parts in (1, 2):
        torch.manual_seed(0)
        model = TinyNet(mixture).eval()
        seen[parts] = []
        model.conv.register_forward_hook(lambda _m, inputs, _o, parts=parts: seen[parts].append(len(inputs[0])))
        step = build_train_step(model, train_cfg(batch_size=16, accumulation_steps=parts, schedule="constant",
                                                 warmup_epochs=0), method=method_for(mixture), steps_per_epoch=10)
        loss, correct = step(images, labels)
        steps[parts] = (model, loss, correct)
    assert seen == {1: [16], 2: [8, 8]}  # BatchNorm would see the micro-batches
    whole, parts = steps[1], steps[2]
    assert torch.allclose(whole[1], parts[1], atol=1e-6) and int(whole[2]) == int(parts[2])
    for (name, a), b in zip(whole[0].named_parameters(), parts[0].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_batch_that_does_not_split_into_micro_batches_is_a_recipe_error():
    with pytest.raises(ValueError, match="accumulation_steps = 3"):
        train_cfg(batch_size=16, accumulation_steps=3)


def test_accumulation_all_reduces_once_per_step_under_ddp():
    # DDP's no_sync skips the gradient all-reduce: every micro-batch but the last must run inside it
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.synced = inner, []
            self.quiet = False

        def forward(self, images):
            self.synced.append(not self.quiet)
            return self.inner(images)

        @contextlib.contextmanager
        def no_sync(self):
            self.quiet = True
            try:
                yield
            finally:
                self.quiet = False

    model = Wrapper(TinyNet())
    step = build_train_step(model, train_cfg(batch_size=16, accumulation_steps=4), method=method_for(False), steps_per_epoch=10)
    step(*make_data(16).tensors)
    assert model.synced == [False, False, False, True]


# ---- compile and channels_last: "auto" per device ------------------------------------------------

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Inductor's CUDA backend needs Triton")
def test_compile_auto_is_on_for_cuda() -> None:
    assert resolve_compile("auto", CUDA) is True
    assert resolve_compile("auto", torch.device("cuda:1")) is True
    # Attend and Rectify compiled ran slower than eager on the H200 (gpu_suite, N=10)
    assert resolve_compile("auto", CUDA, attention=True) is False
    assert resolve_compile(True, CUDA, attention=True) is True


def test_compile_auto_is_off_on_cpu_and_other_devices_and_explicit_choices_are_kept() -> None:
    assert resolve_compile("auto", CPU) is False
    assert resolve_compile("auto", MPS) is False
    for device in (CPU, CUDA):
        assert resolve_compile(True, device) is True
        assert resolve_compile(False, device) is False


@pytest.mark.parametrize(
    ("device", "compiled", "attention", "expected"),
    [
        (CUDA, True, True, True),  # compiled: channels_last for every model
        (CUDA, True, False, True),
        (CUDA, False, False, True),  # eager plain backbone: channels_last
        (CUDA, False, True, True),  # eager Attend and Rectify too (H200: 8,273 vs 5,813 img/s)
        (CPU, False, False, True),
        (CPU, False, True, True),
        (MPS, False, False, False),
    ],
)
def test_channels_last_auto_follows_the_measured_choice_per_device(device, compiled, attention, expected):
    assert resolve_channels_last("auto", device, compiled=compiled, attention=attention) is expected


def test_channels_last_explicit_choice_is_kept_on_every_device() -> None:
    for device in (CPU, CUDA, MPS):
        for choice in (True, False):
            assert resolve_channels_last(choice, device, compiled=True, attention=True) is choice


def test_fit_reports_what_auto_resolved_to(tmp_path):
    result = run_fit(RunDir(tmp_path, "r", "id"), epochs=1)
    expected = resolve_channels_last("auto", CPU, compiled=False, attention=False)
    assert (result.compiled, result.channels_last, result.compile_time_s) == (False, expected, 0.0)


class CompileCounter(SilentProgress):
    """Graphs torch.compile has built, read at the start and end of every epoch."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, int, int]] = []

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def start_epoch(self, epoch, epochs, steps):
        self.marks.append(("start", epoch, self.graphs()))

    def end_epoch(self, row):
        self.marks.append(("end", row["epoch"], self.graphs()))


@pytest.mark.slow
def test_compiled_run_compiles_only_in_its_first_epoch_resumes_and_matches_eager(tmp_path):
    """torch.compile on CPU (Inductor's C++ backend): training and evaluation graphs, full and
    partial batches, are all built in epoch 1; a compiled run resumes as it would have run on; its
    metrics are the eager run's within noise (compiled dropout draws other masks)."""
    torch._dynamo.reset()
    eager = run_fit(RunDir(tmp_path / "eager", "r", "id"), mixture=True, epochs=3, compile=False)
    counter = CompileCounter()
    compiled = run_fit(RunDir(tmp_path / "compiled", "r", "id"), mixture=True, epochs=3, compile=True,
                       progress=counter)
    assert compiled.status == "finished" and compiled.compiled and compiled.compile_time_s > 0
    graphs = [count for _, _, count in counter.marks]  # start 1, end 1, start 2, ..., end 3
    assert graphs[0] < graphs[1] == graphs[-1]  # built in epoch 1, nothing compiled after it
    store = RunDir(tmp_path / "resumed", "r", "id")
    with pytest.raises(Interrupt):
        run_fit(store, mixture=True, epochs=3, compile=True, progress=InterruptIn(3))
    resumed = run_fit(store, mixture=True, epochs=3, compile=True)
    assert resumed.status == "finished" and [row["epoch"] for row in resumed.rows] == [1, 2, 3]
    for ours, theirs in zip(resumed.rows, compiled.rows, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-4)
    for ours, theirs in zip(compiled.rows, eager.rows, strict=True):  # Inductor draws its own dropout masks
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=0.05)
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=0.05)
