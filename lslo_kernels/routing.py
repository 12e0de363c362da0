"""Routing metadata for a mixed-language batch.

A batch of ``T`` tokens carries one language id per token (``-1`` = no adapter).
Every grouped kernel wants the tokens grouped by language; we compute that grouping
once per batch (a stable sort of the ids plus per-language offsets) and every layer
that routes on the same ids reuses it. Nothing here synchronises with the host:
``torch.sort`` and ``torch.searchsorted`` run on the ids' device and the results stay there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Routing", "build_routing", "check_lang_ids"]


@dataclass(frozen=True)
class Routing:
    """Tokens grouped by language, shared by every layer routed by the same ids.

    Attributes:
        lang: (T,) int64, language id of each token, ``-1`` = no adapter.
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


def check_lang_ids(lang: torch.Tensor, num_languages: int, name: str = "lang") -> None:
    """Raise ``TypeError``/``ValueError`` for ids that are not int or outside ``[-1, L)``.

    This reads the ids' min/max on the host, so it synchronises; the module calls it
    only when validation is on (the default) and it can be turned off for CUDA graphs.
    """
    if not isinstance(lang, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of language ids, got {type(lang).__name__}")
    if lang.dtype.is_floating_point or lang.dtype.is_complex or lang.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of language ids, got dtype {lang.dtype}")
    if lang.numel() == 0:
        return
    if torch.compiler.is_compiling():
        # A host read would break the graph; an async device-side assert keeps the guarantee
        # (no out-of-bounds read) without a sync, at the cost of a less specific message.
        torch._assert_async(
            torch.all((lang >= -1) & (lang < num_languages)),
            f"{name}: language id outside [-1, {num_languages})",
        )
        return
    lo, hi = int(lang.min()), int(lang.max())
    if lo < -1:
        raise ValueError(f"{name} contains language id {lo} < -1 (-1 means 'no adapter')")
    if hi >= num_languages:
        raise ValueError(
            f"{name} contains language id {hi}, out of range for {num_languages} languages "
            f"(valid ids are -1 .. {num_languages - 1})"
        )


def build_routing(lang: torch.Tensor, num_languages: int) -> Routing:
    """Group tokens by language.

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
