"""The evaluation package's parts one by one: the metrics' rules and refusals, benchmark definitions, shard checks,
the report's fields and checkpoint reading (real shards and models, no mocks)."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import catseg
from data_prep import shards as shard_format
from data_prep.synthetic import SyntheticConfig, write_synthetic
from evaluation.benchmarks import Benchmark, get_benchmark
from evaluation.evaluate import EvalConfig, benchmark_result, evaluate_benchmark, resolve_checkpoint
from evaluation.metrics import confusion_matrix, summarize


# ---------------------------------------------------------------------------------------------------------------
# evaluation/metrics.py


def test_class_in_ground_truth_never_predicted_counts_as_zero():
    """A class with ground-truth pixels that the model never gets right has IoU 0 and stays in the mean (under both
    rules): leaving it out would reward a model for missing whole classes."""
    conf = confusion_matrix(np.array([0, 0, 0, 0]), np.array([0, 0, 1, 1]), 2, 255)
    for rule in ("present", "absent_as_zero"):
        s = summarize(conf, rule=rule)
        # class 0: tp 2, union 4 -> 0.5; class 1: tp 0, union 2 -> 0.
        assert s["per_class_iou"] == [0.5, 0.0]
        assert s["miou"] == pytest.approx(0.25)
        assert s["num_counted"] == 2
        assert s["per_class_acc"] == [1.0, 0.0] and s["macc"] == pytest.approx(0.5)


def test_num_counted_names_the_classes_in_the_mean_under_each_rule():
    """The README's example (gt [0, 0, 1, 1], prediction [0, 0, 1, 2], three classes): the predicted-but-absent class
    is out of the mean under `present` (2 classes counted) and in it under `absent_as_zero` (3 counted)."""
    conf = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]), 3, 255)
    assert summarize(conf, rule="present")["num_counted"] == 2
    old = summarize(conf, rule="absent_as_zero")
    assert old["num_counted"] == 3
    assert old["miou"] == pytest.approx(sum(v for v in old["per_class_iou"]) / old["num_counted"])


def test_prediction_ids_just_outside_the_class_range_are_errors():
    """A prediction id equal to num_classes (an unmapped PAS-20b prompt id 21 on 21 classes, say) or below 0 is an
    error, not a silent count in the next or previous ground-truth row of the matrix."""
    with pytest.raises(ValueError, match=r"prediction holds class ids \[3\] outside \[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3, 255)
    with pytest.raises(ValueError, match=r"prediction holds class ids \[-1\] outside \[0, 3\)"):
        confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3, 255)
    # PAS-20b without its background mapping: prompt ids 20..58 on 21 scored classes
    with pytest.raises(ValueError, match=r"prediction holds class ids \[21\]"):
        confusion_matrix(np.array([[0, 21]]), np.array([[0, 20]]), 21, 255)


def test_ground_truth_above_the_ignore_value_is_an_error():
    """Only the ignore value itself is dropped: a 16-bit label (300) in ground truth scored with ignore 255 is
    reported (shards of another benchmark, or num_classes too small), never silently dropped with the ignore pixels."""
    with pytest.raises(ValueError, match=r"ground truth holds label values \[300\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 300]), 3, 255)
    with pytest.raises(ValueError, match=r"ground truth holds label values \[65535\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 65535], dtype=np.uint16), 59, 255)


def test_ignore_index_must_lie_outside_the_class_ids_and_may_sit_just_past_them():
    """The ignore value is refused when it is a class id, 0 included (all of class 0 would go unscored), and accepted
    at num_classes, the first id past the classes."""
    with pytest.raises(ValueError, match=r"ignore_index 0 is a class id in \[0, 3\)"):
        confusion_matrix(np.array([0, 1]), np.array([0, 1]), 3, 0)
    conf = confusion_matrix(np.array([0, 1, 2, 1]), np.array([0, 1, 3, 3]), 3, 3)
    np.testing.assert_array_equal(conf, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_prediction_and_ground_truth_must_have_the_same_shape_not_just_the_same_size():
    """A transposed (W x H) prediction against an H x W label holds as many pixels but is refused, since pixel i of
    one is not pixel i of the other."""
    gt = np.array([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match=r"pred shape \(3, 2\) differs from gt shape \(2, 3\)"):
        confusion_matrix(gt.T.copy(), gt, 3, 255)


def test_summarize_refuses_a_matrix_that_is_not_square_integer_counts():
    """A confusion matrix loaded back (np.load of <benchmark>_confusion.npy) must be square integer counts: a
    non-square or floating matrix (averaged, or normalised) is refused rather than summarised into wrong figures."""
    with pytest.raises(ValueError, match=r"confusion matrix must be square, got shape \(2, 3\)"):
        summarize(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="confusion matrix must hold integer counts, got dtype float64"):
        summarize(np.eye(3) * 0.5)


# ---------------------------------------------------------------------------------------------------------------
# evaluation/benchmarks.py


def _dataset_json(folder, names, ignore_index=255):
    """A shard folder holding only dataset.json (what Benchmark.prompt_names reads), no shards."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({
        "name": "custom", "split": "val", "class_names": names, "num_classes": len(names),
        "ignore_index": ignore_index, "num_samples": 0, "label_dtype": "uint8"}))
    return folder


def test_benchmark_definitions_are_checked(tmp_path):
    """A Benchmark refuses a name that cannot be a metric key, a negative ignore value and a background id below 1;
    a background benchmark needs more prompt names than its background id, and a class list read from shards must
    not be empty."""
    with pytest.raises(ValueError, match=r"Benchmark.name must be letters, digits, '_' or '-'.*'a/b'"):
        Benchmark("a/b", "A", "a", ignore_index=255, vocab=None)
    with pytest.raises(ValueError, match="Benchmark.ignore_index must be >= 0, got -1"):
        Benchmark("a", "A", "a", ignore_index=-1, vocab=None)
    with pytest.raises(ValueError, match="Benchmark.background_index must be None or >= 1, got 0"):
        Benchmark("a", "A", "a", ignore_index=255, vocab=None, background_index=0)

    bg = Benchmark("custom_b", "Custom-b", "custom", ignore_index=255, vocab=None, background_index=3)
    three = _dataset_json(tmp_path / "three", ["sky", "grass", "road"])
    with pytest.raises(ValueError, match=r"maps predictions >= 3 to background but prompts with only 3 names"):
        bg.class_names(three)
    four = _dataset_json(tmp_path / "four", ["sky", "grass", "road", "tree"])
    assert bg.class_names(four) == ["sky", "grass", "road", "background"]

    empty = _dataset_json(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="dataset.json lists no class_names for benchmark 'custom_b'"):
        bg.prompt_names(empty)


# ---------------------------------------------------------------------------------------------------------------
# evaluation/evaluate.py


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root, SyntheticConfig(num_train=0, num_val=2, size=32, seed=3, shard_size=4))
    return root / "synthetic" / "val"


def _copy_with_info(src, dst, **changes):
    """A copy of a shard folder whose dataset.json has `changes` applied."""
    shutil.copytree(src, dst)
    info = json.loads((dst / "dataset.json").read_text())
    info.update(changes)
    (dst / "dataset.json").write_text(json.dumps(info))
    return dst


def test_shards_with_another_ignore_value_are_refused(synthetic_val, tmp_path):
    """The synthetic benchmark has no class list to compare, so its ignore value is what tells other shards apart:
    a folder whose dataset.json says 65535 (A-847's convention) is refused before any model is built, naming both
    values."""
    wrong = _copy_with_info(synthetic_val, tmp_path / "wide", ignore_index=65535)
    cfg = EvalConfig(checkpoint=tmp_path / "unused.safetensors", benchmarks="synthetic",
                     shard_dirs={"synthetic": wrong})
    with pytest.raises(ValueError, match="ignore_index 65535 but benchmark 'synthetic' expects 255"):
        cfg.check_all_shards()


def test_shard_dir_for_a_benchmark_not_evaluated_is_refused(synthetic_val, tmp_path):
    """--shard-dir naming a benchmark that is not among --benchmarks (a typo, or a forgotten benchmark) is refused,
    naming it, instead of being silently ignored."""
    with pytest.raises(ValueError, match="EvalConfig.shard_dirs names benchmark 'ade150', which is not among"):
        EvalConfig(checkpoint=tmp_path / "unused.safetensors", benchmarks="synthetic",
                   shard_dirs={"synthetic": synthetic_val, "ade150": synthetic_val})


def test_a_sixteen_bit_ignore_value_is_dropped_during_evaluation(tiny_model, tmp_path):
    """A benchmark whose labels are stored as uint16 with ignore 65535 (the A-847 and PC-459 convention) is scored
    with its own ignore value: every other pixel counted once, against the model's own predictions."""
    from catseg.inference import predict_labels, to_image_tensor

    names = ["sky", "grass", "road", "person"]
    bench = Benchmark("wide", "Wide", "wide", ignore_index=65535, vocab=None)
    rng = np.random.default_rng(5)
    out = tmp_path / "wide" / "val"
    out.mkdir(parents=True)
    samples, expected_pixels, images = [], 0, []
    for i in range(2):
        label = rng.integers(0, len(names), size=(24, 32)).astype(np.uint16)
        label[:5] = 65535
        expected_pixels += int((label != 65535).sum())
        pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        images.append((pixels, label))
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        samples.append(shard_format.build_sample(
            shard_format.make_key("wide", "val", f"{i:04d}"), buf.getvalue(), "png", label,
            label_dtype="uint16", ignore_index=65535, class_list="wide", source={"test": i}))
    record = shard_format.write_shard(out / shard_format.shard_name("wide", "val", 0), 0, samples)
    shard_format.finalize_folder(out, {"name": "wide", "split": "val", "class_list": "wide", "class_names": names,
                                       "num_classes": len(names), "ignore_index": 65535, "label_dtype": "uint16"},
                                 [record])

    conf, count = evaluate_benchmark(tiny_model, bench, out)
    assert count == 2 and conf.shape == (4, 4) and conf.dtype == np.int64
    assert conf.sum() == expected_pixels
    own = np.zeros((4, 4), np.int64)
    for pixels, label in images:
        labels, _ = predict_labels(tiny_model, to_image_tensor(pixels).unsqueeze(0), names)
        own += confusion_matrix(labels[0].numpy(), label, 4, 65535)
    np.testing.assert_array_equal(conf, own)


def test_report_gives_null_not_zero_for_a_class_left_out_of_the_mean():
    """In the report a class absent from the ground truth (left out under `present`) has iou and acc null, so it is
    not read as a class scored 0; a class in the ground truth but never predicted has iou 0.0."""
    bench = get_benchmark("voc20")
    conf = np.zeros((20, 20), dtype=np.int64)
    conf[0, 0], conf[1, 0], conf[2, 3] = 5, 3, 2  # classes 0, 1, 2 in the ground truth; 3 predicted, not in it
    result = benchmark_result(bench, bench.class_names(), conf, "present")
    rows = result["per_class"]
    assert rows[1]["iou"] == 0.0 and rows[2]["iou"] == 0.0
    assert rows[3]["iou"] is None and rows[3]["acc"] is None and rows[3]["pred_pixels"] == 2
    assert rows[19]["iou"] is None and rows[19]["gt_pixels"] == 0
    assert result["num_counted"] == 3 and result["miou"] == pytest.approx((5 / 8 + 0 + 0) / 3)
    json.dumps(result, allow_nan=False)  # strict JSON


def test_report_counts_the_samples_skipped_in_conversion(synthetic_val, tmp_path):
    """`skipped_in_conversion` in the report is the dataset.json's num_skipped (samples data_prep --skip-bad left
    out), so a score over fewer images than the benchmark has says so."""
    from evaluation.evaluate import main

    folder = _copy_with_info(synthetic_val, tmp_path / "skipped", num_skipped=3)
    ckpt = tmp_path / "model.safetensors"
    catseg.save_weights(catseg.create_model("catseg_tiny"), ckpt)
    out = tmp_path / "report"
    assert main(["--checkpoint", str(ckpt), "--benchmarks", "synthetic", "--shard-dir", f"synthetic={folder}",
                 "--limit", "1", "--out", str(out), "--no-progress", "--cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["benchmarks"]["synthetic"]["skipped_in_conversion"] == 3


def test_checkpoint_step_and_preset_come_from_its_meta(tmp_path):
    """A checkpoint folder not named step_N takes its step from meta.json; weights saved for one preset but described
    as another by meta.json are refused before any model is built."""
    folder = tmp_path / "final"
    folder.mkdir()
    catseg.save_weights(catseg.create_model("catseg_tiny"), folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"step": 80000, "preset": "catseg_tiny"}))
    info = resolve_checkpoint(folder)
    assert (info.preset, info.step, info.name) == ("catseg_tiny", 80000, "final")

    (folder / "meta.json").write_text(json.dumps({"step": 80000, "preset": "catseg_vitb"}))
    with pytest.raises(ValueError, match="weights are for preset 'catseg_tiny' but meta.json says 'catseg_vitb'"):
        resolve_checkpoint(folder)


def test_a_benchmark_folder_without_samples_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Shards whose dataset.json counts no samples (data_prep --skip-bad left out every one) are refused with the
    folder, the count and the command that rewrites them, exit status 2, before any model loads. Before, webdataset
    failed on the empty shard list with an IndexError traceback."""
    from evaluation import evaluate

    write_synthetic(tmp_path / "shards", SyntheticConfig(num_train=0, num_val=0, size=32, seed=3, shard_size=4))
    val = _copy_with_info(tmp_path / "shards" / "synthetic" / "val", tmp_path / "none" / "synthetic" / "val",
                          num_skipped=2)
    catseg.save_weights(catseg.create_model("catseg_tiny"), tmp_path / "model.safetensors")
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("model loaded"))
    code = evaluate.main(["--checkpoint", str(tmp_path / "model.safetensors"), "--benchmarks", "synthetic",
                          "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "report"), "--cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"{val / 'dataset.json'}: num_samples is 0" in err
    assert "data_prep skipped all 2 as unreadable" in err and "python -m data_prep.convert synthetic" in err


def test_a_short_read_under_limit_names_the_real_count_and_the_limit(synthetic_val, tmp_path):
    """Fewer images than --limit asks for (a shard cut at a member boundary) names dataset.json's own count and what
    the limit asks for; before, it said the dataset counted the limit."""


    cut = _copy_with_info(synthetic_val, tmp_path / "cut", num_samples=4)  # 2 images there, 4 counted
    with pytest.raises(ValueError, match=r"read 2 images from .* but its dataset.json counts 4, --limit 3 asks for "
                                         r"3; a shard is missing or cut short"):
        evaluate_benchmark(catseg.create_model("catseg_tiny").eval(), get_benchmark("synthetic"), cut, limit=3)



def test_limit_must_be_a_positive_integer_not_a_bool(tmp_path):
    for bad in (True, 0, 2.5):
        with pytest.raises(ValueError, match=f"EvalConfig.limit must be a positive integer or None, got {bad!r}"):
            EvalConfig(checkpoint=tmp_path / "m.safetensors", benchmarks="synthetic", shards=tmp_path, limit=bad)
