"""``prepare --source hub``: a dataset's Hugging Face Hub copy through ``datasets.load_dataset``.

Only the splits in ``spec.hub_splits`` are read, stored under finebench's names, as encoded bytes (JPEGs
are not re-encoded). Without a network (or with ``HF_HUB_OFFLINE=1``) this fails within seconds instead of
after the library's retries.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.errors import FinebenchError


class _HubSplit:
    """Examples of one Hub split, read lazily as encoded bytes so JPEGs are not re-encoded."""

    def __init__(self, dataset, image_column: str, label_column: str) -> None:
        import datasets

        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Example]:
        for row in self.dataset:
            image = row[self.image_column]
            data = image.get("bytes") or Path(image["path"]).read_bytes()
            yield Example(image=data, label=int(row[self.label_column]))


HUB_PROBE_TIMEOUT_S = 3.0
"""How long the reachability check of the Hub host may take; ``datasets`` itself retries for ~20 s."""


def _hub_error(spec: DatasetSpec, reason: str) -> FinebenchError:
    return FinebenchError(
        f"cannot load the Hub copy {spec.hub_id!r} of {spec.name!r}: {reason} "
        f"(use --source official, with --from DIR for files you have or --mirror URL for a mirror)"
    )


def _hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be reached, found in at most ``HUB_PROBE_TIMEOUT_S``; ``None`` if it may be."""
    import datasets
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag in {"1", "ON", "YES", "TRUE"} or datasets.config.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows the way; let the datasets library try it
    endpoint = os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"{host}:{port} is unreachable ({error.strerror or type(error).__name__}; no network?)"
    return None


def _pick_column(spec: DatasetSpec, features, wanted: str | None, kind: type, what: str) -> str:
    """The named column (checked to be of ``kind``), or the one column of that kind."""
    matching = [name for name, feature in features.items() if isinstance(feature, kind)]
    if what == "label" and wanted is None:
        matching = [name for name in matching if features[name].num_classes == spec.num_classes] or matching
    if wanted is not None:
        if wanted not in matching:
            raise FinebenchError(
                f"Hub copy {spec.hub_id!r} of {spec.name!r}: {what} column {wanted!r} is missing or not a "
                f"{kind.__name__} (columns: {', '.join(features)})"
            )
        return wanted
    if len(matching) != 1:
        raise FinebenchError(
            f"Hub copy {spec.hub_id!r} of {spec.name!r}: expected one {kind.__name__} {what} column, found "
            f"{len(matching)} (columns: {', '.join(features)}); set hub_{what}_column in the spec"
        )
    return matching[0]


def parse_from_hub(spec: DatasetSpec) -> tuple[ParsedDataset, dict[str, Any]]:
    if not spec.hub_id:
        raise FinebenchError(f"dataset {spec.name!r} has no known Hugging Face Hub copy: use --source official or --from DIR")
    if not spec.hub_splits:
        raise FinebenchError(f"dataset {spec.name!r} has a Hub copy {spec.hub_id!r} but no hub_splits mapping in its spec")
    import datasets

    # A local folder (how tests stand in for a Hub repo) needs no network.
    if not Path(spec.hub_id).exists() and (reason := _hub_unreachable_reason()):
        raise _hub_error(spec, reason)
    ours, theirs = list(spec.hub_splits), list(spec.hub_splits.values())
    try:
        available = datasets.load_dataset_builder(spec.hub_id).config.data_files or {}
        unknown = [name for name in theirs if available and name not in available]
        if unknown:
            raise FinebenchError(
                f"Hub copy {spec.hub_id!r} of {spec.name!r} has no split {unknown[0]!r} (its splits: "
                f"{', '.join(available)}; splits asked for: {', '.join(theirs)})"
            )
        # Only the mapped splits' files, so extra splits (corrupted test copies) are not even downloaded.
        data_files = {name: available[name] for name in theirs} if available else None
        loaded = datasets.load_dataset(spec.hub_id, data_files=data_files, split=theirs)
    except FinebenchError:
        raise
    except Exception as error:  # offline, unknown repo or split, gated repo: all end here with the reason
        detail = str(error).splitlines()[0] if str(error) else ""
        raise _hub_error(spec, f"{type(error).__name__}: {detail} (splits asked for: {', '.join(theirs)})") from error
    features = loaded[0].features
    image_column = _pick_column(spec, features, spec.hub_image_column, datasets.Image, "image")
    label_column = _pick_column(spec, features, spec.hub_label_column, datasets.ClassLabel, "label")
    names = list(features[label_column].names)
    if len(names) != spec.num_classes:
        raise FinebenchError(
            f"Hub copy {spec.hub_id!r}: label column {label_column!r} has {len(names)} class names, "
            f"dataset {spec.name!r} has {spec.num_classes} classes"
        )
    parsed = ParsedDataset(
        classes=names,
        splits={name: _HubSplit(split, image_column, label_column) for name, split in zip(ours, loaded)},
        info={"hub_id": spec.hub_id, "hub_splits": dict(spec.hub_splits), "hub_label_column": label_column},
    )
    return parsed, {"kind": "hub", "hub_id": spec.hub_id}
