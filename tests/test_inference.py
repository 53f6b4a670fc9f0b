"""Patch inference, the Segmenter API, chunked label maps and bounded memory."""
import copy
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import catseg
from catseg import inference
from catseg.inference import (Segmenter, crop_offsets, labels_from_probs, patch_inference, predict_labels,
                              to_image_tensor)


class PositionModel(torch.nn.Module):
    """Stand-in model: every class's probability over a view is a known function of where the view lies.

    The image encodes x and y in its first two channels, so the mean of those channels over a view tells its
    position; class 0 outputs 0.2 + 0.6 * mean x, class 1 outputs 0.2 + 0.6 * mean y, constant over the view.
    """

    def __init__(self, image_size=384, inference_size=640, stride=256):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.image_size = image_size
        self.config = SimpleNamespace(inference_size=inference_size, inference_stride=stride, class_chunk_size=None,
                                      sigmoid_at_crop_size=True)
        self.seen = []

    def forward(self, views, class_names):
        self.seen.append(views.shape)
        value = 0.2 + 0.6 * views[:, :2].mean(dim=(2, 3))  # (V, 2)
        out = value[:, : len(class_names), None, None].expand(-1, -1, self.image_size // 4, self.image_size // 4)
        return torch.logit(out)


def ramp_image(size=640):
    ys, xs = torch.meshgrid(torch.arange(size) / (size - 1), torch.arange(size) / (size - 1), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def test_crop_offsets():
    assert crop_offsets(640, 384, 256) == [0, 256]
    assert crop_offsets(640, 384, 200) == [0, 200, 256]
    assert crop_offsets(384, 384, 256) == [0]


def test_patch_inference_mosaic_is_exact():
    model = PositionModel()
    image = ramp_image()
    probs = patch_inference(model, image.unsqueeze(0), ["x", "y"])
    assert probs.shape == (1, 2, 640, 640)
    assert model.seen == [torch.Size([5, 3, 384, 384])]  # four crops and the global view in one batch

    # expected, computed independently: each crop's constant over the pixels it covers, averaged, then
    # averaged with the global view's constant
    total = torch.zeros(2, 640, 640)
    count = torch.zeros(640, 640)
    for y in (0, 256):
        for x in (0, 256):
            crop = image[:, y:y + 384, x:x + 384]
            total[:, y:y + 384, x:x + 384] += (0.2 + 0.6 * crop[:2].mean(dim=(1, 2)))[:, None, None]
            count[y:y + 384, x:x + 384] += 1
    glob = F.interpolate(image.unsqueeze(0), size=(384, 384), mode="bilinear", align_corners=False)[0]
    expected = (total / count + (0.2 + 0.6 * glob[:2].mean(dim=(1, 2)))[:, None, None]) / 2
    torch.testing.assert_close(probs[0], expected, rtol=0, atol=1e-6)
    # the four quadrant regions differ: a wrong offset or a swapped axis would show
    assert probs[0, 0, 10, 10] < probs[0, 0, 10, 630] and probs[0, 1, 10, 10] < probs[0, 1, 630, 10]


def test_patch_inference_sizes_come_from_the_preset():
    model = PositionModel(image_size=64, inference_size=160, stride=48)
    probs = patch_inference(model, ramp_image(100).unsqueeze(0), ["x"])
    assert probs.shape == (1, 1, 160, 160)
    assert model.seen == [torch.Size([3 * 3 + 1, 3, 64, 64])]  # offsets 0, 48, 96 in both directions + global


def test_labels_from_probs_chunked_argmax():
    probs = torch.rand(2, 300, 20, 30, generator=torch.Generator().manual_seed(0))
    full = F.interpolate(probs, size=(41, 57), mode="bilinear", align_corners=False).argmax(dim=1)
    for chunk in (7, 64, 1000):
        assert torch.equal(labels_from_probs(probs, (41, 57), chunk=chunk), full)


def test_predict_labels_independent_of_chunks(tiny_model):
    names = [f"thing {i}" for i in range(150)]
    x = torch.rand(2, 3, 90, 140, generator=torch.Generator().manual_seed(2))
    la, sa = predict_labels(tiny_model, x, names, chunk=1000)
    lb, sb = predict_labels(tiny_model, x, names, chunk=9)
    assert la[0].shape == (90, 140)
    assert all(torch.equal(a, b) for a, b in zip(la, lb))
    torch.testing.assert_close(sa, sb)


@pytest.fixture
def own_tiny_model(tiny_model):
    """A copy of the session's tiny model for a Segmenter, which prepares the model it is given for inference (class
    chunk, channels-last, decoder settings): the shared model stays as the other tests expect it."""
    return copy.deepcopy(tiny_model)


def test_segmenter_accepts_paths_pil_arrays_and_modes(own_tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    gray = Image.fromarray(rng.integers(0, 255, (50, 40), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 255, (33, 61, 4), dtype=np.uint8), mode="RGBA")
    seg = Segmenter(own_tiny_model, device="cpu", batch_size=2)
    preds = seg.predict([tmp_path / "a.png", gray, rgba, rgb, torch.rand(3, 64, 64)], ["sky", "tree", "road"])
    assert [p.labels.shape for p in preds] == [(70, 90), (50, 40), (33, 61), (70, 90), (64, 64)]
    assert np.array_equal(preds[0].labels, preds[3].labels)  # same pixels, path or array
    for p in preds:
        assert p.labels.dtype == np.int64 and p.labels.min() >= 0 and p.labels.max() < 3
        assert p.scores.shape == (3,) and p.class_names == ["sky", "tree", "road"]
        assert abs(sum(p.areas().values()) - 1) < 1e-9
    single = seg.predict(rgb, ["sky", "tree", "road"])
    assert len(single) == 1 and np.array_equal(single[0].labels, preds[0].labels)
    gray = seg.predict(torch.rand(30, 40), ["sky", "tree", "road"])  # a 2-D tensor is one grayscale image
    assert [p.labels.shape for p in gray] == [(30, 40)]
    stacked = seg.predict(np.stack([rgb, rgb]), ["sky", "tree", "road"])  # a 4-D array is a batch, as a tensor is
    assert len(stacked) == 2 and all(np.array_equal(p.labels, preds[0].labels) for p in stacked)


def test_segmenter_bad_input(own_tiny_model, tmp_path):
    tiny_model = own_tiny_model
    seg = Segmenter(tiny_model, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        seg.predict(np.zeros((10, 10, 3), np.uint8), [])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        to_image_tensor(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match=r"image array is empty \(0x5 pixels\)"):
        seg.predict(np.zeros((0, 5, 3), np.uint8), ["sky"])
    with pytest.raises(ValueError, match="precision"):
        Segmenter(tiny_model, precision="fp8")
    for chunk in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"class_chunk_size={chunk} must be a positive integer"):
            Segmenter(tiny_model, class_chunk_size=chunk)
    with pytest.raises(ValueError, match=r"class names must be non-empty strings.*got \[3\]"):
        seg.predict(np.zeros((10, 10, 3), np.uint8), ["cat", 3])
    with pytest.raises(ValueError, match="duplicate class names.*compared without case"):
        seg.predict(np.zeros((10, 10, 3), np.uint8), ["cat", "Cat "])
    # one embedding each: the tokenizer collapses spaces, and a class's synonyms are averaged in any order
    for names in (["sofa, couch", "couch,sofa"], ["traffic  light", "traffic light"], ["cat,", "cat"]):
        with pytest.raises(ValueError, match="duplicate class names"):
            seg.predict(np.zeros((10, 10, 3), np.uint8), names)
    seg.predict(np.zeros((10, 10, 3), np.uint8), ["sofa, couch", "couch"])  # sharing a synonym is another class
    for size in (0, -1, None, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size={size} must be a positive integer"):
            Segmenter(tiny_model, batch_size=size)


def test_image_batches_are_checked_like_single_images():
    """predict_labels / patch_inference take a (B, 3, H, W) batch: uint8 scaled as a single image is, float values
    outside [0, 1] (0..255 floats, NaN) refused, never clamped into range."""
    model = PositionModel(image_size=64, inference_size=96, stride=32)
    batch = torch.stack([ramp_image(100), ramp_image(100).flip(-1)])
    as_uint8 = (batch * 255).round().to(torch.uint8)
    torch.testing.assert_close(patch_inference(model, as_uint8, ["x", "y"]),
                               patch_inference(model, as_uint8.float() / 255, ["x", "y"]))
    for bad in (as_uint8.float(), batch.masked_fill(batch > 0.5, float("nan"))):
        for run in (patch_inference, predict_labels):
            with pytest.raises(ValueError, match=r"float image batch values must lie in \[0, 1\]"):
                run(model, bad, ["x", "y"])
    with pytest.raises(ValueError, match=r"image batch must be \(B, 3, H, W\), got \(2, 1, 100, 100\)"):
        predict_labels(model, batch[:, :1], ["x", "y"])
    model.check_inputs = False  # the caller vouches for the values (the bench; the check waits for the device)
    patch_inference(model, batch * 2, ["x", "y"])


def test_images_are_read_as_viewers_show_them_and_never_clamped(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    upright = to_image_tensor(rgb)
    # channels in RGB order, values / 255, from an array, a file and an RGBA array (alpha dropped)
    exact = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, rng.integers(0, 255, (30, 40, 1), dtype=np.uint8)], axis=2)
    for image in (rgb, tmp_path / "rgb.png", rgba, Image.fromarray(rgba, mode="RGBA")):
        assert torch.equal(to_image_tensor(image), exact)
    # a portrait photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(tmp_path / "sideways.png", exif=exif)
    torch.testing.assert_close(to_image_tensor(tmp_path / "sideways.png"), upright)
    # 16-bit grayscale: scaled by 65535, not clipped at 255
    gray16 = rng.integers(0, 65536, (20, 25), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    expected = torch.from_numpy(gray16.astype(np.float32) / 65535).expand(3, -1, -1)
    torch.testing.assert_close(to_image_tensor(tmp_path / "gray16.png"), expected)
    torch.testing.assert_close(to_image_tensor(gray16), expected)
    torch.testing.assert_close(to_image_tensor(rgb.astype(np.float32) / 255), upright)
    for bad, message in ((rgb.astype(np.float32), r"float image array values must lie in \[0, 1\].*max 25"),
                         (torch.from_numpy(rgb).permute(2, 0, 1).double(), r"float image tensor values must lie in"),
                         (rgb.astype(np.int64), "image array of dtype int64 is not supported")):
        with pytest.raises(ValueError, match=message):
            to_image_tensor(bad)


def test_segmenter_class_chunk_applies_to_the_model_and_the_merge(tiny_model, monkeypatch):
    seen = []
    real = inference.predict_labels
    monkeypatch.setattr(inference, "predict_labels", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    model = catseg.create_model("catseg_tiny", class_chunk_size=7)
    Segmenter(model, device="cpu").predict(np.zeros((20, 20, 3), np.uint8), ["a", "b"])
    assert model.config.class_chunk_size == 7 and seen == [7]  # the model's own chunk is kept
    Segmenter(model, device="cpu", class_chunk_size=3).predict(np.zeros((20, 20, 3), np.uint8), ["a", "b"])
    assert model.config.class_chunk_size == 3 and seen == [7, 3]  # a given chunk applies, also the second time
    assert catseg.create_model("catseg_tiny").config.class_chunk_size is None
    assert Segmenter(catseg.create_model("catseg_tiny"), device="cpu").model.config.class_chunk_size == 128


MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, gc, sys, torch, catseg
    from catseg.inference import predict_labels
    torch.set_num_threads(1)
    n, chunk = int(sys.argv[1]), (None if sys.argv[2] == "none" else int(sys.argv[2]))
    m = catseg.create_model("catseg_tiny", class_chunk_size=chunk).eval()
    names = [f"c{i}" for i in range(n)]
    m.text_embeddings(names)  # text encoding is done once per vocabulary; measure the per-image work
    x = torch.rand(1, 3, 160, 200)
    with torch.no_grad():
        predict_labels(m, x, names[:4], chunk=chunk or n)
    def status(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS high-water mark
    before = status("VmRSS")
    with torch.no_grad():
        predict_labels(m, x, names, chunk=chunk or n)
    print((status("VmHWM") - before) / 1024)
""")


def _peak_mib(n, chunk):
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n), str(chunk)], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
def test_peak_memory_sublinear_when_chunked():
    small, large = _peak_mib(100, 50), _peak_mib(800, 50)
    unchunked_large = _peak_mib(800, "none")
    print(f"peak MiB: chunked 100 classes {small:.0f}, 800 classes {large:.0f}; unchunked 800 {unchunked_large:.0f}")
    assert large < 3 * small  # 8x the classes, well under 3x the memory
    assert unchunked_large > 2 * large


def test_compiled_aggregation_segments_like_the_eager_model():
    """Segmenter(compile=True) compiles the aggregation layers, decoder and encoders in place: same scores and
    labels, same state_dict keys. What is compiled is the work on one class chunk, not the loop over chunks, and the
    class dimension turns dynamic after its second size: once a vocabulary in chunks of new sizes has compiled
    again, vocabularies of other sizes in more chunks reuse the compiled code."""
    import catseg

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False)
    keys = list(model.state_dict())
    names = [f"thing {i}" for i in range(6)]
    image = torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(3))
    from torch._dynamo.utils import counters

    more = [f"more {i}" for i in range(14)]
    eager, eager_more = (Segmenter(model, device="cpu", class_chunk_size=4).predict(image, v)[0] for v in (names, more))
    graphs = counters["stats"]["unique_graphs"]
    compiled = Segmenter(model, device="cpu", class_chunk_size=4, compile=True).predict(image, names)[0]
    assert counters["stats"]["unique_graphs"] > graphs  # compiled code ran
    # CLIP's image blocks and the guidance backbone are compiled too (compile_encoders, tested on its own below)
    assert model.clip.model.visual.transformer.resblocks[0]._compiled_call_impl is not None
    assert model.backbone.body._compiled_call_impl is not None
    assert list(model.state_dict()) == keys
    np.testing.assert_allclose(compiled.scores, eager.scores, rtol=1e-4, atol=1e-6)
    assert (compiled.labels == eager.labels).mean() > 0.999

    segmenter = Segmenter(model, device="cpu", class_chunk_size=4, compile=True)  # compiling again does nothing
    segmenter.predict(image, [f"other {i}" for i in range(11)])  # chunks of 3, 4, 4: the class dimension turns dynamic
    graphs = counters["stats"]["unique_graphs"]
    compiled = segmenter.predict(image, more)[0]  # chunks of 3, 3, 4, 4
    segmenter.predict(image, names[:5] + more[:4])  # chunks of 3, 3, 3
    assert counters["stats"]["unique_graphs"] == graphs
    np.testing.assert_allclose(compiled.scores, eager_more.scores, rtol=1e-4, atol=1e-6)

    # Segmenter runs the decoder's compiled upsampling as the stencil; switched back to the matrix products, the
    # compiled code is traced again and still segments as the eager model does
    assert all(stage.stencil for stage in model.decoder)
    inference.stencil_upsampling(model, False)
    compiled = segmenter.predict(image, more)[0]
    assert counters["stats"]["unique_graphs"] > graphs
    np.testing.assert_allclose(compiled.scores, eager_more.scores, rtol=1e-4, atol=1e-6)


def test_compiled_encoders_compute_what_the_eager_ones_do_forward_and_backward():
    """compile_encoders compiles CLIP's image blocks (one compiled code for all of them) and the guidance backbone:
    same logits, same gradients, same state_dict keys."""
    import copy

    import catseg
    from catseg.inference import compile_encoders
    from catseg.presets import PRESETS

    clip_cfg = copy.deepcopy(PRESETS["catseg_tiny"]["clip_cfg"])
    clip_cfg["vision_cfg"]["layers"] = 3
    overrides = dict(zero_init_residual=False, backbone_frozen_bn=True, clip_cfg=clip_cfg)
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", **overrides)
    eager = catseg.create_model("catseg_tiny", **overrides)
    eager.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert compile_encoders(compile_encoders(model)) is model  # a second call does nothing
    x, names = torch.rand(2, 3, 128, 128), ["cat", "dog", "grass"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, names), eager.eval()(x, names), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 2  # the two CLIP blocks share one code; the backbone
    model.train()(x, names).square().mean().backward()
    eager.train()(x, names).square().mean().backward()
    grads = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
    assert list(model.state_dict()) == keys


class HostTensorOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators that read or write a host tensor (0-dim scalars aside, which PyTorch passes as numbers)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        if any(torch.is_tensor(t) and t.device.type == "cpu" and t.ndim > 0 for t in leaves):
            self.ops.append(str(func))
        return out


def test_gpu_forward_touches_no_host_tensor_even_with_cold_caches():
    """The forward on a GPU (fake CUDA tensors: no GPU needed) builds its constant tensors (interpolation matrices,
    window masks) on the device. torch.compile traces those builders into the compiled graph, where a host-built
    tensor becomes a copy to the GPU on every call, and such a copy makes CUDA-graph capture fail (seen on an H200:
    compiled inference then fell back to eager launches)."""
    import catseg
    from catseg.memcount import fake_tensors
    from catseg.ops import clear_tensor_caches

    model = catseg.create_model("catseg_tiny", class_chunk_size=4).eval()
    model.check_inputs = False
    names = [f"thing {i}" for i in range(6)]
    with fake_tensors(model, "cuda"), torch.no_grad():
        model.text_embeddings(names)  # tokens come from the host: text is encoded once per vocabulary, outside
        views = torch.rand(5, 3, model.image_size, model.image_size, device="cuda")
        clear_tensor_caches()
        with HostTensorOps() as log:
            out = model(views, names)
    assert out.device.type == "cuda" and out.shape == (5, 6, model.output_size, model.output_size)
    assert log.ops == []


def test_bf16_segmenter_stores_matmul_weights_in_bf16_and_fp32_puts_them_back():
    import catseg

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", zero_init_residual=False)
    image = torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(3))
    names = ["sky", "grass", "road"]
    reference = Segmenter(model, device="cpu", precision="fp32").predict(image, names)[0]
    fast = Segmenter(model, device="cpu", precision="bf16").predict(image, names)[0]
    assert model.head.weight.dtype == torch.bfloat16
    assert model.clip.model.token_embedding.weight.dtype == torch.float32  # the text tower is left as it is
    np.testing.assert_allclose(fast.scores, reference.scores, atol=0.05)
    again = Segmenter(model, device="cpu", precision="fp32").predict(image, names)[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    np.testing.assert_allclose(again.scores, reference.scores, atol=0.05)
    assert model.backbone.body.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [2, 32768, 32769, 70000])
def test_host_labels_keep_every_class_index(n):
    from catseg.inference import host_labels

    labels = torch.tensor([[0, n - 1], [n // 2, 1]])
    out = host_labels(labels, n)
    assert out.dtype == torch.int64 and torch.equal(out, labels)


def test_channels_last_keeps_captured_graphs_unless_the_layout_changes():
    """A new Segmenter on the same model prepares it again (channels-last included): the CUDA graphs captured for it
    stay unless the layout really changes."""
    from collections import OrderedDict

    import catseg
    from catseg.inference import _GRAPHS, channels_last, prepare_inference

    model = catseg.create_model("catseg_tiny")
    prepare_inference(model, bf16=False)
    _GRAPHS[model] = OrderedDict(captured=object())  # what a capture on a GPU leaves
    prepare_inference(model, bf16=False)
    channels_last(model)
    assert "captured" in _GRAPHS[model]
    channels_last(model, False)
    assert model not in _GRAPHS


def test_a_large_photo_is_merged_in_fewer_classes_at_once():
    """A 12-megapixel photo's merged probabilities take 48 MB per class: its merge takes fewer classes at once, so
    a 150-class vocabulary stays within a few hundred MiB instead of 7 GiB (counted on fake tensors); the labels
    do not depend on how many classes are merged at once (test_predict_labels_independent_of_chunks)."""
    import catseg
    from catseg.inference import MERGE_BYTES, predict_labels
    from catseg.memcount import counting

    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", class_chunk_size=128).eval()
    model.check_inputs = False  # its range check reads values, which fake tensors do not have
    names = [f"class {i}" for i in range(150)]
    model.text_embeddings(names)
    with counting(model) as counter:
        image = torch.rand(3, 3000, 4000)
        predict_labels(model, image.unsqueeze(0), names, chunk=128)
    per_class = 4 * 3000 * 4000
    assert counter.peak < MERGE_BYTES + 40 * per_class  # the image, its views, labels and one merge's work
    assert 128 * per_class > 5 * counter.peak  # all 128 classes of the chunk merged at once would take 6 GiB
