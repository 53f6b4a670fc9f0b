"""Bring your own data: convert a Hugging Face ``datasets`` dataset with an image column and a label-map column.

The dataset is opened with ``datasets.load_from_disk`` when ``path`` is a folder written by ``save_to_disk``, else
with ``datasets.load_dataset(path, config)`` (a Hub name, or a local folder of parquet/arrow/image files). The label
column holds per-pixel class ids, as an image (PNG, decoded as integers) or a 2-D array. Values 0..N-1 are train
ids of the N class names; ``ignore_value`` marks unlabelled pixels; ``reduce_zero_label`` reads 0 as unlabelled and
k as class k - 1 (the ADE20K convention). Labels are stored 8-bit (ignore 255) for up to 255 classes, else 16-bit
(ignore 65535).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.pipeline import (
    BadSample,
    ConversionError,
    SampleRef,
    Source,
    apply_lut,
    check_same_size,
    image_from_bytes,
    label_from_bytes,
    load_class_list,
    make_lut,
)
from data_prep import shards


def read_class_names(spec: str) -> list[str]:
    """Read class names from a JSON list file, a text file with one name a line, or a catseg vocabulary name."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".json":
            names = json.loads(text)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"class-name file {path} must hold a JSON list of strings")
            return names
        return [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    try:
        return load_class_list(spec)
    except ValueError as error:
        raise ValueError(f"class names {spec!r} is neither a .json list file nor a .txt file (one a line); {error}") from None


@dataclass
class HuggingFaceConfig:
    """Which dataset to read and how to interpret its columns."""

    path: str  # Hub name, save_to_disk folder, or local data folder
    class_names: list[str]  # index = train id
    name: str = "hf"  # dataset name for keys and the output folder
    config: str | None = None  # load_dataset configuration name
    image_column: str = "image"
    label_column: str = "label"
    class_list: str = "custom"  # name recorded for the class list
    ignore_value: int = 255  # raw label value meaning "unlabelled"
    reduce_zero_label: bool = False  # raw 0 = unlabelled, raw k = class k - 1
    splits: tuple[str, ...] = field(default=("train",))  # splits the dataset offers

    def __post_init__(self):
        if not self.class_names:
            raise ValueError("class_names must list at least one class")
        if len(self.class_names) > 65535:
            raise ValueError(f"class_names has {len(self.class_names)} entries; at most 65535 are supported")
        if self.ignore_value < 0:
            raise ValueError(f"ignore_value must be >= 0, got {self.ignore_value}")
        num = len(self.class_names)
        classes = range(1, num + 1) if self.reduce_zero_label else range(num)
        if self.ignore_value in classes:
            index = self.ignore_value - 1 if self.reduce_zero_label else self.ignore_value
            raise ValueError(
                f"ignore_value {self.ignore_value} is the raw value of class {index} ({self.class_names[index]!r}) of "
                f"the {num} class names (raw class values {classes.start}..{classes.stop - 1}); pass --ignore-value "
                f"with the value your labels use for unlabelled pixels, outside that range (e.g. {max(65535, num + 1)})"
            )
        try:
            shards.make_key(self.name, "x", "0")
        except shards.ShardFormatError as error:
            raise ValueError(f"name {self.name!r} cannot be used in sample keys: {error}") from error


class HuggingFaceSource(Source):
    """A ``datasets`` dataset as a conversion source; samples are keyed by their row index."""

    def __init__(self, config: HuggingFaceConfig):
        super().__init__(config.path)
        self.config = config
        self.name = config.name
        self.class_list = config.class_list
        self.splits = tuple(config.splits)
        self.default_splits = self.splits
        self.label_dtype = "uint8" if len(config.class_names) < 255 else "uint16"
        self.ignore_index = 255 if self.label_dtype == "uint8" else 65535
        self._datasets: dict = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_datasets"] = {}  # workers reopen the memory-mapped dataset themselves
        return state

    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def dataset(self, split: str):
        """Open (once) and return the split with its image and label columns left undecoded."""
        if split in self._datasets:
            return self._datasets[split]
        import datasets

        path = Path(self.config.path)
        try:
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise ConversionError(f"{path} has no split {split!r}; it has: {', '.join(loaded)}")
                    loaded = loaded[split]
            else:
                loaded = datasets.load_dataset(self.config.path, self.config.config, split=split)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"cannot open Hugging Face dataset {self.config.path!r} split {split!r}: {error}") from error
        for column in (self.config.image_column, self.config.label_column):
            if column not in loaded.column_names:
                raise ConversionError(
                    f"dataset {self.config.path!r} has no column {column!r}; its columns are: {', '.join(loaded.column_names)}"
                )
            if isinstance(loaded.features[column], datasets.Image):
                loaded = loaded.cast_column(column, datasets.Image(decode=False))
        self._datasets[split] = loaded
        return loaded

    def source_id(self, split: str) -> str:
        # Samples are keyed by row number: a row removed or added moves every later row under an old key. The row
        # count and each column's stored bytes tell such a dataset apart. Not the datasets library's fingerprint:
        # for files read by load_dataset it follows their modification times, so the same files copied to another
        # machine (parts converted on several nodes) or touched would redo every shard.
        dataset = self.dataset(split)
        columns = [(name, str(dataset.data.schema.field(name).type), dataset.data.column(name).nbytes)
                   for name in dataset.data.column_names]
        digest = hashlib.sha256(json.dumps(columns).encode()).hexdigest()[:16]
        return f"datasets:{len(dataset)} rows:{digest}"

    def list_samples(self, split: str) -> list[SampleRef]:
        self.check_split(split)
        count = len(self.dataset(split))
        return [
            SampleRef(f"{i:08d}", f"{split}[{i}].{self.config.image_column}", f"{split}[{i}].{self.config.label_column}", i)
            for i in range(count)
        ]

    def _lut(self) -> np.ndarray:
        num = len(self.config.class_names)
        if self.config.reduce_zero_label:
            mapping = {v: v - 1 for v in range(1, num + 1)}
            mapping[0] = self.ignore_index
        else:
            mapping = {v: v for v in range(num)}
        mapping[self.config.ignore_value] = self.ignore_index
        return make_lut(mapping, max(max(mapping) + 1, 1))

    def _valid(self) -> str:
        num = len(self.config.class_names)
        ids = f"1..{num} (0 = unlabelled)" if self.config.reduce_zero_label else f"0..{num - 1}"
        return f"{ids} and {self.config.ignore_value} (ignore)"

    @staticmethod
    def _bytes(value, display: str) -> bytes:
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                try:
                    return Path(value["path"]).read_bytes()
                except OSError as error:
                    raise BadSample(value["path"], f"cannot read ({error.strerror or error})") from error
            raise BadSample(display, "holds neither bytes nor a path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise BadSample(display, f"expected image bytes or an Image feature, got {type(value).__name__}")

    def load(self, ref: SampleRef, split: str) -> dict:
        row = self.dataset(split)[ref.extra]
        image_value, label_value = row[self.config.image_column], row[self.config.label_column]
        if image_value is None:
            raise BadSample(ref.image, "image is missing (None)")
        if label_value is None:
            raise BadSample(ref.label, "label is missing (None)")
        image = image_from_bytes(self._bytes(image_value, ref.image), ref.image)
        if isinstance(label_value, (dict, bytes, bytearray)):
            data = self._bytes(label_value, ref.label)
            label = label_from_bytes(data, ref.label)
        else:
            label = np.asarray(label_value)
            if label.ndim != 2 or not (np.issubdtype(label.dtype, np.integer) or label.size == 0):
                raise BadSample(ref.label, f"label must be a 2-D integer array, got {label.dtype} {label.shape}")
            data = np.ascontiguousarray(label).tobytes()
        check_same_size(image, label, ref.label, ref.image)
        train_ids = apply_lut(label, self._lut(), ref.label, self._valid())
        return shards.build_sample(
            self.key(split, ref.stem),
            image.data,
            image.ext,
            train_ids,
            label_dtype=self.label_dtype,
            ignore_index=self.ignore_index,
            class_list=self.class_list,
            source={
                "dataset": self.config.path,
                "config": self.config.config,
                "row": ref.extra,
                "image_sha256": image.sha256,
                "label_sha256": hashlib.sha256(data).hexdigest(),
            },
        )
