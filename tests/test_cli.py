"""`catseg segment` end to end through the installed command."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import catseg

CATSEG = shutil.which("catseg", path=str(Path(sys.executable).parent)) or "catseg"


def run(*args):
    return subprocess.run([CATSEG, "segment", *map(str, args)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    catseg.save_weights(catseg.create_model("catseg_tiny"), d / "tiny.safetensors")
    other = catseg.create_model("catseg_tiny")
    other.config.name = "catseg_vitb16_r101"
    catseg.save_weights(other, d / "other.safetensors")
    imgs = d / "images"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(imgs / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (45, 30), dtype=np.uint8)).save(imgs / "sub" / "b.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return d


def test_segment_folder_end_to_end(workspace):
    out = workspace / "out"
    r = run(workspace / "images", "--classes", "cat, dog, grass", "--checkpoint", workspace / "tiny.safetensors",
            "--out", out, "--device", "cpu")
    assert r.returncode == 1, r.stderr  # one unreadable file: reported and skipped, exit code says so
    assert "broken.jpg" in r.stderr and "segmented 2/3" in r.stdout
    for stem, size in (("a", (60, 80)), ("b", (45, 30))):
        labels = np.array(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == size and labels.max() < 3
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.size[1] >= size[0] and overlay.size[0] > size[1]  # image plus legend panel
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["class_names"] == ["cat", "dog", "grass"]
        assert abs(sum(record["areas"].values()) - 1) < 1e-6
        counts = np.bincount(labels.ravel(), minlength=3) / labels.size
        for i, name in enumerate(record["class_names"]):
            assert abs(record["areas"].get(name, 0.0) - counts[i]) < 1e-9
    assert not list(out.glob(".*"))  # no temporary files left
    # the label maps are the checkpoint's: what catseg.Segmenter predicts with its weights, not another model's
    names = ["cat", "dog", "grass"]
    own = catseg.Segmenter(catseg.create_model("catseg_tiny", pretrained=workspace / "tiny.safetensors"), device="cpu")
    torch.manual_seed(1)
    other = catseg.Segmenter(catseg.create_model("catseg_tiny"), device="cpu")
    for path, stem in ((workspace / "images" / "a.jpg", "a"), (workspace / "images" / "sub" / "b.png", "b")):
        labels = np.array(Image.open(out / f"{stem}_labels.png"))
        np.testing.assert_array_equal(labels, own.predict(path, names)[0].labels)
        assert not np.array_equal(labels, other.predict(path, names)[0].labels)


def test_segment_with_benchmark_vocab_and_16bit_labels(workspace):
    out = workspace / "out847"
    r = run(workspace / "images" / "a.jpg", "--vocab", "ade847", "--checkpoint", workspace / "tiny.safetensors",
            "--out", out, "--class-chunk", "200", "--quiet")
    assert r.returncode == 0, r.stderr
    labels = Image.open(out / "a_labels.png")
    assert labels.mode.startswith("I") and np.array(labels).max() < 847  # more than 256 classes: 16-bit PNG


def test_segment_bad_input(workspace, capsys, monkeypatch):
    from catseg.cli import main

    def call(*args):
        code = main(["segment", *map(str, args)])
        return code, capsys.readouterr().err

    img = workspace / "images" / "a.jpg"
    ck = workspace / "tiny.safetensors"
    code, err = call(img, "--classes", " , ", "--checkpoint", ck, "--out", workspace / "o1")
    assert code == 2 and "empty" in err
    code, err = call(img, "--vocab", "ade-847", "--checkpoint", ck, "--out", workspace / "o2")
    assert code == 2 and "ade-847" in err and "ade150" in err
    code, err = call(img, "--classes", "cat", "--model", "catseg_tiny", "--checkpoint",
                     workspace / "other.safetensors", "--out", workspace / "o3")
    assert code == 2 and "catseg_vitb16_r101" in err and "catseg_tiny" in err
    code, err = call(img, "--classes", "cat, cat", "--checkpoint", ck, "--out", workspace / "o4")
    assert code == 2 and "duplicate" in err
    code, err = call(img, "--classes", "cat", "--checkpoint", workspace / "nope.safetensors", "--out", workspace / "o5")
    assert code == 2 and "nope.safetensors" in err
    # an empty input or output (an unset shell variable) would mean the current folder: refused
    code, err = call("", "--classes", "cat", "--checkpoint", ck, "--out", workspace / "o7")
    assert code == 2 and "an input is empty" in err and not (workspace / "o7").exists()
    code, err = call(img, "--classes", "cat", "--checkpoint", ck, "--out", "")
    assert code == 2 and "--out is empty" in err
    # an output folder that cannot be made is named before the model loads (here its weights would fail to)
    (workspace / "o8").write_text("a file")
    code, err = call(img, "--classes", "cat", "--checkpoint", workspace / "nope.safetensors", "--out", workspace / "o8")
    assert code == 2 and "cannot write to output folder" in err and "nope" not in err
    code, err = call(img, "--classes", ", ".join(f"thing {i}" for i in range(65537)), "--checkpoint", ck, "--out",
                     workspace / "o10")  # a label map PNG holds 16-bit ids
    assert code == 2 and "65537 classes" in err and "at most 65536" in err and not (workspace / "o10").exists()
    code, err = call(img, "--classes", "cat", "--model", "catseg_vitb16_r101", "--checkpoint", ck, "--out",
                     workspace / "o9")
    assert code == 2 and "pass --model catseg_tiny or leave --model out" in err
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU without Triton's interpreter cannot run Triton kernels
    code, err = call(img, "--classes", "cat", "--checkpoint", ck, "--out", workspace / "o6", "--device", "cpu",
                     "--fused-kernels")
    assert code == 2 and "need Triton and a CUDA device" in err and not (workspace / "o6").exists()


def test_segment_names_outputs_uniquely_and_skips_its_own(workspace, capsys):
    from catseg.cli import main

    imgs = workspace / "clash"
    rng = np.random.default_rng(1)
    for rel in ("x/same.jpg", "y/same.jpg", "photo.jpg", "photo.png", "solo.png"):
        (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(imgs / rel)
    out = imgs / "seg"  # inside the input folder: a rerun must not segment its own outputs
    args = ["segment", str(imgs), str(imgs / "solo.png"), "--classes", "cat, dog", "--checkpoint",
            str(workspace / "tiny.safetensors"), "--out", str(out), "--quiet"]
    for _ in range(2):
        assert main(args) == 0
        assert "segmented 5/5 images" in capsys.readouterr().out  # solo.png, named twice, is done once
    stems = ("clash_x_same_jpg", "clash_y_same_jpg", "clash_photo_jpg", "clash_photo_png", "solo")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}{e}" for s in stems
                                                           for e in ("_labels.png", "_overlay.png", ".json"))
    for stem, image in zip(stems, ("x/same.jpg", "y/same.jpg", "photo.jpg", "photo.png", "solo.png")):
        assert json.loads((out / f"{stem}.json").read_text())["image"] == str(imgs / image)
    code = main(["segment", str(imgs / "x/same.jpg"), str(imgs / "y/same.jpg"), "--classes", "cat", "--checkpoint",
                 str(workspace / "tiny.safetensors"), "--out", str(workspace / "o-same")])
    err = capsys.readouterr().err
    assert code == 2 and "would write the same output files" in err and "x/same.jpg" in err
    # a file beside the photo that catseg did not write (an annotation JSON) is never overwritten
    (imgs / "solo.json").write_text('{"shapes": []}')
    code = main(["segment", str(imgs / "solo.png"), "--classes", "cat", "--checkpoint",
                 str(workspace / "tiny.safetensors"), "--out", str(imgs)])
    err = capsys.readouterr().err
    assert code == 2 and "would overwrite 1 file(s) catseg did not write" in err and "solo.json" in err
    assert (imgs / "solo.json").read_text() == '{"shapes": []}' and not (imgs / "solo_labels.png").exists()
    assert json.loads((out / "solo.json").read_text())["software"] == "catseg segment"


def test_segment_refuses_bad_checkpoints_chunks_and_reads_vocab_files(workspace, capsys):
    from catseg.cli import load_vocabulary, main

    img, ck = workspace / "images" / "a.jpg", workspace / "tiny.safetensors"
    torch.save({"a": 1}, workspace / "w.pt")
    (workspace / "torn.safetensors").write_bytes(ck.read_bytes()[:200])
    for checkpoint, message in (("w.pt", "no pickles"), ("torn.safetensors", "not a readable safetensors")):
        code = main(["segment", str(img), "--classes", "cat", "--checkpoint", str(workspace / checkpoint),
                     "--out", str(workspace / "o-ck")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and checkpoint in err
    for chunk in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["segment", str(img), "--classes", "cat", "--checkpoint", str(ck), "--out", str(workspace / "o"),
                  "--class-chunk", chunk])
        assert exit_info.value.code == 2 and f"{chunk!r} is not a positive integer" in capsys.readouterr().err
    from catseg.weights import write_safetensors

    (workspace / "empty-ck").mkdir()
    write_safetensors({"x": torch.zeros(1)}, workspace / "future.safetensors",
                      {"format": "catseg", "preset": "catseg_future"})
    for checkpoint, message in (("empty-ck", "holds no model.safetensors"),
                                ("future.safetensors", "names preset 'catseg_future', which this catseg does not know")):
        code = main(["segment", str(img), "--classes", "cat", "--checkpoint", str(workspace / checkpoint),
                     "--out", str(workspace / "o-ck")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and checkpoint in err and "Traceback" not in err
    code = main(["segment", str(workspace / "no-such.jpg"), "--classes", "cat", "--checkpoint", str(ck),
                 "--out", str(workspace / "o-missing")])
    assert code == 2 and "input" in (err := capsys.readouterr().err) and "no-such.jpg' does not exist" in err
    assert not (workspace / "o-missing").exists()  # refused before the model loads and the folder is made
    vocab = workspace / "vocab.txt"
    vocab.write_text("\ufeffcat\n  # a comment\nsofa, couch\n\n")
    assert load_vocabulary(str(vocab)) == ["cat", "sofa, couch"]
    (workspace / "vocab.json").write_text('["cat",\n "dog"\n')
    with pytest.raises(ValueError, match="vocab.json: not valid JSON"):
        load_vocabulary(str(workspace / "vocab.json"))
    (workspace / "vocab.json").write_text('["cat ", "dog"]')
    assert load_vocabulary(str(workspace / "vocab.json")) == ["cat", "dog"]
    (workspace / "upper.JSON").write_text('["cat", "dog"]')  # the suffix in any case
    assert load_vocabulary(str(workspace / "upper.JSON")) == ["cat", "dog"]
    (workspace / "wide.txt").write_text("cat\ndog\n", encoding="utf-16")  # Notepad's "Unicode"
    with pytest.raises(ValueError, match="wide.txt: not UTF-8 text"):
        load_vocabulary(str(workspace / "wide.txt"))
    (workspace / "one-line.txt").write_text("cat,dog,sofa\n")  # meant as three classes: every pixel would be "cat"
    with pytest.warns(UserWarning, match="holds one line, 'cat,dog,sofa': that is ONE class with synonyms"):
        assert load_vocabulary(str(workspace / "one-line.txt")) == ["cat,dog,sofa"]


def test_segment_a_folder_given_as_dot_dot_names_outputs_by_it_and_skips_hidden_files(workspace, capsys,
                                                                                        monkeypatch):
    from catseg.cli import main

    folder = workspace / "dotted"
    rng = np.random.default_rng(3)
    for rel in ("x/same.jpg", "y/same.jpg", ".cache/z.jpg"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / rel)
    (folder / "x" / "._same.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # left by a copy from a Mac
    monkeypatch.chdir(folder / "x")
    out = workspace / "o-dot"
    assert main(["segment", "..", "--classes", "cat", "--checkpoint", str(workspace / "tiny.safetensors"), "--out",
                 str(out), "--quiet"]) == 0
    assert "segmented 2/2 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.json")) == ["dotted_x_same_jpg.json", "dotted_y_same_jpg.json"]


def test_segment_into_the_input_folder_or_its_parent(workspace, capsys):
    from catseg.cli import main

    folder = workspace / "beside"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "p.png")
    common = ["--classes", "cat, dog", "--checkpoint", str(workspace / "tiny.safetensors"), "--quiet"]
    for _ in range(2):  # outputs beside the photo: the rerun takes the photo only, not its own outputs
        assert main(["segment", str(folder), *common, "--out", str(folder)]) == 0
        assert "segmented 1/1 images" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["p.json", "p.png", "p_labels.png", "p_overlay.png"]
    assert main(["segment", str(folder), *common, "--out", str(workspace)]) == 0  # the output folder holds the input
    assert "segmented 1/1 images" in capsys.readouterr().out and (workspace / "p_labels.png").is_file()
    # outputs of a version that did not mark them are still recognised as catseg's
    record = json.loads((folder / "p.json").read_text())
    del record["software"]
    (folder / "p.json").write_text(json.dumps(record))
    Image.open(folder / "p_labels.png").save(folder / "p_labels.png")  # re-saved without the text chunk
    assert main(["segment", str(folder), *common, "--out", str(folder)]) == 0
    assert "segmented 1/1 images" in capsys.readouterr().out


def test_an_image_whose_outputs_cannot_all_be_written_keeps_none(workspace, capsys, monkeypatch):
    """The disk fills while an image's three outputs are written: the ones already written are removed and the
    error names the file that could not be written."""
    import errno

    import catseg.cli as cli

    def full_disk(path, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "write_json_atomic", full_disk)
    out = workspace / "o-full"
    code = cli.main(["segment", str(workspace / "images" / "a.jpg"), "--classes", "cat, dog", "--checkpoint",
                     str(workspace / "tiny.safetensors"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write {out / 'a.json'} (No space left on device)" in err
    assert list(out.iterdir()) == []


def test_legend_draws_each_class_name_with_a_font_that_has_its_characters(tmp_path, monkeypatch):
    """Where the legend font lacks characters of a class name, the name is drawn with a system font that has them,
    found through fontconfig (here a private font folder holding one font); where no font has them, a warning names
    the class and what to install. Before, such names were drawn as boxes without a word."""
    import shutil

    from PIL import ImageFont

    from catseg import cli

    matplotlib = pytest.importorskip("matplotlib")  # ships the STIX fonts, which have characters DejaVu Sans lacks
    if shutil.which("fc-list") is None or not isinstance(cli.legend_font(), ImageFont.FreeTypeFont):
        pytest.skip("needs fontconfig and a TrueType legend font")
    fonts = tmp_path / "my fonts"  # spaces in the path, as macOS and user font folders have
    fonts.mkdir()
    shutil.copy(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "STIXGeneral.ttf",
                fonts / "STIX General.ttf")
    conf = tmp_path / "fonts.conf"
    conf.write_text(f'<?xml version="1.0"?>\n<fontconfig><dir>{fonts}</dir><cachedir>{tmp_path / "cache"}</cachedir>'
                    f'</fontconfig>\n')
    monkeypatch.setenv("FONTCONFIG_FILE", str(conf))
    caches = (cli.fonts_with, cli.legend_font_for)  # found fonts are kept per process: none from before or after
    for cached in caches:
        cached.cache_clear()
    try:
        arc, han = "arc \u2312", "\u4e2d"
        assert cli.missing_glyphs(cli.legend_font(), arc) == ["\u2312"]
        assert Path(cli.legend_font_for(arc).path) == fonts / "STIX General.ttf"
        assert cli.legend_font_for("caf\u00e9") is cli.legend_font()
        # Pillow's own font (where no TrueType font is installed) has no file: ASCII only, no error
        assert cli.missing_glyphs(ImageFont.load_default(), "caf\u00e9 cat") == ["\u00e9"]
        with pytest.warns(UserWarning, match="no installed font draws '\u4e2d' of class name '\u4e2d'.*fonts-noto-cjk"):
            assert cli.legend_font_for(han) is cli.legend_font()
        labels = np.zeros((40, 40), np.int64)
        labels[20:] = 1

        def overlay():
            return np.asarray(cli.overlay_with_legend(np.zeros((40, 40, 3), np.uint8), labels, [arc, "sky"]))

        drawn = overlay()
        monkeypatch.setattr(cli, "legend_font_for", lambda name: cli.legend_font())
        assert not np.array_equal(drawn, overlay())  # the legend was drawn with the font found, not with boxes
    finally:
        for cached in caches:
            cached.cache_clear()


def test_segment_in_batches_with_reader_and_writer_threads_writes_what_one_thread_does(workspace, capsys,
                                                                                        monkeypatch):
    """`--batch-size 2 --workers 3` (images read and written in threads while the model runs, two per model call)
    writes the same files as `--batch-size 1 --workers 0`, for images of different sizes with an unreadable one
    among them (reported, in input order, and skipped). A write that fails with threads at work stops the run naming
    the file; every image then has all its outputs or none, and no temporary file is left."""
    import errno

    import catseg.cli as cli

    folder = workspace / "many"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for k, (h, w) in enumerate([(50, 70), (64, 64), (33, 90), (80, 41), (47, 47), (70, 30), (52, 66)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    (folder / "im3.png").write_bytes(b"\x89PNG broken")
    common = ["--classes", "cat, dog, grass, sky", "--checkpoint", str(workspace / "tiny.safetensors"), "--quiet",
              "--device", "cpu"]
    outputs = {}
    for flags in (["--batch-size", "1", "--workers", "0"], ["--batch-size", "2", "--workers", "3"]):
        out = workspace / f"many-out{flags[1]}"
        assert cli.main(["segment", str(folder), *common, "--out", str(out), *flags]) == 1
        captured = capsys.readouterr()
        assert "segmented 6/7 images" in captured.out and captured.err.count("skipped") == 1
        assert f"skipped {folder / 'im3.png'}" in captured.err
        outputs[flags[1]] = {p.name: p for p in out.iterdir()}
    one, batched = outputs["1"], outputs["2"]
    assert sorted(one) == sorted(batched) and len(one) == 18 and "im3_labels.png" not in one
    for name in one:
        if name.endswith(".json"):
            assert json.loads(one[name].read_text()) == json.loads(batched[name].read_text())
        else:
            np.testing.assert_array_equal(np.array(Image.open(one[name])), np.array(Image.open(batched[name])))

    writes = []
    real = cli.write_json_atomic

    def full_disk_at_the_fourth_image(path, record):
        writes.append(path)
        if len(writes) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, record)

    monkeypatch.setattr(cli, "write_json_atomic", full_disk_at_the_fourth_image)
    out = workspace / "many-full"
    code = cli.main(["segment", str(folder), *common, "--out", str(out), "--batch-size", "2", "--workers", "3"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write {writes[3]} (No space left on device)" in err
    stems = {p.name.split("_")[0].split(".")[0] for p in out.iterdir()}
    assert writes[3].stem not in stems and 3 <= len(stems) < 6
    for stem in stems:
        assert {p.name for p in out.glob(f"{stem}[._]*")} == {f"{stem}_labels.png", f"{stem}_overlay.png",
                                                              f"{stem}.json"}
    assert not list(out.glob(".*"))


def test_segment_refuses_bad_batch_sizes_and_worker_counts(workspace, capsys):
    from catseg.cli import main

    common = [str(workspace / "images" / "a.jpg"), "--classes", "cat", "--checkpoint",
              str(workspace / "tiny.safetensors"), "--out", str(workspace / "o-bad")]
    for flag, value, says in (("--batch-size", "0", "'0' is not a positive integer"),
                              ("--workers", "-1", "'-1' is not a whole number >= 0"),
                              ("--workers", "two", "'two' is not a whole number >= 0")):
        with pytest.raises(SystemExit) as exit:
            main(["segment", *common, flag, value])
        assert exit.value.code == 2 and f"argument {flag}: {says}" in capsys.readouterr().err
    assert not (workspace / "o-bad").exists()
