"""Small fast building blocks: bilinear resizing as two matrix products, a x2 bilinear upsampling folded into the 3x3
convolution after it, norms that keep bf16 under autocast, a one-hot binary cross-entropy that never builds the
one-hot target, and named profiler ranges for the model's parts.

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


@tensor_cache(maxsize=16)
def _upsample_phases(device: torch.device) -> torch.Tensor:
    """(2, 3, 3) float64: for the even (0) and odd (1) output samples of a x2 bilinear upsampling, the weight of the
    input samples i-1, i, i+1 (rows) in the upsampled samples at offsets -1, 0, +1 (columns) from output 2i (+1)."""
    m = bilinear_matrix(8, 4, device, torch.float64)  # its interior rows: samples 3-5 and 4-6 over inputs 1-3
    return torch.stack([m[3:6, 1:4].t(), m[4:7, 1:4].t()])


def upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.conv2d(resize(x, (2H, 2W)), weight, padding=1)` for a 3x3 `weight` (Cout, C, 3, 3) without the upsampled
    map: the convolution runs at x's size with 4 x Cout output channels, one per output phase, then pixel-shuffles.

    Bilinear x2 upsampling (align_corners=False) is x padded by replicating its edges, then per output phase a
    fixed 2-tap filter; the 3x3 convolution after it is therefore, per phase (p, q), a 3x3 convolution of the
    edge-replicated x with the kernel A_p W A_q^T (`_upsample_phases`). That is exact except on the output's border
    rows and columns: there the zero padding of the upsampled map differs from the edge-replicated extension the
    phase kernels assume (the upsampled map's own edge), whose contribution is subtracted. Same arithmetic as the
    plain convolution; it reads x instead of the 4x larger upsampled map and gives cuDNN 4x wider outputs (the
    decoder's widths are 32-64). Under autocast the phase kernels are computed in float32 from the weight as autocast
    casts it, and rounded to autocast's dtype (so weights stored in that dtype give the same result).
    """
    h, w = x.shape[-2:]
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        weight = weight.to(torch.get_autocast_dtype(device))  # as autocast casts a convolution's weight
    with torch.autocast(device, enabled=False):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        a = _upsample_phases(weight.device).to(dtype)
        k = torch.einsum("pit,octs,qjs->opqcij", a, weight.to(dtype), a).flatten(0, 2).to(weight.dtype)
    y = F.pixel_shuffle(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k), 2)
    # The border: subtract what the phase kernels took from outside the upsampled map, its edge rows and columns
    # replicated. Those are x's first and last rows (columns) upsampled along the other axis; each of the four
    # corrections is a 1-D convolution with one row (column) of the weight. Rows and columns go two at a time.
    with torch.autocast(device, enabled=False):
        rows = x[..., [0, h - 1], :] @ bilinear_matrix(2 * w, w, x.device, x.dtype).t()  # (B, C, 2, 2W)
        cols = bilinear_matrix(2 * h, h, x.device, x.dtype) @ x[..., :, [0, w - 1]]  # (B, C, 2H, 2)
    c = weight.shape[0]
    # (the corners outside the map go with the rows: the columns' vertical padding is zero)
    top_bottom = F.conv2d(F.pad(rows, (1, 1, 0, 0), mode="replicate"), torch.cat([weight[:, :, :1], weight[:, :, 2:]]))
    left_right = F.conv2d(cols, torch.cat([weight[..., :1], weight[..., 2:]]), padding=(1, 0))
    y[..., :1, :] -= top_bottom[:, :c, :1]
    y[..., -1:, :] -= top_bottom[:, c:, 1:]
    y[..., :, :1] -= left_right[:, :c, :, :1]
    y[..., :, -1:] -= left_right[:, c:, :, 1:]
    return y


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
