"""Adience, gender task: the five subject-exclusive folds of fold_0_data.txt..fold_4_data.txt.

Images come from aligned.tar.gz: ``aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>``.
(The other archive, faces.tar.gz, names them ``faces/<user_id>/coarse_tilt_aligned_face...``; the
standard gender protocol uses the aligned faces, so that is the one source finebench asks for.)
"""

from __future__ import annotations

from pathlib import Path

from finebench.data.builders._layout import read_rows, require_dir, require_file
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError

CLASSES = ["female", "male"]
_GENDER_LABEL = {"f": 0, "m": 1}
FOLDS = 5
_HEADER = ("user_id", "original_image", "face_id", "age", "gender")


def parse(raw_dir: Path) -> ParsedDataset:
    image_root = require_dir(raw_dir / "aligned", "from aligned.tar.gz")
    splits: dict[str, list[Example]] = {}
    excluded = 0
    for fold in range(FOLDS):
        fold_path = require_file(raw_dir / f"fold_{fold}_data.txt")
        rows = read_rows(fold_path, min_fields=4, sep="\t")
        header = tuple(field.strip() for field in rows[0][:5]) if rows else ()
        if header != _HEADER:
            raise FinebenchError(f"{fold_path}: expected a tab-separated header starting with {', '.join(_HEADER)}")
        examples = []
        for row in rows[1:]:
            user_id, original_image, face_id = (field.strip() for field in row[:3])
            gender = row[4].strip().lower() if len(row) > 4 else ""
            if gender not in _GENDER_LABEL:  # "u" (unknown) and empty are excluded by the protocol
                excluded += 1
                continue
            path = image_root / user_id / f"landmark_aligned_face.{face_id}.{original_image}"
            examples.append(Example(require_file(path, f"listed in {fold_path.name}"), _GENDER_LABEL[gender]))
        splits[f"fold{fold}"] = examples
    return ParsedDataset(
        classes=list(CLASSES),
        splits=splits,
        info={"task": "gender", "images": "aligned (landmark-aligned faces)", "excluded_unknown_gender": excluded},
    )


SPEC = DatasetSpec(
    name="adience",
    num_classes=2,
    split_sizes={},
    protocol="Gender task, 5-fold cross-validation over the official subject-exclusive folds "
    "(fold_0_data.txt..fold_4_data.txt, stored as fold0..fold4): train on four folds, test on the "
    "fifth, report the mean top-1 over the five runs. Faces with unknown ('u') or empty gender are "
    "excluded. Images are the landmark-aligned faces (aligned.tar.gz).",
    terms="Registration required; non-commercial research use (Open University of Israel).",
    homepage="https://talhassner.github.io/home/projects/Adience/Adience-data.html",
    parse=parse,
    sources=(
        Source("aligned.tar.gz"),
        *(Source(f"fold_{fold}_data.txt", extract=False) for fold in range(FOLDS)),
    ),
    manual=True,
    folds=FOLDS,
    manual_instructions="Register for the Adience benchmark (link on the homepage), then download "
    "aligned.tar.gz and the five fold files fold_0_data.txt .. fold_4_data.txt from the data page, "
    "put all six files in one folder and run: finebench prepare adience --from <folder>.",
    description="Adience: 26,580 unconstrained face photos of 2,284 subjects with age and gender labels; "
    "finebench uses the gender labels (classes female, male).",
)
