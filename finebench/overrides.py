"""``--set KEY=VALUE``: dotted overrides of a recipe's raw TOML data, applied before validation."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from typing import Any

from finebench.errors import FinebenchError


def parse_value(text: str) -> Any:
    """A command-line value read as TOML (``1``, ``0.1``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _list_index(key: str, path: str, part: str, items: list[Any], source: str) -> int:
    """``part`` as an index into ``items`` (``variants.1``), or a line saying which indices exist."""
    parent = path.rpartition(".")[0] or path
    count = f"{len(items)} entr{'y' if len(items) == 1 else 'ies'}"
    valid = "no index" if not items else "index 0" if len(items) == 1 else f"indices 0-{len(items) - 1}"
    if not part.isdigit():
        raise FinebenchError(f"--set {key}: {parent} is a list, expected an index ({valid}), got {part!r}")
    if int(part) >= len(items):
        raise FinebenchError(f"--set {key}: index {part} is out of range: {parent} in {source} has {count} ({valid})")
    return int(part)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], source: str) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place; list items are addressed by index (``variants.1.reg_w``)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise FinebenchError(f"--set {override!r}: expected KEY=VALUE, e.g. train.epochs=1")
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(key, path, part, node, source)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise FinebenchError(f"--set {key}: {path} is not a section in {source}")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(key, key.strip(), last, node, source)] = parse_value(raw.strip())
        elif isinstance(node, dict):
            node[last] = parse_value(raw.strip())
        else:
            raise FinebenchError(f"--set {key}: {'.'.join(parts[:-1])} is not a section in {source}")
    return data
