"""GPU-only checks of the fast inference paths (skipped without CUDA; `bash benchmarks/gpu_bench.sh OUT tests` runs
them on a GPU machine): CUDA-graph capture succeeds, eager or compiled, also with the sub-pixel decoder, and replays
what an eager run computes; bf16 weights are bit-identical to autocast's casts (also through the sub-pixel decoder);
channels-last convolutions match the NCHW ones; the guidance Swin's window attention takes a fused kernel; the whole-model compiled training step (also with torch.compile's
own CUDA graphs) follows the eager one; the training step never waits for the GPU."""
import warnings

import pytest
import torch

import catseg
from catseg import inference
from catseg.inference import Segmenter, cast_matmul_weights, channels_last
from catseg.ops import one_hot_bce_with_logits, resize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NAMES = [f"thing {i}" for i in range(6)]


def _model():
    torch.manual_seed(0)
    return catseg.create_model("catseg_tiny", zero_init_residual=False, class_chunk_size=4)


def _image():
    return torch.rand(3, 200, 260, generator=torch.Generator().manual_seed(3))


def _predict_without_capture_failure(seg: Segmenter, names=NAMES):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = seg.predict(_image(), names)[0]
    failed = [str(w.message) for w in caught if "CUDA graph capture failed" in str(w.message)]
    assert not failed, failed
    assert all(entry is not False for entry in inference._GRAPHS[seg.model].values())
    return out


@pytest.mark.parametrize("compile", [False, True])
def test_graph_capture_succeeds_and_replays_the_eager_result(compile):
    """Eager or compiled (with the stencil upsampling Segmenter turns on): the graph captures and replays what the
    plain eager model computes."""
    model = _model()
    eager = Segmenter(model, device="cuda", cuda_graphs=False).predict(_image(), NAMES)[0]
    assert all(stage.stencil for stage in model.decoder)
    if compile:
        inference.compile_aggregation(model)
    graphed = _predict_without_capture_failure(Segmenter(model, device="cuda"))
    again = Segmenter(model, device="cuda").predict(_image(), NAMES)[0]  # a replay of the captured graph
    torch.testing.assert_close(torch.from_numpy(again.scores), torch.from_numpy(graphed.scores), rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(graphed.scores), torch.from_numpy(eager.scores), rtol=0, atol=2e-2)
    assert (graphed.labels == eager.labels).mean() > 0.9


def test_compiled_code_with_a_dynamic_class_dimension_captures_and_matches_eager():
    """Vocabularies in chunks of new sizes make the compiled class dimension dynamic; the dynamic code captures too
    and computes what the eager model does."""
    model = _model()
    vocabularies = [NAMES, [f"other {i}" for i in range(11)], [f"more {i}" for i in range(14)]]  # chunks 3,3 / 3,4,4
    eager = [Segmenter(model, device="cuda", cuda_graphs=False).predict(_image(), v)[0] for v in vocabularies]
    inference.compile_aggregation(model)
    seg = Segmenter(model, device="cuda")
    for names, reference in zip(vocabularies, eager):
        out = _predict_without_capture_failure(seg, names)
        torch.testing.assert_close(torch.from_numpy(out.scores), torch.from_numpy(reference.scores), rtol=0,
                                   atol=2e-2)
        assert (out.labels == reference.labels).mean() > 0.9


def test_bf16_weights_are_bit_identical_to_autocast_casts_on_cuda():
    model = _model().cuda().eval()
    views = torch.rand(5, 3, model.image_size, model.image_size, device="cuda")
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            before = model(views, NAMES)
            cast_matmul_weights(model, torch.bfloat16)
            after = model(views, NAMES)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    assert torch.equal(before, after)


def test_channels_last_matches_nchw_on_cuda():
    """cuDNN's NHWC bf16 convolutions (backbone, cost embedding, decoder: catseg.inference.channels_last) give the
    NCHW logits within bf16 rounding."""
    model = _model().cuda().eval()
    views = torch.rand(5, 3, model.image_size, model.image_size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        before = model(views, NAMES).float()
        channels_last(model)
        after = model(views, NAMES).float()
    torch.testing.assert_close(after, before, rtol=0, atol=0.1)


def test_swin_backbone_window_attention_takes_a_fused_kernel_on_cuda():
    """The guidance Swin's window attention (`catseg.model.WindowAttentionSDPA`) runs in bf16 with PyTorch's math
    attention switched off, so a fused kernel takes its broadcast per-(window, head) bias; it equals timm's path
    within bf16 rounding. Windows of 12 x 12 tokens, as Swin-B's."""
    import copy

    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from catseg.model import use_fused_window_attention

    torch.manual_seed(0)
    body = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True, img_size=192,
                             window_size=12, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8),
                             out_indices=(0, 1, 2)).cuda().eval()
    fused = copy.deepcopy(body)
    assert use_fused_window_attention(fused) == 6
    x = torch.randn(5, 3, 192, 192, device="cuda")
    fast = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = body(x)
        with sdpa_kernel(fast):
            out = fused(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("compile, attention", [(False, "kernel"), (True, "kernel"), (True, "sdpa")])
def test_fused_kernels_match_the_modules_and_capture(compile, attention):
    """The Triton kernels of the aggregation blocks (catseg.inference.fused_kernels), autotuned at the first call,
    eager or inside the compiled aggregation, captured in the inference graph: the plain model's scores within bf16
    rounding; in fp32 (TF32 off) its logits."""
    model = _model()
    eager = Segmenter(model, device="cuda", cuda_graphs=False).predict(_image(), NAMES)[0]
    inference.fused_kernels(model, attention=attention)
    if compile:
        inference.compile_aggregation(model)
    fused = _predict_without_capture_failure(Segmenter(model, device="cuda"))
    torch.testing.assert_close(torch.from_numpy(fused.scores), torch.from_numpy(eager.scores), rtol=0, atol=2e-2)
    assert (fused.labels == eager.labels).mean() > 0.9
    model = _model().cuda().eval()  # fp32 weights, TF32 off: the kernel's products in full precision
    views = torch.rand(5, 3, model.image_size, model.image_size, device="cuda")
    with torch.no_grad():
        plain = model(views, NAMES)
        fused = inference.fused_kernels(model, attention=attention)(views, NAMES)
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, stencil", [(None, False), ("reduce-overhead", False), (None, True)])
def test_whole_model_compiled_training_follows_the_eager_steps(mode, stencil):
    """As the trainer's train.compile: true (and the bench's --compile-model [--compile-mode reduce-overhead]):
    forward and backward compiled as one graph each, bf16 autocast, fused AdamW; losses step by step as eager. Also
    with the stencil upsampling (train.stencil_upsampling, off by default in training), whose generated GPU kernels
    only a GPU compiles."""
    from torch._dynamo.utils import counters

    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _model().cuda().train()
        model.config.class_chunk_size = None
        model.check_inputs = False
        model.text_embeddings(NAMES)  # the vocabulary encoded (and its prompts tokenized) first, as the trainer does
        inference.stencil_upsampling(model, stencil)
        if compiled:
            model.compile(**({"mode": mode} if mode else {}))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        s = model.image_size
        losses[compiled] = []
        for _ in range(4):
            images = torch.rand(2, 3, s, s, device="cuda", generator=gen)
            labels = torch.randint(0, len(NAMES), (2, s, s), device="cuda", generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(images, NAMES)
            valid = torch.ones_like(labels, dtype=torch.bool)
            loss = one_hot_bce_with_logits(resize(logits.float(), (s, s)), labels, valid).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[compiled].append(loss.item())
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("nhwc", [False, True])
def test_training_step_never_waits_for_the_gpu(nhwc):
    """The trainer's step (forward under bf16 autocast, PixelBCECriterion, backward, global gradient clipping, fused
    AdamW, the learning-rate schedule) makes no host-device synchronisation: CUDA's sync debug mode raises on any
    (an item(), a blocking copy, a data-dependent shape). Also with train.channels_last."""
    from training.config import OptimConfig, ScheduleConfig
    from training.criterion import PixelBCECriterion
    from training.optim import LRSchedule, build_optimizer

    model = _model().cuda().train()
    model.config.class_chunk_size = None
    model.check_inputs = False  # as the trainer: the input range check is the one sync the forward can make
    if nhwc:
        channels_last(model)
    model.text_embeddings(NAMES)
    opt = build_optimizer(model, OptimConfig())
    schedule = LRSchedule(opt, 10, ScheduleConfig())
    criterion = PixelBCECriterion(255, mask_ignore=True)
    s = model.image_size
    images = torch.rand(2, 3, s, s, device="cuda")
    labels = torch.randint(0, len(NAMES), (2, s, s), device="cuda")
    labels[:, :4] = 255
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(model(images, NAMES), labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.01)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        return loss.detach(), norm

    step()  # the first step makes the optimizer state and lets cuDNN pick its algorithms
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.stack(r)).all() for r in results)
