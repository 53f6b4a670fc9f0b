"""Metric tests against hand-computed confusion matrices."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation.metrics import confusion_matrix, reduce_confusion, summarize


def test_confusion_matrix_rows_are_ground_truth():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])
    conf = confusion_matrix(pred, gt, num_classes=3, ignore_index=255)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, [[2, 0, 0], [0, 1, 1], [0, 0, 0]])


def test_predicted_but_absent_class_under_both_rules():
    conf = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]), 3, 255)
    default = summarize(conf)
    assert default["rule"] == "present"
    assert default["miou"] == pytest.approx(0.75)
    assert default["per_class_iou"][:2] == [1.0, 0.5]
    assert math.isnan(default["per_class_iou"][2])
    assert default["num_counted"] == 2

    old = summarize(conf, rule="absent_as_zero")
    assert old["rule"] == "absent_as_zero"
    assert old["miou"] == pytest.approx(0.5)
    assert old["per_class_iou"] == [1.0, 0.5, 0.0]

    # Same pixels, same pixel accuracy (3 of 4), mean accuracy over gt classes (1 and 1/2), fwIoU (2*1 + 2*0.5)/4.
    for s in (default, old):
        assert s["pacc"] == pytest.approx(0.75)
        assert s["macc"] == pytest.approx(0.75)
        assert s["fwiou"] == pytest.approx(0.75)


def test_class_neither_in_gt_nor_predicted_is_left_out_under_both_rules():
    conf = confusion_matrix(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 4, 255)
    # class 0: tp 1, union 2 -> 0.5; class 1: tp 2, union 3 -> 2/3; classes 2, 3 never occur.
    for rule in ("present", "absent_as_zero"):
        s = summarize(conf, rule=rule)
        assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
        assert s["num_counted"] == 2


def test_ignore_pixels_never_count():
    gt = np.array([[0, 255, 1], [255, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [0, 0, 1]], dtype=np.int64)
    conf = confusion_matrix(pred, gt, num_classes=2, ignore_index=255)
    np.testing.assert_array_equal(conf, [[1, 0], [1, 2]])
    assert conf.sum() == 4
    s = summarize(conf)
    # class 0: tp 1, gt 1, pred 2 -> 1/2; class 1: tp 2, gt 3, pred 2 -> 2/3.
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["pacc"] == pytest.approx(3 / 4)


def test_sixteen_bit_ignore_and_torch_inputs():
    gt = torch.tensor([[65535, 3], [2, 65535]], dtype=torch.int32)
    pred = torch.tensor([[7, 3], [1, 9]])
    conf = confusion_matrix(pred, gt, num_classes=847, ignore_index=65535)
    assert conf.shape == (847, 847) and conf.sum() == 2
    assert conf[3, 3] == 1 and conf[2, 1] == 1


def test_847_classes_match_a_direct_count():
    rng = np.random.default_rng(0)
    n = 847
    gt = rng.integers(0, n, size=(300, 200))
    gt[rng.random(gt.shape) < 0.1] = 65535
    pred = np.where(rng.random(gt.shape) < 0.5, gt, rng.integers(0, n, size=gt.shape))
    pred[gt == 65535] = rng.integers(0, n, size=int((gt == 65535).sum()))
    conf = confusion_matrix(pred, gt, n, 65535)

    valid = gt != 65535
    g, p = gt[valid], pred[valid]
    ious = []
    for c in range(n):
        if not (g == c).any():
            continue
        inter = np.sum((g == c) & (p == c))
        union = np.sum((g == c) | (p == c))
        ious.append(inter / union)
    s = summarize(conf)
    assert s["num_classes"] == n
    assert s["miou"] == pytest.approx(float(np.mean(ious)), rel=1e-12)
    assert s["pacc"] == pytest.approx(float(np.mean(g == p)), rel=1e-12)


def test_labels_out_of_range_are_errors():
    with pytest.raises(ValueError, match=r"ground truth holds label values \[3\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3, 255)
    with pytest.raises(ValueError, match=r"ground truth holds label values \[-1\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, -1]), 3, 255)
    with pytest.raises(ValueError, match=r"prediction holds class ids \[5\]"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3, 255)
    # A prediction on an ignored pixel is dropped with the pixel, whatever its value.
    assert confusion_matrix(np.array([0, 5]), np.array([0, 255]), 3, 255).sum() == 1
    with pytest.raises(ValueError, match="ignore_index 1 is a class id"):
        confusion_matrix(np.array([0]), np.array([0]), 3, 1)
    with pytest.raises(TypeError, match="integer labels"):
        confusion_matrix(np.array([0.0]), np.array([0]), 3, 255)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3, 255)


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="unknown rule 'mmseg'; choose one of: present, absent_as_zero"):
        summarize(np.zeros((2, 2), dtype=np.int64), rule="mmseg")


def test_empty_matrix_gives_nan_not_an_error():
    s = summarize(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(s["miou"]) and math.isnan(s["pacc"]) and s["num_counted"] == 0


def _images(seed: int, count: int, n: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = rng.integers(5, 40, size=2)
        gt = rng.integers(0, n, size=(h, w))
        gt[rng.random((h, w)) < 0.2] = 255
        pred = rng.integers(0, n, size=(h, w))
        out.append((pred, gt))
    return out


def _worker(rank: int, world: int, port: int, n: int, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        conf = np.zeros((n, n), dtype=np.int64)
        for i, (pred, gt) in enumerate(_images(1, 12, n)):
            if i % world == rank:
                conf += confusion_matrix(pred, gt, n, 255)
        conf = reduce_confusion(conf)
        if rank == 0:
            np.save(out_path, conf)
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_with_one(tmp_path):
    n = 7
    single = np.zeros((n, n), dtype=np.int64)
    for pred, gt in _images(1, 12, n):
        single += confusion_matrix(pred, gt, n, 255)
    assert reduce_confusion(single) is single  # no process group: nothing to sum

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "conf.npy"
    mp.spawn(_worker, args=(2, port, n, str(out)), nprocs=2, join=True)
    summed = np.load(out)
    assert summed.dtype == np.int64
    np.testing.assert_array_equal(summed, single)
    assert summarize(summed) == summarize(single)


def test_renaming_classes_permutes_per_class_iou_and_keeps_the_mean():
    rng = np.random.default_rng(4)
    n = 12
    gt = rng.integers(0, n - 2, size=(50, 60))  # the last two classes never occur in the ground truth
    pred = rng.integers(0, n, size=gt.shape)
    perm = rng.permutation(n)
    base = summarize(confusion_matrix(pred, gt, n, 255))
    renamed = summarize(confusion_matrix(perm[pred], perm[gt], n, 255))
    np.testing.assert_allclose(np.array(renamed["per_class_iou"])[perm], base["per_class_iou"])
    for key in ("miou", "macc", "pacc", "fwiou"):
        assert renamed[key] == pytest.approx(base[key])
