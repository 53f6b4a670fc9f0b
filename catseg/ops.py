"""Small fast building blocks: bilinear resizing as two matrix products, norms that keep bf16 under autocast, and a
one-hot binary cross-entropy that never builds the one-hot target.

Why: on a GPU, `F.interpolate(..., mode="bilinear")` on NCHW tensors with many planes (classes x channels) and small
images runs one thread per output pixel looping over every plane, which made it the largest single cost of the model
(40% of a patch inference, 37% of a training step on an H200). Bilinear resizing (align_corners=False, no
antialias) is separable and linear, so it is exactly `R_h @ x @ R_w^T` with two small interpolation matrices: the
same arithmetic as a matrix product at full speed. Autocast runs LayerNorm and GroupNorm in float32, which turns each
bf16 activation into a float32 copy and back; the norms below compute in float32 internally (as the kernels always
do) but read and write the input's dtype.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn


_TENSOR_CACHES: list = []

PART_RANGES = False  # set while `python -m catseg.bench --profile` profiles an inference: see `part`


def part(name: str):
    """A profiler range "catseg.<name>" around one part of the model while PART_RANGES is set (the bench's inference
    profile then reports the device time of each part); otherwise nothing."""
    return torch.profiler.record_function(f"catseg.{name}") if PART_RANGES else contextlib.nullcontext()



def tensor_cache(maxsize: int):
    """functools.lru_cache for functions that build constant tensors, registered so that `clear_tensor_caches` can
    empty them all (a fake-tensor run must neither reuse real cached tensors nor leave fake ones behind). Under
    torch.compile the function is traced directly: its tensors become constants of the compiled graph."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _TENSOR_CACHES.append(cached)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)
        return call
    return wrap


def clear_tensor_caches() -> None:
    for cached in _TENSOR_CACHES:
        cached.cache_clear()


@tensor_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(out_size, in_size) matrix R with R @ v == 1-D bilinear resize of v (align_corners=False, PyTorch's rule)."""
    # Built on `device`: under torch.compile this runs inside the compiled graph, where a host-built matrix would
    # be copied to the GPU on every call (a copy that also makes CUDA-graph capture fail).
    scale = in_size / out_size
    rows = torch.arange(out_size, device=device)
    src = ((rows.double() + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0
    m = torch.zeros(out_size, in_size, dtype=torch.float64, device=device)
    m.index_put_((rows, i0), 1 - lam, accumulate=True)
    m.index_put_((rows, i1), lam, accumulate=True)
    return m.to(dtype)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two dims of x (any leading dims) to `size`, align_corners=False, no antialias.

    Equals `F.interpolate(x, size, mode="bilinear", align_corners=False)` up to rounding; computed in x's dtype
    (autocast is not applied), as two matrix products, the smaller intermediate first.
    """
    h, w = x.shape[-2:]
    ho, wo = size
    if (h, w) == (ho, wo):
        return x
    with torch.autocast(x.device.type, enabled=False):
        rh = bilinear_matrix(ho, h, x.device, x.dtype)
        rw = bilinear_matrix(wo, w, x.device, x.dtype)
        if ho * w <= h * wo:  # rows first when that leaves the smaller intermediate
            return torch.matmul(rh, x) @ rw.t()
        return torch.matmul(rh, x @ rw.t())


class _KeepsDtype:
    """For a norm module: under autocast, read and write the input's dtype (statistics still in float32) instead of
    autocast's float32 copy in and out; the plain module otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return self._norm(x, weight, bias)


class LayerNorm(_KeepsDtype, nn.LayerNorm):
    """nn.LayerNorm that returns the input's dtype under autocast."""

    def _norm(self, x, weight, bias):
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class GroupNorm(_KeepsDtype, nn.GroupNorm):
    """nn.GroupNorm that returns the input's dtype under autocast."""

    def _norm(self, x, weight, bias):
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def one_hot_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per pixel, the sum over classes of BCE-with-logits against the one-hot target of `labels` (all-zero target
    where `valid` is False): logits (B, N, H, W) float, labels (B, H, W) int, valid (B, H, W) bool -> (B, H, W).

    Uses BCE(x, t) = softplus(x) - x * t, so with a one-hot t the per-pixel sum is sum_n softplus(x_n) minus the
    logit of the labelled class: no (B, N, H, W) target, loss or sigmoid tensor is built, and backward keeps only
    the logits (F.binary_cross_entropy_with_logits on a float one-hot target keeps four such tensors).
    """
    picked = logits.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    return F.softplus(logits).sum(dim=1) - picked * valid
