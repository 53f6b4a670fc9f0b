"""The shard format: the one module that writes and reads segmentation WebDataset shards.

A dataset split lives in one folder (``OUT/<dataset>/<split>/``) holding:

- ``<dataset>-<split>-NNNNNN.tar``: WebDataset shards. Each sample ``<key>`` has three members:
  ``<key>.jpg`` or ``<key>.png`` (the image bytes), ``<key>.label.png`` (the label map as an 8-bit or 16-bit
  grayscale PNG of train ids) and ``<key>.json`` (a record: source files and checksums, sizes, ignore value,
  class-list name).
- ``<dataset>-<split>-NNNNNN.tar.json``: the shard's sidecar record (sample count, sha256, byte size, samples
  skipped as bad). A shard is complete exactly when its sidecar exists and matches the tar.
- ``sizes.json``: ``{shard file name: sample count}`` for every shard, in order.
- ``dataset.json``: the class list (name and the class names themselves), counts, ignore value and label dtype.

Tar bytes are deterministic (fixed mtime, owner and member order) so a rerun reproduces a shard byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
SIZES_FILE = "sizes.json"
SIDECAR_SUFFIX = ".json"
IMAGE_EXTENSIONS = ("jpg", "png")
LABEL_MEMBER = "label.png"
RECORD_MEMBER = "json"
LABEL_DTYPES = {"uint8": 255, "uint16": 65535}
# Labels compress to a few KB at any level; level 1 keeps encoding cheap for the conversion's throughput.
PNG_COMPRESS_LEVEL = 1
_TAR_OWNER = "catseg"


class ShardFormatError(ValueError):
    """A shard folder, shard or record that does not match the format."""


class CorruptSampleError(ValueError):
    """A sample whose bytes cannot be decoded; the message names the sample key."""


def shard_name(dataset: str, split: str, index: int) -> str:
    """Return the file name of shard ``index`` of a dataset split."""
    return f"{dataset}-{split}-{index:06d}.tar"


def sidecar_path(shard_path: str | os.PathLike) -> Path:
    """Return the path of a shard's sidecar record."""
    return Path(str(shard_path) + SIDECAR_SUFFIX)


def make_key(dataset: str, split: str, stem: str) -> str:
    """Return the sample key ``{dataset}_{split}_{stem}``, refusing characters WebDataset cannot group by."""
    key = f"{dataset}_{split}_{stem}"
    if "." in key or "/" in key or not key.isprintable() or " " in key:
        raise ShardFormatError(
            f"sample key {key!r} (from file stem {stem!r}) contains '.', '/', a space or an unprintable character; "
            "WebDataset splits keys at the first '.', so rename the file or use a stem without these characters"
        )
    return key


# ---------------------------------------------------------------------------------------------------------------
# Encoding and decoding of members


def encode_label(label: np.ndarray, dtype: str) -> bytes:
    """Encode a 2-D train-id map as a grayscale PNG, 8-bit for ``uint8`` or 16-bit for ``uint16``."""
    if dtype not in LABEL_DTYPES:
        raise ValueError(f"label dtype {dtype!r} is not supported; choose one of: {', '.join(LABEL_DTYPES)}")
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label.shape}")
    limit = LABEL_DTYPES[dtype]
    if label.size and (label.min() < 0 or label.max() > limit):
        raise ValueError(f"label values must lie in 0..{limit} for {dtype}, got {label.min()}..{label.max()}")
    array = np.ascontiguousarray(label, dtype=np.uint8 if dtype == "uint8" else np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_label(data: bytes) -> np.ndarray:
    """Decode a label PNG to an int64 (H, W) array of train ids, reading the integers as stored (8 or 16 bit)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "P"):
            raise ValueError(f"label PNG has mode {image.mode!r}; expected a single-channel integer PNG (L or I;16)")
        return np.asarray(image).astype(np.int64)


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to a uint8 (H, W, 3) RGB array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_sample(sample: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode a raw WebDataset sample dict into (image uint8 HxWx3 RGB, label int64 HxW, record dict).

    Raises CorruptSampleError naming the key (and shard) when a member is missing or cannot be decoded.
    """
    key = sample.get("__key__", "<no key>")
    where = f"sample {key!r}" + (f" in {sample['__url__']}" if "__url__" in sample else "")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    missing = [m for m in (LABEL_MEMBER, RECORD_MEMBER) if m not in sample]
    if image_ext is None:
        missing.insert(0, "jpg or png")
    if missing:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise CorruptSampleError(f"{where} lacks member(s) {', '.join(missing)} (has: {', '.join(present) or 'none'})")
    try:
        meta = json.loads(sample[RECORD_MEMBER])
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptSampleError(f"{where}: record {key}.json is not valid JSON ({error})") from error
    try:
        image = decode_image(sample[image_ext])
    except Exception as error:  # PIL raises many types for bad bytes
        raise CorruptSampleError(f"{where}: image {key}.{image_ext} cannot be decoded ({error})") from error
    try:
        label = decode_label(sample[LABEL_MEMBER])
    except Exception as error:
        raise CorruptSampleError(f"{where}: label {key}.label.png cannot be decoded ({error})") from error
    if label.shape != image.shape[:2]:
        raise CorruptSampleError(
            f"{where}: label is {label.shape[1]}x{label.shape[0]} but image is {image.shape[1]}x{image.shape[0]}"
        )
    return image, label, meta


# ---------------------------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success sync it and rename it into place.

    On any error the temporary file is removed; an OSError is re-raised naming ``path``.
    """
    path = Path(path)
    temp = temp_shard_path(path)
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name in the same folder, then rename it into place."""
    with atomic_file(path) as handle:
        handle.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys through a temporary name."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def temp_shard_path(path: str | os.PathLike) -> Path:
    """Return the temporary name a shard is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def tell(self) -> int:
        return self.size


@dataclass
class ShardRecord:
    """The sidecar of a complete shard."""

    name: str  # shard file name
    index: int  # position in the split's shard plan
    num_samples: int  # samples in the tar
    sha256: str  # hex digest of the tar bytes
    num_bytes: int  # tar size in bytes
    keys: list[str] = field(default_factory=list)  # sample keys in tar order
    skipped: list[dict] = field(default_factory=list)  # bad samples left out: {"key", "file", "error"}
    source_id: str = ""  # what the samples were read from, where keys alone cannot tell (a dataset's fingerprint)

    def sample_keys(self) -> list[str]:
        """Return the keys of every sample the shard was made from: those in the tar, then those skipped."""
        return self.keys + [bad["key"] for bad in self.skipped]

    def to_json(self) -> dict:
        """Return the record as a JSON-ready dict."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "index": self.index,
            "num_samples": self.num_samples,
            "sha256": self.sha256,
            "num_bytes": self.num_bytes,
            "keys": self.keys,
            "skipped": self.skipped,
            **({"source_id": self.source_id} if self.source_id else {}),
        }

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "ShardRecord":
        """Build a record from its JSON dict; ``where`` names the file in errors."""
        try:
            return cls(
                name=str(obj["name"]),
                index=int(obj["index"]),
                num_samples=int(obj["num_samples"]),
                sha256=str(obj["sha256"]),
                num_bytes=int(obj["num_bytes"]),
                keys=list(obj.get("keys", [])),
                skipped=list(obj.get("skipped", [])),
                source_id=str(obj.get("source_id", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ShardFormatError(f"shard record {where} is malformed ({error!r}); delete it to redo the shard")


def _write_tar_members(tar, sample: dict) -> None:
    """Append one sample's members to an open tar, sorted by name, with fixed metadata."""
    import tarfile

    key = sample["__key__"]
    for member in sorted(k for k in sample if not k.startswith("__")):
        data = sample[member]
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"sample {key!r} member {member!r} must be bytes, got {type(data).__name__}")
        info = tarfile.TarInfo(f"{key}.{member}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uname = info.gname = _TAR_OWNER
        tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | os.PathLike, index: int, samples: Iterable[dict], skipped: list[dict] | None = None,
                source_id: str = "") -> ShardRecord:
    """Write samples (dicts of ``__key__`` plus member name -> bytes) to a deterministic tar, then its sidecar.

    Members are written as webdataset's TarWriter writes them (USTAR, sorted per sample) but with the standard
    tarfile module: importing webdataset pulls in torch, about 1.5 s in every converter process. mtime 0 and a
    fixed owner make the bytes depend only on the samples. The tar is written under a temporary name, synced and renamed; the
    sidecar is written after it, so a shard with a sidecar is always complete. On any error the temporary file is
    removed and the error re-raised.
    """
    import tarfile

    path = Path(path)
    keys = []
    with atomic_file(path) as handle:
        hashing = _HashingFile(handle)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                _write_tar_members(tar, sample)
                keys.append(sample["__key__"])
    record = ShardRecord(
        name=path.name,
        index=index,
        num_samples=len(keys),
        sha256=hashing.sha256.hexdigest(),
        num_bytes=hashing.size,
        keys=keys,
        skipped=list(skipped or []),
        source_id=source_id,
    )
    write_json_atomic(sidecar_path(path), record.to_json())
    return record


def remove_shards_from(folder: str | os.PathLike, dataset: str, split: str, first: int) -> list[str]:
    """Delete shards ``first``, ``first + 1``, ... of a split (and their sidecars), gaps or not: what a run with a
    longer sample list or smaller shards left past the current plan. Returns the names of the shards removed."""
    folder, removed = Path(folder), []
    pattern = re.compile(rf"{re.escape(dataset)}-{re.escape(split)}-(\d{{6,}})\.tar")
    found = {}
    for path in folder.glob(f"{dataset}-{split}-*.tar*"):
        match = pattern.fullmatch(path.name.removesuffix(".json"))
        if match and int(match[1]) >= first:
            found[int(match[1])] = shard_name(dataset, split, int(match[1]))
    for index in sorted(found):
        path = folder / found[index]
        existed = path.exists()
        sidecar_path(path).unlink(missing_ok=True)  # sidecar first: a tar without one is never taken as complete
        path.unlink(missing_ok=True)
        if existed:
            removed.append(path.name)
    return removed


def read_shard_record(shard_path: str | os.PathLike) -> ShardRecord | None:
    """Return the sidecar record of a complete shard, or None when the shard is missing or incomplete."""
    shard_path = Path(shard_path)
    sidecar = sidecar_path(shard_path)
    if not sidecar.is_file() or not shard_path.is_file():
        return None
    try:
        obj = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None  # a torn sidecar cannot come from write_json_atomic; treat the shard as not done
    try:
        record = ShardRecord.from_json(obj, str(sidecar))
    except ShardFormatError:
        return None  # a record with fields missing or wrong is no proof of a complete shard: redo it
    if record.name != shard_path.name or shard_path.stat().st_size != record.num_bytes:
        return None
    return record


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finalize_folder(folder: str | os.PathLike, info: dict, records: list[ShardRecord]) -> dict:
    """Write ``sizes.json`` and ``dataset.json`` for a split whose shards are all complete; return the info."""
    folder = Path(folder)
    records = sorted(records, key=lambda r: r.index)
    # A shard whose samples were all skipped stays on disk (so a rerun knows it is done) but is not listed.
    sizes = {r.name: r.num_samples for r in records if r.num_samples > 0}
    full = dict(info)
    full.update(
        format_version=FORMAT_VERSION,
        num_samples=sum(sizes.values()),
        num_shards=len(sizes),
        num_skipped=sum(len(r.skipped) for r in records),
    )
    missing = [k for k in ("name", "split", "class_names", "num_classes", "ignore_index", "label_dtype") if k not in full]
    if missing:
        raise ValueError(f"dataset info lacks {', '.join(missing)}")
    write_json_atomic(folder / SIZES_FILE, sizes)
    write_json_atomic(folder / DATASET_FILE, full)
    return full


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _missing_folder_message(folder: Path, what: str) -> str:
    return (
        f"{what} {folder} does not exist or is not a finished shard folder; make it with "
        f"`python -m data_prep.convert <dataset> --root RAW --out SHARDS` (folders are SHARDS/<dataset>/<split>) "
        f"or `python -m data_prep.synthetic --out SHARDS` for synthetic data"
    )


def read_dataset_info(folder: str | os.PathLike) -> dict:
    """Return the contents of ``folder/dataset.json`` (name, split, class_names, num_classes, ignore_index, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(_missing_folder_message(folder, "shard folder"))
    path = folder / DATASET_FILE
    if not path.is_file():
        raise FileNotFoundError(_missing_folder_message(path, "dataset file"))
    try:
        info = json.loads(path.read_text())
    except ValueError as error:
        raise ShardFormatError(f"{path} is not valid JSON ({error}); rerun the data_prep command that made it")
    missing = [k for k in ("name", "split", "class_names", "num_classes", "ignore_index", "num_samples", "label_dtype") if k not in info]
    if missing:
        raise ShardFormatError(f"{path} lacks key(s) {', '.join(missing)}; rerun the data_prep command that made it")
    return info


def shard_paths(folder: str | os.PathLike) -> list[str]:
    """Return the paths of the folder's complete shards in order, as listed in ``sizes.json``."""
    folder = Path(folder)
    path = folder / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(_missing_folder_message(path, "shard list"))
    try:
        sizes = json.loads(path.read_text())
    except ValueError as error:
        raise ShardFormatError(f"{path} is not valid JSON ({error}); rerun the data_prep command that made it")
    paths = []
    for name in sorted(sizes):
        if Path(name).name != name or not name.endswith(".tar"):  # webdataset would read "pipe:..." as a command
            raise ShardFormatError(f"{path} lists {name!r}, not a shard file name of that folder (NAME.tar); rerun the "
                                   f"data_prep command that made it")
        shard = folder.resolve() / name
        if not shard.is_file():
            raise FileNotFoundError(f"{path} lists {name} but {shard} does not exist; rerun the conversion to redo it")
        paths.append(str(shard))
    return paths


def iter_raw_samples(folder_or_paths: str | os.PathLike | list[str]) -> Iterator[dict]:
    """Yield raw WebDataset sample dicts (member name -> bytes, plus ``__key__`` and ``__url__``) in shard order."""
    import webdataset as wds

    paths = list(folder_or_paths) if isinstance(folder_or_paths, list) else shard_paths(folder_or_paths)
    pipeline = wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples())
    yield from pipeline


def iter_samples(folder: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Yield decoded (image, label, record) triples of every sample in a shard folder, in order."""
    for sample in iter_raw_samples(folder):
        yield decode_sample(sample)


def verify_folder(folder: str | os.PathLike) -> list[str]:
    """Recheck every shard of a folder against its sidecar (size, sha256, keys); return problems found (empty if ok)."""
    import tarfile

    folder = Path(folder)
    problems = []
    info = read_dataset_info(folder)
    paths = shard_paths(folder)
    sizes = json.loads((folder / SIZES_FILE).read_text())
    total = 0
    for path in paths:
        name = Path(path).name
        sidecar = sidecar_path(path)
        if not sidecar.is_file():
            problems.append(f"{path}: sidecar {sidecar.name} is missing")
            continue
        record = ShardRecord.from_json(json.loads(sidecar.read_text()), str(sidecar))
        size = Path(path).stat().st_size
        if size != record.num_bytes:
            problems.append(f"{path}: {size} bytes but its record says {record.num_bytes}")
            continue
        digest = file_sha256(path)
        if digest != record.sha256:
            problems.append(f"{path}: sha256 {digest} differs from its record {record.sha256}")
            continue
        try:
            with tarfile.open(path) as tar:
                members = tar.getnames()
        except tarfile.TarError as error:
            problems.append(f"{path}: not a readable tar ({error})")
            continue
        keys = sorted({m.split(".", 1)[0] for m in members})
        if keys != sorted(record.keys) or len(keys) != record.num_samples or sizes.get(name) != record.num_samples:
            problems.append(
                f"{path}: holds {len(keys)} samples, record says {record.num_samples}, sizes.json says {sizes.get(name)}"
            )
        total += record.num_samples
    if total != info["num_samples"] and not problems:
        problems.append(f"{folder / DATASET_FILE}: num_samples {info['num_samples']} but shards hold {total}")
    return problems


def build_sample(
    key: str,
    image_bytes: bytes,
    image_ext: str,
    label: np.ndarray,
    *,
    label_dtype: str,
    ignore_index: int,
    class_list: str,
    source: dict,
) -> dict:
    """Assemble the members of one sample: image bytes as given, the label PNG and the JSON record."""
    if image_ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"image extension {image_ext!r} is not supported; choose one of: {', '.join(IMAGE_EXTENSIONS)}")
    record = {
        "key": key,
        "height": int(label.shape[0]),
        "width": int(label.shape[1]),
        "ignore_index": int(ignore_index),
        "class_list": class_list,
        "label_dtype": label_dtype,
        "image_format": image_ext,
        "source": source,
    }
    return {
        "__key__": key,
        image_ext: image_bytes,
        LABEL_MEMBER: encode_label(label, label_dtype),
        RECORD_MEMBER: json.dumps(record, sort_keys=True, ensure_ascii=False).encode(),
    }
