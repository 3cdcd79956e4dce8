"""Golden tensors for ``pmg``'s jigsaw from PRIS-CV/PMG-Progressive-Multi-Granularity-Training.

Usage: python tools/golden/pmg.py <checkout of the PMG repository> [out dir]

Runs the official ``jigsaw_generator`` (utils.py; model.py and Resnet.py beside it for its star
imports) at its 448 px on an image whose pixels hold their cell's index, for n = 8, 4, 2 in the
training step's order with Python ``random`` seeded (0): the realised cell arrangement (the index
each cell holds afterwards, n² integers) is the whole of what the jigsaw does to any image.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import official_commit, official_file, run_parts, write  # noqa: E402

SIZE = 448


def cell_index_image(n: int) -> torch.Tensor:
    cell = SIZE // n
    rows = torch.arange(SIZE) // cell
    return (rows[:, None] * n + rows[None, :]).to(torch.float64).expand(1, 3, SIZE, SIZE).clone()


def main(checkout: str, out: str = "tests/data/golden/pmg") -> None:
    files = {name: official_file(checkout, name) for name in ("model.py", "Resnet.py")}
    namespace = run_parts(official_file(checkout, "utils.py"), {"jigsaw_generator"}, files)
    random.seed(0)
    tensors = {}
    for n in (8, 4, 2):
        image = cell_index_image(n)
        jigsawed = namespace["jigsaw_generator"](image, n)
        cell = SIZE // n
        tensors[f"cells_{n}"] = jigsawed[0, 0, ::cell, ::cell].flatten().to(torch.int64)
        # every pixel of a cell moved with it (the arrangement is a permutation of whole cells)
        assert torch.equal(jigsawed[0, 0], tensors[f"cells_{n}"].view(n, n).repeat_interleave(cell, 0)
                           .repeat_interleave(cell, 1).to(torch.float64))
    write(Path(out), tensors, official_commit(checkout), "PRIS-CV/PMG-Progressive-Multi-Granularity-Training")


if __name__ == "__main__":
    main(*sys.argv[1:])
