"""The shard format (writer, reader, errors), the synthetic dataset and the RLE codec."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import rle, shards, synthetic

REPO = Path(__file__).resolve().parents[1]


def sample(key: str, label: np.ndarray, dtype: str = "uint8") -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*label.shape, 3), 90, np.uint8)).save(buffer, "PNG")
    return shards.build_sample(
        key, buffer.getvalue(), "png", label, label_dtype=dtype, ignore_index=255 if dtype == "uint8" else 65535,
        class_list="test", source={"n": 1},
    )


def test_labels_round_trip_as_integers_in_8_and_16_bit():
    small = np.array([[0, 7], [254, 255]])
    large = np.array([[0, 300], [846, 65535]])
    assert np.array_equal(shards.decode_label(shards.encode_label(small, "uint8")), small)
    data = shards.encode_label(large, "uint16")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I;16")
    decoded = shards.decode_label(data)
    assert decoded.dtype == np.int64 and np.array_equal(decoded, large)
    with pytest.raises(ValueError, match="0..255 for uint8"):
        shards.encode_label(large, "uint8")
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(rgb, "PNG")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        shards.decode_label(rgb.getvalue())


def test_shards_are_deterministic_and_readable_by_webdataset(tmp_path):
    samples = [sample(f"t_val_{i}", np.full((3, 4), i)) for i in range(3)]
    first = shards.write_shard(tmp_path / "a.tar", 0, samples)
    second = shards.write_shard(tmp_path / "b.tar", 0, samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first.sha256 == second.sha256 == shards.file_sha256(tmp_path / "a.tar")
    assert first.num_samples == 3 and first.keys == ["t_val_0", "t_val_1", "t_val_2"]
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["t_val_0.json", "t_val_0.label.png", "t_val_0.png"]
    assert {(m.mtime, m.uname, m.mode) for m in members} == {(0, "catseg", 0o444)}
    read = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False, empty_check=False))
    image, label, meta = shards.decode_sample(read[2])
    assert image.shape == (3, 4, 3) and (label == 2).all() and meta["key"] == "t_val_2"
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_decode_sample_names_the_key_of_bad_data():
    good = sample("t_val_x", np.zeros((2, 2)))
    good["__url__"] = "shard-7.tar"
    for broken, message in (
        ({k: v for k, v in good.items() if k != "label.png"}, "sample 't_val_x' in shard-7.tar lacks member"),
        ({**good, "png": b"garbage"}, "image t_val_x.png cannot be decoded"),
        ({**good, "json": b"{"}, "record t_val_x.json is not valid JSON"),
        ({**good, "label.png": shards.encode_label(np.zeros((3, 2)), "uint8")}, "label is 2x3 but image is 2x2"),
    ):
        with pytest.raises(shards.CorruptSampleError, match=message):
            shards.decode_sample(broken)


def test_reader_errors_name_the_path_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}.*python -m data_prep.convert"):
        shards.read_dataset_info(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        shards.read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(shards.ShardFormatError, match="lacks key"):
        shards.read_dataset_info(tmp_path)
    with pytest.raises(shards.ShardFormatError, match="contains '.'"):
        shards.make_key("voc20", "val", "2007.000033")


def test_shard_list_names_files_of_its_folder_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder given as "." must not turn a listed name into a webdataset "pipe:" URL
    marker = tmp_path / "ran"
    for name in (f"pipe:touch {marker}; true", "../elsewhere.tar", "notes.txt"):
        (tmp_path / "sizes.json").write_text(json.dumps({name: 1}))
        with pytest.raises(shards.ShardFormatError, match="not a shard file name of that folder"):
            shards.shard_paths(".")
    assert not marker.exists()
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "sizes.json").write_text(json.dumps({"a.tar": 1}))
    assert shards.shard_paths(".") == [str(tmp_path / "a.tar")]


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_generator_cli_is_deterministic_and_seeded(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "data_prep.synthetic", "--train", "200", "--val", "20"]
    subprocess.run([*command, "--out", str(tmp_path / "a")], cwd=REPO, env=env, check=True, capture_output=True)
    subprocess.run([*command, "--out", str(tmp_path / "b")], cwd=REPO, env=env, check=True, capture_output=True)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert files(tmp_path / "a") == files(tmp_path / "b")
    train = tmp_path / "a/synthetic/train"
    info = shards.read_dataset_info(train)
    assert info["class_names"] == ["sky", "grass", "water", "sand", "brick wall", "snow", "wood", "metal"]
    assert (info["num_samples"], info["ignore_index"], shards.read_dataset_info(tmp_path / "a/synthetic/val")["num_samples"]) == (200, 255, 20)
    assert len(shards.shard_paths(train)) == 2 and shards.verify_folder(train) == []
    image, label, meta = next(shards.iter_samples(train))
    assert image.shape == (128, 128, 3) and meta["image_format"] == "jpg"
    other_seed, _ = synthetic.make_example(1, "train", 0)
    assert not np.array_equal(other_seed, synthetic.make_example(0, "train", 0)[0])
    assert not np.array_equal(synthetic.make_example(0, "val", 0)[0], synthetic.make_example(0, "train", 0)[0])


def test_synthetic_rerun_with_other_counts_seed_or_size_remakes_the_shards(tmp_path):
    for train, seed, size in ((30, 0, 32), (50, 0, 32), (50, 7, 32), (20, 7, 48)):
        folders = synthetic.write_synthetic(tmp_path / "rerun", synthetic.SyntheticConfig(train, 0, size, seed, 20))
        clean = synthetic.write_synthetic(tmp_path / f"clean-{train}-{seed}-{size}",
                                          synthetic.SyntheticConfig(train, 0, size, seed, 20))
        files = lambda root: {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}
        assert files(folders["train"]) == files(clean["train"]), (train, seed, size)


def test_synthetic_classes_are_separable_by_colour_and_borders_are_ignored():
    images, labels = zip(*(synthetic.make_example(3, "train", i, size=64) for i in range(40)))
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float32)
    targets = np.concatenate([lab.reshape(-1) for lab in labels])
    assert set(np.unique(targets)) == set(range(8)) | {255}
    ignored = np.mean(targets == 255)
    assert 0.001 < ignored < 0.1
    known = targets != 255
    means = np.stack([pixels[targets == c].mean(0) for c in range(8)])
    nearest = np.argmin(((pixels[known, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == targets[known]) > 0.85  # colour alone nearly separates the classes
    with pytest.raises(ValueError, match="size must be >= 16"):
        synthetic.SyntheticConfig(size=8)


# ---------------------------------------------------------------------------------------------------------------
# RLE


def test_rle_string_form_matches_hand_decoded_examples():
    assert rle.counts_from_string("032") == [0, 3, 2]
    assert rle.counts_from_string("251N") == [2, 5, 1, 3]  # 4th count stored as 3 - 5 = -2 -> 'N'
    assert rle.counts_to_string([2, 5, 1, 3]) == "251N"
    assert rle.counts_to_string([100]) == "T3"  # 100 = 4 + 3 * 32: group 4 with the 0x20 "more" bit -> "T", then 3
    mask = rle.decode({"size": [2, 3], "counts": [1, 2, 2, 1]})
    # runs 0,1,1,0,0,1 fill column by column: (0,1), (1,0), (0,1)
    np.testing.assert_array_equal(mask, [[False, True, False], [True, False, True]])


def test_rle_round_trips_and_rejects_inconsistent_sizes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((int(rng.integers(1, 20)), int(rng.integers(1, 20)))) < rng.random()
        np.testing.assert_array_equal(rle.decode(rle.encode(mask)), mask)
    with pytest.raises(ValueError, match="cover 5 pixels but size 2x3 has 6"):
        rle.decode({"size": [2, 3], "counts": [1, 4]})
