"""The backbone alone: its own linear classifier trained with cross-entropy (every hook's default)."""

from __future__ import annotations

from typing import Literal

from finebench.methods.base import Method, MethodOptions
from finebench.methods.registry import register


class BaselineOptions(MethodOptions):
    kind: Literal["baseline"]


class Baseline(Method):
    kind = "baseline"
    description = "the backbone alone"
    Options = BaselineOptions


METHOD = register(Baseline())
