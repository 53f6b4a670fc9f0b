"""Patch inference once the model has run, timed alone: the views' logits -> sigmoid probabilities -> each image's
label map and class scores, as `catseg.inference.predict_labels` computes them (views merged and arg-maxed at the
image size in class chunks), on random logits at a preset's geometry.

    python benchmarks/bench_merge.py [--preset catseg_vitb16_r101] [--classes 20,150,847] [--size 640x640]
                                     [--batch 1] [--sigmoid-first] [--json F]

The model is not built: only its config (crop, inference size and stride, output size) is used, and the model's
call in `predict_labels` is replaced by the random logits. Reports the median milliseconds per image and per class
(CUDA events on a GPU). `--sigmoid-first`: the maps merged at the model's output size
(`sigmoid_at_crop_size=False`). Run the same script on two commits to compare their merging.
"""
from __future__ import annotations

import argparse
import platform
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from catseg import inference  # noqa: E402
from catseg.bench import time_ms  # noqa: E402
from catseg.clip import clip_model_config  # noqa: E402
from catseg.files import write_json_atomic  # noqa: E402
from catseg.presets import get_config  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    try:
        size = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 640x640") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r}: width and height must be positive")
    return size


def _classes(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--classes {text!r}: give positive class counts, e.g. 20,150,847")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--preset", default="catseg_vitb16_r101")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=_classes, default=[20, 150, 847])
    p.add_argument("--size", type=_size, default=(640, 640), help="image WIDTHxHEIGHT (default 640x640)")
    p.add_argument("--batch", type=int, default=1, help="images per call, of one size")
    p.add_argument("--sigmoid-first", action="store_true", help="merge the maps at the model's output size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = get_config(args.preset, sigmoid_at_crop_size=not args.sigmoid_first)
    vision = clip_model_config(cfg)["vision_cfg"]
    side = vision["image_size"] // vision["patch_size"] * 2 ** len(cfg.decoder_dims)  # the model's output size
    model = types.SimpleNamespace(config=cfg, image_size=cfg.image_size, check_inputs=False)
    views = len(inference.crop_offsets(cfg.inference_size, cfg.image_size, cfg.inference_stride)) ** 2 + 1
    height, width = args.size
    images = torch.rand(args.batch, 3, height, width, device=device)
    results = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
               "torch": torch.__version__, "size": [width, height], "batch": args.batch, "views": views,
               "maps_side": side, "sigmoid_at_crop_size": cfg.sigmoid_at_crop_size, "rows": [],
               "command": "python benchmarks/bench_merge.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    view_logits = inference._view_logits
    try:
        for n in args.classes:
            g = torch.Generator(device=device).manual_seed(n)
            logits = torch.randn(args.batch, views, n, side, side, device=device, generator=g)
            inference._view_logits = lambda *a, **k: logits
            names = [f"class {i}" for i in range(n)]
            ms = time_ms(lambda: inference.predict_labels(model, images, names, cuda_graphs=False), device,
                         args.warmup, args.repeats)
            row = {"classes": n, "ms_per_image": ms / args.batch, "ms_per_class": ms / args.batch / n}
            results["rows"].append(row)
            print(f"{n:5d} classes: {row['ms_per_image']:9.1f} ms/image  {row['ms_per_class']:7.2f} ms/class",
                  flush=True)
    finally:
        inference._view_logits = view_logits
    if args.json:
        write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
