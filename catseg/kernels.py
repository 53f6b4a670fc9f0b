"""Fused inference kernels (Triton) for the aggregation blocks: each block's work in two passes over memory.

- `window_qkv` and `window_block`: a Swin block. The first reads the block's input at its (shifted) window positions
  and writes the queries, keys and values; the second, per window and block of tokens, computes the attention over
  the window (online softmax; the shift's regions from the token positions), the output projection, the residual at
  the unshifted positions and the MLP, and writes the block's output. (`window_output`: the second without the
  attention, after PyTorch's fused attention.)
- `class_summary` and `class_update`: a class aggregation block. Per pixel, the first reads the classes of a chunk
  and returns each head's key/value summary (d x d) and key sum; the second reads each class once more and writes
  the block's output: queries, linear attention, output projection, residual and the MLP.
- `residual_mlp(x, norm, mlp)`: `x + mlp(norm(x))`, the feed-forward half alone (the release variants of the class
  aggregation block).

Why: at the aggregation's width (128 channels) its matrix products are bound by memory traffic, not arithmetic (a
128-wide bf16 linear does 64 FLOP per byte moved, a GPU ~165), and the compiled modules pass every intermediate
through memory: the MLP's 4x wider hidden layer twice per block (the first linear's output, then its activation),
the norms' outputs, the window partitions, the attention's per-pixel products. Counted on fake tensors (`python -m
catseg.bench --count-memory --fused-kernels`), an eager 847-class ViT-B patch inference moves 145 GB instead of 345.

Inference only (no backward). The kernels run on CUDA tensors; with `TRITON_INTERPRET=1` set before triton is
imported they run on CPU tensors through Triton's interpreter (slow; what the CPU tests do). The matrix products take
the weights' dtype as autocast gives them (bf16 under bf16 autocast) and accumulate in float32; values are rounded
to that dtype where the unfused modules store them (norm outputs, linear outputs, activations, the attention's
output), so the results match the modules' within their own rounding. `benchmarks/compile_kernels.py` compiles them
for a GPU without one and reports their registers.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from .ops import compute_dtype

try:
    import triton
    import triton.language as tl

    def _helper(fn):
        """A function the kernels call: compiled, or interpreted where TRITON_INTERPRET=1 was set before triton was
        imported (as triton.language's own functions are; a process runs the kernels one way only). Interpreted, it
        runs as the interpreter rewrites it, without the interpreter's call wrapper: that one patches triton.language
        again on every call, which the kernel's launch has done for the helpers of this module already, and took a
        third of the interpreter's time."""
        from triton.runtime.interpreter import InterpretedFunction

        jitted = triton.jit(fn)
        if not isinstance(jitted, InterpretedFunction):
            return jitted

        @functools.wraps(fn)
        def interpreted(*args, **kwargs):
            return jitted.rewrite()(*args, **kwargs)
        return interpreted
except ImportError:  # pragma: no cover - triton ships with the CUDA builds of torch on Linux
    triton = tl = None

    def _helper(fn):
        return fn


def available() -> bool:
    """Whether the fused kernels can run here: Triton installed, and a CUDA device or Triton's interpreter."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def interpreting() -> bool:
    """Triton's interpreter is switched on (`TRITON_INTERPRET=1`): the kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_helper
def _dot(a, b, DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """a @ b accumulated in float32. DOT_F32 (the interpreter, whose products of bf16 operands are wrong): the
    operands, already rounded to their dtype, go in as float32, which holds them exactly. float32 operands use TF32
    where torch's matmuls do (torch.backends.cuda.matmul.allow_tf32)."""
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        if TF32:
            out = tl.dot(a, b, input_precision="tf32")
        else:
            out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@_helper
def _layer_norm(x, w_ptr, b_ptr, c, C: tl.constexpr, eps):
    """LayerNorm over the C columns of a float32 tile; padding rows (zeros) stay finite."""
    mean = tl.sum(x, axis=1) / C
    xc = x - mean[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    return xc * rstd[:, None] * tl.load(w_ptr + c).to(tl.float32)[None, :] + tl.load(b_ptr + c).to(tl.float32)[None, :]


@_helper
def _round(x, dtype: tl.constexpr):
    """x rounded to dtype and back to float32: where the unfused modules store a tensor of that dtype."""
    return x.to(dtype).to(tl.float32)


@_helper
def _elu_plus_one(x):
    return tl.where(x > 0, x + 1.0, tl.exp(x))


@_helper
def _residual_mlp_tile(y, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, eps, c, YDTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, C: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr,
                       RELU: tl.constexpr, DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """y + fc2(act(fc1(layer_norm(y)))) in float32 for a tile y (BLOCK_M x C) holding values of YDTYPE; the hidden
    layer is computed BLOCK_H columns at a time and never stored. w1 (HIDDEN, C) and w2 (C, HIDDEN) as nn.Linear
    stores them, in the products' input dtype."""
    dtype: tl.constexpr = w1_ptr.dtype.element_ty
    a = _layer_norm(y.to(tl.float32), nw_ptr, nb_ptr, c, C, eps).to(YDTYPE).to(dtype)  # as the linear takes it
    acc = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    for j in range(0, HIDDEN, BLOCK_H):
        h_idx = j + tl.arange(0, BLOCK_H)
        w1 = tl.load(w1_ptr + h_idx[None, :] * C + c[:, None])  # (C, BLOCK_H): fc1's weight, transposed
        w2 = tl.load(w2_ptr + c[None, :] * HIDDEN + h_idx[:, None])  # (BLOCK_H, C): fc2's weight, transposed
        h = _round(_dot(a, w1, DOT_F32, TF32) + tl.load(b1_ptr + h_idx).to(tl.float32)[None, :], dtype)
        if RELU:
            h = tl.maximum(h, 0.0)
        else:  # exact GELU
            h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        acc += _dot(h.to(dtype), w2, DOT_F32, TF32)
    return y.to(tl.float32) + _round(acc + tl.load(b2_ptr + c).to(tl.float32)[None, :], dtype)


def _residual_mlp_kernel(x_ptr, out_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, rows, eps: tl.constexpr,
                         C: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                         RELU: tl.constexpr, DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """out = x + fc2(act(fc1(layer_norm(x)))) for BLOCK_M rows of x (rows x C) per program."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, C)
    inside = r[:, None] < rows
    x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=inside, other=0.0)
    y = _residual_mlp_tile(x, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, eps, c, x_ptr.dtype.element_ty,
                           BLOCK_M, C, HIDDEN, BLOCK_H, RELU, DOT_F32, TF32)
    tl.store(out_ptr + r[:, None] * C + c[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)


def _class_summary_kernel(x_ptr, gk_ptr, nw_ptr, nb_ptr, wk_ptr, wv_ptr, bv_ptr, kv_ptr, z_ptr, n, width, pixels,
                          sb, sn, sc, sh, sw, swk, eps: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                          BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """The class aggregation's key/value summary of one pixel over the n classes of a chunk, head by head: with
    k = elu(key projection of layer_norm(x)) + 1 and v the value projection, kv[h] = sum_n k_h v_h^T (D x D) and
    z[h] = sum_n k_h. x (B, n, C, H, W) at any strides; gk (n, C): each class's key bias (text guidance term and
    bias); wk (C, swk): the key weight's columns for x."""
    pid = tl.program_id(0)  # image * pixels + pixel
    pix = pid % pixels
    base = x_ptr + (pid // pixels) * sb + (pix // width) * sh + (pix % width) * sw
    c = tl.arange(0, C)
    e = tl.arange(0, D)
    dtype: tl.constexpr = wk_ptr.dtype.element_ty
    for h in tl.static_range(C // D):
        o = h * D + e  # the head's output channels
        wk = tl.load(wk_ptr + o[None, :] * swk + c[:, None])  # transposed: (C in, D out)
        wv = tl.load(wv_ptr + o[None, :] * C + c[:, None])
        bv = tl.load(bv_ptr + o).to(tl.float32)
        kv = tl.zeros((D, D), dtype=tl.float32)
        z = tl.zeros((D,), dtype=tl.float32)
        for i in range(0, n, BLOCK_N):
            rows = i + tl.arange(0, BLOCK_N)
            valid = rows[:, None] < n
            x = tl.load(base + rows[:, None] * sn + c[None, :] * sc, mask=valid, other=0.0).to(tl.float32)
            a = _layer_norm(x, nw_ptr, nb_ptr, c, C, eps).to(x_ptr.dtype.element_ty).to(dtype)
            gk = tl.load(gk_ptr + rows[:, None] * C + o[None, :], mask=valid, other=0.0).to(tl.float32)
            k = _elu_plus_one(_round(_dot(a, wk, DOT_F32, TF32) + gk, dtype))
            k = tl.where(valid, _round(k, dtype), 0.0)  # padding classes add nothing
            v = (_dot(a, wv, DOT_F32, TF32) + bv[None, :]).to(dtype)
            kv += _dot(tl.trans(k.to(dtype)), v, DOT_F32, TF32)
            z += tl.sum(k, axis=0)
        tl.store(kv_ptr + pid * C * D + o[:, None] * D + e[None, :], kv)
        tl.store(z_ptr + pid * C + o, z)


def _class_update_kernel(x_ptr, out_ptr, gq_ptr, kv_ptr, z_ptr, n1w_ptr, n1b_ptr, wq_ptr, wp_ptr, bp_ptr, n2w_ptr,
                         n2b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, n, width, pixels, sb, sn, sc, sh, sw, ob, on, oc,
                         oh, ow, swq, eps1: tl.constexpr, eps2: tl.constexpr, attn_eps: tl.constexpr,
                         C: tl.constexpr, D: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_H: tl.constexpr, RELU: tl.constexpr, DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """The class aggregation block's output for BLOCK_N classes of one pixel, given the summary (kv, z) of all
    classes: head by head the queries, the linear attention and their share of the output projection; the residual,
    then the feed-forward half (as _residual_mlp_tile), written at the input's place in a tensor of the given
    strides."""
    pid = tl.program_id(0)
    pix = pid % pixels
    img, hh, ww = pid // pixels, pix // width, pix % width
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, C)
    e = tl.arange(0, D)
    valid = rows[:, None] < n
    dtype: tl.constexpr = wq_ptr.dtype.element_ty
    ydtype: tl.constexpr = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + img * sb + hh * sh + ww * sw + rows[:, None] * sn + c[None, :] * sc, mask=valid, other=0.0)
    a = _layer_norm(x.to(tl.float32), n1w_ptr, n1b_ptr, c, C, eps1).to(x_ptr.dtype.element_ty).to(dtype)
    y = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    for h in tl.static_range(C // D):
        o = h * D + e
        wq = tl.load(wq_ptr + o[None, :] * swq + c[:, None])  # (C in, D out)
        gq = tl.load(gq_ptr + rows[:, None] * C + o[None, :], mask=valid, other=0.0).to(tl.float32)
        q = _round(_elu_plus_one(_round(_dot(a, wq, DOT_F32, TF32) + gq, dtype)), dtype)
        kv = tl.load(kv_ptr + pid * C * D + o[:, None] * D + e[None, :]).to(dtype)  # (D, D)
        num = _round(_dot(q.to(dtype), kv, DOT_F32, TF32), dtype)
        z = _round(tl.load(z_ptr + pid * C + o), dtype)
        den = _round(tl.sum(q * z[None, :], axis=1), dtype) + attn_eps
        wp = tl.load(wp_ptr + c[None, :] * C + o[:, None])  # (D in, C out): the head's rows of proj's weight^T
        y += _dot((num / den[:, None]).to(dtype), wp, DOT_F32, TF32)
    y = _round(y + tl.load(bp_ptr + c).to(tl.float32)[None, :], dtype)
    y = _round(x.to(tl.float32) + y, ydtype)
    y = _residual_mlp_tile(y, n2w_ptr, n2b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, eps2, c, ydtype, BLOCK_N, C,
                           HIDDEN, BLOCK_H, RELU, DOT_F32, TF32)
    tl.store(out_ptr + img * ob + hh * oh + ww * ow + rows[:, None] * on + c[None, :] * oc, y.to(ydtype),
             mask=valid)


@_helper
def _window_position(r, height, width, WINDOW: tl.constexpr, SHIFT: tl.constexpr):
    """For rows r of the windows of a (cyclically shifted) window partition of maps (M, H, W): the map and the
    position (row, column) in the unshifted map that each row holds (timm's window_partition order: maps, window
    rows, window columns, then the window's tokens row by row)."""
    t = r % (WINDOW * WINDOW)
    win = r // (WINDOW * WINDOW)
    across = width // WINDOW
    i = (win // across) % (height // WINDOW) * WINDOW + t // WINDOW + SHIFT
    j = win % across * WINDOW + t % WINDOW + SHIFT
    m = win // (across * (height // WINDOW))
    return m, tl.where(i >= height, i - height, i), tl.where(j >= width, j - width, j)


@_helper
def _project(a, w_ptr, stride, rows, c, DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """a @ W[rows]^T for W (out, C in) at row stride `stride`: the outputs `rows` of a linear layer."""
    return _dot(a, tl.load(w_ptr + rows[None, :] * stride + c[:, None]), DOT_F32, TF32)


def _window_qkv_kernel(x_ptr, q_ptr, k_ptr, v_ptr, gq_ptr, gk_ptr, nw_ptr, nb_ptr, wq_ptr, wk_ptr, wv_ptr, bv_ptr,
                       rows, classes, height, width, sgb, sgh, sgw, swq, swk, eps: tl.constexpr, C: tl.constexpr,
                       WINDOW: tl.constexpr, SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """The first half of a Swin block up to the attention, for BLOCK_M rows of the windows: LayerNorm of x (maps
    (M, H, W, C), contiguous) read at the shifted window positions, then the query, key and value projections,
    BLOCK_C outputs at a time; the query and key add their guidance term and bias per image and position (gq, gk:
    (B, H, W, C) at strides sg*, `classes` maps per image). q, k, v are written (rows, C) in window order, as the
    unfused linears write them."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, C)
    inside = r[:, None] < rows
    m, i, j = _window_position(r, height, width, WINDOW, SHIFT)
    x = tl.load(x_ptr + ((m * height + i) * width + j)[:, None] * C + c[None, :], mask=inside, other=0.0)
    dtype: tl.constexpr = wq_ptr.dtype.element_ty
    a = _layer_norm(x.to(tl.float32), nw_ptr, nb_ptr, c, C, eps).to(x_ptr.dtype.element_ty).to(dtype)
    g = (m // classes) * sgb + i * sgh + j * sgw
    for start in range(0, C, BLOCK_C):
        o = start + tl.arange(0, BLOCK_C)
        out = r[:, None] * C + o[None, :]
        gq = tl.load(gq_ptr + g[:, None] + o[None, :], mask=inside, other=0.0).to(tl.float32)
        tl.store(q_ptr + out, (_project(a, wq_ptr, swq, o, c, DOT_F32, TF32) + gq).to(dtype), mask=inside)
        gk = tl.load(gk_ptr + g[:, None] + o[None, :], mask=inside, other=0.0).to(tl.float32)
        tl.store(k_ptr + out, (_project(a, wk_ptr, swk, o, c, DOT_F32, TF32) + gk).to(dtype), mask=inside)
        v = _project(a, wv_ptr, C, o, c, DOT_F32, TF32) + tl.load(bv_ptr + o).to(tl.float32)[None, :]
        tl.store(v_ptr + out, v.to(dtype), mask=inside)


def _window_output_kernel(o_ptr, x_ptr, out_ptr, wp_ptr, bp_ptr, n2w_ptr, n2b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                          rows, height, width, som, sow, soh, sot, soe, eps2: tl.constexpr, C: tl.constexpr,
                          D: tl.constexpr, HIDDEN: tl.constexpr, WINDOW: tl.constexpr, SHIFT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, RELU: tl.constexpr, DOT_F32: tl.constexpr,
                          TF32: tl.constexpr):
    """The rest of a Swin block for BLOCK_M rows of the windows: the attention's output (maps, windows, heads, T, D
    at strides so*) through the output projection, added to x at the row's unshifted position, then the feed-forward
    half (as _residual_mlp_tile); written there into out (M, H, W, C)."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, C)
    inside = r[:, None] < rows
    m, i, j = _window_position(r, height, width, WINDOW, SHIFT)
    t, win = r % (WINDOW * WINDOW), r // (WINDOW * WINDOW) - m * ((height // WINDOW) * (width // WINDOW))
    o = tl.load(o_ptr + (m * som + win * sow + t * sot)[:, None] + ((c // D) * soh + (c % D) * soe)[None, :],
                mask=inside, other=0.0)
    dtype: tl.constexpr = wp_ptr.dtype.element_ty
    ydtype: tl.constexpr = out_ptr.dtype.element_ty
    y = _round(_project(o.to(dtype), wp_ptr, C, c, c, DOT_F32, TF32) + tl.load(bp_ptr + c).to(tl.float32)[None, :],
               dtype)
    at = ((m * height + i) * width + j)[:, None] * C + c[None, :]
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
    y = _round(x + y, ydtype)
    y = _residual_mlp_tile(y, n2w_ptr, n2b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, eps2, c, ydtype, BLOCK_M, C, HIDDEN,
                           BLOCK_H, RELU, DOT_F32, TF32)
    tl.store(out_ptr + at, y.to(ydtype), mask=inside)


@_helper
def _shift_region(win, t, height, width, WINDOW: tl.constexpr, SHIFT: tl.constexpr):
    """The region (0-8) of tokens t of windows `win` in a cyclically shifted map: tokens of one window attend to
    tokens of their own region only (the shift mask of catseg.aggregation._shift_mask)."""
    across = width // WINDOW
    local = win % (across * (height // WINDOW))
    i = local // across * WINDOW + t // WINDOW
    j = local % across * WINDOW + t % WINDOW
    ri = tl.where(i < height - WINDOW, 0, tl.where(i < height - SHIFT, 1, 2))
    rj = tl.where(j < width - WINDOW, 0, tl.where(j < width - SHIFT, 1, 2))
    return ri * 3 + rj


def _window_block_kernel(q_ptr, k_ptr, v_ptr, x_ptr, out_ptr, wp_ptr, bp_ptr, n2w_ptr, n2b_ptr, w1_ptr, b1_ptr,
                         w2_ptr, b2_ptr, height, width, scale: tl.constexpr, eps2: tl.constexpr, C: tl.constexpr,
                         D: tl.constexpr, HIDDEN: tl.constexpr, WINDOW: tl.constexpr, SHIFT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, RELU: tl.constexpr,
                         DOT_F32: tl.constexpr, TF32: tl.constexpr):
    """The rest of a Swin block from its queries, keys and values (rows, C in window order, as window_qkv writes
    them) for BLOCK_M tokens of one window: per head, softmax attention over the window's tokens (BLOCK_K keys at a
    time, online softmax; in a shifted map only tokens of the same region), its share of the output projection; then
    the residual at the tokens' unshifted positions and the feed-forward half (as _residual_mlp_tile), written into
    out (M, H, W, C)."""
    win = tl.program_id(0)
    T: tl.constexpr = WINDOW * WINDOW
    tq = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = tq[:, None] < T
    rq = win * T + tq
    c = tl.arange(0, C)
    e = tl.arange(0, D)
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    ydtype: tl.constexpr = out_ptr.dtype.element_ty
    if SHIFT:
        region_q = _shift_region(win, tq, height, width, WINDOW, SHIFT)
    y = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    for h in tl.static_range(C // D):
        q = tl.load(q_ptr + rq[:, None] * C + h * D + e[None, :], mask=valid, other=0.0)
        top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        for start in range(0, T, BLOCK_K):
            tk = start + tl.arange(0, BLOCK_K)
            rk = (win * T + tk)[:, None] * C + h * D + e[None, :]
            k = tl.load(k_ptr + rk, mask=tk[:, None] < T, other=0.0)
            v = tl.load(v_ptr + rk, mask=tk[:, None] < T, other=0.0)
            keep = tk[None, :] < T
            if SHIFT:
                keep = keep & (region_q[:, None] == _shift_region(win, tk, height, width, WINDOW, SHIFT)[None, :])
            score = tl.where(keep, _dot(q, tl.trans(k), DOT_F32, TF32) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(score, axis=1))
            base = tl.where(new_top == float("-inf"), 0.0, new_top)  # no key seen yet: nothing to scale
            p = tl.exp(score - base[:, None])
            shrink = tl.exp(top - base)
            total = total * shrink + tl.sum(p, axis=1)
            acc = acc * shrink[:, None] + _dot(p.to(dtype), v, DOT_F32, TF32)
            top = new_top
        o = (acc / total[:, None]).to(dtype)  # the attention's output, in its dtype
        y += _dot(o, tl.load(wp_ptr + c[None, :] * C + (h * D + e)[:, None]), DOT_F32, TF32)
    y = _round(y + tl.load(bp_ptr + c).to(tl.float32)[None, :], dtype)
    m, i, j = _window_position(rq, height, width, WINDOW, SHIFT)
    at = ((m * height + i) * width + j)[:, None] * C + c[None, :]
    y = _round(tl.load(x_ptr + at, mask=valid, other=0.0).to(tl.float32) + y, ydtype)
    y = _residual_mlp_tile(y, n2w_ptr, n2b_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, eps2, c, ydtype, BLOCK_M, C, HIDDEN,
                           BLOCK_H, RELU, DOT_F32, TF32)
    tl.store(out_ptr + at, y.to(ydtype), mask=valid)


# Tried on the GPU at the first call for each key (widths, activation, TF32); the interpreter takes the first.
# (meta-parameters, warps, pipeline stages). At the presets' widths (128 channels, 4 heads, bf16) none of these
# spills registers on sm_90 (`python benchmarks/compile_kernels.py`, which compiles them without a GPU); larger tiles
# did.
_CONFIGS = {
    "_residual_mlp_kernel": [(dict(BLOCK_M=m, BLOCK_H=h), w, s) for m, h, w, s in
                             [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (32, 64, 4, 2)]],
    "_class_summary_kernel": [(dict(BLOCK_N=m), w, s) for m, w, s in [(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)]],
    "_class_update_kernel": [(dict(BLOCK_N=m, BLOCK_H=h), w, s) for m, h, w, s in
                             [(16, 64, 4, 2), (16, 32, 4, 2), (16, 64, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2)]],
    "_window_qkv_kernel": [(dict(BLOCK_M=m, BLOCK_C=n), w, s) for m, n, w, s in
                           [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 4, 2)]],
    "_window_output_kernel": [(dict(BLOCK_M=m, BLOCK_H=h), w, s) for m, h, w, s in
                              [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (32, 64, 4, 2)]],
    # (64-token tiles with 8 warps are the ones whose products compile to Hopper's wgmma; with 4 warps they spill)
    "_window_block_kernel": [(dict(BLOCK_M=m, BLOCK_K=k, BLOCK_H=h), w, s) for m, k, h, w, s in
                             [(16, 64, 64, 4, 2), (16, 32, 64, 4, 2), (16, 16, 64, 4, 2), (32, 64, 64, 8, 2),
                              (32, 32, 64, 8, 2), (64, 64, 64, 8, 2), (64, 64, 32, 8, 2), (64, 32, 64, 8, 2),
                              (64, 32, 32, 8, 2), (64, 64, 64, 8, 3)]],
}
_KEYS = {"_residual_mlp_kernel": ["C", "HIDDEN", "RELU", "TF32"], "_class_summary_kernel": ["C", "D", "TF32"],
         "_class_update_kernel": ["C", "D", "HIDDEN", "RELU", "TF32"], "_window_qkv_kernel": ["C", "WINDOW", "TF32"],
         "_window_output_kernel": ["C", "D", "HIDDEN", "WINDOW", "RELU", "TF32"],
         "_window_block_kernel": ["C", "D", "HIDDEN", "WINDOW", "RELU", "TF32"]}


def _round_like_the_gpu() -> None:
    """Triton's interpreter truncates float32 to bfloat16 where the GPU's conversion rounds to nearest even (twice
    the error, and biased); its conversion is replaced by torch's, which rounds as the GPU does."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_catseg_rounding", False):
        return
    truncate = builder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return truncate(self, src, dst_type)
    builder.create_fp_trunc = create_fp_trunc
    builder._catseg_rounding = True


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    """Kernel `fn` for the Triton compiler (what runs on a GPU; fake-tensor runs trace it too). Not triton.jit, which
    gives the interpreted function where the interpreter is on."""
    from triton.runtime.jit import JITFunction
    return JITFunction(fn)


@functools.lru_cache(maxsize=None)
def _kernel(fn, interpret: bool):
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        _round_like_the_gpu()
        return InterpretedFunction(fn)
    configs = [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in _CONFIGS[fn.__name__]]
    return triton.autotune(configs, key=_KEYS[fn.__name__])(_compiled(fn))


def is_fake(t: torch.Tensor) -> bool:
    """A fake tensor (shapes only, as catseg.memcount counts with): the operator runs no kernel on it."""
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _launch(fn, grid, x: torch.Tensor, *args, **meta) -> None:
    """Run kernel `fn` on `args`: through Triton's interpreter for CPU tensors (its first configuration), else
    autotuned, wrapped so that torch.compile and fake-tensor runs see it. grid(meta) -> the launch grid."""
    for t in args:
        if isinstance(t, float):  # under torch.compile a runtime float is fp64 (fp32 in plain Triton launches)
            raise TypeError(f"{fn.__name__.strip('_')}: pass float {t} as a constexpr keyword, not positionally")
        # the kernels index in 32-bit integers
        if torch.is_tensor(t) and sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2 ** 31:
            raise ValueError(f"{fn.__name__.strip('_')}: a tensor of shape {tuple(t.shape)} spans 2^31 elements or "
                             f"more; use smaller class chunks (class_chunk_size) or fewer images per call")
    if x.device.type == "cpu" and not is_fake(x):  # the interpreter (the public functions check it is on)
        first = _CONFIGS[fn.__name__][0][0]
        _kernel(fn, True)[grid(first)](*args, **meta, **first, DOT_F32=True, TF32=False)
    else:
        torch.library.wrap_triton(_kernel(fn, False))[grid](*args, **meta, DOT_F32=False,
                                                              TF32=torch.backends.cuda.matmul.allow_tf32)


def _residual_mlp_impl(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, w1: torch.Tensor,
                       b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps: float, relu: bool,
                       out_dtype: torch.dtype) -> torch.Tensor:
    rows, c = x.shape
    out = torch.empty(rows, c, dtype=out_dtype, device=x.device)
    _launch(_residual_mlp_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),), x,
            x, out, norm_weight, norm_bias, w1, b1, w2, b2, rows, eps=eps, C=c, HIDDEN=w1.shape[0], RELU=relu)
    return out


def _class_summary_impl(x: torch.Tensor, gk: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                        wk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor, eps: float,
                        heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, c, h, w = x.shape
    d = c // heads
    kv = torch.empty(b * h * w, c, d, dtype=torch.float32, device=x.device)
    z = torch.empty(b * h * w, c, dtype=torch.float32, device=x.device)
    _launch(_class_summary_kernel, lambda meta: (b * h * w,), x,
            x, gk, norm_weight, norm_bias, wk, wv, bv, kv, z, n, w, h * w, *x.stride(), wk.stride(0), eps=eps, C=c, D=d)
    return kv, z


def _class_update_impl(x: torch.Tensor, gq: torch.Tensor, kv: torch.Tensor, z: torch.Tensor, norm1_weight: torch.Tensor,
                       norm1_bias: torch.Tensor, wq: torch.Tensor, wp: torch.Tensor, bp: torch.Tensor,
                       norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, eps1: float, eps2: float, attn_eps: float, heads: int,
                       relu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    b, n, c, h, w = x.shape
    out = torch.empty_like(x, dtype=out_dtype)  # x's strides when x is dense (a permuted tensor), else contiguous
    _launch(_class_update_kernel, lambda meta: (b * h * w, triton.cdiv(n, meta["BLOCK_N"])), x,
            x, out, gq, kv, z, norm1_weight, norm1_bias, wq, wp, bp, norm2_weight, norm2_bias, w1, b1, w2, b2,
            n, w, h * w, *x.stride(), *out.stride(), wq.stride(0), eps1=eps1, eps2=eps2, attn_eps=attn_eps, C=c,
            D=c // heads, HIDDEN=w1.shape[0], RELU=relu)
    return out


def _window_qkv_impl(x: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, norm_weight: torch.Tensor,
                     norm_bias: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,
                     eps: float, classes: int, window: int,
                     shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    maps, h, w, c = x.shape
    assert gq.shape == gk.shape and gq.stride() == gk.stride(), "the guidance terms share one layout"
    rows = maps * h * w
    q, k, v = (torch.empty(rows // window ** 2, window ** 2, c, dtype=wq.dtype, device=x.device) for _ in range(3))
    _launch(_window_qkv_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),), x,
            x, q, k, v, gq, gk, norm_weight, norm_bias, wq, wk, wv, bv, rows, classes, h, w,
            *(0 if size == 1 else stride for size, stride in zip(gq.shape[:3], gq.stride()[:3])),  # (broadcast)
            wq.stride(0), wk.stride(0), eps=eps, C=c, WINDOW=window, SHIFT=shift)
    return q, k, v


def _window_output_impl(o: torch.Tensor, x: torch.Tensor, wp: torch.Tensor, bp: torch.Tensor,
                        norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                        w2: torch.Tensor, b2: torch.Tensor, eps2: float, window: int, shift: int, relu: bool,
                        out_dtype: torch.dtype) -> torch.Tensor:
    maps, h, w, c = x.shape
    rows = maps * h * w
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch(_window_output_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),), x,
            o, x, out, wp, bp, norm2_weight, norm2_bias, w1, b1, w2, b2, rows, h, w, *o.stride(), eps2=eps2, C=c,
            D=o.shape[-1], HIDDEN=w1.shape[0], WINDOW=window, SHIFT=shift, RELU=relu)
    return out


def _window_block_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, wp: torch.Tensor,
                       bp: torch.Tensor, norm2_weight: torch.Tensor, norm2_bias: torch.Tensor, w1: torch.Tensor,
                       b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps2: float, heads: int, window: int,
                       shift: int, relu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    maps, h, w, c = x.shape
    d = c // heads
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch(_window_block_kernel, lambda meta: (q.shape[0], triton.cdiv(window * window, meta["BLOCK_M"])), x,
            q, k, v, x, out, wp, bp, norm2_weight, norm2_bias, w1, b1, w2, b2, h, w, scale=d ** -0.5, eps2=eps2, C=c,
            D=d, HIDDEN=w1.shape[0], WINDOW=window, SHIFT=shift, RELU=relu)
    return out


# The kernels as custom operators (catseg::residual_mlp, class_summary, class_update, window_qkv, window_output,
# window_block):
# torch.compile sees the Triton kernels inside them, and fake-tensor runs (catseg.memcount) see one operator each,
# reading its inputs and writing its outputs, with the FLOPs of the matrix products it replaces
# (torch.utils.flop_counter), so fused and unfused runs count the same arithmetic.
if triton is not None:
    _residual_mlp_op = torch.library.triton_op("catseg::residual_mlp", _residual_mlp_impl, mutates_args=())
    _class_summary_op = torch.library.triton_op("catseg::class_summary", _class_summary_impl, mutates_args=())
    _class_update_op = torch.library.triton_op("catseg::class_update", _class_update_impl, mutates_args=())
    _window_qkv_op = torch.library.triton_op("catseg::window_qkv", _window_qkv_impl, mutates_args=())
    _window_output_op = torch.library.triton_op("catseg::window_output", _window_output_impl, mutates_args=())
    _window_block_op = torch.library.triton_op("catseg::window_block", _window_block_impl, mutates_args=())

    @register_flop_formula(torch.ops.catseg.residual_mlp)
    def _residual_mlp_flops(x_shape, nw_shape, nb_shape, w1_shape, *args, **kwargs) -> int:
        return 2 * 2 * x_shape[0] * w1_shape[0] * w1_shape[1]

    @register_flop_formula(torch.ops.catseg.class_summary)
    def _class_summary_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        b, n, c, h, w = x_shape
        kv_shape = out_shape[0]
        return b * n * h * w * (2 * 2 * c * c + 2 * c * kv_shape[-1])  # key and value projections, the summary

    @register_flop_formula(torch.ops.catseg.class_update)
    def _class_update_flops(x_shape, gq, kv_shape, z, nw, nb, wq, wp, bp, n2w, n2b, w1_shape, *args, **kwargs) -> int:
        b, n, c, h, w = x_shape
        # query and output projections, the attention's numerator and denominator, the MLP
        return b * n * h * w * (2 * 2 * c * c + 2 * c * kv_shape[-1] + 2 * c + 2 * 2 * c * w1_shape[0])

    @register_flop_formula(torch.ops.catseg.window_qkv)
    def _window_qkv_flops(x_shape, *args, **kwargs) -> int:
        maps, h, w, c = x_shape
        return maps * h * w * 3 * 2 * c * c  # the query, key and value projections of x (guidance: outside)

    @register_flop_formula(torch.ops.catseg.window_output)
    def _window_output_flops(o_shape, x_shape, wp, bp, n2w, n2b, w1_shape, *args, **kwargs) -> int:
        maps, h, w, c = x_shape
        return maps * h * w * (2 * c * c + 2 * 2 * c * w1_shape[0])  # the output projection, the MLP

    @register_flop_formula(torch.ops.catseg.window_block)
    def _window_block_flops(q_shape, k_shape, v_shape, x_shape, wp, bp, n2w, n2b, w1_shape, *args, **kwargs) -> int:
        windows, t, c = q_shape
        # the attention's two products (as the fused attention counts them), the output projection, the MLP
        return windows * t * (2 * 2 * t * c + 2 * c * c + 2 * 2 * c * w1_shape[0])


def _not_affine_layer_norm(norm: nn.Module) -> bool:
    return not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None


def _narrow_heads(width: int, heads: int) -> Optional[str]:
    """Why heads of width / heads channels cannot run the kernels' per-head products on tensor cores, or None."""
    d = width // heads
    return f"its heads' width {d} is not a power of two of at least 16" if d < 16 or d & (d - 1) else None


def supports(norm: nn.Module, mlp: nn.Module) -> Optional[str]:
    """None if `residual_mlp` can run this norm and MLP, else why not."""
    if _not_affine_layer_norm(norm):
        return "the norm is not a LayerNorm with weight and bias"
    c = norm.normalized_shape[-1]
    fc1, fc2, act = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None), getattr(mlp, "act", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.bias is not None
            and fc2.bias is not None and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)):
        return "the MLP is not Linear, activation, Linear with biases"
    if not (isinstance(act, nn.ReLU) or (isinstance(act, nn.GELU) and act.approximate == "none")):
        return f"the activation {type(act).__name__} is neither exact GELU nor ReLU"
    hidden = fc1.out_features
    for name, n, least in (("width", c, 16), ("hidden width", hidden, 128)):
        if n < least or n & (n - 1):
            return f"its {name} {n} is not a power of two of at least {least}"
    if c > 256:
        return f"its width {c} is over 256"
    return None


def _check_device(x: torch.Tensor, what: str) -> None:
    if x.device.type != "cuda" and not (interpreting() and x.device.type == "cpu") and not is_fake(x):
        raise ValueError(f"{what} runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), got a "
                         f"{x.device.type} tensor")


def residual_mlp(x: torch.Tensor, norm: nn.LayerNorm, mlp: nn.Module) -> torch.Tensor:
    """`x + mlp(norm(x))` as one fused kernel, for inference: x (..., C) with C the norm's width; `mlp` a timm Mlp
    (fc1, exact GELU or ReLU, fc2) that `supports` accepts. Under autocast the products run in autocast's dtype as
    nn.Linear's would; the output has the dtype the unfused expression gives."""
    why = supports(norm, mlp)
    if why is not None:
        raise ValueError(f"residual_mlp cannot fuse this block: {why}")
    _check_device(x, "residual_mlp")
    dtype = compute_dtype(x, mlp.fc1.weight)
    shape = x.shape
    out = _residual_mlp_op(x.reshape(-1, shape[-1]).contiguous(), norm.weight, norm.bias, *_mlp_weights(mlp, dtype),
                           float(norm.eps), isinstance(mlp.act, nn.ReLU), torch.promote_types(x.dtype, dtype))
    return out.view(shape)


def _mlp_weights(mlp: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype) for t in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)]


def _output_weights(proj: nn.Linear, norm2: nn.LayerNorm, mlp: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    """A block's weights after its attention, as the kernels take them: the output projection's (in the products'
    dtype), the second norm's (as stored), the MLP's."""
    return [proj.weight.to(dtype), proj.bias.to(dtype), norm2.weight, norm2.bias, *_mlp_weights(mlp, dtype)]


def supports_class_aggregation(agg: nn.Module) -> Optional[str]:
    """None if `class_summary` / `class_update` can run this ClassAggregation block, else why not."""
    why = supports(agg.norm2, agg.mlp)
    if why is None and _not_affine_layer_norm(agg.norm1):
        why = "its first norm is not a LayerNorm with weight and bias"
    if why is None and not isinstance(agg.proj, nn.Linear):
        why = "it has no output projection"
    return why or _narrow_heads(agg.norm1.normalized_shape[-1], agg.num_heads)


def _class_bias(linear: nn.Linear, g: Optional[torch.Tensor], n: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, C): the guidance half of a query or key projection plus its bias, per class (the bias alone without
    guidance), as split_linear computes it."""
    if g is None:
        return linear.bias.to(dtype).expand(n, c).contiguous()
    return F.linear(g.reshape(n, -1), linear.weight[:, c:], linear.bias).to(dtype).contiguous()


def class_summary(agg: nn.Module, xs: torch.Tensor, g: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ClassAggregation.summary as one kernel (no pooling): xs (B, n, C, H, W), g (1, 1, n, G) or None -> kv
    (B, HW, heads, d, d) and z (B, HW, heads, d), float32."""
    _check_device(xs, "class_summary")
    b, n, c, h, w = xs.shape
    dtype = compute_dtype(xs, agg.k.weight)
    kv, z = _class_summary_op(xs, _class_bias(agg.k, g, n, c, dtype), agg.norm1.weight, agg.norm1.bias,
                              agg.k.weight[:, :c].to(dtype), agg.v.weight.to(dtype), agg.v.bias.to(dtype),
                              float(agg.norm1.eps), agg.num_heads)
    d = c // agg.num_heads
    return kv.view(b, h * w, agg.num_heads, d, d), z.view(b, h * w, agg.num_heads, d)


def class_update(agg: nn.Module, xs: torch.Tensor, g: Optional[torch.Tensor], kv: torch.Tensor,
                 z: torch.Tensor) -> torch.Tensor:
    """ClassAggregation.update as one kernel (no pooling), given the summary of all classes from `class_summary`:
    xs (B, n, C, H, W) -> the block's output, of xs's shape and (dense) strides."""
    _check_device(xs, "class_update")
    b, n, c, h, w = xs.shape
    dtype = compute_dtype(xs, agg.q.weight)
    return _class_update_op(
        xs, _class_bias(agg.q, g, n, c, dtype), kv.reshape(b * h * w, c, -1), z.reshape(b * h * w, c),
        agg.norm1.weight, agg.norm1.bias, agg.q.weight[:, :c].to(dtype),
        *_output_weights(agg.proj, agg.norm2, agg.mlp, dtype), float(agg.norm1.eps), float(agg.norm2.eps),
        float(agg.eps), agg.num_heads, isinstance(agg.mlp.act, nn.ReLU), torch.promote_types(xs.dtype, dtype))


def supports_swin_block(block: nn.Module, attention: str = "kernel") -> Optional[str]:
    """None if `window_qkv` and `window_block` (attention "kernel") or `window_output` ("sdpa") can run this
    GuidedSwinBlock, else why not."""
    why = supports(block.norm2, block.mlp)
    if why is None and _not_affine_layer_norm(block.norm1):
        why = "its first norm is not a LayerNorm with weight and bias"
    if why is None and attention == "kernel":
        narrow = _narrow_heads(block.norm1.normalized_shape[-1], block.attn.num_heads)
        why = None if narrow is None else f"{narrow} (attention 'sdpa' can run it)"
    return why


def _window_bias(linear: nn.Linear, guidance: Optional[torch.Tensor], c: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, C), or (1, 1, 1, C) broadcast: the guidance half of a query or key projection plus its bias, per
    image and position, as split_linear computes it."""
    if guidance is None:
        return linear.bias.to(dtype).view(1, 1, 1, c)
    return F.linear(guidance, linear.weight[:, c:], linear.bias).to(dtype).contiguous()


def window_qkv(block: nn.Module, x: torch.Tensor, guidance: Optional[torch.Tensor],
               images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values of a GuidedSwinBlock as one kernel: x (B*n, H, W, C), guidance (B, H, W, G)
    (normalised, unshifted) or None -> q, k, v (B*n*windows, T, C), as the block's attention computes them from its
    LayerNorm, (cyclic shift), window partition and linears."""
    _check_device(x, "window_qkv")
    c = x.shape[-1]
    attn = block.attn
    dtype = compute_dtype(x, attn.q.weight)
    return _window_qkv_op(x.contiguous(), _window_bias(attn.q, guidance, c, dtype),
                          _window_bias(attn.k, guidance, c, dtype), block.norm1.weight, block.norm1.bias,
                          attn.q.weight[:, :c].to(dtype), attn.k.weight[:, :c].to(dtype), attn.v.weight.to(dtype),
                          attn.v.bias.to(dtype), float(block.norm1.eps), x.shape[0] // images, block.window,
                          block.shift)


def window_output(block: nn.Module, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rest of a GuidedSwinBlock as one kernel: the attention's output (B*n, windows, heads, T, d; any strides)
    through the output projection, (reverse shift), residual and feed-forward half -> the block's output
    (B*n, H, W, C)."""
    _check_device(x, "window_output")
    attn = block.attn
    dtype = compute_dtype(x, attn.proj.weight)
    return _window_output_op(attended, x.contiguous(), *_output_weights(attn.proj, block.norm2, block.mlp, dtype),
                             float(block.norm2.eps), block.window, block.shift, isinstance(block.mlp.act, nn.ReLU),
                             torch.promote_types(x.dtype, dtype))


def window_block(block: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rest of a GuidedSwinBlock as one kernel from its queries, keys and values (B*n*windows, T, C) of
    `window_qkv`: the window attention (with the shift's regions), output projection, (reverse shift), residual and
    feed-forward half -> the block's output (B*n, H, W, C)."""
    _check_device(x, "window_block")
    attn = block.attn
    dtype = compute_dtype(x, attn.proj.weight)
    return _window_block_op(q, k, v, x.contiguous(), *_output_weights(attn.proj, block.norm2, block.mlp, dtype),
                            float(block.norm2.eps), attn.num_heads, block.window, block.shift,
                            isinstance(block.mlp.act, nn.ReLU), torch.promote_types(x.dtype, dtype))
