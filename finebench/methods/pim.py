"""PIM, the plug-in module (Chou et al. 2022; chou141253/FGVC-PIM ``348edd9``, MIT): an FPN, a weakly
supervised token selector and a graph combiner on the stages of a hierarchical backbone.

As the official ``models/pim_module/pim_module.py`` and ``main.py`` compute, on the Swin form of its
builder (``proj_type = "Linear"``, ``upsample_type = "Conv"``):

* stage features as tokens (B x N x C). On a timm Swin (``timm.models.swin_transformer``) they are
  the official ones: the official bundled timm (0.4.12) ends each stage with its patch merging and
  returns the four stage outputs without the final norm; in current timm the merging starts the
  next stage, so they are the outputs of ``layers[1..3].downsample`` and of the last stage (at 384 px
  on Swin-L: 48² x 384, 24² x 768, 12² x 1536, 12² x 1536). On any other timm backbone they are the
  deepest feature map of each of its four deepest strides (ResNet's layer1..layer4, ConvNeXt's
  stages), flattened row-major, with the same Swin-form head (the official CNN builders project with
  1 x 1 convolutions and upsample bilinearly instead: not ported);
* the FPN, top-down only: each stage Linear(C, C) -> ReLU -> Linear(C, ``fpn_size``), then from the
  deepest stage up, x_{i-1} += Conv1d(N_i -> N_{i-1}, kernel 1) over the token axis of the already
  updated x_i (an identity where the token counts are equal);
* per stage a classifier on every token: Conv1d -> BatchNorm1d -> ReLU -> Conv1d (kernel 1);
* the selector: per image, the tokens ranked by their highest class probability (softmax), the first
  ``selections[i]`` kept (features and logits), the rest dropped (their logits only);
* the combiner on the concatenated selected tokens (T of them): Linear(T -> T // 32 joints), a
  learned adjacency (I/100 + 1/100) + alpha tanh(q_i - k_j) (alpha starts at 0), Conv1d and the
  adjacency, BatchNorm1d, Linear(joints -> 1), dropout 0.1 and the classifier: finebench's prediction;
* the loss: ``stage_weight`` (0.5) x the cross-entropy of each stage's token-mean logits +
  ``selected_weight`` (0) x the cross-entropy of every selected token's logits + ``dropped_weight``
  (5) x MSE(tanh(dropped tokens' logits), -1) + ``combiner_weight`` (1) x the combiner's
  cross-entropy. The official divides it by its accumulation (2): finebench's
  ``train.accumulation_steps`` weights each part by its share, the same gradient.

The ranking is a choice of tokens, so no gradient flows through it; ties keep the lower token index
(a stable sort; the official per-image ``torch.sort`` leaves them to the kernel). Where a stage keeps
all its tokens there is nothing to drop and its dropped term is 0 (the official MSE of nothing is NaN).
``train.label_smoothing`` (the official has none) smooths every cross-entropy. The token mixing has
fixed token counts, so a model is built for one input size: a Swin's ``img_size``, otherwise the
option ``image_size`` (default: timm's input size of the model); another size is a one-line error
(``run --dry-run`` costs the model at the recipe's size, so it says so before anything is written).

The official evaluation keeps the best of about 19 accuracies on the test set (each stage, the
combiner, the selected and dropped tokens, and the "highest-1..5" sums of softmax scores). finebench
reports the combiner; ``eval_metrics`` records the others (``report --predictions``). The test
loss is the whole objective above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods.base import Method, MethodOptions, incompatible
from finebench.methods.registry import register
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier
from finebench.models.output import ModelOutput
from finebench.models.registry import build_backbone

WORKS = ("expected a timm backbone with four stages of different strides (timm:swin_*, the official; "
         "timm:resnet50, timm:convnext_tiny)")
STAGES = 4
JOINT_TOKENS = 32
"""The official combiner has one graph joint per 32 selected tokens (``total_num_selects // 32``)."""
SWIN_FAMILY = "timm.models.swin_transformer"


class PIMOptions(MethodOptions):
    kind: Literal["pim"]
    selections: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=STAGES, max_length=STAGES)] = Field(
        default_factory=lambda: [2048, 512, 128, 32])
    """Tokens the selector keeps per stage, shallow to deep (official CUB yaml: 2048, 512, 128, 32)."""
    fpn_size: Annotated[int, Field(ge=4)] = 1536
    """Width every stage is projected to (official yaml: 1536)."""
    stage_weight: Annotated[float, Field(ge=0)] = 0.5
    """Weight of each stage's cross-entropy on its token-mean logits (official ``lambda_b``)."""
    selected_weight: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the selected tokens' cross-entropy (official ``lambda_s``: 0)."""
    dropped_weight: Annotated[float, Field(ge=0)] = 5.0
    """Weight of each stage's MSE(tanh(dropped tokens' logits), -1) (official ``lambda_n``)."""
    combiner_weight: Annotated[float, Field(ge=0)] = 1.0
    """Weight of the combiner's cross-entropy (official ``lambda_c``)."""
    combiner_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout before the combiner's classifier (official 0.1)."""
    image_size: Annotated[int, Field(ge=1)] | None = None
    """Input side (px) the FPN's token mixing is built for: the recipe's ``dataset.input_size``;
    unset: the backbone's own (a Swin's ``img_size``, else timm's default input size). On a Swin,
    set its ``img_size`` instead. (Not ``input_size``: ``profile`` has that flag itself.)"""


def stage_taps(backbone: Backbone) -> tuple[str, ...] | None:
    """The deepest tap of each of the backbone's four deepest strides, or None with fewer strides."""
    deepest: dict[int, str] = {}
    for point in backbone.tap_points:
        deepest[point.stride] = point.name
    strides = sorted(deepest)
    return tuple(deepest[s] for s in strides[-STAGES:]) if len(strides) >= STAGES else None


def swin_stage_tokens(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The official Swin features: the three patch mergings' outputs and the last stage's, no final norm."""
    x = model.layers[0](model.patch_embed(images))
    found = []
    for stage in model.layers[1:]:
        x = stage.downsample(x)
        found.append(x)
        x = stage.blocks(x)
    found.append(x)
    return [tokens.flatten(1, 2) for tokens in found]  # NHWC → B x HW x C, row-major


class GraphCombiner(nn.Module):
    """The official ``GCNCombiner`` with an FPN (its projections unused), up to its pooled features."""

    def __init__(self, selected: int, width: int, dropout: float) -> None:
        super().__init__()
        joints = selected // JOINT_TOKENS
        self.param_pool0 = nn.Linear(selected, joints)
        self.adj1 = nn.Parameter(torch.eye(joints) / 100 + 1 / 100)
        self.conv1 = nn.Conv1d(width, width, 1)
        self.batch_norm1 = nn.BatchNorm1d(width)
        self.conv_q1 = nn.Conv1d(width, width // 4, 1)
        self.conv_k1 = nn.Conv1d(width, width // 4, 1)
        self.alpha1 = nn.Parameter(torch.zeros(1))
        self.param_pool1 = nn.Linear(joints, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x T x width selected tokens → B x width."""
        hidden = self.param_pool0(tokens.transpose(1, 2))  # B x width x joints
        query = self.conv_q1(hidden).mean(1)
        key = self.conv_k1(hidden).mean(1)
        adjacency = self.adj1 + torch.tanh(query[:, :, None] - key[:, None, :]) * self.alpha1
        hidden = self.batch_norm1(self.conv1(hidden) @ adjacency)
        return self.dropout(self.param_pool1(hidden)).flatten(1)


def select(features: torch.Tensor, logits: torch.Tensor, count: int,
           ranks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``WeaklySelector`` on one stage: (selected features, selected logits, dropped
    logits, ranks B x N); ``ranks`` replaces the ranking (golden tests feed the official one in)."""
    if ranks is None:
        with torch.no_grad():
            probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
            ranks = probs.amax(dim=-1).sort(dim=-1, descending=True, stable=True).indices
    kept, dropped = ranks[:, :count], ranks[:, count:]

    def rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index[:, :, None].expand(-1, -1, values.shape[-1]))  # a permutation: no repeats

    return rows(features, kept), rows(logits, kept), rows(logits, dropped), ranks


class PIMClassifier(ImageClassifier):
    """The backbone's stage tokens, the FPN, the stage classifiers, the selector and the combiner
    (module docstring); ``classifier`` is the combiner's last layer.

    ``aux`` (training and test): each stage's token logits (B x N_i x K, shallow to deep), the
    selected tokens' logits, the dropped tokens' logits, the ranks (B x N_i), four of each, then the
    loss weights (stage, selected, dropped, combiner) as one tensor."""

    def __init__(self, backbone: Backbone, num_classes: int, options: PIMOptions, name: str) -> None:
        super().__init__(backbone, num_classes)
        model = getattr(backbone, "model", None)
        self.swin = type(model).__module__ == SWIN_FAMILY and len(getattr(model, "layers", ())) == STAGES
        taps = stage_taps(backbone)
        if not self.swin and (model is None or taps is None):
            raise incompatible("pim", name, WORKS)
        self.taps = taps if not self.swin else ()
        # a Swin's merged stages are no taps: it reads up to its last stage (never the final norm)
        self.backbone_taps_read = (backbone.tap_points[-1].name,) if self.swin else taps
        self.input_size, shapes = self._stage_shapes(backbone, options, name)
        counts, selections = [n for n, _ in shapes], list(options.selections)
        if any(s > n for s, n in zip(selections, counts, strict=True)):
            stage = next(i for i, (s, n) in enumerate(zip(selections, counts, strict=True)) if s > n)
            raise FinebenchError(
                f"variant 'pim' on {name}: selections[{stage}] = {selections[stage]} is more than stage {stage + 1}'s "
                f"{counts[stage]} tokens at {self.input_size[0]} px; expected at most "
                f"{'/'.join(map(str, counts))} (one count per stage, shallow to deep)")
        if sum(selections) < JOINT_TOKENS:
            raise FinebenchError(f"variant 'pim': selections total {sum(selections)}; expected at least {JOINT_TOKENS} "
                                 f"(the combiner has one graph joint per {JOINT_TOKENS} selected tokens)")
        self.selections = selections
        width = options.fpn_size
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, width)) for _, c in shapes)
        self.mixers = nn.ModuleList(
            nn.Conv1d(counts[i], counts[i - 1], 1) if counts[i] != counts[i - 1] else nn.Identity()
            for i in range(1, STAGES))
        self.stage_heads = nn.ModuleList(
            nn.Sequential(nn.Conv1d(width, width, 1), nn.BatchNorm1d(width), nn.ReLU(), nn.Conv1d(width, num_classes, 1))
            for _ in range(STAGES))
        self.combiner = GraphCombiner(sum(selections), width, options.combiner_dropout)
        self.classifier = nn.Linear(width, num_classes)  # PyTorch's default initialisation, as the official
        weights = (options.stage_weight, options.selected_weight, options.dropped_weight, options.combiner_weight)
        # float64 so that a float64 model uses the weights themselves (they never promote a float32 loss)
        self.register_buffer("loss_weights", torch.tensor(weights, dtype=torch.float64), persistent=False)

    def _stage_shapes(self, backbone: Backbone, options: PIMOptions,
                      name: str) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """The input size and (tokens, channels) per stage: a Swin's from its configuration, any other
        backbone's from one blank image (the FPN's token mixing needs the counts)."""
        model = backbone.model
        if self.swin:
            size = tuple(model.patch_embed.img_size)
            if options.image_size is not None and (options.image_size, options.image_size) != size:
                raise FinebenchError(f"variant 'pim' on {name}: image_size {options.image_size} but the Swin is built "
                                     f"for {size[0]}; expected the backbone option img_size = {options.image_size}")
            # feature_info names each stage's output channels (its merging's, for stages 1-3)
            stages = [*range(1, STAGES), STAGES - 1]
            resolution = [model.layers[i].output_resolution for i in stages]
            return size, [(h * w, backbone.tap_points[i].channels) for i, (h, w) in zip(stages, resolution, strict=True)]
        side = options.image_size or int(model.pretrained_cfg["input_size"][-1])
        probe = next(backbone.parameters())
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                _, maps = backbone(torch.zeros(1, 3, side, side, dtype=probe.dtype), list(self.taps),
                                   stop_after_taps=True)
        finally:
            backbone.train(was_training)
        return (side, side), [(maps[t].shape[2] * maps[t].shape[3], maps[t].shape[1]) for t in self.taps]

    def unused_parameter_names(self, input_size: int | None = None) -> list[str]:
        """Probed at the size the model is built for where the caller knows none (a Swin takes no other)."""
        return super().unused_parameter_names(self.input_size[0] if input_size is None else input_size)

    def stage_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = tuple(int(side) for side in images.shape[-2:])  # ints under fvcore's trace too
        if size != self.input_size:
            raise FinebenchError(f"variant 'pim': input {size} but the model was built for "
                                 f"{self.input_size} (the FPN mixes a fixed number of tokens); expected the recipe's "
                                 "input_size to match the backbone option img_size (Swin) or the option image_size")
        if self.swin:
            return swin_stage_tokens(self.backbone.model, images)
        _, maps = self.backbone(images, list(self.taps), stop_after_taps=True)
        return [maps[t].flatten(2).transpose(1, 2) for t in self.taps]

    def head(self, tokens: Sequence[torch.Tensor],
             ranks: Sequence[torch.Tensor] | None = None) -> ModelOutput:
        """Everything after the backbone, on its four stage token tensors (golden tests feed them in)."""
        hidden = [projection(t) for projection, t in zip(self.projections, tokens, strict=True)]
        for i in range(STAGES - 1, 0, -1):
            hidden[i - 1] = self.mixers[i - 1](hidden[i]) + hidden[i - 1]
        stage_logits = [head(h.transpose(1, 2)).transpose(1, 2) for head, h in zip(self.stage_heads, hidden, strict=True)]
        picked = [select(h, logits, count, None if ranks is None else ranks[i])
                  for i, (h, logits, count) in enumerate(zip(hidden, stage_logits, self.selections, strict=True))]
        pooled = self.combiner(torch.cat([p[0] for p in picked], dim=1))
        logits = self.classifier(pooled)
        aux = (*stage_logits, *(p[1] for p in picked), *(p[2] for p in picked), *(p[3] for p in picked),
               self.loss_weights)
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits, aux=aux)

    def forward(self, images: torch.Tensor, ranks: Sequence[torch.Tensor] | None = None) -> ModelOutput:
        return self.head(self.stage_tokens(images), ranks)


def loss_terms(output: ModelOutput, labels: torch.Tensor,
               label_smoothing: float = 0.0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, weight, unweighted term) in the official order: each stage's cross-entropy, then per
    stage the selected tokens' cross-entropy and the dropped tokens' MSE, then the combiner's.
    ``label_smoothing`` (``train.label_smoothing``; the official has none) smooths every cross-entropy."""
    stage, selected, dropped = output.aux[0:4], output.aux[4:8], output.aux[8:12]
    w_stage, w_selected, w_dropped, w_combiner = output.aux[16].unbind()

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32))  # fp16 → fp32, float64 kept

    def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    terms = [(f"stage{i + 1}", w_stage, cross_entropy(wide(s).mean(1), labels)) for i, s in enumerate(stage)]
    for i, (kept, left) in enumerate(zip(selected, dropped, strict=True)):
        classes = kept.shape[-1]
        terms.append((f"selected{i + 1}", w_selected,
                      cross_entropy(wide(kept).reshape(-1, classes), labels.repeat_interleave(kept.shape[1]))))
        if left.shape[1]:
            tanh = torch.tanh(wide(left))
            terms.append((f"dropped{i + 1}", w_dropped, F.mse_loss(tanh, torch.full_like(tanh, -1.0))))
    terms.append(("combiner", w_combiner, cross_entropy(wide(output.logits), labels)))
    return terms


class PIM(Method):
    kind = "pim"
    description = "PIM: FPN, weakly supervised token selection and a graph combiner on the backbone's stages (Chou et al. 2022)"
    Options = PIMOptions
    shown_prediction = "the combiner"
    prediction_labels: ClassVar[Mapping[str, str]] = {
        **{f"top1_stage.{i}": f"stage {i} alone (its tokens' mean logits)" for i in range(1, 5)},
        **{f"top1_selected.{i}": f"stage {i}'s selected tokens, each token a prediction" for i in range(1, 5)},
        **{f"top1_dropped.{i}": f"stage {i}'s dropped tokens, each token a prediction" for i in range(1, 5)},
        **{f"top1_highest.{i}": f"softmax scores of the {i} least confident heads summed (official 'highest-{i}')"
           for i in range(1, 6)},
    }

    def table_name(self, options: PIMOptions) -> str:  # type: ignore[override]
        default = PIMOptions(kind="pim")
        parts = [self.kind]
        if options.selections != default.selections:
            parts.append("s" + "-".join(map(str, options.selections)))
        if options.fpn_size != default.fpn_size:
            parts.append(f"f{options.fpn_size}")
        if options.image_size is not None:
            parts.append(f"i{options.image_size}")
        parts += [f"{key}{getattr(options, key):g}"
                  for key in ("stage_weight", "selected_weight", "dropped_weight", "combiner_weight", "combiner_dropout")
                  if getattr(options, key) != getattr(default, key)]
        return "-".join(parts)

    def settings(self, options: PIMOptions) -> str:  # type: ignore[override]
        return (f"selections {'/'.join(map(str, options.selections))} · FPN {options.fpn_size} · loss {options.stage_weight:g} "
                f"stages + {options.selected_weight:g} selected + {options.dropped_weight:g} dropped + "
                f"{options.combiner_weight:g} combiner")

    def check_backbone(self, backbone: str, options: PIMOptions) -> None:  # type: ignore[override]
        """timm backbones only; ``attach`` then checks for four strides (a plain ViT has one)."""
        if not backbone.startswith("timm:"):
            raise incompatible(self.kind, backbone, WORKS)

    def build_backbone(self, backbone: str, backbone_options: Mapping[str, Any] | None,
                       options: PIMOptions) -> Backbone:  # type: ignore[override]
        net = build_backbone(backbone, backbone_options)
        net.pim_name = backbone  # for attach's one-line errors
        return net

    def attach(self, backbone: Backbone, num_classes: int, options: PIMOptions) -> ImageClassifier:  # type: ignore[override]
        return PIMClassifier(backbone, num_classes, options, getattr(backbone, "pim_name", type(backbone).__name__))

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """The official weighted sum (module docstring)."""
        total = None
        for _, weight, term in loss_terms(output, labels, label_smoothing):
            total = weight * term if total is None else total + weight * term
        assert total is not None
        return total.to(torch.promote_types(output.logits.dtype, torch.float32))

    def eval_counts(self, output: ModelOutput, labels: torch.Tensor) -> list[torch.Tensor]:
        """Per stage the correct images; per stage the correct selected tokens and their number, the
        same for the dropped; then the highest-1..5 correct images (``eval_metrics``)."""
        stage, selected, dropped = output.aux[0:4], output.aux[4:8], output.aux[8:12]
        means = [s.float().mean(1) for s in stage]
        counts = [(m.argmax(1) == labels).sum() for m in means]
        for group in (selected, dropped):
            for tokens in group:
                counts += [(tokens.argmax(-1) == labels[:, None]).sum(), labels.new_tensor(tokens.shape[0] * tokens.shape[1])]
        # the official "highest-k": the heads (stages, combiner) ordered by their top softmax score, ascending
        scores = torch.stack([*means, output.logits.float()], dim=1).softmax(dim=-1)
        order = scores.amax(dim=-1).sort(dim=1, stable=True).indices
        summed = scores.gather(1, order[:, :, None].expand_as(scores)).cumsum(dim=1)
        counts += [(summed[:, k].argmax(-1) == labels).sum() for k in range(scores.shape[1])]
        return counts

    def eval_metrics(self, counts: Sequence[float], images: float, model: nn.Module) -> dict[str, Any]:
        def share(correct: float, total: float) -> float | None:
            return 100.0 * correct / total if total else None

        stages = [share(c, images) for c in counts[:4]]
        pairs = [share(counts[4 + 2 * i], counts[5 + 2 * i]) for i in range(8)]
        highest = [share(c, images) for c in counts[20:25]]
        names = [str(i) for i in range(1, 5)]
        return {"top1_stage": dict(zip(names, stages, strict=True)),
                "top1_selected": dict(zip(names, pairs[:4], strict=True)),
                "top1_dropped": dict(zip(names, pairs[4:], strict=True)),
                "top1_highest": {str(k): v for k, v in enumerate(highest, start=1)}}


METHOD = register(PIM())
