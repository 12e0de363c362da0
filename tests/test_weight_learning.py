"""Learnable scales and both routings in one layer (Weight Learning, paper Section 4.1, Eq. 5).

The dual layer is checked against an independent composition: the base Linear plus two single-routing
op calls (reference backend) weighted by softmax(logits); forward and every gradient (x, both factor
sets, the scales, the mixing logits).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lslo
import lslo_kernels
from lslo.layer import LSLoDualLinear, LSLoMix
from tests.utils import assert_close, dense_truth, make_case, run_op

BACKENDS = [b for b in lslo_kernels.available_backends("cpu") if b != "triton"]
RANKS = [2, 8, 3, 1]


# ------------------------------------------------------------------------- learnable scales
@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_gradient_gradcheck_fp64(backend):
    case = make_case(11, 5, 6, [2, 3, 1], density=0.6, spread="with_none", dtype=torch.float64, seed=3)
    case["scales"] = case["scales"].double()

    def f(x, a, b, scales):
        return lslo_kernels.grouped_lora(x, case["base_out"], a, b, case["prune_mask"], scales, case["rank_offsets"],
                                         case["routing"], case["max_rank"], backend=backend)

    inputs = tuple(case[n].clone().requires_grad_(True) for n in ("x", "lora_a", "lora_b", "scales"))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", ["uniform", "with_none", "sparse"])
def test_scale_gradient_matches_dense_truth(backend, dtype, spread):
    # d s_l = sum over tokens of l of <dy_t, (B_l * M_l) h_t>, against autograd of the dense fp64 formulation
    case = make_case(53, 24, 19, [1, 2, 3, 8, 64, 2], density=0.4, spread=spread, dtype=dtype, seed=7)
    _y, grads = run_op(case, backend)
    _y_t, grads_t = dense_truth(case)
    assert grads[4].dtype == torch.float32 and grads[4].shape == (6,)
    assert_close(grads[4], grads_t[4], dtype, f"{backend} dscales")
    if spread == "sparse":  # absent languages get exactly 0
        present = set(case["routing"].lang.tolist())
        for lang_id in range(6):
            if lang_id not in present:
                assert grads[4][lang_id] == 0


def test_layer_holds_scales_as_parameter_when_asked(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    layer = lslo.LSLoLinear(nn.Linear(16, 12), RANKS, learn_scales=True, scale=[0.5, 1.0, 2.0, 1.5])
    assert isinstance(layer.scales, nn.Parameter) and layer.learn_scales
    assert "scales" in dict(layer.named_parameters()) and "scales" not in dict(layer.named_buffers())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 16)
    ids = torch.tensor([0, 1, 2, 3, -1, 1, 0])
    layer(x, lang=ids).square().sum().backward()
    assert layer.scales.grad is not None and torch.count_nonzero(layer.scales.grad) == 4
    # default stays a buffer; saved adapters load into either
    plain = lslo.LSLoLinear(layer.base_layer, RANKS)
    assert "scales" in dict(plain.named_buffers()) and not plain.learn_scales
    save_file(layer.adapter_state_dict(), tmp_path / "a.safetensors")
    plain.load_adapter_state_dict(load_file(tmp_path / "a.safetensors"))
    assert torch.equal(plain.scales, layer.scales.detach())
    with torch.no_grad():
        torch.testing.assert_close(plain(x, lang=ids), layer(x, lang=ids))


def test_learned_scales_train():
    # the scales alone, trained against outputs made with other scales, recover them
    torch.manual_seed(1)
    layer = lslo.LSLoLinear(nn.Linear(8, 8), [2, 2], learn_scales=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    x, ids = torch.randn(32, 8), torch.randint(0, 2, (32,))
    with torch.no_grad():
        layer.scales.copy_(torch.tensor([3.0, -1.0]))
        target = layer(x, lang=ids)
        layer.scales.copy_(torch.tensor([1.0, 1.0]))
    opt = torch.optim.Adam([layer.scales], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        (layer(x, lang=ids) - target).square().mean().backward()
        opt.step()
    torch.testing.assert_close(layer.scales.detach(), torch.tensor([3.0, -1.0]), atol=0.05, rtol=0)


# ---------------------------------------------------------------------------- dual routing
def _dual(backend, mix, lora_out=None, learn_scales=True, seed=0):
    torch.manual_seed(seed)
    layer = LSLoDualLinear(nn.Linear(16, 12), RANKS, mix=mix, backend=backend, learn_scales=learn_scales,
                           lora_out_features=lora_out)
    with torch.no_grad():
        for s in (layer.src, layer.tgt):
            s.lora_B.normal_()
            s.scales.uniform_(0.5, 1.5)
            s.set_prune_mask(keep=torch.rand_like(s.lora_B) > 0.3)
    return layer


def _independent(layer, x, src, tgt, logits):
    """base + w_src * LoRA_src + w_tgt * LoRA_tgt from two single-routing reference calls; own leaves."""
    leaves = {f"{n}.{p}": getattr(getattr(layer, n), p).detach().clone().requires_grad_(True)
              for n in ("src", "tgt") for p in ("lora_A", "lora_B", "scales")}
    x = x.detach().clone().requires_grad_(True)
    logits = logits.detach().clone().requires_grad_(True)
    w = torch.softmax(logits, 0)
    rows = x.reshape(-1, 16)
    lo = layer.src.lora_out_features
    y = layer.base_layer(rows)
    terms = []
    for i, (name, ids) in enumerate((("src", src), ("tgt", tgt))):
        s = getattr(layer, name)
        routing = lslo_kernels.route_tokens(ids, x.shape[:-1], s.num_languages)
        zero = torch.zeros(rows.shape[0], lo)
        term = lslo_kernels.grouped_lora(rows, zero, leaves[f"{name}.lora_A"], leaves[f"{name}.lora_B"],
                                         s.prune_mask, leaves[f"{name}.scales"], s.rank_offsets, routing,
                                         s.max_rank, backend="reference")
        terms.append(w[i] * term)
    delta = terms[0] + terms[1]
    y = torch.cat([y[:, :lo] + delta, y[:, lo:]], dim=1).reshape(*x.shape[:-1], 12)
    return y, x, logits, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lora_out", [None, 5])
def test_dual_equals_two_weighted_single_routing_calls(backend, lora_out):
    mix = LSLoMix((0.4, -0.3))
    layer = _dual(backend, mix, lora_out)
    x = torch.randn(4, 5, 16, requires_grad=True)
    src, tgt = torch.tensor([0, 1, 2, -1]), torch.tensor([3, 3, 0, 1])
    grad = torch.randn(4, 5, 12)
    layer.src._backend_for(x)
    linear_calls, real_linear = [], layer.src._backend_linear
    if real_linear is not None:  # cpp: base + source term in one op where the widths are full
        layer.src._backend_linear = lambda *args: linear_calls.append(1) or real_linear(*args)
    y = layer(x, src, tgt)
    y.backward(grad)
    assert len(linear_calls) == (1 if real_linear is not None and lora_out is None else 0)
    y_ref, x_ref, logits_ref, leaves = _independent(layer, x, src, tgt, mix.logits)
    y_ref.backward(grad)
    assert_close(y.detach(), y_ref.detach(), torch.float32, "y")
    assert_close(x.grad, x_ref.grad, torch.float32, "dx")
    assert_close(mix.logits.grad, logits_ref.grad, torch.float32, "d logits")
    for key, leaf in leaves.items():
        name, param = key.split(".")
        assert_close(getattr(getattr(layer, name), param).grad, leaf.grad, torch.float32, key)
    # fast inference path (in place into the base output) equals the autograd path
    with torch.no_grad():
        assert_close(layer(x, src, tgt), y.detach(), torch.float32, "no_grad y")
    with torch.inference_mode():
        assert_close(layer(x, src, tgt), y.detach(), torch.float32, "inference_mode y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_under_autocast_tracks_fp32(backend):
    """Weight Learning with mixed precision (lslo train --mixed-precision bf16): under bf16 autocast
    the dual layer returns bf16 and its output and every gradient follow the fp32 call within bf16
    rounding (it used to hand fp32 x and a bf16 base output to the kernel)."""
    mix = LSLoMix((0.4, -0.3))
    layer = _dual(backend, mix)
    x = torch.randn(4, 5, 16)
    src, tgt = torch.tensor([0, 1, 2, -1]), torch.tensor([3, 3, 0, 1])
    grad = torch.randn(4, 5, 12)
    outs = {}
    for amp in (False, True):
        layer.zero_grad(set_to_none=True)
        mix.logits.grad = None  # a shared mix is not one of the layer's modules
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = layer(xi, src, tgt)
        assert y.dtype == (torch.bfloat16 if amp else torch.float32)
        y.float().backward(grad)
        outs[amp] = [y.detach().float(), xi.grad, mix.logits.grad.clone()] + [
            getattr(getattr(layer, n), p).grad for n in ("src", "tgt") for p in ("lora_A", "lora_B", "scales")]
    names = ["y", "dx", "d logits"] + [f"{n}.{p}" for n in ("src", "tgt") for p in ("lora_A", "lora_B", "scales")]
    for name, got, want in zip(names, outs[True], outs[False]):
        assert got.dtype == want.dtype, name
        assert_close(got, want, torch.bfloat16, f"autocast {name}")


def test_dual_gradcheck_fp64_through_logits_and_x():
    layer = _dual("auto", LSLoMix((0.1, 0.2))).double()
    src, tgt = torch.tensor([0, 1, -1]), torch.tensor([2, 3, 3])
    mix = layer._shared_mix

    def f(x, logits):
        return layer(x, src, tgt, mix=torch.softmax(logits, 0))

    x = torch.randn(3, 2, 16, dtype=torch.float64, requires_grad=True)
    logits = mix.logits.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, logits))


def test_dual_routes_from_lslo_route_and_shares_the_mix():
    mix = LSLoMix()
    a, b = _dual("auto", mix, seed=1), _dual("auto", mix, seed=2)
    owner = nn.Module()
    owner.lslo_mix = mix
    owner.a, owner.b = a, b
    # the shared mix is registered once, on its owner; the dual layers only refer to it
    assert [n for n, _ in owner.named_parameters() if "logits" in n] == ["lslo_mix.logits"]
    x = torch.randn(3, 4, 16)
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([3, 3, -1])
    with lslo.route(src=src, tgt=tgt):
        y = a(x) + b(x)
    y.sum().backward()
    assert mix.logits.grad is not None and mix.logits.grad.abs().sum() > 0
    torch.testing.assert_close(mix.logits.grad.sum(), torch.tensor(0.0), atol=1e-5, rtol=0)  # softmax: grads sum to 0


def test_dual_fixed_weights_and_bad_mix():
    layer = _dual("auto", torch.tensor([0.25, 0.75]))
    assert torch.equal(layer.mix_weights_now(), torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        layer.set_mix(torch.ones(3))
    with pytest.raises(TypeError, match="LSLoMix"):
        layer.set_mix([0.5, 0.5])
    with pytest.raises(ValueError, match="two finite"):
        LSLoMix((0.0, float("nan")))



# ------------------------------------------------------------------------ model injection
def _tiny_m2m(seed=0):
    from transformers import M2M100ForConditionalGeneration

    from lslo.testing import tiny_config

    torch.manual_seed(seed)
    return M2M100ForConditionalGeneration(tiny_config(vocab_size=40)).eval()


def test_apply_weight_learning_injects_duals_and_one_mix_per_layer():
    import copy

    from lslo.analysis import weight_learning_config as analysis_config
    from lslo.model import apply_weight_learning, remove_weight_learning, weight_learning_config, weight_learning_mixes

    langs = ["en", "fr", "de"]
    config = lslo.LSLoConfig(languages=langs, ranks={"en": 2, "fr": 3, "de": 1}, target_modules="all")
    base = _tiny_m2m()
    assert weight_learning_config(base) is None and analysis_config(base) is None
    model = apply_weight_learning(copy.deepcopy(base), config, learn_scales=True)
    assert weight_learning_config(model) is config and analysis_config(model) is config
    assert lslo.weight_learning_config is weight_learning_config
    duals = {n: m for n, m in model.named_modules() if isinstance(m, LSLoDualLinear)}
    mixes = weight_learning_mixes(model)
    assert sorted(mixes) == [f"model.{side}.layers.{i}" for side in ("decoder", "encoder") for i in (0, 1)]
    for name, dual in duals.items():
        assert dual._shared_mix is mixes[name[: name.index(".layers.") + len(".layers.") + 1]]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "scales", "lslo_mix.logits")) for n in trainable)
    assert sum(n.endswith("lslo_mix.logits") for n in trainable) == 4

    batch = {"input_ids": torch.randint(3, 40, (3, 7)), "labels": torch.randint(3, 40, (3, 5))}
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    with torch.no_grad(), lslo.route(src=src, tgt=tgt):  # B = 0 at init: the base model's output
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits)
    # with weights fixed to (1, 0) the model is LSLo routed by source everywhere, same factors
    single = lslo.apply_lslo(copy.deepcopy(base), lslo.LSLoConfig(
        languages=langs, ranks={"en": 2, "fr": 3, "de": 1}, target_modules="all", index_plan={"encoder": "src", "decoder": "src"}))
    with torch.no_grad():
        for name, layer in lslo.lslo_modules(single).items():
            duals[name].src.lora_B.normal_()
            layer.load_adapter_state_dict(duals[name].src.adapter_state_dict())
            duals[name].tgt.lora_B.normal_()
            duals[name].set_mix(torch.tensor([1.0, 0.0]))
    with torch.no_grad(), lslo.route(src=src, tgt=tgt):
        torch.testing.assert_close(model(**batch).logits, single(**batch).logits, atol=1e-5, rtol=1e-5)
    for name, dual in duals.items():  # back to the shared, learnable mixes
        dual.set_mix(mixes[name[: name.index(".layers.") + len(".layers.") + 1]])
    with lslo.route(src=src, tgt=tgt):
        model(**batch).loss.backward()
    assert all(m.logits.grad is not None and m.logits.grad.abs().sum() > 0 for m in mixes.values())

    remove_weight_learning(model)
    assert weight_learning_config(model) is None
    assert not any(isinstance(m, (LSLoDualLinear, LSLoMix)) for m in model.modules())
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())


def test_train_reads_the_index_plan_file_weight_learning_writes(tmp_path):
    # One reader of the plan file (lslo.weight_learning.index_plan_document) for `lslo train --index-plan`
    # and read_index_plan; a file that is not UTF-8 is a ValueError naming the flag, not a UnicodeDecodeError.
    from lslo.train import _load_index_plan
    from lslo.weight_learning import read_index_plan, write_index_plan

    path = write_index_plan({"encoder": [(0.7, 0.3), (0.2, 0.8)], "decoder": [(0.4, 0.6)]}, tmp_path / "plan.json")
    expected = {"encoder": ["src", "tgt"], "decoder": ["tgt"]}
    assert _load_index_plan(str(path)) == expected
    assert read_index_plan(path, num_encoder_layers=2, num_decoder_layers=1) == expected
    assert _load_index_plan("tgt") == "tgt"
    with pytest.raises(ValueError, match=r"--index-plan file .*missing\.json does not exist"):
        _load_index_plan(str(tmp_path / "missing.json"))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"--index-plan file .*binary\.json is not valid JSON"):
        _load_index_plan(str(tmp_path / "binary.json"))
    with pytest.raises(ValueError, match=r"^index plan file .*binary\.json is not valid JSON"):
        read_index_plan(tmp_path / "binary.json")
