"""``LSLoLinear``: a drop-in ``nn.Linear`` with one LoRA pair per language.

    y = base(x) + s_l * (B_l * M_l) @ A_l @ x,   l = language of x's sentence (source or target)

Factors of all languages live packed in one A of (sum r_l, in) and one B of (out, sum r_l),
without padding to the largest rank, so the whole mixed batch goes to one grouped kernel call.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable
from typing import Mapping, Sequence

import torch
from torch import nn

import lslo_kernels
from lslo_kernels import build_routing, check_lang_ids, grouped_lora

from .context import current_route, expand_lang_ids

__all__ = ["LSLoLinear"]

_INITS = ("lora", "reference")
_INDEXES = ("src", "tgt")


class LSLoLinear(nn.Module):
    """Language-specific LoRA around a frozen ``nn.Linear``.

    Args:
        base: the ``nn.Linear`` to adapt; wrapped, never copied. Its parameters are frozen
            unless ``freeze_base=False``.
        ranks: rank r_l of each language, all >= 1; ``len(ranks)`` is the number of languages L.
        index: ``"src"`` or ``"tgt"``: which ids of :func:`lslo.route` this layer follows.
        scale: s_l, one float for all languages or one per language.
        init: ``"lora"`` (A Kaiming-uniform with fan_in = in_features, B = 0) or ``"reference"``
            (the paper authors' code: A ~ U(-1/sqrt(r_l), 1/sqrt(r_l)), B = 0).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        validate: check language ids (a host sync) on every call; turn off for CUDA graphs.
        lora_in_features: adapt only the first ``lora_in_features`` input features (default: all).
        lora_out_features: adapt only the first ``lora_out_features`` output features (default: all).
            With either set, A is (sum r_l, lora_in_features), B is (lora_out_features, sum r_l):
            the authors' code adapts fc1's first d_model outputs and fc2's first d_model inputs.

    Shapes:
        x: (..., in_features); lang: (x.shape[0],) per sequence, x.shape[:-1] per token, or
        (n,) with x.shape[0] a multiple of n (beam search); -1 = no adapter for that row.
        output: (..., out_features); with reduced LoRA widths,
        ``output[..., :lora_out] = base(x)[..., :lora_out] + LoRA(x[..., :lora_in])`` and the
        other output features are ``base(x)``'s.
    """

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        *,
        index: str = "tgt",
        scale: float | Sequence[float] = 1.0,
        init: str = "lora",
        backend: str = "auto",
        freeze_base: bool = True,
        validate: bool = True,
        lora_in_features: int | None = None,
        lora_out_features: int | None = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        ranks = _check_ranks(ranks)
        if index not in _INDEXES:
            raise ValueError(f"index must be one of {_INDEXES}, got {index!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if backend != "auto":
            lslo_kernels.get_backend(backend)  # unknown name -> ValueError now, not at first call
        num_languages = len(ranks)
        scales = _check_scales(scale, num_languages)

        self.base_layer = base
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora_in_features = _check_width(lora_in_features, base.in_features, "lora_in_features")
        self.lora_out_features = _check_width(lora_out_features, base.out_features, "lora_out_features")
        self.ranks = tuple(ranks)
        self.index = index
        self.init = init
        self.backend = backend
        self.validate = validate
        self.max_rank = max(ranks)
        self.merged_language: int | None = None

        total = sum(ranks)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(total, self.lora_in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.lora_out_features, total, **factory))
        offsets = [0]
        for r in ranks:
            offsets.append(offsets[-1] + r)
        self.register_buffer("rank_offsets", torch.tensor(offsets, dtype=torch.int64, device=factory["device"]))
        self.register_buffer("prune_mask", torch.ones(self.lora_out_features, total, dtype=torch.bool, device=factory["device"]))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32, device=factory["device"]))
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up
    @property
    def num_languages(self) -> int:
        return len(self.ranks)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise A (per ``init``), zero B, clear the pruning mask."""
        if self.init == "lora":
            # Same bound as nn.Linear's default (kaiming_uniform_ with a=sqrt(5)) on
            # fan_in = lora_in_features (= in_features unless reduced).
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            # Offsets from the Python ranks, not the rank_offsets buffer: reading a buffer value
            # fails on the meta device, where full-size models are built to count parameters.
            r0 = 0
            for r in self.ranks:
                self.lora_A[r0 : r0 + r].uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
                r0 += r
        self.lora_B.zero_()
        self.prune_mask.fill_(True)

    def _span(self, lang_id: int) -> tuple[int, int]:
        if not isinstance(lang_id, int) or isinstance(lang_id, bool):
            raise TypeError(f"language id must be an int, got {type(lang_id).__name__}")
        if not 0 <= lang_id < self.num_languages:
            raise ValueError(f"language id {lang_id} out of range for {self.num_languages} languages")
        r0 = sum(self.ranks[:lang_id])
        return r0, r0 + self.ranks[lang_id]

    def language_factors(self, lang_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views into the packed storage for one language.

        Returns:
            A_l: (r_l, lora_in_features), B_l: (lora_out_features, r_l),
            M_l: (lora_out_features, r_l) bool.
        """
        r0, r1 = self._span(lang_id)
        return self.lora_A[r0:r1], self.lora_B[:, r0:r1], self.prune_mask[:, r0:r1]

    @torch.no_grad()
    def set_prune_mask(self, mask: torch.Tensor) -> None:
        """Install a pruning mask for B and zero the pruned entries.

        Args:
            mask: (lora_out_features, sum r_l) bool (or 0/1), False = pruned.
        """
        if mask.shape != self.prune_mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != B shape {tuple(self.prune_mask.shape)}")
        self.prune_mask.copy_(mask.to(torch.bool))
        self.lora_B.mul_(self.prune_mask)

    def mask_density(self) -> float:
        return float(self.prune_mask.float().mean()) if self.prune_mask.numel() else 1.0

    def delta_weight(self, lang_id: int) -> torch.Tensor:
        """s_l (B_l * M_l) A_l: (out_features, in_features), the update this language adds to W.

        With reduced LoRA widths the update fills the top-left (lora_out, lora_in) block; the rest is 0.
        """
        a, b, m = self.language_factors(lang_id)
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        delta = self.scales[lang_id].to(acc) * ((b * m).to(acc) @ a.to(acc))
        if delta.shape != (self.out_features, self.in_features):
            full = delta.new_zeros(self.out_features, self.in_features)
            full[: self.lora_out_features, : self.lora_in_features] = delta
            delta = full
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self, lang_id: int) -> None:
        """Fold language ``lang_id`` into the base weight; forward then runs the base alone.

        For deployment of one direction. ``unmerge()`` restores the base weight.
        """
        if self.merged_language is not None:
            raise RuntimeError(f"language {self.merged_language} is already merged; call unmerge() first")
        self.base_layer.weight.add_(self.delta_weight(lang_id))
        self.merged_language = lang_id

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if self.merged_language is None:
            return
        self.base_layer.weight.sub_(self.delta_weight(self.merged_language))
        self.merged_language = None

    def _check_merged_ids(self, x: torch.Tensor, lang: torch.Tensor | None) -> None:
        # A merged layer is base + one language's update for every row: ids of any other language
        # (or -1) would silently get the merged language's output, so they are refused.
        if lang is not None:
            ids = expand_lang_ids(lang.to(x.device) if isinstance(lang, torch.Tensor) else lang, tuple(x.shape[:-1]),
                                  "lang")
        else:
            ctx = current_route()
            ids = None if ctx is None else ctx.get_ids(self.index)
        if ids is None or not self.validate:  # no ids: used as a plain Linear for its one direction
            return
        others = ids[ids != self.merged_language]
        if others.numel():
            found = torch.unique(others).tolist()
            raise ValueError(
                f"language {self.merged_language} is merged into this layer's base weight, but it was called with "
                f"ids of other languages {found[:8]}{' ...' if len(found) > 8 else ''}; a merged layer computes only "
                "its merged language: call unmerge() to serve a mixed batch"
            )

    # ------------------------------------------------------------ adapter i/o
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter alone (no base weight): factors, mask, ranks and scales, all tensors."""
        return {
            "lora_A": self.lora_A.detach(),
            "lora_B": self.lora_B.detach(),
            "prune_mask": self.prune_mask,
            "ranks": torch.tensor(self.ranks, dtype=torch.int64),
            "scales": self.scales,
        }

    @torch.no_grad()
    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state_dict` saved; the ranks must match this layer's."""
        missing = {"lora_A", "lora_B", "prune_mask", "ranks", "scales"} - set(state)
        if missing:
            raise ValueError(f"adapter state is missing {sorted(missing)}")
        ranks = tuple(int(r) for r in state["ranks"].tolist())
        if ranks != self.ranks:
            raise ValueError(f"adapter ranks {ranks} != layer ranks {self.ranks}")
        for name in ("lora_A", "lora_B", "prune_mask"):
            if tuple(state[name].shape) != tuple(getattr(self, name).shape):
                raise ValueError(f"adapter {name} shape {tuple(state[name].shape)} != {tuple(getattr(self, name).shape)}")
        self.lora_A.copy_(state["lora_A"])
        self.lora_B.copy_(state["lora_B"])
        self.prune_mask.copy_(state["prune_mask"].to(torch.bool))
        self.scales.copy_(state["scales"])

    # ---------------------------------------------------------------- forward
    def _resolve_lang(self, x: torch.Tensor, lang: torch.Tensor | None):
        lead = tuple(x.shape[:-1])
        if lang is not None:
            per_token = expand_lang_ids(lang.to(x.device) if isinstance(lang, torch.Tensor) else lang, lead, "lang")
            if self.validate:
                check_lang_ids(per_token, self.num_languages, "lang")
            return build_routing(per_token, self.num_languages)
        ctx = current_route()
        if ctx is None:
            raise ValueError(
                "LSLoLinear called without language ids: pass lang=... or call it inside "
                "`with lslo.route(src=..., tgt=...)`"
            )
        return ctx.routing_for(self.index, lead, self.num_languages, x.device, self.validate)[1]

    def forward(self, x: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x: (..., in_features); lang: see the class docstring. Returns (..., out_features)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x has last dimension {tuple(x.shape[-1:])}, expected in_features={self.in_features}")
        if self.merged_language is not None:
            self._check_merged_ids(x, lang)
            return self.base_layer(x)
        lora_a, lora_b = self.lora_A, self.lora_B
        autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        if autocast:
            # Mixed precision (torch.autocast / accelerate): the LoRA term runs in the autocast dtype like
            # the base Linear; the fp32 master factors get their gradients through these casts. The op
            # itself then runs with autocast off: its kernels choose their own accumulation precision.
            compute = torch.get_autocast_dtype(x.device.type)
            x, lora_a, lora_b = x.to(compute), lora_a.to(compute), lora_b.to(compute)
        elif x.dtype != self.lora_A.dtype:
            raise TypeError(f"x dtype {x.dtype} != adapter dtype {self.lora_A.dtype}; cast the module or the input")
        if x.device != self.lora_A.device:
            raise ValueError(f"x is on {x.device} but the adapter is on {self.lora_A.device}")
        routing = self._resolve_lang(x, lang)
        base_out = self.base_layer(x).reshape(-1, self.out_features)
        if base_out.dtype != x.dtype:  # autocast may leave the base in another dtype than asked
            base_out = base_out.to(x.dtype)
        lead = x.shape[:-1]
        # Reduced widths: the op sees only the adapted slices (same kernel, narrower factors);
        # the un-adapted output features pass through from the base.
        x_rows = x.reshape(-1, self.in_features)[:, : self.lora_in_features]
        adapted = base_out[:, : self.lora_out_features]
        no_autocast = torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()
        with no_autocast:
            y = grouped_lora(x_rows, adapted, lora_a, lora_b, self.prune_mask, self.scales.float(), self.rank_offsets,
                             routing, self.max_rank, backend=self.backend)
        if self.lora_out_features < self.out_features:
            y = torch.cat([y, base_out[:, self.lora_out_features :]], dim=1)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        ranks = _summarise_ranks(self.ranks)
        # A meta tensor has no values: printing a model built on the meta device must not read them.
        density = "n/a" if self.prune_mask.is_meta else f"{self.mask_density():.3f}"
        widths = ""
        if (self.lora_in_features, self.lora_out_features) != (self.in_features, self.out_features):
            widths = f"lora_in_features={self.lora_in_features}, lora_out_features={self.lora_out_features}, "
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {widths}"
            f"languages={self.num_languages}, ranks={ranks}, index={self.index!r}, "
            f"mask_density={density}, backend={self.backend!r}"
        )


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
