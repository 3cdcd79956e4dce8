"""Writes recipes/foundation_<backbone>_<protocol>_<dataset>.toml: linear probe and full fine-tuning
of three foundation ViT-B image towers on five fine-grained sets (issue 31, part 4).

One table here holds the grid; each recipe's mean/std and input size are read from timm's
``pretrained_cfg`` of its weights' tag when the files are written (tests/test_foundation_recipes.py
checks the written files against timm and against this script's output), so a recipe never
normalises one backbone's inputs with another's statistics.

    python tools/foundation_recipes.py
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@dataclass(frozen=True)
class Weights:
    key: str
    """The file-name part (``foundation_<key>_...``)."""
    tag: str
    """timm's ``model.tag``."""
    title: str
    source: str
    licence: str
    notes: tuple[str, ...] = ()


BACKBONES = (
    Weights("dinov2", "vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14 (self-supervised on LVD-142M)",
            "Meta AI, facebookresearch/dinov2 (dinov2_vitb14_pretrain.pth), re-hosted as "
            "huggingface.co/timm/vit_base_patch14_dinov2.lvd142m",
            "Apache-2.0 (facebookresearch/dinov2 LICENSE since August 2023; timm's pretrained_cfg: apache-2.0)",
            ("518 px is the checkpoint's own 37 x 37 position grid (timm's pretrained_cfg input size), so no",
             "position-embedding resampling; the classifier reads the class token after the final LayerNorm.")),
    Weights("clip", "vit_base_patch16_clip_quickgelu_224.openai",
            "OpenAI CLIP ViT-B/16 image tower (contrastive on 400M web image-text pairs)",
            "OpenAI, openai/CLIP (ViT-B-16.pt), re-hosted as huggingface.co/timm/vit_base_patch16_clip_224.openai",
            "MIT (openai/CLIP LICENSE; timm's pretrained_cfg and model card list apache-2.0 for the re-hosted copy)",
            ("The QuickGELU architecture the weights were trained with (timm's own note on",
             "vit_base_patch16_clip_224.openai: 'natively QuickGELU, use quickgelu model variant for original",
             "results'); the same weights file. The image projection to the 512-d joint space is dropped: the",
             "classifier reads the 768-d class token after the final LayerNorm. CLIP's own mean/std.")),
    Weights("in21k", "vit_base_patch16_224.augreg_in21k", "ViT-B/16 supervised on ImageNet-21k (AugReg)",
            "Google Research, google-research/vision_transformer (augreg B_16-i21k-300ep-lr_0.001-aug_medium1-"
            "wd_0.1-do_0.0-sd_0.0.npz), re-hosted as huggingface.co/timm/vit_base_patch16_224.augreg_in21k",
            "Apache-2.0 (google-research/vision_transformer LICENSE; timm's pretrained_cfg: apache-2.0)",
            ("The 'How to train your ViT' weights that timm's legacy name vit_base_patch16_224_in21k resolves to",
             "(recipes/peers_vit_*.toml use the older orig_in21k weights instead); mean = std = 0.5.")),
)


@dataclass(frozen=True)
class Dataset:
    name: str
    train_split: str = "train"
    note: str = ""


DATASETS = (
    Dataset("cub200"),
    Dataset("nabirds"),
    Dataset("stanford_dogs"),
    Dataset("stanford_cars"),
    Dataset("flowers102", "train+val", "flowers102 trains on train+val (2,040 images) and tests on the 6,149 test "
                                       "images, as the CLIP and DINOv2 linear evaluations do."),
)


@dataclass(frozen=True)
class Protocol:
    key: str
    description: str
    lines: tuple[str, ...]
    train: tuple[tuple[str, object], ...]
    """``[train]`` settings in the order written."""


EPOCHS = 30
PROTOCOLS = (
    Protocol("probe", "linear probe", (
        "Linear probe: train.head_only_epochs = epochs, so every optimiser step of every epoch drops the",
        "backbone's gradients (no update, no weight decay, no momentum: finebench.models.network.",
        "drop_gradients) and only the new linear classifier trains; SGD momentum 0.9, lr 0.01 at batch 64,",
        "no weight decay, cosine per step to 0. The backbone still runs its backward pass (the dropped",
        "gradients are computed), so a probe costs about what fine-tuning does.",
    ), (("epochs", EPOCHS), ("batch_size", 64), ("optimizer", "sgd"), ("lr", 0.01), ("momentum", 0.9),
        ("weight_decay", 0.0), ("schedule", "cosine"), ("head_only_epochs", EPOCHS), ("precision", "auto"),
        ("workers", 8))),
    Protocol("finetune", "full fine-tuning", (
        "Full fine-tuning: every weight trains; AdamW, lr 1e-4 for the new classifier and 1e-5 for the",
        "backbone (backbone_lr_mult 0.1), weight decay 0.05, batch 64, one warm-up epoch then cosine per",
        "step to 0, gradient norm clipped at 1.",
    ), (("epochs", EPOCHS), ("batch_size", 64), ("optimizer", "adamw"), ("lr", 1e-4), ("backbone_lr_mult", 0.1),
        ("weight_decay", 0.05), ("schedule", "cosine"), ("warmup_epochs", 1), ("grad_clip", 1.0),
        ("precision", "auto"), ("workers", 8))),
)


def recipe_name(weights: Weights, protocol: Protocol, dataset: Dataset) -> str:
    return f"foundation_{weights.key}_{protocol.key}_{dataset.name}.toml"


def _value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float | int):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(value)


def render(weights: Weights, protocol: Protocol, dataset: Dataset) -> str:
    """The recipe's text; mean/std and input size from timm's ``pretrained_cfg`` of ``weights.tag``."""
    import timm

    cfg = timm.models.get_pretrained_cfg(weights.tag)
    size = cfg.input_size[-1]
    assert cfg.input_size[-2] == size, weights.tag  # finebench crops squares
    header = [
        f"Foundation baseline (issue 31): {protocol.description} of {weights.title} on {dataset.name}.",
        f"Weights: timm:{weights.tag}; source: {weights.source}; licence: {weights.licence}.",
        *weights.notes,
        *protocol.lines,
        f"Input {size} px and mean/std as timm's pretrained_cfg for the tag gives them (interpolation aside:",
        "finebench resizes with its own filter); imagenet augmentation: shorter side to round(s * 256 / 224),",
        "random crop s + flip (test: centre crop). 3 seeds. Stores prepared with --short-side below that",
        "resize are refused. Needs the weights in the local timm cache (nothing is downloaded; a run without",
        "them stops before anything is written, naming where to place them). Written by",
        "tools/foundation_recipes.py: change that table and rerun it rather than editing this file.",
    ]
    if dataset.note:
        header.append(dataset.note)
    dataset_lines = [f'name = "{dataset.name}"']
    if dataset.train_split != "train":
        dataset_lines.append(f'train_split = "{dataset.train_split}"')
    dataset_lines += [f"input_size = {size}", 'augmentation = "imagenet"',
                      f"normalize = {{ mean = {_value(list(cfg.mean))}, std = {_value(list(cfg.std))} }}"]
    lines = [
        *(f"# {line}" for line in textwrap.wrap(" ".join(header), 98, break_on_hyphens=False)),
        f'description = "{dataset.name} {protocol.description}: {weights.tag} at {size} px (3 seeds)"',
        "seeds = [0, 1, 2]",
        "",
        "[dataset]", *dataset_lines,
        "",
        "[model]", f'backbone = "timm:{weights.tag}"', 'pretrained = "timm"',
        "",
        "[[variants]]", 'kind = "baseline"',
        "",
        "[train]", *(f"{key} = {_value(value)}" for key, value in protocol.train),
    ]
    return "\n".join(lines) + "\n"


def every_recipe() -> dict[str, str]:
    """File name -> text of every foundation recipe."""
    return {recipe_name(w, p, d): render(w, p, d) for w in BACKBONES for p in PROTOCOLS for d in DATASETS}


if __name__ == "__main__":
    for stale in RECIPES.glob("foundation_*.toml"):
        stale.unlink()
    for name, text in every_recipe().items():
        (RECIPES / name).write_text(text)
    print(f"wrote {len(every_recipe())} recipes to {RECIPES}")
