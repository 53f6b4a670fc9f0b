"""Benchmark the COCO-Stuff conversion on a synthetic raw tree of 640x480 images.

Usage: ``python benchmarks/bench_data_prep.py --num-images N [--workers W] [--shard-size S] [--dir DIR]``

Prints the conversion rate (images/s) next to the cost of only reading the raw bytes and writing them into tars,
the floor the conversion is measured against.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.fake_raw import write_coco_stuff_tree  # noqa: E402
from data_prep.pipeline import ConvertOptions, convert_split  # noqa: E402
from data_prep.sources import CocoStuff  # noqa: E402


def copy_only(raw: Path, out: Path, shard_size: int) -> float:
    """Read every image and label file and write them into plain tars; return seconds."""
    files = sorted((raw / "images/train2017").glob("*.jpg"))
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for index in range(0, len(files), shard_size):
        with tarfile.open(out / f"copy-{index:08d}.tar", "w") as tar:
            for image in files[index : index + shard_size]:
                tar.add(image, arcname=image.name)
                tar.add(raw / "annotations/train2017" / f"{image.stem}.png", arcname=f"{image.stem}.png")
    return time.perf_counter() - start


def main() -> int:
    """Build the raw tree, convert it and print images/s."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=1000, help="images in the raw tree (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="conversion worker processes (default 2)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--dir", help="working folder (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        work = Path(work)
        start = time.perf_counter()
        raw = write_coco_stuff_tree(work / "raw", args.num_images)
        size = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
        print(f"raw tree: {args.num_images} images of 640x480, {size / 2**20:.1f} MiB, built in {time.perf_counter() - start:.1f} s")

        copy_seconds = copy_only(raw, work / "copy", args.shard_size)
        print(f"read+write bytes only: {copy_seconds:.2f} s, {args.num_images / copy_seconds:.0f} images/s")

        options = ConvertOptions(out=work / "shards", shard_size=args.shard_size, workers=args.workers, progress=False)
        summary = convert_split(CocoStuff(raw), "train", options)
        print(summary.describe())
        print(f"conversion: {summary.images_per_second:.0f} images/s with {args.workers} workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
