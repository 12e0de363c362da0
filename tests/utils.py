"""Shared test helpers: random grouped-LoRA cases and the per-dtype tolerance table."""

from __future__ import annotations

import torch

import lslo_kernels

# (atol, rtol) of a backend against the fp32/fp64 reference, per input dtype. bf16/fp16 bounds
# follow flash-attention's rule of thumb: a few times PyTorch's own rounding error in that dtype
# (bf16 has 8 mantissa bits: ~4e-3 relative per rounding; outputs here go through 2 roundings).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def make_lang_ids(num_tokens: int, num_languages: int, spread: str, generator: torch.Generator) -> torch.Tensor:
    """(T,) int64 ids: 'uniform', 'single' (all one language), 'with_none' (some -1),
    'sparse' (only every third language present: empty groups)."""
    if spread == "uniform":
        return torch.randint(0, num_languages, (num_tokens,), generator=generator)
    if spread == "single":
        return torch.full((num_tokens,), num_languages - 1, dtype=torch.int64)
    if spread == "with_none":
        return torch.randint(-1, num_languages, (num_tokens,), generator=generator)
    if spread == "sparse":
        present = torch.arange(0, num_languages, 3)
        return present[torch.randint(0, len(present), (num_tokens,), generator=generator)]
    raise ValueError(spread)


def make_case(
    num_tokens: int,
    in_features: int,
    out_features: int,
    ranks: list[int],
    *,
    density: float = 1.0,
    spread: str = "uniform",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A random grouped-LoRA problem with non-zero B (so every gradient is exercised)."""
    g = torch.Generator().manual_seed(seed)
    num_languages = len(ranks)
    total = sum(ranks)
    x = torch.randn(num_tokens, in_features, generator=g).to(dtype)
    base_out = torch.randn(num_tokens, out_features, generator=g).to(dtype)
    lora_a = (torch.randn(total, in_features, generator=g) / in_features**0.5).to(dtype)
    lora_b = torch.randn(out_features, total, generator=g).to(dtype)
    prune_mask = torch.rand(out_features, total, generator=g) < density
    scales = torch.rand(num_languages, generator=g) + 0.5
    rank_offsets = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int64)
    lang = make_lang_ids(num_tokens, num_languages, spread, g)
    routing = lslo_kernels.build_routing(lang, num_languages)
    grad_out = torch.randn(num_tokens, out_features, generator=g).to(dtype)
    return dict(
        x=x, base_out=base_out, lora_a=lora_a, lora_b=lora_b, prune_mask=prune_mask, scales=scales,
        rank_offsets=rank_offsets, routing=routing, max_rank=max(ranks), grad_out=grad_out,
    )


LEAVES = ("x", "base_out", "lora_a", "lora_b", "scales")


def run_op(case: dict, backend: str):
    """Forward + backward through the public op; returns y and (dx, d_base_out, dA, dB, d_scales)."""
    leaves = {k: case[k].detach().clone().requires_grad_(True) for k in LEAVES}
    y = lslo_kernels.grouped_lora(
        leaves["x"], leaves["base_out"], leaves["lora_a"], leaves["lora_b"], case["prune_mask"],
        leaves["scales"], case["rank_offsets"], case["routing"], case["max_rank"], backend=backend,
    )
    y.backward(case["grad_out"])
    return y.detach(), tuple(leaves[k].grad for k in LEAVES)


def dense_truth(case: dict):
    """An independent formulation in fp64: per-token gathered, zero-padded factors and einsum;
    gradients from autograd. Shares no code with the reference backend."""
    lang = case["routing"].lang
    ranks = (case["rank_offsets"][1:] - case["rank_offsets"][:-1]).tolist()
    num_languages, max_rank = len(ranks), case["max_rank"]
    k, d = case["lora_a"].shape[1], case["lora_b"].shape[0]
    leaves = {n: case[n].detach().double().requires_grad_(True) for n in LEAVES}
    b_eff = leaves["lora_b"] * case["prune_mask"].double()
    a_pad = torch.zeros(num_languages + 1, max_rank, k, dtype=torch.float64)  # slot L = "no adapter"
    b_pad = torch.zeros(num_languages + 1, d, max_rank, dtype=torch.float64)
    a_rows, b_cols = [], []
    for lang_id, r in enumerate(ranks):
        r0 = int(case["rank_offsets"][lang_id])
        a_rows.append(torch.nn.functional.pad(leaves["lora_a"][r0 : r0 + r], (0, 0, 0, max_rank - r)))
        b_cols.append(torch.nn.functional.pad(b_eff[:, r0 : r0 + r], (0, max_rank - r)))
    a_pad = torch.cat([torch.stack(a_rows), a_pad[-1:]])
    b_pad = torch.cat([torch.stack(b_cols), b_pad[-1:]])
    scales = torch.cat([leaves["scales"], torch.zeros(1, dtype=torch.float64)])
    slot = torch.where(lang < 0, num_languages, lang)
    h = torch.einsum("tk,trk->tr", leaves["x"], a_pad[slot])
    y = leaves["base_out"] + scales[slot, None] * torch.einsum("tr,tdr->td", h, b_pad[slot])
    y.backward(case["grad_out"].double())
    return y.detach(), tuple(leaves[n].grad for n in LEAVES)


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    # Scale atol by the magnitude of the expected values: gradients of A sum over many tokens.
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")
