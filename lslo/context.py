"""``lslo.route``: the language ids of the current batch, for layers called without ``lang=``.

A parent module (an attention block, a whole HF model) calls ``layer(x)`` with no idea of
languages. Inside ``with lslo.route(src=..., tgt=...)`` every :class:`~lslo.LSLoLinear` reads the
ids its ``index`` asks for. The routing metadata (tokens sorted by language) depends only on the
ids, the token layout and the number of languages, so it is built once per batch and shared by
every layer through the one cache held by the active context. The ids are range-checked at most
once per batch: by ``route(..., num_languages=L)`` itself (one host read for src and tgt
together), or else by the first layer that routes on them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from lslo_kernels import Routing, expand_lang_ids, route_tokens
from lslo_kernels.routing import (
    HOST_CHECKED_DEVICES,
    _check_int_dtype,
    _check_range,
    _raise_if_out_of_range,
    lang_id_range,
)

__all__ = ["RouteContext", "current_route", "expand_lang_ids", "route"]


class RouteContext:
    """Ids of the current batch and the cache of the routings built from them.

    Args:
        src: (B,) or (B, S) int64 source-language id per sentence (or per token), or None.
        tgt: (B,) or (B, S) int64 target-language id per sentence (or per token), or None.
        num_languages: when given, both are range-checked now (one host read) and no layer checks them again.
    """

    def __init__(self, src: torch.Tensor | None = None, tgt: torch.Tensor | None = None,
                 num_languages: int | None = None):
        self.ids = {"src": src, "tgt": tgt}
        self._routings: dict[tuple, Routing] = {}
        self._checked: set[tuple[str, int]] = set()  # (index, L) whose ids were range-checked
        given = [(name, ids) for name, ids in self.ids.items() if ids is not None]
        for name, ids in given:
            _check_int_dtype(ids, f"lslo.route({name}=...)")
        if num_languages is not None and given:
            # CPU ids: one host read for both; others (CUDA): a device assert each, no sync (routing.py).
            compiling = torch.compiler.is_compiling()
            on_host = [] if compiling else [(n, ids) for n, ids in given if ids.device.type in HOST_CHECKED_DEVICES]
            for (name, _ids), (lo, hi) in zip(on_host, lang_id_range(*(ids for _, ids in on_host))):
                if lo <= hi:
                    _raise_if_out_of_range(lo, hi, num_languages, f"lslo.route({name}=...)")
            for name, ids in given:
                if compiling or ids.device.type not in HOST_CHECKED_DEVICES:
                    _check_range(ids.reshape(-1), num_languages, f"lslo.route({name}=...)")
                self._checked.add((name, num_languages))

    def get_ids(self, index: str) -> torch.Tensor | None:
        return self.ids.get(index)

    def routing_for(self, index: str, lead_shape: tuple[int, ...], num_languages: int,
                    device: torch.device, validate: bool) -> Routing:
        """The routing of ``index``'s ids for an input of leading shape ``lead_shape``, built once."""
        key = (index, lead_shape, num_languages, device)
        hit = self._routings.get(key)
        if hit is None:
            ids = self.ids.get(index)
            if ids is None:
                raise ValueError(
                    f"lslo.route has no {index!r} ids but a layer with index={index!r} was called; "
                    f"pass {index}=... to lslo.route"
                )
            check = validate and (index, num_languages) not in self._checked
            hit = route_tokens(ids, lead_shape, num_languages, validate=check, device=device,
                               name=f"lslo.route({index}=...)")
            if check:
                self._checked.add((index, num_languages))
            self._routings[key] = hit
        return hit


_CURRENT: contextvars.ContextVar[RouteContext | None] = contextvars.ContextVar("lslo_route", default=None)


# Under torch.compile: dynamo cannot trace ContextVar.get/set, so a route entered inside a compiled
# function lives here while it is traced (a list item: the write is a side effect dynamo replays).
_TRACED: list[RouteContext | None] = [None]


def current_route() -> RouteContext | None:
    """The innermost active :func:`route` context, or None."""
    if torch.compiler.is_compiling():
        traced = _TRACED[0]
        if traced is not None:
            return traced
    return _CURRENT.get()


@contextlib.contextmanager
def route(src: torch.Tensor | None = None, tgt: torch.Tensor | None = None,
          num_languages: int | None = None) -> Iterator[RouteContext]:
    """Make ``src``/``tgt`` language ids visible to every LSLo layer called inside the block.

    Args:
        src: (B,) int64 source-language id per sentence, (B, S) per token, or None.
        tgt: (B,) int64 target-language id per sentence, (B, S) per token, or None.
        num_languages: check the ids against ``[-1, num_languages)`` here, once for the whole block
            (one host read for both); otherwise the first layer to use them checks them.
    """
    for name, ids in (("src", src), ("tgt", tgt)):
        if ids is not None and not isinstance(ids, torch.Tensor):
            raise TypeError(f"lslo.route({name}=...) must be a tensor of language ids, got {type(ids).__name__}")
    if torch.compiler.is_compiling():
        previous, _TRACED[0] = _TRACED[0], RouteContext(src, tgt, num_languages)
        try:
            yield _TRACED[0]
        finally:
            _TRACED[0] = previous
        return
    token = _CURRENT.set(RouteContext(src, tgt, num_languages))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
