"""Per-image predictions of one evaluation as a Parquet file (``predictions.parquet`` in a run folder).

Accuracies over seeds say whether a method is better on average; whether two runs differ on *this*
test set, and on which images, needs each image's prediction. The run's final evaluation (and
``finebench eval``) records them here, one row per test image and prediction the method makes:

* ``id``: the image's index in the prepared test split (splits joined with ``+`` count on from the
  first; the store has no id column of its own), ``label``: its true class;
* ``prediction``: which prediction, named as summary.json's ``final`` names its accuracy (and
  ``report --predictions`` lists it): ``test_top1`` is the one the run's top-1 reads; then each
  other one the method records (``Method.prediction_logits``: PMG's ``top1_granularity.8``, WS-DAN's
  ``top1_crop``, ...), and for Attend and Rectify ``network_top1`` and ``module_top1.<tap>``;
* ``class_1`` .. ``class_k`` and ``prob_1`` .. ``prob_k``: the top-k classes (k = min(5, classes)),
  best first, and their softmax probabilities (float32).

The file's metadata holds the digest of the test set's ids and labels (``test_set_digest``, also in
summary.json), so a comparison can tell two files of different test sets apart before comparing.
The digest is made from the rows themselves, so a file can be checked against its own metadata.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finebench.atomic import atomic_write_bytes
from finebench.errors import FinebenchError

if TYPE_CHECKING:
    import pyarrow

FORMAT = "finebench-predictions"
FORMAT_VERSION = 1
SHOWN_PREDICTION = "test_top1"
"""The prediction the run's top-1 (and its confusion matrix) reads."""
TOP_K = 5


def digest_test_set(ids: np.ndarray, labels: np.ndarray) -> str:
    """``sha256:<hex>`` of the ids and labels in id order: equal exactly when two evaluations saw the
    same images with the same labels (a dataset prepared again with other images or order differs)."""
    order = np.argsort(ids, kind="stable")
    digest = hashlib.sha256(b"finebench test set v1\0")
    digest.update(np.ascontiguousarray(ids[order], dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(labels[order], dtype="<i8").tobytes())
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class PerImagePredictions:
    """One evaluation's per-image predictions, sorted by id."""

    ids: np.ndarray
    """int64, N: each image's index in the evaluated split."""
    labels: np.ndarray
    """int64, N: true classes."""
    classes: dict[str, np.ndarray]
    """Per prediction name, N x k int64: its top-k classes, best first."""
    probs: dict[str, np.ndarray]
    """Per prediction name, N x k float32: their softmax probabilities."""
    split: str | None = None
    """The split evaluated (the run's test split by default), for reading."""

    @property
    def digest(self) -> str:
        return digest_test_set(self.ids, self.labels)

    def correct(self, name: str = SHOWN_PREDICTION) -> np.ndarray:
        """bool, N: whether prediction ``name``'s top-1 is the label."""
        return self.classes[name][:, 0] == self.labels

    def table(self) -> pyarrow.Table:
        """The long table (one row per image and prediction) with the format's metadata."""
        import pyarrow as pa

        names = list(self.classes)
        count = len(self.ids)
        k = self.classes[names[0]].shape[1] if names else 0
        columns: dict[str, pa.Array] = {
            "id": pa.array(np.tile(self.ids, len(names)), pa.int64()),
            "label": pa.array(np.tile(self.labels, len(names)), pa.int64()),
            "prediction": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat(np.arange(len(names), dtype=np.int32), count)), pa.array(names, pa.string())),
        }
        for j in range(k):
            columns[f"class_{j + 1}"] = pa.array(np.concatenate([self.classes[n][:, j] for n in names]), pa.int64())
        for j in range(k):
            columns[f"prob_{j + 1}"] = pa.array(np.concatenate([self.probs[n][:, j] for n in names]), pa.float32())
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "test_set_digest": self.digest,
                    "split": self.split or ""}
        return pa.table(columns).replace_schema_metadata({f"finebench.{key}": value for key, value in metadata.items()})


def write_predictions(path: Path, predictions: PerImagePredictions) -> None:
    """The Parquet file at ``path``, replaced atomically (a reader sees the old file or the new one)."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(predictions.table(), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_predictions(path: Path, hint: str = "") -> PerImagePredictions:
    """The file at ``path``; missing, unreadable, of another format or inconsistent (a digest in its
    metadata that its rows do not give) is a one-line ``FinebenchError`` naming it (``hint``: how to
    write it, added to the missing-file line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FinebenchError(f"{path}: not found{'; ' + hint if hint else ''}")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise FinebenchError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})") from None
    metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    if metadata.get("finebench.format") != FORMAT:
        raise FinebenchError(f"{path}: format {metadata.get('finebench.format')!r}; expected {FORMAT!r} "
                             "(a per-image predictions file of `finebench run` or `finebench eval`)")
    k = sum(1 for name in table.column_names if name.startswith("class_"))
    needed = ["id", "label", "prediction", *(f"class_{j + 1}" for j in range(k)), *(f"prob_{j + 1}" for j in range(k))]
    missing = [name for name in needed if name not in table.column_names]
    if missing or k == 0:
        raise FinebenchError(f"{path}: no column {', '.join(missing) or 'class_1'}; expected {', '.join(needed)}")
    frame = table.to_pandas()
    classes: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray] = {}
    ids = labels = None
    for name, rows in frame.groupby("prediction", sort=False, observed=True):
        rows = rows.sort_values("id", kind="stable")
        if ids is None:
            ids, labels = rows["id"].to_numpy(np.int64), rows["label"].to_numpy(np.int64)
        elif not np.array_equal(rows["id"].to_numpy(), ids):
            raise FinebenchError(f"{path}: prediction {name!r} covers other images than the first prediction")
        classes[str(name)] = rows[[f"class_{j + 1}" for j in range(k)]].to_numpy(np.int64)
        probs[str(name)] = rows[[f"prob_{j + 1}" for j in range(k)]].to_numpy(np.float32)
    if ids is None or SHOWN_PREDICTION not in classes:
        raise FinebenchError(f"{path}: no rows of prediction {SHOWN_PREDICTION!r}")
    result = PerImagePredictions(ids, labels, classes, probs, metadata.get("finebench.split") or None)
    recorded = metadata.get("finebench.test_set_digest")
    if recorded and recorded != result.digest:
        raise FinebenchError(f"{path}: its rows give test-set digest {result.digest}, its metadata says {recorded}; "
                             "the file was changed after it was written")
    return result


def read_digest(path: Path) -> str | None:
    """The test-set digest in a file's metadata (no rows read), or None when it has none or is unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = metadata.get(b"finebench.test_set_digest")
    return value.decode() if value else None
