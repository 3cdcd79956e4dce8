"""Any timm CNN as a finebench backbone (``backbone = "timm:<name>"``), taps read from the model itself.

timm models describe their own feature maps (``feature_info``: module name, channels, reduction)
and return them with ``forward_intermediates``, so the adapter keeps no per-architecture table:
tap names are timm's module names (``layer3``, ``stages.2``, ``blocks.4``), and the authors'
"deepest taps before the final stage" rule is the same for every model.

SE, CBAM and ECA go in through timm's own block attention layers (``attn_layer``) at
construction, where the model family takes one; weights never download: they come from timm's
cache or a local ``.pth``/``.safetensors`` file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finebench.errors import FinebenchError
from finebench.models.base import Backbone, TapPoint, read_weights_file

_ATTENTION_KWARGS = {
    # How a timm model family takes a block attention layer: ResNet-family blocks through
    # ``block_args``, ByobNet through its config (its constructor overlays keyword arguments).
    "timm.models.resnet": lambda layer: {"block_args": {"attn_layer": layer}},
    "timm.models.byobnet": lambda layer: {"attn_layer": layer},
}


_RESERVED_OPTIONS = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "num_classes",
     "features_only", "out_indices"}
)
"""create_model arguments finebench owns: weights never download, and the head is finebench's."""


def _timm():  # noqa: ANN202 - the module
    """timm imports in about a second; only timm backbones pay for it."""
    import timm

    return timm


def _check_known(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name.split(".", 1)[0]):
        close = timm.list_models(f"*{name.split('.', 1)[0][:6]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise FinebenchError(f"unknown timm model {name!r}: expected a name from timm.list_models(){hint}")


def attention_layer(kind: str, reduction: int | None) -> Any:
    """timm's attention layer of that name (``timm.layers.get_attn``), with finebench's reduction;
    ``None`` for a layer without a bottleneck (ECA: its 1-D kernel follows the channel count)."""
    from timm.layers import get_attn

    layer = get_attn(kind)
    return layer if reduction is None else partial(layer, rd_ratio=1.0 / reduction)


class TimmBackbone(Backbone):
    """A timm model without its classifier; taps are the entries of its ``feature_info``.

    ``forward`` asks ``forward_intermediates`` for the requested taps; timm returns them
    shallow to deep whatever order they were asked in, so they are mapped back by index.
    """

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, block_attention: tuple[str, int | None] | None = None,
    ) -> None:
        super().__init__()
        _check_known(name)
        self.model_name = name
        self.options = dict(options or {})
        reserved = sorted(set(self.options) & _RESERVED_OPTIONS)
        if reserved:
            raise FinebenchError(
                f"option {reserved[0]!r} for backbone timm:{name} is set by finebench: weights come from "
                'model.pretrained ("timm" or a file), the classifier from the dataset'
            )
        self.block_attention = block_attention
        self.model = self._create(pretrained_file=None)
        model = self.model
        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            raise FinebenchError(
                f"timm model {name!r} has no feature taps (feature_info and forward_intermediates): "
                "expected a convolutional timm model, e.g. resnet50, convnext_tiny, efficientnet_b0"
            )
        self.tap_points = tuple(
            TapPoint(str(info["module"]), int(info["num_chs"]), int(info["reduction"]), f"timm feature {i}")
            for i, info in enumerate(model.feature_info)
        )
        if len(self.tap_points) < 2:
            raise FinebenchError(
                f"timm model {name!r} has no convolutional feature maps (taps "
                f"{[t.name for t in self.tap_points]}): expected a CNN with strided stages"
            )
        self._index = {tap.name: i for i, tap in enumerate(self.tap_points)}
        self.out_channels = int(getattr(model, "head_hidden_size", None) or model.num_features)
        # The authors' rule: every tap before the final stage, deepest first.
        self.attention_candidates = tuple(t.name for t in reversed(self.tap_points[:-1]))

    def _create(self, pretrained_file: Path | None) -> nn.Module:
        """Build the timm model (classifier removed); with a weights file, the plain model (no block
        attention: the file has none) loaded with them."""
        kwargs: dict[str, Any] = {**self.options, "num_classes": 0}
        if self.block_attention is not None and pretrained_file is None:
            kind, reduction = self.block_attention
            family = _timm().models.model_entrypoint(self.model_name.split(".", 1)[0]).__module__
            if family not in _ATTENTION_KWARGS:
                families = ", ".join(f.rsplit(".", 1)[-1] for f in _ATTENTION_KWARGS)
                raise FinebenchError(
                    f"variant {kind!r} on timm:{self.model_name}: its family ({family.rsplit('.', 1)[-1]}) takes no "
                    f"block attention layer (attn_layer); expected a timm model of the {families} families"
                )
            kwargs.update(_ATTENTION_KWARGS[family](attention_layer(kind, reduction)))
        if pretrained_file is not None:
            # timm applies the model's own checkpoint filter (original-format weights) and drops the
            # classifier; a state_dict overlay keeps the file read in finebench's safe reader.
            state = read_weights_file(pretrained_file, f"timm weights for {self.model_name}")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state})
        try:
            with _load_report() as problems:
                model = _timm().create_model(self.model_name, **kwargs)
        except TypeError as error:
            raise FinebenchError(f"backbone timm:{self.model_name}: bad option ({error})") from None
        except RuntimeError as error:
            if pretrained_file is None:  # e.g. an unknown pretrained tag (resnet50.bogus)
                raise FinebenchError(f"backbone timm:{self.model_name}: {str(error).splitlines()[0][:200]}") from None
            raise FinebenchError(
                f"weights in {pretrained_file} do not fit timm:{self.model_name}: {str(error).splitlines()[0][:200]}"
            ) from None
        if problems:
            raise FinebenchError(f"weights in {pretrained_file} do not fit timm:{self.model_name}: {problems[0][:200]}")
        return model

    # -- the Backbone interface ---------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, taps: Sequence[str] = (), stop_after_taps: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        for tap in taps:
            if tap not in self._index:
                self.tap_point(tap)  # the error listing the valid taps
        names = sorted(set(taps), key=self._index.__getitem__)
        indices = [self._index[name] for name in names]
        if not indices:
            if stop_after_taps:
                return None, {}
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True), {}
        if stop_after_taps:
            maps = self.model.forward_intermediates(
                x, indices=indices, stop_early=True, intermediates_only=True, output_fmt="NCHW"
            )
            return None, self._by_name(names, maps)
        final, maps = self.model.forward_intermediates(x, indices=indices, output_fmt="NCHW")
        return self.model.forward_head(final, pre_logits=True), self._by_name(names, maps)

    def _by_name(self, names: list[str], maps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        found = dict(zip(names, maps, strict=True))
        for name, feature in found.items():
            if feature.dim() != 4 or feature.shape[1] != self.tap_point(name).channels:
                raise FinebenchError(
                    f"timm:{self.model_name} returned {tuple(feature.shape)} for tap {name!r}; its feature_info "
                    f"declares {self.tap_point(name).channels} channels "
                    "(forward_intermediates and feature_info disagree)"
                )
        return found

    def residual_blocks(self) -> list[nn.Module]:
        raise FinebenchError(
            f"timm:{self.model_name} takes SE/CBAM/ECA through timm's attn_layer at construction, not as plug-ins"
        )

    def plugin_modules(self) -> list[nn.Module]:
        """The timm attention layers of the se/cbam/eca variant: new weights, trained as the head."""
        if self.block_attention is None:
            return []
        from timm.layers import get_attn

        layer = get_attn(self.block_attention[0])
        return [m for m in self.model.modules() if isinstance(m, layer)]

    # -- weights ------------------------------------------------------------------------------

    def load_pretrained(self, source: str) -> None:
        """``"timm"``: the model's pretrained weights from timm's cache; otherwise a local file."""
        file = cached_weights(self.model_name) if source == "timm" else Path(source).expanduser()
        if not file.is_file():
            raise FinebenchError(f"pretrained weights file {file} does not exist: expected a .pth or .safetensors file")
        weights = self._create(pretrained_file=file).state_dict()
        result = self.model.load_state_dict(weights, strict=False)
        plugins = {id(module) for module in self.plugin_modules()}
        plugin_keys = {
            f"{module_name}.{key}"
            for module_name, module in self.model.named_modules()
            if id(module) in plugins
            for key in module.state_dict()
        }
        problems = [k for k in result.missing_keys if k not in plugin_keys] + list(result.unexpected_keys)
        if problems:
            raise FinebenchError(f"weights in {file} do not fit timm:{self.model_name}: {problems[:3]}")


@contextmanager
def _load_report() -> Iterator[list[str]]:
    """timm loads pretrained weights non-strictly once it has dropped the classifier and only logs
    the keys that did not fit; collect those lines so a foreign file is an error, not a warning."""
    logger = logging.getLogger("timm.models._builder")
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(("Missing keys", "Unexpected keys")):
                problems.append(message)

    handler, level, propagate = Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield problems
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def cached_weights(name: str) -> Path:
    """Where timm's cache holds the pretrained weights of ``name`` (``model.tag``); never downloads.

    timm prefers the Hugging Face hub copy and falls back to the release URL in torch's hub cache,
    so both places are looked at; a miss is one line saying where to put the file.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        cfg = _timm().models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        _check_known(name)
        raise FinebenchError(f"timm model {name!r} has no pretrained weights: set pretrained to a local file instead")
    hub_files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    if cfg.hf_hub_id:
        for filename in hub_files:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    url_file = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1] if cfg.url else None
    if url_file is not None and url_file.is_file():
        return url_file
    places = []
    if cfg.hf_hub_id:
        places.append(f"huggingface.co/{cfg.hf_hub_id} ({hub_files[0]}) into the Hugging Face cache {HF_HUB_CACHE}")
    if url_file is not None:
        places.append(f"{cfg.url} at {url_file}")
    raise FinebenchError(
        f"timm weights for {name} are not in timm's cache (no download happens): place "
        + " or ".join(places) + ', or set pretrained = "PATH" to a local .pth/.safetensors file'
    )
