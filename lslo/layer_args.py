"""Checks of the LSLo layers' constructor arguments (ranks, scales, LoRA widths) and the ranks' short form
in a layer's repr; :mod:`lslo.layer` builds the layers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch


def _check_width(width, full: int, name: str) -> int:
    if width is None:
        return full
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"{name} must be an int or None, got {width!r}")
    if not 1 <= width <= full:
        raise ValueError(f"{name} = {width} must be in [1, {full}] (the base layer's width)")
    return width


def _check_scales(scale, num_languages: int) -> list[float]:
    """One finite float per language from ``scale`` (one number, or one per language)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.tolist()
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        values, names = [scale] * num_languages, ["scale"] * num_languages
    elif isinstance(scale, (str, bytes, bool)) or not isinstance(scale, Iterable):
        raise TypeError(f"scale must be a number or one number per language, got {type(scale).__name__} {scale!r}")
    else:
        values = list(scale)
        if len(values) != num_languages:
            raise ValueError(f"scale has {len(values)} entries for {num_languages} languages")
        names = [f"scale[{i}]" for i in range(num_languages)]
        for name, value in zip(names, values):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    for name, value in zip(names, values):
        if not math.isfinite(value):
            raise ValueError(f"{name} = {value}: the scale must be finite")
    return [float(v) for v in values]


def _check_ranks(ranks) -> list[int]:
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__"):
        raise TypeError(f"ranks must be a sequence of ints, got {type(ranks).__name__}")
    ranks = list(ranks)
    if not ranks:
        raise ValueError("ranks must name at least one language")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"ranks[{i}] must be an int, got {r!r}")
        if r <= 0:
            raise ValueError(f"ranks[{i}] = {r}: every rank must be >= 1")
    return ranks


def _summarise_ranks(ranks: Sequence[int]) -> str:
    # "[2, 2, 2, 8]" for a few languages, "2x16 8x14" style for many.
    if len(ranks) <= 8:
        return str(list(ranks))
    runs: list[list[int]] = []
    for r in ranks:
        if runs and runs[-1][0] == r:
            runs[-1][1] += 1
        else:
            runs.append([r, 1])
    return " ".join(f"{r}x{n}" for r, n in runs)
