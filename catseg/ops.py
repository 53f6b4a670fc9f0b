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
    torch.compile the function is traced directly: its tensors become constants of the compiled graph. The tensors
    are built outside inference mode: one first built under torch.inference_mode() serves training later too."""
    def wrap(fn):
        def build(*args):  # a cache miss
            with torch.inference_mode(False):
                return fn(*args)
        cached = functools.lru_cache(maxsize=maxsize)(build)
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


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """`resize(x, (2H, 2W))`: x2 bilinear upsampling of the last two dims (align_corners=False).

    Eagerly the two matrix products of `resize`. Under torch.compile the stencil it amounts to: along each axis,
    output sample i is 3/4 of input sample i // 2 and 1/4 of its neighbour on i's side (the edge sample repeated
    past the edge). That is a pointwise expression of x, which inductor fuses with the kernel producing x (the
    decoder's GroupNorm and ReLU) and writes in the layout its consumer asks for (channels-last for the decoder's
    convolution) in one pass; the matrix products are library calls, each with its own passes over memory, and a
    copy to channels-last after them. The backward is the stencil's adjoint, pointwise too (autograd's would add
    into the input's gradient with scattered, atomic, adds)."""
    if not torch.compiler.is_compiling():
        return resize(x, (2 * x.shape[-2], 2 * x.shape[-1]))
    return _Upsample2xAxis.apply(_Upsample2xAxis.apply(x, -1), -2)


def _upsample2x_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    i = torch.arange(2 * x.shape[dim], device=x.device)
    near = i // 2
    far = (near + 2 * (i % 2) - 1).clamp(0, x.shape[dim] - 1)
    return 0.75 * x.index_select(dim, near) + 0.25 * x.index_select(dim, far)


def _upsample2x_axis_adjoint(g: torch.Tensor, dim: int) -> torch.Tensor:
    """The gradient of `_upsample2x_axis` along `dim` of length 2n: input k is the near sample of outputs 2k and
    2k + 1 and the far one of outputs 2k - 1 and 2k + 2, or, at the edges, of the edge output itself."""
    k = torch.arange(g.shape[dim] // 2, device=g.device)
    last = g.shape[dim] - 1
    near = g.index_select(dim, 2 * k) + g.index_select(dim, 2 * k + 1)
    far = g.index_select(dim, (2 * k - 1).clamp(0, last)) + g.index_select(dim, (2 * k + 2).clamp(0, last))
    return 0.75 * near + 0.25 * far


class _Upsample2xAxis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim = dim
        return _upsample2x_axis(x, dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _upsample2x_axis_adjoint(g, ctx.dim), None


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer or convolution of x by weight computes in: autocast's (autocast leaves float64
    alone), else the promoted one."""
    device = x.device.type
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and dtype != torch.float64 else dtype


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
