"""Inference: the paper's patch inference (appendix A.3) and a plain image + class names -> label map API.

Patch inference: resize the image to `inference_size` (640), cut overlapping `image_size` (384) crops at
`inference_stride` (256), add the whole image resized to `image_size`, run all views in one batch, upsample each
view's logits to the crop size and take the sigmoid (as the released code; `config.sigmoid_at_crop_size` False takes
it before upsampling), average overlaps into a mosaic, average the mosaic with the global view resized to the
inference size, and finally resize to the original size. Crop size, stride and input size come from the preset.

Memory stays bounded for large vocabularies: the model runs its per-class work in class chunks
(`config.class_chunk_size`), and merging views, resizing and the argmax also run over class chunks.
"""
from __future__ import annotations

import operator
import os
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image, ImageOps

from . import kernels
from .aggregation import ClassAggregation, GuidedSwinBlock
from .model import CatSeg
from .ops import bilinear_matrix, resize, tensor_cache

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
DEFAULT_CLASS_CHUNK = 128
MERGE_BYTES = 256 * 2**20  # at most this much of merged float32 probabilities at the image size at once


def crop_offsets(size: int, crop: int, stride: int) -> list[int]:
    """Top/left offsets of crops covering [0, size), the last one flush with the border."""
    if crop >= size:
        return [0]
    offs = list(range(0, size - crop + 1, stride))
    if offs[-1] != size - crop:
        offs.append(size - crop)
    return offs


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """A PIL image as viewers show it (EXIF orientation applied): uint8 RGB, or uint16 for 16-bit grayscale."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grayscale PNG/TIFF (Pillow opens some as 32-bit "I")
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"{im.mode} image values must lie in 0..65535, got {arr.min()}..{arr.max()}")
        return arr.astype(np.uint16)
    if im.mode == "F":
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))


def _unit_range(t: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 / 16-bit values scaled to [0, 1]; float values checked to lie there (never clamped)."""
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.uint16:
        return t.float() / 65535.0
    if not t.is_floating_point():
        raise ValueError(f"{what} of dtype {str(t.dtype).replace('torch.', '')} is not supported; give uint8 "
                         f"(0..255), uint16 (0..65535) or float values in [0, 1]")
    t = t.float()
    if t.numel() and not kernels.is_fake(t):  # fake tensors (memory counting) have no values to check
        lo, hi = torch.aminmax(t)
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise ValueError(f"float {what} values must lie in [0, 1] (RGB / 255), got min {lo.item():.3g} max "
                             f"{hi.item():.3g}")
    return t


def to_image_tensor(image: ImageLike) -> torch.Tensor:
    """Path, PIL image (EXIF orientation applied), array (H, W[, C]) or tensor ([C,] H, W) -> float (3, H, W) RGB
    in [0, 1]. uint8 and uint16 values are scaled by 255 and 65535; float values must lie in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                image = _pil_to_array(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {str(image)!r}: {e}") from None
    if isinstance(image, Image.Image):
        image = _pil_to_array(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        if arr.dtype == np.uint16:  # few torch ops take uint16: scale here
            arr = arr.astype(np.float32) / 65535.0
        arr = arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, order="C")
        image, what = torch.from_numpy(arr).permute(2, 0, 1), "image array"
    else:
        what = "image tensor"
    if torch.is_tensor(image):
        t = image
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(t.shape)}")
        if not (t.shape[1] and t.shape[2]):
            raise ValueError(f"{what} is empty ({t.shape[1]}x{t.shape[2]} pixels)")
        t = t[:3] if t.shape[0] != 1 else t.expand(3, -1, -1)
        return _unit_range(t, what)
    raise TypeError(f"unsupported image type {type(image).__name__}; give a path, PIL image, array or tensor")


def _as_list(images, model: CatSeg) -> list[torch.Tensor]:
    """A batch (B, 3, H, W) or a list of images -> float (3, H, W) images in [0, 1]. A float batch's values are
    checked at once (one host sync) unless the model's `check_inputs` is off."""
    if torch.is_tensor(images) and images.ndim == 4:
        if images.shape[1] != 3:
            raise ValueError(f"image batch must be (B, 3, H, W), got {tuple(images.shape)}")
        if not (images.shape[2] and images.shape[3]):
            raise ValueError(f"image batch is empty ({images.shape[2]}x{images.shape[3]} pixels)")
        if getattr(model, "check_inputs", True) or not images.is_floating_point():
            images = _unit_range(images, "image batch")
        return list(images)
    return [to_image_tensor(im) for im in images]


def make_views(model: CatSeg, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B*V, 3, S, S): for each image its crops of the resized image, then the global view."""
    cfg = model.config
    s, size = model.image_size, cfg.inference_size
    offs = crop_offsets(size, s, cfg.inference_stride)
    views = []
    for im in images:
        im = im.unsqueeze(0)
        big = F.interpolate(im, size=(size, size), mode="bilinear", align_corners=False)
        views += [big[..., y:y + s, x:x + s] for y in offs for x in offs]
        views.append(F.interpolate(im, size=(s, s), mode="bilinear", align_corners=False))
    return torch.cat(views).clamp_(0, 1)  # inputs are checked; this only catches the resize's rounding


def _covering(size: int, crop: int, stride: int) -> torch.Tensor:
    """(size,) float64: how many crops cover each row (or column) of the mosaic."""
    count = torch.zeros(size, dtype=torch.float64)
    for o in crop_offsets(size, crop, stride):
        count[o:o + crop] += 1
    return count


@tensor_cache(maxsize=32)
def crop_weights(size: int, crop: int, stride: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, size): each mosaic pixel's weight in the merged map, 1/2 over the number of crops covering it (a product
    of row and column counts, since the crops form a grid)."""
    count = _covering(size, crop, stride)
    return (0.5 / torch.outer(count, count)).to(device=device, dtype=dtype)


@tensor_cache(maxsize=32)
def score_vectors(size: int, crop: int, stride: int, h: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b (V, h) with a[v] @ P[v] @ b[v] summed over the views = the mean over the size x size merged map of view
    probabilities P[v] (h, h): every merging step is bilinear (align_corners=False) and so linear and separable;
    each vector is the column sums of its view's rows (or columns) placed in the mosaic."""
    offs = crop_offsets(size, crop, stride)
    cpu = torch.device("cpu")
    up = bilinear_matrix(crop, h, cpu, torch.float64)  # (crop, h)
    count = _covering(size, crop, stride)
    placed = []
    for o in offs:  # the crop at offset o, resized to the crop size, placed and divided by the count, summed
        placed.append((up / count[o:o + crop, None]).sum(0))
    glob = (bilinear_matrix(size, crop, cpu, torch.float64) @ up).sum(0)
    rows = [placed[iy] for iy in range(len(offs)) for _ in offs] + [glob]  # view order: crops row by row, global
    cols = [placed[ix] for _ in offs for ix in range(len(offs))] + [glob]
    a_vec = torch.stack([0.5 * r / size for r in rows])
    b_vec = torch.stack([c / size for c in cols])
    return a_vec.to(device=device, dtype=dtype), b_vec.to(device=device, dtype=dtype)


def _check_views(model: CatSeg, probs: torch.Tensor) -> list[int]:
    """The crop offsets of the model's patch inference, once `probs` is checked to be (B, V, n, h, h)."""
    cfg = model.config
    offs = crop_offsets(cfg.inference_size, model.image_size, cfg.inference_stride)
    nv = len(offs) ** 2 + 1
    if probs.dim() != 5 or probs.shape[1] != nv or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"expected (B, {nv}, n, h, h) view probabilities for preset {cfg.name!r}, got "
                         f"{tuple(probs.shape)}")
    return offs


def merge_views(model: CatSeg, probs: torch.Tensor, out_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """(B, V, n, h, h) view probabilities -> (B, n, H, W) merged probabilities (crops averaged, then with the
    global view), at the inference size or resized to out_size.

    As the released code: each crop's map resized to the crop size (nothing to do where the maps are at the crop
    size already, the default) and added at its offset into the mosaic, each pixel divided by the number of crops
    covering it; the global view resized to the crop size, then to the inference size; the two averaged; the
    average resized to out_size. Bilinear steps (align_corners=False) as matrix products (`catseg.ops.resize`).
    """
    cfg = model.config
    size, s = cfg.inference_size, model.image_size
    offs = _check_views(model, probs)
    weight = crop_weights(size, s, cfg.inference_stride, probs.device, probs.dtype)
    with torch.autocast(probs.device.type, enabled=False):
        merged = 0.5 * resize(resize(probs[:, -1], (s, s)), (size, size))  # (B, n, size, size), a new tensor
        for i, (y, x) in enumerate((y, x) for y in offs for x in offs):
            merged[..., y:y + s, x:x + s].addcmul_(resize(probs[:, i], (s, s)), weight[y:y + s, x:x + s])
        return resize(merged, out_size) if out_size else merged


def view_scores(model: CatSeg, probs: torch.Tensor) -> torch.Tensor:
    """(B, V, n, h, h) view probabilities -> (B, n) mean merged probability of each class at the inference size."""
    cfg = model.config
    _check_views(model, probs)
    a, b = score_vectors(cfg.inference_size, model.image_size, cfg.inference_stride, probs.shape[-1], probs.device,
                         probs.dtype)
    with torch.autocast(probs.device.type, enabled=False):
        return torch.einsum("vh,bvnhw,vw->bn", a, probs, b)


def _view_logits(model: CatSeg, images: list[torch.Tensor], class_names: Sequence[str],
                 cuda_graphs: bool = False) -> torch.Tensor:
    """(B, V, n, h, h) float32 logits of every view (valid until the next call when replayed from a graph)."""
    device = next(model.parameters()).device
    views = make_views(model, [im.to(device, non_blocking=True) for im in images])
    names = list(class_names)
    if cuda_graphs and views.is_cuda and not model.training and not torch.is_grad_enabled() \
            and model.config.top_k_classes is None:
        logits = _graphed_logits(model, views, names)
    else:
        logits = _logits(model, views, names)
    return logits.unflatten(0, (len(images), views.shape[0] // len(images)))


def _logits(model: CatSeg, views: torch.Tensor, names: list[str]) -> torch.Tensor:
    return model(views, names).float()


def probability_side(model: CatSeg, logits: torch.Tensor) -> int:
    """The side of the view probabilities `view_probabilities` makes of `logits` (B, V, n, h, h): the crop size with
    the config's `sigmoid_at_crop_size`, else h."""
    return model.image_size if model.config.sigmoid_at_crop_size else logits.shape[-1]


def view_probabilities(model: CatSeg, logits: torch.Tensor) -> torch.Tensor:
    """(B, V, n, h, h) view logits -> their sigmoid probabilities, in float32. With the config's
    `sigmoid_at_crop_size` (the default, as the released code) the logits are first upsampled to the crop size
    (bilinear), so the probabilities are (B, V, n, crop, crop); otherwise they stay at the model's output size (the
    merge upsamples them)."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        s = probability_side(model, logits)
        if logits.shape[-1] != s:
            logits = resize(logits, (s, s))
        return torch.sigmoid(logits)


_GRAPHS: "weakref.WeakKeyDictionary[CatSeg, OrderedDict]" = weakref.WeakKeyDictionary()
MAX_GRAPHS_PER_MODEL = 2  # each holds its own memory pool


def _graphed_logits(model: CatSeg, views: torch.Tensor, names: list[str]) -> torch.Tensor:
    """model(views, names) in float32 replayed from a CUDA graph captured once per (views shape, vocabulary,
    precision).

    A patch inference launches about a thousand small kernels; replaying them as one graph removes the host's
    launch overhead, which dominates for small vocabularies. Falls back to eager execution (with a warning) if
    capture fails.
    """
    amp, amp_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    cfg = model.config
    key = (tuple(views.shape), views.dtype, views.device, tuple(names), amp, amp_dtype, model.text_state(),
           cfg.class_chunk_size)
    cache = _GRAPHS.setdefault(model, OrderedDict())
    entry = cache.get(key)
    if entry is None:
        entry = _capture(model, views, names, amp, amp_dtype)
        cache[key] = entry
        while len(cache) > MAX_GRAPHS_PER_MODEL:
            cache.popitem(last=False)
    cache.move_to_end(key)
    if entry is False:
        return _logits(model, views, names)
    static_views, graph, static_logits, _text = entry
    static_views.copy_(views)
    graph.replay()
    return static_logits


def _capture(model: CatSeg, views: torch.Tensor, names: list[str], amp: bool, amp_dtype: torch.dtype):
    # Autocast's weight-cast cache must stay off while capturing (cached casts would live in the graph's pool).
    def run(x):
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp, cache_enabled=False):
            return _logits(model, x, names)

    check = model.check_inputs
    model.check_inputs = False  # views are clamped to [0, 1] by make_views; the range check would sync
    try:
        text = model.text_embeddings(names)  # kept alive with the graph, which reads it
        static_views = views.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazily built buffers, library handles, kernel selection
                run(static_views)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = run(static_views)
        return static_views, graph, static_logits, text
    except RuntimeError as e:  # an operation that cannot be captured: run eagerly from now on
        warnings.warn(f"CUDA graph capture failed ({e}); running patch inference eagerly")
        torch.cuda.synchronize()
        return False
    finally:
        model.check_inputs = check


@torch.no_grad()
def patch_inference(model: CatSeg, images, class_names: Sequence[str]) -> torch.Tensor:
    """Patch inference (appendix A.3): (B, N, L, L) probabilities at the preset's inference size L."""
    return merge_views(model, view_probabilities(model, _view_logits(model, _as_list(images, model), class_names)))


@torch.no_grad()
def labels_from_probs(probs: torch.Tensor, size: tuple[int, int], chunk: int = DEFAULT_CLASS_CHUNK) -> torch.Tensor:
    """(B, N, h, w) probabilities -> (B, H, W) int64 argmax after a bilinear resize, in class chunks."""
    running = RunningArgmax()
    for start in range(0, probs.shape[1], chunk):
        running.update(resize(probs[:, start:start + chunk].float(), size), start)
    return running.labels


class RunningArgmax:
    """Argmax over class chunks seen one after another (dim 1 = classes); ties keep the earlier class."""

    def __init__(self):
        self.labels: Optional[torch.Tensor] = None
        self.best: Optional[torch.Tensor] = None

    def update(self, part: torch.Tensor, start: int) -> None:
        """Fold in the scores (B, n, H, W) of classes start .. start + n - 1."""
        val, idx = part.max(dim=1)
        if self.labels is None:
            self.labels, self.best = idx + start, val
        else:
            better = val > self.best
            self.best = torch.where(better, val, self.best)
            self.labels = torch.where(better, idx + start, self.labels)


def host_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (int64, any device) -> int64 on the host, moved as int16 (int32 past 32768 classes): a quarter of
    the bytes through a slow pageable copy (about 1 ms for a 640x640 int64 map on an H200)."""
    narrow = torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32
    return labels.to(narrow).cpu().long()


@torch.no_grad()
def predict_labels(model: CatSeg, images, class_names: Sequence[str], chunk: int = DEFAULT_CLASS_CHUNK,
                   cuda_graphs: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Label maps at each image's original size and per-class mean probabilities (B, N), in class chunks (of
    `chunk` classes, fewer where the image is so large that their merged probabilities would pass `MERGE_BYTES`).

    cuda_graphs: on a GPU, replay the model from a CUDA graph captured per views shape and vocabulary.
    """
    ims = _as_list(images, model)
    logits = _view_logits(model, ims, class_names, cuda_graphs)  # (B, V, N, h, w): small, the model's output size
    n = logits.shape[2]
    s = probability_side(model, logits)  # the side of the maps merged
    sizes = [tuple(im.shape[-2:]) for im in ims]
    groups = [list(range(len(ims)))] if len(set(sizes)) == 1 else [[i] for i in range(len(ims))]
    labels: list[torch.Tensor] = [None] * len(ims)
    scores = logits.new_empty(len(ims), n)
    views, size = logits.shape[1], model.config.inference_size
    for group in groups:  # images of one size merge together; others each straight to their own size
        running = RunningArgmax()
        height, width = sizes[group[0]]
        # a photo's full-size probabilities are large (12 MP: 48 MB per class), and so are the views' maps at the
        # crop size and the mosaic with its resize's intermediate: fewer classes per merge then
        per_class = height * width + views * s * s + size * (size + max(height, width))
        step = max(1, min(chunk, MERGE_BYTES // (4 * len(group) * per_class)))
        for start in range(0, n, step):
            probs = view_probabilities(model, logits[group, :, start:start + step])
            running.update(merge_views(model, probs, sizes[group[0]]), start)
            scores[group[0]:group[-1] + 1, start:start + step] = view_scores(model, probs)  # (groups: runs of images)
        host = host_labels(running.labels, n)
        for j, i in enumerate(group):
            labels[i] = host[j]
    return labels, scores.cpu()


@dataclass
class Prediction:
    """One image's result: label map at the original size (indices into class_names) and class scores."""

    labels: np.ndarray  # (H, W) int64
    scores: np.ndarray  # (N,) mean probability of each class over the image
    class_names: list[str]

    def areas(self) -> dict[str, float]:
        """Fraction of the image each class covers (classes present only)."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        total = max(1, self.labels.size)
        return {self.class_names[i]: float(c) / total for i, c in enumerate(counts) if c}


def cast_matmul_weights(model: CatSeg, dtype: torch.dtype = torch.bfloat16) -> CatSeg:
    """Store the weights and biases of the image path's linear layers, convolutions and attention projections in
    `dtype`, in place; returns the model. For inference under autocast to that dtype, where autocast would otherwise
    cast every one of these fp32 weights again on each call (about 550 extra kernels and 3.5 GB of memory traffic
    per ViT-L patch inference, counted by `python -m catseg.bench --count-memory`). Autocast rounds a weight exactly
    as `.to(dtype)` does, so the outputs are bit-identical; norms, embeddings and other parameters keep their dtype,
    and the text tower is left as it is (text is encoded once per vocabulary). The model then needs autocast to
    `dtype` to run its image path (or this function again with torch.float32)."""
    tower = getattr(model.clip.model, "transformer", None)
    text = {id(m) for m in tower.modules()} if tower is not None else set()
    matmul = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.MultiheadAttention)
    params = [p for m in model.modules() if id(m) not in text and isinstance(m, matmul)
              for p in m.parameters(recurse=False) if p.is_floating_point()]
    return _replace_weights(model, params, lambda p: p.dtype != dtype, lambda t: t.to(dtype))


def backbone_channels_last(model: CatSeg, enable: bool = True) -> CatSeg:
    """Run a convolutional guidance backbone channels-last (NHWC), in place (`enable=False`: back to NCHW); returns
    the model. Its input is converted to NHWC, so every convolution after it runs NHWC whatever the weights' layout
    (also weights that DeepSpeed re-packs contiguous), and its weights are stored NHWC. cuDNN runs bf16 convolutions
    on tensor cores in NHWC: with NCHW tensors it transposes every convolution's input and output around the kernel
    (an H200 profile of an 847-class ViT-B patch inference showed 175 + 92 such transposes, 8% of its GPU time; 106
    of its convolutions are the ResNet-101's; in the H100 profile of a compiled ViT-B training step, the ResNet's
    convolutions took 30 of 93 ms, the transposes 12 ms of it). Part of `channels_last`, which Segmenter runs for
    inference (any precision) and `train.channels_last` for training. The backbone's feature maps come out NCHW as
    before; a transformer backbone (Swin) has nothing to convert."""
    body = getattr(model.backbone, "body", None) if model.backbone is not None else None
    if body is None or model.backbone.nhwc:
        return model
    model.backbone.channels_last = enable
    fmt = torch.channels_last if enable else torch.contiguous_format
    return _replace_weights(model, [p for p in body.parameters() if p.ndim == 4],
                            lambda p: not p.is_contiguous(memory_format=fmt),
                            lambda t: t.contiguous(memory_format=fmt))


def decoder_channels_last(model: CatSeg, enable: bool = True) -> CatSeg:
    """Run the per-class convolutions channels-last (NHWC), in place (`enable=False`: back to NCHW); returns the
    model. The cost volume is computed as NHWC maps, so the cost embedding's 7x7 convolution runs NHWC, and each
    decoder stage converts its input and its guidance map to NHWC, so its convolutions (and the per-class head after
    them) run in cuDNN's bf16 layout whatever the weights' layout. These run once per class on the largest maps of
    the model (a ViT-B training step: 684 class maps of 32-64 x 96 x 96), and with NCHW tensors cuDNN transposes each
    convolution's input and output (H200 profiles: 22 of the 180 ms of a compiled 847-class ViT-B patch inference,
    11.5 of the 84 ms of a compiled ViT-B training step). Part of `channels_last`."""
    return _switch(model, [(model, "cost_channels_last", enable)]
                   + [(stage, "channels_last", enable) for stage in model.decoder])


def stencil_upsampling(model: CatSeg, enable: bool = True) -> CatSeg:
    """Under torch.compile, run each bilinear decoder stage's x2 upsampling as a pointwise stencil
    (`catseg.ops.upsample2x`), in place (`enable=False`: back to `catseg.ops.resize`'s two matrix products); returns
    the model. Same function (exact to float64 rounding, gradients too). In the compiled code each stage's
    upsampling becomes part of the kernel before it (the previous stage's GroupNorm and ReLU), written channels-last
    for the convolution in one pass, where the matrix products take two library calls, their own passes over the
    largest maps of the model and a copy to channels-last; its backward is fused likewise. Eager code is unchanged
    (there the stencil would be several kernels). Inference turns it on (`prepare_inference`): on an H200 the
    compiled ViT-B decoder alone went from 7.32 to 6.77 ms on 640 class maps, and the compiled ViT-B patch inference
    from 36.9 / 165.4 to 34.7 / 157.2 ms at 150 / 847 classes (benchmarks/results/h200_2026-11-27b). Training
    leaves it off unless `train.stencil_upsampling` (the decoder's compiled forward + backward: 27.4 -> 28.4 ms)."""
    return _switch(model, [(stage, "stencil", enable) for stage in model.decoder])


def channels_last(model: CatSeg, enable: bool = True) -> CatSeg:
    """Every convolution of the image path channels-last (NHWC), in place (`enable=False`: back to NCHW); returns the
    model: the guidance backbone (`backbone_channels_last`), the cost embedding and the decoder
    (`decoder_channels_last`). Segmenter runs inference so, `train.channels_last` training. On an H200 the compiled
    ViT-B training step went from 98.4 to 93.0 ms with the backbone and decoder NHWC (benchmarks/results/
    h200_2026-11-26c)."""
    return decoder_channels_last(backbone_channels_last(model, enable), enable)


FUSED_PARTS = ("spatial", "class")
# what `prepare_inference(fused=True)` (Segmenter, `catseg segment --fused-kernels`, the bench's --fused-kernels)
# switches: the Swin blocks, which took the ViT-B spatial aggregation at 847 classes from 66.1 to 54.6 ms of kernels
# on an H200 (benchmarks/results/h200_2026-11-27c/); the class aggregation blocks' kernels ran slower than their
# compiled modules there (28.8 against 14.4 ms for one block alone, h200_2026-11-27b/), so they stay modules
INFERENCE_FUSED_PARTS = ("spatial",)


def fused_kernels(model: CatSeg, enable: bool = True, attention: str = "kernel",
                  parts: Sequence[str] = FUSED_PARTS) -> CatSeg:
    """Run the aggregation blocks as Triton kernels in inference, in place (`enable=False`: back to the PyTorch
    modules); returns the model. `parts` chooses which blocks are switched: "spatial" (the Swin blocks), "class" (the
    class aggregation blocks) or both; the others are left as they are. Each Swin block runs as two kernels:
    LayerNorm, shift, window partition and the query / key / value projections (`catseg.kernels.window_qkv`), then
    the window attention, output projection, reverse shift, residual and the feed-forward half (`window_block`); with
    attention="sdpa" PyTorch's fused attention runs between the two and the second kernel starts from its output
    (`window_output`). Each class aggregation block runs as two: the key/value summary over the classes and the
    queries' update with the feed-forward half (`class_summary`, `class_update`; the release variants of the block
    fuse their feed-forward half only, `residual_mlp`). The MLPs' hidden layers, the norms' outputs, the layout
    copies and the class attention's intermediates then never go through memory. Training (autograd on) always takes
    the modules. Needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU, for tests); a block it cannot fuse
    raises ValueError. Inference takes the Swin blocks' kernels when asked (`prepare_inference(fused=True)`,
    `INFERENCE_FUSED_PARTS`); off by default."""
    if attention not in ("kernel", "sdpa"):
        raise ValueError(f"attention={attention!r}; choose 'kernel' or 'sdpa'")
    if isinstance(parts, str) or not set(parts) <= set(FUSED_PARTS):
        raise ValueError(f"parts={parts!r}; choose a list of {', '.join(map(repr, FUSED_PARTS))}")
    kinds = tuple(kind for part, kind in zip(FUSED_PARTS, (GuidedSwinBlock, ClassAggregation)) if part in parts)
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    if enable:  # (a model with fake weights, being counted by catseg.memcount, runs no kernel)
        if not kernels.available() and not kernels.is_fake(next(model.parameters())):
            raise ValueError("fused kernels need Triton and a CUDA device (or TRITON_INTERPRET=1 to run them on the "
                             "CPU through Triton's interpreter)")
        for name, m in blocks.items():
            if isinstance(m, GuidedSwinBlock):
                why = kernels.supports_swin_block(m, attention)
            elif m.fuses_whole_block:
                why = kernels.supports_class_aggregation(m)
            else:
                why = kernels.supports(m.norm2, m.mlp)
            if why is not None:
                raise ValueError(f"cannot fuse {name}: {why}")
    return _switch(model, [(m, "fused", enable) for m in blocks.values()]
                   + [(m, "fused_attention", attention) for m in blocks.values() if isinstance(m, GuidedSwinBlock)])


def _switch(model: CatSeg, settings: list) -> CatSeg:
    """Set each (module, attribute, value) of `settings` on `model`'s modules; returns the model. If any changes,
    the CUDA graphs captured for the model are dropped: they replay the path they were captured with."""
    if any(getattr(m, name) != value for m, name, value in settings):
        _GRAPHS.pop(model, None)
    for m, name, value in settings:
        setattr(m, name, value)
    return model


def _replace_weights(model: CatSeg, params, needs, convert) -> CatSeg:
    """Replace the data of each parameter p of `params` for which needs(p) by convert(p.data): the same Parameter
    objects, so optimizers and hooks keep them; captured CUDA graphs, which read the old tensors, are dropped."""
    todo = [p for p in params if needs(p)]
    for p in todo:
        p.data = convert(p.data)
    if todo:
        _GRAPHS.pop(model, None)
    return model


def compile_aggregation(model: CatSeg, **compile_kwargs) -> CatSeg:
    """torch.compile the aggregation layers and the decoder of `model` in place; returns the model.

    Their parameters and state_dict keys stay as they are. Inductor fuses the norms, activations, residual adds and
    layout copies that an eager run does one by one (an eager 847-class ViT-B patch inference moves about 340 GB
    through memory: `python -m catseg.bench --count-memory`). What is compiled is the work on one class chunk (the
    spatial aggregation, the class aggregation's two passes, the decoder), not the loops over chunks, so the compiled
    code is the same size for 20 classes as for 847. Each chunk shape compiles on its first call (seconds to a
    minute or two); after a second size of a dimension torch.compile makes that dimension dynamic, so later
    vocabulary sizes reuse the compiled code. CLIP and the backbone stay eager. `compile_kwargs` go to
    torch.compile. Calling it again on a compiled model does nothing.
    """
    if getattr(model, "_aggregation_compiled", False):
        return model
    for layer in model.layers:
        if layer.spatial is not None:
            layer.spatial.compile(**compile_kwargs)
        if layer.klass is not None:
            layer.klass.summary = torch.compile(layer.klass.summary, **compile_kwargs)
            layer.klass.update = torch.compile(layer.klass.update, **compile_kwargs)
    model.decode = torch.compile(model.decode, **compile_kwargs)
    model._aggregation_compiled = True
    return model


def compile_encoders(model: CatSeg, **compile_kwargs) -> CatSeg:
    """torch.compile CLIP's image blocks and a timm guidance backbone of `model` in place; returns the model.

    The blocks before CLIP's last one (the last runs its value path only, see `ClipEncoder.encode_dense`) share one
    compiled code; the backbone is compiled whole. What it fuses: norms, activations, residual adds and autocast's
    casts between the matrix products. Parameters and state_dict keys stay as they are; the text tower (run once
    per vocabulary) stays eager. Compiled inference (`prepare_inference(compile=True)`) runs it next to
    `compile_aggregation`: on an H200 it saved 1-2 ms per image for ViT-B and about 5 ms for ViT-L at every
    vocabulary size (benchmarks/results/h200_2026-11-27c/). Calling it again does nothing.
    """
    if getattr(model, "_encoders_compiled", False):
        return model
    for block in model.clip.model.visual.transformer.resblocks[:-1]:
        block.compile(**compile_kwargs)
    if model.backbone is not None:
        model.backbone.body.compile(**compile_kwargs)
    model._encoders_compiled = True
    return model


def prepare_inference(model: CatSeg, bf16: bool, compile: bool = False, fused: bool = False) -> CatSeg:
    """Ready `model` for inference in place, as `Segmenter` does; returns it. bf16 (to run under bf16 autocast):
    the image path's matmul weights stored in bf16 (`cast_matmul_weights`); otherwise they are put back to fp32 if an
    earlier call cast them. The convolutions go channels-last (`channels_last`), the decoder's compiled upsampling
    fuses with its neighbours (`stencil_upsampling`), `fused` runs the Swin blocks as Triton kernels
    (`fused_kernels` of `INFERENCE_FUSED_PARTS`), and `compile` compiles the aggregation and decoder
    (`compile_aggregation`) and CLIP's image blocks and the guidance backbone (`compile_encoders`). A model built to
    run all its classes at once (`config.class_chunk_size` None, as training builds it) gets chunks of
    `DEFAULT_CLASS_CHUNK`: an 847-class vocabulary would otherwise hold every class's maps at once (about 28 GiB
    per image in fp32 instead of 6.5, counted for ViT-B); results are the same up to rounding."""
    model.config.class_chunk_size = model.config.class_chunk_size or DEFAULT_CLASS_CHUNK
    cast_matmul_weights(model, torch.bfloat16 if bf16 else torch.float32)
    stencil_upsampling(channels_last(model))
    if fused:
        fused_kernels(model, parts=INFERENCE_FUSED_PARTS)
    return compile_encoders(compile_aggregation(model)) if compile else model


class Segmenter:
    """Segment images with any vocabulary: `Segmenter(model).predict(images, ["cat", "dog", "grass"])`."""

    def __init__(self, model: CatSeg, device: Optional[str] = None, batch_size: int = 4,
                 precision: str = "auto", class_chunk_size: Optional[int] = None,
                 cuda_graphs: bool = True, compile: bool = False, fused_kernels: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if class_chunk_size is not None and (isinstance(class_chunk_size, bool) or not isinstance(class_chunk_size, int)
                                             or class_chunk_size <= 0):
            raise ValueError(f"class_chunk_size={class_chunk_size!r} must be a positive integer (classes per chunk)")
        # classes per chunk, in the model and in the merge at image size: the given value, else the model's, else
        # prepare_inference's default (128)
        model.config.class_chunk_size = class_chunk_size or model.config.class_chunk_size
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={precision!r}; choose one of: auto, fp32, bf16")
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        try:
            if isinstance(batch_size, bool) or operator.index(batch_size) <= 0:
                raise TypeError
        except TypeError:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (images per model call)") from None
        batch_size = int(batch_size)
        self.model = prepare_inference(model.to(self.device).eval(), self.bf16, compile, fused_kernels)
        self.batch_size = batch_size
        self.cuda_graphs = cuda_graphs  # replay each (batch shape, vocabulary) from a CUDA graph on a GPU

    def predict(self, images: Union[ImageLike, Iterable[ImageLike]], class_names: Sequence[str]) -> list[Prediction]:
        """Label maps and class scores for one image or a list of them (paths, PIL images, arrays, tensors)."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or (
                isinstance(images, np.ndarray) and images.ndim <= 3) or (torch.is_tensor(images) and images.ndim <= 3):
            images = [images]  # one image; a 4-D array or tensor is a batch of them
        self.model.validate_class_names(class_names, self.model.config.synonyms)
        names = [n.strip() for n in class_names]
        out: list[Prediction] = []
        batch: list[torch.Tensor] = []
        items = list(images)
        for k, item in enumerate(items):
            batch.append(to_image_tensor(item))
            if len(batch) == self.batch_size or k == len(items) - 1:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    labels, scores = predict_labels(self.model, batch, names, self.model.config.class_chunk_size,
                                                    cuda_graphs=self.cuda_graphs)
                out += [Prediction(lab.numpy(), sc.numpy(), list(names)) for lab, sc in zip(labels, scores)]
                batch = []
        return out
