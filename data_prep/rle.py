"""COCO-style run-length encoded masks (as in the PASCAL-Context Detail API's trainval_merged.json), in numpy.

An RLE is ``{"size": [height, width], "counts": ...}``: alternating run lengths of 0s and 1s (starting with 0s)
over the mask in column-major order. ``counts`` is a list of ints or the compact string form, where each count is
written in 5-bit groups (low first, bit 0x20 = more groups follow, bit 0x10 of the last group = sign) offset by
ASCII 48, and counts after the second are stored as the difference to the count two places before.
"""

from __future__ import annotations

import numpy as np


def counts_from_string(text: str | bytes) -> list[int]:
    """Decode the compact string form of RLE counts to a list of run lengths."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = 0
        shift = 0
        while True:
            if position >= len(text):
                raise ValueError("RLE string ends inside a count")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"RLE string has invalid character {text[position]!r} at {position}")
            position += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    value -= 1 << shift  # sign-extend the last group
                break
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def counts_to_string(counts: list[int]) -> str:
    """Encode run lengths in the compact string form (the inverse of counts_from_string)."""
    out = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        while True:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            out.append(chr(group + 48))
            if not more:
                break
    return "".join(out)


def decode(rle: dict) -> np.ndarray:
    """Decode an RLE dict to a boolean (height, width) mask; raise ValueError for inconsistent data."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"RLE must have 'size' [height, width] and 'counts' ({error!r})") from error
    if isinstance(counts, (str, bytes)):
        counts = counts_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError("RLE has a negative run length")
    if int(counts.sum()) != height * width:
        raise ValueError(f"RLE runs cover {int(counts.sum())} pixels but size {height}x{width} has {height * width}")
    values = np.arange(counts.size) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T


def encode(mask: np.ndarray) -> dict:
    """Encode a boolean (height, width) mask as an RLE dict with compact string counts."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    flat = mask.T.reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [height, width], "counts": counts_to_string(runs)}
