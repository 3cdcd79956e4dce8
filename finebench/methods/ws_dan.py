"""WS-DAN: Weakly Supervised Data Augmentation Network (Hu et al., arXiv 1901.09891, 2019;
the PyTorch code papers run is GuYuc/WS-DAN.PyTorch ``8777912``).

M attention maps (1x1 conv + BatchNorm (eps 1e-3) + ReLU) read the backbone's last feature map (its
deepest tap, or the tap named by ``tap``: the paper's Inception-v3 Mixed_6e); bilinear attention
pooling averages each map times each channel over the positions (an M·C vector, map-major), takes
the signed square root, L2-normalises it, and a linear layer without bias classifies 100 times that
vector. Training takes three passes per image: the raw image; a crop around the part one attention
map picks; the image with that (another) map's part erased. The maps are drawn per image with
replacement, with weights proportional to the square root of each map's mass; the crop keeps the
upsampled map (bilinear, corners aligned) at or above θ·max plus a margin, θ ~ U(0.4, 0.6); the
drop zeroes where it is at or above θ·max, θ ~ U(0.2, 0.5). Loss = the three cross-entropies over 3
plus the centre loss (each pooled vector against its class's normalised feature centre, squared
distance summed, over the batch). The test prediction averages the raw logits and those of a crop
around the mean attention map (θ 0.1, margin 0.05).

The official code draws the maps with NumPy and θ with Python ``random``; here both come from
torch (same distributions, on the device, no host round trip per image), and every draw can be
passed in (``Draws``) so tests feed the official draws. The official centre update writes
``C[y] += β(f − normalise(C[y]))`` by advanced indexing: with a class twice in a batch only one
image's update survives (the last on CPU; unspecified on CUDA). ``centre_update = "official"``
keeps that; ``"mean"`` moves each class's centre by the mean of its images' updates.
The centres are a buffer of the model (saved with it); under DDP each rank keeps its own, as CAL's
official distributed code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods.base import (
    MapsToDraw,
    Method,
    MethodOptions,
    StepContext,
    StepResult,
    add_terms,
    check_tap,
)
from finebench.methods.registry import register
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier, unwrap
from finebench.models.output import ModelOutput

EPSILON = 1e-12
"""The official signed square root's and attention weights' epsilon (CAL's is 1e-6)."""
LOGIT_SCALE = 100.0
"""The official classifier reads 100 times the normalised pooled vector."""
MIN_MAP_SIDE = 2
"""An attention map of one position cannot locate a part: the crop is the whole image."""

Box = tuple[int, int, int, int]
"""(top, bottom, left, right) pixel rows/columns of a crop, ends exclusive (a Python slice)."""


class WSDANOptions(MethodOptions):
    kind: Literal["ws_dan"]
    attentions: Annotated[int, Field(ge=1)] = 32
    """M, the number of attention maps."""
    tap: str | None = None
    """The backbone tap the maps and pooling read; None: the deepest (the last feature map). The
    paper's Inception-v3 setting reads Mixed_6e (``torchvision:inception_v3`` declares it)."""
    centre_beta: Annotated[float, Field(ge=0)] = 0.05
    """β, the rate at which feature centres follow the pooled vectors."""
    centre_weight: Annotated[float, Field(ge=0)] = 1.0
    """Weight of the centre loss (official: 1)."""
    centre_update: Literal["official", "mean"] = "official"
    """``official``: one image's update per class survives a batch (indexed assignment);
    ``mean``: each class's centre moves by the mean update of its images."""
    crop_theta_min: Annotated[float, Field(ge=0, le=1)] = 0.4
    crop_theta_max: Annotated[float, Field(ge=0, le=1)] = 0.6
    """Training crop threshold θ ~ U(min, max) times the chosen map's maximum."""
    drop_theta_min: Annotated[float, Field(ge=0, le=1)] = 0.2
    drop_theta_max: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Training drop threshold θ ~ U(min, max) times the chosen map's maximum."""
    crop_padding: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Margin added on every side of a training crop's box, as a share of the image side."""
    test_theta: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Test crop threshold (times the mean attention map's maximum)."""
    test_padding: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Margin of the test crop."""

    @model_validator(mode="after")
    def _ranges(self) -> WSDANOptions:
        for name in ("crop", "drop"):
            low, high = getattr(self, f"{name}_theta_min"), getattr(self, f"{name}_theta_max")
            if low > high:
                raise ValueError(f"{name}_theta_min={low} is above {name}_theta_max={high}")
        return self


@dataclass(frozen=True)
class Draws:
    """The random decisions of one training step (tests pass the official ones in)."""

    maps: torch.Tensor
    """B × 2 long: the attention map of each image's crop, then of its drop."""
    crop_theta: torch.Tensor
    """B: the crop threshold's fraction of the map's maximum."""
    drop_theta: torch.Tensor
    """B: the drop threshold's fraction."""


def bilinear_attention_pool(features: torch.Tensor, maps: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """B × (M·C): each map times each channel averaged over positions (map-major), signed square
    root, L2-normalised. In float32 under autocast: the position sums lose too much in half precision."""
    with torch.autocast(features.device.type, enabled=False):
        if features.dtype in (torch.float16, torch.bfloat16):
            features, maps = features.float(), maps.float()
        maps = maps.to(features.dtype)
        height, width = features.shape[-2:]
        # B × M × C sums over positions as one batched product (fvcore and flop_counter agree on bmm)
        pooled = (torch.bmm(maps.flatten(2), features.flatten(2).transpose(1, 2)) / float(height * width)).flatten(1)
        pooled = torch.sign(pooled) * torch.sqrt(torch.abs(pooled) + epsilon)
        return F.normalize(pooled, dim=-1)


def check_map_size(method: str, images: torch.Tensor, maps: torch.Tensor, tap: str) -> None:
    """The attention maps must locate something; checked on every forward, so the cost estimate of
    ``finebench run --dry-run`` (a forward at the recipe's input size) reports an input too small."""
    height, width = int(maps.shape[-2]), int(maps.shape[-1])
    if height < MIN_MAP_SIDE or width < MIN_MAP_SIDE:
        rows, cols = int(images.shape[-2]), int(images.shape[-1])
        stride = -(-max(rows, cols) // max(min(height, width), 1))
        raise FinebenchError(f"variant {method!r}: input_size {rows}x{cols} gives {height}x{width} attention maps "
                             f"on {tap!r}; expected at least {MIN_MAP_SIDE}x{MIN_MAP_SIDE} "
                             f"(input_size {MIN_MAP_SIDE * stride} or more)")


def map_weights(maps: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """B × M sampling weights: the square root of each map's mass, normalised to sum 1 per image."""
    weights = torch.sqrt(maps.detach().sum(dim=(2, 3)) + epsilon)
    return F.normalize(weights, p=1, dim=1)


def draw(maps: torch.Tensor, options: WSDANOptions, epsilon: float = EPSILON) -> Draws:
    """Two maps per image (with replacement, as ``np.random.choice``) and the two thresholds."""
    batch = maps.shape[0]
    chosen = torch.multinomial(map_weights(maps, epsilon).float(), 2, replacement=True)
    uniform = torch.rand(2, batch, device=maps.device, dtype=torch.float64)
    crop = options.crop_theta_min + (options.crop_theta_max - options.crop_theta_min) * uniform[0]
    dropped = options.drop_theta_min + (options.drop_theta_max - options.drop_theta_min) * uniform[1]
    return Draws(chosen, crop, dropped)


def pick_maps(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """B × K × H × W: each image's maps at ``index`` (B × K)."""
    return maps[torch.arange(maps.shape[0], device=maps.device)[:, None], index.to(maps.device)]


def _upsampled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B × 1 × H × W maps upsampled as the official ``F.upsample_bilinear`` (corners aligned)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def _thresholds(maps: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """B × 1 × 1 × 1: θ times each map's maximum in the map's precision (the official Python float
    times a 0-dim tensor)."""
    peak = maps.amax(dim=(1, 2, 3), keepdim=True)
    if isinstance(theta, torch.Tensor):
        return theta.to(device=maps.device, dtype=maps.dtype).view(-1, 1, 1, 1) * peak
    return theta * peak


def crop_boxes(maps: torch.Tensor, size: tuple[int, int], theta: torch.Tensor | float, padding: float) -> list[Box]:
    """Each image's crop: the bounding box of its upsampled map at or above θ·max, widened by
    ``padding`` of the image side, truncated toward zero and clipped to the image (the official
    ``batch_augment``). A map with nothing above θ (never, as θ ≤ max) would give the whole image."""
    height, width = size
    keep = _upsampled(maps, size)[:, 0] >= _thresholds(maps, theta)[:, 0]
    rows, cols = keep.any(dim=2), keep.any(dim=1)
    ends = torch.stack([rows.float().argmax(1), height - 1 - rows.flip(1).float().argmax(1),
                        cols.float().argmax(1), width - 1 - cols.flip(1).float().argmax(1)], dim=1)
    boxes = []
    for top, bottom, left, right in ends.tolist():  # one host transfer per batch
        boxes.append((max(int(top - padding * height), 0), min(int(bottom + padding * height), height),
                      max(int(left - padding * width), 0), min(int(right + padding * width), width)))
    return boxes


def crop_can_act(map_size: tuple[int, int], input_size: int, theta: float, padding: float) -> bool:
    """Whether ``crop_boxes`` can leave out a map cell's share of the image on maps of ``map_size``.

    The box spans the upsampled map at or above θ·max: out from the cells that reach it by (1 − θ)
    of a cell spacing, the spacing being (input − 1)/(cells − 1) pixels (the upsampling aligns the
    corner cells with the corner pixels), plus ``padding`` of the side, so on a map of few cells a
    box reaches nearly every edge. The case tested is a part in the middle of the image, as
    fine-grained images centre their object: the middle cell alone at the maximum (the one past
    the middle on an even side), every other cell zero, the smallest box a part there gives. The
    crop acts when that box leaves out at least one cell's share of the image (input/cells pixels)
    along the rows or the columns; on a 2x2 or 3x3 map it leaves out a few pixels at most."""
    rows, cols = map_size
    part = torch.zeros(1, 1, rows, cols)
    part[..., rows // 2, cols // 2] = 1.0
    top, bottom, left, right = crop_boxes(part, (input_size, input_size), theta, padding)[0]
    return bottom - top <= input_size - input_size / rows or right - left <= input_size - input_size / cols


def crop(images: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """Each image's box resized back to the image size (bilinear, corners aligned, as official)."""
    size = tuple(images.shape[-2:])
    return torch.cat([F.interpolate(images[i : i + 1, :, top:bottom, left:right], size=size, mode="bilinear",
                                    align_corners=True) for i, (top, bottom, left, right) in enumerate(boxes)])


def drop(images: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """The images with every pixel where the upsampled map reaches θ·max set to zero."""
    keep = _upsampled(maps, tuple(images.shape[-2:])) < _thresholds(maps, theta)
    return images * keep.to(images.dtype)


class WSDANClassifier(ImageClassifier):
    """Backbone's last map → M attention maps → bilinear attention pooling → linear (no bias).

    ``ModelOutput.aux`` is (the B × M·C pooled vectors, the B × M × H × W attention maps);
    ``centres`` (N × M·C) are the feature centres of the centre loss."""

    method = "ws_dan"
    epsilon = EPSILON

    def __init__(self, backbone: Backbone, num_classes: int, options: WSDANOptions) -> None:
        super().__init__(backbone, num_classes)
        del self.classifier  # the pooled-vector classifier replaces it
        last = backbone.tap_point(options.tap) if options.tap is not None else backbone.tap_points[-1]
        self.tap = last.name
        self.backbone_taps_read = (self.tap,)
        count = options.attentions
        self.attentions = nn.Sequential(nn.Conv2d(last.channels, count, 1, bias=False),
                                        nn.BatchNorm2d(count, eps=0.001), nn.ReLU(inplace=True))
        self.fc = nn.Linear(count * last.channels, num_classes, bias=False)
        self.register_buffer("centres", torch.zeros(num_classes, count * last.channels))
        # Each DDP rank keeps its own centres (CAL's official per-process feature_center); DDP would
        # otherwise broadcast rank 0's N × M·C buffer before every one of the three forwards.
        self._ddp_params_and_buffers_to_ignore = ["centres"]
        self.options = options

    def tap_summary(self) -> list[dict[str, Any]]:
        """Where the attention maps read (``summary.json``'s and ``profile``'s taps)."""
        return [self.tap_entry("attentions", self.tap)]

    def attend(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the backbone's last feature map, the attention maps)."""
        _, taps = self.backbone(images, [self.tap], stop_after_taps=True)
        features = taps[self.tap]
        maps = self.attentions(features)
        check_map_size(self.method, images, maps, self.tap)
        return features, maps

    def forward(self, images: torch.Tensor) -> ModelOutput:
        features, maps = self.attend(images)
        pooled = bilinear_attention_pool(features, maps, self.epsilon)
        logits = self.fc(pooled * LOGIT_SCALE)
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits, aux=(pooled, maps))

    @torch.no_grad()
    def update_centres(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Move the centres of ``labels`` toward ``pooled``; returns the normalised centres from
        before the update (the centre loss's targets), as the official step does."""
        targets = F.normalize(self.centres[labels], dim=-1)
        step = self.options.centre_beta * (pooled.detach().to(self.centres.dtype) - targets)
        if self.options.centre_update == "official":
            # The official ``centres[labels] += step`` keeps one image's update per repeated class;
            # which one is left to the indexing kernel, and torch's CPU kernel on several threads
            # varies from run to run. The last image of each class wins here, as a serial loop (the
            # golden tests' one thread, and every earlier one-thread run) does, on any thread count.
            order = torch.arange(len(labels), device=labels.device)
            last = torch.full((self.centres.shape[0],), -1, device=labels.device, dtype=order.dtype)
            last.scatter_reduce_(0, labels, order, reduce="amax")
            kept = last[labels] == order
            self.centres.index_add_(0, labels[kept], step[kept])
        else:
            total = torch.zeros_like(self.centres).index_add_(0, labels, step)
            count = torch.zeros(self.centres.shape[0], device=labels.device, dtype=step.dtype)
            count.index_add_(0, labels, torch.ones_like(labels, dtype=step.dtype))
            self.centres += total / count.clamp_min(1)[:, None]
        return targets


def full(values: torch.Tensor) -> torch.Tensor:
    """Half-precision values in float32 for a loss; float32 and float64 as they are."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def centre_loss(pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared distance of each pooled vector to its target centre, summed, over the batch."""
    pooled = full(pooled)
    return F.mse_loss(pooled, targets.to(pooled), reduction="sum") / pooled.shape[0]


@dataclass(frozen=True)
class StepLosses:
    """One WS-DAN training step's passes and loss terms (what golden tests compare)."""

    raw: ModelOutput
    crop_logits: torch.Tensor
    drop_logits: torch.Tensor
    crop_images: torch.Tensor
    drop_images: torch.Tensor
    boxes: list[Box]
    cross_entropy: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    """Raw, crop and drop cross-entropies."""
    centre: torch.Tensor
    total: torch.Tensor


def augment(images: torch.Tensor, maps: torch.Tensor, draws: Draws, options: WSDANOptions
            ) -> tuple[torch.Tensor, torch.Tensor, list[Box]]:
    """The crop and drop images of a batch from its attention maps and draws (no gradient)."""
    with torch.no_grad():
        chosen = full(pick_maps(maps.detach(), draws.maps))
        boxes = crop_boxes(chosen[:, :1], tuple(images.shape[-2:]), draws.crop_theta, options.crop_padding)
        return crop(images, boxes), drop(images, chosen[:, 1:], draws.drop_theta), boxes


def attention_train_step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor,
                         losses_of: Callable[..., Any], terms_of: Callable[..., dict[str, torch.Tensor]]) -> StepResult:
    """The step WS-DAN and CAL share: their passes and loss (``losses_of``: this module's or CAL's
    ``step_losses``) on each micro-batch, one backward each, one optimiser step; the correct count
    and the logged terms (``terms_of``: ``Method.loss_terms``) are the raw pass's."""
    model = unwrap(ctx.model)
    total = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    terms: dict[str, torch.Tensor] = {}
    ctx.zero_grad()
    for part in ctx.micro_batches(images, labels):
        losses = losses_of(model, ctx.forward, part.images, part.labels, label_smoothing=ctx.label_smoothing)
        ctx.backward(losses.total, part)
        total += losses.total.detach() * part.weight
        correct += (losses.raw.logits.argmax(1) == part.labels).sum()
        terms = add_terms(terms, terms_of(losses.raw, part.labels), part.weight)
    ctx.optimizer_step()
    return StepResult(total, correct, terms=terms)


def step_losses(model: WSDANClassifier, forward: Callable[[torch.Tensor], ModelOutput], images: torch.Tensor,
                labels: torch.Tensor, draws: Draws | None = None, label_smoothing: float = 0.0) -> StepLosses:
    """The official step's three passes and loss on one batch (the centres are updated)."""
    options = model.options
    raw = forward(images)
    pooled, maps = raw.aux
    targets = model.update_centres(pooled, labels)
    draws = draws if draws is not None else draw(maps.detach(), options, model.epsilon)
    crop_images, drop_images, boxes = augment(images, maps, draws, options)
    crop_logits = forward(crop_images).logits
    drop_logits = forward(drop_images).logits
    terms = tuple(F.cross_entropy(full(logits), labels, label_smoothing=label_smoothing)
                  for logits in (raw.logits, crop_logits, drop_logits))
    centre = centre_loss(pooled, targets)
    total = (terms[0] / 3.0 + terms[1] / 3.0 + terms[2] / 3.0) + options.centre_weight * centre
    return StepLosses(raw, crop_logits, drop_logits, crop_images, drop_images, boxes, terms, centre, total)  # type: ignore[arg-type]


def refine(model: nn.Module, images: torch.Tensor, output: ModelOutput, theta: float, padding: float) -> torch.Tensor:
    """Logits of the crop around the mean attention map (the test-time object localisation)."""
    maps = full(output.aux[1].detach().mean(dim=1, keepdim=True))
    boxes = crop_boxes(maps, tuple(images.shape[-2:]), theta, padding)
    return model(crop(images, boxes)).logits


def training_settings(options: WSDANOptions) -> str:
    """The maps, augmentation and centre settings in the paper's terms (WS-DAN's and CAL's tables)."""
    where = "" if options.tap is None else f" on {options.tap}"
    return (f"M {options.attentions}{where} · crop θ {options.crop_theta_min:g}-{options.crop_theta_max:g} "
            f"pad {options.crop_padding:g} · drop θ {options.drop_theta_min:g}-{options.drop_theta_max:g} · "
            f"centre β {options.centre_beta:g} x{options.centre_weight:g} {options.centre_update}")


DRAWN_MAPS = 7
"""``finebench attend`` draws the mean attention map and this many maps of the largest weight."""


def attention_figure(model: nn.Module, images: torch.Tensor, predictions: ModelOutput,
                     names: Sequence[str]) -> MapsToDraw:
    """What ``finebench attend`` draws for WS-DAN and CAL: the mean attention map with the test crop
    box, the maps of the largest sampling weight, and the test prediction beside the passes named
    in ``names`` (the first ``module_logits``)."""
    classifier = unwrap(model)
    maps = model(images).aux[1].detach().float()
    mean = maps.mean(dim=1, keepdim=True)
    boxes = crop_boxes(mean, tuple(images.shape[-2:]), classifier.options.test_theta, classifier.options.test_padding)
    weights = map_weights(maps, classifier.epsilon)
    order = weights.argsort(dim=1, descending=True)[:, :DRAWN_MAPS]
    captions = [["mean map (crop)"] + [f"map {int(k)}  w={float(weights[i, k]):.2f}" for k in order[i]]
                for i in range(len(order))]
    log_probs = {"prediction": F.log_softmax(predictions.logits.float(), dim=1).cpu()}
    log_probs |= {name: F.log_softmax(logits.float(), dim=1).cpu()
                  for name, logits in zip(names, predictions.module_logits, strict=False)}
    return MapsToDraw(f"attention maps on {classifier.tap} (w: sampling weight, ∝ √mass); box: the test crop",
                      torch.cat([mean, pick_maps(maps, order)], dim=1).cpu(), captions, log_probs, boxes)


class WSDAN(Method):
    kind = "ws_dan"
    description = "WS-DAN: attention maps, bilinear attention pooling, attention crop and drop (Hu et al. 2019)"
    Options = WSDANOptions
    test_forward_passes = 2
    train_passes_per_image = 3
    draws_attention_maps = True
    shown_prediction = "the raw image's and the attention crop's logits averaged (the official test)"
    prediction_labels = {"top1_raw": "the raw image alone", "top1_crop": "the attention crop alone"}
    model_class: ClassVar[type[WSDANClassifier]] = WSDANClassifier
    """The model ``attach`` builds (CAL, a subclass, builds its own)."""
    step_losses: ClassVar[Callable[..., Any]] = staticmethod(step_losses)
    """One training step's losses from the raw, crop and drop passes (CAL adds its effect terms)."""

    def table_name(self, options: WSDANOptions) -> str:  # type: ignore[override]
        name = self.kind if options.attentions == 32 else f"{self.kind}-m{options.attentions}"
        name = name if options.tap is None else f"{name}-{options.tap}"
        return name if options.centre_update == "official" else f"{name}-mean"

    def settings(self, options: WSDANOptions) -> str:  # type: ignore[override]
        return f"{training_settings(options)} · test θ {options.test_theta:g} pad {options.test_padding:g}"

    def attach(self, backbone: Backbone, num_classes: int, options: WSDANOptions) -> ImageClassifier:  # type: ignore[override]
        check_tap(self.kind, backbone, options.tap)
        return self.model_class(backbone, num_classes, options)

    def crops(self, options: WSDANOptions) -> list[tuple[str, float, float]]:
        """(name, θ, padding) of each crop the method makes: the widest training crop (θ at its
        minimum) and the test crop."""
        return [("training crop", options.crop_theta_min, options.crop_padding),
                ("test crop", options.test_theta, options.test_padding)]

    def size_warnings(self, options: WSDANOptions, tap_sizes: Mapping[str, tuple[int, int]],  # type: ignore[override]
                      input_size: int) -> list[str]:
        """The crops that are the whole image on the maps at ``input_size`` (``crop_can_act``): the
        crop pass then sees the raw image again, and the test prediction is the raw one. What works:
        the smallest input size whose maps let every crop act, and earlier taps whose maps do."""
        tap = options.tap if options.tap is not None else next(reversed(tap_sizes), None)
        if tap not in tap_sizes:
            return []  # a tap the backbone does not declare: its size is not known here

        def acts(size: tuple[int, int], pixels: int) -> bool:
            return all(crop_can_act(size, pixels, theta, padding) for _, theta, padding in self.crops(options))

        rows, cols = tap_sizes[tap]
        whole = [name for name, theta, padding in self.crops(options)
                 if not crop_can_act((rows, cols), input_size, theta, padding)]
        if not whole:
            return []
        fixes = []
        stride = input_size / min(rows, cols)
        for side in range(min(rows, cols) + 1, 64 * min(rows, cols) + 64):
            if acts((side, side), math.ceil(side * stride)):
                fixes.append(f"input_size {math.ceil(side * stride)} or more ({side}x{side} maps)")
                break
        earlier = list(tap_sizes)[: list(tap_sizes).index(tap)]
        fixes += [f"tap = {name!r} ({size[0]}x{size[1]} maps)" for name in reversed(earlier)
                  if acts(size := tap_sizes[name], input_size)][:1]
        test = (" and a test crop nearly repeats the raw prediction"
                if any(name.startswith("test crop") for name in whole) else "")
        return [(f"input_size {input_size} gives {rows}x{cols} attention maps on {tap!r}: a crop around a part in "
                 f"the middle of the image leaves out less than one map cell of it ({', '.join(whole)}), so the "
                 f"crop cannot act{test}; {' or '.join(fixes) or 'a larger input size'} lets it act")]

    def train_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Raw, crop and drop passes, one backward, one optimiser step; the correct count is the raw pass's."""
        return attention_train_step(ctx, images, labels, self.step_losses, self.loss_terms)

    def predict(self, model: nn.Module, images: torch.Tensor) -> ModelOutput:
        """Raw and crop logits averaged (official); ``module_logits`` keeps both for ``eval_counts``."""
        options = unwrap(model).options
        output = model(images)
        refined = refine(model, images, output, options.test_theta, options.test_padding)
        logits = (output.logits + refined) / 2.0
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits, module_logits=(output.logits, refined))

    def maps_to_draw(self, model: nn.Module, images: torch.Tensor) -> MapsToDraw:
        return attention_figure(model, images, self.predict(model, images), ("raw", "crop"))

    def prediction_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return dict(zip(("top1_raw", "top1_crop"), output.module_logits, strict=True))

    def eval_metrics(self, counts: Sequence[float], images: float, model: nn.Module) -> dict[str, Any]:
        raw, cropped = (100.0 * count / images for count in counts)
        return {"top1_raw": raw, "top1_crop": cropped}


METHOD = register(WSDAN())
