"""Every random stream a training epoch draws from, seeded, captured into a checkpoint and restored,
so that a resumed run repeats the uninterrupted one exactly (CPU, fp32)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(loader: Any = None) -> dict[str, Any]:
    """Every RNG a training epoch draws from, as plain tensors/containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    # Augmentation generators living on the dataset (in-process when workers=0); JSON because
    # PCG64 states are 128-bit integers.
    state["dataset"] = {name: json.dumps(g.bit_generator.state) for name, g in _dataset_generators(loader).items()}
    return state


def _dataset_generators(loader: Any) -> dict[str, np.random.Generator]:
    """numpy generators held by the loader or the datasets it wraps (``Subset`` chains included)."""
    holder, found, depth = loader, {}, 0
    while holder is not None and depth < 8:
        for name, value in getattr(holder, "__dict__", {}).items():
            if isinstance(value, np.random.Generator):
                found[f"{depth}.{name}"] = value
        holder, depth = getattr(holder, "dataset", None), depth + 1
    return found


def restore_rng_state(state: Mapping[str, Any], loader: Any = None) -> None:
    version, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(_as_tuples(state["python"]))
    np.random.set_state((version, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
    for name, rng in _dataset_generators(loader).items():
        if name in state.get("dataset", {}):
            rng.bit_generator.state = json.loads(state["dataset"][name])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
