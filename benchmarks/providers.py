"""The implementations the benchmarks compare, one function each, on one shared problem.

Every provider computes the same thing, the output of a frozen ``nn.Linear`` plus each token's
language-specific LoRA term::

    y_t = W x_t + b + s_l (B_l * M_l) A_l x_t,   l = lang[t]  (-1: no adapter, y_t = W x_t + b)

They differ in how the factors are laid out and how the mixed batch is evaluated:

``base``             the frozen ``nn.Linear`` alone: the floor every ratio is taken against.
``naive``            Python loop over languages: boolean mask, gather, two matmuls, ``index_add``;
                     plain autograd.
``peft``             PEFT's mixed-adapter batch (``adapter_names=``): one LoRA adapter per language
                     on a one-``nn.Linear`` module. PEFT refuses it in training mode: forward only.
``padded_bmm``       every language padded to the largest rank; per-token factors gathered, then
                     two ``bmm``.
``grouped_mm``       ``torch._grouped_mm`` over tokens sorted by language, factors padded to the
                     largest rank (rounded up to 16 bytes, which the op requires).
``dense_blockmask``  one dense all-languages GEMM ``x @ A_all^T`` (T, R), times a token-language
                     block mask that also carries the scales, then ``@ (B_all * M)^T``.
``reference`` ...    lslo's own backends through the layer a model uses, :class:`lslo.LSLoLinear`
                     with ``backend=`` ``reference``, ``cpp`` or ``triton`` (whichever are
                     registered for the device): its fast paths included (in place into the base
                     output without autograd, the compiled autograd entry in training).
``dual``             (cases that ask for it) :class:`lslo.layer.LSLoDualLinear`: both routings,
                     source and target, in one layer, mixed by softmax(logits) (Weight Learning).

Each provider is split in two, like a real model would use it:

* ``setup`` (untimed): converts the packed factors to the provider's own parameter layout, once.
* ``prepare`` (timed separately, reported as ``prep_ms``): per-batch metadata that depends only on
  the language ids and that a model builds once per batch and shares across all its layers
  (lslo's routing, the padded providers' index tensors, the block mask, PEFT's ``adapter_names``).
* ``run`` (the timed call): one layer's forward from the input rows to the output.

A provider that cannot run a case raises :class:`Skip` with the reason, which the suite records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import lslo_kernels
from lslo_kernels import build_routing, grouped_lora, route_tokens

__all__ = [
    "BASELINES",
    "LayerProblem",
    "PreparedProvider",
    "Skip",
    "available_providers",
    "base_linear",
    "dense_blockmask",
    "grouped_mm",
    "lslo_backends",
    "make_problem",
    "naive_loop",
    "padded_bmm",
    "peft_mixed_batch",
    "prepare_provider",
]

BASELINES = ("base", "naive", "peft", "padded_bmm", "grouped_mm", "dense_blockmask")

# padded_bmm materialises one (rank, in) and one (out, rank) factor per token; past this many
# bytes of gathered factors a case is skipped rather than swapping the machine (23 GiB box).
PADDED_BMM_MAX_BYTES = 3 * 2**30


class Skip(Exception):
    """A provider cannot run this case (missing op, unsupported mode/device/dtype, too much memory)."""


# ---------------------------------------------------------------------------------------- problem
@dataclass
class LayerProblem:
    """One linear layer with per-language LoRA factors and a mixed batch, in lslo's packed layout.

    Attributes:
        base: the frozen ``nn.Linear(in_features, out_features)``.
        ranks: r_l per language; L = len(ranks).
        lora_a: (R, k) A factors stacked, R = sum(ranks).
        lora_b: (d, R) B factors; language l owns columns ``rank_offsets[l]:rank_offsets[l+1]``.
        prune_mask: (d, R) bool, False = pruned entry of B.
        scales: (L,) float32.
        rank_offsets: (L + 1,) int64 cumulative ranks.
        lang: (T,) int64 language id per token, -1 = no adapter.
        x: (T, k) input rows.
    """

    base: nn.Linear
    ranks: list[int]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    prune_mask: torch.Tensor
    scales: torch.Tensor
    rank_offsets: torch.Tensor
    lang: torch.Tensor
    x: torch.Tensor

    @property
    def num_languages(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


def make_problem(
    in_features: int,
    out_features: int,
    ranks: Sequence[int],
    lang: torch.Tensor,
    *,
    mask_density: float | Sequence[float] = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LayerProblem:
    """Random weights for one layer; B is random (not LoRA's zero init) so every term is tested.

    Args:
        ranks: r_l per language.
        lang: (T,) int64 language ids in [-1, L).
        mask_density: fraction of B entries kept, for all languages or one value per language.
        seed: seeds a private generator, so every provider sees identical inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    ranks = [int(r) for r in ranks]
    total = sum(ranks)
    if isinstance(mask_density, (int, float)):
        densities = [float(mask_density)] * len(ranks)
    else:
        densities = [float(d) for d in mask_density]
    base = nn.Linear(in_features, out_features)
    with torch.no_grad():
        bound = 1 / math.sqrt(in_features)
        base.weight.copy_(torch.empty(out_features, in_features).uniform_(-bound, bound, generator=gen))
        base.bias.copy_(torch.empty(out_features).uniform_(-bound, bound, generator=gen))
    base.requires_grad_(False)
    base.to(device=device, dtype=dtype)
    # Scaled so that the LoRA term is of the order of the base output: a wrong term shows up.
    lora_a = torch.randn(total, in_features, generator=gen) / math.sqrt(in_features)
    lora_b = torch.randn(out_features, total, generator=gen) / math.sqrt(max(ranks))
    keep = torch.rand(out_features, total, generator=gen)
    prune_mask = torch.ones(out_features, total, dtype=torch.bool)
    offsets = [0]
    for lang_id, r in enumerate(ranks):
        r0 = offsets[-1]
        offsets.append(r0 + r)
        prune_mask[:, r0 : r0 + r] = keep[:, r0 : r0 + r] < densities[lang_id]
    lora_b = lora_b * prune_mask  # what lslo's set_prune_mask leaves in B
    scales = 0.5 + 1.5 * torch.rand(len(ranks), generator=gen)  # distinct per language: catches mix-ups
    x = torch.randn(lang.shape[0], in_features, generator=gen)
    return LayerProblem(
        base=base,
        ranks=ranks,
        lora_a=lora_a.to(device=device, dtype=dtype),
        lora_b=lora_b.to(device=device, dtype=dtype),
        prune_mask=prune_mask.to(device),
        scales=scales.to(device=device, dtype=torch.float32),
        rank_offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
        lang=lang.to(device=device, dtype=torch.int64),
        x=x.to(device=device, dtype=dtype),
    )


# ------------------------------------------------------------------------ the compute, one each
def base_linear(x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
    """The floor: ``base(x)``. x: (T, k) -> (T, d)."""
    return base(x)


def naive_loop(
    x: torch.Tensor,
    base: nn.Linear,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    prune_mask: torch.Tensor,
    scales: torch.Tensor,
    ranks: Sequence[int],
    lang: torch.Tensor,
) -> torch.Tensor:
    """Per-language Python loop with plain autograd: what one writes first.

    Args:
        x: (T, k); lora_a: (R, k); lora_b, prune_mask: (d, R); scales: (L,) float32;
        ranks: r_l per language (Python ints: no host sync for the slicing);
        lang: (T,) int64, -1 = no adapter.

    Returns:
        (T, d).
    """
    y = base(x)
    r0 = 0
    for lang_id, r in enumerate(ranks):
        r1 = r0 + r
        token_idx = (lang == lang_id).nonzero().squeeze(1)
        if token_idx.numel():
            h = x[token_idx] @ lora_a[r0:r1].t()  # (n, r)
            delta = (h @ (lora_b[:, r0:r1] * prune_mask[:, r0:r1]).t()) * scales[lang_id].to(x.dtype)
            y = y.index_add(0, token_idx, delta)
        r0 = r1
    return y


def peft_mixed_batch(x: torch.Tensor, peft_model: nn.Module, adapter_names: list[str]) -> torch.Tensor:
    """PEFT's mixed-adapter batch: ``peft_model(x, adapter_names=...)``, one name per row of x.

    Args:
        x: (T, k); peft_model: a PEFT-wrapped module around the base ``nn.Linear`` (eval mode);
        adapter_names: T adapter names, ``"__base__"`` for tokens without an adapter.

    Returns:
        (T, d).
    """
    return peft_model(x, adapter_names=adapter_names)


def padded_bmm(
    x: torch.Tensor,
    base: nn.Linear,
    a_pad: torch.Tensor,
    b_pad: torch.Tensor,
    m_pad: torch.Tensor,
    s_pad: torch.Tensor,
    lang_slot: torch.Tensor,
) -> torch.Tensor:
    """Factors padded to the largest rank; each token gathers its own and runs two ``bmm``.

    Args:
        x: (T, k); a_pad: (L + 1, rp, k); b_pad, m_pad: (L + 1, d, rp), m_pad is 0 on pruned
        entries, on rank padding and on the extra slot L (tokens without adapter);
        s_pad: (L + 1,) scales; lang_slot: (T,) int64 in [0, L], L = no adapter.

    Returns:
        (T, d).
    """
    y = base(x)
    b_eff = b_pad * m_pad * s_pad.to(x.dtype).view(-1, 1, 1)  # (L + 1, d, rp)
    h = torch.bmm(a_pad[lang_slot], x.unsqueeze(2))  # (T, rp, 1)
    delta = torch.bmm(b_eff[lang_slot], h).squeeze(2)  # (T, d)
    return y + delta


def grouped_mm(
    x: torch.Tensor,
    base: nn.Linear,
    a_pad: torch.Tensor,
    b_pad: torch.Tensor,
    m_pad: torch.Tensor,
    s_pad: torch.Tensor,
    token_order: torch.Tensor,
    group_ends: torch.Tensor,
) -> torch.Tensor:
    """``torch._grouped_mm`` over the tokens sorted by language, factors padded to a common rank.

    Args:
        x: (T, k); a_pad: (L, rp, k); b_pad, m_pad: (L, d, rp); s_pad: (L,) scales;
        token_order: (T',) int64, indices of the tokens that have an adapter, grouped by language;
        group_ends: (L,) int32, end offset of each language's group in ``token_order``.

    Returns:
        (T, d).
    """
    y = base(x)
    b_eff = b_pad * m_pad * s_pad.to(x.dtype).view(-1, 1, 1)  # (L, d, rp)
    x_sorted = x[token_order]  # (T', k)
    h = torch._grouped_mm(x_sorted, a_pad.transpose(1, 2), offs=group_ends)  # (T', rp)
    delta = torch._grouped_mm(h, b_eff.transpose(1, 2), offs=group_ends)  # (T', d)
    return y.index_add(0, token_order, delta)


def dense_blockmask(
    x: torch.Tensor,
    base: nn.Linear,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    prune_mask: torch.Tensor,
    block_mask: torch.Tensor,
) -> torch.Tensor:
    """All languages in one dense GEMM, the wrong languages zeroed by a block mask.

    Args:
        x: (T, k); lora_a: (R, k); lora_b, prune_mask: (d, R);
        block_mask: (T, R) dtype of x, ``s_l`` where rank column r belongs to the token's
            language l, 0 elsewhere (and on the whole row of a token without adapter).

    Returns:
        (T, d).
    """
    y = base(x)
    h = (x @ lora_a.t()) * block_mask  # (T, R)
    return y + h @ (lora_b * prune_mask).t()


def lslo_backends(device: torch.device | str) -> list[str]:
    """lslo's grouped-LoRA backends that run on ``device`` (Triton only on CUDA: its CPU
    interpreter is a correctness tool, not a performance path)."""
    device = torch.device(device)
    names = lslo_kernels.available_backends(device)
    return [n for n in names if not (n == "triton" and device.type != "cuda")]


def available_providers(device: torch.device | str) -> list[str]:
    """Every provider the suite can try on ``device``: the baselines, then lslo's backends."""
    return [*BASELINES, *lslo_backends(device)]


# ------------------------------------------------------------- set-up: layouts, metadata, calls
@dataclass
class PreparedProvider:
    """A provider bound to one problem.

    Attributes:
        name: provider name.
        params: the factors in this provider's layout (they get ``requires_grad`` in training).
        prepare: lang (T,) -> per-batch metadata (timed separately as ``prep_ms``).
        run: (x, metadata) -> y: the timed layer call.
        training: whether the provider can run with autograd (PEFT's mixed batch cannot).
        skip_training_reason: why not, when it cannot.
        packed_grads: after a backward, the gradients of ``params`` in lslo's packed layout,
            (R, k) and (d, R), so that tests compare them with the reference's.
        has_prep: whether ``prepare`` does any work (its time is then reported).
    """

    name: str
    params: list[torch.Tensor]
    prepare: Callable[[torch.Tensor], Any]
    run: Callable[[torch.Tensor, Any], torch.Tensor]
    training: bool = True
    skip_training_reason: str = ""
    packed_grads: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    has_prep: bool = True  # False: ``prepare`` passes the ids through (nothing to report)
    # (x, metadata) -> what ``run`` must return, when it is not lslo's single-routing op (``dual``)
    expected: Callable[[torch.Tensor, Any], torch.Tensor] | None = None

    def __post_init__(self):
        if self.packed_grads is None and len(self.params) == 2:
            # params already in lslo's packed layout: (R, k) and (d, R)
            self.packed_grads = lambda: (self.params[0].grad, self.params[1].grad)


def _padded_factors(problem: LayerProblem, padded_rank: int, extra_slot: bool):
    """(L[+1], rp, k) A, (L[+1], d, rp) B and float mask; the mask is 0 on rank padding."""
    num_slots = problem.num_languages + (1 if extra_slot else 0)
    k, d = problem.lora_a.shape[1], problem.lora_b.shape[0]
    a_pad = problem.lora_a.new_zeros(num_slots, padded_rank, k)
    b_pad = problem.lora_b.new_zeros(num_slots, d, padded_rank)
    m_pad = problem.lora_b.new_zeros(num_slots, d, padded_rank)
    s_pad = problem.scales.new_zeros(num_slots)
    offsets = problem.rank_offsets.tolist()
    for lang_id, r in enumerate(problem.ranks):
        r0 = offsets[lang_id]
        a_pad[lang_id, :r] = problem.lora_a[r0 : r0 + r]
        b_pad[lang_id, :, :r] = problem.lora_b[:, r0 : r0 + r]
        m_pad[lang_id, :, :r] = problem.prune_mask[:, r0 : r0 + r].to(m_pad.dtype)
        s_pad[lang_id] = problem.scales[lang_id]
    return a_pad, b_pad, m_pad, s_pad


_PEFT_TRAINING_REASON: list[str] = []


def _peft_training_reason() -> str:
    """PEFT's own words for refusing a mixed batch in training mode (asked once, on a toy);
    empty if this PEFT allows it."""
    if not _PEFT_TRAINING_REASON:
        try:
            model, names = _build_peft(nn.Linear(4, 4), [torch.randn(1, 4)], [torch.randn(4, 1)], [1.0])
            model.train()
            model(torch.randn(1, 4), adapter_names=names[:1])
            _PEFT_TRAINING_REASON.append("")  # a future PEFT that allows it gets timed in training
        except Exception as exc:  # noqa: BLE001 - whatever PEFT raises is the reason
            _PEFT_TRAINING_REASON.append(f"PEFT refuses mixed batches in training: {exc}")
    return _PEFT_TRAINING_REASON[0]


class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def _build_peft(base: nn.Linear, a_list, b_list_masked, scales):
    """A PEFT model with one LoRA adapter per language around ``base`` (wrapped, not copied)."""
    try:
        import peft
    except ImportError as exc:
        raise Skip(f"peft not installed ({exc})") from None
    names = [f"lang{i}" for i in range(len(a_list))]
    module = _OneLinear(base)
    model = None
    for i, (a, b) in enumerate(zip(a_list, b_list_masked)):
        r = a.shape[0]
        config = peft.LoraConfig(
            r=r, lora_alpha=float(scales[i]) * r, target_modules=["linear"], lora_dropout=0.0, bias="none"
        )
        if model is None:
            model = peft.get_peft_model(module, config, adapter_name=names[i])
        else:
            model.add_adapter(names[i], config)
    lora_layer = model.base_model.model.linear
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(a_list, b_list_masked)):
            lora_layer.lora_A[names[i]].weight.copy_(a)
            lora_layer.lora_B[names[i]].weight.copy_(b)
    model.eval()
    return model, names


def _unpad_grads(problem: LayerProblem, a_pad: torch.Tensor, b_pad: torch.Tensor):
    """Gradients of padded factors back in lslo's packed layout: (R, k) and (d, R)."""
    grad_a = torch.cat([a_pad.grad[i, :r] for i, r in enumerate(problem.ranks)])
    grad_b = torch.cat([b_pad.grad[i, :, :r] for i, r in enumerate(problem.ranks)], dim=1)
    return grad_a, grad_b


def prepare_provider(name: str, problem: LayerProblem) -> PreparedProvider:
    """Bind provider ``name`` to ``problem``: its parameter layout and its two callables.

    Raises:
        Skip: the provider cannot run here (the message says why).
        ValueError: unknown provider name.
    """
    p = problem
    base = p.base
    if name == "base":
        return PreparedProvider(name, [], prepare=lambda lang: None, run=lambda x, meta: base_linear(x, base),
                                has_prep=False)

    if name == "naive":
        a, b = p.lora_a.clone(), p.lora_b.clone()
        ranks = list(p.ranks)
        return PreparedProvider(
            name, [a, b], prepare=lambda lang: lang,
            run=lambda x, lang: naive_loop(x, base, a, b, p.prune_mask, p.scales, ranks, lang),
            has_prep=False,  # it finds each language's tokens inside every layer call
        )

    if name == "peft":
        offsets = p.rank_offsets.tolist()
        a_list = [p.lora_a[offsets[i] : offsets[i + 1]] for i in range(p.num_languages)]
        b_list = [(p.lora_b * p.prune_mask)[:, offsets[i] : offsets[i + 1]] for i in range(p.num_languages)]
        model, names = _build_peft(base, a_list, b_list, p.scales.tolist())
        model.to(p.device)
        slot_names = [*names, "__base__"]  # index -1 -> "__base__"

        def prepare(lang):
            return [slot_names[i] for i in lang.tolist()]

        return PreparedProvider(
            name, [], prepare=prepare, run=lambda x, adapter_names: peft_mixed_batch(x, model, adapter_names),
            training=not _peft_training_reason(), skip_training_reason=_peft_training_reason(),
        )

    if name == "padded_bmm":
        rp = p.max_rank
        gathered = p.x.shape[0] * rp * (p.lora_a.shape[1] + p.lora_b.shape[0]) * p.x.element_size()
        if gathered > PADDED_BMM_MAX_BYTES:
            raise Skip(
                f"would gather {gathered / 2**30:.1f} GiB of per-token factors "
                f"(T={p.x.shape[0]}, padded rank {rp}); limit {PADDED_BMM_MAX_BYTES / 2**30:.0f} GiB"
            )
        a_pad, b_pad, m_pad, s_pad = _padded_factors(p, rp, extra_slot=True)
        num_languages = p.num_languages

        def prepare(lang):
            return torch.where(lang < 0, torch.full_like(lang, num_languages), lang)

        return PreparedProvider(
            name, [a_pad, b_pad], prepare=prepare,
            run=lambda x, lang_slot: padded_bmm(x, base, a_pad, b_pad, m_pad, s_pad, lang_slot),
            packed_grads=lambda: _unpad_grads(p, a_pad, b_pad),
        )

    if name == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise Skip(f"torch {torch.__version__} has no torch._grouped_mm")
        # _grouped_mm wants every stride a multiple of 16 bytes: pad the rank to that.
        align = max(1, 16 // p.x.element_size())
        rp = -(-p.max_rank // align) * align
        a_pad, b_pad, m_pad, s_pad = _padded_factors(p, rp, extra_slot=False)
        num_languages = p.num_languages

        def prepare(lang):
            routing = build_routing(lang, num_languages)
            first = int(routing.lang_offsets[0])  # tokens with id -1 sort first: leave them out
            token_order = routing.sorted_token_idx[first:]
            group_ends = (routing.lang_offsets[1:] - first).to(torch.int32)
            return token_order, group_ends

        def run(x, meta):
            return grouped_mm(x, base, a_pad, b_pad, m_pad, s_pad, *meta)

        return PreparedProvider(
            name, [a_pad, b_pad], prepare=prepare, run=run, packed_grads=lambda: _unpad_grads(p, a_pad, b_pad)
        )

    if name == "dense_blockmask":
        a, b = p.lora_a.clone(), p.lora_b.clone()
        rank_lang = torch.repeat_interleave(
            torch.arange(p.num_languages, device=p.device), torch.tensor(p.ranks, device=p.device)
        )
        rank_scale = p.scales[rank_lang].to(p.dtype)

        def prepare(lang):
            return (lang.unsqueeze(1) == rank_lang.unsqueeze(0)).to(p.dtype) * rank_scale

        return PreparedProvider(
            name, [a, b], prepare=prepare,
            run=lambda x, block: dense_blockmask(x, base, a, b, p.prune_mask, block),
        )

    if name == "dual":
        return _prepare_dual(p)

    if name in lslo_kernels.available_backends():
        if name not in lslo_backends(p.device):
            raise Skip(f"lslo backend {name!r} does not run on {p.device}")
        layer = _lslo_layer(p, name)
        num_languages, tokens = p.num_languages, p.x.shape[0]
        return PreparedProvider(
            name, [layer.lora_A, layer.lora_B],
            prepare=lambda lang: route_tokens(lang, (tokens,), num_languages),  # once per batch, with the id check
            run=lambda x, routing: layer(x, lang=routing),
        )

    if name in ("cpp", "triton"):
        try:
            lslo_kernels.get_backend(name)
        except ValueError as exc:
            raise Skip(str(exc)) from None
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(available_providers(p.device))}")


def _lslo_layer(p: LayerProblem, backend: str):
    """An ``lslo.LSLoLinear`` around the problem's base holding a copy of its factors, mask and scales."""
    import lslo

    layer = lslo.LSLoLinear(p.base, p.ranks, backend=backend)
    with torch.no_grad():
        layer.lora_A.copy_(p.lora_a)
        layer.lora_B.copy_(p.lora_b)
        layer.set_prune_mask(keep=p.prune_mask)
        layer.scales.copy_(p.scales)
    return layer


def _prepare_dual(p: LayerProblem) -> PreparedProvider:
    """Weight Learning's layer: both routings around the base, trainable mixing logits (softmax).

    The source-indexed set holds the problem's factors, the target-indexed set another copy; the
    target language of each token is a fixed permutation of its source language, so both routings
    differ. Checked against base + w_src * LoRA_src + w_tgt * LoRA_tgt from lslo's reference op.
    """
    from lslo.layer import LSLoDualLinear, LSLoMix

    if "cpp" not in lslo_kernels.available_backends(p.device) and p.device.type == "cpu":
        raise Skip("the dual layer is measured on the cpp backend, which is not built")
    mix = LSLoMix((0.3, -0.2))
    layer = LSLoDualLinear(p.base, p.ranks, mix=mix)
    with torch.no_grad():
        for factors in (layer.src, layer.tgt):
            factors.lora_A.copy_(p.lora_a)
            factors.lora_B.copy_(p.lora_b)
            factors.set_prune_mask(keep=p.prune_mask)
            factors.scales.copy_(p.scales)
    num_languages, tokens = p.num_languages, p.x.shape[0]
    shift = torch.roll(torch.arange(num_languages, device=p.device), 1)

    def prepare(lang):
        tgt = torch.where(lang < 0, lang, shift[lang.clamp(min=0)])
        return (route_tokens(lang, (tokens,), num_languages), route_tokens(tgt, (tokens,), num_languages))

    def expected(x, routings):
        w = mix().detach()
        y = p.base(x)
        for weight, routing in zip(w, routings):
            y = y + weight * grouped_lora(x, torch.zeros_like(y), p.lora_a, p.lora_b, p.prune_mask, p.scales,
                                          p.rank_offsets, routing, p.max_rank, backend="reference")
        return y

    return PreparedProvider(
        "dual", [layer.src.lora_A, layer.src.lora_B, layer.tgt.lora_A, layer.tgt.lora_B, mix.logits],
        prepare=prepare, run=lambda x, routings: layer(x, *routings), expected=expected,
        packed_grads=lambda: (layer.src.lora_A.grad, layer.src.lora_B.grad),
    )
