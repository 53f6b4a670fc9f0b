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


@tensor_cache(maxsize=16)
def _upsample_phases(device: torch.device) -> torch.Tensor:
    """(2, 3, 3) float64: for the even (0) and odd (1) output samples of a x2 bilinear upsampling, the weight of the
    input samples i-1, i, i+1 (rows) in the upsampled samples at offsets -1, 0, +1 (columns) from output 2i (+1)."""
    m = bilinear_matrix(8, 4, device, torch.float64)  # its interior rows: samples 3-5 and 4-6 over inputs 1-3
    return torch.stack([m[3:6, 1:4].t(), m[4:7, 1:4].t()])


@tensor_cache(maxsize=16)
def _phase_filters(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(4 * channels, 9, 3, 3), the grouped convolution's weight in `upsampled_conv3x3`: for output phase (p, q) and
    kernel tap (r, u), the 3x3 filter A_p[:, r] A_q[:, u]^T over the input's neighbourhood. Its entries are multiples
    of 1/16 below 1, exact in bfloat16 and float16."""
    a = _upsample_phases(device)
    g = torch.einsum("pir,qju->pqruij", a, a).reshape(4, 9, 3, 3)
    return g.repeat(channels, 1, 1, 1).to(dtype)


@tensor_cache(maxsize=32)
def _border_matrix(n: int, corners: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(3 n, 2 n): row k n + i, column j: the weight of edge sample i of a kernel tap k in output sample j of the
    upsampled edge (x2 bilinear) convolved with that tap, the taps at offsets -1, 0, +1. Outside the edge the upsampled
    samples are the edge's own replicated (`corners`: the corners of the extended map) or zero."""
    r = bilinear_matrix(2 * n, n, device, torch.float64)
    pad = r[[0, -1]] if corners else torch.zeros_like(r[[0, -1]])
    r = torch.cat([pad[:1], r, pad[1:]])
    return torch.cat([r[k:k + 2 * n] for k in range(3)], dim=1).t().to(dtype)


def upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.conv2d(resize(x, (2H, 2W)), weight, padding=1)` for a 3x3 `weight` (Cout, C, 3, 3) without the upsampled
    map, and with a third of its arithmetic at the decoder's widths: both convolutions run at x's size.

    Bilinear x2 upsampling (align_corners=False) is x padded by replicating its edges, then per output phase (p, q)
    a fixed filter; the 3x3 convolution after it is therefore, per phase, a 3x3 convolution of the edge-replicated x
    with the kernel A_p W A_q^T (`_upsample_phases`). That kernel factors: first the channels are mixed by each of
    the 9 taps of W (a 1x1 convolution to 9 x Cout channels at x's size: a quarter of the plain convolution's
    products), then each output channel's 9 tap maps are combined by the fixed 3x3 phase filters (a grouped
    convolution, 4 outputs from 9 inputs per channel) and pixel-shuffled. That is exact except on the output's
    border rows and columns: there the zero padding of the upsampled map differs from the edge-replicated extension
    the phase filters assume (the upsampled map's own edge), whose contribution is subtracted.

    Multiply-adds per output pixel and channel: 9 C / 4 + 81 against the plain 9 C (C = 128: 369 vs 1152; C = 64:
    225 vs 576), the 1x1 convolution's on x padded by one pixel. Under autocast it computes in autocast's dtype, with
    the weight cast as autocast casts it (the phase filters are exact in bfloat16), so weights stored in that dtype
    give the same result. The backward is written out (`_UpsampledConv3x3`): it keeps x and the weight only (not
    the 9 x Cout tap maps), and adds the border's gradient into the tap maps' gradient in place, where autograd
    would build a zero-filled gradient map for each edge slice and add it.
    """
    return _UpsampledConv3x3.apply(x, weight)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer or convolution of x by weight computes in: autocast's (autocast leaves float64
    alone), else the promoted one."""
    device = x.device.type
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and dtype != torch.float64 else dtype


def _tap_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 weight (Cout, C, 3, 3) as the 1x1 convolution to its 9 taps' maps: (9 Cout, C, 1, 1), channel 9 o + 3 r
    + u for output o and kernel tap (r, u)."""
    return weight.permute(0, 2, 3, 1).reshape(9 * weight.shape[0], -1, 1, 1)


class _UpsampledConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        dtype = compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            x, weight = x.to(dtype), weight.to(dtype)
            ctx.save_for_backward(x, weight)
            return _upsampled_conv3x3(x, weight)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            return _upsampled_conv3x3_backward(gy.to(x.dtype), x, weight)


def _edge_products(h: int, w: int, device: torch.device, dtype: torch.dtype):
    # the corners outside the upsampled map go with the rows (`_border_matrix`)
    return _border_matrix(w, True, device, dtype), _border_matrix(h, False, device, dtype)


# True: torch.compile runs `upsampled_conv3x3` as gathers (`_upsampled_conv3x3_gathered`), not as it runs eagerly
# (grouped convolution). On a 2-core CPU the grouped convolution was faster compiled too (benchmarks/results/
# counted_2026-11-27b/decoder_cpu_compiled.log); a GPU has yet to choose (benchmarks/bench_decoder.py --compile).
GATHER_WHEN_COMPILED = False


def _upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if GATHER_WHEN_COMPILED and torch.compiler.is_compiling():
        return _upsampled_conv3x3_gathered(x, weight)
    h, w = x.shape[-2:]
    c = weight.shape[0]
    taps = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _tap_weight(weight))
    y = F.pixel_shuffle(F.conv2d(taps, _phase_filters(c, x.device, x.dtype), groups=c), 2)
    # The border: subtract what the phase filters took from outside the upsampled map, its edge rows and columns
    # replicated. Those are x's first and last rows (columns) upsampled along the other axis, then convolved with
    # one row (column) of the weight: the tap maps of that row (column) already hold the channel mixing, so what is
    # left is a 1-D upsampling and 3-tap sum along the edge, one small product (`_border_matrix`). In place: autograd
    # does not record inside the Function.
    for edge, correction in zip(_edges(y), _border_terms(taps.unflatten(1, (c, 3, 3)), h, w)):
        edge -= correction
    return y


def _edges(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of a map's top row, bottom row, left column and right column."""
    return t[..., 0, :], t[..., -1, :], t[..., :, 0], t[..., :, -1]


def _edge_taps(taps: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Views of the tap maps (B, Cout, kernel row, kernel column, h + 2, w + 2) that the border terms read, in
    `_edges`' order: the top kernel row's taps on x's first row, the bottom row's on its last, the left and right
    kernel columns' on x's first and last columns."""
    return (taps[:, :, 0, :, 1, 1:w + 1], taps[:, :, 2, :, h, 1:w + 1],
            taps[:, :, :, 0, 1:h + 1, 1], taps[:, :, :, 2, 1:h + 1, w])


def _border_terms(taps: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    """What the phase filters took from outside the upsampled map, for each of `_edges`: (B, Cout, 2w or 2h)."""
    along = _edge_products(h, w, taps.device, taps.dtype)
    return [t.flatten(-2) @ along[k // 2] for k, t in enumerate(_edge_taps(taps, h, w))]


@tensor_cache(maxsize=32)
def _tap_samples(n: int, tap: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For the 2n outputs of a x2 bilinear upsampling of n samples read by a 3x3 kernel's tap at offset tap - 1
    (zero outside the upsampled map): the two input samples each output reads and their weights (both 0 outside)."""
    p = torch.arange(2 * n, device=device) + (tap - 1)
    inside = ((p >= 0) & (p < 2 * n)).double()
    src = ((p + 0.5) / 2 - 0.5).clamp(min=0)  # PyTorch's rule (align_corners=False), as in `bilinear_matrix`
    i0 = src.floor().long().clamp(max=n - 1)
    lam = src - i0
    return i0, (i0 + 1).clamp(max=n - 1), (1 - lam) * inside, lam * inside


def _upsampled_conv3x3_gathered(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`_upsampled_conv3x3` as torch.compile runs it with GATHER_WHEN_COMPILED: the 1x1 tap convolution of x (no
    padding), then every output sample as the sum over the 9 taps of that tap map's bilinear sample at the tap's
    upsampled position, zero outside the map. Written as gathers from index tensors, which inductor fuses into one
    kernel that reads the tap maps and writes the output: no grouped convolution, pixel shuffle or border correction
    (eagerly, the 36 gathers would each fill a map of the output's size)."""
    h, w = x.shape[-2:]
    c = weight.shape[0]
    taps = F.conv2d(x, _tap_weight(weight)).unflatten(1, (c, 3, 3))
    y = 0
    for r in range(3):
        h0, h1, a0, a1 = (t[:, None] for t in _tap_samples(h, r, x.device))
        a0, a1 = a0.to(x.dtype), a1.to(x.dtype)
        for u in range(3):
            w0, w1, b0, b1 = _tap_samples(w, u, x.device)
            b0, b1 = b0.to(x.dtype), b1.to(x.dtype)
            t = taps[:, :, r, u]
            y = y + a0 * (b0 * t[:, :, h0, w0] + b1 * t[:, :, h0, w1]) \
                + a1 * (b0 * t[:, :, h1, w0] + b1 * t[:, :, h1, w1])
    return y


def _upsampled_conv3x3_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """The gradients of `_upsampled_conv3x3` with respect to x and the weight, for the output's gradient gy."""
    h, w = x.shape[-2:]
    c = weight.shape[0]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    taps_weight = _tap_weight(weight)
    # the tap maps' gradient: the phase filters' transposed convolution of gy, then the border terms' gradient
    # through the edge products, added in place onto x's edge samples in the tap maps
    g_taps = torch.nn.grad.conv2d_input((gy.shape[0], 9 * c, h + 2, w + 2), _phase_filters(c, x.device, x.dtype),
                                        F.pixel_unshuffle(gy, 2), padding=0, groups=c)
    along = _edge_products(h, w, x.device, x.dtype)
    g_edges = _edge_taps(g_taps.view(gy.shape[0], c, 3, 3, h + 2, w + 2), h, w)  # views: in place
    for k, (g_edge, g_out) in enumerate(zip(g_edges, _edges(gy))):
        g_edge -= (g_out @ along[k // 2].t()).unflatten(-1, g_edge.shape[-2:])
    g_xp = torch.nn.grad.conv2d_input(xp.shape, taps_weight, g_taps)
    g_weight = torch.nn.grad.conv2d_weight(xp, taps_weight.shape, g_taps)
    # the edge padding's gradient: each padded row and column folds onto the edge it copied (not by
    # replication_pad2d_backward: for channels-last inputs its CPU kernel and its shape function disagree on the
    # output's layout, which torch.compile's generated code checks)
    g_rows = g_xp[..., 1:-1, :].clone()
    g_rows[..., 0, :] += g_xp[..., 0, :]
    g_rows[..., -1, :] += g_xp[..., -1, :]
    g_x = g_rows[..., 1:-1].clone()
    g_x[..., 0] += g_rows[..., 0]
    g_x[..., -1] += g_rows[..., -1]
    return g_x, g_weight.reshape(c, 3, 3, -1).permute(0, 3, 1, 2)


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
