"""What every backbone promises: named tap points, a pooled feature vector, and a slot for plug-ins.

Plug-ins (Attend and Rectify, SE, CBAM) never reach into a backbone's internals: attention reads
the tap points a backbone declares, and block plug-ins go into the ``plugin`` slot every residual
block carries (an ``nn.Identity`` in the baseline, so it adds no parameters and no state-dict keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finebench.errors import FinebenchError

PARAMETER_PROBE_SIZE = 128
"""Side of the blank image ``parameters_unread`` runs when no input size is known (DDP wrapping a
model nobody costed): most families run on it (Inception-v3 needs 75); a ViT or Swin runs only at
its own ``img_size``, which is why every caller that knows the run's input size passes it."""

PluginFactory = Callable[[int], nn.Module]
"""Builds one block plug-in for a residual branch with the given number of output channels."""


@dataclass(frozen=True)
class TapPoint:
    """A named feature map where plug-ins can attach; ``stride`` is relative to the input image."""

    name: str
    channels: int
    stride: int
    description: str


class Backbone(nn.Module):
    """A feature extractor: ``forward(x, taps)`` returns the pooled features and the requested taps.

    Subclasses set ``tap_points`` (shallow to deep), ``out_channels`` (size of the pooled vector),
    and ``attention_candidates`` (the taps Attend and Rectify uses, in the order modules are added
    as the attention depth grows).
    """

    tap_points: tuple[TapPoint, ...]
    out_channels: int
    attention_candidates: tuple[str, ...]
    other_taps: str = ""
    """What ``tap_point`` takes besides the declared ``tap_points``, in words for errors ("" : nothing)."""

    def forward(  # pragma: no cover - interface
        self, x: torch.Tensor, taps: Sequence[str] = (), stop_after_taps: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Return (pooled features, {tap name: feature map}).

        With ``stop_after_taps`` the pass ends as soon as the last requested tap exists and the
        pooled features are None: that is the whole cost of an early prediction at that tap.
        """
        raise NotImplementedError

    def residual_blocks(self) -> list[nn.Module]:  # pragma: no cover - interface
        """Every residual block; each has a ``plugin`` slot and ``plugin_channels``."""
        raise NotImplementedError

    def init_classifier(self, classifier: nn.Linear) -> None:
        """Initialise a fresh classifier the way this family's reference code does (default: torch's)."""

    def separate_tap_norms(self, taps: Sequence[str]) -> None:
        """Read ``taps`` through BatchNorms of their own (Attend and Rectify's ``tap_norm = "separate"``);
        only the CIFAR WRN, whose authors' early code did this, implements it."""
        raise FinebenchError(
            f"tap_norm='separate' is implemented for the CIFAR WRN ('wrn') only, not {type(self).__name__}"
        )

    # -- shared behaviour -------------------------------------------------------------------------

    def tap_point(self, name: str) -> TapPoint:
        for tap in self.tap_points:
            if tap.name == name:
                return tap
        valid = ", ".join(t.name for t in self.tap_points)
        raise FinebenchError(f"unknown tap point {name!r} for {type(self).__name__}; valid: {valid}")

    def attention_taps(self, depth: int) -> list[str]:
        """The taps for ``depth`` attention modules, deepest first (the authors' source order)."""
        if not 1 <= depth <= len(self.attention_candidates):
            raise FinebenchError(
                f"attention_depth={depth} is out of range for {type(self).__name__}: "
                f"expected 1..{len(self.attention_candidates)}"
            )
        order = [t.name for t in self.tap_points]
        return sorted(self.attention_candidates[:depth], key=order.index, reverse=True)

    def named_taps(self, names: Sequence[str]) -> list[str]:
        """Taps chosen by name (a recipe's ``taps``), checked and put deepest first like ``attention_taps``."""
        if not names or len(set(names)) != len(names):
            raise FinebenchError(f"taps={list(names)!r} is invalid: expected distinct tap names, at least one")
        for name in names:
            self.tap_point(name)
        order = [t.name for t in self.tap_points]
        return sorted(names, key=order.index, reverse=True)

    def parameters_unread(self, taps: Sequence[str] | None, input_size: int = PARAMETER_PROBE_SIZE) -> list[str]:
        """Names of the parameters a pass that stops after ``taps`` never reads (None: the whole
        pass to the pooled features): the layers beyond the deepest tap, a torchvision model's
        layers between its last map and its classifier, Inception's auxiliary head. Found by one
        pass on a blank ``input_size`` probe image and the autograd graph it leaves: which layers
        lie off the path is each family's own business (WRN's final BatchNorm, VGG's fc6/fc7,
        Inception's Mixed_7), and autograd reads it off every family alike.

        The probe runs at the run's own input size, the one size every family of the run is known
        to take (a ViT or Swin accepts no other). Its graph is walked, not differentiated, and the
        pass runs on the meta device (shapes, no arithmetic) where the network allows, else on its
        weights: a dry run costs every variant, and a real forward and backward of WRN-40-10 per
        variant was most of its time."""
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        if not trainable:
            return []
        was_training = self.training
        self.eval()  # no BatchNorm statistics move
        try:
            try:
                read = self._parameters_read(taps, input_size, meta=True)
            except Exception:  # an op without a meta kernel, a data-dependent step: the pass on the weights
                read = self._parameters_read(taps, input_size, meta=False)
        except RuntimeError:  # a network that cannot run on the probe's size: count every layer as read
            return []
        finally:
            self.train(was_training)
        return [name for name in trainable if name not in read]

    def _parameters_read(self, taps: Sequence[str] | None, input_size: int, *, meta: bool) -> set[str]:
        """Names of the trainable parameters the probe pass reaches; ``meta``: the pass on meta
        copies of the parameters and buffers (``torch.func.functional_call``)."""
        tensors: dict[str, torch.Tensor] = dict(self.named_parameters())
        first = next(iter(tensors.values()))
        if meta:
            tensors = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                       for name, t in [*tensors.items(), *self.named_buffers()]}
        probe = torch.zeros(1, 3, input_size, input_size, device="meta" if meta else first.device, dtype=first.dtype)

        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(self, tensors, args, kwargs) if meta else self(*args, **kwargs)

        with torch.enable_grad():
            if taps is None:
                pooled, _ = call(probe)
                outputs = [pooled]
            else:
                _, maps = call(probe, list(taps), stop_after_taps=True)
                outputs = list(maps.values())
        reached = _leaves_reached(output for output in outputs if output is not None)
        return {name for name, t in tensors.items() if id(t) in reached and t.requires_grad}

    def plugin_modules(self) -> list[nn.Module]:
        """Modules added by a block-plug-in variant: new weights, trained with the head's learning rate."""
        from finebench.models.plugins import BlockPlugin

        return [m for m in self.modules() if isinstance(m, BlockPlugin)]

    def insert_plugins(self, factory: PluginFactory) -> None:
        """Put one plug-in into every residual block, sized to the block's residual branch."""
        for block in self.residual_blocks():
            block.plugin = factory(block.plugin_channels)

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load feature-extractor weights strictly; classifier keys of the source are ignored."""
        weights, _ = unwrap_state_dict(state_dict)
        weights = {k: v for k, v in weights.items() if not k.startswith(("fc.", "classifier."))}
        result = self.load_state_dict(weights, strict=False)
        problems = [*result.missing_keys, *result.unexpected_keys]
        if problems:
            raise FinebenchError(
                f"weights in {source} do not fit {type(self).__name__}: "
                f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
            )


def _leaves_reached(outputs: Iterable[torch.Tensor]) -> set[int]:
    """Ids of the leaf tensors (parameters) the autograd graphs of ``outputs`` reach: exactly those
    ``torch.autograd.grad`` would give a gradient, found without computing one."""
    reached: set[int] = set()
    seen: set[int] = set()
    pending = [output.grad_fn for output in outputs if output.grad_fn is not None]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that requires grad
        if isinstance(variable, torch.Tensor):
            reached.add(id(variable))
        pending.extend(child for child, _ in node.next_functions if child is not None)
    return reached


def unwrap_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Without DataParallel's ``module.`` prefix; a whole finebench model's state dict reduced to its
    backbone's weights (``backbone.`` removed), with True to say it was one."""
    weights = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in weights):
        return {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}, True
    return weights, False


def _load_failure(error: Exception) -> str:
    """One line out of torch.load's many: after weights_only's advice, the line naming the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[index + 1][:200]
    return (lines[0] if lines else type(error).__name__)[:200]


def read_state_dict(
    path: str | Path, what: str = "pretrained weights", keys: tuple[str, ...] = ("state_dict", "model")
) -> dict[str, torch.Tensor]:
    """Read a weights file safely (``weights_only``): a plain state dict, or a checkpoint holding
    one under the first of ``keys`` it has. ``what`` names the file in the one-line errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FinebenchError(f"{what} file {file} does not exist: expected a .pth state dict")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise FinebenchError(f"cannot read {what} {file}: not a torch state dict ({_load_failure(error)})") from None
    for key in keys:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise FinebenchError(f"{file} ({what}) holds no state dict of tensors (looked under {', '.join(keys)})")
    return loaded


def read_weights_file(path: str | Path, what: str = "pretrained weights") -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (read by safetensors, which holds only tensors) or a torch state dict
    file (``read_state_dict``); both are safe to read from an untrusted source."""
    file = Path(path).expanduser()
    if file.suffix != ".safetensors":
        return read_state_dict(file, what)
    if not file.is_file():
        raise FinebenchError(f"{what} file {file} does not exist: expected a .safetensors or .pth file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise FinebenchError(f"cannot read {what} {file}: not a safetensors file ({str(error)[:200]})") from None
