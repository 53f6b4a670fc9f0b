"""Converters for COCO-Stuff-171 and the six evaluation sets, each reading the raw layout the dataset ships in.

Label rules (train ids; see data_prep/tables/ for the id tables):

- coco_stuff: stuffthingmaps value 0..181 -> 171 train ids by coco_stuff171_id_map.json; the 11 unused values and
  255 -> 255.
- ade150: value - 1; 0 -> 255; values above 150 are errors.
- ade847: class index (R // 10) * 256 + G of ``<name>_seg.png`` -> 847 train ids by ade847_id_map.json, every other
  index -> 65535 (16-bit labels). Every image is saved again as JPEG quality 75, resized first to short side 512
  when its short side is longer (bilinear, like OpenCV's INTER_LINEAR; labels nearest), as the published numbers
  used.
- pc59: annotations of trainval_merged.json (Detail API) painted in file order onto a zero map; full ids -> 59
  train ids by pc59_id_map.json, 0 and unlisted ids -> 255.
- pc459: LabelMap of trainval/<id>.mat minus 1 (16-bit); a LabelMap with zeros is refused.
- voc20 / voc20b: SegmentationClassAug value k in 1..20 -> k - 1; 0 -> 255 (voc20) or 20 = background (voc20b);
  255 -> 255.
"""

from __future__ import annotations

import hashlib
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import rle, shards
from data_prep.pipeline import (
    BadSample,
    ConversionError,
    RawImage,
    SampleRef,
    Source,
    apply_lut,
    check_same_size,
    make_lut,
    pair_by_stem,
    read_image,
    read_label_png,
    require_pair,
)

TABLES = Path(__file__).parent / "tables"


@lru_cache(maxsize=None)
def _table(name: str) -> list[dict]:
    return json.loads((TABLES / name).read_text())


@lru_cache(maxsize=None)
def pascal_context_val_ids() -> tuple[str, ...]:
    """Return the 5104 PASCAL-Context validation image ids (e.g. 2008_000002)."""
    return tuple(line.strip() for line in (TABLES / "pascalcontext_val.txt").read_text().splitlines() if line.strip())


def _sample(source: Source, split: str, ref: SampleRef, image: RawImage, train_ids: np.ndarray, label_sha: str, **extra) -> dict:
    """Assemble a converted sample with the record fields every converter shares."""
    record = {"image": ref.image, "image_sha256": image.sha256, "label": ref.label, "label_sha256": label_sha}
    record.update(extra)
    return shards.build_sample(
        source.key(split, ref.stem),
        image.data,
        image.ext,
        train_ids,
        label_dtype=source.label_dtype,
        ignore_index=source.ignore_index,
        class_list=source.class_list,
        source=record,
    )


def _files_by_stem(folder: Path, pattern: str, suffix: str, recursive: bool = False) -> dict[str, Path]:
    """Map file stem (name without ``suffix``) -> path for files matching ``pattern``; refuse duplicate stems."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob(pattern) if recursive else folder.glob(pattern)):
        if path.is_dir():
            continue
        stem = path.name[: -len(suffix)]
        if stem in found:
            raise ConversionError(f"two files share the stem {stem!r}: {found[stem]} and {path}; remove one")
        found[stem] = path
    return found


class _PairedPngSource(Source):
    """A dataset of ``<stem>.jpg`` images and ``<stem>.png`` single-channel label maps in two folders."""

    valid_values = ""  # description of the valid raw label values, for error messages

    def folders(self, split: str) -> tuple[Path, Path]:
        """Return the (image folder, label folder) of a split."""
        raise NotImplementedError

    def lut(self) -> np.ndarray:
        """Return the raw value -> train id table (-1 = invalid)."""
        raise NotImplementedError

    def list_samples(self, split: str) -> list[SampleRef]:
        self.check_split(split)
        image_dir, label_dir = self.folders(split)
        images = _files_by_stem(self.require_dir(image_dir, "image folder"), "*.jpg", ".jpg")
        labels = _files_by_stem(self.require_dir(label_dir, "label folder"), "*.png", ".png")
        return pair_by_stem(images, labels, self.root)

    def load(self, ref: SampleRef, split: str) -> dict:
        image_dir, label_dir = self.folders(split)
        require_pair(ref, self.relative(image_dir / f"{ref.stem}.jpg"), self.relative(label_dir / f"{ref.stem}.png"))
        image = read_image(self.root / ref.image, ref.image)
        label, label_sha = read_label_png(self.root / ref.label, ref.label)
        check_same_size(image, label, ref.label, ref.image)
        return _sample(self, split, ref, image, apply_lut(label, self.lut(), ref.label, self.valid_values), label_sha)


@lru_cache(maxsize=None)
def _coco_lut() -> np.ndarray:
    lut = make_lut({row["coco_stuff_id"]: row["train_id"] for row in _table("coco_stuff171_id_map.json")}, 256, default=-1)
    lut[(lut < 0) & (np.arange(256) <= 181)] = 255  # the 11 values COCO-Stuff leaves unused
    lut[255] = 255
    return lut


class CocoStuff(_PairedPngSource):
    """COCO-Stuff-164k: ``images/{train2017,val2017}/*.jpg`` + ``annotations/{train2017,val2017}/*.png``."""

    name = "coco_stuff"
    class_list = "coco"
    splits = ("train", "val")
    default_splits = ("train", "val")
    valid_values = "0..181 and 255"

    def folders(self, split):
        folder = {"train": "train2017", "val": "val2017"}[split]
        return self.root / "images" / folder, self.root / "annotations" / folder

    def lut(self):
        return _coco_lut()


@lru_cache(maxsize=None)
def _ade150_lut() -> np.ndarray:
    lut = make_lut({v: v - 1 for v in range(1, 151)}, 256)
    lut[0] = 255
    return lut


class Ade150(_PairedPngSource):
    """ADE20K-150: ``ADEChallengeData2016/{images,annotations}/{training,validation}/``."""

    name = "ade150"
    class_list = "ade150"
    splits = ("train", "val")
    valid_values = "0..150 (0 = unlabelled)"

    def folders(self, split):
        base = self.root / "ADEChallengeData2016"
        folder = {"train": "training", "val": "validation"}[split]
        return base / "images" / folder, base / "annotations" / folder

    def lut(self):
        return _ade150_lut()


@lru_cache(maxsize=None)
def _voc_lut(background: int) -> np.ndarray:
    lut = make_lut({v: v - 1 for v in range(1, 21)}, 256)
    lut[0] = background
    lut[255] = 255
    return lut


class Voc20(Source):
    """PASCAL VOC 2012: ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,ImageSets/Segmentation/<split>.txt}``."""

    name = "voc20"
    class_list = "voc20"
    splits = ("train", "val")
    background = 255  # train id of VOC value 0

    @property
    def devkit(self) -> Path:
        """Return the VOC2012 folder."""
        return self.root / "VOCdevkit" / "VOC2012"

    def list_samples(self, split: str) -> list[SampleRef]:
        self.check_split(split)
        list_file = self.devkit / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise ConversionError(f"image list {list_file} does not exist; is --root {self.root} the folder holding VOCdevkit?")
        self.require_dir(self.devkit / "JPEGImages", "image folder")
        self.require_dir(self.devkit / "SegmentationClassAug", "label folder")
        refs = []
        for stem in sorted({line.split()[0] for line in list_file.read_text().splitlines() if line.strip()}):
            image = self.devkit / "JPEGImages" / f"{stem}.jpg"
            label = self.devkit / "SegmentationClassAug" / f"{stem}.png"
            refs.append(
                SampleRef(
                    stem,
                    self.relative(image) if image.is_file() else None,
                    self.relative(label) if label.is_file() else None,
                    extra=self.relative(list_file),
                )
            )
        return refs

    def load(self, ref: SampleRef, split: str) -> dict:
        expected_image = self.relative(self.devkit / "JPEGImages" / f"{ref.stem}.jpg")
        expected_label = self.relative(self.devkit / "SegmentationClassAug" / f"{ref.stem}.png")
        require_pair(ref, expected_image, expected_label, listed_in=ref.extra)
        image = read_image(self.root / ref.image, ref.image)
        label, label_sha = read_label_png(self.root / ref.label, ref.label)
        check_same_size(image, label, ref.label, ref.image)
        train_ids = apply_lut(label, _voc_lut(self.background), ref.label, "0..20 and 255")
        return _sample(self, split, ref, image, train_ids, label_sha)


class Voc20Background(Voc20):
    """PAS-20b: VOC 2012 with value 0 kept as background (train id 20), prompted with the 59 names of voc20b."""

    name = "voc20b"
    class_list = "voc20b"
    background = 20

    def info(self, split: str) -> dict:
        info = super().info(split)
        info["background_index"] = self.background  # predictions >= 20 count as background when scoring
        return info


# ---------------------------------------------------------------------------------------------------------------
# ADE20K-847


@lru_cache(maxsize=None)
def _ade847_lut() -> np.ndarray:
    # (R // 10) * 256 + G is at most 25 * 256 + 255.
    return make_lut({row["ade_id"]: row["train_id"] for row in _table("ade847_id_map.json")}, 26 * 256, default=65535)


SHORT_SIDE = 512
JPEG_QUALITY = 75  # of the A-847 images, saved again as the reference preparation did (PIL's default)


def _resized_shape(height: int, width: int, short: int = SHORT_SIDE) -> tuple[int, int] | None:
    """Return (height, width) with the short side scaled to ``short`` when it is longer, else None."""
    if width >= height > short:
        return short, round(width / height * short)
    if height >= width > short:
        return round(height / width * short), short
    return None


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (left index, right index, right weight) of half-pixel bilinear sampling without antialiasing."""
    scale = size_in / size_out
    position = (np.arange(size_out) + 0.5) * scale - 0.5
    position = np.clip(position, 0, size_in - 1)
    left = np.floor(position).astype(np.int64)
    right = np.minimum(left + 1, size_in - 1)
    return left, right, (position - left).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 (H, W, C) or (H, W) image with bilinear sampling at pixel centres (OpenCV INTER_LINEAR
    semantics)."""
    if image.ndim == 2:
        return resize_bilinear(image[..., None], height, width)[..., 0]
    top, bottom, wy = _linear_taps(image.shape[0], height)
    left, right, wx = _linear_taps(image.shape[1], width)
    pixels = image.astype(np.float32)
    rows = pixels[top] * (1 - wy)[:, None, None] + pixels[bottom] * wy[:, None, None]
    out = rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a label map by nearest neighbour (OpenCV INTER_NEAREST: source index = floor(dst * in / out))."""
    rows = np.minimum((np.arange(height) * (label.shape[0] / height)).astype(np.int64), label.shape[0] - 1)
    cols = np.minimum((np.arange(width) * (label.shape[1] / width)).astype(np.int64), label.shape[1] - 1)
    return label[rows][:, cols]


class Ade847(Source):
    """ADE20K-847: ``ADE20K_2021_17_01/images/ADE/{training,validation}/<scene...>/<name>.jpg`` + ``<name>_seg.png``."""

    name = "ade847"
    class_list = "ade847"
    label_dtype = "uint16"
    ignore_index = 65535
    splits = ("train", "val")

    def source_id(self, split: str) -> str:
        # the rule its images are stored by: shards made when small images kept their shipped bytes are redone
        return "images saved as JPEG quality 75"

    def split_dir(self, split: str) -> Path:
        """Return the image tree of a split."""
        return self.root / "ADE20K_2021_17_01" / "images" / "ADE" / {"train": "training", "val": "validation"}[split]

    def list_samples(self, split: str) -> list[SampleRef]:
        self.check_split(split)
        folder = self.require_dir(self.split_dir(split), "image folder")
        images = _files_by_stem(folder, "*.jpg", ".jpg", recursive=True)
        labels = _files_by_stem(folder, "*_seg.png", "_seg.png", recursive=True)
        return pair_by_stem(images, labels, self.root)

    def load(self, ref: SampleRef, split: str) -> dict:
        expected_label = ref.image[: -len(".jpg")] + "_seg.png" if ref.image else ""
        expected_image = ref.label[: -len("_seg.png")] + ".jpg" if ref.label else ""
        require_pair(ref, expected_image, expected_label)
        image = read_image(self.root / ref.image, ref.image)
        seg_path = self.root / ref.label
        try:
            data = seg_path.read_bytes()
            with Image.open(io.BytesIO(data)) as seg_image:
                if seg_image.mode not in ("RGB", "RGBA"):
                    raise BadSample(ref.label, f"_seg.png has mode {seg_image.mode}; expected the RGB class encoding")
                seg = np.asarray(seg_image)
        except BadSample:
            raise
        except Exception as error:
            raise BadSample(ref.label, f"corrupt or unreadable _seg.png ({error})") from error
        class_index = (seg[..., 0].astype(np.int32) // 10) * 256 + seg[..., 1].astype(np.int32)
        check_same_size(image, class_index, ref.label, ref.image)
        # Every image is decoded and saved again as JPEG quality 75, resized first when its short side is over 512,
        # as the reference preparation saved them (the pixels behind the published numbers); greyscale stays so.
        try:
            with Image.open(io.BytesIO(image.data)) as decoded:
                pixels = np.asarray(decoded if decoded.mode in ("L", "RGB") else decoded.convert("RGB"))
        except Exception as error:
            raise BadSample(ref.image, f"corrupt image ({error})") from error
        extra = {}
        shape = _resized_shape(image.height, image.width)
        if shape is not None:
            pixels = resize_bilinear(pixels, *shape)
            class_index = resize_nearest(class_index, *shape)
            extra["resized_from"] = [int(seg.shape[0]), int(seg.shape[1])]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        image = RawImage(buffer.getvalue(), "jpg", pixels.shape[1], pixels.shape[0], image.sha256)
        train_ids = _ade847_lut()[class_index]
        return _sample(self, split, ref, image, train_ids, hashlib.sha256(data).hexdigest(), **extra)


# ---------------------------------------------------------------------------------------------------------------
# PASCAL-Context


def _pascal_stem(entry: dict) -> str:
    """Return the VOC file stem (2008_000002) of a Detail API image entry."""
    if "file_name" in entry:
        return Path(str(entry["file_name"])).stem
    text = str(entry["image_id"])
    return f"{text[:4]}_{text[4:]}"


class _PascalContextSource(Source):
    splits = ("train", "val")

    def __init__(self, root, id_list: str | Path | None = None):
        super().__init__(root)
        self.id_list = Path(id_list) if id_list else None  # replaces the split's id list when given

    @property
    def image_dir(self) -> Path:
        """Return the VOC2010 JPEGImages folder."""
        return self.root / "VOCdevkit" / "VOC2010" / "JPEGImages"

    def split_ids(self, split: str, all_ids: set[str]) -> list[str]:
        """Return the sorted ids of a split: the published val list, or every other annotated id for train."""
        if self.id_list is not None:
            try:
                return sorted({line.strip() for line in self.id_list.read_text().splitlines() if line.strip()})
            except OSError as error:
                raise ConversionError(f"cannot read id list {self.id_list} ({error.strerror or error})") from error
        val = set(pascal_context_val_ids())
        return sorted(val if split == "val" else all_ids - val)

    def image_ref(self, stem: str) -> str | None:
        """Return the relative image path of a stem if the file exists."""
        path = self.image_dir / f"{stem}.jpg"
        return self.relative(path) if path.is_file() else None


@lru_cache(maxsize=None)
def _pc59_lut() -> np.ndarray:
    lut = make_lut({row["pc_id"]: row["train_id"] for row in _table("pc59_id_map.json")}, 460, default=255)
    lut[0] = 255
    return lut


class PascalContext59(_PascalContextSource):
    """PASCAL-Context-59: ``VOCdevkit/VOC2010/JPEGImages`` + ``trainval_merged.json`` (RLE masks, painted in order)."""

    name = "pc59"
    class_list = "pc59"
    json_name = "trainval_merged.json"

    def list_samples(self, split: str) -> list[SampleRef]:
        self.check_split(split)
        json_path = self.root / self.json_name
        if not json_path.is_file():
            raise ConversionError(f"annotation file {json_path} does not exist; put trainval_merged.json in --root {self.root}")
        self.require_dir(self.image_dir, "image folder")
        try:
            data = json.loads(json_path.read_bytes())
            entries = {_pascal_stem(entry): entry for entry in data["images"]}
            annotations: dict[object, list] = {}
            for ann in data["annos_segmentation"]:
                annotations.setdefault(ann["image_id"], []).append(
                    (int(ann["category_id"]), ann["segmentation"])
                )
        except (ValueError, KeyError, TypeError) as error:
            raise ConversionError(
                f"{json_path} is not a Detail API annotation file with 'images' and 'annos_segmentation' ({error!r})"
            ) from error
        refs = []
        for stem in self.split_ids(split, set(entries)):
            entry = entries.get(stem)
            extra = None
            if entry is not None:
                try:
                    size = (int(entry["height"]), int(entry["width"]))
                except (KeyError, TypeError, ValueError):
                    size = None  # reported as this sample's problem when it is loaded
                extra = (size, tuple(annotations.get(entry.get("image_id"), ())))
            refs.append(SampleRef(stem, self.image_ref(stem), f"{self.json_name}#{stem}" if entry else None, extra))
        return refs

    def load(self, ref: SampleRef, split: str) -> dict:
        require_pair(ref, self.relative(self.image_dir / f"{ref.stem}.jpg"), f"an entry for {ref.stem} in {self.json_name}")
        image = read_image(self.root / ref.image, ref.image)
        size, anns = ref.extra
        if size is None:
            raise BadSample(ref.label, "the image entry has no valid 'height' and 'width'")
        height, width = size
        if (height, width) != (image.height, image.width):
            raise BadSample(ref.label, f"annotation size {width}x{height} differs from image {ref.image} ({image.width}x{image.height})")
        full = np.zeros((height, width), dtype=np.int32)
        for category, segmentation in anns:
            try:
                mask = rle.decode(segmentation)
            except ValueError as error:
                raise BadSample(ref.label, f"bad RLE mask for category {category} ({error})") from error
            if mask.shape != full.shape:
                raise BadSample(ref.label, f"RLE mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
            full[mask] = category
        train_ids = apply_lut(full, _pc59_lut(), ref.label, "category ids 0..459")
        label_sha = hashlib.sha256(json.dumps(anns, sort_keys=True).encode()).hexdigest()
        return _sample(self, split, ref, image, train_ids, label_sha)


class PascalContext459(_PascalContextSource):
    """PASCAL-Context-459: ``VOCdevkit/VOC2010/JPEGImages`` + ``trainval/<id>.mat`` (LabelMap, 1..459)."""

    name = "pc459"
    class_list = "pc459"
    label_dtype = "uint16"
    ignore_index = 65535

    def list_samples(self, split: str) -> list[SampleRef]:
        self.check_split(split)
        mat_dir = self.require_dir(self.root / "trainval", "label folder")
        self.require_dir(self.image_dir, "image folder")
        mats = _files_by_stem(mat_dir, "*.mat", ".mat")
        refs = []
        for stem in self.split_ids(split, set(mats)):
            mat = mats.get(stem)
            refs.append(SampleRef(stem, self.image_ref(stem), self.relative(mat) if mat else None))
        return refs

    def load(self, ref: SampleRef, split: str) -> dict:
        import scipy.io

        require_pair(ref, self.relative(self.image_dir / f"{ref.stem}.jpg"), f"trainval/{ref.stem}.mat")
        image = read_image(self.root / ref.image, ref.image)
        path = self.root / ref.label
        try:
            data = path.read_bytes()
            label = scipy.io.loadmat(io.BytesIO(data))["LabelMap"]
        except KeyError as error:
            raise BadSample(ref.label, "has no LabelMap variable") from error
        except Exception as error:
            raise BadSample(ref.label, f"corrupt or unreadable .mat file ({error})") from error
        if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
            raise BadSample(ref.label, f"LabelMap must be a 2-D integer array, got {label.dtype} {label.shape}")
        check_same_size(image, label, ref.label, ref.image)
        if label.size and label.min() == 0:
            raise BadSample(ref.label, f"LabelMap has {int((label == 0).sum())} zero pixels; PC-459 labels every pixel 1..459")
        lut = make_lut({v: v - 1 for v in range(1, 460)}, 460)
        train_ids = apply_lut(label, lut, ref.label, "1..459")
        return _sample(self, split, ref, image, train_ids, hashlib.sha256(data).hexdigest())


SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (CocoStuff, Ade150, Ade847, PascalContext59, PascalContext459, Voc20, Voc20Background)
}


def get_source(name: str, root, id_list: str | Path | None = None) -> Source:
    """Return the converter called ``name`` reading the raw tree at ``root`` (``id_list``: PASCAL-Context only)."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(SOURCES)}, hf")
    if id_list is not None:
        if not issubclass(SOURCES[name], _PascalContextSource):
            raise ValueError(f"--id-list applies to pc59 and pc459 only, not {name}")
        return SOURCES[name](root, id_list=id_list)
    return SOURCES[name](root)
