"""`catseg segment`'s throughput on a folder of photos: images per second for a list of (batch size, I/O threads)
settings, and the time of each stage alone (reading an image, the model, writing its three outputs).

    python benchmarks/bench_segment.py [--preset catseg_tiny] [--device cpu] [--images 16] [--size 1024x768]
                                       [--classes 20] [--settings 1:0,1:2,4:2] [--json F]

The photos are written as JPEG files first (smooth random colour fields with noise, about the size a camera JPEG
of that resolution has). Each setting runs `catseg.cli.segment_files`, what `catseg segment --batch-size B
--workers W` runs after loading its model, into a fresh output folder; a first image through the model before the
timing leaves out the first call's set-up (and on a GPU the CUDA graph capture). With 0 workers the reads, the
model and the writes take turns in one thread; with W > 0, W threads read and write while the model runs. The
random weights give noisy label maps, which compress slower than a trained model's.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from catseg import Segmenter, create_model  # noqa: E402
from catseg.cli import _read_image, segment_files, write_outputs  # noqa: E402
from catseg.files import write_json_atomic  # noqa: E402


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with a little noise: compresses about as a photo does."""
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8))


def parse_settings(text: str) -> list[tuple[int, int]]:
    settings = []
    for part in text.split(","):
        try:
            batch, workers = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"--settings: {part!r} is not BATCH:WORKERS (e.g. 4:2)") from None
        if batch < 1 or workers < 0:
            raise ValueError(f"--settings: {part!r} needs a batch size >= 1 and workers >= 0")
        settings.append((batch, workers))
    return settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--preset", default="catseg_tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the photos")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--settings", default="1:0,1:2,4:2", help="BATCH:WORKERS,... (workers 0: one thread)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size {args.size!r} is not WIDTHxHEIGHT (e.g. 1024x768)")
    if args.images < 1 or args.classes < 1 or args.width < 1 or args.height < 1:
        p.error("--images, --classes and both sides of --size must be positive")
    try:
        args.settings = parse_settings(args.settings)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    width, height, settings = args.width, args.height, args.settings
    names = [f"class {i}" for i in range(args.classes)]
    torch.manual_seed(0)
    model = create_model(args.preset)
    device = torch.device(args.device)
    results = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "torch": torch.__version__, "images": args.images,
               "size": [width, height], "classes": args.classes, "settings": [],
               "command": "python benchmarks/bench_segment.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="catseg-bench-segment-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for k in range(args.images):
            photo(rng, width, height).save(folder / f"photo{k:04d}.jpg", quality=90)
        files = [(path, path.stem) for path in sorted(folder.iterdir())]
        for batch, workers in settings:
            seg = Segmenter(model, device=args.device, batch_size=batch)
            segment_files(seg, files[:1], names, Path(tmp) / "warm-up", 0)  # the first call's set-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            failed = segment_files(seg, files, names, Path(tmp) / f"out-{batch}-{workers}", workers)
            seconds = time.perf_counter() - start
            assert not failed, failed
            results["settings"].append({"batch_size": batch, "workers": workers, "seconds": round(seconds, 3),
                                        "images_per_s": round(args.images / seconds, 2)})
            print(f"batch {batch}, workers {workers}: {args.images / seconds:.2f} images/s ({seconds:.1f} s)",
                  flush=True)
        # each stage alone, one image after another in this thread
        stages = {"read": [], "model": [], "write": []}
        seg = Segmenter(model, device=args.device, batch_size=1)
        out = Path(tmp) / "stages"
        out.mkdir()
        for path, stem in files:
            t0 = time.perf_counter()
            image, error = _read_image(path)
            t1 = time.perf_counter()
            pred = seg.predict([image], names)[0]  # ends with the labels on the host: the device is done
            t2 = time.perf_counter()
            write_outputs(out, stem, path, image, pred, names)
            t3 = time.perf_counter()
            for stage, ms in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                stages[stage].append(1e3 * ms)
        results["stage_ms_median"] = {k: round(float(np.median(v)), 2) for k, v in stages.items()}
        print("one image, median ms: " + ", ".join(f"{k} {v}" for k, v in results["stage_ms_median"].items()))
    if args.json:
        write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
