"""Resumable, parallel conversion of a sample source into shards (the engine under every converter).

A source lists its samples as sorted ``SampleRef``s and turns one ref into shard members. The engine cuts the
sorted list into shards of ``shard_size`` refs: shard ``i`` holds refs ``i*shard_size ..``, so a shard's content
depends only on the sorted input and the shard size. Worker processes decode and map labels; the main process
writes each shard under a temporary name and renames it when complete. Shards already complete are skipped, so a
killed run picks up where it stopped and ends byte-identical to an uninterrupted one.

Bad samples (corrupt image, missing or mismatched label, out-of-range ids) are collected with the file they came
from. Without ``skip_bad`` a shard holding one is not written and the run fails after converting everything else;
with ``skip_bad`` the shard is written without it and its sidecar lists it. Either way ``report.json`` lists them.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_prep import shards

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class BadSample(Exception):
    """A sample that cannot be converted; names the offending file."""

    def __init__(self, file: str, message: str):
        super().__init__(f"{file}: {message}")
        self.file = file
        self.message = message


class ConversionError(Exception):
    """A problem that stops a conversion (missing raw tree, unwritable output, full disk)."""


@dataclass(frozen=True)
class SampleRef:
    """One sample of a source: its file stem, the image and label paths relative to the root (None if absent)."""

    stem: str
    image: str | None
    label: str | None
    extra: Any = None  # source-specific data the worker needs (must pickle)


class Source:
    """Base of a converter: lists samples of a split and converts one sample into shard members."""

    name: str = ""  # dataset name used in keys and as the output folder
    class_list: str = ""  # name of the class list (catseg/vocab/<class_list>.json)
    label_dtype: str = "uint8"
    ignore_index: int = 255
    splits: tuple[str, ...] = ("val",)  # splits this source can convert
    default_splits: tuple[str, ...] = ("val",)  # splits converted when none is named

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def class_names(self) -> list[str]:
        """Return the class names, index = train id."""
        return load_class_list(self.class_list)

    def list_samples(self, split: str) -> list[SampleRef]:
        """Return the split's samples sorted by stem, including images without labels and labels without images."""
        raise NotImplementedError

    def source_id(self, split: str) -> str:
        """What a split's samples are read from, beyond their keys (empty where the keys name the files)."""
        return ""

    def load(self, ref: SampleRef, split: str) -> dict:
        """Return the shard members of one sample; raise BadSample naming the file for bad input."""
        raise NotImplementedError

    def info(self, split: str) -> dict:
        """Return the dataset.json fields of a split (counts are added when the split is finished)."""
        names = self.class_names()
        return {
            "name": self.name,
            "split": split,
            "class_list": self.class_list,
            "class_names": names,
            "num_classes": len(names),
            "ignore_index": self.ignore_index,
            "label_dtype": self.label_dtype,
        }

    def check_split(self, split: str) -> None:
        """Raise ValueError unless ``split`` is one this source converts."""
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; choose one of: {', '.join(self.splits)}")

    def relative(self, path: Path) -> str:
        """Return ``path`` relative to the raw root, as recorded in samples."""
        return path.relative_to(self.root).as_posix()

    def key(self, split: str, stem: str) -> str:
        """Return the sample key of a stem."""
        return shards.make_key(self.name, split, stem)

    def require_dir(self, path: Path, what: str) -> Path:
        """Return ``path`` if it is a folder, else raise ConversionError describing the expected layout."""
        if not path.is_dir():
            raise ConversionError(f"{what} {path} does not exist; is --root {self.root} the folder the dataset was unpacked into?")
        return path


def load_class_list(name: str) -> list[str]:
    """Return the class names of catseg/vocab/<name>.json, read as data so conversion does not import the model."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("catseg")
    folder = Path(next(iter(spec.submodule_search_locations))) / "vocab" if spec and spec.submodule_search_locations else None
    path = folder / f"{name}.json" if folder else None
    if path is None or not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.json")) if folder and folder.is_dir() else []
        raise ValueError(f"unknown class list {name!r}; choose one of: {', '.join(known)}")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Reading raw files (every failure becomes BadSample naming the file)


@dataclass
class RawImage:
    """Image bytes as they will be stored, with their format and size."""

    data: bytes
    ext: str  # "jpg" or "png"
    width: int
    height: int
    sha256: str  # of the source file bytes


def read_image(path: Path, display: str) -> RawImage:
    """Read an image file, checking that it decodes completely; see image_from_bytes."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadSample(display, f"cannot read image ({error.strerror or error})") from error
    return image_from_bytes(data, display)


def image_from_bytes(data: bytes, display: str) -> RawImage:
    """Check that image bytes decode completely; JPEG and PNG are kept as they are, other formats become PNG."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fmt = image.format
            if fmt == "JPEG":
                # Decoding at 1/8 scale still reads every entropy-coded byte, so truncation is caught cheaply.
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            if fmt not in ("JPEG", "PNG"):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                return RawImage(buffer.getvalue(), "png", width, height, sha)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise BadSample(display, f"corrupt or truncated image ({error})") from error
    return RawImage(data, "jpg" if fmt == "JPEG" else "png", width, height, sha)


def read_label_png(path: Path, display: str) -> tuple[np.ndarray, str]:
    """Read a single-channel label PNG as its stored integers; return (array, sha256 of the file)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadSample(display, f"cannot read label ({error.strerror or error})") from error
    return label_from_bytes(data, display), hashlib.sha256(data).hexdigest()


def label_from_bytes(data: bytes, display: str) -> np.ndarray:
    """Decode a single-channel label image as its stored integers (8 or 16 bit, palette indices), never as RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise BadSample(display, f"label has mode {image.mode}; expected a single-channel label map (L, P or I;16)")
            return np.asarray(image)
    except BadSample:
        raise
    except Exception as error:
        raise BadSample(display, f"corrupt or truncated label file ({error})") from error


def check_same_size(image: RawImage, label: np.ndarray, label_display: str, image_display: str) -> None:
    """Raise BadSample naming the label file when its size differs from the image's."""
    if label.shape[:2] != (image.height, image.width):
        raise BadSample(
            label_display,
            f"label is {label.shape[1]}x{label.shape[0]} but image {image_display} is {image.width}x{image.height}",
        )


def make_lut(mapping: dict[int, int], size: int, default: int = -1) -> np.ndarray:
    """Return a lookup table of ``size`` entries: mapping[v] for listed values, ``default`` elsewhere."""
    lut = np.full(size, default, dtype=np.int32)
    for value, train_id in mapping.items():
        lut[value] = train_id
    return lut


def apply_lut(label: np.ndarray, lut: np.ndarray, display: str, valid: str) -> np.ndarray:
    """Map raw label values through ``lut``; values that map to -1 (or fall outside it) are out-of-range errors."""
    values = label.astype(np.int64, copy=False)
    if values.size and (values.min() < 0 or values.max() >= len(lut)):
        bad = np.unique(values[(values < 0) | (values >= len(lut))])
        raise BadSample(display, f"out-of-range label ids {_few(bad)}; valid values are {valid}")
    mapped = lut[values]
    if values.size and mapped.min() < 0:
        bad = np.unique(values[mapped < 0])
        raise BadSample(display, f"out-of-range label ids {_few(bad)}; valid values are {valid}")
    return mapped


def _few(values: np.ndarray) -> str:
    listed = ", ".join(str(int(v)) for v in values[:10])
    return f"[{listed}{', ...' if len(values) > 10 else ''}]"


def pair_by_stem(images: dict[str, Path], labels: dict[str, Path], root: Path) -> list[SampleRef]:
    """Join image and label files by stem into sorted refs, keeping unmatched files (they become bad samples)."""
    refs = []
    for stem in sorted(set(images) | set(labels)):
        image, label = images.get(stem), labels.get(stem)
        refs.append(
            SampleRef(
                stem,
                image.relative_to(root).as_posix() if image else None,
                label.relative_to(root).as_posix() if label else None,
            )
        )
    return refs


def require_pair(ref: SampleRef, expected_image: str, expected_label: str, listed_in: str | None = None) -> None:
    """Raise BadSample when a ref lacks its image or its label."""
    listed = f" (listed in {listed_in})" if listed_in else ""
    if ref.image is None and ref.label is None:
        raise BadSample(expected_image, f"neither the image nor its label {expected_label} exists{listed}")
    if ref.image is None:
        raise BadSample(ref.label, f"label has no image (expected {expected_image}){listed}")
    if ref.label is None:
        raise BadSample(ref.image, f"image has no label (expected {expected_label}){listed}")


# ---------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class ConvertOptions:
    """How to run a conversion."""

    out: Path  # output root; a split goes to out/<dataset>/<split>/
    shard_size: int = 1000  # samples per shard
    workers: int = 2  # worker processes; 0 converts in the main process
    num_parts: int = 1  # split the shards into this many disjoint parts (one per machine)
    part: int = 0  # which part this run converts, 0 <= part < num_parts
    skip_bad: bool = False  # write shards without bad samples instead of failing
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self):
        self.out = Path(self.out)
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in the main process), got {self.workers}")
        if self.num_parts < 1:
            raise ValueError(f"num_parts must be >= 1, got {self.num_parts}")
        if not 0 <= self.part < self.num_parts:
            raise ValueError(f"part must be in 0..{self.num_parts - 1} for num_parts={self.num_parts}, got {self.part}")


@dataclass
class Summary:
    """What one conversion run did."""

    folder: Path
    images: int = 0  # samples converted by this run
    shards_written: int = 0
    shards_skipped: int = 0  # complete before this run
    shards_total: int = 0  # in the whole split
    seconds: float = 0.0
    bad: list[dict] = field(default_factory=list)  # every bad sample known (this run and complete shards)
    outdated: list[str] = field(default_factory=list)  # shards of another sample list or shard size: redone or removed
    finished: bool = False  # dataset.json written: every shard of every part is complete

    @property
    def images_per_second(self) -> float:
        """Return the conversion rate of this run."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """Return a one-paragraph human summary."""
        lines = [
            f"{self.folder}: {self.images} images, {self.shards_written} shards written "
            f"({self.shards_skipped} already complete, {self.shards_total} in the split), "
            f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s"
        ]
        if self.outdated:
            names = ", ".join(self.outdated[:3]) + (", ..." if len(self.outdated) > 3 else "")
            lines.append(
                f"{len(self.outdated)} earlier shards ({names}) do not hold what the current file list and shard size "
                "put there (files were added or removed, or --shard-size changed); they are redone or, past the last "
                "shard, removed"
            )
        if self.bad:
            lines.append(f"{len(self.bad)} bad samples (see {self.folder / 'report.json'}):")
            lines += [f"  {b['file']}: {b['error']}" for b in self.bad[:20]]
            if len(self.bad) > 20:
                lines.append(f"  ... and {len(self.bad) - 20} more")
        if not self.finished:
            lines.append("not finished: shards of other parts or with bad samples are missing; dataset.json not written")
        return "\n".join(lines)


_SOURCE: Source | None = None
_SPLIT: str = ""


def _die_with_parent() -> None:
    """Ask Linux to kill this worker if the main process dies, so a killed run leaves no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _init_worker(source: Source, split: str, parent: int) -> None:
    global _SOURCE, _SPLIT
    _SOURCE, _SPLIT = source, split
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C


def _convert_one(ref: SampleRef) -> tuple[str, Any]:
    assert _SOURCE is not None
    key = _SOURCE.key(_SPLIT, ref.stem)
    try:
        return "ok", _SOURCE.load(ref, _SPLIT)
    except BadSample as bad:
        return "bad", {"key": key, "file": bad.file, "error": bad.message}
    except MemoryError:
        raise
    except Exception as error:  # a malformed file the converter did not foresee: a bad sample naming it, not a crash
        return "bad", {"key": key, "file": ref.label or ref.image, "error": f"cannot convert ({type(error).__name__}: "
                       f"{error})"}


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".write-probe-*"):  # left by a run killed in the instant below
            stale.unlink(missing_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as error:
        raise ConversionError(f"cannot write to output folder {folder} ({error.strerror or error}); choose a writable --out")


def _out_of_space(error: OSError, path: Path) -> ConversionError:
    return ConversionError(
        f"no space left while writing {path} ({error.strerror}); free space and rerun the same command: "
        "complete shards are kept and the partial one was removed"
    )


def report_path(folder: Path, options: ConvertOptions) -> Path:
    """Return the bad-sample report file of a run (one per part when the work is split)."""
    if options.num_parts == 1:
        return folder / "report.json"
    return folder / f"report-part{options.part}-of{options.num_parts}.json"


def convert_split(source: Source, split: str, options: ConvertOptions) -> Summary:
    """Convert one split of a source into ``options.out/<name>/<split>/``, resuming from complete shards."""
    source.check_split(split)
    start = time.perf_counter()
    folder = options.out / source.name / split
    _ensure_writable(folder)
    refs = source.list_samples(split)
    if not refs:
        raise ConversionError(f"no {split} samples found for {source.name} under {source.root}; check --root")
    keys = []
    for ref in refs:
        try:
            keys.append(source.key(split, ref.stem))
        except shards.ShardFormatError as error:
            raise ConversionError(f"{source.root / (ref.image or ref.label)}: {error}") from None
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ConversionError(f"{source.name} {split}: several files share the sample key(s) {', '.join(dupes)}")

    size = options.shard_size
    num_shards = (len(refs) + size - 1) // size
    paths = [folder / shards.shard_name(source.name, split, i) for i in range(num_shards)]
    mine = [i for i in range(num_shards) if i % options.num_parts == options.part]
    for i in mine:  # leftovers of a killed run; other parts' temporaries may be in use
        for stale in folder.glob(f".{paths[i].name}.tmp-*"):
            stale.unlink(missing_ok=True)
    outdated: list[str] = []
    source_id = source.source_id(split)
    records: dict[int, shards.ShardRecord] = {}

    def planned(record: shards.ShardRecord, i: int) -> bool:
        """Whether shard i's record holds what the current sample list and shard size put there."""
        return sorted(record.sample_keys()) == sorted(keys[i * size : (i + 1) * size]) and record.source_id == source_id

    for i in range(num_shards):
        record = shards.read_shard_record(paths[i])
        if record is None:
            continue
        if not planned(record, i):
            outdated.append(paths[i].name)  # made from another sample list or shard size: its part redoes it
        elif not record.skipped:
            records[i] = record
        # a shard that skipped bad samples (--skip-bad) is redone: its files may have been fixed since
    outdated += shards.remove_shards_from(folder, source.name, split, num_shards)  # past the plan
    if outdated:  # the split's lists describe the old shards until every shard is complete again
        (folder / shards.SIZES_FILE).unlink(missing_ok=True)
        (folder / shards.DATASET_FILE).unlink(missing_ok=True)
    pending = [i for i in mine if i not in records]
    summary = Summary(
        folder, shards_total=num_shards, shards_skipped=len([i for i in mine if i in records]), outdated=outdated
    )

    bad_this_run: list[dict] = []
    work = [ref for i in pending for ref in refs[i * size : (i + 1) * size]]
    if work:
        _run_pending(source, split, options, refs, pending, paths, records, work, bad_this_run, summary, source_id)

    known_bad = {b["key"]: b for r in records.values() for b in r.skipped}
    known_bad.update({b["key"]: b for b in bad_this_run})
    summary.bad = [known_bad[k] for k in sorted(known_bad)]
    report = {
        "dataset": source.name,
        "split": split,
        "skip_bad": options.skip_bad,
        "part": options.part,
        "num_parts": options.num_parts,
        "bad": summary.bad,
    }
    shards.write_json_atomic(report_path(folder, options), report)
    # Parts started together (a SLURM array) each listed the shards before the others had written theirs: whichever
    # finishes last finds them complete now and writes the split's lists. Another part's shard that skipped bad
    # samples (--skip-bad) is complete as that part wrote it; only its own part redoes it on a later run.
    for i in range(num_shards):
        if i not in records and i % options.num_parts != options.part:
            record = shards.read_shard_record(paths[i])
            if record is not None and planned(record, i):
                records[i] = record
    if len(records) == num_shards:
        info = source.info(split)
        info["shard_size"] = size
        shards.finalize_folder(folder, info, list(records.values()))
        summary.finished = True
    summary.seconds = time.perf_counter() - start
    return summary


def _run_pending(source, split, options, refs, pending, paths, records, work, bad_this_run, summary,
                 source_id) -> None:
    from tqdm import tqdm

    size = options.shard_size
    results: Any
    pool = None
    if options.workers > 0:
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(options.workers, mp_context=context, initializer=_init_worker,
                                   initargs=(source, split, os.getpid()))
        results = _pool_results(pool, work, chunk=8, in_flight=4 * options.workers)
    else:
        global _SOURCE, _SPLIT
        _SOURCE, _SPLIT = source, split
        results = map(_convert_one, work)
    bar = tqdm(total=len(work), unit="img", desc=f"{source.name}/{split}", disable=not options.progress, file=sys.stderr)
    try:
        for i in pending:
            members, skipped = [], []
            for _ in refs[i * size : (i + 1) * size]:
                try:
                    status, value = next(results)
                except BrokenProcessPool as error:
                    raise ConversionError(
                        f"a conversion worker process died while {paths[i].name} was being made (killed from outside, "
                        f"e.g. by the system when out of memory: fewer --workers use less); the complete shards are "
                        f"kept, rerun to continue") from error
                if status == "ok":
                    members.append(value)
                else:
                    skipped.append(value)
                bar.update(1)
            bad_this_run.extend(skipped)
            if skipped and not options.skip_bad:
                continue  # leave the shard unwritten so a rerun after fixing the files redoes it
            try:
                records[i] = shards.write_shard(paths[i], i, members, skipped, source_id)
            except OSError as error:
                if error.errno in _NO_SPACE_ERRNOS:
                    raise _out_of_space(error, paths[i]) from error
                raise ConversionError(f"cannot write {paths[i]} ({error.strerror or error})") from error
            summary.images += len(members)
            summary.shards_written += 1
    except BaseException:
        if pool is not None:  # an error or Ctrl-C: stop the workers now, not after the tasks given them
            workers = list(getattr(pool, "_processes", None) or {})
            pool.shutdown(wait=False, cancel_futures=True)
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True)


def _convert_chunk(refs: list[SampleRef]) -> list[tuple[str, Any]]:
    return [_convert_one(ref) for ref in refs]


def _pool_results(pool: ProcessPoolExecutor, work: list[SampleRef], chunk: int, in_flight: int):
    """`_convert_one` of every ref of `work`, in order, from the pool's workers, with at most `in_flight` chunks
    submitted ahead of the one being read, so converted images do not pile up in memory while shards are written.
    A worker that dies raises BrokenProcessPool here instead of leaving its chunk unanswered for ever."""
    pending: deque = deque()
    for start in range(0, len(work), chunk):
        pending.append(pool.submit(_convert_chunk, work[start : start + chunk]))
        if len(pending) >= in_flight:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()
