"""Resume after a kill, split work across parts, verification, and every kind of bad input."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import shards
from data_prep.convert import main as convert_main

REPO = Path(__file__).resolve().parents[1]


def coco_tree(root: Path, count: int, size: tuple[int, int] = (16, 12), split: str = "train2017") -> Path:
    """Write a tiny COCO-Stuff tree with ``count`` valid samples named 000000000000.jpg, ..."""
    rng = np.random.default_rng(count)
    for i in range(count):
        write_sample(root, i, rng, size, split)
    return root


def write_sample(root: Path, index: int, rng, size=(16, 12), split: str = "train2017") -> tuple[Path, Path]:
    image_path = root / "images" / split / f"{index:012d}.jpg"
    label_path = root / "annotations" / split / f"{index:012d}.png"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path, quality=90)
    Image.fromarray(rng.integers(0, 182, (height, width), dtype=np.uint8)).save(label_path)
    return image_path, label_path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Return every file under ``folder`` (relative name -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def convert(*args: str, workers: str = "0") -> int:
    return convert_main([*args, "--workers", workers, "--no-progress"])


def run_cli(*args: str, preexec_fn=None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "data_prep.convert", *args, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
    )


# ---------------------------------------------------------------------------------------------------------------
# Kill and resume


def test_killed_run_resumes_to_byte_identical_output(tmp_path):
    raw = coco_tree(tmp_path / "raw", 24)
    clean = tmp_path / "clean"
    assert convert("coco_stuff", "--root", str(raw), "--out", str(clean), "--split", "train", "--shard-size", "4") == 0

    # Sample 13 (shard 3) is a FIFO: the job blocks there for as long as the test wants, with earlier shards done.
    blocked = raw / "images/train2017/000000000013.jpg"
    original = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "data_prep.convert", "coco_stuff", "--root", str(raw), "--out", str(out),
               "--split", "train", "--shard-size", "4", "--workers", "2", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = out / "coco_stuff/train"
    try:
        deadline = time.monotonic() + 30
        while not list(folder.glob("*.tar.json")):
            assert process.poll() is None, "the conversion ended before reaching the blocked sample"
            assert time.monotonic() < deadline, "the conversion made no progress"
            time.sleep(0.02)
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    assert not (folder / "dataset.json").exists()
    done = {p.name: p.stat() for p in folder.glob("*.tar") if shards.read_shard_record(p)}
    assert 1 <= len(done) <= 3  # shards before the blocked sample only

    # Leftovers of a kill at other moments: a half-written temporary and a renamed tar whose sidecar never came.
    (folder / ".coco_stuff-train-000004.tar.tmp-otherhost-99").write_bytes(b"partial")
    (folder / "coco_stuff-train-000005.tar").write_bytes(b"renamed, sidecar missing")

    blocked.unlink()
    blocked.write_bytes(original)
    result = run_cli("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "4", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"{6 - len(done)} shards written ({len(done)} already complete, 6 in the split)" in result.stdout
    for name, before in done.items():  # complete shards were not redone
        after = (folder / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert folder_bytes(out) == folder_bytes(clean)


def test_a_worker_killed_from_outside_stops_the_run_with_a_message(tmp_path):
    """A worker process killed mid-run (the system's out-of-memory killer, say) ends the run with exit status 2 and a
    message naming the shard being made, instead of waiting for its lost work for ever; the shards complete before it
    are kept and a rerun finishes them byte for byte."""
    raw = coco_tree(tmp_path / "raw", 12)
    clean = tmp_path / "clean"
    args = ["coco_stuff", "--root", str(raw), "--split", "train", "--shard-size", "2", "--no-progress"]
    assert convert(*args[:-1], "--out", str(clean)) == 0
    out = tmp_path / "out"
    dies = (  # sample 7 (shard 3) kills the worker converting it
        "import os, signal, sys\n"
        "from data_prep import sources\n"
        "from data_prep.convert import main\n"
        "load = sources.CocoStuff.load\n"
        "def load_or_die(self, ref, split):\n"
        "    if ref.stem == '000000000007':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return load(self, ref, split)\n"
        "sources.CocoStuff.load = load_or_die\n"
        "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", dies, *args, "--out", str(out), "--workers", "2"], cwd=REPO,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    # the shard named is the one being read when the death was seen: the killer's or an earlier one in flight
    named = re.search(r"a conversion worker process died while coco_stuff-train-(\d{6}).tar was being made",
                      result.stderr)
    assert named and int(named[1]) <= 3, result.stderr
    folder = out / "coco_stuff/train"
    assert not (folder / "dataset.json").exists() and shards.read_shard_record(folder / "coco_stuff-train-000003.tar") is None
    assert all(shards.read_shard_record(folder / shards.shard_name("coco_stuff", "train", i)) for i in range(int(named[1])))
    assert convert(*args[:-1], "--out", str(out), workers="2") == 0
    assert folder_bytes(out) == folder_bytes(clean)


def test_parts_convert_disjoint_shards_and_finish_together(tmp_path):
    raw = coco_tree(tmp_path / "raw", 10)
    single, split_out = tmp_path / "single", tmp_path / "parts"
    assert convert("coco_stuff", "--root", str(raw), "--out", str(single), "--split", "train", "--shard-size", "2") == 0
    common = ("coco_stuff", "--root", str(raw), "--out", str(split_out), "--split", "train", "--shard-size", "2", "--num-parts", "2")
    assert convert(*common, "--part", "1") == 0
    folder = split_out / "coco_stuff/train"
    assert sorted(p.name for p in folder.glob("*.tar")) == ["coco_stuff-train-000001.tar", "coco_stuff-train-000003.tar"]
    assert not (folder / "dataset.json").exists()
    assert convert(*common, "--part", "0") == 0
    assert shards.read_dataset_info(folder)["num_samples"] == 10
    reference = folder_bytes(single / "coco_stuff/train")
    parts = folder_bytes(folder)
    for name, data in reference.items():
        if name != "report.json":
            assert parts[name] == data, name


def test_parts_started_together_finish_the_split(tmp_path, monkeypatch):
    """Parts run at the same time (a SLURM array) each list the shards before the others have written theirs; the
    one that finishes last finds the others' shards complete, those that skipped bad samples too, and writes the
    split's lists."""
    from data_prep import pipeline

    raw = coco_tree(tmp_path / "raw", 8)
    (raw / "images/train2017/000000000003.jpg").write_bytes(b"not a jpeg")  # in shard 1, part 1's
    common = ("coco_stuff", "--root", str(raw), "--out", str(tmp_path / "out"), "--split", "train", "--shard-size",
              "2", "--num-parts", "2", "--skip-bad")
    run_pending = pipeline._run_pending

    def part_1_runs_meanwhile(*args, **kwargs):  # part 0 has listed the shards; part 1 runs whole now
        monkeypatch.setattr(pipeline, "_run_pending", run_pending)
        assert convert(*common, "--part", "1") == 0
        assert not (tmp_path / "out/coco_stuff/train/dataset.json").exists()  # part 0's shards are not there yet
        return run_pending(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run_pending", part_1_runs_meanwhile)
    assert convert(*common, "--part", "0") == 0
    info = shards.read_dataset_info(tmp_path / "out/coco_stuff/train")
    assert (info["num_samples"], info["num_skipped"]) == (7, 1)


def test_verify_detects_a_changed_shard(tmp_path, capsys):
    raw = coco_tree(tmp_path / "raw", 4)
    out = tmp_path / "out"
    assert convert("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2") == 0
    assert convert("coco_stuff", "--out", str(out), "--verify") == 0
    assert "ok (2 shards, 4 samples)" in capsys.readouterr().out
    shard = out / "coco_stuff/train/coco_stuff-train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert convert("coco_stuff", "--out", str(out), "--verify") == 1
    assert f"{shard}: sha256" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_each_bad_input_is_named_reported_and_fails_the_run(tmp_path, capsys):
    raw = coco_tree(tmp_path / "raw", 12)
    images, labels = raw / "images/train2017", raw / "annotations/train2017"
    (images / "000000000001.jpg").write_bytes(b"this is not a jpeg")  # corrupt
    truncated = (images / "000000000003.jpg").read_bytes()
    (images / "000000000003.jpg").write_bytes(truncated[: len(truncated) // 2])  # truncated
    (labels / "000000000005.png").unlink()  # image without label
    (images / "000000000006.jpg").unlink()  # label without image
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(labels / "000000000008.png")  # wrong size
    Image.fromarray(np.full((12, 16), 200, np.uint8)).save(labels / "000000000009.png")  # out-of-range ids
    expected = {
        "000000000001": ("images/train2017/000000000001.jpg", "corrupt or truncated image"),
        "000000000003": ("images/train2017/000000000003.jpg", "corrupt or truncated image"),
        "000000000005": ("images/train2017/000000000005.jpg", "image has no label"),
        "000000000006": ("annotations/train2017/000000000006.png", "label has no image"),
        "000000000008": ("annotations/train2017/000000000008.png", "label is 5x5 but image"),
        "000000000009": ("annotations/train2017/000000000009.png", "out-of-range label ids [200]"),
    }
    out = tmp_path / "out"
    args = ("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2")
    assert convert(*args) == 1
    printed = capsys.readouterr().out
    folder = out / "coco_stuff/train"
    report = __import__("json").loads((folder / "report.json").read_text())
    assert {b["key"].rsplit("_", 1)[1]: b["file"] for b in report["bad"]} == {k: v[0] for k, v in expected.items()}
    for bad in report["bad"]:
        file, reason = expected[bad["key"].rsplit("_", 1)[1]]
        assert reason in bad["error"] and f"{file}: {bad['error']}" in printed
    # shards holding only good samples are complete and intact; the run did not declare the split finished
    assert [p.name for p in sorted(folder.glob("*.tar"))] == ["coco_stuff-train-000005.tar"]
    assert shards.read_shard_record(folder / "coco_stuff-train-000005.tar").num_samples == 2
    assert not (folder / "dataset.json").exists()

    assert convert(*args, "--skip-bad") == 0
    info = shards.read_dataset_info(folder)
    assert (info["num_samples"], info["num_skipped"]) == (6, 6)  # 12 stems: none dropped silently
    keys = [s["__key__"] for s in shards.iter_raw_samples(folder)]
    assert keys == [f"coco_stuff_train_{i:012d}" for i in (0, 2, 4, 7, 10, 11)]
    assert shards.verify_folder(folder) == []
    record = shards.read_shard_record(folder / "coco_stuff-train-000000.tar")
    assert [s["file"] for s in record.skipped] == ["images/train2017/000000000001.jpg"]


def test_fixing_a_bad_file_and_rerunning_completes_identically(tmp_path):
    raw = coco_tree(tmp_path / "raw", 6)
    clean = tmp_path / "clean"
    assert convert("coco_stuff", "--root", str(raw), "--out", str(clean), "--split", "train", "--shard-size", "2") == 0
    label = raw / "annotations/train2017/000000000002.png"
    good = label.read_bytes()
    label.write_bytes(good[:40])  # truncated label
    out = tmp_path / "out"
    args = ("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2")
    assert convert(*args) == 1
    label.write_bytes(good)
    assert convert(*args, workers="2") == 0
    assert folder_bytes(out) == folder_bytes(clean)


def test_files_fixed_after_a_skip_bad_run_get_into_their_shards(tmp_path, capsys):
    """A shard written with --skip-bad is redone by the next run, so files fixed since go in and the errors of the
    earlier run are not reported again: the split ends as if it had been clean from the start."""
    raw = coco_tree(tmp_path / "raw", 6)
    clean = tmp_path / "clean"
    assert convert("coco_stuff", "--root", str(raw), "--out", str(clean), "--split", "train", "--shard-size", "2") == 0
    label = raw / "annotations/train2017/000000000003.png"
    good = label.read_bytes()
    label.write_bytes(good[:40])
    out = tmp_path / "out"
    args = ("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2")
    assert convert(*args, "--skip-bad") == 0
    assert shards.read_dataset_info(out / "coco_stuff/train")["num_skipped"] == 1
    label.write_bytes(good)
    capsys.readouterr()
    assert convert(*args) == 0
    printed = capsys.readouterr().out
    assert "1 shards written (2 already complete, 3 in the split)" in printed and "bad" not in printed
    assert folder_bytes(out) == folder_bytes(clean)


def test_a_malformed_shard_record_redoes_its_shard(tmp_path):
    raw = coco_tree(tmp_path / "raw", 4)
    out = tmp_path / "out"
    args = ("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2")
    assert convert(*args) == 0
    before = folder_bytes(out)
    sidecar = out / "coco_stuff/train/coco_stuff-train-000001.tar.json"
    sidecar.write_text('{"name": "coco_stuff-train-000001.tar"}')  # valid JSON, fields missing
    assert convert(*args) == 0
    assert folder_bytes(out) == before


def test_shards_of_another_file_list_or_shard_size_are_redone(tmp_path):
    raw = coco_tree(tmp_path / "raw", 6)
    out = tmp_path / "out"
    args = ("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train")
    assert convert(*args, "--shard-size", "2") == 0
    for path in (raw / "images/train2017/000000000002.jpg", raw / "annotations/train2017/000000000002.png"):
        path.unlink()  # every later sample moves one place up: shards 1 and 2 no longer hold what the plan puts there
    clean = tmp_path / "clean"
    for size in ("2", "3"):
        assert convert(*args[:4], str(clean / size), *args[5:], "--shard-size", size) == 0
        assert convert(*args, "--shard-size", size) == 0
        assert folder_bytes(out) == folder_bytes(clean / size)
    samples = [s["__key__"] for s in shards.iter_raw_samples(out / "coco_stuff/train")]
    assert samples == [f"coco_stuff_train_{i:012d}" for i in (0, 1, 3, 4, 5)]
    assert not (out / "coco_stuff/train/coco_stuff-train-000002.tar").exists()  # past the 2 shards of size 3


def test_shards_past_a_shorter_file_list_are_removed_across_gaps(tmp_path):
    """Shards past the new last one are removed even where a shard between them is missing (a part left unfinished),
    so the folder holds what a fresh conversion of the shorter list writes."""
    raw = coco_tree(tmp_path / "raw", 12)
    out = tmp_path / "out"
    args = ("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2")
    assert convert(*args) == 0
    folder = out / "coco_stuff/train"
    (folder / "coco_stuff-train-000003.tar").unlink()
    (folder / "coco_stuff-train-000005.tar").unlink()  # a sidecar left alone
    for i in range(4, 12):
        (raw / f"images/train2017/{i:012d}.jpg").unlink()
        (raw / f"annotations/train2017/{i:012d}.png").unlink()
    assert convert(*args) == 0
    clean = tmp_path / "clean"
    assert convert(*args[:4], str(clean), *args[5:]) == 0
    assert folder_bytes(out) == folder_bytes(clean)


def test_a_file_name_unfit_for_a_sample_key_is_named(tmp_path, capsys):
    raw = coco_tree(tmp_path / "raw", 2)
    image = raw / "images/train2017/000000000001.jpg"
    image.rename(image.with_name("a b.jpg"))
    (raw / "annotations/train2017/000000000001.png").rename(raw / "annotations/train2017/a b.png")
    assert convert("coco_stuff", "--root", str(raw), "--out", str(tmp_path / "out"), "--split", "train") == 2
    err = capsys.readouterr().err
    assert f"{image.with_name('a b.jpg')}: sample key" in err and "rename the file" in err
    lone = raw / "annotations/train2017/lone.name.png"  # a label without its image is named by the label
    (raw / "annotations/train2017/a b.png").rename(lone)
    image.with_name("a b.jpg").unlink()
    assert convert("coco_stuff", "--root", str(raw), "--out", str(tmp_path / "out"), "--split", "train") == 2
    assert f"{lone}: sample key" in capsys.readouterr().err


def test_unwritable_output_folder_is_named(tmp_path):
    raw = coco_tree(tmp_path / "raw", 2)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("coco_stuff", "--root", str(raw), "--out", str(blocker / "shards"), "--split", "train")
    assert result.returncode == 2
    assert f"cannot write to output folder {blocker / 'shards' / 'coco_stuff' / 'train'}" in result.stderr


def test_missing_raw_tree_is_named(tmp_path, capsys):
    assert convert("ade150", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")) == 2
    assert f"{tmp_path / 'nowhere' / 'ADEChallengeData2016' / 'images' / 'validation'} does not exist" in capsys.readouterr().err


def test_full_disk_keeps_complete_shards_and_a_rerun_finishes(tmp_path):
    raw = coco_tree(tmp_path / "raw", 6, size=(32, 32))
    out = tmp_path / "out"
    args = ("coco_stuff", "--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2", "--workers", "0")
    assert convert(*args[:-2]) == 0
    folder = out / "coco_stuff/train"
    complete = folder_bytes(folder)
    victim = folder / "coco_stuff-train-000001.tar"
    victim.unlink()
    shards.sidecar_path(victim).unlink()

    def small_disk():  # files may not grow past 4 KB: the shard write fails like on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = run_cli(*args, preexec_fn=small_disk)
    assert result.returncode == 2
    assert f"no space left while writing {victim}" in result.stderr
    assert not list(folder.glob(".*tmp*")) and not victim.exists()
    remaining = folder_bytes(folder)
    assert all(remaining[name] == data for name, data in complete.items() if name in remaining)
    assert "coco_stuff-train-000000.tar" in remaining and "coco_stuff-train-000002.tar" in remaining

    assert run_cli(*args).returncode == 0
    assert folder_bytes(folder) == complete


def test_bad_option_values_are_explained(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert("coco_stuff", "--root", str(tmp_path), "--out", str(tmp_path), "--num-parts", "2", "--part", "2")
    assert "part must be in 0..1 for num_parts=2, got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert("ade150", "--root", str(tmp_path), "--out", str(tmp_path), "--split", "test")
    assert "ade150 has no split 'test'; choose one of: train, val" in capsys.readouterr().err
