"""Routing metadata for a mixed-language batch: the one path from language ids to the kernels.

A batch of ``T`` tokens carries one language id per token (``-1`` = no adapter). Every grouped
kernel wants the tokens grouped by language; we compute that grouping once per batch (a stable
sort of the ids plus per-language offsets) and every layer that routes on the same ids reuses it
(``lslo.route`` caches it). :func:`route_tokens` is the single function from ids to a
:class:`Routing`: it checks the dtype once, expands per-sequence ids to tokens, checks the range
with one host read (optional), and sorts. The kernels then receive only the sorted order and the
offsets, never the raw ids. Nothing but the range check of CPU ids reads a device value on the host:
the offsets come from a device-side sort and ``searchsorted`` (fixed-size outputs), and on CUDA the
range check is an asynchronous device assert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Routing", "build_routing", "check_lang_ids", "expand_lang_ids", "lang_id_range", "route_tokens"]


@dataclass(frozen=True)
class Routing:
    """Tokens grouped by language, shared by every layer routed by the same ids.

    Attributes:
        lang: (T,) int64, language id of each token, ``-1`` = no adapter (kept for callers; the
            kernels do not read it).
        sorted_token_idx: (T,) int64, token indices ordered by language (stable);
            tokens with id ``-1`` come first.
        lang_offsets: (L + 1,) int64, tokens of language ``l`` are
            ``sorted_token_idx[lang_offsets[l]:lang_offsets[l + 1]]``;
            ``lang_offsets[L] == T``.
        num_languages: L.
    """

    lang: torch.Tensor
    sorted_token_idx: torch.Tensor
    lang_offsets: torch.Tensor
    num_languages: int

    @property
    def num_tokens(self) -> int:
        return self.lang.shape[0]


def _check_int_dtype(ids, name: str) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of language ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of language ids, got dtype {ids.dtype}")


def lang_id_range(*ids: torch.Tensor) -> list[tuple[int, int]]:
    """(min, max) of each non-empty tensor of ids, read from the device in one host transfer.

    Returns:
        One (min, max) per argument; (0, -1) for an empty tensor.
    """
    stats = [torch.aminmax(t.reshape(-1)) for t in ids if t.numel()]
    values = torch.stack([v for pair in stats for v in pair]).tolist() if stats else []
    out, i = [], 0
    for t in ids:
        if t.numel():
            out.append((int(values[i]), int(values[i + 1])))
            i += 2
        else:
            out.append((0, -1))
    return out


def _raise_if_out_of_range(lo: int, hi: int, num_languages: int, name: str) -> None:
    if lo < -1:
        raise ValueError(f"{name} contains language id {lo} < -1 (-1 means 'no adapter')")
    if hi >= num_languages:
        raise ValueError(
            f"{name} contains language id {hi}, out of range for {num_languages} languages "
            f"(valid ids are -1 .. {num_languages - 1})"
        )


# Device types whose ids route_tokens range-checks on the host (one read, a ValueError naming the
# id). On the others (CUDA) the check is an asynchronous device assert: a host read would wait for
# the device on every batch and break CUDA-graph capture, and the ids were checked where they
# entered (the data, the CLI); the guarantee that no kernel reads out of bounds is the same.
HOST_CHECKED_DEVICES = frozenset({"cpu"})


def _check_range(lang: torch.Tensor, num_languages: int, name: str, *, host: bool | None = None) -> None:
    """host: read min/max on the host (None: on HOST_CHECKED_DEVICES and outside torch.compile)."""
    if lang.numel() == 0:
        return
    if host is None:
        host = lang.device.type in HOST_CHECKED_DEVICES
    if torch.compiler.is_compiling() or not host:
        # A host read would break the graph (or wait for the device): an async device-side assert
        # keeps the guarantee (no out-of-bounds read) without a sync, with a less specific message.
        torch._assert_async(
            torch.all((lang >= -1) & (lang < num_languages)),
            f"{name}: language id outside [-1, {num_languages})",
        )
        return
    (lo, hi), = lang_id_range(lang)
    _raise_if_out_of_range(lo, hi, num_languages, name)


def check_lang_ids(lang: torch.Tensor, num_languages: int, name: str = "lang") -> None:
    """Raise ``TypeError``/``ValueError`` for ids that are not int or outside ``[-1, L)``.

    This reads the ids' min and max on the host (one transfer), so it synchronises; under
    ``torch.compile`` it becomes an async device assert instead.
    """
    _check_int_dtype(lang, name)
    _check_range(lang, num_languages, name, host=True)


def _expand(ids: torch.Tensor, lead_shape: tuple[int, ...], name: str) -> torch.Tensor:
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


def expand_lang_ids(ids: torch.Tensor, lead_shape: tuple[int, ...], name: str = "lang") -> torch.Tensor:
    """Per-sequence or per-token ids -> one id per token, flattened.

    Args:
        ids: (lead_shape) per token; or (n,) per sequence where ``lead_shape[0]`` is a multiple
            of n (beam search repeats each sentence ``lead_shape[0] // n`` times, consecutively).
        lead_shape: x.shape[:-1].

    Returns:
        (prod(lead_shape),) int64.
    """
    _check_int_dtype(ids, name)
    return _expand(ids, tuple(lead_shape), name)


def build_routing(lang: torch.Tensor, num_languages: int) -> Routing:
    """Group tokens by language (no checks of the ids: see :func:`route_tokens`).

    Args:
        lang: (T,) integer tensor, language id per token in ``[-1, num_languages)``.
        num_languages: L, the number of adapters of the layers that will use the routing.

    Returns:
        A :class:`Routing` on ``lang``'s device.
    """
    if num_languages < 1:
        raise ValueError(f"num_languages must be >= 1, got {num_languages}")
    lang = lang.reshape(-1).to(torch.int64)
    # Stable so that tokens of one language keep their order: kernels then read x rows
    # in increasing address order inside a group.
    sorted_lang, sorted_token_idx = torch.sort(lang, stable=True)
    boundaries = torch.arange(num_languages + 1, device=lang.device, dtype=torch.int64)
    lang_offsets = torch.searchsorted(sorted_lang, boundaries)
    return Routing(lang, sorted_token_idx, lang_offsets, num_languages)


def route_tokens(
    ids: torch.Tensor,
    lead_shape: tuple[int, ...],
    num_languages: int,
    *,
    validate: bool = True,
    device: torch.device | None = None,
    name: str = "lang",
) -> Routing:
    """Language ids of a batch -> the :class:`Routing` of its tokens: the one path every layer uses.

    One dtype check, the expansion of per-sequence ids, at most one host read (the range check,
    skipped with ``validate=False``, e.g. when the ids were checked where they entered), one sort.

    Args:
        ids: per-token ids of shape ``lead_shape``, or per-sequence (n,) ids with ``lead_shape[0]``
            a multiple of n (beam search); -1 = no adapter.
        lead_shape: x.shape[:-1] of the layer input.
        num_languages: L.
        validate: check that every id is in ``[-1, L)``: on the host for CPU ids (a ValueError naming
            the id), elsewhere (CUDA) by an asynchronous device assert, so that routing never
            synchronises with the device (``HOST_CHECKED_DEVICES``).
        device: move the ids there first (the layer's device).
        name: how errors name the ids.

    Returns:
        The Routing of ``prod(lead_shape)`` tokens.
    """
    _check_int_dtype(ids, name)
    if device is not None and ids.device != device:
        ids = ids.to(device)
    per_token = _expand(ids, tuple(lead_shape), name)
    if validate:
        _check_range(per_token, num_languages, name)
    return build_routing(per_token, num_languages)
