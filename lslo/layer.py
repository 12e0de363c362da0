"""LSLo layers: drop-in ``nn.Linear`` replacements with one LoRA pair per language.

    LSLoLinear:      y = base(x) + s_l * (B_l * M_l) @ A_l @ x,   l = language of x's sentence (source or target)
    LSLoDualLinear:  y = base(x) + w_src * LSLo_src(x) + w_tgt * LSLo_tgt(x)   (Weight Learning, paper Eq. 5)

Factors of all languages live packed in one A of (sum r_l, in) and one B of (out, sum r_l),
without padding to the largest rank, so the whole mixed batch goes to one grouped kernel call.

Hot path: the routing comes from the one cache of ``lslo.route`` (built and range-checked once
per batch); without autograd (``no_grad``, ``inference_mode``, frozen adapters) the LoRA term is
added into the base layer's output in place by the backend's kernel (``lslo_kernels.ops.lora_add_call``:
no custom-op or autograd layer, no output copy), or on ``cpp`` computed with the base in one C++
call (``linear_decode``); after a layer's first no-grad call on ``cpp`` or ``triton``, those kernel
calls are all its forward does besides a few checks (``LSLoLinear._planned_decode``). In training
the backend's compiled autograd entry is called directly where it has one (``cpp``). Under
``torch.compile`` the layers use the custom op, which traces.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import lslo_kernels
from lslo_kernels import Routing, resolve_backend, route_tokens
from lslo_kernels.ops import lora_add_call, lora_call
from lslo_kernels.spec import mixed_factors

from .base_layer import _base_forward, _global_hooks, _inference, _plain_linear, _unit_rows
from .context import current_route, expand_lang_ids
from .layer_args import _check_ranks, _check_scales, _check_width, _summarise_ranks

__all__ = ["LSLoDualLinear", "LSLoFactors", "LSLoLinear", "LSLoMix"]

_INITS = ("lora", "reference")
_INDEXES = ("src", "tgt")
_SCALE_DTYPES = (torch.float32, torch.float64)
# Bound once: the decoding fast path reads them on every call (each dotted lookup is a few more
# bytecodes; torch.compiler.is_compiling is the same function object, which dynamo recognises).
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))
# What a layer caches between calls, reset to these values: the resolved backend and its ops (see
# _LanguageFactors._backend_for), the staged decoding factors ((key, staged factors, storages kept
# alive): _staged_factors) and LSLoLinear's decoding plan (_planned_decode).
_CALL_CACHES = {"_backend_key": None, "_backend_name": None, "_backend_add": None, "_backend_linear": None,
                "_backend_decode": None, "_backend_mixed": False, "_backend_staged": None, "_staged": None,
                "_decode_plan": None, "_backend_checks": False}
# LSLoLinear decodes with staged factors (Backend.stage_factors) from this many entries of B up.
_STAGED_MIN_ENTRIES = 1 << 14


class _LanguageFactors:
    """The packed adapter storage of one routing (src or tgt) and everything that touches only it.

    Mixed into :class:`LSLoLinear` and :class:`LSLoFactors` (nn.Modules). Attributes: ``lora_A``
    (R, lora_in_features), ``lora_B`` (lora_out_features, R), buffers ``prune_mask``
    (lora_out_features, R) bool with True = kept, ``rank_offsets`` (L + 1,), ``scales`` (L,) float32
    (a Parameter when ``learn_scales``), and ``ranks``, ``index``, ``init``, ``backend``, ``validate``.
    """

    def _init_factors(self, ranks, *, lora_in_features: int, lora_out_features: int, index: str, init: str,
                      backend: str, validate: bool, scales: list[float], learn_scales: bool, device, dtype) -> None:
        if index not in _INDEXES:
            raise ValueError(f"index must be one of {_INDEXES}, got {index!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if backend != "auto":
            lslo_kernels.get_backend(backend)  # unknown name -> ValueError now, not at first call
        if not isinstance(learn_scales, bool):
            raise TypeError(f"learn_scales must be a bool, got {learn_scales!r}")
        self.lora_in_features = lora_in_features
        self.lora_out_features = lora_out_features
        self.ranks = tuple(ranks)
        self.index = index
        self.init = init
        self.backend = backend
        self.validate = validate
        self.max_rank = max(ranks)
        self.__dict__.update(_CALL_CACHES)

        total = sum(ranks)
        self.lora_A = nn.Parameter(torch.empty(total, lora_in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(lora_out_features, total, device=device, dtype=dtype))
        offsets = [0]
        for r in ranks:
            offsets.append(offsets[-1] + r)
        self.register_buffer("rank_offsets", torch.tensor(offsets, dtype=torch.int64, device=device))
        self.register_buffer("prune_mask", torch.ones(lora_out_features, total, dtype=torch.bool, device=device))
        scales_t = torch.tensor(scales, dtype=torch.float32, device=device)
        if learn_scales:
            self.scales = nn.Parameter(scales_t)
        else:  # a buffer by default: saved adapters and frozen-scale training as before
            self.register_buffer("scales", scales_t)
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up
    @property
    def num_languages(self) -> int:
        return len(self.ranks)

    @property
    def learn_scales(self) -> bool:
        """Whether ``scales`` is a trainable Parameter (else a buffer)."""
        return isinstance(self.scales, nn.Parameter)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise A (per ``init``), zero B, clear the pruning mask (every entry kept)."""
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
            M_l: (lora_out_features, r_l) bool, True = entry of B_l kept.
        """
        r0, r1 = self._span(lang_id)
        return self.lora_A[r0:r1], self.lora_B[:, r0:r1], self.prune_mask[:, r0:r1]

    @property
    def keep_mask(self) -> torch.Tensor:
        """(lora_out_features, sum r_l) bool: True where an entry of B is KEPT, False where pruned.

        The same tensor as the ``prune_mask`` buffer (the name saved in adapter files), under a
        name that says which way it points.
        """
        return self.prune_mask

    @torch.no_grad()
    def set_prune_mask(self, mask: torch.Tensor | None = None, *, keep: torch.Tensor | None = None) -> None:
        """Install the pruning mask of B and zero the pruned entries.

        Give the mask either way, both meaning True = KEPT (never "True = pruned"):
        ``set_prune_mask(mask)`` or, unmistakably, ``set_prune_mask(keep=mask)``.

        Args:
            mask: (lora_out_features, sum r_l) bool (or 0/1): True/1 = entry kept, False/0 = pruned.
            keep: the same, by keyword.
        """
        if (mask is None) == (keep is None):
            raise TypeError("set_prune_mask takes exactly one mask: set_prune_mask(mask) or set_prune_mask(keep=mask), "
                            "True = entry of B kept")
        mask = keep if mask is None else mask
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"the keep mask must be a tensor, got {type(mask).__name__}")
        if mask.shape != self.prune_mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != B shape {tuple(self.prune_mask.shape)}")
        self.prune_mask.copy_(mask.to(torch.bool))
        self.lora_B.mul_(self.prune_mask)

    def mask_density(self) -> float:
        """Share of B's entries kept (1.0 = nothing pruned)."""
        return float(self.prune_mask.float().mean()) if self.prune_mask.numel() else 1.0

    # ------------------------------------------------------------ adapter i/o
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter alone (no base weight): factors, mask (key ``prune_mask``, True = kept), ranks and scales."""
        return {
            "lora_A": self.lora_A.detach(),
            "lora_B": self.lora_B.detach(),
            "prune_mask": self.prune_mask,
            "ranks": torch.tensor(self.ranks, dtype=torch.int64),
            "scales": self.scales.detach(),
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

    def __getstate__(self) -> dict:
        """Pickling (``torch.save`` of a whole module, ``copy.deepcopy``, multiprocessing) leaves the
        call caches out: the compiled ops in them cannot be pickled, and the next call rebuilds them."""
        state = self.__dict__.copy()
        state.update(_CALL_CACHES)
        return state

    # ---------------------------------------------------------------- the op
    def _backend_for(self, x: torch.Tensor) -> str:
        key = (self.backend, x.device, x.dtype)
        if key != self._backend_key:  # resolved once per (backend, device, dtype), not per call
            if _is_compiling():  # a cache written while tracing is a guard that the next call fails
                return resolve_backend(self.backend, x.device, x.dtype)
            self._backend_name = resolve_backend(self.backend, x.device, x.dtype)
            impl = lslo_kernels.get_backend(self._backend_name)
            self._backend_add, self._backend_mixed = impl.add_, impl.mixed_factors
            # Its kernels check every argument (Backend.checks_arguments): a planned call may skip
            # the layer's checks (LSLoLinear._planned_decode).
            self._backend_checks = impl.checks_arguments
            self._backend_linear, self._backend_decode = impl.linear, impl.linear_decode
            # Staged decoding factors only where staging is a visible part of a call: below ~16k
            # entries of B it costs less than the ~1-2 us of checking the cache.
            big = self.lora_B.numel() >= _STAGED_MIN_ENTRIES
            self._backend_staged = impl.stage_factors if (
                big and impl.stage_factors is not None and impl.linear_decode is not None) else None
            self._staged = None
            self._backend_key = key
        return self._backend_name

    def _staged_factors(self, stage, lora_b: torch.Tensor, mask: torch.Tensor, raw_scales: torch.Tensor,
                        rank_offsets: torch.Tensor) -> torch.Tensor | None:
        """The backend's staged decoding factors (``Backend.stage_factors``; None for a non-contiguous
        lora_B or inference tensors, which the kernel then stages per call), rebuilt only when
        lora_B, the mask, the scales or the rank offsets changed: keyed on each one's version
        counter (bumped by every in-place write, optimizer steps included) and data pointer (a
        new tensor assigned to ``.data``); the keyed storages are held, so no other tensor can
        take their addresses while the entry lives. Freed by :meth:`clear_decoding_cache`. raw_scales:
        the ``scales`` buffer or parameter itself (its version is the key's), before any cast."""
        try:  # written out, not a generator: this runs on every decoding call (~0.5% of a T=5 1024->1024 call)
            key = ((lora_b._version, lora_b.data_ptr()), (mask._version, mask.data_ptr()),
                   (raw_scales._version, raw_scales.data_ptr()), (rank_offsets._version, rank_offsets.data_ptr()))
        except RuntimeError:  # inference tensors (a layer built under inference_mode) have no version
            return None  # counter, so no cache can tell their changes: the kernel stages per call
        cached = self._staged
        if cached is not None and cached[0] == key:
            return cached[1]
        if not lora_b.is_contiguous():
            return None
        scales = raw_scales if raw_scales.dtype in _SCALE_DTYPES else raw_scales.float()
        staged = stage(lora_b, mask, scales, rank_offsets)
        self._staged = (key, staged, tuple(t.untyped_storage() for t in (lora_b, mask, raw_scales, rank_offsets)))
        return staged

    def clear_decoding_cache(self) -> None:
        """Free the staged decoding factors (rebuilt by the next ``no_grad`` call that uses them).

        Needed after writing lora_B, the mask or the scales through ``.data`` in place
        (``layer.lora_B.data.copy_(...)``): such writes bump no version counter, so the cache cannot
        see them. Writes to the tensors themselves (optimizer steps, ``load_state_dict``, in-place ops
        under ``no_grad``) and new tensors assigned to ``.data`` are seen."""
        self._staged = None

    def _autocast_factors(self, x: torch.Tensor, lora_a: torch.Tensor,
                          lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors the op gets under autocast, x already in the autocast dtype: as they are when
        the backend for x takes fp32 factors with x's 16-bit dtype (``Backend.mixed_factors``: it
        rounds them as it reads them and returns fp32 gradients; on an H100 the two casts and their
        two backward casts cost ~4 x 29 us of host time per layer and step, issue 12's profile),
        else cast to x's dtype, the fp32 master factors getting their gradients through the casts."""
        if x.device == lora_a.device and mixed_factors(x.dtype, lora_a.dtype):
            self._backend_for(x)
            if self._backend_mixed:
                return lora_a, lora_b
        return lora_a.to(x.dtype), lora_b.to(x.dtype)

    def _tensors(self):
        """(lora_A, lora_B, prune_mask, scales as the op takes them, rank_offsets), read from the
        module's dicts: nn.Module.__getattr__ costs ~0.3-1 us per tensor on the hot path."""
        params, buffers = self._parameters, self._buffers
        scales = buffers["scales"] if "scales" in buffers else params["scales"]
        if scales.dtype not in _SCALE_DTYPES:
            scales = scales.float()
        return params["lora_A"], params["lora_B"], buffers["prune_mask"], scales, buffers["rank_offsets"]

    def _scales_arg(self) -> torch.Tensor:
        return self._tensors()[3]

    def _routing(self, x: torch.Tensor, lang, lead) -> Routing:
        if lang is None:
            ctx = current_route()
            if ctx is None:
                raise ValueError(
                    f"{type(self).__name__} called without language ids: pass lang=... or call it inside "
                    "`with lslo.route(src=..., tgt=...)`"
                )
            return ctx.routing_for(self.index, lead, self.num_languages, x.device, self.validate)
        if isinstance(lang, Routing):  # built by the caller (route_tokens), e.g. shared by its layers
            tokens = math.prod(lead)
            if lang.num_tokens != tokens or lang.num_languages != self.num_languages:
                raise ValueError(f"routing covers {lang.num_tokens} tokens of {lang.num_languages} languages; this "
                                 f"input has {tokens} tokens and the layer {self.num_languages} languages")
            return lang
        return route_tokens(lang, lead, self.num_languages, validate=self.validate, device=x.device, name="lang")

    def _linear_forward(self, base: nn.Module, x: torch.Tensor, routing: Routing, lora_a: torch.Tensor,
                        lora_b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
        """Training: ``base(x)`` plus this set's LoRA term as one op with its autograd (``Backend.linear``:
        the LoRA pass first, then the base GEMM accumulating into its output; in the backward the
        GEMM accumulates into the LoRA part of grad_x, so autograd adds no two gradients of x).
        Returns (T, out) rows, or None where it does not apply: a backend without the op, grad mode
        off, a base that is not a plain hook-free ``nn.Linear``, reduced LoRA widths, or
        torch.compile (the custom op traces). Resolve the backend (``_backend_for``) first.

        Measured on the 2-core EPYC, fp32, lang30, T=2048, 2 threads, fwd+bwd of the layer over the base
        Linear's, medians of 20-30 interleaved rounds, two runs, LoRA node after the base -> this op:
        1024->1024 1.17-1.18x -> 1.10-1.12x, 1024->4096 1.04-1.05x -> 0.94-0.98x, 4096->1024
        1.11-1.13x -> 1.02-1.03x."""
        if (self._backend_linear is None or not torch.is_grad_enabled() or not _plain_linear(base)
                or torch.compiler.is_compiling()):
            return None
        params, buffers = base._parameters, self._buffers
        weight = params["weight"]
        if weight.shape != (self.lora_out_features, self.lora_in_features):  # reduced LoRA widths
            return None
        x_rows = x.reshape(-1, weight.shape[1]).contiguous()
        return self._backend_linear(x_rows, weight, params["bias"], lora_a, lora_b, buffers["prune_mask"], scales,
                                    buffers["rank_offsets"], routing.sorted_token_idx, routing.lang_offsets,
                                    self.max_rank)

    def _lora_into(self, x_rows: torch.Tensor, out_rows: torch.Tensor, routing: Routing, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scales: torch.Tensor, backend: str, in_place: bool) -> torch.Tensor:
        """out_rows (T, out) plus this set's LoRA term of x_rows (T, in); in place when ``in_place``.

        With reduced LoRA widths only ``out[:, :lora_out]`` gets the term of ``x[:, :lora_in]``.
        """
        lora_out, lora_in = self.lora_out_features, self.lora_in_features
        buffers = self._buffers
        mask, rank_offsets = buffers["prune_mask"], buffers["rank_offsets"]
        x_used = x_rows[:, :lora_in] if lora_in < x_rows.shape[1] else x_rows
        if in_place:
            target = out_rows[:, :lora_out] if lora_out < out_rows.shape[1] else out_rows
            add_ = self._backend_add
            if add_ is not None:  # straight to the backend's kernel
                add_(target, _unit_rows(x_used), lora_a, lora_b, mask, scales, rank_offsets, routing.sorted_token_idx,
                     routing.lang_offsets, self.max_rank)
            else:
                lora_add_call(target, _unit_rows(x_used), lora_a, lora_b, mask, scales, rank_offsets,
                              routing.sorted_token_idx, routing.lang_offsets, self.max_rank, backend)
            return out_rows
        adapted = out_rows[:, :lora_out] if lora_out < out_rows.shape[1] else out_rows
        y = lora_call(x_used.contiguous(), adapted.contiguous(), lora_a, lora_b, mask, scales,
                      rank_offsets, routing.sorted_token_idx, routing.lang_offsets, self.max_rank, backend)
        if lora_out < out_rows.shape[1]:
            y = torch.cat([y, out_rows[:, lora_out:]], dim=1)
        return y

class LSLoLinear(_LanguageFactors, nn.Module):
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
        freeze_base: freeze the base layer's parameters.
        validate: range-check language ids (one host read per batch); turn off for CUDA graphs.
        lora_in_features: adapt only the first ``lora_in_features`` input features (default: all).
        lora_out_features: adapt only the first ``lora_out_features`` output features (default: all).
            With either set, A is (sum r_l, lora_in_features), B is (lora_out_features, sum r_l):
            the authors' code adapts fc1's first d_model outputs and fc2's first d_model inputs.
        learn_scales: hold ``scales`` as a trainable ``nn.Parameter`` (the op returns its gradient,
            ``d s_l = sum over tokens t of language l of <dy_t, (B_l * M_l) h_t>``); default: a buffer.

    Shapes:
        x: (..., in_features); lang: (x.shape[0],) per sequence, x.shape[:-1] per token, or
        (n,) with x.shape[0] a multiple of n (beam search); -1 = no adapter for that row; or a
        :class:`lslo_kernels.Routing` built for these tokens.
        output: (..., out_features); with reduced LoRA widths,
        ``output[..., :lora_out] = base(x)[..., :lora_out] + LoRA(x[..., :lora_in])`` and the
        other output features are ``base(x)``'s.

    Pruning: ``prune_mask`` (alias :attr:`keep_mask`) is True for entries of B that are KEPT.
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
        learn_scales: bool = False,
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
        self.merged_language: int | None = None
        self._init_factors(
            ranks,
            lora_in_features=_check_width(lora_in_features, base.in_features, "lora_in_features"),
            lora_out_features=_check_width(lora_out_features, base.out_features, "lora_out_features"),
            index=index, init=init, backend=backend, validate=validate, scales=scales, learn_scales=learn_scales,
            device=base.weight.device, dtype=base.weight.dtype,
        )

    def delta_weight(self, lang_id: int) -> torch.Tensor:
        """s_l (B_l * M_l) A_l: (out_features, in_features), the update this language adds to W.

        With reduced LoRA widths the update fills the top-left (lora_out, lora_in) block; the rest is 0.
        """
        a, b, m = self.language_factors(lang_id)
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        delta = self.scales[lang_id].detach().to(acc) * ((b * m).to(acc) @ a.to(acc))
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
        if isinstance(lang, Routing):
            ids = lang.lang
        elif lang is not None:
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

    # ---------------------------------------------------------------- forward
    _decode_plan: tuple | None = None  # also for layers pickled before there was a plan
    # The lslo.shared_inputs.SharedInputGroup this layer belongs to (a plain object, not a submodule).
    _shared_group = None

    def forward(self, x: torch.Tensor, lang: torch.Tensor | Routing | None = None) -> torch.Tensor:
        """Args: x: (..., in_features); lang: see the class docstring. Returns (..., out_features)."""
        if not _is_compiling():
            plan = self._decode_plan
            if plan is not None and not _grad_enabled() and not _any_autocast():
                y = self._planned_decode(plan, x, lang)
                if y is not None:
                    return y
        if not torch.is_grad_enabled() and self.merged_language is None:
            y = self._decode_forward(x, lang)
            if y is not None:
                return y
        # Hot path of every decoding step: each line here was timed (see _tensors, _base_forward).
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has last dimension {tuple(x.shape[-1:])}, expected in_features={self.in_features}")
        if self.merged_language is not None:
            self._check_merged_ids(x, lang)
            return self.base_layer(x)
        lora_a, lora_b, _mask, scales, _offsets = self._tensors()
        device = x.device
        autocast = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        if autocast:
            # Mixed precision (torch.autocast / accelerate): the LoRA term runs in the autocast dtype like
            # the base Linear (factors: _autocast_factors). The op itself then runs with autocast off:
            # its kernels choose their own accumulation precision.
            x = x.to(torch.get_autocast_dtype(device.type))
            lora_a, lora_b = self._autocast_factors(x, lora_a, lora_b)
        elif x.dtype != lora_a.dtype:
            raise TypeError(f"x dtype {x.dtype} != adapter dtype {lora_a.dtype}; cast the module or the input")
        if device != lora_a.device:
            raise ValueError(f"x is on {device} but the adapter is on {lora_a.device}")
        lead = x.shape[:-1]
        routing = self._routing(x, lang, lead)
        backend = self._backend_for(x)
        group = self._shared_group
        if group is not None and not autocast:  # q/k/v of one input in one op call (lslo.shared_inputs)
            y = group.output(self, x, routing, backend)
            if y is not None:
                return y.view(*lead, self.out_features)
        y = None if autocast else self._linear_forward(self._modules["base_layer"], x, routing, lora_a, lora_b,
                                                        scales)
        if y is not None:
            return y.view(*lead, self.out_features)
        base_out = _base_forward(self.base_layer, x)
        if base_out.dtype != x.dtype:  # autocast may leave the base in another dtype than asked
            base_out = base_out.to(x.dtype)
        x_rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if not autocast and _inference(base_out, lora_a, lora_b, scales):
            # The base output is ours: the LoRA term goes into it (no copy of y, no h kept).
            out_rows = base_out if base_out.dim() == 2 else base_out.reshape(-1, self.out_features)
            self._lora_into(x_rows, out_rows, routing, lora_a, lora_b, scales, backend, in_place=True)
            return base_out if out_rows._base is base_out or out_rows is base_out else out_rows.view(base_out.shape)
        out_rows = base_out.reshape(-1, self.out_features)
        no_autocast = torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext()
        with no_autocast:
            if _inference(out_rows, lora_a, lora_b, scales):
                y = self._lora_into(x_rows, out_rows, routing, lora_a, lora_b, scales, backend, in_place=True)
            else:
                y = self._lora_into(x_rows, out_rows, routing, lora_a, lora_b, scales, backend, in_place=False)
        return y.view(*lead, self.out_features)

    def _decode_forward(self, x, lang) -> torch.Tensor | None:
        """The ``no_grad`` / ``inference_mode`` path of decoding, or None where it does not apply.

        Only the common case: a plain hook-free ``nn.Linear`` base, full LoRA widths, x already in
        the adapter's dtype and device, no autocast, eager mode, a backend with an in-place kernel.
        Everything else (and every error message) is the general path's. Measured on the 2-core
        EPYC, 32->32 at T=1, 1 thread, no_grad: a layer call takes 12-14 us on this path and 16.4 us
        on the general one; F.linear plus the kernel alone take 6.9 us. On a tiny model that Python
        is most of the LoRA overhead of a decoding step.
        """
        if type(x) is not torch.Tensor or x.dim() == 0 or x.shape[-1] != self.in_features:
            return None
        if self.lora_in_features != self.in_features or self.lora_out_features != self.out_features:
            return None
        lora_a, lora_b, mask, scales, rank_offsets = self._tensors()
        device = x.device
        if (x.dtype is not lora_a.dtype or device != lora_a.device or torch.compiler.is_compiling()
                or (device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type))):
            return None
        base = self._modules["base_layer"]
        if not _plain_linear(base):
            return None
        self._backend_for(x)
        add_ = self._backend_add
        if add_ is None:
            return None
        lead = x.shape[:-1]
        routing = self._routing(x, lang, lead)
        x_rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        rows = _unit_rows(x_rows)
        buffers = self._buffers
        raw_scales = buffers["scales"] if "scales" in buffers else self._parameters["scales"]
        decode, stage = self._backend_decode, self._backend_staged  # stage is None without decode
        if decode is not None:
            # One call (Backend.linear_decode): the LoRA term first, written with the bias into the fresh
            # output, then the base GEMM accumulates into it (beta = 1): the output is read and written
            # inside the GEMM, not once more after the GEMM has evicted it from the caches. 1024->1024,
            # fp32, 2 threads, staged factors, over the base Linear (medians of 400-3000 interleaved
            # rounds, same run): F.linear then the LoRA term in place was 1.091x at T=160 and 1.129x
            # at T=5 (another run); the LoRA term first as three torch calls (bias rows, add, GEMM)
            # 1.059x / 1.054x; this one call 1.033x / 1.024x.
            params = base._parameters
            staged = self._staged_factors(stage, lora_b, mask, raw_scales, rank_offsets) if stage is not None else None
            out = decode(rows, params["weight"], params["bias"], lora_a, lora_b, mask, scales,
                         rank_offsets, routing.sorted_token_idx, routing.lang_offsets, self.max_rank, staged)
        else:
            out = _base_forward(base, x_rows)
            add_(out, rows, lora_a, lora_b, mask, scales, rank_offsets, routing.sorted_token_idx,
                 routing.lang_offsets, self.max_rank)
        # The next no-grad calls go straight to the kernels (_planned_decode), where their arguments are
        # the ones they take as they are: x's rows unit-strided, the scales float32/float64, and a
        # backend whose kernels check the rest themselves.
        if rows is x_rows and self._backend_checks and scales is raw_scales:
            self._decode_plan = (self.backend, device, decode, stage, add_)
        return out if x.dim() == 2 else out.view(*lead, self.out_features)

    def _planned_decode(self, plan: tuple, x, lang) -> torch.Tensor | None:
        """The no-grad call once :meth:`_decode_forward` has run: the same kernels with the same
        arguments (``linear_decode``, or ``F.linear`` then the backend's ``add_``), minus the checks the
        kernels make themselves. Returns None where it does not apply (the caller then takes the
        general path, which checks everything and words the errors).

        Why: on the project's 2-core EPYC VM each torch-level Python call right after a large GEMM
        costs 5-20 us (cold caches), and the general path makes ~30 of them. 1024->1024, fp32,
        2 threads, lang30, no grad, layer time over the base ``F.linear`` (same run, 800-2000
        alternating calls): T=160 1.14-1.15x through _decode_forward, 1.08-1.12x with this plan,
        the op alone 1.07-1.08x; T=5 1.20-1.25x, 1.09-1.14x, 1.05-1.06x.

        What the kernels check (an error here drops the plan and the general path reports): x's
        dtype, device, width and row layout against the weight and the factors; the routing's token
        count and number of languages. Only backends whose kernels check all that get a plan
        (``Backend.checks_arguments``; the reference backend's loop does not). What is checked here: the
        layer's backend, merge state and hooks (any change drops the plan) and the routing source (a
        Routing, or the ``lslo.route`` context; language-id tensors take the general path).
        """
        backend, device, decode, stage, add_ = plan
        base = self._modules["base_layer"]
        if (type(x) is not torch.Tensor or self.backend is not backend or self.merged_language is not None
                or type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or _global_hooks()):
            self._decode_plan = None
            return None
        if type(lang) is Routing:
            routing = lang
        elif lang is None:
            ctx = current_route()
            if ctx is None:
                return None
            routing = ctx.routing_for(self.index, x.shape[:-1], len(self.ranks), device, self.validate)
        else:
            return None
        params, buffers = self._parameters, self._buffers
        lora_b, mask, rank_offsets = params["lora_B"], buffers["prune_mask"], buffers["rank_offsets"]
        scales = buffers["scales"] if "scales" in buffers else params["scales"]
        weights = base._parameters
        two_d = x.dim() == 2
        # An x of another width reshapes into another number of rows than the routing's tokens (or
        # fails to): the op refuses either, so no row is read against the wrong routing.
        try:
            x_rows = x if two_d else x.reshape(-1, self.in_features)
            if decode is not None:
                staged = self._staged_factors(stage, lora_b, mask, scales, rank_offsets) if stage is not None else None
                out = decode(x_rows, weights["weight"], weights["bias"], params["lora_A"], lora_b, mask, scales,
                             rank_offsets, routing.sorted_token_idx, routing.lang_offsets, self.max_rank, staged)
            else:
                out = F.linear(x_rows, weights["weight"], weights["bias"])
                add_(out, x_rows, params["lora_A"], lora_b, mask, scales, rank_offsets, routing.sorted_token_idx,
                     routing.lang_offsets, self.max_rank)
        except (RuntimeError, ValueError, TypeError):
            self._decode_plan = None
            return None
        return out if two_d else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        ranks = _summarise_ranks(self.ranks)
        # A meta tensor has no values: printing a model built on the meta device must not read them.
        density = "n/a" if self.prune_mask.is_meta else f"{self.mask_density():.3f}"
        widths = ""
        if (self.lora_in_features, self.lora_out_features) != (self.in_features, self.out_features):
            widths = f"lora_in_features={self.lora_in_features}, lora_out_features={self.lora_out_features}, "
        learn = ", learn_scales=True" if self.learn_scales else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {widths}"
            f"languages={self.num_languages}, ranks={ranks}, index={self.index!r}, "
            f"mask_density={density}, backend={self.backend!r}{learn}"
        )


# ------------------------------------------------------------------------------ Weight Learning
class LSLoFactors(_LanguageFactors, nn.Module):
    """One routing's factor set of an :class:`LSLoDualLinear` (no base layer of its own).

    Args:
        in_features, out_features: the widths the LoRA term reads and writes (the base's, or the
            reduced LoRA widths).
        ranks, index, scale, init, backend, validate, learn_scales: as :class:`LSLoLinear`.
        device, dtype: of the factors.
    """

    def __init__(self, in_features: int, out_features: int, ranks: Sequence[int], *, index: str,
                 scale: float | Sequence[float] = 1.0, init: str = "lora", backend: str = "auto",
                 validate: bool = True, learn_scales: bool = False, device=None, dtype=None):
        super().__init__()
        ranks = _check_ranks(ranks)
        self._init_factors(ranks, lora_in_features=in_features, lora_out_features=out_features, index=index,
                           init=init, backend=backend, validate=validate,
                           scales=_check_scales(scale, len(ranks)), learn_scales=learn_scales,
                           device=device, dtype=dtype)

    def extra_repr(self) -> str:
        density = "n/a" if self.prune_mask.is_meta else f"{self.mask_density():.3f}"
        return (f"in_features={self.lora_in_features}, out_features={self.lora_out_features}, "
                f"languages={self.num_languages}, ranks={_summarise_ranks(self.ranks)}, index={self.index!r}, "
                f"mask_density={density}")


class LSLoMix(nn.Module):
    """Weight Learning's mixing weights ``(w_src, w_tgt) = softmax(logits)`` (paper Section 4.1, Eq. 5).

    One instance is shared by every :class:`LSLoDualLinear` of one encoder (or decoder) layer; it is
    registered on that layer (see :func:`lslo.model.apply_weight_learning`), the dual layers only
    refer to it.

    Args:
        logits: initial (src, tgt) logits; (0, 0) gives weights (0.5, 0.5).

    Attributes:
        logits: (2,) float32 Parameter.
    """

    def __init__(self, logits: Sequence[float] = (0.0, 0.0)):
        super().__init__()
        values = [float(v) for v in logits]
        if len(values) != 2 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"logits must be two finite numbers (src, tgt), got {logits!r}")
        self.logits = nn.Parameter(torch.tensor(values, dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        """Returns: (2,) float32, (w_src, w_tgt), summing to 1."""
        return torch.softmax(self.logits, dim=0)


class LSLoDualLinear(nn.Module):
    """Both routings in one layer: ``y = W x + w_src * LSLo_src(x) + w_tgt * LSLo_tgt(x)``.

    Weight Learning (paper Section 4.1, Eq. 5): a source-indexed and a target-indexed factor set
    around one frozen ``nn.Linear``, mixed with weights ``(w_src, w_tgt)``. The weights scale the
    per-language scales (``s_l * w``), so their gradient comes from the op's scale gradient.

    Computed as two chained grouped calls (src then tgt) on the base output: in inference both add
    into the base output in place; in training the second call takes the first one's y as its base.
    Kept over one pass: ``benchmarks/dual.py`` bounds a one-pass kernel by one call over per-(src,
    tgt)-pair factors (x and y read once). 2 idle Xeon cores, lang30, 1024->1024, ms: T=5 fwd dual
    0.576 vs one-pass bound 0.424; T=160 fwd 3.485 vs 5.207; T=2048 fwd+bwd 75.4 vs 191.6 (and
    1024->4096 241 vs 584): one pass would only pay at the smallest decoding batches. Against one
    routing (LSLoLinear) the dual layer costs 1.40x (T=5 fwd), 1.17x (T=160 fwd), 1.06x / 1.17x
    (T=2048 fwd+bwd, 1024->1024 / 1024->4096).

    Args:
        base: the ``nn.Linear`` to adapt (wrapped, frozen unless ``freeze_base=False``).
        ranks: rank of each language (both sets).
        mix: where ``(w_src, w_tgt)`` come from: an :class:`LSLoMix` shared with the other modules of
            the encoder/decoder layer (referenced, not registered here: register it on that layer);
            a fixed (2,) tensor; or None to own an :class:`LSLoMix` (logits 0: weights 0.5/0.5).
        scale, init, backend, freeze_base, validate, lora_in_features, lora_out_features, learn_scales:
            as :class:`LSLoLinear`, for both sets.

    Attributes:
        src, tgt: the two :class:`LSLoFactors` (``index`` "src" and "tgt").

    Shapes:
        x: (..., in_features); ``src``/``tgt`` ids as :class:`LSLoLinear`'s ``lang`` (or from
        :func:`lslo.route`); output (..., out_features).
    """

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        *,
        mix: LSLoMix | torch.Tensor | None = None,
        scale: float | Sequence[float] = 1.0,
        init: str = "lora",
        backend: str = "auto",
        freeze_base: bool = True,
        validate: bool = True,
        lora_in_features: int | None = None,
        lora_out_features: int | None = None,
        learn_scales: bool = False,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.base_layer = base
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        widths = (_check_width(lora_in_features, base.in_features, "lora_in_features"),
                  _check_width(lora_out_features, base.out_features, "lora_out_features"))
        common = {"scale": scale, "init": init, "backend": backend, "validate": validate,
                  "learn_scales": learn_scales, "device": base.weight.device, "dtype": base.weight.dtype}
        self.src = LSLoFactors(*widths, ranks, index="src", **common)
        self.tgt = LSLoFactors(*widths, ranks, index="tgt", **common)
        self.set_mix(mix)

    def set_mix(self, mix: LSLoMix | torch.Tensor | None) -> None:
        """Where the mixing weights come from (see the class docstring)."""
        for name in ("own_mix", "mix_weights"):
            if name in self._modules:
                del self._modules[name]
            if name in self._buffers:
                del self._buffers[name]
        object.__setattr__(self, "_shared_mix", None)
        if mix is None:
            self.own_mix = LSLoMix()
        elif isinstance(mix, LSLoMix):
            object.__setattr__(self, "_shared_mix", mix)  # not a submodule: its layer owns it
        elif isinstance(mix, torch.Tensor):
            if mix.shape != (2,) or not mix.dtype.is_floating_point:
                raise ValueError(f"mix weights must be a float tensor of shape (2,), got {mix.dtype} {tuple(mix.shape)}")
            self.register_buffer("mix_weights", mix.detach().to(torch.float32))
        else:
            raise TypeError(f"mix must be an LSLoMix, a (2,) tensor or None, got {type(mix).__name__}")

    def mix_weights_now(self) -> torch.Tensor:
        """(2,) float32 (w_src, w_tgt) for the next call (differentiable in the logits)."""
        if self._shared_mix is not None:
            return self._shared_mix()
        if "own_mix" in self._modules:
            return self.own_mix()
        return self.mix_weights

    @property
    def num_languages(self) -> int:
        return self.src.num_languages

    def forward(self, x: torch.Tensor, src: torch.Tensor | Routing | None = None,
                tgt: torch.Tensor | Routing | None = None, mix: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x: (..., in_features); src, tgt: ids (or Routings) of each set, default from
        :func:`lslo.route`; mix: (2,) weights overriding the layer's for this call.

        Returns: (..., out_features).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x has last dimension {tuple(x.shape[-1:])}, expected in_features={self.in_features}")
        sets = (self.src, self.tgt)
        device = x.device
        if device != self.src.lora_A.device:
            raise ValueError(f"x is on {device} but the adapter is on {self.src.lora_A.device}")
        factors = [(s.lora_A, s.lora_B) for s in sets]
        autocast = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        if autocast:  # as LSLoLinear.forward: the LoRA terms in the autocast dtype, the op with autocast off
            x = x.to(torch.get_autocast_dtype(device.type))
            factors = [s._autocast_factors(x, a, b) for s, (a, b) in zip(sets, factors)]
        elif x.dtype != self.src.lora_A.dtype:
            raise TypeError(f"x dtype {x.dtype} != adapter dtype {self.src.lora_A.dtype}; cast the module or the input")
        weights = self.mix_weights_now() if mix is None else mix
        lead = x.shape[:-1]
        routings = [s._routing(x, ids, lead) for s, ids in zip(sets, (src, tgt))]
        backend = self.src._backend_for(x)
        x_rows = x.reshape(-1, self.in_features)
        # The mixing weight multiplies each set's scales: (L,) products, differentiable in both.
        scales = [s._scales_arg() * weights[i].to(s.scales.dtype if s.scales.dtype in _SCALE_DTYPES else torch.float32)
                  for i, s in enumerate(sets)]
        # Training: the base Linear and the source set's term in one op (_LanguageFactors._linear_forward),
        # then the target set's term.
        y = None if autocast else self.src._linear_forward(self._modules["base_layer"], x_rows, routings[0],
                                                            *factors[0], scales[0])
        if y is not None:
            y = self.tgt._lora_into(x_rows, y, routings[1], *factors[1], scales[1], backend, in_place=False)
            return y.view(*lead, self.out_features)
        base_out = self.base_layer(x)
        if base_out.dtype != x.dtype:  # autocast may leave the base in another dtype than asked
            base_out = base_out.to(x.dtype)
        out_rows = base_out.reshape(-1, self.out_features)
        params = [t for s in sets for t in (s.lora_A, s.lora_B)]
        in_place = not autocast and _inference(out_rows, *params, *scales)
        y = out_rows
        with torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext():
            for s, routing, sc, (a, b) in zip(sets, routings, scales, factors):
                y = s._lora_into(x_rows, y, routing, a, b, sc, backend, in_place=in_place)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        where = "shared" if self._shared_mix is not None else ("own" if "own_mix" in self._modules else "fixed")
        return f"in_features={self.in_features}, out_features={self.out_features}, mix={where}"


