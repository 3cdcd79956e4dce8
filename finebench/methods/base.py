"""The method plug-in contract: what one module of ``finebench.methods`` declares about its method.

A method is a way of training and using a backbone (Attend and Rectify, SE, WS-DAN, ...). Its
module holds, in one place, everything finebench needs to know about it:

* ``Options``: its recipe options (a pydantic model; the ``[[variants]]`` entry of a recipe);
* ``table_name`` / ``settings``: its name in tables (``attention-ad3-aw4``) and its options in words;
* ``train_settings``: its own batch size, lr, epochs where its paper's protocol differs;
* ``check_backbone`` / ``build_backbone`` / ``attach``: how it goes onto each backbone family, and a
  one-line error (raised at ``--dry-run``) naming what works where it cannot;
* ``loss`` / ``scores`` / ``mixture``: the training loss and what top-1 reads; ``loss_terms``: the
  terms logged beside ``train_loss`` (by default ``train_ce``, the plain cross-entropy, so every
  method's runs have one loss column that compares);
* ``train_step``: optionally, its own training step (several passes, crops, jigsaw, pairs, one
  optimiser step per granularity) written against ``StepContext``, which the engine implements
  with its compile / precision / gradient-accumulation / DDP machinery; ``batch_sampler``: its
  own batch order;
* ``predict``: the test-time prediction with all its passes; ``eval_counts`` / ``eval_metrics``:
  what it evaluates and records beyond top-1;
* ``test_forward_passes`` / ``train_passes_per_image`` / ``early_predictors``: its cost for ``profile``;
* ``draws_attention_maps`` / ``maps_to_draw``: what ``finebench attend`` draws;
* ``size_warnings``: where its mechanism cannot act at the configured input size.

The registry hands out each method bound to a variant's options (``Method.bind``; ``method_of``):
``loss``, ``predict``, the evaluation hooks and ``train_step`` read them as ``self.options``, so a
method with an option needs no model subclass to carry it. Hooks that run before a variant is
chosen or build its network (``table_name``, ``attach``, ...) still take ``options`` explicitly.

``docs/METHODS.md`` walks through adding one. Nothing here imports the training engine: the
engine sits above this layer and hands a ``StepContext`` down.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from finebench.errors import FinebenchError
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier
from finebench.models.output import ModelOutput
from finebench.models.registry import build_backbone
from finebench.train_settings import TrainSection


class MethodOptions(BaseModel):
    """A method's recipe options. Subclasses narrow ``kind`` to ``Literal["<kind>"]`` and add fields
    with defaults and validation; a run id hashes only the fields that differ from their default,
    so a field added later with a behaviour-keeping default leaves existing ids alone."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)
    kind: str
    name: str | None = None
    """The variant's name in tables and ``--only`` (default: the method's ``table_name``)."""

    def options(self) -> dict[str, Any]:
        """The options proper (everything but kind and name): config.json's ``variant.options``."""
        return self.model_dump(exclude={"kind", "name"})


@dataclass(frozen=True)
class MicroBatch:
    """One part of a batch under gradient accumulation; ``weight`` is its share of the batch."""

    images: torch.Tensor
    labels: torch.Tensor
    weight: float
    last: bool
    """The part after which the optimiser steps (under DDP: the one whose backward all-reduces)."""


class StepContext(Protocol):
    """What a method's own training step gets from the engine (``finebench.train.step``).

    The engine has already moved the batch to the device (memory format included), zeroed no
    gradient and taken no step: the method calls ``zero_grad``/``backward``/``optimizer_step`` as
    its paper does (once per batch, or once per granularity). Precision, the fp16 grad scaler,
    gradient clipping, ``torch.compile`` and DDP are handled behind these calls:

    * ``forward`` runs the (compiled, DDP-wrapped) model under autocast. Several passes may feed
      one loss (raw, crop and drop images): autograd sums each parameter's gradient over the passes
      before DDP's hook sees it, so it is all-reduced once (tests/test_method_step.py checks this
      against one process on two Gloo workers). Passes with no gradient (a crop box made from the
      attention) go under ``torch.no_grad()``.
    * ``micro_batches`` splits a batch into ``accumulation_steps`` parts; inside the loop every
      part but the last runs under DDP's ``no_sync``. ``backward(loss, part)`` weights the loss by
      the part's share, so the accumulated gradient is the whole batch's mean-loss gradient.
    * ``optimizer_step`` unscales, clips (``train.grad_clip``), steps and updates the scaler; the
      engine steps the lr schedule once per batch after the method returns.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    accumulation_steps: int
    epoch: int
    """1-based epoch being trained (e.g. API-Net's frozen-backbone epochs)."""
    label_smoothing: float

    def micro_batches(self, images: torch.Tensor, labels: torch.Tensor) -> Iterator[MicroBatch]: ...
    def forward(self, images: torch.Tensor, **inputs: Any) -> ModelOutput: ...
    """The model on ``images``; ``inputs`` go to its forward too (API-Net's ``labels=`` for pair mining)."""
    def backward(self, loss: torch.Tensor, part: MicroBatch | None = None) -> None: ...
    def zero_grad(self, *, set_to_none: bool = True) -> None: ...
    def optimizer_step(self) -> None: ...
    def autocast(self) -> Any: ...
    """Autocast for work outside ``forward`` (a head applied to features, say)."""


@dataclass(frozen=True)
class StepResult:
    """What a training step returns: device tensors, no host sync (the engine reads them rarely)."""

    loss: torch.Tensor
    """The batch's mean training loss (0-dim, detached), as logged in ``train_loss``."""
    correct: torch.Tensor
    """Images of the batch classified right (0-dim), for ``train_top1``."""
    counts: tuple[torch.Tensor, ...] = ()
    """Sums the method records beyond loss and top-1 (0-dim each, the same count every step): the
    engine adds them up over the epoch and the ranks and ``Method.train_metrics`` makes them fields
    of the epoch's metrics.jsonl row (API-Net's pair statistics)."""
    terms: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """``Method.loss_terms`` of the batch (0-dim means, detached; ``add_terms`` weighs micro-batches):
    the engine averages each over the epoch's images into the metrics.jsonl field of its name."""


@dataclass(frozen=True)
class MapsToDraw:
    """What ``finebench attend`` draws for a method whose maps are not Attend and Rectify modules
    (WS-DAN, CAL): one row of maps per image, a box on the input, named predictions."""

    title: str
    """What the maps are (e.g. "attention maps on layer4")."""
    maps: torch.Tensor
    """B × K × H × W maps, each drawn over the input (normalised to its own range)."""
    captions: list[list[str]]
    """Per image, one caption per map."""
    log_probs: dict[str, torch.Tensor]
    """Named B × N predictions, shown as their top classes."""
    boxes: list[tuple[int, int, int, int]] | None = None
    """Per image (top, bottom, left, right) input pixels to outline (a crop), or None."""


class Method:
    """Base class of a method plug-in: subclass it in ``finebench/methods/<kind>.py`` and pass one
    instance to ``finebench.methods.registry.register``. Every hook has the plain backbone's
    behaviour by default, so a method overrides only what it changes."""

    kind: ClassVar[str]
    """The recipe's ``variants.kind`` and the registry key."""
    options: MethodOptions
    """The variant this instance is bound to (``bind``); the registry's own instance holds the
    defaults (``register``), so kind-level uses (listings, ``profile``) read the default variant."""
    description: ClassVar[str]
    """One line for ``finebench models`` and ``--help``."""
    Options: ClassVar[type[MethodOptions]]
    mixture: ClassVar[bool] = False
    """The model's ``log_probs`` are what it is trained on (NLL) and evaluated by (Attend and
    Rectify's mixture); otherwise ``logits`` with cross-entropy. Such models also stay eager and
    take the mixture's memory-format rule under ``compile = "auto"`` (engine ``resolve_compile``)."""
    test_forward_passes: ClassVar[int] = 1
    """Backbone passes one test prediction needs (WS-DAN: raw + crop = 2)."""
    train_passes_per_image: ClassVar[int] = 1
    """Backbone forward passes per training image (WS-DAN: raw, crop, drop = 3)."""
    draws_attention_maps: ClassVar[bool] = False
    """``finebench attend`` can draw its models' attention maps (``models.attention.AttentionModule``)."""
    profile_default: ClassVar[bool] = False
    """Profiled by ``finebench profile --backbone`` when no ``--variant`` is given (the reference method)."""
    shown_prediction: ClassVar[str] = ""
    """What the tables' top-1 is, where the method makes several predictions (PMG: "the concatenated
    head"); ``finebench report`` says it under the table."""
    prediction_labels: ClassVar[Mapping[str, str]] = {}
    """Words for the other predictions ``eval_metrics`` records (keys as in summary.json's ``final``,
    a dict's entries as ``key.entry``), for ``finebench report --predictions``."""
    options_added_later: ClassVar[tuple[str, ...]] = ()
    """Options added after runs were recorded: at their default they are left out of the report's
    configuration labels, so old records (which lack them) group with new ones, as their run ids do."""
    training_only_options: ClassVar[tuple[str, ...]] = ()
    """Options only training reads (a loss weight, a regulariser's form), never the network's
    parameters nor the passes of a prediction: variants differing in them alone build the same
    network and share one cost (``network_key``; a dry run counts each network once)."""

    def bind(self, options: MethodOptions) -> Self:
        """This method for one variant: a shallow copy whose ``options`` are the variant's. Hooks
        keep no state of their own beyond ``options``, so every variant's copy computes as the
        kind's one instance did."""
        if options.kind != self.kind:
            raise ValueError(f"{type(self).__name__} cannot bind options of kind {options.kind!r}")
        bound = copy.copy(self)
        bound.options = options
        return bound

    # ---- recipe ----------------------------------------------------------------------------

    def table_name(self, options: MethodOptions) -> str:
        """The variant's name in tables when the recipe gives none; unique for distinct settings."""
        return self.kind

    def settings(self, options: MethodOptions) -> str:
        """The options in the paper's terms, for dry-run tables."""
        return " ".join(f"{key} {value}" for key, value in options.options().items()) or "-"

    def train_settings(self, train: TrainSection, options: MethodOptions) -> TrainSection:
        """The train section this method's runs use: ``train`` unless its paper's protocol differs
        in a way its options choose (batch size, lr, epochs). What it returns is the run's config."""
        return train

    # ---- model -----------------------------------------------------------------------------

    def check_backbone(self, backbone: str, options: MethodOptions) -> None:
        """Raise a one-line ``FinebenchError`` naming what works where the method cannot attach to
        ``backbone`` (a registered name, ``timm:<name>`` or ``torchvision:<name>``). Called by
        ``build_model``, so ``finebench run --dry-run`` reports it before training anything."""

    def build_backbone(self, backbone: str, backbone_options: Mapping[str, Any] | None,
                       options: MethodOptions) -> Backbone:
        """The backbone, before weights load (methods that change its construction override this)."""
        return build_backbone(backbone, backbone_options)

    def attach(self, backbone: Backbone, num_classes: int, options: MethodOptions) -> ImageClassifier:
        """The whole model on a backbone whose weights are loaded (new parts start fresh). The
        model returns ``ModelOutput``; a method with heads of its own may return an
        ``ImageClassifier`` subclass (``parameter_groups`` puts all but the backbone in the head)."""
        return ImageClassifier(backbone, num_classes)

    # ---- training --------------------------------------------------------------------------

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """The training loss of one pass: cross-entropy on ``logits`` plus the model's ``reg_loss``
        (a regulariser the network computes). The engine's default step calls it in training, and
        ``evaluate`` calls it for ``test_loss`` on ``predict``'s output with ``reg_loss`` removed and
        no label smoothing, so the test loss is the objective's data term."""
        loss = F.cross_entropy(output.logits.float(), labels, label_smoothing=label_smoothing)
        if output.reg_loss is not None:
            loss = loss + output.reg_loss.float()
        return loss

    def loss_terms(self, output: ModelOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms logged beside ``train_loss``, by metrics.jsonl field name: each the pass's mean over
        its images (0-dim, detached, computed without gradient, so it changes nothing trained).
        By default ``train_ce``: the plain cross-entropy of the prediction ``scores`` reads (no label
        smoothing, no regulariser), which compares across methods where ``train_loss`` does not. A
        method adds its own (``{**super().loss_terms(output, labels), "train_div": ...}``)."""
        with torch.no_grad():
            scores = self.scores(output).detach().float()
            ce = F.nll_loss(scores, labels) if self.mixture else F.cross_entropy(scores, labels)
        return {"train_ce": ce}

    def scores(self, output: ModelOutput) -> torch.Tensor:
        """What top-1/top-5 and the confusion matrix read."""
        return output.log_probs if self.mixture else output.logits

    def train_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One training step on a batch already on the device (docs/METHODS.md §3 has a template).
        This default is every method's that has no step of its own (the baseline's): one forward
        per micro-batch, ``loss`` and ``scores``, one optimiser step (the arithmetic of every run
        before methods were plug-ins, kept bit for bit). A method that overrides it owns its step
        (``owns_train_step``)."""
        ctx.zero_grad()
        whole = ctx.accumulation_steps == 1
        total = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device, dtype=torch.long)
        terms: dict[str, torch.Tensor] = {}
        for part in ctx.micro_batches(images, labels):
            with ctx.autocast():
                output = ctx.model(part.images)
                loss = self.loss(output, part.labels, label_smoothing=ctx.label_smoothing)
            ctx.backward(loss, part)
            # a whole batch's loss as ``loss`` made it (IELT's is float64); parts' shares summed in float32
            total = loss.detach() if whole else total + (loss.detach() * part.weight).float()
            correct += (self.scores(output).argmax(dim=1) == part.labels).sum()
            terms = add_terms(terms, self.loss_terms(output, part.labels), part.weight)
        ctx.optimizer_step()
        return StepResult(total, correct, terms=terms)

    @property
    def objective(self) -> str:
        """What its ``train_loss`` measures: ``cross-entropy`` unless the method has its own loss or step
        (then its kind: WS-DAN's three CEs plus a centre loss, PMG's four step losses, ...), so the
        report plots only losses on one axis that compare."""
        plain = type(self).loss is Method.loss and not self.owns_train_step
        return "cross-entropy" if plain else f"{self.kind} objective"

    @property
    def owns_train_step(self) -> bool:
        """Whether the method's class overrides ``train_step`` (the engine then calls it every batch)."""
        return type(self).train_step is not Method.train_step

    def batch_sampler(self, options: MethodOptions, labels: Sequence[int], batch_size: int, *, seed: int,
                      rank: int, world_size: int) -> Any:
        """A batch order of the method's own (API-Net's classes x images per batch), or None for the
        loader's shuffled batches. ``labels`` are the training split's labels in order; what it
        returns has ``finebench.data.loader.BatchShardSampler``'s interface (``set_epoch``,
        ``local_batch``, ``steps``, ``__len__``, ``indices()``: this worker's indices batch by batch) and is used
        on every loader path (workers, in-memory, device decode)."""
        return None

    # ---- evaluation and cost ---------------------------------------------------------------

    def predict(self, model: nn.Module, images: torch.Tensor) -> ModelOutput:
        """The test-time prediction with every forward pass it needs (WS-DAN: the image and a crop
        made from its attention, logits averaged), the model already in eval mode. The evaluator
        (``finebench run``, ``finebench eval``) and ``profile``'s FLOPs use it.

        Where several passes are combined, ``logits`` holds what the method's paper averages
        (WS-DAN and CAL: the passes' logits) and ``log_probs`` its ``log_softmax``; a method that
        averages probabilities puts their log in both ``log_probs`` and ``logits`` (a log of
        probabilities is valid logits: softmax gives the probabilities back). ``scores`` and
        ``loss`` read them as one pass's output (docs/METHODS.md §4)."""
        return model(images)

    def prediction_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """The predictions ``predict`` makes beside the one ``scores`` reads, B x N each, named as
        ``eval_metrics`` names their accuracy (a dict's entries as ``key.entry``: PMG's
        ``top1_granularity.8``). The evaluator records each image's top classes under these names
        (``finebench.predictions``) and, by default, ``eval_counts`` counts their top-1 hits."""
        return {}

    def eval_counts(self, output: ModelOutput, labels: torch.Tensor) -> list[torch.Tensor]:
        """Per test batch, counts beyond top-1 (summed over batches and ranks by the evaluator):
        by default each of ``prediction_logits``' top-1 hits, in its order."""
        return [(logits.argmax(1) == labels).sum() for logits in self.prediction_logits(output).values()]

    def eval_metrics(self, counts: Sequence[float], images: float, model: nn.Module) -> dict[str, Any]:
        """The metrics.jsonl fields made from the summed ``eval_counts`` (``images`` test images)."""
        return {}

    def train_metrics(self, counts: Sequence[float], images: float) -> dict[str, Any]:
        """The metrics.jsonl fields made from an epoch's summed ``StepResult.counts`` (``images``
        training images), beside ``train_loss`` and ``train_top1``."""
        return {}

    def maps_to_draw(self, model: nn.Module, images: torch.Tensor) -> MapsToDraw | None:
        """The maps ``finebench attend`` draws for a batch, the model in eval mode; None: the
        model's Attend and Rectify modules (read with hooks). Only where ``draws_attention_maps``."""
        return None

    def size_warnings(self, options: MethodOptions, tap_sizes: Mapping[str, tuple[int, int]],
                      input_size: int) -> list[str]:
        """One line per part of the method whose mechanism cannot act at this input size (WS-DAN's
        crop on a 2x2 attention map is the whole image), naming the sizes and what works. Such a
        run still trains (it is a legitimate, if degenerate, configuration), so this warns rather
        than raises: ``run --dry-run`` and ``run`` print it, the run's summary records it and
        ``report`` footnotes its rows. ``tap_sizes``: each tap's feature-map (rows, columns) at
        ``input_size``, shallow to deep. Default: nothing to warn about."""
        return []

    def flops_passes(self) -> dict[str, int]:
        """The backbone passes summary.json's ``flops`` assumes: ``test`` per prediction (what the
        count traces: ``predict``'s passes) and ``train`` per training image (the cost of a step is
        about that many forwards and their backwards), so a reader can scale the count to either."""
        return {"test": self.test_forward_passes, "train": self.train_passes_per_image}

    def early_predictors(self, model: nn.Module) -> dict[str, nn.Module]:
        """Each cheaper prediction the method offers, as a module from images to logits (A&R: one
        attention module, the backbone run only up to its tap); ``profile`` and the run summary's
        ``module_flops`` count their FLOPs."""
        return {}


def add_terms(total: Mapping[str, torch.Tensor], terms: Mapping[str, torch.Tensor],
              weight: float) -> dict[str, torch.Tensor]:
    """``total`` plus ``weight`` times each of ``terms``: a method's own step sums its micro-batches'
    ``loss_terms`` by their share of the batch (``MicroBatch.weight``) into ``StepResult.terms``."""
    return {name: total[name] + value * weight if name in total else value * weight for name, value in terms.items()}


def incompatible(method: str, backbone: str, works: str) -> FinebenchError:
    """The one-line error of a method that cannot attach to a backbone: what works instead."""
    return FinebenchError(f"variant {method!r} on {backbone}: {works}")


def check_tap(method: str, backbone: Backbone, tap: str | None) -> None:
    """A method reading one tap (by default the deepest: WS-DAN's and CAL's attention, B-CNN's
    pooling) needs the backbone to declare it; the error lists the taps it does declare."""
    if not backbone.tap_points:
        raise FinebenchError(f"variant {method!r} on {type(backbone).__name__}: expected a backbone that "
                             "declares its last feature map as a tap point, it declares none")
    names = [point.name for point in backbone.tap_points]
    if tap is None or tap in names:
        return
    try:
        backbone.tap_point(tap)  # a torchvision model also takes any graph node (VGG's features.28)
    except FinebenchError:
        raise FinebenchError(f"variant {method!r} on {type(backbone).__name__}: tap {tap!r} is not one of its "
                             f"tap points; expected one of {', '.join(names)} (or no tap: the deepest)"
                             + (f"; or {backbone.other_taps}" if backbone.other_taps else "")) from None


def rows_of(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` whose gradient repeats bit for bit where ``index`` repeats rows (API-Net's
    partner chosen by several anchors): a method's step gathers repeated rows with this. Each of
    torch's two ways is deterministic on one device only: advanced indexing's backward sorts on
    CUDA but sums in a varying order on several CPU threads; ``index_select``'s backward
    (``index_add_``) is serial on the CPU but atomic on CUDA."""
    return values[index] if values.is_cuda else values.index_select(0, index)
