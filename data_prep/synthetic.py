"""A synthetic segmentation dataset in the shard format: textured regions and shapes of 8 named classes.

Each class has its own colour and texture so a tiny model can learn them within a minute on a CPU. Every image is
a background (one or two regions split by a line) plus a few shapes; some shape borders are marked ignore (255).
Images depend only on (seed, split, index), so generation is deterministic and resumable.

Usage: ``python -m data_prep.synthetic --out DIR [--train N] [--val M] [--size S] [--seed K] [--shard-size B]``
writes ``DIR/synthetic/train/`` and ``DIR/synthetic/val/``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import shards

CLASS_NAMES = ["sky", "grass", "water", "sand", "brick wall", "snow", "wood", "metal"]
IGNORE_INDEX = 255
JPEG_QUALITY = 90
_SPLIT_CODES = {"train": 0, "val": 1}
_BASE_COLOURS = np.array(
    [
        [110, 170, 235],  # sky: light blue
        [60, 150, 50],  # grass: green
        [25, 80, 130],  # water: dark blue
        [215, 190, 130],  # sand: beige
        [170, 60, 45],  # brick wall: red
        [242, 242, 247],  # snow: white
        [125, 80, 40],  # wood: brown
        [140, 145, 155],  # metal: grey
    ],
    dtype=np.float32,
)


@dataclass
class SyntheticConfig:
    """What to generate."""

    num_train: int = 200  # training images
    num_val: int = 50  # validation images
    size: int = 128  # image side in pixels (square)
    seed: int = 0  # everything derives from this
    shard_size: int = 100  # samples per shard

    def __post_init__(self):
        for name in ("num_train", "num_val"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _texture(class_id: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Return a (size, size, 3) float image of one class's texture with a random phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy += rng.uniform(0, 64)
    xx += rng.uniform(0, 64)
    base = _BASE_COLOURS[class_id]
    if class_id == 0:  # sky: smooth vertical gradient
        shade = 25 * (yy / (size + 64) - 0.5)
    elif class_id == 1:  # grass: vertical blades
        shade = rng.normal(0, 22, (1, size)).astype(np.float32) + rng.normal(0, 8, (size, size)).astype(np.float32)
    elif class_id == 2:  # water: horizontal waves
        shade = 28 * np.sin(0.7 * yy + 2.0 * np.sin(0.15 * xx))
    elif class_id == 3:  # sand: fine grain
        shade = rng.normal(0, 14, (size, size)).astype(np.float32)
    elif class_id == 4:  # brick wall: mortar every 8 rows, staggered joints every 16 columns
        row = (yy // 8).astype(np.int64)
        mortar = (yy % 8 < 1.5) | ((xx + 8 * (row % 2)) % 16 < 1.5)
        return np.where(mortar[..., None], np.float32(200), base).astype(np.float32)
    elif class_id == 5:  # snow: almost flat
        shade = rng.normal(0, 4, (size, size)).astype(np.float32)
    elif class_id == 6:  # wood: wavy vertical grain
        shade = 30 * np.sin(0.6 * xx + 3.0 * np.sin(0.08 * yy))
    else:  # metal: diagonal sheen
        shade = 35 * np.sin(0.15 * (xx + yy))
    return base + shade[..., None]


def _shape_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """Return a boolean mask of one random circle, ellipse, rectangle or triangle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    radius = rng.uniform(0.12, 0.3) * size
    kind = rng.integers(4)
    if kind == 0:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if kind == 1:
        ry, rx = radius * rng.uniform(0.5, 1.0, 2)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if kind == 2:
        hy, hx = radius * rng.uniform(0.5, 1.0, 2)
        return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    corners = np.stack([cy + radius * np.sin(angles), cx + radius * np.cos(angles)], axis=1)
    sides = []
    for i in range(3):
        (y0, x0), (y1, x1) = corners[i], corners[(i + 1) % 3]
        sides.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0))
    # Inside a triangle means on the same side of all three edges, whichever way the corners turn.
    return (np.stack(sides) >= 0).all(0) | (np.stack(sides) <= 0).all(0)


def _border(mask: np.ndarray) -> np.ndarray:
    """Return the mask's pixels that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def make_example(seed: int, split: str, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Return one deterministic (image uint8 HxWx3, label uint8 HxW) pair for (seed, split, index)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(_SPLIT_CODES)}")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    num_classes = len(CLASS_NAMES)
    image = np.zeros((size, size, 3), dtype=np.float32)
    label = np.zeros((size, size), dtype=np.uint8)

    background = rng.choice(num_classes, size=2, replace=False)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(-0.3, 0.3) * size
    second = (np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2) > offset) if rng.random() < 0.7 else np.zeros((size, size), bool)
    for region, class_id in ((~second, background[0]), (second, background[1])):
        image[region] = _texture(int(class_id), size, rng)[region]
        label[region] = class_id

    borders = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(2, 5))):
        class_id = int(rng.integers(num_classes))
        mask = _shape_mask(size, rng)
        image[mask] = _texture(class_id, size, rng)[mask]
        label[mask] = class_id
        borders &= ~mask
        if rng.random() < 0.5:
            borders |= _border(mask)
    label[borders] = IGNORE_INDEX
    image *= rng.uniform(0.9, 1.1)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def make_sample(config: SyntheticConfig, split: str, index: int) -> dict:
    """Return the shard members of synthetic sample ``index`` of ``split``."""
    image, label = make_example(config.seed, split, index, config.size)
    return shards.build_sample(
        shards.make_key("synthetic", split, f"{index:06d}"),
        _encode_jpeg(image),
        "jpg",
        label,
        label_dtype="uint8",
        ignore_index=IGNORE_INDEX,
        class_list="synthetic",
        source={"generator": "data_prep.synthetic", "seed": config.seed, "index": index, "size": config.size},
    )


def dataset_info(split: str, config: SyntheticConfig) -> dict:
    """Return the dataset.json fields (before counts) of a synthetic split."""
    return {
        "name": "synthetic",
        "split": split,
        "class_list": "synthetic",
        "class_names": list(CLASS_NAMES),
        "num_classes": len(CLASS_NAMES),
        "ignore_index": IGNORE_INDEX,
        "label_dtype": "uint8",
        "shard_size": config.shard_size,
        "source": {"generator": "data_prep.synthetic", "seed": config.seed, "size": config.size},
    }


def _holds(path: Path, record: shards.ShardRecord, config: SyntheticConfig, split: str, indices: range) -> bool:
    """Whether a complete shard holds exactly these samples made with this seed and size (a rerun with other
    counts, seed or size must not reuse it)."""
    if record.keys != [shards.make_key("synthetic", split, f"{i:06d}") for i in indices]:
        return False
    with tarfile.open(path) as tar:  # the first sample's record (tarfile: webdataset would import torch)
        member = next(m for m in tar if m.name.endswith(f".{shards.RECORD_MEMBER}"))
        source = json.loads(tar.extractfile(member).read())["source"]
    return (source.get("seed"), source.get("size")) == (config.seed, config.size)


def write_split(out: str | Path, split: str, count: int, config: SyntheticConfig) -> Path:
    """Write one synthetic split to ``out/synthetic/<split>/``, skipping shards already complete; return the folder."""
    folder = Path(out) / "synthetic" / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for shard_index, start in enumerate(range(0, count, config.shard_size)):
        path = folder / shards.shard_name("synthetic", split, shard_index)
        indices = range(start, min(start + config.shard_size, count))
        record = shards.read_shard_record(path)
        if record is None or not _holds(path, record, config, split, indices):
            record = shards.write_shard(path, shard_index, (make_sample(config, split, i) for i in indices))
        records.append(record)
    shards.remove_shards_from(folder, "synthetic", split, len(records))  # shards of an earlier, larger split
    shards.finalize_folder(folder, dataset_info(split, config), records)
    return folder


def write_synthetic(out: str | Path, config: SyntheticConfig) -> dict[str, Path]:
    """Write the train and val splits; return {split: folder}."""
    return {split: write_split(out, split, count, config) for split, count in (("train", config.num_train), ("val", config.num_val))}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: generate the synthetic dataset."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root; writes OUT/synthetic/{train,val}/")
    parser.add_argument("--train", type=int, default=200, help="number of training images (default 200)")
    parser.add_argument("--val", type=int, default=50, help="number of validation images (default 50)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    args = parser.parse_args(argv)
    try:
        config = SyntheticConfig(args.train, args.val, args.size, args.seed, args.shard_size)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    try:
        folders = write_synthetic(args.out, config)
    except OSError as error:
        print(f"error: cannot write synthetic shards under {args.out}: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    total = config.num_train + config.num_val
    for split, folder in folders.items():
        print(f"{split}: {folder}")
    print(f"{total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
