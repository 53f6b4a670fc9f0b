"""The benchmark registry: class lists, ignore values, shard locations and special scoring rules.

Each benchmark is evaluated from the validation shards written by ``data_prep`` under ``<shards>/<dataset>/val``.
The model is prompted with ``prompt_names``; predictions are mapped by ``map_prediction`` and scored against the
ground truth over ``class_names``. PAS-20b is the one benchmark where the two differ: it prompts with the 59 names of
``voc20b.json`` (the 20 VOC classes and 39 PASCAL-Context classes standing for "background") and scores 21 classes,
every prediction >= 20 counting as background (20), whose IoU is part of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKGROUND = "background"


@dataclass(frozen=True)
class Benchmark:
    """One evaluation benchmark."""

    name: str  # registry key, used on the command line and in metric keys (miou/<name>)
    title: str  # the name used in the paper's tables
    dataset: str  # folder under the shards root written by data_prep
    ignore_index: int  # ground-truth value that is never scored
    vocab: str | None  # catseg vocabulary to prompt with; None: the class list in the shards' dataset.json
    split: str = "val"  # split folder under the dataset folder
    background_index: int | None = None  # predictions >= this id count as this id, named "background"

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"Benchmark.name must be letters, digits, '_' or '-' (a metric key), got {self.name!r}")
        if self.ignore_index < 0:
            raise ValueError(f"Benchmark.ignore_index must be >= 0, got {self.ignore_index}")
        if self.background_index is not None and self.background_index < 1:
            raise ValueError(f"Benchmark.background_index must be None or >= 1, got {self.background_index}")

    def shard_dir(self, shards_root: str | Path) -> Path:
        """Return the default folder of this benchmark's shards under ``shards_root``."""
        return Path(shards_root) / self.dataset / self.split

    def prompt_names(self, shard_dir: str | Path | None = None) -> list[str]:
        """Return the class names the model is prompted with (needs ``shard_dir`` when ``vocab`` is None)."""
        if self.vocab is not None:
            from catseg.vocab import load_vocab

            return list(load_vocab(self.vocab))
        if shard_dir is None:
            raise ValueError(f"benchmark {self.name!r} reads its class list from its shards; pass shard_dir")
        from data_prep.shards import read_dataset_info

        info = read_dataset_info(Path(shard_dir))
        names = info.get("class_names")
        if not names:
            raise ValueError(f"{shard_dir}: dataset.json lists no class_names for benchmark {self.name!r}")
        return [str(n) for n in names]

    def class_names(self, shard_dir: str | Path | None = None) -> list[str]:
        """Return the names of the scored classes, index = label id in the ground truth."""
        names = self.prompt_names(shard_dir)
        if self.background_index is None:
            return names
        if len(names) <= self.background_index:
            raise ValueError(
                f"benchmark {self.name!r} maps predictions >= {self.background_index} to background but prompts "
                f"with only {len(names)} names"
            )
        return names[: self.background_index] + [BACKGROUND]

    def map_prediction(self, labels):
        """Map predicted prompt ids to scored class ids (identity except for a background benchmark)."""
        if self.background_index is None:
            return labels
        if isinstance(labels, np.ndarray):
            return np.minimum(labels, self.background_index)
        return labels.clamp(max=self.background_index)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("ade847", "A-847", "ade847", ignore_index=65535, vocab="ade847"),
        Benchmark("pc459", "PC-459", "pc459", ignore_index=65535, vocab="pc459"),
        Benchmark("ade150", "A-150", "ade150", ignore_index=255, vocab="ade150"),
        Benchmark("pc59", "PC-59", "pc59", ignore_index=255, vocab="pc59"),
        Benchmark("voc20", "PAS-20", "voc20", ignore_index=255, vocab="voc20"),
        Benchmark("voc20b", "PAS-20b", "voc20b", ignore_index=255, vocab="voc20b", background_index=20),
        Benchmark("coco", "COCO-Stuff", "coco_stuff", ignore_index=255, vocab="coco"),
        Benchmark("synthetic", "Synthetic", "synthetic", ignore_index=255, vocab=None),
    )
}

# The six benchmarks of the paper's main table, in its column order.
PAPER_BENCHMARKS = ("ade847", "pc459", "ade150", "pc59", "voc20", "voc20b")


def get_benchmark(name: str) -> Benchmark:
    """Return the registered benchmark called ``name``."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}") from None


def parse_benchmarks(spec: str) -> list[Benchmark]:
    """Parse a comma-separated list of benchmark names ("ade150,pc59"; "paper" for the six of the paper)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no benchmark named in {spec!r}; choose from: paper, {', '.join(BENCHMARKS)}")
    out: list[Benchmark] = []
    for name in names:
        for b in (PAPER_BENCHMARKS if name == "paper" else (name,)):
            bench = get_benchmark(b)
            if bench not in out:
                out.append(bench)
    return out
