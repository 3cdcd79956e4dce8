"""pyproject.toml declares every package finebench imports, with floors the code really needs."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "finebench"

NEEDED_FLOORS = {
    "torch": "2.3",  # torch.amp.GradScaler (engine)
    "torchvision": "0.18",  # torch 2.3's pair
    "datasets": "4.3",  # Dataset.from_generator(fingerprint=) (store)
    "pandas": "2.1",  # DataFrame.map (report)
    "typer": "0.28",  # typer.TyperException (cli)
}
"""Each with the API that sets it; an older release fails there (datasets 4.2 was reproduced failing)."""


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():  # an extra may hold an optional import
        declared += extra
    return {_normal(req.name): req for req in map(Requirement, declared)}


def _imported_top_level_modules() -> set[str]:
    """Every module finebench imports, at any depth (lazy imports inside functions too)."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "find_spec" and node.args:
                if isinstance(node.args[0], ast.Constant):  # importlib.util.find_spec("mlxtend")
                    found.add(str(node.args[0].value).split(".")[0])
    return found - set(sys.stdlib_module_names) - {"finebench", "__future__"}


PROBED_ONLY = {"triton"}
"""Looked for, never required: ``resolve_compile`` asks whether torch's own CUDA build brought Triton."""


def test_every_imported_package_is_declared() -> None:
    distributions = importlib.metadata.packages_distributions()
    declared = _requirements()
    missing = []
    for module in sorted(_imported_top_level_modules() - PROBED_ONLY):
        names = {_normal(name) for name in distributions.get(module, [module])}
        if not names & declared.keys():
            missing.append(f"{module} (distribution {', '.join(sorted(names))})")
    assert not missing, f"imported by finebench but not in pyproject.toml: {missing}"


def test_floors_are_at_least_what_the_code_needs() -> None:
    declared = _requirements()
    for name, needed in NEEDED_FLOORS.items():
        floors = [Version(spec.version) for spec in declared[name].specifier if spec.operator in (">=", "==", "~=")]
        assert floors and max(floors) >= Version(needed), f"{name}: declared {declared[name]}, the code needs >={needed}"
