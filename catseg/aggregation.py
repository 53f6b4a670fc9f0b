"""Cost aggregation: spatial (Swin pair per class), class (linear attention over classes) and the decoder.

Tensor layout of the cost volume embedding throughout: (B, N, C, H, W) with N classes. Every per-class stage
accepts a slice of classes, so callers can run the classes in chunks with bounded memory; class aggregation is the
one stage that mixes classes and it accumulates its linear-attention summary over chunks, so chunked equals
unchunked.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .ops import GroupNorm, LayerNorm, compute_dtype, part, resize, tensor_cache, upsample2x


def chunk_slices(n: int, chunk: Optional[int]) -> list[slice]:
    """Consecutive slices covering range(n), as few as allow each at most `chunk` long (one slice when chunk is None),
    their lengths as equal as can be (847 classes in chunks of 128: seven of 121, not six of 128 and one of 79).
    Fewer distinct chunk shapes are fewer shapes to compile, and no chunk is left with a single class."""
    if not chunk or n <= chunk:
        return [slice(0, n)]
    count = -(-n // chunk)
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def cat_chunks(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The class chunks' results joined along the class axis (dim 1); one chunk as it is, in its own memory layout
    (torch.cat would copy it into a contiguous one)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@tensor_cache(maxsize=16)
def _shift_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Boolean (num_windows, T, T) mask: True where two tokens of a shifted window came from the same region."""
    # a row's band: 0 before the last window, 1 in it before the last `shift` rows, 2 in those (columns alike).
    # Computed from indices, not by assigning the nine regions in turn: under torch.compile, where this runs in the
    # graph, nine slice assignments became one C++ kernel of 17,000 lines on CPU.
    def band(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    region = band(h)[:, None] * 3 + band(w)[None, :]
    ids = window_partition(region[None, :, :, None], (window, window)).flatten(1)  # (nW, T)
    return ids.unsqueeze(1) == ids.unsqueeze(2)


@tensor_cache(maxsize=16)
def _shift_bias(h: int, w: int, window: int, shift: int, heads: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """The shift mask as an additive bias (1, nW * heads, T, T): 0 inside a region, -inf across regions."""
    mask = _shift_mask(h, w, window, shift, device)
    bias = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return bias.unsqueeze(1).expand(-1, heads, -1, -1).reshape(1, -1, *mask.shape[1:])


def split_linear(linear: nn.Linear, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """linear(cat([x, guidance], -1)) without building the concatenation, the guidance term computed once.

    The guidance half of the weight is applied to `guidance` (with the bias) and broadcast-added: guidance may have
    size 1 (or a divisor) where x repeats it, e.g. one guidance map per image for all of its classes.
    """
    c = x.shape[-1]
    return F.linear(x, linear.weight[:, :c]) + F.linear(guidance, linear.weight[:, c:], linear.bias)


class _MlpRecomputeFn(torch.autograd.Function):
    """fc2(act(fc1(x))) that saves x (and the weights) and recomputes the hidden layer in backward: what
    torch.utils.checkpoint does for an Mlp, written out, without checkpoint's bookkeeping on the host (on small
    tensors: 290 us per forward + backward against 514 us through checkpoint and 244 us for the plain Mlp,
    `python benchmarks/bench_mlp_recompute.py`, 2-core CPU). Backward runs under the forward's autocast state, as
    the forward's own operators did."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, relu: bool):
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.relu = relu
        ctx.save_for_backward(x, w1, b1, w2)
        h = F.linear(x, w1, b1)
        return F.linear(F.relu(h) if relu else F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, gy):
        x, w1, b1, w2 = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            h = F.linear(x, w1, b1)
            a = F.relu(h) if ctx.relu else F.gelu(h)
            ga = F.linear(gy, w2.t())  # gy @ w2, the weight cast as autocast cast it in the forward
            gh = torch.ops.aten.threshold_backward(ga, h, 0) if ctx.relu else torch.ops.aten.gelu_backward(ga, h)
            gx = F.linear(gh, w1.t())
        # weight and bias gradients in the compute dtype (that of h); autograd casts each to its parameter's dtype
        gy2, a2, gh2, x2 = (t.reshape(-1, t.shape[-1]).to(h.dtype) for t in (gy, a, gh, x))
        return gx, gh2.t() @ x2, gh2.sum(0), gy2.t() @ a2, gy2.sum(0), None


class RecomputedMlp(Mlp):
    """timm's Mlp (same function and parameters) that keeps only its input for the backward pass and recomputes the
    hidden layer there: the hidden activations are `mlp_ratio` times wider than the input, and the two of them kept
    per block (fc1's output and the activation's) were the largest share of a training step's activation memory.
    Set `recompute = False` to keep them instead (faster backward, more memory).

    Under torch.compile the recompute goes through torch.utils.checkpoint, which the compiler honours: it traces a
    custom autograd Function's forward and backward into one graph, where its backward's recomputation merges with
    the forward's and the hidden layer is kept after all (the ViT-B training step peaked 2.6 GiB higher)."""

    recompute = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            if self._plain() and not torch.compiler.is_compiling():
                return _MlpRecomputeFn.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                             isinstance(self.act, nn.ReLU))
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)

    def _plain(self) -> bool:
        """fc1, GELU (exact) or ReLU, fc2, nothing else (no dropout in training, no norm, biases present)."""
        act = self.act
        exact_gelu = isinstance(act, nn.GELU) and act.approximate == "none"
        no_drop = all(isinstance(d, nn.Identity) or (isinstance(d, nn.Dropout) and d.p == 0)
                      for d in (self.drop1, self.drop2))
        return ((exact_gelu or isinstance(act, nn.ReLU)) and no_drop and isinstance(self.norm, nn.Identity)
                and isinstance(self.fc1, nn.Linear) and isinstance(self.fc2, nn.Linear)
                and self.fc1.bias is not None and self.fc2.bias is not None)


class GuidedWindowAttention(nn.Module):
    """Window self-attention whose query/key inputs carry extra guidance channels; values see the cost only."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _qk(self, linear: nn.Linear, x: torch.Tensor, guidance: Optional[torch.Tensor], images: int):
        if guidance is None:
            return linear(x)
        # x: windows of every class (B*n*nW, T, C); guidance: windows of each image (B*nW, T, G), shared by its
        # classes: per image, (n, nW*T, C) tokens against (1, nW*T, G) guidance
        tokens = guidance.shape[0] // images * guidance.shape[1]
        out = split_linear(linear, x.view(images, -1, tokens, x.shape[-1]),
                           guidance.view(images, 1, tokens, guidance.shape[-1]))
        return out.view(x.shape[0], x.shape[1], -1)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                images: int, windows: int) -> torch.Tensor:
        """x (B*n*nW, T, C) windows of B images x n classes, nW = `windows` per map; guidance (B*nW, T, G) or None;
        bias (1, nW*heads, T, T) or None (shifted windows) -> (B*n*nW, T, C)."""
        q, k, v = self._qk(self.q, x, guidance, images), self._qk(self.k, x, guidance, images), self.v(x)
        return self.proj(self.attend(q, k, v, bias, windows).permute(0, 1, 3, 2, 4).reshape(x.shape))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
               windows: int) -> torch.Tensor:
        """Fused attention of q, k, v (maps * windows, T, C) within each window -> (maps, windows, heads, T, d), a
        view of the attention's output in whatever layout it has."""
        t, c = q.shape[1:]
        heads = self.num_heads
        if bias is None:  # (windows, heads, T, d) views: fused attention without a mask
            q, k, v = (z.view(z.shape[0], t, heads, -1).transpose(1, 2) for z in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v).unflatten(0, (-1, windows))
        # windows and heads share the head axis, so the per-window bias broadcasts over the batch
        q, k, v = (z.view(-1, windows, t, heads, c // heads).transpose(2, 3).reshape(-1, windows * heads, t, c // heads)
                   for z in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).unflatten(1, (windows, heads))


class GuidedSwinBlock(nn.Module):
    """Pre-LN Swin block (no relative position bias) with guidance concatenated to query and key inputs."""

    # inference (see catseg.inference.fused_kernels): the block as two kernels, one up to its queries, keys and
    # values, one for the rest with the attention inside (catseg.kernels.window_qkv / window_block); with
    # fused_attention "sdpa", PyTorch's fused attention between the first and a kernel for the rest (window_output)
    fused = False
    fused_attention = "kernel"

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = RecomputedMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor], images: int = 1) -> torch.Tensor:
        """x (B*n, H, W, C) for B images of n classes each, guidance (B, H, W, G) (shared by an image's classes)
        or None."""
        b, h, w, c = x.shape
        win = (self.window, self.window)
        windows = (h // self.window) * (w // self.window)
        if self.fused and not torch.is_grad_enabled():
            qkv = kernels.window_qkv(self, x, guidance, images)
            if self.fused_attention == "kernel":
                return kernels.window_block(self, *qkv, x)
            bias = _shift_bias(h, w, self.window, self.shift, self.attn.num_heads, x.device,
                               compute_dtype(x, self.attn.q.weight)) if self.shift else None
            return kernels.window_output(self, self.attn.attend(*qkv, bias, windows), x)
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
            guidance = None if guidance is None else torch.roll(guidance, (-self.shift, -self.shift), dims=(1, 2))
        bias = _shift_bias(h, w, self.window, self.shift, self.attn.num_heads, x.device, y.dtype) \
            if self.shift else None
        yw = window_partition(y, win).flatten(1, 2)
        gw = None if guidance is None else window_partition(guidance, win).flatten(1, 2)
        y = self.attn(yw, gw, bias, images, windows).view(-1, self.window, self.window, c)
        y = window_reverse(y, win, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SpatialAggregation(nn.Module):
    """T^sa: a window block then a shifted-window block, run on every class slice independently."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.guidance_norm = LayerNorm(guidance_dim) if guidance_dim else None
        self.blocks = nn.ModuleList([
            GuidedSwinBlock(dim, guidance_dim, num_heads, window, 0, mlp_ratio),
            GuidedSwinBlock(dim, guidance_dim, num_heads, window, window // 2, mlp_ratio),
        ])

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, n, C, H, W), guidance (B, G, H, W) or None -> (B, n, C, H, W)."""
        b, n = x.shape[:2]
        y = rearrange(x, "b n c h w -> (b n) h w c")
        g = None
        if guidance is not None and self.guidance_norm is not None:
            g = self.guidance_norm(rearrange(guidance, "b c h w -> b h w c"))  # once per image, not per class
        for block in self.blocks:
            y = block(y, g, b)
        return rearrange(y, "(b n) h w c -> b n c h w", b=b)


def _elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


class ClassAggregation(nn.Module):
    """T^ca: per pixel, a pre-LN linear-attention transformer over the classes (no positional embedding), on classes
    held as chunks.

    Linear attention out_n = phi(q_n) S / (phi(q_n) z) with S = sum_m phi(k_m) v_m^T and z = sum_m phi(k_m); S and z
    are accumulated over class chunks, so the result does not depend on the chunking.
    """

    # inference (see catseg.inference.fused_kernels): the block as two kernels, the summary and the update with its
    # feed-forward half (catseg.kernels.class_summary / class_update); where the block is not fused whole
    # (`fuses_whole_block` False, or a pooling block) its feed-forward half alone
    fused = False
    fuses_whole_block = True

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, mlp_ratio: float, pool: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.pool, self.eps = num_heads, pool, eps
        self.norm1 = LayerNorm(dim)
        self.guidance_norm = LayerNorm(guidance_dim) if guidance_dim else None
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = RecomputedMlp(dim, int(dim * mlp_ratio), act_layer=nn.ReLU)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        # (B, n, C, H, W) -> (B, HW, n, C), pooled 2x2 during training as the reference release does.
        if self.training and self.pool > 1:
            b, n = x.shape[:2]
            x = F.avg_pool2d(x.flatten(0, 1), self.pool).unflatten(0, (b, n))
        return rearrange(x, "b n c h w -> b (h w) n c")

    @staticmethod
    def _qk(linear: nn.Linear, t: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        # the text guidance (1, 1, n, G) is projected once per class and broadcast over images and pixels
        return linear(t) if guidance is None else split_linear(linear, t, guidance)

    def forward(self, xs: Sequence[torch.Tensor], guidance: Optional[torch.Tensor],
                chunks: Sequence[slice]) -> list[torch.Tensor]:
        """The block on classes held as chunks: xs[i] (B, n_i, C, H, W) holds the classes chunks[i] of guidance
        (N, G) or None; returns the chunks' outputs (B, n_i, C, H, W), never joined into one tensor."""
        g = None
        if guidance is not None and self.guidance_norm is not None:
            g = self.guidance_norm(guidance)[None, None]  # (1, 1, N, G)
        kv = z = None
        for x, sl in zip(xs, chunks):  # pass 1: the key/value summary over all classes
            kv_i, z_i = self.summary(x, None if g is None else g[:, :, sl])
            kv, z = (kv_i, z_i) if kv is None else (kv + kv_i, z + z_i)
        # pass 2: the queries of each chunk read the summary
        return [self.update(x, None if g is None else g[:, :, sl], kv, z) for x, sl in zip(xs, chunks)]

    def summary(self, xs: torch.Tensor, g: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk's share of the summary: xs (B, n, C, H, W), g (1, 1, n, G) or None -> S (B, P, heads, d, d)
        and z (B, P, heads, d), P pixels."""
        if self._whole_block_kernels():
            return kernels.class_summary(self, xs, g)
        t = self.norm1(self._tokens(xs))
        k = _elu_feature_map(rearrange(self._qk(self.k, t, g), "b p n (h d) -> b p n h d", h=self.num_heads))
        v = rearrange(self.v(t), "b p n (h d) -> b p n h d", h=self.num_heads)
        return torch.einsum("bpnhd,bpnhe->bphde", k, v), k.sum(dim=2)

    def update(self, xs: torch.Tensor, g: Optional[torch.Tensor], kv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The block's output for one chunk xs (B, n, C, H, W), its queries reading the summary (kv, z)."""
        if self._whole_block_kernels():
            return kernels.class_update(self, xs, g, kv, z)
        t0 = self._tokens(xs)
        t = self.norm1(t0)
        q = _elu_feature_map(rearrange(self._qk(self.q, t, g), "b p n (h d) -> b p n h d", h=self.num_heads))
        num = torch.einsum("bpnhd,bphde->bpnhe", q, kv)
        den = torch.einsum("bpnhd,bphd->bpnh", q, z).unsqueeze(-1) + self.eps
        y = t0 + self.proj(rearrange(num / den, "b p n h e -> b p n (h e)"))
        if self.fused and not torch.is_grad_enabled():
            y = kernels.residual_mlp(y, self.norm2, self.mlp)
        else:
            y = y + self.mlp(self.norm2(y))
        return self._residual(xs, y - t0)

    def _whole_block_kernels(self) -> bool:
        return (self.fused and self.fuses_whole_block and not torch.is_grad_enabled()
                and not (self.training and self.pool > 1))

    def _residual(self, xs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        b, n, c, h, w = xs.shape
        hp, wp = (h // self.pool, w // self.pool) if (self.training and self.pool > 1) else (h, w)
        delta = rearrange(delta, "b (h w) n c -> (b n) c h w", h=hp, w=wp)
        if (hp, wp) != (h, w):
            delta = resize(delta, (h, w))
        return xs + delta.unflatten(0, (b, n))


class AggregationLayer(nn.Module):
    """One of the N_B layers: spatial aggregation per class, then class aggregation per pixel."""

    def __init__(self, dim, appearance_dim, text_dim, num_heads, window, mlp_ratio, pool, spatial=True, klass=True):
        super().__init__()
        self.spatial = SpatialAggregation(dim, appearance_dim, num_heads, window, mlp_ratio) if spatial else None
        self.klass = ClassAggregation(dim, text_dim, num_heads, mlp_ratio, pool) if klass else None
        self.grad_checkpointing = False

    def forward(self, xs, appearance, text, chunks) -> list[torch.Tensor]:
        """The layer on classes held as chunks: xs[i] (B, n_i, C, H, W) holds the classes chunks[i]; appearance
        guidance (B, G, H, W) or None, text guidance (N, G') or None. The chunks are never joined, so no copy of the
        whole cost volume embedding is made between the stages (847 classes: 0.6 GB per copy)."""
        if self.spatial is not None:
            run = self.spatial
            with part("spatial aggregation"):
                if self.grad_checkpointing and self.training:
                    xs = [checkpoint(run, x, appearance, use_reentrant=False) for x in xs]
                else:
                    xs = [run(x, appearance) for x in xs]
        if self.klass is not None:
            with part("class aggregation"):
                xs = self.klass(xs, text, chunks)
        return xs


class DoubleConv(nn.Sequential):
    """(3x3 conv, GroupNorm, ReLU) twice."""

    def __init__(self, cin: int, cout: int):
        groups = max(1, cout // 16)
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), GroupNorm(groups, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), GroupNorm(groups, cout), nn.ReLU(inplace=True),
        )


class UpStage(nn.Module):
    """Upsample x2, concatenate the projected backbone feature of that resolution, DoubleConv."""

    def __init__(self, cin: int, cout: int, guidance_dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "transposed":
            self.up = nn.ConvTranspose2d(cin, cin - guidance_dim, 2, stride=2)
            self.conv = DoubleConv(cin, cout)
        else:
            self.up = None
            self.conv = DoubleConv(cin + guidance_dim, cout)

    channels_last = False  # NHWC convolutions (see catseg.inference.decoder_channels_last)
    # bilinear mode, compiled: the x2 upsampling as a pointwise stencil inductor fuses with its neighbours instead of
    # two matrix products and a layout copy (catseg.ops.upsample2x; switched by catseg.inference.stencil_upsampling,
    # which inference turns on)
    stencil = False

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B*n, C, H, W); guidance (B, G, 2H, 2W), shared by the n classes of each image."""
        def layout(t):  # NHWC input: cuDNN runs the convolution NHWC, whatever the weight's layout
            return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t is not None else t

        # conv(cat([x, guidance])) == conv_x(x) + conv_g(guidance): the guidance half runs once per image
        first = self.conv[0]
        wx = first.weight[:, :first.in_channels - (0 if guidance is None else guidance.shape[1])]
        if self.up is not None:
            x = self.up(layout(x))
        else:
            x = upsample2x(x) if self.stencil else resize(x, (2 * x.shape[-2], 2 * x.shape[-1]))
        y = layout(F.conv2d(layout(x), wx, None, first.stride, first.padding))
        guidance = layout(guidance)
        if guidance is not None:
            g = F.conv2d(guidance, first.weight[:, wx.shape[1]:], None, first.stride, first.padding)
            y = (y.unflatten(0, (g.shape[0], -1)) + g.unsqueeze(1)).flatten(0, 1)
        for layer in list(self.conv)[1:]:
            y = layer(y)
        return y
