"""``finebench prepare`` at real size: images/s against ``tar`` reading the same archive, peak memory at two
sizes, and how long a store of a million images takes to open for training.

1. A synthetic iNaturalist 2021-mini set is written in the official layout (``train_mini.tar.gz`` and
   ``val.tar.gz`` image archives, ``*.json.tar.gz`` annotation archives; 100 species in 5 supercategories):
   N small JPEGs (200x150, about 9 KB each; 256 distinct images cycled under N distinct names, so the
   archives of 100,000 (+ 10,000 validation) images are about 1 GB and fit any disk). ``prepare --from`` then streams the image archives (never
   extracting them) into a store, in a child process, with ``--workers 1`` and with the default (one per
   core), and at the first size with ``--short-side 64`` (re-encoding: the work the worker processes
   take); the reference is ``tar -xzOf`` of the same two archives to /dev/null: reading and decompressing
   them and nothing else. Target: prepare >= half of tar's images/s without resizing.
2. Peak memory (``VmHWM`` of the prepare process: its own peak resident set) at the two sizes; target: within
   10 %.
3. Start-up of an epoch on a store built directly with pyarrow (the layout ``prepare`` writes: Arrow record
   batches of 100 rows) of 100,000 and 1,000,000 entries: ``plan_loaders`` + ``build_loaders`` + the first
   batch, and the resident memory they add.

    python benchmarks/prepare_speed.py                       # 10,000 and 100,000 images; 100k and 1M entries
    python benchmarks/prepare_speed.py --images 10000 30000  # under heavy load
    python benchmarks/prepare_speed.py --quick               # smoke run
    python benchmarks/prepare_speed.py --images 10000 100000 --repeats 3 --no-resize --entries   # prepare only
    python benchmarks/prepare_speed.py --images 100000 --no-resize --entries --against ../main   # A/B, same rounds
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finebench.bench import benchmark_arguments, format_table, machine_line, parse_benchmark_arguments

SPECIES, GROUPS = 100, 5
DISTINCT = 256


def _jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for index in range(DISTINCT):
        base = np.linspace(0, 255, 200, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(base + rng.normal(0, 12, (150, 200, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def _tar_gz(path: Path, members) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w|") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def make_inat(folder: Path, images: int) -> tuple[int, int]:
    """The official 2021-mini files for ``images`` training images (+ a tenth as validation); their sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = _jpegs()
    categories = [
        {"id": i, "name": f"species {i}", "supercategory": f"group {i % GROUPS}", "kingdom": "K", "phylum": "P",
         "class": "C", "order": f"O{i % 7}", "family": f"F{i % 13}", "genus": f"G{i % 31}"}
        for i in range(SPECIES)
    ]
    counts = {"train": images, "val": max(images // 10, SPECIES)}
    roots = {"train": "train_mini", "val": "val"}
    next_id = 0
    for split, count in counts.items():
        names = [f"{roots[split]}/{i % SPECIES:05d}_species/{split}{i:08d}.jpg" for i in range(count)]
        coco = {"images": [{"id": next_id + i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"id": next_id + i, "image_id": next_id + i, "category_id": i % SPECIES}
                                for i in range(count)],
                "categories": categories}
        next_id += count
        annotation = "train_mini.json" if split == "train" else "val.json"
        _tar_gz(folder / f"{annotation}.tar.gz", [(annotation, json.dumps(coco).encode())])
        _tar_gz(folder / f"{roots[split]}.tar.gz", ((n, jpegs[i % DISTINCT]) for i, n in enumerate(names)))
    return counts["train"], counts["val"]


CHILD = """
import json, resource, sys, time
from dataclasses import replace
from pathlib import Path
from finebench.data import registry
from finebench.data.prepare import prepare_dataset
folder, root, workers, short = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spec = registry.get_spec("inat2021_mini")
sources = tuple(replace(s, md5=None, sha256=None) for s in spec.sources)  # digests are still computed, as always
start = time.perf_counter()
with registry.override(replace(spec, sources=sources)):
    prepare_dataset("inat2021_mini", root, from_path=folder, quiet=True, workers=workers or None, force=True,
                    short_side=short or None)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak. ru_maxrss is not: Linux carries the parent's peak over fork and exec, so it
# reported the benchmark process (the archives' JSON it had built) rather than the prepare.
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("VmHWM"))
own, gzip = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": seconds, "maxrss_mib": int(status["VmHWM"].split()[0]) / 1024,
                  "cpu_s": own.ru_utime + own.ru_stime, "gzip_cpu_s": gzip.ru_utime + gzip.ru_stime}))
"""


def run_prepare(folder: Path, root: Path, workers: int, short_side: int = 0, checkout: Path | None = None) -> dict:
    """One prepare in its own process; ``checkout``: the finebench of another working tree (``--against``)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)} if checkout else None
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(root), str(workers), str(short_side)],
                            capture_output=True, text=True, check=True, env=env, cwd=checkout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_tar(folder: Path) -> float:
    start = time.perf_counter()
    for name in ("train_mini.tar.gz", "val.tar.gz"):
        subprocess.run(["tar", "-xzOf", str(folder / name)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


# ---- 3: opening a store of a million entries -----------------------------------------------------


def make_store(root: Path, entries: int) -> None:
    """A store of ``entries`` tiny JPEGs written with pyarrow in prepare's layout (record batches of 100)."""
    import datasets
    import pyarrow as pa

    from finebench.data import store

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()  # tiny (about 0.3 KB), so a million of them is a few hundred MB
    classes = [f"c{i}" for i in range(SPECIES)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    splits = {"train": entries, "test": 1000}
    for split, count in splits.items():
        folder = root / "synthetic" / split
        folder.mkdir(parents=True)
        per_file = 500_000
        names = []
        for file_index, first in enumerate(range(0, count, per_file)):
            rows = min(per_file, count - first)
            name = f"data-{file_index:05d}-of-{-(-count // per_file):05d}.arrow"
            names.append(name)
            batch_images = pa.array([{"bytes": jpeg, "path": None}] * 100, type=features.arrow_schema.field("image").type)
            with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, features.arrow_schema) as writer:
                for start in range(0, rows, 100):
                    size = min(100, rows - start)
                    labels = pa.array((np.arange(first + start, first + start + size) % SPECIES).astype(np.int64))
                    writer.write_batch(pa.record_batch([batch_images.slice(0, size), labels], schema=features.arrow_schema))
        from datasets.utils.py_utils import asdict

        info = asdict(datasets.DatasetInfo(features=features))
        (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}))
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                       "_fingerprint": "bench", "_format_columns": None,
                                                       "_format_kwargs": {}, "_format_type": None,
                                                       "_output_all_columns": False, "_split": None}))
    meta = {"name": "synthetic", "version": store.STORE_FORMAT, "classes": classes, "num_classes": SPECIES,
            "splits": splits, "image_max_side": 64, "image_size": [64, 48], "resize": None, "info": {}}
    (root / "synthetic" / "meta.json").write_text(json.dumps(meta))


STARTUP_CHILD = """
import json, sys, time
from pathlib import Path

def hwm_kib():  # this process's peak (ru_maxrss would include the parent's, carried over fork and exec)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

from finebench.data.loader import build_loaders
import torch
imported = hwm_kib()
start = time.perf_counter()
loaders = build_loaders("synthetic", Path(sys.argv[1]), input_size=32, augmentation="cifar", batch_size=64,
                        workers=0, seed=0)
built = time.perf_counter()
next(iter(loaders.train))
first = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
print(json.dumps({"build_s": built - start, "first_batch_s": first - built, "size": loaders.train_size,
                  "added_mib": (hwm_kib() - imported) / 1024,
                  "anon_mib": int(status["RssAnon"].split()[0]) / 1024, "file_mib": int(status["RssFile"].split()[0]) / 1024}))
"""


def run_startup(root: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", STARTUP_CHILD, str(root)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--images", type=int, nargs="+", default=None, help="training images per measured size")
    parser.add_argument("--entries", type=int, nargs="*", default=None,
                        help="store entries for the start-up part (none given: the part is skipped)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the archives and stores go (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of tar and every prepare, one table row each")
    parser.add_argument("--no-resize", action="store_true", help="leave out the --short-side 64 variants")
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout (e.g. a worktree of main): its --workers 1 prepare in every round too")
    args = parse_benchmark_arguments(parser)
    sizes = args.images or ([300, 1200] if args.quick else [10_000, 100_000])
    entries = args.entries if args.entries is not None else ([2_000, 20_000] if args.quick else [100_000, 1_000_000])
    print(machine_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work).resolve()  # absolute: an --against prepare runs in its checkout
        for size in sizes:
            folder = work / f"inat{size}"
            train, val = make_inat(folder, size)
            archive_mb = sum((folder / n).stat().st_size for n in ("train_mini.tar.gz", "val.tar.gz")) / 2**20
            run_tar(folder)  # warm the page cache for both candidates alike
            variants = [(1, 0, "--workers 1"), (0, 0, "default workers")]
            if size == sizes[0] and not args.no_resize:  # re-encoding, where the worker processes do the work
                variants += [(1, 64, "--short-side 64 --workers 1"), (0, 64, "--short-side 64")]
            total = train + val
            for round_ in range(args.repeats):  # each round with its own tar figure: the load drifts
                tar_s = run_tar(folder)
                results = {}
                for workers, short, _ in variants:
                    results[workers, short] = run_prepare(folder, work / "data", workers, short)
                if args.against:
                    results["against"] = run_prepare(folder, work / "data", 1, 0, args.against.resolve())
                tar_s = min(tar_s, run_tar(folder))
                labelled = [((workers, short), label) for workers, short, label in variants]
                if args.against:
                    labelled.append(("against", f"--workers 1 in {args.against}"))
                for key, label in labelled:
                    r = results[key]
                    rows.append([f"{total:,} ({archive_mb:.0f} MB)",
                                 label + (f" (round {round_ + 1})" if args.repeats > 1 else ""),
                                 f"{total / r['seconds']:,.0f}", f"{total / tar_s:,.0f}", f"{tar_s / r['seconds']:.2f}",
                                 f"{r['maxrss_mib']:.0f}", f"{r.get('cpu_s', 0):.1f} + {r.get('gzip_cpu_s', 0):.1f}",
                                 ", ".join(f"{v:.1f}" for v in os.getloadavg())])
            print(format_table(["images", "prepare", "prepare img/s", "tar img/s", "prepare / tar", "peak MiB",
                                "CPU s (+ gzip)", "load"],
                               rows), flush=True)
            import shutil

            shutil.rmtree(folder)
            shutil.rmtree(work / "data", ignore_errors=True)
        startup = []
        for count in entries:
            root = work / f"store{count}"
            make_store(root, count)
            r = run_startup(root)
            startup.append([f"{count:,}", f"{r['build_s']:.2f}", f"{r['first_batch_s']:.2f}", f"{r['added_mib']:.0f}",
                            f"{r['anon_mib']:.0f} / {r['file_mib']:.0f}",
                            ", ".join(f"{v:.1f}" for v in os.getloadavg())])
            import shutil

            shutil.rmtree(root)
        if startup:
            print(format_table(["store entries", "build_loaders s", "first batch s", "peak MiB added", "RSS anon / file MiB", "load"], startup))
    print("prepare_speed: finished")


if __name__ == "__main__":
    main()
