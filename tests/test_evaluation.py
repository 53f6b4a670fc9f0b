"""The evaluation entry end to end: real shards, a real tiny checkpoint, the real CLI (in-process and launched)."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import catseg
from data_prep import shards as shard_format
from data_prep.synthetic import CLASS_NAMES, SyntheticConfig, write_synthetic
from evaluation.evaluate import EvalConfig, main, resolve_checkpoint
from catseg.inference import Segmenter
from evaluation.metrics import confusion_matrix, summarize
from training.checkpoint import checkpoint_name

from test_training_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root, SyntheticConfig(num_train=0, num_val=6, size=64, seed=3, shard_size=4))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with one complete checkpoint at step 5."""
    run = tmp_path_factory.mktemp("run")
    ckpt = run / "checkpoints" / checkpoint_name(5)
    ckpt.mkdir(parents=True)
    catseg.save_weights(catseg.create_model("catseg_tiny"), ckpt / "model.safetensors")
    (ckpt / "meta.json").write_text(json.dumps({"step": 5, "preset": "catseg_tiny"}))
    return run


def _ckpt(run_dir):
    return run_dir / "checkpoints" / checkpoint_name(5)


def _valid_pixels(folder, limit):
    count = 0
    for i, (_, label, record) in enumerate(shard_format.iter_samples(folder)):
        if i == limit:
            break
        count += int((label != record["ignore_index"]).sum())
    return count


def test_evaluate_end_to_end_on_synthetic_shards(synthetic_root, run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--checkpoint", str(_ckpt(run_dir)), "--benchmarks", "synthetic", "--shards", str(synthetic_root)]
    assert main(args + ["--out", str(out), "--limit", "5", "--no-progress"]) == 0
    assert "Synthetic" in capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 5 and report["preset"] == "catseg_tiny" and report["rule"] == "present"
    assert report["checkpoint"] == str(_ckpt(run_dir).resolve())
    assert report["processes"] == 1 and report["images"] == 5
    assert report["seconds"] > 0 and report["images_per_s"] > 0
    result = report["benchmarks"]["synthetic"]
    assert result["images"] == 5 and result["limit"] == 5 and result["images_per_s"] > 0
    assert [c["name"] for c in result["per_class"]] == CLASS_NAMES

    conf = np.load(out / "synthetic_confusion.npy")
    assert conf.dtype == np.int64 and conf.shape == (8, 8)
    # Every non-ignore ground-truth pixel of the first five images, each counted once, against the checkpoint's own
    # predictions: the label maps catseg.Segmenter gives for the same images.
    assert conf.sum() == _valid_pixels(synthetic_root / "synthetic" / "val", 5)
    seg = Segmenter(catseg.create_model("catseg_tiny", pretrained=_ckpt(run_dir)), device="cpu", precision="fp32")
    own, mirrored = np.zeros((8, 8), np.int64), np.zeros((8, 8), np.int64)
    for _, (image, gt, record) in zip(range(5), shard_format.iter_samples(synthetic_root / "synthetic" / "val")):
        labels = np.asarray(seg.predict(image, CLASS_NAMES)[0].labels)
        own += confusion_matrix(labels, gt, 8, record["ignore_index"])
        mirrored += confusion_matrix(labels[:, ::-1], gt, 8, record["ignore_index"])
    np.testing.assert_array_equal(conf, own)
    assert not np.array_equal(mirrored, own)  # the comparison sees where each label lies
    expected = summarize(conf)
    assert result["miou"] == pytest.approx(expected["miou"])
    assert result["fwiou"] == pytest.approx(expected["fwiou"])
    for row, iou in zip(result["per_class"], expected["per_class_iou"]):
        assert row["iou"] is None if np.isnan(iou) else row["iou"] == pytest.approx(iou)
        assert row["gt_pixels"] == conf[row["id"]].sum() and row["pred_pixels"] == conf[:, row["id"]].sum()

    with open(out / "synthetic.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == CLASS_NAMES
    assert int(rows[3]["gt_pixels"]) == conf[3].sum()

    # The other rule is named in the report and computed from the same counts.
    out2 = tmp_path / "report_zero"
    assert main(args + ["--out", str(out2), "--limit", "5", "--rule", "absent_as_zero", "--no-progress"]) == 0
    report2 = json.loads((out2 / "report.json").read_text())
    assert report2["rule"] == "absent_as_zero"
    assert report2["benchmarks"]["synthetic"]["rule"] == "absent_as_zero"
    np.testing.assert_array_equal(np.load(out2 / "synthetic_confusion.npy"), conf)
    assert report2["benchmarks"]["synthetic"]["miou"] == pytest.approx(summarize(conf, "absent_as_zero")["miou"])


def test_damaged_or_missing_shards_are_refused(synthetic_root, run_dir, tmp_path, capsys, monkeypatch):
    """Every benchmark's shard folder is checked before the model loads; a shard cut at a member boundary (fewer
    images than dataset.json counts, no read error) or in the middle of a file is refused, not scored; the train
    split given for a benchmark is refused."""
    import shutil
    import tarfile

    from evaluation import evaluate

    ckpt = str(_ckpt(run_dir))
    loaded = []
    monkeypatch.setattr(evaluate, "load_model", lambda *a: loaded.append(a) or pytest.fail("model loaded"))
    assert main(["--checkpoint", ckpt, "--benchmarks", "synthetic,pc59", "--shards", str(synthetic_root),
                 "--out", str(tmp_path / "r0")]) == 2
    assert "benchmark 'pc59': no shard folder" in capsys.readouterr().err and not loaded
    train = tmp_path / "train_shards"
    write_synthetic(train, SyntheticConfig(num_train=2, num_val=0, size=64, seed=3, shard_size=4))
    assert main(["--checkpoint", ckpt, "--benchmarks", "synthetic", "--shard-dir",
                 f"synthetic={train / 'synthetic' / 'train'}", "--out", str(tmp_path / "r1")]) == 2
    assert "split 'train' but benchmark 'synthetic' scores the 'val' split" in capsys.readouterr().err
    monkeypatch.undo()

    val = tmp_path / "cut" / "synthetic" / "val"
    shutil.copytree(synthetic_root / "synthetic" / "val", val)
    last = sorted(val.glob("*.tar"))[-1]
    with tarfile.open(last) as tar:  # keep the first sample's members only: a cut at a member boundary
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].name.split(".")[0]
    with tarfile.open(last, "w") as tar:
        for member, data in members:
            if member.name.split(".")[0] == first:
                tar.addfile(member, io.BytesIO(data))
    args = ["--checkpoint", ckpt, "--benchmarks", "synthetic", "--shards", str(tmp_path / "cut"), "--cpu",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "benchmark 'synthetic': read 5 images" in err and "counts 6; a shard is missing or cut short" in err
    assert not (tmp_path / "r2" / "report.json").exists()
    assert main(args + ["--out", str(tmp_path / "r3"), "--limit", "4"]) == 0  # the images asked for are all there
    capsys.readouterr()
    last.write_bytes(last.read_bytes()[:1000])  # cut inside a member
    assert main(args + ["--out", str(tmp_path / "r4")]) == 2
    assert "benchmark 'synthetic': cannot read the shards in" in capsys.readouterr().err


def test_a_report_folder_keeps_one_checkpoint_and_its_current_benchmarks(synthetic_root, run_dir, tmp_path, capsys):
    """An explicit --out holding another checkpoint's report is refused too; re-evaluating the same checkpoint with
    fewer benchmarks removes the files of those left out, so the folder describes one evaluation."""
    ckpt = _ckpt(run_dir)
    out = tmp_path / "out"
    out.mkdir()
    foreign = {"weights": "/elsewhere/model.safetensors", "benchmarks": {"synthetic": {}}}
    (out / "report.json").write_text(json.dumps(foreign))
    args = ["--checkpoint", str(ckpt), "--benchmarks", "synthetic", "--shards", str(synthetic_root), "--limit", "2",
            "--no-progress", "--out", str(out)]
    assert main(args) == 2
    assert "holds the report of checkpoint weights /elsewhere/model.safetensors" in capsys.readouterr().err
    own = {"weights": str((ckpt / "model.safetensors").resolve()), "benchmarks": {"synthetic": {}, "pc59": {}}}
    (out / "report.json").write_text(json.dumps(own))
    for stale in ("pc59.csv", "pc59_confusion.npy"):
        (out / stale).write_text("an earlier evaluation's")
    (out / "notes.txt").write_text("the user's")
    assert main(args) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert list(report["benchmarks"]) == ["synthetic"]
    assert report["benchmarks"]["synthetic"]["skipped_in_conversion"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.json", "synthetic.csv",
                                                     "synthetic_confusion.npy"]


def test_bf16_and_compiled_evaluations_score_like_fp32(synthetic_root, run_dir, tmp_path):
    """--precision bf16 runs the fast path (bf16 autocast and weights), --compile the compiled aggregation and
    decoder, --class-chunk the model's classes in other chunks (128 by default, also for a checkpoint whose model
    runs them all at once); each names itself in the report and counts nearly the pixels the fp32 evaluation
    counts."""
    args = ["--checkpoint", str(_ckpt(run_dir)), "--benchmarks", "synthetic", "--shards", str(synthetic_root),
            "--limit", "2", "--no-progress"]
    conf, reports = {}, {}
    runs = (("fp32", []), ("bf16", ["--precision", "bf16"]), ("compiled", ["--compile"]),
            ("chunk2", ["--class-chunk", "2"]))
    for name, extra in runs:
        assert main(args + ["--out", str(tmp_path / name)] + extra) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
        conf[name] = np.load(tmp_path / name / "synthetic_confusion.npy")
    assert [(r["precision"], r["compile"], r["class_chunk"]) for r in reports.values()] == [
        ("fp32", False, 128), ("bf16", False, 128), ("fp32", True, 128), ("fp32", False, 2)]
    total = conf["fp32"].sum()
    # the model's classes in chunks of 2 (the checkpoint's model would run them all at once): the same pixels
    assert np.abs(conf["chunk2"] - conf["fp32"]).sum() / 2 <= 0.002 * total
    for name in ("bf16", "compiled"):
        assert conf[name].sum() == total
        # the same pixels predicted as the same class, up to a few that bf16 rounding or fused kernels tip over
        assert np.abs(conf[name] - conf["fp32"]).sum() / 2 <= (0.02 if name == "bf16" else 0.002) * total, name


def _write_voc20b_shards(folder: Path, count: int = 2, size: int = 48) -> Path:
    """A small PAS-20b validation folder written through data_prep's shard format, labels 0..20 and ignore."""
    from data_prep.sources import Voc20Background

    source = Voc20Background(folder)
    rng = np.random.default_rng(7)
    samples = []
    for i in range(count):
        label = rng.integers(0, 21, size=(size, size + 8)).astype(np.uint8)
        label[:4] = 255
        image = Image.fromarray(rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        samples.append(
            shard_format.build_sample(
                shard_format.make_key("voc20b", "val", f"{i:04d}"), buf.getvalue(), "png", label,
                label_dtype="uint8", ignore_index=255, class_list="voc20b", source={"test": i},
            )
        )
    out = folder / "voc20b" / "val"
    out.mkdir(parents=True)
    record = shard_format.write_shard(out / shard_format.shard_name("voc20b", "val", 0), 0, samples)
    shard_format.finalize_folder(out, source.info("val"), [record])
    return out


def test_voc20b_scores_21_classes_with_prompted_background(run_dir, tmp_path):
    shard_dir = _write_voc20b_shards(tmp_path / "shards")
    out = tmp_path / "report"
    args = ["--checkpoint", str(_ckpt(run_dir)), "--benchmarks", "voc20b", "--shard-dir", f"voc20b={shard_dir}"]
    assert main(args + ["--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "report.json").read_text())["benchmarks"]["voc20b"]
    assert len(result["per_class"]) == 21 and result["per_class"][20]["name"] == "background"
    conf = np.load(out / "voc20b_confusion.npy")
    assert conf.shape == (21, 21) and conf.sum() == 2 * 44 * 56
    # The random tiny model spreads its votes over all 59 prompts; the 39 background prompts land on id 20.
    assert conf[:, 20].sum() > 0
    assert result["per_class"][20]["iou"] is not None


def test_voc20b_is_prompted_with_its_59_names_and_counted_in_int64(run_dir, tmp_path, monkeypatch):
    """PAS-20b scores 21 classes but prompts the model with the 59 names of voc20b.json (background as its 39
    context classes, not the word "background"); the counts are int64, as detectron2's."""
    import catseg.inference
    from catseg.vocab import load_vocab

    prompts, real = [], catseg.inference.predict_labels

    def predict_labels(model, images, names, *args, **kwargs):  # the model's calls, with what they were prompted
        prompts.append(list(names))
        return real(model, images, names, *args, **kwargs)
    monkeypatch.setattr(catseg.inference, "predict_labels", predict_labels)
    out = tmp_path / "report"
    assert main(["--checkpoint", str(_ckpt(run_dir)), "--benchmarks", "voc20b", "--shard-dir",
                 f"voc20b={_write_voc20b_shards(tmp_path / 'shards')}", "--out", str(out), "--no-progress"]) == 0
    assert len(prompts) == 2 and all(p == load_vocab("voc20b") for p in prompts) and len(prompts[0]) == 59
    assert np.load(out / "voc20b_confusion.npy").dtype == np.int64


def test_two_processes_give_the_same_counts_as_one(synthetic_root, run_dir, tmp_path):
    args = ["--checkpoint", str(_ckpt(run_dir)), "--benchmarks", "synthetic", "--shards", str(synthetic_root)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: the same rounding, so the same labels to the pixel
    try:
        assert main(args + ["--out", str(tmp_path / "one"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "evaluation.evaluate"]
    proc = subprocess.run(launch + args + ["--out", str(tmp_path / "two"), "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and two["images"] == one["images"] == 6
    np.testing.assert_array_equal(
        np.load(tmp_path / "two" / "synthetic_confusion.npy"), np.load(tmp_path / "one" / "synthetic_confusion.npy")
    )
    assert two["benchmarks"]["synthetic"]["miou"] == one["benchmarks"]["synthetic"]["miou"]


def test_checkpoint_may_be_a_weights_file(run_dir, tmp_path):
    inside = resolve_checkpoint(_ckpt(run_dir) / "model.safetensors")
    assert (inside.preset, inside.step, inside.name) == ("catseg_tiny", 5, checkpoint_name(5))
    loose = tmp_path / "exported.safetensors"
    loose.write_bytes((_ckpt(run_dir) / "model.safetensors").read_bytes())
    info = resolve_checkpoint(loose)
    assert (info.preset, info.step, info.name) == ("catseg_tiny", None, "exported")


def test_bad_input_is_reported_clearly(synthetic_root, run_dir, tmp_path, capsys):
    ckpt = str(_ckpt(run_dir))
    assert main(["--checkpoint", ckpt, "--benchmarks", "ade-847", "--shards", str(synthetic_root)]) == 2
    assert "unknown benchmark 'ade-847'; choose one of: ade847" in capsys.readouterr().err

    # Synthetic shards given as A-150's: refused by their class list, not scored.
    wrong = f"ade150={synthetic_root / 'synthetic' / 'val'}"
    assert main(["--checkpoint", ckpt, "--benchmarks", "ade150", "--shard-dir", wrong, "--out", str(tmp_path)]) == 2
    assert "class_list 'synthetic' but benchmark 'ade150' expects 'ade150'" in capsys.readouterr().err

    assert main(["--checkpoint", ckpt, "--benchmarks", "pc59", "--shards", str(tmp_path / "none")]) == 2
    assert "no shard folder" in capsys.readouterr().err

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01 not a safetensors file")
    assert main(["--checkpoint", str(broken), "--benchmarks", "synthetic", "--shards", str(synthetic_root)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err

    # the default report folder ./eval/step_00000005 holds another run's step 5: refused, nothing overwritten
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        other = tmp_path / "eval" / checkpoint_name(5) / "report.json"
        other.parent.mkdir(parents=True)
        foreign = {"weights": "/elsewhere/run/checkpoints/step_00000005/model.safetensors"}
        other.write_text(json.dumps(foreign))
        assert main(["--checkpoint", ckpt, "--benchmarks", "synthetic", "--shards", str(synthetic_root)]) == 2
        assert f"holds the report of checkpoint weights {foreign['weights']}" in capsys.readouterr().err
        assert json.loads(other.read_text()) == foreign
        # this checkpoint's own report, given as its folder or its weights file, is replaced
        other.write_text(json.dumps({"weights": str((_ckpt(run_dir) / "model.safetensors").resolve())}))
        common = ["--benchmarks", "synthetic", "--shards", str(synthetic_root), "--limit", "1", "--cpu"]
        assert main(["--checkpoint", str(_ckpt(run_dir) / "model.safetensors"), *common]) == 0
        assert main(["--checkpoint", ckpt, *common]) == 0
        capsys.readouterr()

    with pytest.raises(ValueError, match="EvalConfig.limit must be a positive integer"):
        EvalConfig(checkpoint=ckpt, benchmarks="synthetic", shards=synthetic_root, limit=0)
    with pytest.raises(ValueError, match="EvalConfig.rule must be one of: present, absent_as_zero"):
        EvalConfig(checkpoint=ckpt, benchmarks="synthetic", shards=synthetic_root, rule="mmseg")
    with pytest.raises(ValueError, match="EvalConfig.precision must be one of: fp32, bf16; got 'fp16'"):
        EvalConfig(checkpoint=ckpt, benchmarks="synthetic", shards=synthetic_root, precision="fp16")


def test_coco_stuff_val_converted_by_data_prep_is_found_by_name(run_dir, tmp_path):
    from data_prep.convert import main as convert
    from data_prep.fake_raw import write_coco_stuff_tree

    raw = write_coco_stuff_tree(tmp_path / "raw", 1, width=80, height=64, folder="val2017")
    shards = tmp_path / "shards"
    assert convert(["coco_stuff", "--root", str(raw), "--out", str(shards), "--split", "val", "--workers", "0",
                    "--no-progress"]) == 0
    out = tmp_path / "report"
    args = ["--checkpoint", str(_ckpt(run_dir)), "--benchmarks", "coco", "--shards", str(shards)]
    assert main(args + ["--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "report.json").read_text())["benchmarks"]["coco"]
    assert result["images"] == 1 and len(result["per_class"]) == 171
    assert result["shards"] == str(shards / "coco_stuff" / "val")
    conf = np.load(out / "coco_confusion.npy")
    assert conf.sum() == _valid_pixels(shards / "coco_stuff" / "val", 1) > 0


def test_samples_are_decoded_ahead_in_threads_in_order():
    """The evaluation decodes the next samples in threads while the model runs (evaluate.decoded_ahead): they come
    back in order, each with its own decoding; a decode error comes out with its sample, a read error where it
    happens; closing early stops the threads."""
    import tarfile
    import threading
    from contextlib import closing

    from evaluation.evaluate import decoded_ahead

    def decode(raw):
        if raw == 5:
            raise ValueError("sample 5 is damaged")
        return raw * 10, threading.current_thread().name

    got = []
    with closing(decoded_ahead(((i, i) for i in range(9)), decode, ahead=3, threads=2)) as samples:
        for index, raw, decoded in samples:
            if index == 5:
                with pytest.raises(ValueError, match="sample 5 is damaged"):
                    decoded.result()
                continue
            value, thread = decoded.result()
            got.append((index, raw, value))
            assert thread.startswith("catseg-decode")
    assert got == [(i, i, 10 * i) for i in range(9) if i != 5]

    def cut_after_two():
        yield from ((i, i) for i in range(2))
        raise tarfile.ReadError("unexpected end of data")

    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        list(decoded_ahead(cut_after_two(), decode))

    samples = decoded_ahead(((i, i) for i in range(100)), decode, ahead=4)
    assert next(samples)[2].result()[0] == 0
    samples.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("catseg-decode")]
