"""Semantic segmentation metrics from int64 confusion matrices.

A confusion matrix is accumulated per image (rows = ground truth, columns = prediction), summed over images and
over processes, and summarised once at the end. Summing integer counts keeps the result exact and independent of
how the images were split across processes.

Two rules exist for a class that is predicted but absent from the ground truth:

- ``"present"`` (default): the class is left out of the mean. This is the current detectron2 ``SemSegEvaluator``
  rule and the one behind the published CAT-Seg numbers.
- ``"absent_as_zero"``: the class counts with IoU 0. This is the rule of detectron2 <= 0.6 and mmsegmentation.

Every summary names the rule it used.
"""

from __future__ import annotations

import numpy as np

RULES = {
    "present": "mean over classes present in the ground truth (current detectron2)",
    "absent_as_zero": "a class predicted but absent from the ground truth counts as IoU 0 "
    "(detectron2 <= 0.6, mmsegmentation)",
}
DEFAULT_RULE = "present"


def _as_int_array(x, what: str) -> np.ndarray:
    """Return ``x`` (numpy array or torch tensor) as an integer numpy array."""
    if hasattr(x, "detach"):  # torch tensor; avoid importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must hold integer labels, got dtype {arr.dtype}")
    return arr


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """Count (ground truth, prediction) pairs into a num_classes x num_classes int64 matrix.

    ``pred`` and ``gt`` are integer arrays (numpy or torch) of the same shape. Pixels whose ground truth equals
    ``ignore_index`` are dropped. Any other ground-truth value outside [0, num_classes), or any prediction outside
    [0, num_classes) on a counted pixel, raises ValueError: a silent miscount would corrupt the metric.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class id in [0, {num_classes}); use a value outside it")
    pred = _as_int_array(pred, "pred")
    gt = _as_int_array(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    gt = gt.reshape(-1).astype(np.int64, copy=False)

    if ignore_index is not None:
        keep = gt != ignore_index
        pred, gt = pred[keep], gt[keep]
    bad_gt = (gt < 0) | (gt >= num_classes)
    if bad_gt.any():
        values = np.unique(gt[bad_gt])[:10].tolist()
        raise ValueError(
            f"ground truth holds label values {values} outside [0, {num_classes}) that are not the ignore value "
            f"{ignore_index}; check the benchmark's num_classes and ignore_index"
        )
    bad_pred = (pred < 0) | (pred >= num_classes)
    if bad_pred.any():
        values = np.unique(pred[bad_pred])[:10].tolist()
        raise ValueError(f"prediction holds class ids {values} outside [0, {num_classes})")

    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.astype(np.int64, copy=False).reshape(num_classes, num_classes)


def reduce_confusion(conf: np.ndarray) -> np.ndarray:
    """Sum a confusion matrix over all processes of an initialised torch.distributed group (no-op otherwise)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return conf
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.as_tensor(np.ascontiguousarray(conf, dtype=np.int64), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def summarize(conf, rule: str = DEFAULT_RULE) -> dict:
    """Summarise a confusion matrix (rows = ground truth) into IoU and accuracy figures, as fractions in [0, 1].

    Returns a dict with ``miou``, ``per_class_iou`` (list, NaN for a class left out under ``rule``),
    ``macc``, ``per_class_acc`` (NaN for a class absent from the ground truth), ``pacc``, ``fwiou``, ``rule``,
    ``rule_description``, ``num_classes`` and ``num_counted`` (classes in the mean). Figures over no pixels are NaN.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    if not np.issubdtype(conf.dtype, np.integer):
        raise TypeError(f"confusion matrix must hold integer counts, got dtype {conf.dtype}")
    conf = conf.astype(np.int64, copy=False)
    n = conf.shape[0]

    tp = np.diag(conf).astype(np.float64)
    gt_count = conf.sum(axis=1).astype(np.float64)
    pred_count = conf.sum(axis=0).astype(np.float64)
    union = gt_count + pred_count - tp
    in_gt = gt_count > 0
    if rule == "present":
        counted = in_gt
    else:
        counted = union > 0

    iou = np.full(n, np.nan)
    iou[counted] = tp[counted] / union[counted]
    acc = np.full(n, np.nan)
    acc[in_gt] = tp[in_gt] / gt_count[in_gt]
    total = gt_count.sum()

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    return {
        "miou": mean(iou[counted]),
        "per_class_iou": iou.tolist(),
        "macc": mean(acc[in_gt]),
        "per_class_acc": acc.tolist(),
        "pacc": float(tp.sum() / total) if total > 0 else float("nan"),
        # Frequency weights are zero for classes absent from the ground truth, so both rules agree here.
        "fwiou": float((iou[in_gt] * gt_count[in_gt]).sum() / total) if total > 0 else float("nan"),
        "rule": rule,
        "rule_description": RULES[rule],
        "num_classes": n,
        "num_counted": int(counted.sum()),
    }
