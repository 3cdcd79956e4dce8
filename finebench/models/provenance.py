"""Which pretrained weights a run started from: the tag, the loaded file's SHA-256, and the data the
tag says the weights were trained on.

A reviewer comparing two numbers first asks whether they start from the same weights: ImageNet-21k
weights give several points over ImageNet-1k ones on fine-grained sets, and a pretraining set that
overlaps a test set (iNat, CUB images in web crawls) inflates a result. The record is a fact about
the file, not a setting: it never enters a run id.

The pretraining data is read from the tag only where the tag names it; a token this module does not
know makes the whole answer "unknown" (``yfcc100m_ft_in1k`` must not read as ImageNet-1k). A local
weights file names no data: "unknown", never guessed.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

NO_WEIGHTS = "none"
"""``pretraining`` of a run trained from scratch."""
UNKNOWN = "unknown"
"""``pretraining`` where the tag names no data this module knows (a local file, an unknown token)."""

TIMM_TAG_DOC = "timm pretrained tag naming (huggingface.co/docs/timm: the tag after the '.' names the weights' data)"
TIMM_DATA: dict[str, str] = {
    "in1k": "ImageNet-1k",
    "in21k": "ImageNet-21k",
    "in22k": "ImageNet-22k",
    "in12k": "ImageNet-12k",
    "lvd142m": "LVD-142M",
    "openai": "WIT-400M (CLIP)",
    "laion2b": "LAION-2B",
    "laion400m": "LAION-400M",
    "datacomp1b": "DataComp-1B",
    "yfcc100m": "YFCC100M",
    "inat21": "iNat21",
}
"""timm tag tokens that name a data set (``vit_base_patch16_224.augreg_in21k`` → ImageNet-21k)."""
TIMM_MARKERS: frozenset[str] = frozenset({
    "augreg", "augreg2", "orig", "ms", "fb", "tv", "tv2", "goog", "tf", "gluon", "miil",
    "a1", "a1h", "a2", "a3", "ra", "ra2", "ra3", "ra4", "rsb", "mim",
})
"""timm tag tokens that name who trained the weights or with which recipe, not on which data."""
_RESOLUTION = re.compile(r"r?\d+")  # r384, 448: the training resolution
FINE_TUNED = "ft"
"""``in21k_ft_in1k``: pretrained on ImageNet-21k, then fine-tuned on ImageNet-1k."""

TORCHVISION_DOC = "torchvision weights documentation (pytorch.org/vision/stable/models.html)"
TORCHVISION_DATA: dict[str, str] = {
    "IMAGENET1K_V1": "ImageNet-1k",
    "IMAGENET1K_V2": "ImageNet-1k",
    "IMAGENET1K_SWAG_E2E_V1": "IG-3.6B (SWAG) → ImageNet-1k",
    "IMAGENET1K_SWAG_LINEAR_V1": "IG-3.6B (SWAG) → ImageNet-1k",
}
"""torchvision weights enum members → the data their documentation names."""


def timm_pretraining(tag: str) -> str:
    """The data a timm pretrained tag names, pretraining first (``in21k_ft_in1k`` → ImageNet-21k →
    ImageNet-1k); ``UNKNOWN`` when any token is one this module does not know."""
    stages: list[str] = []
    for token in tag.split("_"):
        if token in TIMM_DATA:
            stages.append(TIMM_DATA[token])
        elif token != FINE_TUNED and token not in TIMM_MARKERS and not _RESOLUTION.fullmatch(token):
            return UNKNOWN
    return " → ".join(dict.fromkeys(stages)) or UNKNOWN


def torchvision_pretraining(member: str) -> str:
    return TORCHVISION_DATA.get(member, UNKNOWN)


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes; one read per file (and version) in a process, where several runs
    load the same weights."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def weights_provenance(backbone: str, pretrained: str | None) -> dict[str, Any]:
    """The record of ``model.pretrained`` for ``backbone``: ``tag``, ``file``, ``sha256`` (of the file
    the loader reads, found the same way: ``registry.pretrained_file``), ``pretraining`` and
    ``pretraining_source`` (what the pretraining name was read from)."""
    from finebench.models.registry import pretrained_file, pretrained_tag

    if pretrained is None:
        return {"tag": None, "file": None, "sha256": None, "pretraining": NO_WEIGHTS,
                "pretraining_source": "model.pretrained not set: trained from scratch"}
    file = pretrained_file(backbone, pretrained)
    family, tag = pretrained_tag(backbone, pretrained)
    if family == "timm":
        name = tag.partition(".")[2]
        pretraining, source = timm_pretraining(name), f"{TIMM_TAG_DOC}; tag {name!r}"
    elif family == "torchvision":
        member = tag.rpartition(".")[2]
        pretraining, source = torchvision_pretraining(member), f"{TORCHVISION_DOC}; weights {member}"
    else:
        pretraining, source = UNKNOWN, "a local weights file names no pretraining data"
    return {"tag": f"{family}:{tag}" if family else tag, "file": str(file), "sha256": file_sha256(file),
            "pretraining": pretraining, "pretraining_source": source}
