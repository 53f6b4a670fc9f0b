"""`catseg` command line: segment images with your own class names, list presets, fetch weights."""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import write_bytes_atomic, write_json_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MAX_CLASSES = 2**16  # class ids 0 .. 65535 in the 16-bit label map PNG


def palette(n: int) -> np.ndarray:
    """n distinct, deterministic RGB colours (golden-ratio hue steps)."""
    import colorsys
    cols = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))
            for i in range(n)]
    return (np.array(cols) * 255).astype(np.uint8).reshape(n, 3)


def parse_classes(text: str) -> list[str]:
    """'cat, dog, grass' -> ['cat', 'dog', 'grass']."""
    return [c.strip() for c in text.split(",") if c.strip()]


def load_vocabulary(spec: str) -> list[str]:
    """A benchmark name (ade150, ...) or a file: JSON list, or text with one class per line (commas = synonyms).
    Names come stripped of surrounding spaces (benchmark lists keep the reference's stray ones: "bed ")."""
    from .vocab import VOCABS, load_vocab
    if spec in VOCABS:
        return [n.strip() for n in load_vocab(spec)]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--vocab {spec!r} is neither a file nor a benchmark; benchmarks: {', '.join(VOCABS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
    except UnicodeDecodeError as e:
        raise ValueError(f"{spec}: not UTF-8 text ({e}); save the vocabulary as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{spec}: not valid JSON ({e}); a JSON vocabulary is a list of strings") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{spec}: a JSON vocabulary must be a list of strings")
        return [n.strip() for n in names]
    lines = (line.strip() for line in text.splitlines())
    names = [line for line in lines if line and not line.startswith("#")]
    if len(names) == 1 and "," in names[0]:  # a list written on one line, which would label every pixel alike
        warnings.warn(f"{spec} holds one line, {names[0][:80]!r}: that is ONE class with synonyms separated by "
                      f"commas; for several classes put one class per line (or pass --classes \"a, b, c\")",
                      stacklevel=2)
    return names


def collect_images(inputs: list[str], out_dir: Path | None = None) -> list[tuple[Path, str]]:
    """(image, the name its outputs take in the output folder), in input order.

    Files as given, folders expanded to the images inside (sorted). Outputs are named by the image's stem; images
    whose stems clash are named by their file name, or for a folder's images by the folder's name and their path
    inside it, suffix included, with `_` for `/` and `.` (photos/ holding sub/photo.jpg -> photos_sub_photo_jpg).
    A file named twice is taken once. A folder's earlier outputs are left out: the images catseg wrote, and
    everything in `out_dir` when it lies inside the folder. Raises if two images would still write the same outputs.
    """
    outputs = out_dir.resolve() if out_dir is not None else None
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        if not item.strip():  # Path("") is the current folder: an empty shell variable must not segment all of it
            raise ValueError("an input is empty (''); give image files or folders")
        p = Path(item)
        if p.is_dir():
            inside = outputs if outputs is not None and outputs != p.resolve() and outputs.is_relative_to(p.resolve()) \
                else None
            folder = Path(Path(os.path.abspath(p)).name)  # its name as given, also for "." and ".."
            found += [(q, folder / q.relative_to(p)) for q in sorted(p.rglob("*"))
                      if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                      and not any(part.startswith(".") for part in q.relative_to(p).parts)  # hidden, macOS ._x.jpg
                      and not (inside is not None and q.resolve().is_relative_to(inside))
                      and not (q.suffix.lower() == ".png" and _written_by_catseg(q))]
        elif p.exists():
            found.append((p, Path(p.name)))
        else:
            raise ValueError(f"input {item!r} does not exist (give image files or folders)")
    seen, images = set(), []
    for path, rel in found:
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        images.append((path, rel))
    stems = Counter(path.stem for path, _ in images)
    names = [path.stem if stems[path.stem] == 1 else rel.as_posix().replace("/", "_").replace(".", "_")
             for path, rel in images]
    clashes = {n for n, c in Counter(names).items() if c > 1}
    if clashes:
        same = [str(path) for (path, _), n in zip(images, names) if n in clashes]
        raise ValueError(f"images {same[:4]} would write the same output files; give them different names or "
                         f"segment them into different --out folders")
    return [(path, name) for (path, _), name in zip(images, names)]


LEGEND_SIZE = 11  # legend text size, px
# fc-list styles passed over while a regular one has the characters
_STYLES = ("Bold", "Black", "Heavy", "Medium", "Semi", "Demi", "Light", "Thin", "Italic", "Oblique", "Mono")
_fontconfig = {"usable": True}  # off for the process after fc-list failed or hung once


@functools.lru_cache(maxsize=None)
def legend_font(path: str | None = None) -> ImageFont.ImageFont | None:
    """The font file at `path` at the legend's size (None if it cannot be opened); without one, a TrueType font with
    broad coverage where the system has one (class names with accents, Cyrillic, Greek, ...), else Pillow's own."""
    if path is not None:
        try:
            return ImageFont.truetype(path, LEGEND_SIZE)
        except OSError:  # a bitmap or colour font FreeType cannot size, say
            return None
    for name in ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "arial.ttf"):
        try:
            return ImageFont.truetype(name, LEGEND_SIZE)
        except OSError:
            continue
    return ImageFont.load_default()


@functools.lru_cache(maxsize=None)
def _glyph(path: str, size: int, char: str) -> tuple:
    # basic layout: a text-shaping engine may refuse a lone character it cannot place
    mask = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC).getmask(char)
    return mask.size, bytes(mask)


def missing_glyphs(font: ImageFont.ImageFont, text: str) -> list[str]:
    """The characters of `text` that `font` cannot draw: they render as the font's box for a missing glyph, as the
    noncharacter U+FFFF does. A font without a file (Pillow's own): anything beyond ASCII."""
    if not isinstance(font, ImageFont.FreeTypeFont) or not isinstance(font.path, (str, os.PathLike)):
        return sorted({c for c in text if ord(c) > 126})
    box = _glyph(str(font.path), font.size, "\uffff")
    return sorted({c for c in text if not c.isspace() and _glyph(str(font.path), font.size, c) == box})


@functools.lru_cache(maxsize=None)
def fonts_with(chars: str) -> tuple[str, ...]:
    """System font files (through fontconfig's fc-list) that have every character of `chars`, regular styles
    first; none where fontconfig is missing or does not answer."""
    import subprocess

    if not _fontconfig["usable"]:
        return ()
    charset = " ".join(f"{ord(c):x}" for c in chars)
    try:
        found = subprocess.run(["fc-list", f":charset={charset}", "--format", "%{file}\n"], capture_output=True,
                               text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        _fontconfig["usable"] = False
        return ()
    return tuple(sorted(filter(None, found), key=lambda f: (sum(s in Path(f).name for s in _STYLES), Path(f).name)))


@functools.lru_cache(maxsize=None)
def legend_font_for(name: str) -> ImageFont.ImageFont:
    """The legend font, or a system font that draws every character of class `name` where the legend font cannot
    (CJK or Thai names, say); warns when no installed font can."""
    font = legend_font()
    missing = missing_glyphs(font, name)
    if not missing:
        return font
    for path in fonts_with("".join(missing)):
        other = legend_font(path)
        if other is not None and not missing_glyphs(other, name):
            return other
    warnings.warn(f"no installed font draws {''.join(missing)!r} of class name {name!r}: the legend shows boxes "
                  f"for them; install a font that has them (for Chinese, Japanese or Korean names, Noto Sans CJK: "
                  f"the fonts-noto-cjk package)", stacklevel=2)
    return font


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.5) -> Image.Image:
    """Colour overlay of the label map on the image, with a legend of the classes present."""
    colors = palette(len(names))
    blended = (image.astype(np.float32) * (1 - alpha) + colors[labels].astype(np.float32) * alpha).astype(np.uint8)
    present = [int(i) for i in np.unique(labels)]
    fonts = {i: legend_font_for(names[i]) for i in present}
    row = 16
    width = max(120, 30 + max(int(fonts[i].getlength(names[i])) for i in present))
    h = max(image.shape[0], row * len(present) + 8)
    canvas = Image.new("RGB", (image.shape[1] + width, h), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(present):
        y = 4 + k * row
        x = image.shape[1] + 6
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in colors[i]), outline=(0, 0, 0))
        draw.text((x + 18, y), names[i], fill=(0, 0, 0), font=fonts[i])
    return canvas


SOFTWARE = "catseg segment"  # in every output (PNG text chunk, JSON key): a rerun may replace its own files only
OUTPUTS = ("_labels.png", "_overlay.png", ".json")


def _atomic_save(img: Image.Image, path: Path, compress_level: int = 6) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    write_bytes_atomic(path, buffer.getvalue())


_EARLIER_RECORD = {"image", "size", "class_names", "areas", "scores"}  # the JSON of versions without the marker


def _written_by_catseg(path: Path) -> bool:
    """Whether `path` is a catseg segment output: marked, or beside the record of a version that did not mark."""
    try:
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            return isinstance(record, dict) and (record.get("software") == SOFTWARE or set(record) == _EARLIER_RECORD)
        with Image.open(path) as im:
            if im.info.get("Software") == SOFTWARE:
                return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    stem = next((path.name[:-len(s)] for s in OUTPUTS[:2] if path.name.endswith(s)), None)
    return stem is not None and path.with_name(f"{stem}{OUTPUTS[2]}").is_file() and \
        _written_by_catseg(path.with_name(f"{stem}{OUTPUTS[2]}"))


def check_no_foreign_outputs(out: Path, stems: list[str]) -> None:
    """Refuse to start when an output file to be written exists and is not an earlier catseg output (an annotation
    JSON beside its photo, an input image named like an output)."""
    foreign = [str(out / f"{stem}{suffix}") for stem in stems for suffix in OUTPUTS
               if (out / f"{stem}{suffix}").exists() and not _written_by_catseg(out / f"{stem}{suffix}")]
    if foreign:
        raise ValueError(f"the outputs would overwrite {len(foreign)} file(s) catseg did not write, e.g. {foreign[:3]}; "
                         f"choose another --out")


def resolve_model(preset: str | None, checkpoint: str | None):
    """Build the model: a checkpoint (file or training checkpoint folder) fixes the preset."""
    from . import create_model, list_models
    from .weights import check_weights_file, read_preset
    if checkpoint is None:
        if preset is None:
            raise ValueError("give --checkpoint (trained weights) or at least --model PRESET")
        warnings.warn("no --checkpoint given: the aggregation layers have random weights and the masks are "
                      "meaningless; pass weights trained with training/train.py or converted release weights")
        return create_model(preset)
    path = check_weights_file(checkpoint)  # a .safetensors file or a training checkpoint folder
    stored = read_preset(path)
    name = preset or stored
    if name is None:
        raise ValueError(f"{path} does not name its preset; pass --model")
    if preset is None and name not in list_models():
        raise ValueError(f"{path} names preset {name!r}, which this catseg does not know ({', '.join(list_models())}); "
                         f"pass --model")
    if preset is not None and stored is not None and preset != stored:
        raise ValueError(f"{path} holds weights of preset {stored!r}, not --model {preset!r}; pass --model {stored} "
                         f"or leave --model out")
    return create_model(name, pretrained=str(path))


def write_outputs(out: Path, stem: str, path: Path, image, pred, names: list[str]) -> None:
    """An image's label map, overlay and JSON record, each written atomically; if one cannot be written (a full
    disk), the image's outputs written before it are removed, so an image has all its outputs or none."""
    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    dtype = np.uint8 if len(names) <= 256 else np.uint16
    record = {"software": SOFTWARE, "image": str(path), "size": list(pred.labels.shape), "class_names": names,
              "areas": pred.areas(), "scores": {n: float(s) for n, s in zip(names, pred.scores)}}
    writes = [lambda f: _atomic_save(Image.fromarray(pred.labels.astype(dtype)), f),
              # zlib's fastest level: a photo compresses little either way (a 1024x768 one: 54 instead of 174 ms
              # for 14% more bytes)
              lambda f: _atomic_save(overlay_with_legend(rgb, pred.labels, names), f, compress_level=1),
              lambda f: write_json_atomic(f, record)]
    files = [out / f"{stem}{suffix}" for suffix in OUTPUTS]
    for k, (write, file) in enumerate(zip(writes, files)):
        try:
            write(file)
        except OSError as e:
            for done in files[:k]:
                done.unlink(missing_ok=True)
            raise OSError(f"cannot write {file} ({e.strerror or e}); the outputs of {path} were not kept") from None


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that could not be made or written in, without making it (the model loads first)."""
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write to output folder {str(out)!r}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to output folder {str(out)!r}: no permission to write in {existing}")


def cmd_segment(args) -> int:
    import torch
    from tqdm import tqdm
    from .inference import Segmenter
    from .model import CatSeg

    if (args.classes is None) == (args.vocab is None):
        raise ValueError("give exactly one of --classes \"cat, dog, grass\" or --vocab FILE|BENCHMARK")
    names = parse_classes(args.classes) if args.classes is not None else load_vocabulary(args.vocab)
    if not names:
        raise ValueError("the vocabulary is empty; give at least one class name")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    CatSeg.validate_class_names(names)
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes: the label map PNG holds 16-bit class ids, so at most {MAX_CLASSES}")
    if not args.out.strip():
        raise ValueError("--out is empty (''); give an output folder")
    out = Path(args.out)
    files = collect_images(args.inputs, out)  # inputs and outputs checked before the model loads
    if not files:
        raise ValueError(f"no images found in {args.inputs}")
    check_no_foreign_outputs(out, [stem for _, stem in files])
    check_output_folder(out)
    model = resolve_model(args.model, args.checkpoint)
    CatSeg.validate_class_names(names, model.config.synonyms)  # its own rule for synonyms, before any image
    torch.backends.cudnn.benchmark = True  # one vocabulary for all images: fixed shapes, so time cuDNN's algorithms
    seg = Segmenter(model, device=args.device, batch_size=args.batch_size, precision=args.precision,
                    class_chunk_size=args.class_chunk, compile=args.compile, fused_kernels=args.fused_kernels)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output folder {str(out)!r}: {e}") from None
    with tqdm(total=len(files), desc="segment", unit="img", disable=args.quiet) as bar:
        failed = segment_files(seg, files, names, out, args.workers, bar.update)
    done = len(files) - len(failed)
    print(f"segmented {done}/{len(files)} images into {out}" + (f"; {len(failed)} failed: {failed}" if failed else ""))
    return 1 if failed else 0


def _done_now(fn, *args):
    """fn(*args) run here, returned as a finished Future (what `segment_files` submits without worker threads); an
    error is kept for its result(), a Ctrl-C stops at once."""
    from concurrent.futures import Future

    future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
    return future


def _read_image(path: Path):
    """(image tensor, None), or (None, the error) for a file that cannot be read as an image."""
    from .inference import to_image_tensor

    try:
        return to_image_tensor(path), None
    except (ValueError, OSError) as e:
        return None, e


def segment_files(seg, files: list[tuple[Path, str]], names: list[str], out: Path, workers: int,
                  progress=lambda n: None) -> list[str]:
    """Segment `files` ((image, output stem) pairs) with `seg` into `out`, in `seg.batch_size` images per model call.
    With `workers` > 0, that many threads read the next images and write the finished ones while the model runs
    (the image codecs run outside Python's lock); 0 does all in this thread. Images that cannot be read are reported
    on stderr and skipped: returns their paths. A write that fails stops the run with its OSError, once the writes
    under way have finished; every image written has all its outputs. `progress(n)` is told of images done."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    out.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="catseg-io") if workers else None
    submit = pool.submit if pool else _done_now
    ahead = 2 * max(seg.batch_size, workers)  # images read ahead, and writes under way, at most
    todo, reads, writes, failed = iter(files), deque(), deque(), []

    def read_ahead():
        for path, stem in todo:
            reads.append((path, stem, submit(_read_image, path)))
            if len(reads) >= ahead:
                return

    try:
        read_ahead()
        while reads:
            batch = []
            while reads and len(batch) < seg.batch_size:
                path, stem, read = reads.popleft()
                image, error = read.result()
                if error is None:
                    batch.append((path, stem, image))
                else:
                    failed.append(str(path))
                    print(f"skipped {path}: {error}", file=sys.stderr)
                    progress(1)
            read_ahead()  # the next images are read while the model runs
            if batch:
                preds = seg.predict([image for _, _, image in batch], names)
                for (path, stem, image), pred in zip(batch, preds):
                    writes.append(submit(write_outputs, out, stem, path, image, pred, names))
            while writes and (len(writes) > ahead or not reads or writes[0].done()):
                writes.popleft().result()
                progress(1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return failed


def cmd_list(args) -> int:
    from . import list_models
    print("\n".join(list_models()))
    return 0


def cmd_download(args) -> int:
    from .download import download_preset_weights
    for path in download_preset_weights(args.preset, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="catseg", description="CAT-Seg open-vocabulary segmentation")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment images with your own class names")
    s.add_argument("inputs", nargs="+", help="image files or folders")
    s.add_argument("--classes", help='comma-separated class names, e.g. "cat, dog, grass"')
    s.add_argument("--vocab", help="vocabulary file (JSON list or one class per line) or a benchmark name")
    s.add_argument("--model", help="preset name (default: the checkpoint's)")
    s.add_argument("--checkpoint", help="trained weights (.safetensors or a training checkpoint folder)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU")
    s.add_argument("--class-chunk", type=_positive_int, default=128, help="classes per chunk (bounds memory)")
    s.add_argument("--batch-size", type=_positive_int, default=1,
                   help="images per model call (default 1; more pays on a GPU, memory grows with it)")
    s.add_argument("--workers", type=_count, default=min(4, os.cpu_count() or 1),
                   help="threads that read and write images while the model runs (default: up to 4, one per CPU "
                   "core); 0 does all in one thread")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the aggregation, decoder and image encoders (pays off over many images; "
                   "compiling takes minutes)")
    s.add_argument("--fused-kernels", action="store_true",
                   help="run the Swin blocks of the spatial aggregation as Triton kernels (CUDA; see "
                   "catseg.inference.fused_kernels)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_segment)
    ls = sub.add_parser("list", help="list model presets")
    ls.set_defaults(func=cmd_list)
    d = sub.add_parser("download", help="fetch a preset's pretrained CLIP/backbone weights into a folder")
    d.add_argument("preset")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_download)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch import problems surface later with a clearer message
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError) as e:  # OSError: a write failing in the output folder, a full disk
        print(f"catseg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
