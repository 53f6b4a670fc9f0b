"""The fused Triton kernels of the aggregation blocks (catseg.kernels), run on the CPU through Triton's interpreter
(conftest switches it on when there is no GPU; tests/test_gpu.py runs them compiled on a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.layers import Mlp
from torch import nn

import catseg
from catseg import aggregation, inference, kernels
from catseg.bench import main as bench_main, parse_args as bench_parse_args

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="needs triton (and a GPU or its interpreter)")


def _block(width: int, act, seed: int = 0):
    torch.manual_seed(seed)
    norm, mlp = nn.LayerNorm(width), Mlp(width, 4 * width, act_layer=act)
    nn.init.normal_(norm.weight, 1.0, 0.3)
    nn.init.normal_(norm.bias, 0.0, 0.3)
    return norm, mlp


@needs_kernels
@pytest.mark.parametrize("width, act, rows", [(32, nn.GELU, 370), (128, nn.ReLU, 65), (64, nn.GELU, 1)])
def test_residual_mlp_equals_the_modules(width, act, rows):
    """x + mlp(norm(x)) in fp32, and under bf16 autocast with bf16 or fp32 activations (output dtype as the modules
    give it), for row counts that do not fill the kernel's row blocks."""
    norm, mlp = _block(width, act)
    x = torch.randn(rows, 1, width)
    with torch.no_grad():
        exact = x + mlp(norm(x))
        torch.testing.assert_close(kernels.residual_mlp(x, norm, mlp), exact, rtol=1e-5, atol=1e-5)
        for xa in (x.bfloat16(), x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref = xa + mlp(norm(xa))
                out = kernels.residual_mlp(xa, norm, mlp)
            assert out.dtype == ref.dtype and out.shape == x.shape
            _as_close_as_the_modules(out, ref, exact)


def _as_close_as_the_modules(fused, plain, exact):
    """bf16 results: the fused one is as close to the float32 result as the modules' (it rounds at the same places,
    and accumulates longer in float32); the two differ by a few last places where a residual sum cancels."""
    fused_error, plain_error = (fused.float() - exact).abs(), (plain.float() - exact).abs()
    assert fused_error.mean() <= 1.1 * plain_error.mean() + 1e-6
    assert fused_error.max() <= 1.5 * plain_error.max() + 1e-6
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.02, atol=0.25)


def _calls(monkeypatch) -> dict:
    """Count the calls of the fused kernels' entry points."""
    calls = {"residual_mlp": 0, "class_summary": 0, "class_update": 0, "window_qkv": 0, "window_output": 0,
             "window_block": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call
    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name, getattr(kernels, name)))
    return calls


def _class_block(seed: int, guidance: int):
    torch.manual_seed(seed)
    block = aggregation.ClassAggregation(32, guidance, 2, 4.0, 2).eval()
    for p in block.parameters():  # no identity branches; norms away from 1 and 0
        nn.init.normal_(p, 1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0, 0.2)
    return block


@needs_kernels
@pytest.mark.parametrize("guidance, nhwc", [(16, True), (0, False)])
def test_class_aggregation_kernels_equal_the_block(guidance, nhwc):
    """class_summary and class_update against the block's summary and update: with and without text guidance, on
    channels-last or NCHW class maps, with 21 and 7 classes (partial class blocks), fp32 and bf16 autocast; the
    output keeps the input's strides."""
    block = _class_block(0, guidance)
    xs = [torch.randn(2, n, 32, 3, 5) for n in (21, 7)]
    if nhwc:  # as the spatial aggregation leaves them: (b, n, c, h, w) views of (b, n, h, w, c) tensors
        xs = [x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) for x in xs]
    g = torch.randn(1, 1, 28, guidance) if guidance else None
    chunks = [slice(0, 21), slice(21, 28)]
    g = None if g is None else g[0, 0]
    with torch.no_grad():
        plain = block(xs, g, chunks)
        block.fused = True
        fused = block(xs, g, chunks)
        for x, a, b in zip(xs, fused, plain):
            assert a.stride() == x.stride() and a.dtype == x.dtype
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xb = [x.bfloat16() for x in xs]
            fused = block(xb, g, chunks)
            block.fused = False
            plain_bf16 = block(xb, g, chunks)
    for a, b, exact in zip(fused, plain_bf16, plain):
        assert a.dtype == b.dtype == torch.bfloat16
        _as_close_as_the_modules(a, b, exact)


@needs_kernels
@pytest.mark.parametrize("guidance, shift", [(16, 2), (0, 0), (8, 0), (0, 2)])
@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_swin_block_kernels_equal_the_block(guidance, shift, attention):
    """window_qkv + window_block (the attention inside), or + fused attention + window_output, against the Swin
    block: shifted windows or not, with guidance per image or none, 2 images x 3 classes of 8 x 12 maps in windows
    of 4, fp32 and bf16 autocast."""
    torch.manual_seed(1)
    block = aggregation.GuidedSwinBlock(32, guidance, 2, 4, shift, 4.0).eval()
    block.fused_attention = attention
    for p in block.parameters():
        nn.init.normal_(p, 1.0 if p.ndim == 1 and p.shape[0] == 32 and p is not block.attn.proj.bias else 0.0, 0.2)
    x = torch.randn(6, 8, 12, 32)
    g = torch.randn(2, 8, 12, guidance) if guidance else None
    with torch.no_grad():
        plain = block(x, g, 2)
        block.fused = True
        fused = block(x, g, 2)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_bf16 = block(x.bfloat16(), g, 2)
            block.fused = False
            plain_bf16 = block(x.bfloat16(), g, 2)
    assert fused_bf16.dtype == torch.bfloat16
    _as_close_as_the_modules(fused_bf16, plain_bf16, plain)


@needs_kernels
@pytest.mark.parametrize("preset, classes, chunk", [("catseg_tiny", 3, None), ("catseg_tiny", 7, 4),
                                                    ("catseg2_tiny", 9, 4)])
def test_model_with_fused_kernels_equals_the_plain_model(monkeypatch, preset, classes, chunk):
    """Every Swin block and class aggregation block of the tiny presets takes the kernels, once per class chunk (the
    later design's class aggregation, with its padding classes and pooled residual, fuses its MLP only), and the
    logits equal the plain model's."""
    torch.manual_seed(0)
    model = catseg.create_model(preset, zero_init_residual=False, class_chunk_size=chunk).eval()
    images, names = torch.rand(2, 3, 128, 128), [f"class {i}" for i in range(classes)]
    calls = _calls(monkeypatch)
    with torch.no_grad():
        plain = model(images, names)
        assert not any(calls.values())
        fused = inference.fused_kernels(model)(images, names)
    chunks, layers = len(aggregation.chunk_slices(classes, chunk)), len(model.layers)
    swin = {"window_qkv": 2 * layers * chunks, "window_block": 2 * layers * chunks,  # two Swin blocks per layer
            "window_output": 0}
    if preset == "catseg_tiny":
        assert calls == {**swin, "residual_mlp": 0, "class_summary": layers * chunks, "class_update": layers * chunks}
    else:  # one more chunk: the padding classes
        assert calls == {**swin, "residual_mlp": layers * (chunks + 1), "class_summary": 0, "class_update": 0}
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(inference.fused_kernels(model, False)(images, names), plain, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("parts", [("class",), ("spatial",)])
def test_fused_kernels_of_one_part(monkeypatch, parts):
    """`parts` switches the blocks of one part only: the other part's blocks keep the modules (no kernel of theirs
    is called), and the logits still equal the plain model's; switching that part off again leaves the rest."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False, class_chunk_size=4).eval()
    images, names = torch.rand(1, 3, 128, 128), [f"class {i}" for i in range(6)]
    calls = _calls(monkeypatch)
    with torch.no_grad():
        plain = model(images, names)
        fused = inference.fused_kernels(model, parts=parts)(images, names)
    swin = calls["window_qkv"] + calls["window_block"]
    klass = calls["class_summary"] + calls["class_update"]
    assert (swin > 0, klass > 0) == ("spatial" in parts, "class" in parts)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    inference.fused_kernels(model, parts=("spatial", "class"))
    inference.fused_kernels(model, False, parts=parts)
    other = aggregation.ClassAggregation if parts == ("spatial",) else aggregation.GuidedSwinBlock
    switched = aggregation.GuidedSwinBlock if parts == ("spatial",) else aggregation.ClassAggregation
    assert all(m.fused for m in model.modules() if isinstance(m, other))
    assert not any(m.fused for m in model.modules() if isinstance(m, switched))


def test_fused_parts_are_checked(capsys):
    model = catseg.create_model("catseg_tiny")
    for parts in ("class", ["decoder"], ("spatial", "klass")):  # a bare string would be read letter by letter
        with pytest.raises(ValueError, match=r"parts=.*choose a list of 'spatial', 'class'"):
            inference.fused_kernels(model, parts=parts)
    assert not any(getattr(m, "fused", False) for m in model.modules())
    for argv, message in ((["--fused-parts", "class"], "--fused-parts chooses which blocks --fused-kernels runs as "
                                                        "kernels: add --fused-kernels"),
                          (["--fused-kernels", "--fused-parts", "class,decoder"],
                           "--fused-parts class,decoder: give a comma-separated list of spatial, class"),
                          (["--fused-kernels", "--fused-parts", ""], "--fused-parts : give a comma-separated list"),
                          (["--device", "cpu", "--fused-kernels", "--compile"],
                           "--fused-kernels with --compile compiles the Triton kernels, which needs a CUDA device")):
        with pytest.raises(SystemExit):  # without --fused-kernels, or a part that does not exist
            bench_parse_args(["--preset", "catseg_tiny", *argv])
        assert message in capsys.readouterr().err
    assert bench_parse_args(["--fused-kernels", "--fused-parts", "class"]).fused_parts == ["class"]
    assert bench_parse_args(["--fused-kernels"]).fused_parts == ["spatial"]  # as Segmenter


@needs_kernels
def test_segmenter_with_fused_kernels_predicts_what_the_modules_do():
    """Segmenter(fused_kernels=True) runs the Swin blocks as kernels (inference.INFERENCE_FUSED_PARTS) and keeps the
    class aggregation blocks' modules (their kernels ran slower than the compiled modules on a GPU)."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False, class_chunk_size=4)
    image, names = torch.rand(3, 150, 170), [f"thing {i}" for i in range(4)]
    plain = inference.Segmenter(model, device="cpu").predict(image, names)[0]
    fused = inference.Segmenter(model, device="cpu", fused_kernels=True).predict(image, names)[0]
    assert all(m.fused for m in model.modules() if isinstance(m, aggregation.GuidedSwinBlock))
    assert not any(m.fused for m in model.modules() if isinstance(m, aggregation.ClassAggregation))
    torch.testing.assert_close(torch.from_numpy(fused.scores), torch.from_numpy(plain.scores), rtol=1e-4, atol=1e-5)
    assert (fused.labels == plain.labels).mean() > 0.999


@needs_kernels
def test_fused_kernels_trace_into_compiled_graphs_without_breaks():
    """torch.compile captures the kernels' operators in the aggregation's graphs (fullgraph: no break), also once the
    class dimension is dynamic; the captured graphs compute what the plain model does. (Dynamo's capture only: the
    compiled kernels themselves need a GPU, tests/test_gpu.py.)"""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False, class_chunk_size=4).eval()
    images = torch.rand(1, 3, 128, 128)
    # chunks 3, 4 (the class dimension turns dynamic at the second chunk) / 2, 3 (a size the graphs have not seen)
    vocabularies = [[f"class {i}" for i in range(n)] for n in (7, 5)]
    with torch.no_grad():
        plain = [model(images, names) for names in vocabularies]
        inference.compile_aggregation(inference.fused_kernels(model), backend="eager", fullgraph=True)
        for names, reference in zip(vocabularies, plain):
            torch.testing.assert_close(model(images, names), reference, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_training_takes_the_modules(monkeypatch):
    """With autograd on the kernel (forward only) is never called: the loss and gradients are the plain model's."""
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False)
    images, names = torch.rand(2, 3, 128, 128), [f"class {i}" for i in range(5)]
    grads = []
    calls = _calls(monkeypatch)
    for fused in (False, True):
        inference.fused_kernels(model, fused)
        model.zero_grad()
        model(images, names).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert not any(calls.values())
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unsupported_blocks_and_devices_are_refused(monkeypatch):
    norm, mlp = _block(24, nn.GELU)
    assert "width 24 is not a power of two" in kernels.supports(norm, mlp)
    norm, mlp = _block(32, nn.SiLU)
    assert "SiLU" in kernels.supports(norm, mlp)
    with pytest.raises(ValueError, match="SiLU is neither exact GELU nor ReLU"):
        kernels.residual_mlp(torch.randn(4, 32), norm, mlp)
    assert kernels.supports(*_block(32, lambda: nn.GELU(approximate="tanh"))) is not None

    model = catseg.create_model("catseg_tiny")
    model.layers[1].spatial.blocks[0].mlp.act = nn.SiLU()
    if kernels.available():
        with pytest.raises(ValueError, match=r"layers\.1\.spatial\.blocks\.0: the activation SiLU"):
            inference.fused_kernels(model)
    assert not any(getattr(m, "fused", False) for m in model.modules())  # nothing switched on
    block = _class_block(0, 0)
    block.proj = nn.Identity()
    assert kernels.supports_class_aggregation(block) == "it has no output projection"
    assert "heads' width 8 is not" in kernels.supports_class_aggregation(aggregation.ClassAggregation(32, 0, 4, 4.0, 2))

    huge = torch.empty(2 ** 31 // 32 + 1, 32, device="meta")  # 32-bit indices would overflow: refused, not wrapped
    with pytest.raises(ValueError, match=r"residual_mlp_kernel: a tensor of shape \(67108865, 32\) spans 2\^31"):
        kernels._launch(kernels._residual_mlp_kernel, lambda meta: (1,), huge, huge)
    # a runtime float argument would be fp32 in a plain Triton launch but fp64 under torch.compile (a different,
    # slower kernel, or one that fails to compile): the kernels take floats as constexprs
    x = torch.randn(4, 32)
    with pytest.raises(TypeError, match=r"residual_mlp_kernel: pass float 1e-05 as a constexpr keyword"):
        kernels._launch(kernels._residual_mlp_kernel, lambda meta: (1,), x, x, x, 4, 1e-5)

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter, no GPU: the CPU cannot run the kernels
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="need Triton and a CUDA device"):
            inference.fused_kernels(catseg.create_model("catseg_tiny"))
        with pytest.raises(ValueError, match="runs on CUDA tensors .* got a cpu tensor"):
            kernels.residual_mlp(torch.randn(4, 32), *_block(32, nn.GELU))


def test_counted_traffic_with_fused_kernels():
    """Counted on fake tensors (no kernel runs, no GPU needed): the same FLOPs (the operator declares those of its
    two products), fewer operators and fewer bytes moved, a lower peak (no hidden layer is ever stored)."""
    args = ["--preset", "catseg_tiny", "--count-memory", "--classes", "40", "--no-train"]
    plain, fused, klass = (bench_main(args + extra)["inference"][0] for extra in
                           ([], ["--fused-kernels"], ["--fused-kernels", "--fused-parts", "class"]))
    assert fused["flops"] == plain["flops"] and fused["flops_by_part"] == plain["flops_by_part"]
    assert fused["operators"] < plain["operators"]
    assert fused["bytes_moved"] < 0.9 * plain["bytes_moved"]
    assert fused["peak_memory_bytes"] <= plain["peak_memory_bytes"]
    assert fused["bytes_moved"] < klass["bytes_moved"] < plain["bytes_moved"]  # the class blocks' share only


@pytest.mark.skipif(kernels.triton is None, reason="needs triton")
def test_kernels_compile_for_the_gpu_without_spilling(tmp_path):
    """Every autotuning configuration compiles for sm_90 (H100 / H200) with Triton's own ptxas, no GPU needed, and
    at the presets' widths in bf16 keeps its tiles in registers (no spill stack); the float32 products and the tiny
    preset's widths compile too (sm_80). In processes of their own: this one runs Triton's interpreter. The two
    compile at once (each compiles on one core)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_kernels.py"
    runs = [[], ["--arch", "80", "--dtype", "fp32", "--width", "32", "--heads", "2", "--window", "4"]]
    procs = [subprocess.Popen([sys.executable, str(script), "--json", str(tmp_path / f"{i}.json"), *extra], env=env)
             for i, extra in enumerate(runs)]
    try:
        assert [proc.wait(timeout=600) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            proc.kill()
    rows = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(len(runs))]
    configs = sum(len(configs) for configs in kernels._CONFIGS.values())
    assert len(rows[0]) == len(rows[1]) == configs
    assert [r for r in rows[0] if r["spill_stack_bytes"]] == []
    assert all(0 < r["registers"] <= 255 for r in rows[0] + rows[1])
    # on sm_90 the Swin blocks' kernels and the MLP's have configurations on Hopper's tensor-core path (wgmma)
    for name in ("_residual_mlp_kernel", "_window_qkv_kernel", "_window_output_kernel", "_window_block_kernel"):
        assert any(r["wgmma"] for r in rows[0] if r["kernel"] == name), name
    assert not any(r["wgmma"] for r in rows[1])  # (sm_80 has none)
