"""Any torchvision classification CNN as a backbone (``backbone = "torchvision:<name>"``), tapped by
graph node name through ``torchvision.models.feature_extraction``.

For the models timm does not cover. A tap is any node name ``get_graph_node_names`` lists, or a
module name (its last node); the default taps are the stage ends, found by running the model once:
the last feature map at each stride. The forward is an FX graph that returns the taps and the
classifier's input, and for an early prediction a graph cut at the tap, so it really stops there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from finebench.errors import FinebenchError
from finebench.models.base import Backbone, TapPoint, read_weights_file, unwrap_state_dict
from finebench.models.torchvision import cached_imagenet_weights

PROBE_SIZE = 128
"""Side of the image run once to measure strides: every classifier's stride-32 map is still 4×4."""

_POOLED = "finebench_pooled"
"""Output name of the classifier's input in the FX graphs (not a module name of any torchvision model)."""


def torchvision_model_names() -> list[str]:
    return list(tvm.list_models(module=tvm))


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FinebenchError(f"{type(net).__name__} has no final nn.Linear classifier to replace")
    return linears[-1]


def stage_taps(net: nn.Module, size: int = PROBE_SIZE) -> list[TapPoint]:
    """The stage ends of a CNN: per stride, the last module output at that stride, named by the
    outermost module that changes resolution at most once (``layer2``, ``features.4``), so
    trunk containers (``features``) are looked into rather than chosen."""
    device = next(net.parameters()).device
    records: list[tuple[str, torch.Tensor]] = []
    names = {module: name for name, module in net.named_modules() if name}

    def hook(module: nn.Module, _: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            records.append((names[module], output))

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size, device=device))
    except Exception as error:  # a model that cannot run on a square image of this size
        raise FinebenchError(
            f"cannot find the stages of {type(net).__name__}: it does not run on a {size}×{size} image "
            f"({type(error).__name__}: {str(error)[:120]}); expected a CNN"
        ) from None
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    stride_of: dict[str, int] = {}
    strides_below: dict[str, set[int]] = {}
    order: dict[str, int] = {}
    for position, (name, output) in enumerate(records):
        stride = max(1, round(size / output.shape[-1]))
        stride_of.setdefault(name, stride)  # a module called twice keeps its first call
        order.setdefault(name, position)
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            strides_below.setdefault(".".join(parts[:depth]), set()).add(stride)

    def finished_at(name: str) -> int:
        """When a module's output appeared; a container with no feature-map output of its own
        (one returning a tuple, say) counts as finished with its last descendant."""
        return order[name] if name in order else max(order[n] for n in order if n.startswith(f"{name}."))

    def units(prefix: str) -> list[str]:
        """Modules below ``prefix`` in running order, opening those that span several stages."""
        children = [n for n in strides_below if n.count(".") == (prefix.count(".") + 1 if prefix else 0)
                    and (not prefix or n.startswith(f"{prefix}."))]
        out: list[str] = []
        for child in sorted(children, key=finished_at):
            if child not in stride_of or len(strides_below[child]) > 2:
                out.extend(units(child))
            else:
                out.append(child)
        return out

    last_at: dict[int, str] = {}
    for unit in units(""):
        if last_at and stride_of[unit] < max(last_at):
            break  # resolution went back up: the head (e.g. VGG's adaptive pool to 7×7) has begun
        last_at[stride_of[unit]] = unit
    channels = {name: output.shape[1] for name, output in records}
    return [TapPoint(name, int(channels[name]), stride, "stage end") for stride, name in sorted(last_at.items())]


class TorchvisionNodeBackbone(Backbone):
    """A torchvision model with its last ``nn.Linear`` removed; taps are FX graph node names."""

    other_taps = "a graph node name (torchvision.models.feature_extraction.get_graph_node_names)"

    def __init__(self, name: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if name not in torchvision_model_names():
            raise FinebenchError(
                f"unknown torchvision model {name!r}: expected one of torchvision.models.list_models(), e.g. "
                "mobilenet_v3_large, efficientnet_b0, densenet121, regnet_y_800mf"
            )
        self.model_name = name
        try:
            self.net = tvm.get_model(name, weights=None, **dict(options or {}))
        except (TypeError, ValueError) as error:
            raise FinebenchError(f"backbone torchvision:{name}: bad option ({error})") from None
        self.head_name, head = _last_linear(self.net)
        self.net.set_submodule(self.head_name, nn.Identity())
        self.out_channels = head.in_features
        self.tap_points = tuple(stage_taps(self.net))
        if len(self.tap_points) < 2:
            raise FinebenchError(
                f"torchvision:{name} has no convolutional stages (4-D feature maps at several strides): "
                "expected a CNN such as mobilenet_v3_large or densenet121"
            )
        self.attention_candidates = tuple(t.name for t in reversed(self.tap_points[:-1]))
        self._graphs: dict[tuple[tuple[str, ...], bool], nn.Module] = {}
        self._node_names: list[str] | None = None

    # -- taps by node name ----------------------------------------------------------------------

    def node_names(self) -> list[str]:
        if self._node_names is None:
            _, self._node_names = get_graph_node_names(self.net)
        return self._node_names

    def tap_point(self, name: str) -> TapPoint:
        """A declared stage end, or any graph node / module name, measured once by running to it."""
        for tap in self.tap_points:
            if tap.name == name:
                return tap
        if not any(node == name or node.startswith(f"{name}.") for node in self.node_names()):
            stages = ", ".join(t.name for t in self.tap_points)
            raise FinebenchError(
                f"unknown tap {name!r} for torchvision:{self.model_name}: expected a graph node name "
                f"(torchvision.models.feature_extraction.get_graph_node_names) or a stage end: {stages}"
            )
        graph = create_feature_extractor(self.net, return_nodes=[name]).eval()
        device = next(self.net.parameters()).device
        with torch.no_grad():
            feature = graph(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=device))[name]
        self.train(self.training)  # the probe put the shared modules in eval mode
        if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
            raise FinebenchError(
                f"tap {name!r} of torchvision:{self.model_name} is not a B×C×H×W feature map: expected a node "
                "inside the convolutional trunk"
            )
        tap = TapPoint(name, int(feature.shape[1]), max(1, round(PROBE_SIZE / feature.shape[-1])), "graph node")
        self.tap_points = tuple(sorted((*self.tap_points, tap), key=self._depth))
        return tap

    def _depth(self, tap: TapPoint) -> tuple[int, int]:
        """Shallow-to-deep order: by stride, then by the position of the tap's last node in the graph."""
        nodes = self.node_names()
        last = max((i for i, node in enumerate(nodes) if node == tap.name or node.startswith(f"{tap.name}.")),
                   default=-1)
        return tap.stride, last

    # -- forward --------------------------------------------------------------------------------

    def _graph(self, taps: tuple[str, ...], stop_after_taps: bool) -> nn.Module:
        key = (taps, stop_after_taps)
        if key not in self._graphs:
            for tap in taps:
                self.tap_point(tap)
            outputs = {tap: tap for tap in taps}
            if not stop_after_taps:
                outputs[self.head_name] = _POOLED
            # Not a submodule: the graph shares self.net's modules, and state_dict keys stay net.*.
            self._graphs[key] = create_feature_extractor(self.net, return_nodes=outputs)
        graph = self._graphs[key]
        if graph.training != self.training:
            graph.train(self.training)
        return graph

    def forward(
        self, x: torch.Tensor, taps: Sequence[str] = (), stop_after_taps: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if stop_after_taps and not taps:
            return None, {}
        outputs = dict(self._graph(tuple(dict.fromkeys(taps)), stop_after_taps)(x))
        pooled = outputs.pop(_POOLED, None)
        return pooled, outputs

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TorchvisionNodeBackbone:
        # The cached graphs hold references to parameters (get_attr nodes); rebuild them after a
        # move or cast rather than trust that every conversion updates tensors in place.
        self._graphs = {}
        return super()._apply(fn, *args, **kwargs)

    def residual_blocks(self) -> list[nn.Module]:
        raise FinebenchError(
            f"torchvision:{self.model_name} has no plug-in slots: SE/CBAM/ECA run on wrn, resnext_cifar, the "
            "registered torchvision ResNets, and timm ResNet/ByobNet models"
        )

    # -- weights --------------------------------------------------------------------------------

    def load_pretrained(self, source: str) -> None:
        """``"imagenet"``: torchvision's default weights from the torch hub cache; else a local file."""
        if source == "imagenet":
            file = cached_imagenet_weights(tvm.get_model_weights(self.model_name).DEFAULT, f"torchvision:{self.model_name}")
        else:
            file = Path(source).expanduser()
        state = read_weights_file(file)
        state, whole_model = unwrap_state_dict(state)
        if not whole_model:  # torchvision's own model: its weights sit under ``net.``, without its head
            state = {f"net.{k}": v for k, v in state.items() if not k.startswith(f"{self.head_name}.")}
        self.load_backbone_weights(state, str(file))
