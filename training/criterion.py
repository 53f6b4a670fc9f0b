"""The training loss: per-pixel binary cross-entropy between upsampled class logits and one-hot labels."""

from __future__ import annotations

import torch

from catseg.ops import one_hot_bce_with_logits, resize


class PixelBCECriterion:
    """Per-pixel, per-class binary cross-entropy with logits against one-hot targets.

    Logits (B, N, h, w) are upsampled bilinearly to the label size (B, H, W). With ``mask_ignore`` the pixels
    labelled ``ignore_index`` carry no loss and each image weighs the same; without it they get an all-zero target,
    as in the reference release.
    """

    def __init__(self, ignore_index: int = 255, mask_ignore: bool = True):
        self.ignore_index = ignore_index
        self.mask_ignore = mask_ignore

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the mean loss (a scalar in float32)."""
        num_classes = logits.shape[1]
        logits = resize(logits.float(), tuple(labels.shape[-2:]))
        valid = labels != self.ignore_index
        per_pixel = one_hot_bce_with_logits(logits, labels, valid)  # summed over classes
        if not self.mask_ignore:
            return per_pixel.sum() / logits.numel()
        # Each image's mean over its labelled pixels (an image with much padding does not weigh less), then the mean
        # over images: as the reference's one image per GPU averaged over GPUs, and the same loss however a global
        # batch is split over processes and accumulation steps.
        dims = tuple(range(1, per_pixel.ndim))
        return ((per_pixel * valid).sum(dims) / (valid.sum(dims) * num_classes).clamp(min=1)).mean()
