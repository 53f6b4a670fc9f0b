"""The fast paths equal plain reference computations, so speed work cannot change the model's function."""
import pytest
import torch
import torch.nn.functional as F

import catseg
from catseg.aggregation import ClassAggregation, GuidedSwinBlock, chunk_slices


def naive_swin_block(block: GuidedSwinBlock, x, g):
    """Full-grid softmax attention where a token sees exactly the tokens of its (shifted) window and region."""
    b, h, w, c = x.shape
    win, shift = block.window, block.shift
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ry, rx = (ys - shift) % h, (xs - shift) % w  # coordinates in the rolled frame
    window_id = (ry // win) * (w // win) + rx // win

    def region(r, n):  # Swin's three regions along an axis of the rolled frame
        return torch.where(r < n - win, 0, torch.where(r < n - shift, 1, 2)) if shift else torch.zeros_like(r)

    region_id = region(ry, h) * 3 + region(rx, w)
    wid, rid = window_id.flatten(), region_id.flatten()
    allowed = (wid[:, None] == wid[None, :]) & (rid[:, None] == rid[None, :])
    t = block.norm1(x).reshape(b, h * w, c)
    qk_in = torch.cat([t, g.reshape(b, h * w, -1)], -1) if g is not None else t
    heads = block.attn.num_heads
    q, k, v = (z.view(b, h * w, heads, -1).transpose(1, 2)
               for z in (block.attn.q(qk_in), block.attn.k(qk_in), block.attn.v(t)))
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, c)
    y = x + block.attn.proj(out).view(b, h, w, c)
    return y + block.mlp(block.norm2(y))


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("guidance", [0, 6])
def test_windowed_sdpa_equals_full_masked_attention(shift, guidance):
    torch.manual_seed(0)
    block = GuidedSwinBlock(dim=16, guidance_dim=guidance, num_heads=2, window=4, shift=shift, mlp_ratio=2.0)
    x = torch.randn(3, 8, 12, 16)
    g = torch.randn(3, 8, 12, guidance) if guidance else None
    with torch.no_grad():
        torch.testing.assert_close(block(x, g), naive_swin_block(block, x, g), rtol=1e-4, atol=1e-5)


def naive_class_aggregation(mod: ClassAggregation, x, guidance):
    """Per pixel, explicit linear attention over all classes: sum_m (phi(q_n).phi(k_m)) v_m / sum_m phi(q_n).phi(k_m)."""
    b, n, c, h, w = x.shape
    heads = mod.num_heads
    t0 = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, n, c)
    t = mod.norm1(t0)
    gi = mod.guidance_norm(guidance).expand(b * h * w, n, -1) if guidance is not None else None
    qk_in = torch.cat([t, gi], -1) if gi is not None else t
    q = (F.elu(mod.q(qk_in)) + 1).view(-1, n, heads, c // heads)
    k = (F.elu(mod.k(qk_in)) + 1).view(-1, n, heads, c // heads)
    v = mod.v(t).view(-1, n, heads, c // heads)
    out = torch.zeros_like(v)
    for i in range(n):
        weights = (q[:, i:i + 1] * k).sum(-1)  # (P, n, heads)
        out[:, i] = (weights.unsqueeze(-1) * v).sum(1) / (weights.sum(1).unsqueeze(-1) + mod.eps)
    y = t0 + mod.proj(out.reshape(-1, n, c))
    y = y + mod.mlp(mod.norm2(y))
    return y.view(b, h, w, n, c).permute(0, 3, 4, 1, 2)


@pytest.mark.parametrize("chunk", [None, 1, 3, 5])
def test_chunked_linear_class_attention_equals_explicit(chunk):
    torch.manual_seed(1)
    mod = ClassAggregation(dim=8, guidance_dim=4, num_heads=2, mlp_ratio=2.0, pool=2).eval()
    x = torch.randn(2, 7, 8, 3, 4)
    guidance = torch.randn(7, 4)
    with torch.no_grad():
        fast = mod(x, guidance, chunk_slices(7, chunk))
        torch.testing.assert_close(fast, naive_class_aggregation(mod, x, guidance), rtol=1e-4, atol=1e-5)


def _logits(model, x, names):
    with torch.no_grad():
        return model(x, names)


@pytest.mark.parametrize("n", [3, 40])
def test_bf16_autocast_within_tolerance(tiny_model, n):
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    names = [f"c{i}" for i in range(n)]
    ref = _logits(tiny_model, x, names)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _logits(tiny_model, x, names).float()
    err = (low - ref).abs()
    assert err.mean() < 0.02 * ref.abs().mean() + 1e-2 and err.max() < 0.1 * ref.abs().max() + 1e-2


def test_channels_last_equals_contiguous():
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    ref = _logits(model, x, ["a", "b", "c"])
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(_logits(model, x.contiguous(memory_format=torch.channels_last), ["a", "b", "c"]),
                               ref, rtol=1e-4, atol=1e-4)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", class_pool_train=1, zero_init_residual=False)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x, ["a", "b"]).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)
