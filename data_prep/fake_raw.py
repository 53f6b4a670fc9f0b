"""Write a COCO-Stuff-shaped raw tree of synthetic photos, for benchmarking the conversion without the real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_coco_stuff_tree(
    root: str | Path, num_images: int, width: int = 640, height: int = 480, seed: int = 0, folder: str = "train2017"
) -> Path:
    """Write ``root/images/<folder>/*.jpg`` and ``root/annotations/<folder>/*.png`` like stuffthingmaps; return root.

    Images are smooth colour fields with blocks and mild noise (JPEG quality 90, roughly the size of COCO photos);
    labels are blocks of valid COCO-Stuff values with some 255 pixels.
    """
    root = Path(root)
    image_dir = root / "images" / folder
    label_dir = root / "annotations" / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.normal(0, 6, (2 * height, 2 * width, 3)).astype(np.float32)  # sliced per image: cheaper than fresh
    used = np.array([v for v in range(182) if v not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)] + [255])
    for index in range(num_images):
        phase = rng.uniform(0, 6.3, 3)
        base = np.stack([np.sin(xx / 97 + phase[0]), np.cos(yy / 71 + phase[1]), np.sin((xx + yy) / 131 + phase[2])], -1)
        image = 128 + 90 * base
        blocks = rng.integers(0, 3, (height // 40 + 1, width // 40 + 1, 3)).repeat(40, 0).repeat(40, 1)[:height, :width]
        top, left = rng.integers(0, height), rng.integers(0, width)
        image += 30 * blocks + noise[top : top + height, left : left + width]
        stem = f"{index:012d}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(image_dir / f"{stem}.jpg", quality=90)
        label = rng.choice(used, (height // 32 + 1, width // 32 + 1)).repeat(32, 0).repeat(32, 1)[:height, :width]
        Image.fromarray(label.astype(np.uint8)).save(label_dir / f"{stem}.png")
    return root
