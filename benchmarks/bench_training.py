"""Training throughput: the data pipeline alone, and training steps of a preset (CPU or GPU).

    python benchmarks/bench_training.py data [--shards DIR] [--workers 2] [--batches 60] [--batch-size 4]
    python benchmarks/bench_training.py train [--preset catseg_tiny] [--steps 30] [--batch-size 4] [--workers 2]

`data` measures augmented samples/s at 384 x 384 from COCO-sized (640 x 480) JPEG shards; without --shards it
writes 256 such samples to a temporary folder first. `train` runs the real training loop in this process (random
weights, no download) on synthetic shards at the preset's resolution and prints images/s, data-wait fraction and
peak memory. On a machine with a GPU, run `train` for each preset; the presets' crop is 384 px.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def write_coco_like_shards(out: Path, count: int = 256, shard_size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` 640 x 480 JPEG samples (synthetic textures, 8 classes) as a shard folder; return it."""
    from PIL import Image

    from data_prep import shards, synthetic

    folder = out / "coco_like" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for s in range(0, count, shard_size):
        samples = []
        for i in range(s, min(count, s + shard_size)):
            image, label = synthetic.make_example(seed, "train", i, size=480)
            image = np.asarray(Image.fromarray(image).resize((640, 480), Image.BILINEAR))
            label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((640, 480), Image.NEAREST))
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=90)
            key = shards.make_key("coco_like", "train", f"{i:06d}")
            samples.append(shards.build_sample(key, buf.getvalue(), "jpg", label, label_dtype="uint8",
                                               ignore_index=255, class_list="synthetic", source={"index": i}))
        name = shards.shard_name("coco_like", "train", s // shard_size)
        records.append(shards.write_shard(folder / name, s // shard_size, samples))
    shards.finalize_folder(folder, {"name": "coco_like", "split": "train", "class_names": synthetic.CLASS_NAMES,
                                    "num_classes": len(synthetic.CLASS_NAMES), "ignore_index": 255,
                                    "label_dtype": "uint8"}, records)
    return folder


def bench_data(root: Path, workers: int, batches: int, batch_size: int, crop: int = 384) -> dict:
    """Augmented samples/s of the training stream (resize short side, crop, jitter, flip) with loader workers."""
    from training.data import AugmentConfig, ShardStream, make_loader, open_shards

    shards = open_shards(root)
    stream = ShardStream(shards, AugmentConfig(crop, crop), batch_size, seed=0, rank=0, world_size=1,
                         num_workers=workers, shuffle=64)
    loader = iter(make_loader(stream, workers))
    for _ in range(max(2, workers)):  # worker start-up and the first shard reads are not throughput
        next(loader)
    t0 = time.perf_counter()
    for _ in itertools.islice(loader, batches):
        pass
    seconds = time.perf_counter() - t0
    del loader
    return {"samples_per_s": batches * batch_size / seconds, "batches": batches, "batch_size": batch_size,
            "workers": workers, "crop": crop}


def bench_train(preset: str, steps: int, batch_size: int, workers: int, shards_root: Path, run_dir: Path) -> dict:
    """Run the training loop in this process and return its last logged metrics."""
    from training.config import load_config
    from training.train import Trainer

    cfg = load_config(None, [
        f"name=bench_{preset}", f"model.preset={preset}", "model.pretrained=false", f"data.root={shards_root}",
        f"data.workers={workers}", f"train.steps={steps}", f"train.batch_size={batch_size}",
        f"train.log_every={max(1, steps - 5)}", f"train.ckpt_every={10 * steps}", f"train.run_dir={run_dir}",
        "schedule.name=constant",
    ])
    trainer = Trainer(cfg, resume="none")
    t0 = time.perf_counter()
    trainer.train()
    metrics = dict(trainer.last_metrics)
    metrics.update(preset=preset, device=str(trainer.acc.device), wall_s=time.perf_counter() - t0)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="data pipeline samples/s")
    d.add_argument("--shards", type=Path, help="a shard folder (default: write COCO-sized synthetic shards)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--batches", type=int, default=60)
    d.add_argument("--batch-size", type=int, default=4)
    t = sub.add_parser("train", help="training images/s, data wait and peak memory")
    t.add_argument("--preset", default="catseg_tiny")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--shards", type=Path, help="a shard folder (default: synthetic shards at the preset's size)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.what == "data":
            root = args.shards or write_coco_like_shards(tmp)
            result = bench_data(root, args.workers, args.batches, args.batch_size)
        else:
            import catseg
            from data_prep import synthetic

            size = catseg.create_model(args.preset, pretrained=False).image_size if not args.shards else 0
            if args.shards:
                root = args.shards
            else:
                synthetic.write_synthetic(tmp / "shards", synthetic.SyntheticConfig(num_train=64, num_val=0,
                                                                                    size=size, shard_size=32))
                root = tmp / "shards" / "synthetic" / "train"
            result = bench_train(args.preset, args.steps, args.batch_size, args.workers, root, tmp / "run")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
