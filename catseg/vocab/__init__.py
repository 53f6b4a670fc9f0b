"""Class lists of the training set and the benchmarks, index = train id."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_DIR = Path(__file__).parent
VOCABS = ("coco", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[str, ...]:
    return tuple(json.loads((_DIR / f"{name}.json").read_text()))


def load_vocab(name: str) -> list[str]:
    """Class names of a benchmark vocabulary (coco, ade150, ade847, pc59, pc459, voc20, voc20b)."""
    if name not in VOCABS:
        raise ValueError(f"unknown vocabulary {name!r}; choose one of: {', '.join(VOCABS)}")
    return list(_load(name))
