"""Every converter on a tiny raw tree in its dataset's real layout, read back through WebDataset pixel by pixel."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import webdataset as wds
from PIL import Image

from data_prep import rle, shards
from data_prep.convert import main as convert_main
from data_prep.sources import pascal_context_val_ids

REPO = Path(__file__).resolve().parents[1]

COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def write_jpeg(path: Path, width: int, height: int, seed: int) -> bytes:
    """Write a random JPEG and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path.read_bytes()


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    """Write an integer array as a PNG (L for uint8, I;16 for uint16, or a palette image with mode='P')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 11) % 256)])
        image.putdata(array.reshape(-1).tolist())
    image.save(path)


def read_back(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict, str]]:
    """Read every sample of a shard folder with webdataset; return key -> (image, label, record, image member)."""
    dataset = wds.WebDataset(shards.shard_paths(folder), shardshuffle=False, empty_check=False)
    out = {}
    for sample in dataset:
        image, label, meta = shards.decode_sample(sample)
        out[sample["__key__"]] = (image, label, meta, "jpg" if "jpg" in sample else "png")
    return out


def convert(*args: str) -> int:
    return convert_main([*args, "--workers", "0", "--no-progress"])


def grid(values, height: int, width: int) -> np.ndarray:
    """Return a (height, width) map cycling through ``values``, so every value appears."""
    flat = np.resize(np.asarray(values), height * width)
    return flat.reshape(height, width)


# ---------------------------------------------------------------------------------------------------------------
# COCO-Stuff


def coco_expected(values: np.ndarray) -> np.ndarray:
    """COCO-Stuff rule written independently of the table: used ids are renumbered densely, others -> 255."""
    out = np.full(values.shape, 255, dtype=np.int64)
    for v in np.unique(values):
        if v <= 181 and v not in COCO_UNUSED:
            out[values == v] = v - sum(u < v for u in COCO_UNUSED)
    return out


def test_coco_stuff_table_matches_the_dense_renumbering():
    table = json.loads((Path(__file__).parents[1] / "data_prep/tables/coco_stuff171_id_map.json").read_text())
    assert len(table) == 171
    for row in table:
        assert row["train_id"] == coco_expected(np.array([row["coco_stuff_id"]]))[0]


def test_coco_stuff_converts_every_mapping_rule(tmp_path):
    raw = tmp_path / "raw"
    values = np.array([0, 1, 10, 12, 91, 180, 181, 255, *COCO_UNUSED], dtype=np.uint8)
    labels = {}
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        for i, (width, height) in enumerate(((9, 7), (6, 11))):
            stem = f"{i + (100 if split == 'val' else 0):012d}"
            write_jpeg(raw / "images" / folder / f"{stem}.jpg", width, height, seed=i)
            label = grid(np.roll(values, i), height, width).astype(np.uint8)
            write_png(raw / "annotations" / folder / f"{stem}.png", label)
            labels[f"coco_stuff_{split}_{stem}"] = label
    assert convert("coco_stuff", "--root", str(raw), "--out", str(tmp_path / "out"), "--shard-size", "1") == 0
    for split in ("train", "val"):
        folder = tmp_path / "out" / "coco_stuff" / split
        info = shards.read_dataset_info(folder)
        assert (info["num_samples"], info["num_classes"], info["ignore_index"], info["label_dtype"]) == (2, 171, 255, "uint8")
        assert info["class_list"] == "coco" and info["class_names"][0] == "person" and len(info["class_names"]) == 171
        samples = read_back(folder)
        assert len(samples) == 2
        for key, (image, label, meta, member) in samples.items():
            np.testing.assert_array_equal(label, coco_expected(labels[key]))
            assert image.shape == (*labels[key].shape, 3) and member == "jpg"
            assert meta["source"]["image"].startswith("images/") and len(meta["source"]["label_sha256"]) == 64
    # the original JPEG bytes are stored unchanged
    sample = next(iter(shards.iter_raw_samples(tmp_path / "out" / "coco_stuff" / "train")))
    assert sample["jpg"] == (raw / "images/train2017/000000000000.jpg").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# ADE20K-150


def test_ade150_shifts_ids_and_ignores_zero(tmp_path):
    base = tmp_path / "raw" / "ADEChallengeData2016"
    label = grid(np.arange(151), 12, 13).astype(np.uint8)  # every value 0..150
    write_jpeg(base / "images/validation/ADE_val_00000001.jpg", 13, 12, seed=1)
    write_png(base / "annotations/validation/ADE_val_00000001.png", label)
    assert convert("ade150", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out")) == 0
    samples = read_back(tmp_path / "out/ade150/val")
    _, got, meta, _ = samples["ade150_val_ADE_val_00000001"]
    expected = np.where(label == 0, 255, label.astype(np.int64) - 1)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) == set(range(150)) | {255}
    assert meta["class_list"] == "ade150"


# ---------------------------------------------------------------------------------------------------------------
# ADE20K-847

ADE847_FACTS = {2978: 0, 312: 1, 2420: 2, 3148: 846}  # ADE class index -> train id, from the benchmark table


def seg_png(class_index: np.ndarray, path: Path, red_offset: int = 0) -> None:
    """Write an ADE20K _seg.png encoding class_index as R = (index // 256) * 10 (+offset), G = index % 256."""
    rgb = np.zeros((*class_index.shape, 3), dtype=np.uint8)
    rgb[..., 0] = (class_index // 256) * 10 + red_offset
    rgb[..., 1] = class_index % 256
    rgb[..., 2] = 7  # instance channel, ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_ade847_decodes_seg_png_to_16bit_train_ids_and_resizes_large_images(tmp_path):
    root = tmp_path / "raw"
    val = root / "ADE20K_2021_17_01/images/ADE/validation"
    small_index = grid([2978, 312, 0, 3148, 5, 2420], 10, 14)
    small_jpg = write_jpeg(val / "a/abbey/ADE_val_00000001.jpg", 14, 10, seed=3)
    seg_png(small_index, val / "a/abbey/ADE_val_00000001_seg.png", red_offset=7)  # R//10 drops the offset
    (val / "a/abbey/ADE_val_00000001.json").write_text("{}")  # other files beside the images are not samples
    # a 600x520 image: short side 520 > 512 -> 591x512
    big_index = np.array([[2978, 3148], [312, 0]]).repeat(260, 0).repeat(300, 1)
    write_jpeg(val / "b/bathroom/deeper/ADE_val_00000002.jpg", 600, 520, seed=4)
    seg_png(big_index, val / "b/bathroom/deeper/ADE_val_00000002_seg.png")
    grey = np.random.default_rng(5).integers(0, 256, (700, 530), dtype=np.uint8)  # greyscale, resized to 512 x 676
    Image.fromarray(grey).save(val / "a/abbey/ADE_val_00000003.jpg", quality=90)
    seg_png(grid([2978, 312], 700, 530), val / "a/abbey/ADE_val_00000003_seg.png")

    assert convert("ade847", "--root", str(root), "--out", str(tmp_path / "out")) == 0
    folder = tmp_path / "out/ade847/val"
    info = shards.read_dataset_info(folder)
    assert (info["label_dtype"], info["ignore_index"], info["num_classes"]) == ("uint16", 65535, 847)
    samples = read_back(folder)
    lut = lambda idx: np.vectorize(lambda v: ADE847_FACTS.get(int(v), 65535))(idx)

    _, label, meta, _ = samples["ade847_val_ADE_val_00000001"]
    np.testing.assert_array_equal(label, lut(small_index))
    assert 846 in label and 65535 in label
    assert "resized_from" not in meta["source"]
    raw_small = next(s for s in shards.iter_raw_samples(folder) if s["__key__"].endswith("1"))
    # saved again, not resized, as the reference preparation did: decoded, then JPEG quality 75
    with Image.open(io.BytesIO(small_jpg)) as source:
        resaved = io.BytesIO()
        Image.fromarray(np.asarray(source)).save(resaved, format="JPEG", quality=75)
    assert raw_small["jpg"] != small_jpg and raw_small["jpg"] == resaved.getvalue()
    with Image.open(io.BytesIO(raw_small["label.png"])) as stored:
        assert stored.mode.startswith("I;16")

    image, label, meta, member = samples["ade847_val_ADE_val_00000002"]
    assert image.shape == (512, 591, 3) and label.shape == (512, 591) and member == "jpg"
    rows = np.minimum((np.arange(512) * 520 / 512).astype(int), 519)
    cols = np.minimum((np.arange(591) * 600 / 591).astype(int), 599)
    np.testing.assert_array_equal(label, lut(big_index[rows][:, cols]))
    assert meta["source"]["resized_from"] == [520, 600]
    raw_grey = next(s for s in shards.iter_raw_samples(folder) if s["__key__"].endswith("3"))
    with Image.open(io.BytesIO(raw_grey["jpg"])) as stored:
        assert (stored.mode, stored.size) == ("L", (512, 676))

    # shards made by the earlier rule (small images' bytes as shipped; no source id) are redone, not kept
    sidecar = folder / "ade847-val-000000.tar.json"
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "source_id": ""}))
    assert convert("ade847", "--root", str(root), "--out", str(tmp_path / "out")) == 0
    assert json.loads(sidecar.read_text())["source_id"] == record["source_id"] != ""


def test_ade847_resize_rule_matches_the_reference_sizes():
    from data_prep.sources import _resized_shape, resize_bilinear

    assert _resized_shape(512, 700) is None and _resized_shape(400, 900) is None
    assert _resized_shape(520, 600) == (512, 591)
    assert _resized_shape(1536, 2048) == (512, 683)
    assert _resized_shape(2048, 1536) == (683, 512)
    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 10, (2, 1, 3))
    # halving a linear ramp with pixel-centre sampling averages neighbours: (0+10)/2, (20+30)/2, ...
    np.testing.assert_array_equal(resize_bilinear(ramp, 1, 4)[0, :, 0], [5, 25, 45, 65])


# ---------------------------------------------------------------------------------------------------------------
# PASCAL-Context


def test_ade847_large_image_is_resized_bilinear_and_its_label_by_the_floor_index(tmp_path):
    """An image whose size does not divide the target's: every label row and column comes from the source index
    floor(i * old / new) (nearest, as the release), the image pixels from the bilinear resize saved at quality 75."""
    from data_prep.sources import _ade847_lut, resize_bilinear

    val = tmp_path / "raw/ADE20K_2021_17_01/images/ADE/validation/x"
    index = np.random.default_rng(0).choice([2978, 312, 2420, 3148, 0], size=(523, 611))
    jpg = write_jpeg(val / "ADE_val_00000001.jpg", 611, 523, seed=1)
    seg_png(index, val / "ADE_val_00000001_seg.png")
    assert convert("ade847", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out")) == 0
    ((_, label, _, _),) = read_back(tmp_path / "out/ade847/val").values()
    h, w = 512, round(611 / 523 * 512)
    rows, cols = np.arange(h) * 523 // h, np.arange(w) * 611 // w
    np.testing.assert_array_equal(label, _ade847_lut()[index[rows][:, cols]])
    expected = io.BytesIO()
    Image.fromarray(resize_bilinear(np.asarray(Image.open(io.BytesIO(jpg))), h, w)).save(expected, format="JPEG",
                                                                                          quality=75)
    assert next(iter(shards.iter_raw_samples(tmp_path / "out/ade847/val")))["jpg"] == expected.getvalue()


def pascal_tree(tmp_path: Path, stems: list[str], sizes: list[tuple[int, int]]) -> Path:
    root = tmp_path / "raw"
    for i, (stem, (width, height)) in enumerate(zip(stems, sizes)):
        write_jpeg(root / "VOCdevkit/VOC2010/JPEGImages" / f"{stem}.jpg", width, height, seed=10 + i)
    return root


def test_pc59_paints_rle_masks_in_order(tmp_path):
    stems = list(pascal_context_val_ids()[:2])
    sizes = [(12, 9), (7, 8)]
    root = pascal_tree(tmp_path, stems, sizes)
    images, annotations, expected = [], [], {}
    for stem, (width, height) in zip(stems, sizes):
        image_id = int(stem.replace("_", ""))
        images.append({"image_id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width, "phase": "val"})
        aeroplane = np.zeros((height, width), bool)
        aeroplane[1:7, 1:10] = True
        wood = np.zeros((height, width), bool)
        wood[4:, 5:] = True  # painted after aeroplane: wins where they overlap
        sky = np.zeros((height, width), bool)
        sky[0, :] = True  # 1 (accordion) is not a PC-59 class -> ignore
        annotations += [
            {"image_id": image_id, "category_id": 2, "segmentation": rle.encode(aeroplane)},
            {"image_id": image_id, "category_id": 458, "segmentation": {"size": [height, width], "counts": _runs(wood)}},
            {"image_id": image_id, "category_id": 1, "segmentation": rle.encode(sky)},
        ]
        label = np.full((height, width), 255)
        label[aeroplane] = 0
        label[wood] = 58
        label[sky] = 255
        expected[f"pc59_val_{stem}"] = label
    (root / "trainval_merged.json").write_text(json.dumps({"images": images, "annos_segmentation": annotations}))
    (tmp_path / "ids.txt").write_text("\n".join(stems) + "\n")
    code = convert("pc59", "--root", str(root), "--out", str(tmp_path / "out"), "--id-list", str(tmp_path / "ids.txt"))
    assert code == 0
    samples = read_back(tmp_path / "out/pc59/val")
    assert sorted(samples) == sorted(expected)
    for key, (image, label, meta, _) in samples.items():
        np.testing.assert_array_equal(label, expected[key])
    assert shards.read_dataset_info(tmp_path / "out/pc59/val")["class_names"][58] == "wood"


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed RLE counts (column-major runs starting with zeros), written out by hand."""
    flat = mask.T.reshape(-1)
    runs, current, length = [], False, 0
    for value in flat:
        if value == current:
            length += 1
        else:
            runs.append(length)
            current, length = value, 1
    runs.append(length)
    return runs


def test_pc459_subtracts_one_into_16bit_ids(tmp_path):
    stems = list(pascal_context_val_ids()[:2])
    root = pascal_tree(tmp_path, stems, [(10, 6), (5, 5)])
    expected = {}
    for stem, (width, height) in zip(stems, [(10, 6), (5, 5)]):
        label_map = grid([1, 2, 300, 458, 459], height, width).astype(np.uint16)
        (root / "trainval").mkdir(exist_ok=True)
        scipy.io.savemat(root / "trainval" / f"{stem}.mat", {"LabelMap": label_map})
        expected[f"pc459_val_{stem}"] = label_map.astype(np.int64) - 1
    (tmp_path / "ids.txt").write_text("\n".join(stems))
    assert convert("pc459", "--root", str(root), "--out", str(tmp_path / "out"), "--id-list", str(tmp_path / "ids.txt")) == 0
    info = shards.read_dataset_info(tmp_path / "out/pc459/val")
    assert (info["label_dtype"], info["num_classes"], info["class_names"][-1]) == ("uint16", 459, json.loads(
        (Path(__file__).parents[1] / "catseg/vocab/pc459.json").read_text())[-1])
    for key, (_, label, _, _) in read_back(tmp_path / "out/pc459/val").items():
        np.testing.assert_array_equal(label, expected[key])
        assert label.max() == 458


# ---------------------------------------------------------------------------------------------------------------
# PASCAL VOC


def voc_tree(tmp_path: Path, labels: dict[str, np.ndarray], split: str = "val") -> Path:
    root = tmp_path / "raw"
    devkit = root / "VOCdevkit/VOC2012"
    for i, (stem, label) in enumerate(labels.items()):
        write_jpeg(devkit / "JPEGImages" / f"{stem}.jpg", label.shape[1], label.shape[0], seed=20 + i)
        write_png(devkit / "SegmentationClassAug" / f"{stem}.png", label, mode="P" if i == 1 else None)
    (devkit / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    (devkit / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(labels) + "\n")
    return root


@pytest.mark.parametrize("dataset, background", [("voc20", 255), ("voc20b", 20)])
def test_voc_background_rule(tmp_path, dataset, background):
    labels = {
        "2007_000033": grid([0, 1, 5, 20, 255], 7, 9).astype(np.uint8),
        "2007_000042": grid([255, 20, 0, 3], 6, 5).astype(np.uint8),  # stored as a palette PNG
    }
    root = voc_tree(tmp_path, labels)
    assert convert(dataset, "--root", str(root), "--out", str(tmp_path / "out")) == 0
    samples = read_back(tmp_path / "out" / dataset / "val")
    for stem, raw in labels.items():
        expected = np.where(raw == 0, background, np.where(raw == 255, 255, raw.astype(np.int64) - 1))
        np.testing.assert_array_equal(samples[f"{dataset}_val_{stem}"][1], expected)
    info = shards.read_dataset_info(tmp_path / "out" / dataset / "val")
    assert info["num_classes"] == (59 if dataset == "voc20b" else 20)
    if dataset == "voc20b":
        assert info["background_index"] == 20 and info["class_names"][:2] == ["aeroplane", "bicycle"]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def test_hf_dataset_from_disk_and_parquet(tmp_path):
    import datasets

    rows = {"image": [], "annotation": [], "mask": []}
    expected = []
    for i, (width, height) in enumerate(((8, 6), (5, 9))):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
        raw = grid([0, 1, 2, 3], height, width).astype(np.uint8)
        label_png = io.BytesIO()
        Image.fromarray(raw).save(label_png, "PNG")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["annotation"].append({"bytes": label_png.getvalue(), "path": None})
        rows["mask"].append(raw.astype(int).tolist())
        expected.append(raw.astype(np.int64))
    features = datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "mask": datasets.Sequence(datasets.Sequence(datasets.Value("int32")))}
    )
    dataset = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "names.txt").write_text("road\nsky\ntree\n")

    code = convert(
        "hf", "--root", str(tmp_path / "saved"), "--split", "validation", "--name", "mine", "--label-column", "annotation",
        "--class-names", str(tmp_path / "names.txt"), "--reduce-zero-label", "--out", str(tmp_path / "out"),
    )
    assert code == 0
    info = shards.read_dataset_info(tmp_path / "out/mine/validation")
    assert info["class_names"] == ["road", "sky", "tree"] and info["class_list"] == "names"
    samples = read_back(tmp_path / "out/mine/validation")
    for i, raw in enumerate(expected):
        image, label, meta, member = samples[f"mine_validation_{i:08d}"]
        np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw - 1))
        assert member == "png" and meta["source"]["row"] == i

    # the same rows through load_dataset on a parquet folder, labels as nested int lists, no zero reduction
    (tmp_path / "pq").mkdir()
    dataset.to_parquet(str(tmp_path / "pq" / "data.parquet"))
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a", "b", "c", "d"]))
    code = convert("hf", "--root", str(tmp_path / "pq"), "--label-column", "mask", "--class-names", str(names), "--out", str(tmp_path / "out2"))
    assert code == 0
    samples = read_back(tmp_path / "out2/hf/train")
    for i, raw in enumerate(expected):
        np.testing.assert_array_equal(samples[f"hf_train_{i:08d}"][1], raw)


def test_hf_rows_removed_between_runs_redo_the_shards(tmp_path):
    import shutil

    import datasets

    def save(rows, where):
        shutil.rmtree(where, ignore_errors=True)
        images, labels = [], []
        for i in rows:
            buffer = io.BytesIO()
            Image.fromarray(np.full((4, 5, 3), i * 20, dtype=np.uint8)).save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            labels.append(grid([i % 3], 4, 5).astype(int).tolist())
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.Sequence(datasets.Sequence(datasets.Value("int32")))})
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(where))

    (tmp_path / "names.json").write_text(json.dumps(["a", "b", "c"]))
    args = ["hf", "--class-names", str(tmp_path / "names.json"), "--shard-size", "2"]
    save(range(5), tmp_path / "data")
    assert convert(*args, "--root", str(tmp_path / "data"), "--out", str(tmp_path / "out")) == 0
    save([0, 2, 3, 4], tmp_path / "data")  # row 1 removed: rows 2..4 move up under the keys of rows 1..3
    assert convert(*args, "--root", str(tmp_path / "data"), "--out", str(tmp_path / "out")) == 0
    save([0, 2, 3, 4], tmp_path / "clean-data")
    assert convert(*args, "--root", str(tmp_path / "clean-data"), "--out", str(tmp_path / "clean")) == 0
    got, want = read_back(tmp_path / "out/hf/train"), read_back(tmp_path / "clean/hf/train")
    assert sorted(got) == sorted(want) == [f"hf_train_{i:08d}" for i in range(4)]
    for key in want:
        np.testing.assert_array_equal(got[key][0], want[key][0])


def test_hf_files_copied_or_touched_keep_their_shards(tmp_path, capsys):
    """The same parquet files with another modification time (copied to another node, or touched) are the same
    dataset: a rerun finds every shard complete instead of redoing them."""
    import os

    import datasets

    rows = {"image": [], "label": []}
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(np.full((4, 5, 3), i * 20, dtype=np.uint8)).save(buffer, "PNG")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["label"].append(grid([i % 3], 4, 5).astype(int).tolist())
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.Sequence(datasets.Sequence(datasets.Value("int32")))})
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "pq" / "data.parquet"))
    (tmp_path / "names.json").write_text(json.dumps(["a", "b", "c"]))
    args = ["hf", "--root", str(tmp_path / "pq"), "--class-names", str(tmp_path / "names.json"), "--shard-size", "2",
            "--out", str(tmp_path / "out")]
    assert convert(*args) == 0
    capsys.readouterr()
    shard = tmp_path / "out/hf/train/hf-train-000000.tar"
    written = shard.stat().st_mtime_ns
    later = os.stat(tmp_path / "pq" / "data.parquet").st_mtime + 3600
    os.utime(tmp_path / "pq" / "data.parquet", (later, later))
    assert convert(*args) == 0
    assert shard.stat().st_mtime_ns == written and "outdated" not in capsys.readouterr().out.lower()


def test_hf_ignore_value_that_is_a_class_value_is_refused(tmp_path, capsys):
    from data_prep.hf import HuggingFaceConfig

    names = [f"class {i}" for i in range(300)]
    with pytest.raises(ValueError, match=r"ignore_value 255 is the raw value of class 255 \('class 255'\) of the 300"):
        HuggingFaceConfig(path="unused", class_names=names)  # the default 255 would swallow class 255
    with pytest.raises(ValueError, match=r"ignore_value 255 is the raw value of class 254 \('class 254'\).*1\.\.255"):
        HuggingFaceConfig(path="unused", class_names=names[:255], reduce_zero_label=True)
    with pytest.raises(ValueError, match=r"ignore_value 0 is the raw value of class 0"):
        HuggingFaceConfig(path="unused", class_names=names[:3], ignore_value=0)
    assert HuggingFaceConfig(path="unused", class_names=names, ignore_value=65535).ignore_value == 65535
    assert HuggingFaceConfig(path="unused", class_names=names[:3], ignore_value=0, reduce_zero_label=True)
    (tmp_path / "names.json").write_text(json.dumps(names))
    with pytest.raises(SystemExit) as exit_info:
        convert("hf", "--root", str(tmp_path), "--class-names", str(tmp_path / "names.json"), "--out", str(tmp_path / "out"))
    assert exit_info.value.code == 2 and "pass --ignore-value" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Dataset-specific bad labels


def test_dataset_specific_bad_labels_are_refused_with_the_file_named(tmp_path, capsys):
    # ADE20K-150: 151 is out of range
    base = tmp_path / "ade/ADEChallengeData2016"
    write_jpeg(base / "images/validation/ADE_val_00000001.jpg", 4, 3, seed=1)
    write_png(base / "annotations/validation/ADE_val_00000001.png", np.full((3, 4), 151, np.uint8))
    assert convert("ade150", "--root", str(tmp_path / "ade"), "--out", str(tmp_path / "out")) == 1
    assert "annotations/validation/ADE_val_00000001.png: out-of-range label ids [151]" in capsys.readouterr().out

    # PASCAL-Context-459: a LabelMap with zeros, and one with 460
    stems = list(pascal_context_val_ids()[:2])
    root = pascal_tree(tmp_path / "pc", stems, [(4, 3), (4, 3)])
    (root / "trainval").mkdir()
    scipy.io.savemat(root / "trainval" / f"{stems[0]}.mat", {"LabelMap": np.array([[0, 1, 2, 3]] * 3, np.uint16)})
    scipy.io.savemat(root / "trainval" / f"{stems[1]}.mat", {"LabelMap": np.full((3, 4), 460, np.uint16)})
    (tmp_path / "ids.txt").write_text("\n".join(stems))
    assert convert("pc459", "--root", str(root), "--out", str(tmp_path / "out"), "--id-list", str(tmp_path / "ids.txt")) == 1
    printed = capsys.readouterr().out
    assert f"trainval/{stems[0]}.mat: LabelMap has 3 zero pixels" in printed
    assert f"trainval/{stems[1]}.mat: out-of-range label ids [460]" in printed

    # PASCAL-Context-59: an id listed for conversion but absent from the annotation file, and an unknown category;
    # then an image entry without its size
    image_entry = {"image_id": int(stems[0].replace("_", "")), "file_name": f"{stems[0]}.jpg", "height": 3, "width": 4}
    annotations = {"images": [image_entry],
                   "annos_segmentation": [{"image_id": int(stems[0].replace("_", "")), "category_id": 600,
                                           "segmentation": rle.encode(np.ones((3, 4), bool))}]}
    (root / "trainval_merged.json").write_text(json.dumps(annotations))
    assert convert("pc59", "--root", str(root), "--out", str(tmp_path / "out"), "--id-list", str(tmp_path / "ids.txt")) == 1
    printed = capsys.readouterr().out
    assert f"trainval_merged.json#{stems[0]}: out-of-range label ids [600]" in printed
    assert f"VOCdevkit/VOC2010/JPEGImages/{stems[1]}.jpg: image has no label (expected an entry for {stems[1]} in trainval_merged.json)" in printed
    del image_entry["height"]
    (root / "trainval_merged.json").write_text(json.dumps(annotations))
    assert convert("pc59", "--root", str(root), "--out", str(tmp_path / "out"), "--id-list", str(tmp_path / "ids.txt")) == 1
    assert f"trainval_merged.json#{stems[0]}: the image entry has no valid 'height' and 'width'" in capsys.readouterr().out
    # a malformed mask the converter does not foresee (RLE counts null) is a bad sample naming its entry, not a crash
    image_entry["height"] = 3
    annotations["annos_segmentation"][0].update(category_id=2, segmentation={"size": [3, 4], "counts": None})
    (root / "trainval_merged.json").write_text(json.dumps(annotations))
    assert convert("pc59", "--root", str(root), "--out", str(tmp_path / "out"), "--id-list", str(tmp_path / "ids.txt")) == 1
    assert f"trainval_merged.json#{stems[0]}: cannot convert (TypeError: " in capsys.readouterr().out

    # VOC: 21 is out of range; an id in val.txt whose files are missing
    voc = voc_tree(tmp_path / "v", {"2007_000033": np.full((3, 4), 21, np.uint8)})
    list_file = voc / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    list_file.write_text(list_file.read_text() + "2007_999999\n")
    assert convert("voc20", "--root", str(voc), "--out", str(tmp_path / "out")) == 1
    printed = capsys.readouterr().out
    assert "SegmentationClassAug/2007_000033.png: out-of-range label ids [21]; valid values are 0..20 and 255" in printed
    assert "JPEGImages/2007_999999.jpg: neither the image nor its label" in printed

    # ADE20K-847: a _seg.png of another size
    val = tmp_path / "a847/ADE20K_2021_17_01/images/ADE/validation/x"
    write_jpeg(val / "ADE_val_00000009.jpg", 6, 5, seed=2)
    seg_png(np.zeros((4, 6), np.int64), val / "ADE_val_00000009_seg.png")
    assert convert("ade847", "--root", str(tmp_path / "a847"), "--out", str(tmp_path / "out")) == 1
    assert "ADE_val_00000009_seg.png: label is 6x4 but image" in capsys.readouterr().out


def test_pascal_context_val_split_is_the_published_list(tmp_path):
    """Without --id-list the val split is the 5104 published ids: an annotated image outside them goes to train."""
    val_ids, other = list(pascal_context_val_ids()[:2]), "2008_000008"
    assert other not in pascal_context_val_ids()
    root = pascal_tree(tmp_path, [*val_ids, other], [(5, 4)] * 3)
    (root / "trainval").mkdir()
    for stem in (*val_ids, other):
        scipy.io.savemat(root / "trainval" / f"{stem}.mat", {"LabelMap": np.full((4, 5), 3, np.uint16)})
    assert convert("pc459", "--root", str(root), "--out", str(tmp_path / "out"), "--split", "val", "--split", "train",
                   "--skip-bad") == 0
    assert sorted(read_back(tmp_path / "out/pc459/val")) == [f"pc459_val_{s}" for s in val_ids]
    assert sorted(read_back(tmp_path / "out/pc459/train")) == [f"pc459_train_{other}"]


def test_label_tables_are_complete_and_agree_with_the_class_lists():
    """Every PC-59 class maps from its full PASCAL-Context id (its 1-based PC-459 index, found by name in the class
    list, not in the table), ADE-847's table hits train ids 0..846 once each under the class list's names, and the
    val list holds the 5104 published ids."""
    from catseg.vocab import load_vocab
    from data_prep.sources import _ade847_lut, _pc59_lut

    pc59, pc459 = load_vocab("pc59"), load_vocab("pc459")
    lut = _pc59_lut()
    for train_id, name in enumerate(pc59):
        assert lut[pc459.index("table" if name == "diningtable" else name) + 1] == train_id, name
    assert (lut != 255).sum() == 59 and lut[0] == 255
    ade, table = load_vocab("ade847"), json.loads((REPO / "data_prep/tables/ade847_id_map.json").read_text())
    lut = _ade847_lut()
    assert sorted(lut[lut != 65535]) == list(range(847))
    for row in table:
        assert lut[row["ade_id"]] == row["train_id"] and ade[row["train_id"]] == row["name"], row
    ids = pascal_context_val_ids()
    assert len(ids) == len(set(ids)) == 5104 and (ids[0], ids[-1]) == ("2008_000002", "2010_006086")
