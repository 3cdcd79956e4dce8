"""Where prepared datasets live: one rule that every command follows.

The data root is, in order: the ``--data-root`` flag, the ``FINEBENCH_DATA`` environment
variable, the ``dataset.root`` of the recipe (or the one a run recorded in its config.json), and
``data`` in the working directory. Every command (``datasets``, ``prepare``, ``run``, ``bench``,
``attend``, ``eval``) asks here, so a dataset prepared by one is found by the next; a run records
the resolved, absolute root in its config.json so later commands find it from another folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

ENV_VAR = "FINEBENCH_DATA"
DEFAULT_ROOT = "data"


class DataRoot(NamedTuple):
    path: Path
    """Absolute."""
    origin: str
    """Which rule chose it: ``--data-root``, ``FINEBENCH_DATA``, ``recipe`` or ``default``."""

    def describe(self) -> str:
        """``/abs/path (from FINEBENCH_DATA)``: error messages say where a root came from."""
        return f"{self.path} (from {self.origin})"


def choose_data_root(flag: str | os.PathLike[str] | None = None, configured: str | os.PathLike[str] | None = None) -> DataRoot:
    """The data root and the rule that chose it (flag, then ``FINEBENCH_DATA``, then ``configured``, then ``data``).

    ``configured`` is the recipe's ``dataset.root`` or a run's recorded one; a recipe that leaves
    it at the default ``data`` counts as not choosing, so the environment variable still applies.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if flag is not None and str(flag) != "":
        chosen, origin = flag, "--data-root"
    elif env:
        chosen, origin = env, ENV_VAR
    elif configured is not None and str(configured) not in ("", DEFAULT_ROOT):
        chosen, origin = configured, "recipe"
    else:
        chosen, origin = DEFAULT_ROOT, "default"
    # absolute (not resolved): keeps a symlinked data folder's name in messages and config.json
    return DataRoot(Path(os.path.abspath(Path(chosen).expanduser())), origin)


def resolve_data_root(flag: str | os.PathLike[str] | None = None, configured: str | os.PathLike[str] | None = None) -> Path:
    """The absolute data root by the one rule (see ``choose_data_root``)."""
    return choose_data_root(flag, configured).path
