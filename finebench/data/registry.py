"""Every dataset finebench knows, by name, found by looking at ``finebench/data/builders/``.

Adding a dataset is one file: put ``finebench/data/builders/<family>.py`` next to the others
and give it a module-level ``SPECS: list[DatasetSpec]`` (or a single ``SPEC``). Discovery
imports every module of that package once, on first use, and registers what it finds; a name
registered twice is a bug and fails loudly.

Tests that serve miniature archives need a spec whose checksums match those archives. They
build one with ``dataclasses.replace(get_spec("cifar10"), sources=...)`` and install it for
the duration of a block::

    with registry.override(test_spec):
        prepare_dataset("cifar10", tmp_path, mirror=server.url)

(``monkeypatch.setitem(registry.SPECS_BY_NAME, spec.name, spec)`` does the same after
``registry.all_specs()`` has run discovery.) That swaps data, not behaviour: the real download,
verification and parsing code still runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager

from finebench.data.builders.base import DatasetSpec
from finebench.errors import FinebenchError

SPECS_BY_NAME: dict[str, DatasetSpec] = {}
_discovered = False


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a spec; a duplicate name means two builders claim one dataset, which is a bug."""
    existing = SPECS_BY_NAME.get(spec.name)
    if existing is not None and existing is not spec:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    SPECS_BY_NAME[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every builder module once and register its ``SPECS``/``SPEC``."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import finebench.data.builders as builders_package

    for module_info in sorted(pkgutil.iter_modules(builders_package.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_") or module_info.name == "base":
            continue
        module = importlib.import_module(f"{builders_package.__name__}.{module_info.name}")
        specs = list(getattr(module, "SPECS", []))
        if hasattr(module, "SPEC"):
            specs.append(module.SPEC)
        for spec in specs:
            register(spec)


def all_specs() -> list[DatasetSpec]:
    """Every registered dataset, sorted by name."""
    _discover()
    return [SPECS_BY_NAME[name] for name in sorted(SPECS_BY_NAME)]


def get_spec(name: str) -> DatasetSpec:
    """The spec for ``name``; an unknown name is a user error listing the valid ones."""
    _discover()
    try:
        return SPECS_BY_NAME[name]
    except KeyError:
        valid = ", ".join(sorted(SPECS_BY_NAME)) or "(none)"
        raise FinebenchError(f"unknown dataset {name!r}: expected one of {valid}") from None


@contextmanager
def override(spec: DatasetSpec) -> Iterator[DatasetSpec]:
    """Temporarily replace (or add) the spec registered under ``spec.name``; for tests."""
    _discover()
    previous = SPECS_BY_NAME.get(spec.name)
    SPECS_BY_NAME[spec.name] = spec
    try:
        yield spec
    finally:
        if previous is None:
            SPECS_BY_NAME.pop(spec.name, None)
        else:
            SPECS_BY_NAME[spec.name] = previous
