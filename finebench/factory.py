"""What a run trains with, built where the run executes (``finebench.runner``): its model and its loaders.

``finebench.plan`` decides what they are built from (``plan.loader_choices``) and checks it before
anything is written; building them is the run's own work, done here (and, for a network's cost,
by ``finebench.cost``), so the planner builds nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finebench.errors import FinebenchError
from finebench.plan import loader_choices
from finebench.recipe import LoadedRecipe, RunSpec
from finebench.train.runtime import DistContext


def build_model(
    loaded: LoadedRecipe, run: RunSpec, num_classes: int, *, kind: str | None = None, pretrained: bool = True
):
    """The run's model (``kind`` swaps the variant, e.g. for the baseline's cost), errors named by file."""
    from finebench.methods import build_model_from_config

    try:
        return build_model_from_config(run.config, num_classes, kind=kind, pretrained=pretrained)
    except FinebenchError as error:
        raise FinebenchError(f"{loaded.path}: model: {error}") from None


def build_run_loaders(loaded: LoadedRecipe, run: RunSpec, data_root: Path, ctx: DistContext, device: torch.device):
    from finebench.data.loader import build_loaders

    train = run.train_section()
    return build_loaders(**loader_choices(run, data_root, ctx, device), eval_batch_size=train.eval_batch_size,
                         workers=train.workers, pin_memory=device.type == "cuda")
