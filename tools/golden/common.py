"""Shared by the golden-tensor scripts: read an official checkout, run chosen parts of a file, write
safetensors with the official commit. Official code is read from the checkout given on the
command line and never enters finebench (docs/PEERS.md)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def git_dir(checkout: str) -> list[str]:
    """``git`` arguments reading a work tree or a bare/mirror git directory alike."""
    path = Path(checkout)
    return ["git", "--git-dir", str(path / ".git" if (path / ".git").exists() else path)]


def official_file(checkout: str, path: str) -> str:
    return subprocess.run([*git_dir(checkout), "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def official_commit(checkout: str) -> str:
    return subprocess.run([*git_dir(checkout), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def run_parts(source: str, names: set[str], extra_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Execute the file's imports and the top-level definitions/assignments named ``names`` only
    (the training scripts start training or touch CUDA at import)."""
    tree = ast.parse(source)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
            isinstance(node, ast.ImportFrom) and node.module == "__future__"
        ):
            keep.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            keep.append(node)
    folder = tempfile.mkdtemp()
    for name, text in (extra_files or {}).items():
        Path(folder, name).write_text(text)
    sys.path.insert(0, folder)
    namespace: dict[str, Any] = {"__name__": "official"}
    exec(compile(ast.Module(keep, []), "official", "exec"), namespace)  # noqa: S102 - the official code, by design
    return namespace


def import_official(checkout: str, package: str, files: Mapping[str, str], module: str,
                    edit: Callable[[str, str], str] | None = None) -> Any:
    """Import ``package.module`` from a temporary package of official files (file name in the
    package -> its path in the checkout), each passed through ``edit(name, text)`` where a shim is
    needed: the official model code runs as itself and never enters finebench."""
    folder = Path(tempfile.mkdtemp()) / package
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name, path in files.items():
        text = official_file(checkout, path)
        (folder / name).write_text(edit(name, text) if edit is not None else text)
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module(f"{package}.{module}")


def generated(seed: int, *shape: int, scale: float = 1.0, relu: bool = False) -> torch.Tensor:
    """Float64 inputs/weights the test regenerates bit for bit (too large to commit)."""
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return values.clamp_min(0) if relu else values


def write(out: Path, tensors: dict[str, torch.Tensor], commit: str, repo: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / "golden.safetensors"),
              metadata={"repository": repo, "commit": commit})
    (out / "COMMIT").write_text(f"{repo} {commit}\n")
    print(f"wrote {out}/golden.safetensors from {repo}@{commit}")
