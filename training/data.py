"""Training data: a resumable WebDataset stream over data_prep shards, with the paper's augmentation.

The stream of one (process, loader worker) pair is a sequence of rounds. Round r draws a shard at random
(resampled shards, seeded by seed, stream id and r: split by node and worker through the seed), reads it through
a shuffle buffer, decodes, augments and batches. Every random choice derives from (seed, stream, round, index), so
the position (round, samples taken in the round) is all a checkpoint needs to continue the same sequence.

Stages, in order: resampled_shards -> read_shard -> shuffle_buffer -> skip_taken -> decode -> augment -> batch.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from data_prep.shards import CorruptSampleError, decode_sample, read_dataset_info, shard_paths

log = logging.getLogger(__name__)

# Pad value for images: CLIP's mean colour, so padding normalises to about zero (as the reference pads with the mean).
PAD_RGB = (122, 116, 104)
# A shard whose samples are all corrupt would make the stream spin; stop with a message after this many in a row.
MAX_CORRUPT_IN_A_ROW = 1000


class DataError(RuntimeError):
    """Training data that cannot be used; the message names the folder or shard and what to do."""


@dataclass
class AugmentConfig:
    """What the training augmentation does (resolved from the run config and the preset)."""

    crop_size: int  # square output size
    short_side: int  # resize the short side to this (times a random scale) before cropping
    scale_range: tuple[float, float] = (1.0, 1.0)  # random factor on short_side
    hflip: bool = True  # random horizontal flip
    jitter: bool = True  # photometric jitter
    ignore_index: int = 255  # label of padding

    def __post_init__(self):
        if self.crop_size < 1 or self.short_side < 1:
            raise ValueError(f"crop_size={self.crop_size} and short_side={self.short_side} must be positive")


@dataclass
class ShardSet:
    """A checked shard folder: its shard paths and dataset facts."""

    root: Path
    paths: list[str]
    class_names: list[str]
    ignore_index: int
    num_samples: int
    digest: str = ""  # of its dataset.json and sizes.json: the same shards moved elsewhere keep it


def open_shards(root: str | Path) -> ShardSet:
    """Read a data_prep shard folder and check it can feed training; DataError names what is wrong."""
    root = Path(root)
    try:
        info = read_dataset_info(root)
        paths = shard_paths(root)
    except FileNotFoundError as e:
        if (root / "dataset.json").is_file() and (root / "sizes.json").is_file():  # a listed shard is gone
            raise DataError(f"training shards in {root} are incomplete: {e}") from None
        raise DataError(f"training shards not found in {root} (no dataset.json/sizes.json there); make them with "
                        f"`{prep_command(root)}`, or point data.root at a shard folder (--set data.root=DIR)") from None
    except ValueError as e:
        raise DataError(f"training shards in {root} cannot be read: {e}") from None
    if not paths:
        raise DataError(f"{root} lists no shards in sizes.json; rerun the data_prep command that made it")
    sizes = _read_sizes(root)
    for path in paths:
        if sizes.get(Path(path).name, 1) == 0 or _tar_is_empty(path):
            raise DataError(f"shard {path} is empty (0 samples); remove it from {root / 'sizes.json'} or rerun the "
                            f"data_prep command that made it")
    return ShardSet(root, paths, list(info["class_names"]), int(info["ignore_index"]), int(info["num_samples"]),
                    shards_digest(root))


def shards_digest(root: Path) -> str:
    """A digest of a shard folder's dataset.json and sizes.json (what it holds, not where it lies)."""
    import hashlib

    return hashlib.sha256(b"\0".join((root / name).read_bytes() for name in ("dataset.json", "sizes.json"))).hexdigest()


def prep_command(root: str | Path) -> str:
    """The data_prep command that writes shards into ``root`` (SHARDS/<dataset>/<split>)."""
    root = Path(root)
    dataset, out = root.parent.name, root.parent.parent
    if dataset == "synthetic":
        return f"python -m data_prep.synthetic --out {out}"
    known = ("coco_stuff", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")
    if dataset in known:
        return f"python -m data_prep.convert {dataset} --root <raw {dataset} folder> --out {out}"
    return "python -m data_prep.convert <dataset> --root <raw folder> --out <shards folder>  (see data_prep/README.md)"


def _tar_is_empty(path: str) -> bool:
    # A tar without members is only zero blocks: its first 512-byte header is all zeros (or missing).
    with open(path, "rb") as handle:
        header = handle.read(512)
    return len(header) < 512 or not any(header)


def _read_sizes(root: Path) -> dict:
    import json

    try:
        return json.loads((root / "sizes.json").read_text())
    except (OSError, ValueError):
        return {}


# -- stages ------------------------------------------------------------------------------------------------------


def resampled_shards(paths: list[str], seed: int, stream: int, start_round: int) -> Iterator[tuple[int, str, np.random.Generator]]:
    """Yield (round, shard, rng) forever: each round draws a shard uniformly with its own generator."""
    r = start_round
    while True:
        rng = np.random.default_rng([seed, stream, r])
        yield r, paths[int(rng.integers(len(paths)))], rng
        r += 1


def read_shard(path: str) -> Iterator[dict]:
    """Yield the raw samples (member name -> bytes) of one tar shard."""
    import webdataset as wds

    try:
        yield from wds.tarfile_to_samples()(iter([{"url": path}]))
    except Exception as e:  # tarfile and webdataset raise several types for damaged archives
        raise DataError(f"shard {path} cannot be read as a tar ({type(e).__name__}: {e}); rerun the data_prep "
                        f"command that made it") from None


def shuffle_buffer(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle a sample stream through a buffer of ``size`` samples, emptied at the end."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        buffer[i], sample = sample, buffer[i]
        yield sample
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def skip_taken(samples: Iterator[dict], taken: int) -> Iterator[tuple[int, dict]]:
    """Number the samples of a round and drop the first ``taken`` (already trained on before a resume)."""
    for index, sample in enumerate(samples):
        if index >= taken:
            yield index, sample


def decode(sample: dict, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one raw sample to (image uint8 HxWx3, label int64 HxW); CorruptSampleError when unusable."""
    image, label, _ = decode_sample(sample)
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        raise CorruptSampleError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has label value "
                                 f"{int(label[bad].max())} outside 0..{num_classes - 1} (ignore {ignore_index})")
    return image, label.astype(np.int32)


def augment(image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resize the short side, random-crop (padding the label with ignore), jitter colours and flip."""
    h, w = label.shape
    scale = cfg.short_side * rng.uniform(*cfg.scale_range) / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    c = cfg.crop_size
    y0 = int(rng.integers(max(nh - c, 0) + 1))
    x0 = int(rng.integers(max(nw - c, 0) + 1))
    ch, cw = min(c, nh - y0), min(c, nw - x0)
    # Resize only the crop window (PIL's box): the same pixels as resizing the whole image, a fraction of the work.
    sy, sx = h / nh, w / nw
    box = (x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy)
    image = np.asarray(Image.fromarray(image).resize((cw, ch), Image.BILINEAR, box=box))
    label = _resize_nearest(label, nh, nw, y0, x0, ch, cw)
    if cfg.jitter:
        image = photometric_jitter(image, rng)
    if cfg.hflip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if (ch, cw) != (c, c):  # padded last, as the release does: the padding is neither jittered nor flipped
        padded_image = np.empty((c, c, 3), np.uint8)
        padded_image[:] = PAD_RGB
        padded_label = np.full((c, c), cfg.ignore_index, label.dtype)
        padded_image[:ch, :cw] = image
        padded_label[:ch, :cw] = label
        image, label = padded_image, padded_label
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _resize_nearest(label: np.ndarray, nh: int, nw: int, y0: int = 0, x0: int = 0, ch: int | None = None,
                    cw: int | None = None) -> np.ndarray:
    """Nearest-neighbour resize of an integer map to (nh, nw), returning the window [y0:y0+ch, x0:x0+cw]."""
    # Index arithmetic keeps integer ids exact (16-bit ids included) without a float image decoder.
    h, w = label.shape
    ch, cw = nh - y0 if ch is None else ch, nw - x0 if cw is None else cw
    ys = np.minimum(((np.arange(y0, y0 + ch) + 0.5) * h / nh).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(x0, x0 + cw) + 0.5) * w / nw).astype(np.int64), w - 1)
    return label[ys[:, None], xs[None, :]]


def photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The release's colour jitter (detectron2's ColorAugSSDTransform): brightness +-32, then contrast x[0.5, 1.5]
    first or last, the HSV saturation x[0.5, 1.5] and the hue +-18 of OpenCV's 180 steps (+-36 degrees), each part
    with probability 1/2 and the image clipped to 0..255 after each."""
    # Draw every random number up front so the sequence does not depend on which branches run.
    coins = rng.random(5)
    brightness, contrast, saturation = rng.uniform(-32, 32), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
    hue = int(rng.integers(-18, 19))  # OpenCV's 8-bit hue: 2 degrees a step

    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    img = convert(image, beta=brightness) if coins[0] < 0.5 else image
    contrast_first = coins[4] < 0.5
    if contrast_first and coins[1] < 0.5:
        img = convert(img, alpha=contrast)
    if coins[2] < 0.5 or (coins[3] < 0.5 and hue):
        hsv = np.asarray(Image.fromarray(img).convert("HSV")).copy()
        if coins[2] < 0.5:
            hsv[..., 1] = convert(hsv[..., 1], alpha=saturation)
        if coins[3] < 0.5:  # PIL's hue is 0..255 for 360 degrees, wrapping around
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(hue * 256 / 180)) % 256
        img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and coins[1] < 0.5:
        img = convert(img, alpha=contrast)
    return img


# -- the stream ----------------------------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches for one training process; each loader worker runs its own resumable stream.

    Each batch is a dict: images uint8 (B, 3, S, S), labels int32 (B, S, S), and bookkeeping for the checkpoint:
    stream (the logical stream id within this process), position [round, taken] after the batch, corrupt (samples
    skipped as corrupt by that stream since it started) and wait (seconds spent reading and decoding).
    """

    def __init__(self, shards: ShardSet, aug: AugmentConfig, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, shuffle: int = 256, positions: dict[int, list[int]] | None = None,
                 rotation: int = 0):
        super().__init__()
        self.shards, self.aug, self.batch_size, self.seed = shards, aug, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.shuffle, self.positions, self.rotation = shuffle, dict(positions or {}), rotation

    def stream_ids(self) -> tuple[int, int]:
        """(logical stream id in this process, global stream id) of the calling loader worker."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.rotation) % self.num_workers
        return logical, self.rank * self.num_workers + logical

    def __iter__(self) -> Iterator[dict]:
        logical, stream = self.stream_ids()
        start_round, taken = self.positions.get(logical, [0, 0])
        num_classes, ignore = len(self.shards.class_names), self.shards.ignore_index
        corrupt, in_a_row = 0, 0
        images, labels = [], []
        t0 = time.perf_counter()
        for r, path, rng in resampled_shards(self.shards.paths, self.seed, stream, start_round):
            seen = 0
            for index, sample in skip_taken(shuffle_buffer(read_shard(path), self.shuffle, rng), taken):
                seen += 1
                try:
                    image, label = decode(sample, num_classes, ignore)
                    in_a_row = 0
                except CorruptSampleError as e:
                    corrupt += 1
                    in_a_row += 1
                    log.warning("skipping corrupt sample (%d so far in this stream): %s", corrupt, e)
                    if in_a_row >= MAX_CORRUPT_IN_A_ROW:
                        raise DataError(f"{in_a_row} corrupt samples in a row (last in {path}); check the shards "
                                        f"with data_prep's verify") from None
                    continue
                sample_rng = np.random.default_rng([self.seed, stream, r, index, 1])
                image, label = augment(image, label, self.aug, sample_rng)
                images.append(image)
                labels.append(label)
                if len(images) == self.batch_size:
                    batch = {
                        "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                        "labels": torch.from_numpy(np.stack(labels)),
                        "stream": logical,
                        "position": [r, index + 1],
                        "corrupt": corrupt,
                        "wait": time.perf_counter() - t0,
                    }
                    images, labels = [], []
                    yield batch
                    t0 = time.perf_counter()
            if seen == 0 and taken == 0:
                raise DataError(f"shard {path} holds no samples; remove it from sizes.json or rerun data_prep")
            taken = 0


class StreamState:
    """Where each loader stream of this process stands, updated from the batches the loop consumed."""

    def __init__(self, num_workers: int, rank: int, world_size: int):
        self.num_workers, self.rank, self.world_size = max(1, num_workers), rank, world_size
        self.positions: dict[int, list[int]] = {}
        self.corrupt_before = 0  # corrupt samples counted by earlier runs of this job (restored from a checkpoint)
        self.corrupt_now: dict[int, int] = {}
        self.consumed = 0  # batches consumed since the loader started
        self.rotation = 0  # logical stream of loader worker 0 when the loader started

    def update(self, batch: dict) -> None:
        """Record the position after a consumed batch."""
        self.positions[batch["stream"]] = list(batch["position"])
        self.corrupt_now[batch["stream"]] = batch["corrupt"]
        self.consumed += 1

    @property
    def corrupt(self) -> int:
        """Corrupt samples skipped by this process over the whole job."""
        return self.corrupt_before + sum(self.corrupt_now.values())

    def state_dict(self) -> dict:
        """JSON-ready position of every stream and which stream serves the next batch."""
        return {"num_workers": self.num_workers, "rank": self.rank, "world_size": self.world_size,
                "positions": {str(k): v for k, v in self.positions.items()},
                "next_stream": (self.rotation + self.consumed) % self.num_workers, "corrupt": self.corrupt}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; a different process or worker count restarts the streams."""
        same = (state["num_workers"], state["world_size"]) == (self.num_workers, self.world_size)
        if same:
            self.positions = {int(k): list(v) for k, v in state["positions"].items()}
            self.rotation = int(state["next_stream"])
        else:
            # Another layout cannot continue the same sequence; start past every round used so far instead, by any
            # process (a stream's id here may have been another process's; the checkpoint reader adds that round).
            log.warning("data streams restart: checkpoint had %s processes x %s workers, now %s x %s",
                        state["world_size"], state["num_workers"], self.world_size, self.num_workers)
            last = max([p[0] for p in state["positions"].values()] + [state.get("last_round_any_process", 0)])
            self.positions = {w: [last + 1, 0] for w in range(self.num_workers)}
        self.corrupt_before = int(state.get("corrupt", 0))
        self.corrupt_now, self.consumed = {}, 0


def _quiet_worker(_: int) -> None:
    # Loader workers ignore the preemption signals and Ctrl-C (which a terminal sends to them too): the training
    # process handles them, goes on fetching batches until the processes agree to stop, and shuts the workers down.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardStream (batches are made in the workers, served round-robin in order)."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=_quiet_worker,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
    )
