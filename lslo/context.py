"""``lslo.route``: the language ids of the current batch, for layers called without ``lang=``.

A parent module (an attention block, a whole HF model) calls ``layer(x)`` with no idea of
languages. Inside ``with lslo.route(src=..., tgt=...)`` every :class:`~lslo.LSLoLinear` reads the
ids its ``index`` asks for. The routing metadata (tokens sorted by language) depends only on the
ids, the token layout and the number of languages, so it is built once per batch and shared by
every layer through a cache held by the active context.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from lslo_kernels import Routing, build_routing, check_lang_ids

__all__ = ["route", "RouteContext", "current_route", "expand_lang_ids"]


class RouteContext:
    """Ids of the current batch and a cache of the routings built from them.

    Args:
        src: (B,) or (B, S) int64 source-language id per sentence (or per token), or None.
        tgt: (B,) or (B, S) int64 target-language id per sentence (or per token), or None.
    """

    def __init__(self, src: torch.Tensor | None = None, tgt: torch.Tensor | None = None):
        self.ids = {"src": src, "tgt": tgt}
        self._routings: dict[tuple, tuple[torch.Tensor, Routing]] = {}

    def get_ids(self, index: str) -> torch.Tensor | None:
        return self.ids.get(index)

    def routing_for(self, index: str, lead_shape: tuple[int, ...], num_languages: int,
                    device: torch.device, validate: bool) -> tuple[torch.Tensor, Routing]:
        key = (index, tuple(lead_shape), num_languages, device)
        hit = self._routings.get(key)
        if hit is None:
            ids = self.ids.get(index)
            if ids is None:
                raise ValueError(
                    f"lslo.route has no {index!r} ids but a layer with index={index!r} was called; "
                    f"pass {index}=... to lslo.route"
                )
            per_token = expand_lang_ids(ids.to(device), lead_shape, f"lslo.route({index}=...)")
            if validate:
                check_lang_ids(per_token, num_languages, f"lslo.route({index}=...)")
            hit = (per_token, build_routing(per_token, num_languages))
            self._routings[key] = hit
        return hit


_CURRENT: contextvars.ContextVar[RouteContext | None] = contextvars.ContextVar("lslo_route", default=None)


def current_route() -> RouteContext | None:
    """The innermost active :func:`route` context, or None."""
    return _CURRENT.get()


@contextlib.contextmanager
def route(src: torch.Tensor | None = None, tgt: torch.Tensor | None = None) -> Iterator[RouteContext]:
    """Make ``src``/``tgt`` language ids visible to every LSLoLinear called inside the block.

    Args:
        src: (B,) int64 source-language id per sentence, (B, S) per token, or None.
        tgt: (B,) int64 target-language id per sentence, (B, S) per token, or None.
    """
    for name, ids in (("src", src), ("tgt", tgt)):
        if ids is not None and not isinstance(ids, torch.Tensor):
            raise TypeError(f"lslo.route({name}=...) must be a tensor of language ids, got {type(ids).__name__}")
    token = _CURRENT.set(RouteContext(src, tgt))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def expand_lang_ids(ids: torch.Tensor, lead_shape: tuple[int, ...], name: str = "lang") -> torch.Tensor:
    """Per-sequence or per-token ids -> one id per token, flattened.

    Args:
        ids: (lead_shape) per token; or (n,) per sequence where ``lead_shape[0]`` is a multiple
            of n (beam search repeats each sentence ``lead_shape[0] // n`` times, consecutively).
        lead_shape: x.shape[:-1].

    Returns:
        (prod(lead_shape),) int64.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of language ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    lead_shape = tuple(lead_shape)
    if tuple(ids.shape) == lead_shape:
        return ids.reshape(-1).to(torch.int64)
    if len(lead_shape) == 0:
        raise ValueError(f"{name} of shape {tuple(ids.shape)} does not fit an input with no batch dimension")
    rows = lead_shape[0]
    # ids may be per token of a shorter layout: (n, S) for x (n * beams, S, k)
    if ids.dim() >= 1 and ids.shape[0] > 0 and rows % ids.shape[0] == 0 and (
        ids.dim() == 1 or tuple(ids.shape[1:]) == lead_shape[1:]
    ):
        repeated = ids.repeat_interleave(rows // ids.shape[0], dim=0)
        view = repeated.reshape(repeated.shape + (1,) * (len(lead_shape) - repeated.dim()))
        return view.expand(lead_shape).reshape(-1).to(torch.int64)
    if rows == 0 and ids.numel() == 0:
        return ids.reshape(-1).to(torch.int64)
    raise ValueError(
        f"{name} has shape {tuple(ids.shape)}, which fits neither per-sequence use (first dimension "
        f"dividing the batch {rows}) nor per-token use (shape {lead_shape})"
    )
