"""Shared-input groups (q/k/v of one input in one op call): equal to the separate calls, forward and
every gradient, masks and learned scales included; the adapter files and pruning masks unchanged."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import lslo
import lslo_kernels
from lslo import LSLoConfig, LSLoLinear
from lslo.shared_inputs import SharedInputGroup, group_shared_inputs, shared_groups, ungroup_shared_inputs
from lslo.testing import tiny_config
from lslo_kernels import shared as shared_op
from tests.utils import TOLERANCES

LANGS = ["en", "fr", "de", "it"]
RANKS = [2, 3, 1, 4]


def _dyadic(shape, generator, dtype=torch.float64):
    """Values k/8 with |k| <= 8: fp64 sums and products of a few of them are exact, so any
    summation order gives the same bits and a test can ask for equality."""
    return (torch.randint(-8, 9, shape, generator=generator).to(dtype) / 8)


def _layers(backend: str, dtype, *, ranks=RANKS, k=6, outs=(5, 7, 3), seed=0, dyadic=False, learn_scales=False):
    g = torch.Generator().manual_seed(seed)
    draw = (lambda s: _dyadic(s, g, dtype)) if dyadic else (lambda s: torch.randn(s, generator=g).to(dtype))
    layers = []
    for d in outs:
        base = nn.Linear(k, d, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(draw(base.weight.shape))
            base.bias.copy_(draw(base.bias.shape))
        layer = LSLoLinear(base, ranks, backend=backend, learn_scales=learn_scales)
        with torch.no_grad():
            layer.lora_A.copy_(draw(layer.lora_A.shape))
            layer.lora_B.copy_(draw(layer.lora_B.shape))
            layer.scales.copy_(torch.tensor([0.5, 1.0, 2.0, 0.25][: len(ranks)]))
        layer.set_prune_mask(torch.rand(layer.prune_mask.shape, generator=g) < 0.7)
        layers.append(layer)
    return layers


def _run(layers, x, lang, grads):
    """Outputs of the layers for x (all routed by lang) and the gradients of x and every factor."""
    x = x.detach().clone().requires_grad_(True)
    with lslo.route(src=lang, tgt=lang):
        ys = [layer(x) for layer in layers]
    loss = sum((y * g).sum() for y, g in zip(ys, grads))
    loss.backward()
    params = [p.grad.clone() for layer in layers for p in (layer.lora_A, layer.lora_B, layer.scales)
              if p.requires_grad]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return [y.detach() for y in ys], x.grad, params


def _case(backend, dtype, *, dyadic=False, learn_scales=True, tokens=(3, 5), seed=0):
    layers = _layers(backend, dtype, dyadic=dyadic, learn_scales=learn_scales, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = (_dyadic((*tokens, 6), g, dtype) if dyadic else torch.randn(*tokens, 6, generator=g).to(dtype))
    lang = torch.tensor([0, 3, -1])[: tokens[0]] if tokens[0] <= 3 else torch.randint(-1, 4, (tokens[0],), generator=g)
    grads = [(_dyadic((*tokens, layer.out_features), g, dtype) if dyadic
              else torch.randn(*tokens, layer.out_features, generator=g).to(dtype)) for layer in layers]
    return layers, x, lang, grads


def _count_calls(monkeypatch):
    calls = {"shared": 0}
    real = shared_op._SharedLoRA.apply

    def counting(*args):
        calls["shared"] += 1
        return real(*args)

    monkeypatch.setattr(shared_op._SharedLoRA, "apply", counting)
    return calls


def test_reference_grouped_equals_separate_exactly(monkeypatch):
    """On the reference backend every output and every gradient has the same bits (dyadic fp64
    inputs make x's gradient, a sum whose order differs, exact too)."""
    layers, x, lang, grads = _case("reference", torch.float64, dyadic=True)
    separate = _run(layers, x, lang, grads)
    calls = _count_calls(monkeypatch)
    group_shared_inputs([layers])
    grouped = _run(layers, x, lang, grads)
    assert calls["shared"] == 1  # one op call for the three projections
    for a, b in zip(separate[0], grouped[0]):
        assert torch.equal(a, b)
    assert torch.equal(separate[1], grouped[1])
    assert len(separate[2]) == 9
    for a, b in zip(separate[2], grouped[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_within_tolerance(backend, dtype):
    if backend not in lslo_kernels.available_backends():
        pytest.skip(f"{backend} not built")
    layers, x, lang, grads = _case(backend, dtype, tokens=(4, 3))
    separate = _run(layers, x, lang, grads)
    group_shared_inputs([layers], always=True)  # cpp does not group by default (Backend.shared_inputs)
    grouped = _run(layers, x, lang, grads)
    atol, rtol = TOLERANCES[dtype]
    scale = 4 if dtype in (torch.bfloat16, torch.float16) else 1  # x's gradient: a sum of six rounded terms
    for a, b in zip([*separate[0], separate[1], *separate[2]], [*grouped[0], grouped[1], *grouped[2]]):
        torch.testing.assert_close(b.float(), a.float(), atol=atol * scale, rtol=rtol * scale)


def test_grouped_triton_interpreter():
    """The triton backend (interpreter on CPU) grouped against its own separate calls."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
    from lslo_kernels import triton_backend

    if not triton_backend.register():
        pytest.skip("triton not importable")
    layers, x, lang, grads = _case("triton", torch.float32, tokens=(3, 2))
    separate = _run(layers, x, lang, grads)
    group_shared_inputs([layers])
    grouped = _run(layers, x, lang, grads)
    atol, rtol = TOLERANCES[torch.float32]
    for a, b in zip([*separate[0], separate[1], *separate[2]], [*grouped[0], grouped[1], *grouped[2]]):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)


def test_other_input_or_routing_is_not_reused(monkeypatch):
    """A member called with another tensor, or the same tensor under other ids, computes its own output."""
    layers, x, lang, _ = _case("reference", torch.float64)
    group_shared_inputs([layers])
    q, k, v = layers
    x = x.requires_grad_(True)
    other = torch.randn_like(x)
    with torch.no_grad():
        with lslo.route(src=lang, tgt=lang):
            want_k_other = k(other)
        with lslo.route(src=lang.flip(0), tgt=lang.flip(0)):
            want_v_flip = v(x)
    with lslo.route(src=lang, tgt=lang):
        q(x)
        got_k_other = k(other)
    torch.testing.assert_close(got_k_other.detach(), want_k_other, atol=0, rtol=0)
    with lslo.route(src=lang, tgt=lang):
        q(x)
    with lslo.route(src=lang.flip(0), tgt=lang.flip(0)):
        got_v_flip = v(x)
    torch.testing.assert_close(got_v_flip.detach(), want_v_flip, atol=0, rtol=0)


def test_changed_member_falls_back():
    """A merged member (or a trained base) makes the group run each layer alone."""
    layers, x, _lang, _ = _case("reference", torch.float64)
    group = group_shared_inputs([layers])[0]
    layers[1].base_layer.weight.requires_grad_(True)
    assert not group._applies(x, "reference")
    layers[1].base_layer.weight.requires_grad_(False)
    assert group._applies(x, "reference")
    layers[2].merge(1)
    assert not group._applies(x, "reference")


def test_backend_declares_whether_it_groups(monkeypatch):
    """cpp (per-layer C++ autograd ops) is not grouped unless asked; the reference is."""
    if "cpp" not in lslo_kernels.available_backends():
        pytest.skip("cpp not built")
    assert not lslo_kernels.get_backend("cpp").shared_inputs and lslo_kernels.get_backend("reference").shared_inputs
    layers, x, lang, grads = _case("cpp", torch.float32)
    calls = _count_calls(monkeypatch)
    group_shared_inputs([layers])
    _run(layers, x, lang, grads)
    assert calls["shared"] == 0
    group_shared_inputs([layers], always=True)
    _run(layers, x, lang, grads)
    assert calls["shared"] == 1


def test_group_checks_members():
    layers = _layers("reference", torch.float64)
    with pytest.raises(ValueError, match="at least two"):
        SharedInputGroup(layers[:1])
    layers[1].index = "src"
    with pytest.raises(ValueError, match="differ"):
        SharedInputGroup(layers)


def _model(backend="reference", dtype=torch.float64):
    torch.manual_seed(0)
    from transformers import M2M100ForConditionalGeneration

    base = M2M100ForConditionalGeneration(tiny_config(40, d_model=16, encoder_ffn_dim=24, decoder_ffn_dim=24)).to(dtype)
    model = lslo.apply_lslo(base, LSLoConfig(languages=LANGS, ranks=RANKS, backend=backend))
    g = torch.Generator().manual_seed(3)
    for module in lslo.lslo_modules(model).values():
        with torch.no_grad():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g).to(dtype))
        module.set_prune_mask(torch.rand(module.prune_mask.shape, generator=g) < 0.8)
    return model


def _model_step(model, src, tgt):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 40, (2, 6), generator=g)
    labels = torch.randint(3, 40, (2, 5), generator=g)
    out = lslo.forward_with_langs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                                  src, tgt)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def test_model_groups_and_op_calls(monkeypatch):
    """apply_lslo groups self-attention q/k/v and cross-attention k/v: 2 + 2 layers of 'all'
    targets make 2 x 5 + 2 x 8 = 26 layers in 2 + 2 x 2 = 6 groups, 26 - 10 = 16 op calls per
    forward; the loss and every gradient equal the ungrouped model's."""
    model = _model()
    groups = shared_groups(model)
    assert len(groups) == 6
    assert sorted(len(g.members) for g in groups) == [2, 2, 3, 3, 3, 3]
    src, tgt = torch.tensor([0, 2]), torch.tensor([1, 3])
    calls = _count_calls(monkeypatch)
    loss, grads = _model_step(model, src, tgt)
    assert calls["shared"] == 6
    ungroup_shared_inputs(model)
    assert not shared_groups(model)
    loss_ref, grads_ref = _model_step(model, src, tgt)
    assert calls["shared"] == 6
    assert torch.equal(loss, loss_ref)  # the same forward computations, bit for bit
    assert grads.keys() == grads_ref.keys() and len(grads) == 26 * 2
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-12, rtol=1e-10)


def test_adapter_files_and_masks_unchanged_by_grouping(tmp_path):
    """Grouping adds no state: the saved adapter files have the same bytes grouped and ungrouped,
    and a training step grouped or not leaves the same adapters (masks untouched, pruned entries 0)."""
    model = _model()
    lslo.save_adapters(model, tmp_path / "grouped")
    twin = copy.deepcopy(model)
    ungroup_shared_inputs(twin)
    assert shared_groups(model) and not shared_groups(twin)
    lslo.save_adapters(twin, tmp_path / "ungrouped")
    for name in ("lslo_config.json", "lslo_adapters.safetensors"):
        assert (tmp_path / "grouped" / name).read_bytes() == (tmp_path / "ungrouped" / name).read_bytes()
    src, tgt = torch.tensor([0, 2]), torch.tensor([1, 3])
    masks = {n: m.prune_mask.clone() for n, m in lslo.lslo_modules(model).items()}
    for m in (model, twin):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        _model_step_keep_grads(m, src, tgt)
        opt.step()
    for (name, a), b in zip(lslo.lslo_modules(model).items(), lslo.lslo_modules(twin).values()):
        assert torch.equal(a.prune_mask, masks[name]) and torch.equal(b.prune_mask, masks[name])
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(a.lora_A, b.lora_A, atol=1e-12, rtol=1e-10)
        assert not a.lora_B[~a.prune_mask].any()


def _model_step_keep_grads(model, src, tgt):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 40, (2, 6), generator=g)
    labels = torch.randint(3, 40, (2, 5), generator=g)
    out = lslo.forward_with_langs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                                  src, tgt)
    out.loss.backward()


def test_no_grad_calls_are_not_grouped(monkeypatch):
    """Decoding keeps each layer's no-grad fast path (no op call of the group)."""
    model = _model()
    calls = _count_calls(monkeypatch)
    ids = torch.randint(3, 40, (2, 6))
    with torch.no_grad():
        lslo.forward_with_langs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                        "labels": ids[:, :4].contiguous()}, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert calls["shared"] == 0


def test_615m_structure_makes_96_op_calls_instead_of_156():
    """benchmarks/bench_fastpath.py's count: the 615M shape's 156 adapted layers in 96 op calls."""
    from benchmarks import bench_fastpath

    grouped = bench_fastpath.build("reference", d_model=8)
    separate = copy.deepcopy(grouped)
    ungroup_shared_inputs(separate)
    data = bench_fastpath.batch(tokens=3, seqs=2)
    assert len(lslo.lslo_modules(grouped)) == 156
    assert bench_fastpath.count_calls(separate, data)[0] == 156
    assert bench_fastpath.count_calls(grouped, data)[0] == 96
