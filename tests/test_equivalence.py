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


@pytest.mark.parametrize("window, shift", [(4, 0), (4, 2), (3, 1), (5, 4)])
@pytest.mark.parametrize("guidance", [0, 6])
def test_windowed_sdpa_equals_full_masked_attention(window, shift, guidance):
    torch.manual_seed(0)
    block = GuidedSwinBlock(dim=16, guidance_dim=guidance, num_heads=2, window=window, shift=shift, mlp_ratio=2.0)
    h, w = 2 * window, 3 * window
    x = torch.randn(3, h, w, 16)
    g = torch.randn(3, h, w, guidance) if guidance else None
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


@pytest.mark.parametrize("n, chunk, sizes", [(847, 128, [121] * 7), (150, 128, [75, 75]), (129, 128, [64, 65]),
                                              (13, 4, [3, 3, 3, 4]), (128, 128, [128]), (5, None, [5]), (1, 4, [1])])
def test_class_chunks_are_as_few_and_as_even_as_the_chunk_size_allows(n, chunk, sizes):
    slices = chunk_slices(n, chunk)
    assert [s.stop - s.start for s in slices] == sizes
    assert slices[0].start == 0 and slices[-1].stop == n and all(a.stop == b.start for a, b in zip(slices, slices[1:]))


@pytest.mark.parametrize("chunk", [None, 1, 3, 5])
def test_chunked_linear_class_attention_equals_explicit(chunk):
    torch.manual_seed(1)
    mod = ClassAggregation(dim=8, guidance_dim=4, num_heads=2, mlp_ratio=2.0, pool=2).eval()
    x = torch.randn(2, 7, 8, 3, 4)
    guidance = torch.randn(7, 4)
    with torch.no_grad():
        chunks = chunk_slices(7, chunk)
        fast = torch.cat(mod([x[:, sl] for sl in chunks], guidance, chunks), dim=1)
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


def test_swin_block_guidance_shared_by_classes_equals_repeated():
    """One guidance map per image, broadcast over its classes, equals the guidance repeated for every class."""
    torch.manual_seed(2)
    images, classes = 2, 3
    for shift in (0, 2):
        block = GuidedSwinBlock(dim=16, guidance_dim=6, num_heads=2, window=4, shift=shift, mlp_ratio=2.0)
        x = torch.randn(images * classes, 8, 12, 16)
        g = torch.randn(images, 8, 12, 6)
        with torch.no_grad():
            ref = naive_swin_block(block, x, g.repeat_interleave(classes, dim=0))
            torch.testing.assert_close(block(x, g, images), ref, rtol=1e-4, atol=1e-5)


def test_upstage_split_convolution_equals_concatenation():
    from catseg.aggregation import UpStage

    torch.manual_seed(3)
    stage = UpStage(cin=12, cout=8, guidance_dim=4, mode="bilinear").eval()
    x = torch.randn(2 * 5, 12, 6, 6)  # 2 images x 5 classes
    g = torch.randn(2, 4, 12, 12)
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    ref = stage.conv(torch.cat([up, g.repeat_interleave(5, dim=0)], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(stage(x, g), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,size", [((2, 3, 24, 24), (48, 48)), ((1, 5, 96, 96), (384, 384)),
                                        ((2, 1, 640, 640), (375, 500)), ((3, 2, 13, 17), (29, 11))])
def test_matrix_resize_equals_interpolate(shape, size):
    from catseg.ops import resize

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize(x, size), ref, rtol=1e-12, atol=1e-12)


def plain_merge(model, probs, out_size):
    """Patch-inference merging step by step: upsample crops, mosaic / count, average with the global view, resize."""
    from catseg.inference import crop_offsets

    cfg = model.config
    s, size = model.image_size, cfg.inference_size
    offs = crop_offsets(size, s, cfg.inference_stride)
    b, v, n = probs.shape[:3]
    up = F.interpolate(probs.flatten(0, 1), size=(s, s), mode="bilinear", align_corners=False).view(b, v, n, s, s)
    mosaic, count = probs.new_zeros(b, n, size, size), probs.new_zeros(1, 1, size, size)
    views = [(y, x) for y in offs for x in offs]
    for i, (y, x) in enumerate(views):
        mosaic[..., y:y + s, x:x + s] += up[:, i]
        count[..., y:y + s, x:x + s] += 1
    glob = F.interpolate(up[:, -1], size=(size, size), mode="bilinear", align_corners=False)
    merged = (mosaic / count + glob) / 2
    return merged, F.interpolate(merged, size=out_size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("side", [32, 128])  # maps below the crop size (the sigmoid first) and at it (the default)
@pytest.mark.parametrize("out_size", [None, (192, 192), (150, 230), (400, 301)])
def test_matrix_merge_equals_plain_mosaic(tiny_model, out_size, side):
    from catseg.inference import merge_views, view_scores

    nv = len(catseg.inference.crop_offsets(192, 128, 64)) ** 2 + 1
    probs = torch.rand(2, nv, 7, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    before = probs.clone()
    merged, resized = plain_merge(tiny_model, probs, out_size or (192, 192))
    torch.testing.assert_close(merge_views(tiny_model, probs, out_size), resized, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(view_scores(tiny_model, probs), merged.mean(dim=(2, 3)), rtol=1e-10, atol=1e-10)
    assert torch.equal(probs, before), "the views' maps are left as they were"
    with pytest.raises(ValueError, match=rf"expected \(B, {nv}, n, h, h\) view probabilities"):
        merge_views(tiny_model, probs[:, 1:], out_size)


def test_norms_keep_bf16_under_autocast():
    from catseg.ops import GroupNorm, LayerNorm

    torch.manual_seed(4)
    ln, gn = LayerNorm(16), GroupNorm(4, 16)
    for mod, x in ((ln, torch.randn(3, 5, 16)), (gn, torch.randn(3, 16, 4, 4))):
        nn_ref = torch.nn.LayerNorm(16) if mod is ln else torch.nn.GroupNorm(4, 16)
        nn_ref.load_state_dict(mod.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mod(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), nn_ref(x.bfloat16().float()), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(mod(x), nn_ref(x))  # float32 outside autocast: the plain module


@pytest.mark.parametrize("mask_ignore", [True, False])
def test_one_hot_bce_equals_bce_on_a_dense_one_hot_target(mask_ignore):
    """The trainer's loss (softplus minus the labelled logit, no one-hot tensor) equals BCE-with-logits against the
    dense one-hot target, in value and gradient, ignored pixels masked or given an all-zero target."""
    from training.criterion import PixelBCECriterion

    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 5, 6, 6, generator=g) * 8).requires_grad_()  # large logits exercise softplus' tails
    labels = torch.randint(0, 5, (2, 24, 24), generator=g)
    labels[0, :3] = 255
    loss = PixelBCECriterion(255, mask_ignore)(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)

    up = F.interpolate(logits.double(), size=(24, 24), mode="bilinear", align_corners=False)
    valid = labels != 255
    target = F.one_hot(torch.where(valid, labels, 0), 5).permute(0, 3, 1, 2).double() * valid.unsqueeze(1)
    dense = F.binary_cross_entropy_with_logits(up, target, reduction="none")
    per_image = (dense * valid.unsqueeze(1)).sum((1, 2, 3)) / (valid.sum((1, 2)) * 5)  # each image's labelled pixels
    ref = per_image.mean() if mask_ignore else dense.mean()
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-5, atol=1e-9)


def test_bf16_matmul_weights_give_bit_identical_autocast_outputs():
    """cast_matmul_weights stores the image path's linear/conv/attention weights in bf16: under bf16 autocast the
    outputs are bit-identical (autocast rounds each weight the same way on every call); norms and the text tower keep
    fp32; casting back to fp32 runs plain fp32 again. nn.MultiheadAttention's fused path is off, as under CUDA autocast
    (CPU autocast does not turn it off, and the fused kernel is another computation)."""
    from catseg.inference import cast_matmul_weights
    from catseg.memcount import mha_unfused

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False).eval()
    names = [f"thing {i}" for i in range(6)]
    views = torch.rand(5, 3, model.image_size, model.image_size)
    with mha_unfused(), torch.no_grad():
        plain = model(views, names)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = model(views, names)
            cast_matmul_weights(model, torch.bfloat16)
            after = model(views, names)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        cast_matmul_weights(model, torch.float32)
        back = model(views, names)
    assert torch.equal(before, after)
    bf16 = {n for n, d in dtypes.items() if d == torch.bfloat16}
    assert any(n.startswith("clip.model.visual.") and "attn.in_proj" in n for n in bf16)
    assert {"cost_embed.weight", "head.weight"} <= bf16 and any(n.startswith("layers.") for n in bf16)
    norms = {f"{m}.{p}" for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)
             if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase))}
    assert norms and not bf16 & norms and not any(n.startswith("clip.model.transformer.") for n in bf16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(back, plain, atol=0.1, rtol=0.05)  # weights rounded to bf16 once


def test_channels_last_backbone_equals_nchw_backbone():
    """backbone_channels_last stores the ResNet's weights NHWC: same features (still NCHW), same logits."""
    from catseg.inference import backbone_channels_last

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    ref = _logits(model, x, ["a", "b", "c"])
    backbone_channels_last(model)
    conv = model.backbone.body.conv1[0] if isinstance(model.backbone.body.conv1, torch.nn.Sequential) \
        else model.backbone.body.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    with torch.no_grad():
        feats = model.backbone(x)
    assert all(f.is_contiguous() for f in feats)
    torch.testing.assert_close(_logits(model, x, ["a", "b", "c"]), ref, rtol=1e-4, atol=1e-4)
    backbone_channels_last(model, False)
    assert conv.weight.is_contiguous()


def _grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_runs(first, second, trained: str, rtol: float, atol: float, grad_atol: float) -> None:
    """Two (output, gradients) runs agree: the outputs within rtol/atol, the same parameters (some under `trained`)
    got gradients, and each gradient agrees."""
    (out0, grads0), (out1, grads1) = first, second
    torch.testing.assert_close(out1, out0, rtol=rtol, atol=atol)
    assert grads0.keys() == grads1.keys() and any(n.startswith(trained) for n in grads0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-3, atol=grad_atol, msg=n)


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("n, chunk", [(3, None), (40, 16), (847, 128)])
def test_channels_last_inference_equals_nchw(n, chunk):
    """Inference as Segmenter runs it (catseg.inference.channels_last): the cost embedding and every decoder stage
    run NHWC, one class chunk or several, and the logits equal the NCHW run's."""
    from catseg.inference import channels_last

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False, class_chunk_size=chunk).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    names = [f"c{i}" for i in range(n)]
    ref = _logits(model, x, names)
    layouts = []
    hooks = [m.register_forward_hook(lambda module, inputs, out: layouts.append(_nhwc(out)))
             for m in (model.cost_embed, *model.decoder)]
    channels_last(model)
    out = _logits(model, x, names)
    channels_last(model, False)
    back = _logits(model, x, names)
    for h in hooks:
        h.remove()
    calls = len(chunk_slices(n, chunk)) * (1 + len(model.decoder))
    assert layouts == [True] * calls + [False] * calls
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(back, ref, rtol=0, atol=0)


@pytest.mark.parametrize("upsample", ["bilinear", "transposed"])
def test_channels_last_backbone_and_decoder_train_as_nchw(upsample):
    """In training (train.channels_last): the inputs of the backbone, the cost embedding and each decoder stage go
    NHWC, so their convolutions run NHWC even with NCHW weights (as DeepSpeed re-packs them); the loss and every
    gradient equal the NCHW run's."""
    from catseg.inference import channels_last

    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    names = ["a", "b", "c"]
    results = []
    for nhwc in (False, True):
        torch.manual_seed(0)
        model = catseg.create_model("catseg_tiny", zero_init_residual=False, decoder_upsample=upsample)  # training
        if nhwc:
            channels_last(model)
            for p in model.backbone.parameters():  # weights re-packed contiguous, the input conversion stays
                p.data = p.data.contiguous()
        layouts = []
        hooks = [m.register_forward_hook(lambda module, inputs, out: layouts.append(_nhwc(out)))
                 for m in (model.backbone.body.layer2, model.cost_embed, *model.decoder)]
        loss = model(x, names).sigmoid().square().mean()
        loss.backward()
        for h in hooks:
            h.remove()
        assert layouts == [nhwc] * (2 + len(model.decoder))
        results.append((loss.detach(), _grads(model)))
    _assert_same_runs(*results, "backbone.", rtol=1e-5, atol=1e-6, grad_atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 2, 2, 3), (2, 4, 7, 5), (1, 3, 24, 24)])
def test_upsample_stencil_and_its_adjoint_equal_bilinear_upsampling(shape):
    """The x2 bilinear upsampling as a stencil along each axis (catseg.ops.upsample2x under torch.compile) and its
    written-out adjoint: F.interpolate's values and gradients to float64 rounding, edges and 1-pixel maps too."""
    from catseg.ops import _Upsample2xAxis

    g = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    out = _Upsample2xAxis.apply(_Upsample2xAxis.apply(x, -1), -2)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    up = torch.randn(out.shape, dtype=torch.float64, generator=g)
    torch.testing.assert_close(torch.autograd.grad((out * up).sum(), x)[0],
                               torch.autograd.grad((ref * up).sum(), x)[0], rtol=0, atol=1e-13)


def test_compiled_decoder_with_the_stencil_upsampling_fuses_it():
    """With `stencil_upsampling`, the compiled decoder (channels-last, as inference and training run it) gives the
    plain decoder's output and input gradient, and its compiled forward has no matrix products (the plain one has
    two per stage for the upsampling) and its backward no scattered adds."""
    from torch._inductor.utils import run_and_get_code

    from catseg.inference import decoder_channels_last, stencil_upsampling

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False)
    decoder_channels_last(model)
    cfg, g = model.config, torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, cfg.embed_dim, model.grid, model.grid, generator=g, requires_grad=True)
    feats = [torch.randn(2, d, model.grid * 2 ** (i + 1), model.grid * 2 ** (i + 1), generator=g) if d else None
             for i, d in enumerate(cfg.decoder_guidance_dims)]
    up = torch.randn(2, 3, 4 * model.grid, 4 * model.grid, generator=g)

    def step(decode):
        out = decode(x, feats)
        return out, torch.autograd.grad((out * up).sum(), x)[0]

    reference = step(model.decode)
    assert stencil_upsampling(model) is model and all(stage.stencil for stage in model.decoder)
    assert step(model.decode)[0].equal(reference[0])  # eagerly: unchanged (resize's matrix products)
    torch._dynamo.reset()
    result, (forward, backward) = run_and_get_code(lambda: step(torch.compile(model.decode, fullgraph=True)))
    for a, b in zip(result, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    forward, backward = forward[forward.index("def call("):], backward[backward.index("def call("):]
    assert "extern_kernels.mm(" not in forward and "extern_kernels.bmm(" not in forward, forward
    assert forward.count("extern_kernels.convolution(") == 3 * len(model.decoder) + 1  # x, guidance, second; head
    assert "index_put" not in backward and "scatter" not in backward, backward


def _aten_ops(fn) -> set[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        out = fn()
    return out, ops.names


@pytest.mark.parametrize("grad", ["none", "frozen"])
def test_swin_backbone_fused_window_attention_equals_timm(grad):
    """The guidance Swin's window attention as one fused attention with a per-(window, head) bias equals timm's own
    (relative position bias, shifted windows' mask, a last stage whose window covers the whole map), eagerly in
    fp32 and bf16 and, for a frozen backbone, in its gradient to the input; and it runs without the attention matrix's
    softmax, which timm's path computes."""
    import copy

    import timm

    from catseg.model import WindowAttentionSDPA, use_fused_window_attention

    torch.manual_seed(0)
    timm_body = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True, img_size=112,
                                  embed_dim=24, depths=(2, 2, 2, 2), num_heads=(2, 3, 4, 4), out_indices=(0, 1, 2, 3))
    for m in timm_body.modules():  # a non-trivial relative position bias
        if hasattr(m, "relative_position_bias_table"):
            torch.nn.init.normal_(m.relative_position_bias_table, std=1.0)
    fused_body = copy.deepcopy(timm_body)
    assert use_fused_window_attention(fused_body) == 8
    assert all(type(m) is not WindowAttentionSDPA for m in timm_body.modules())
    timm_body.eval(), fused_body.eval()
    x = torch.randn(2, 3, 112, 112)
    if grad == "none":
        with torch.no_grad():
            ref, ref_ops = _aten_ops(lambda: timm_body(x))
            out, ops = _aten_ops(lambda: fused_body(x))
            assert "_softmax" in ref_ops and "_softmax" not in ops
            for a, b in zip(out, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref, out = timm_body(x), fused_body(x)
            for a, b in zip(out, ref):
                torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    else:  # a frozen backbone in a training step: the input's gradient still flows through it
        timm_body.requires_grad_(False), fused_body.requires_grad_(False)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ref, ref_ops = _aten_ops(lambda: timm_body(xs[0]))
        out, ops = _aten_ops(lambda: fused_body(xs[1]))
        assert "_softmax" not in ops
        sum(f.square().mean() for f in ref).backward()
        sum(f.square().mean() for f in out).backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-6)


def test_trained_swin_backbone_keeps_timm_attention_for_its_bias_gradient():
    """Where the relative position bias is trained, the fused module runs timm's path (the bias gets its gradient)."""
    import timm

    from catseg.model import use_fused_window_attention

    torch.manual_seed(0)
    body = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True, img_size=56,
                             embed_dim=16, depths=(2, 2), num_heads=(2, 2), out_indices=(0, 1))
    assert use_fused_window_attention(body) == 4
    out, ops = _aten_ops(lambda: body(torch.randn(1, 3, 56, 56)))
    sum(f.sum() for f in out).backward()
    assert "_softmax" in ops
    assert all(m.relative_position_bias_table.grad is not None for m in body.modules()
               if hasattr(m, "relative_position_bias_table"))
    assert use_fused_window_attention(body, False) == 4
