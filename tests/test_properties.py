"""Property tests: random shapes, rank mixes and id distributions, every CPU backend vs the
independent dense formulation."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lslo_kernels
from tests.utils import assert_close, dense_truth, run_op

BACKENDS = [b for b in lslo_kernels.available_backends("cpu") if b != "triton"]


@st.composite
def cases(draw):
    num_languages = draw(st.integers(1, 9))
    # ranks past the C++ kernels' rank blocks (2, 4, 8 rows) with remainders, up to 70; up to 140 tokens,
    # so that a language can fill a 64-token chunk and leave a remainder of any 4-token block
    ranks = draw(st.lists(st.one_of(st.integers(1, 17), st.integers(18, 70)), min_size=num_languages,
                          max_size=num_languages))
    num_tokens = draw(st.one_of(st.integers(0, 40), st.integers(41, 140)))
    in_features = draw(st.integers(1, 40))
    out_features = draw(st.integers(1, 40))
    # ids drawn from a random subset of languages (empty groups) plus maybe -1
    present = draw(st.lists(st.integers(-1, num_languages - 1), min_size=1, max_size=num_languages + 1))
    lang = draw(st.lists(st.sampled_from(present), min_size=num_tokens, max_size=num_tokens))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    lang_t = torch.tensor(lang, dtype=torch.int64).reshape(num_tokens)
    return dict(
        x=torch.randn(num_tokens, in_features, generator=g),
        base_out=torch.randn(num_tokens, out_features, generator=g),
        lora_a=torch.randn(total, in_features, generator=g) / in_features**0.5,
        lora_b=torch.randn(out_features, total, generator=g),
        prune_mask=torch.rand(out_features, total, generator=g) < density,
        scales=torch.rand(num_languages, generator=g) + 0.1,
        rank_offsets=torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int64),
        routing=lslo_kernels.build_routing(lang_t, num_languages),
        max_rank=max(ranks),
        grad_out=torch.randn(num_tokens, out_features, generator=g),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), backend=st.sampled_from(BACKENDS))
def test_backends_match_dense_truth(case, backend):
    y, grads = run_op(case, backend)
    y_t, grads_t = dense_truth(case)
    assert_close(y, y_t, torch.float32, f"{backend} y")
    for name, g, g_t in zip(("dx", "dbase", "dA", "dB"), grads, grads_t):
        assert_close(g, g_t, torch.float32, f"{backend} {name}")
