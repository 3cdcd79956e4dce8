"""Attentive Pairwise Interaction (Zhuang et al., AAAI 2020; PeiqinZhuang/API-Net ``c4996c7``).

Training looks at images in pairs mined from the batch by the Euclidean distance of their pooled
features: each image is the anchor of one intra-class pair (its nearest other image of the same
class) and one inter-class pair (its nearest image of another class), 2B pairs for B images. A
mutual vector x_m = W2·drop(W1·[x1; x2]) (no activation between, as the official code) gates
both features: g_i = σ(x_m ⊙ x_i), x_i^self = x_i + g_i ⊙ x_i, x_i^other = x_i + g_j ⊙ x_i. The
classifier reads the four gated features (dropout before each), and the loss is the
cross-entropy of all 8B rows plus a score-ranking hinge: each image's true-class softmax score
should beat the one under its partner's gate by ``margin`` (mean of max(0, margin − (p_self −
p_other)) over the 4B rows). At test time nothing of this runs: the prediction is the plain
classifier on the pooled feature, so ``test_forward_passes = 1``, and training takes one backbone
pass per image too (``train_passes_per_image = 1``): the pair head adds two small linear layers
on 2B pairs and four classifier calls on gated copies of the pooled features, work on B × C
vectors that is small beside the backbone (profile's FLOPs count the test prediction only).

Pairs need classes in pairs: the batch sampler (``ClassBalancedSampler``) draws
``classes_per_batch`` classes × ``images_per_class`` images per batch, as the official
``BalancedBatchSampler`` (30 × 4). Pairs are mined within each part of a batch that runs forward
together: under ``train.accumulation_steps = a`` and W data-parallel workers, a global batch is
cut into W·a parts and each mines its own pairs. The sampler lays each batch out class by class,
so every part holds whole classes when the classes split evenly across the parts (checked at
``--dry-run`` for ``a`` and when the loaders are built for W): a W-worker run then mines the very
pairs a one-process run with W-fold accumulation mines. Mining over the whole batch instead would
need the features of every part at once (no memory saved by accumulation) or partner features
without gradient (a different loss).

The official code fixes 200 classes, a 14 × 14 average pool (448 px) and ResNet-101; here the
classes, the pooled width and the backbone come from the run. Its training leaves the backbone's
optimiser idle for the first 8 epochs (the lr schedule and BatchNorm statistics still move):
``freeze_backbone_epochs``. Official default behaviour and the options are in docs/PEERS.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Sampler

from finebench.errors import FinebenchError
from finebench.methods.base import (
    Method,
    MethodOptions,
    StepContext,
    StepResult,
    add_terms,
    rows_of,
)
from finebench.methods.registry import register
from finebench.models.base import Backbone
from finebench.models.network import (
    ImageClassifier,
    drop_gradients,
    parameter_groups,
    unwrap,
)
from finebench.models.output import ModelOutput
from finebench.train_settings import TrainSection


class APINetOptions(MethodOptions):
    kind: Literal["api_net"]
    images_per_class: Annotated[int, Field(ge=2)] = 4
    """Images of each class in a batch (the official ``n_samples``); an intra-class pair needs two."""
    classes_per_batch: Annotated[int, Field(ge=2)] | None = None
    """Classes per batch (the official ``n_classes``, 30): sets the run's batch size to
    classes × images_per_class. None keeps the recipe's batch size (its classes = batch / images)."""
    margin: Annotated[float, Field(ge=0)] = 0.05
    """Margin of the score-ranking hinge (official 0.05)."""
    hidden: Annotated[int, Field(ge=1)] = 512
    """Width of the mutual vector's hidden layer (official 512)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5
    """Dropout after the hidden layer and before each of the four classifier calls (official 0.5)."""
    mutual_activation: Literal["none", "relu"] = "none"
    """``none``: no activation between the mutual vector's two layers (the official code: one linear
    map of rank ``hidden``); ``relu``: a ReLU there (a two-layer MLP)."""
    freeze_backbone_epochs: Annotated[int, Field(ge=0)] = 8
    """Epochs (from the first) in which the backbone takes no optimiser step (official 8)."""


# ---- pairs -----------------------------------------------------------------------------------


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (autocast) in float32; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def pair_distances(features: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances of the rows, as the official ``pdist`` forms them (float32 at least,
    no gradient): −2·X·Xᵀ + ‖x_j‖² + ‖x_i‖², in that order, so near ties fall the official way."""
    x = full_precision(features.detach())
    squares = x.pow(2).sum(dim=1)
    return -2 * x.mm(x.t()) + squares.view(1, -1) + squares.view(-1, 1)


def mine_pairs(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors, partners), 2B each: image i with its nearest same-class image (i = 0..B-1), then
    with its nearest other-class image. The first index wins ties; an image with no candidate
    (no other image of its class, or no other class) is paired with image 0, as the official
    ``argmin`` over a row of infinities does."""
    distances = pair_distances(features)
    same = labels.view(-1, 1) == labels.view(1, -1)
    diagonal = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    infinity = torch.full_like(distances, float("inf"))
    intra = torch.where(same & ~diagonal, distances, infinity).argmin(dim=1)
    inter = torch.where(~same, distances, infinity).argmin(dim=1)
    anchors = torch.arange(len(labels), device=labels.device)
    return torch.cat([anchors, anchors]), torch.cat([intra, inter])


# ---- model -----------------------------------------------------------------------------------


class APINetClassifier(ImageClassifier):
    """Backbone → pooled feature → classifier, with the pair head used in training only.

    ``forward(images)`` (or any eval-mode call) returns the plain classifier's logits. In training,
    ``forward(images, labels=...)`` mines the pairs and returns ``aux`` = (self logits 4B × N,
    other logits 4B × N, their labels 4B, the margin as a 0-dim tensor): rows 0..2B-1 are the
    anchors (intra pairs, then inter pairs), rows 2B..4B-1 their partners, as the official
    ``[logit1_self; logit2_self]``; ``logits`` stay the plain classifier's (train top-1)."""

    def __init__(self, backbone: Backbone, num_classes: int, options: APINetOptions) -> None:
        super().__init__(backbone, num_classes)
        width = backbone.out_channels
        self.map1 = nn.Linear(2 * width, options.hidden)
        self.activation = nn.ReLU() if options.mutual_activation == "relu" else nn.Identity()
        self.map2 = nn.Linear(options.hidden, width)
        self.drop = nn.Dropout(options.dropout)
        self.freeze_backbone_epochs = options.freeze_backbone_epochs
        self.margin = options.margin

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        """``pairs`` (anchors, partners) replaces the mining (golden tests feed the official pairs in)."""
        pooled, _ = self.backbone(images)
        assert pooled is not None
        logits = self.classifier(pooled)
        log_probs = F.log_softmax(full_precision(logits), dim=1)
        if not self.training or labels is None:
            return ModelOutput(log_probs, logits)
        anchors, partners = mine_pairs(pooled, labels) if pairs is None else pairs
        x1, x2 = rows_of(pooled, anchors), rows_of(pooled, partners)
        mutual = self.map2(self.drop(self.activation(self.map1(torch.cat([x1, x2], dim=1)))))
        gate1, gate2 = torch.sigmoid(mutual * x1), torch.sigmoid(mutual * x2)
        # the official order of the four dropout masks: x1 self, x1 other, x2 self, x2 other
        s1_self = self.classifier(self.drop(gate1 * x1 + x1))
        s1_other = self.classifier(self.drop(gate2 * x1 + x1))
        s2_self = self.classifier(self.drop(gate2 * x2 + x2))
        s2_other = self.classifier(self.drop(gate1 * x2 + x2))
        # the margin in the loss's precision, made here so that a float64 model keeps it exact
        margin = torch.full((), self.margin, dtype=full_precision(s1_self).dtype, device=s1_self.device)
        aux = (torch.cat([s1_self, s2_self]), torch.cat([s1_other, s2_other]),
               torch.cat([labels[anchors], labels[partners]]), margin)
        return ModelOutput(log_probs, logits, aux=aux)


def pair_terms(output: ModelOutput, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy over the 8B pair rows, the mean ranking hinge, p_self − p_other of the 4B rows).

    The official ``MarginRankingLoss(margin)`` with target 1 on the true-class softmax scores:
    max(0, margin − (p_self − p_other)) per row."""
    self_logits, other_logits, pair_labels, margin = output.aux
    self_logits, other_logits = full_precision(self_logits), full_precision(other_logits)
    ce = F.cross_entropy(torch.cat([self_logits, other_logits]), torch.cat([pair_labels, pair_labels]),
                         label_smoothing=label_smoothing)
    rows = torch.arange(len(pair_labels), device=pair_labels.device)
    p_self = F.softmax(self_logits, dim=1)[rows, pair_labels]
    p_other = F.softmax(other_logits, dim=1)[rows, pair_labels]
    lead = p_self - p_other
    return ce, (margin - lead).clamp_min(0).mean(), lead


# ---- batches ---------------------------------------------------------------------------------


def batch_problem(batch_size: int, images_per_class: int, parts: int, what: str) -> str | None:
    """Why a batch cannot be cut into ``parts`` parts (``what``: "micro-batches", "workers") of whole
    classes, at least two classes each (pairs need a partner of another class); None if it can."""
    k = images_per_class
    if batch_size % k:
        lower, upper = batch_size - batch_size % k, batch_size + k - batch_size % k
        near = " or ".join(str(m) for m in (lower, upper) if m >= 2 * k) or str(2 * k)
        return f"train.batch_size = {batch_size} is not a multiple of images_per_class = {k}; expected e.g. {near}"
    classes = batch_size // k
    if classes % parts == 0 and classes // parts >= 2:
        return None
    good = max(2 * parts, -(-classes // parts) * parts) * k
    if parts == 1:
        return (f"train.batch_size = {batch_size} holds {classes} class x {k} images, and inter-class pairs need "
                f"at least 2 classes per batch; expected batch_size >= {good}")
    return (f"train.batch_size = {batch_size} holds {classes} classes x {k} images, which do not split into "
            f"{parts} {what} of whole classes, at least 2 each (pairs are mined within each); expected a multiple "
            f"of {parts} classes, at least {2 * parts} (e.g. batch_size = {good})")


class ClassBalancedSampler(Sampler[int]):
    """``classes_per_batch`` classes × ``images_per_class`` images per global batch, class by class.

    Per epoch, from ``RandomState(seed + epoch)`` and in the official ``BalancedBatchSampler``'s
    order of draws: each class's image list is shuffled (classes in ascending order), then each
    batch draws its classes without replacement and takes the next images of each; a class whose
    list has fewer than ``images_per_class`` left is reshuffled and restarts. So with NumPy's global
    seed s an official sampler's first epoch equals this one's with seed + epoch = s. Here each epoch
    starts afresh (the official carries lists and positions over), so every worker and a resumed run
    compute the same order from the seed alone. Each worker takes its contiguous share of every
    global batch (whole classes: ``classes_per_batch`` must split evenly across the workers). An
    epoch has len(labels) // batch batches (the official: the same, one fewer when it divides)."""

    def __init__(self, labels: Sequence[int], classes_per_batch: int, images_per_class: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        # imported here: the data layer costs 0.3 s, which every command listing methods would pay
        from finebench.data.loader import per_worker_batch

        labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.unique(labels)
        self.members = [np.flatnonzero(labels == label) for label in self.classes]
        self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.global_batch = classes_per_batch * images_per_class
        problem = batch_problem(self.global_batch, images_per_class, world_size, "workers")
        if problem:
            raise FinebenchError(f"variant 'api_net': {problem}")
        self.local_batch = per_worker_batch(self.global_batch, world_size)
        if classes_per_batch > len(self.classes):
            raise FinebenchError(f"variant 'api_net': {classes_per_batch} classes per batch but the training split "
                                 f"has {len(self.classes)}; expected a batch of at most {len(self.classes)} classes "
                                 f"x {images_per_class} images")
        sizes = np.array([len(m) for m in self.members])
        if sizes.min() < images_per_class:
            label = self.classes[int(sizes.argmin())]
            raise FinebenchError(f"variant 'api_net': class {label} has {sizes.min()} training images, fewer than "
                                 f"images_per_class = {images_per_class}; expected images_per_class <= {sizes.min()}")
        self.steps = len(labels) // self.global_batch  # >= 1: classes_per_batch classes of >= k images exist

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.local_batch

    def global_batches(self) -> np.ndarray:
        """The epoch's batches (steps × global batch), the same on every worker."""
        draw = np.random.RandomState(self.seed + self.epoch)
        lists = [members.copy() for members in self.members]
        for members in lists:
            draw.shuffle(members)
        used = [0] * len(lists)
        k = self.images_per_class
        batches = np.empty((self.steps, self.global_batch), dtype=np.int64)
        for step in range(self.steps):
            chosen = draw.choice(len(self.classes), self.classes_per_batch, replace=False)
            for slot, index in enumerate(chosen):
                batches[step, slot * k:(slot + 1) * k] = lists[index][used[index]:used[index] + k]
                used[index] += k
                if used[index] + k > len(lists[index]):
                    draw.shuffle(lists[index])
                    used[index] = 0
        return batches

    def indices(self) -> torch.Tensor:
        share = self.global_batches()[:, self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        return torch.from_numpy(share.reshape(-1).copy())

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


# ---- method ----------------------------------------------------------------------------------


PAIR_COUNTS = ("rows", "self_wins", "margin_met", "hinge_sum", "ce_sum")
"""The step's per-batch sums (``StepResult.counts``): pair rows (4B), rows whose true-class score
under its own gate beats the one under its partner's, rows meeting the margin, the hinge summed,
the pair cross-entropy summed over its 8B rows."""


class APINet(Method):
    kind = "api_net"
    description = "Attentive Pairwise Interaction: mined intra/inter-class pairs, mutual gates, score ranking (Zhuang et al. 2020)"
    Options = APINetOptions
    prediction_labels = {
        "train_pairs.self_beats_other": "training pairs: own-gate score above the partner's (%, last epoch)",
        "train_pairs.margin_met": "training pairs: ahead by the margin (%, last epoch)",
        "train_pairs.rank_loss": "training pairs: mean ranking loss (last epoch)",
        "train_pairs.ce": "training pairs: mean cross-entropy (last epoch)",
    }

    def table_name(self, options: APINetOptions) -> str:  # type: ignore[override]
        default = APINetOptions(kind="api_net")
        short = {"images_per_class": "k", "classes_per_batch": "n", "margin": "m", "hidden": "h", "dropout": "d",
                 "freeze_backbone_epochs": "f"}
        parts = [f"{tag}{getattr(options, key):g}" for key, tag in short.items()
                 if getattr(options, key) != getattr(default, key)]
        if options.mutual_activation != default.mutual_activation:
            parts.append(options.mutual_activation)
        return "-".join([self.kind, *parts])

    def settings(self, options: APINetOptions) -> str:  # type: ignore[override]
        k = options.images_per_class
        classes = f"batch/{k}" if options.classes_per_batch is None else str(options.classes_per_batch)
        mlp = "" if options.mutual_activation == "none" else f" {options.mutual_activation}"
        return (f"{classes} classes x {k} images, margin {options.margin:g}, "
                f"hidden {options.hidden}{mlp}, dropout {options.dropout:g}, "
                f"backbone frozen {options.freeze_backbone_epochs} epochs")

    def train_settings(self, train: TrainSection, options: APINetOptions) -> TrainSection:  # type: ignore[override]
        if options.classes_per_batch is not None:
            train = train.model_copy(update={"batch_size": options.classes_per_batch * options.images_per_class})
        problem = batch_problem(train.batch_size, options.images_per_class, train.accumulation_steps,
                                "micro-batches (train.accumulation_steps)")
        if problem:
            raise FinebenchError(f"variant 'api_net': {problem}")
        return train

    def attach(self, backbone: Backbone, num_classes: int, options: APINetOptions) -> ImageClassifier:  # type: ignore[override]
        return APINetClassifier(backbone, num_classes, options)

    def batch_sampler(self, options: APINetOptions, labels: Sequence[int], batch_size: int, *,  # type: ignore[override]
                      seed: int, rank: int, world_size: int) -> ClassBalancedSampler:
        return ClassBalancedSampler(labels, batch_size // options.images_per_class, options.images_per_class,
                                    seed=seed, rank=rank, world_size=world_size)

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """Training (pair outputs in ``aux``): pair cross-entropy + ranking hinge; else the plain CE."""
        if not output.aux:
            return F.cross_entropy(output.logits.float(), labels, label_smoothing=label_smoothing)
        ce, rank, _ = pair_terms(output, label_smoothing)
        return ce + rank

    def train_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One optimiser step; each micro-batch mines its own pairs (module docstring). The loss logged
        is the pair loss, top-1 the plain classifier's on the training images. In the first
        ``freeze_backbone_epochs`` epochs the backbone's gradients are dropped before the step, so
        it takes neither update, weight decay nor momentum (the official idle optimiser)."""
        model = unwrap(ctx.model)
        ctx.zero_grad()
        total = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device, dtype=torch.long)
        sums = torch.zeros(len(PAIR_COUNTS), device=labels.device, dtype=torch.float64)
        terms: dict[str, torch.Tensor] = {}
        for part in ctx.micro_batches(images, labels):
            output = ctx.forward(part.images, labels=part.labels)
            ce, rank, lead = pair_terms(output, ctx.label_smoothing)
            loss = ce + rank
            ctx.backward(loss, part)
            total += loss.detach() * part.weight
            correct += (output.logits.argmax(1) == part.labels).sum()
            terms = add_terms(terms, self.loss_terms(output, part.labels), part.weight)
            with torch.no_grad():
                rows = len(lead)
                sums += torch.stack([lead.new_tensor(float(rows)), (lead > 0).sum().float(),
                                     (lead >= output.aux[3]).sum().float(), rank * rows, ce * 2 * rows]).double()
        if ctx.epoch <= model.freeze_backbone_epochs:
            drop_gradients(parameter_groups(model)["backbone"])
        ctx.optimizer_step()
        return StepResult(total, correct, counts=tuple(sums), terms=terms)

    def train_metrics(self, counts: Sequence[float], images: float) -> dict[str, Any]:
        sums = dict(zip(PAIR_COUNTS, counts, strict=True))
        rows = sums["rows"] or 1.0
        return {"train_pairs": {"self_beats_other": 100.0 * sums["self_wins"] / rows,
                                "margin_met": 100.0 * sums["margin_met"] / rows,
                                "rank_loss": sums["hinge_sum"] / rows, "ce": sums["ce_sum"] / (2 * rows)}}


METHOD = register(APINet())
