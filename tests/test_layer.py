"""LSLoLinear: drop-in behaviour, id layouts, lslo.route, bad input, merge, adapter i/o, pruning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lslo
import lslo_kernels
from lslo_kernels import build_routing, lora_forward_reference


def _layer(in_f=16, out_f=12, ranks=(2, 8, 3), seed=0, **kw):
    torch.manual_seed(seed)
    layer = lslo.LSLoLinear(nn.Linear(in_f, out_f), list(ranks), **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _expected(layer, x2d, lang):
    """Per-token truth from the per-language deltas: base(x) + x (s_l B_l M_l A_l)^T."""
    out = layer.base_layer(x2d).clone()
    for t, l in enumerate(lang.tolist()):
        if l >= 0:
            out[t] += layer.delta_weight(l) @ x2d[t]
    return out


def test_zero_adapters_equal_base_linear():
    base = nn.Linear(10, 6)
    layer = lslo.LSLoLinear(base, [2, 4])
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(layer(x, lang=torch.tensor([0, 1, 0])), base(x))


def test_wraps_base_without_copying_and_freezes_it():
    base = nn.Linear(10, 6)
    layer = lslo.LSLoLinear(base, [2, 4])
    assert layer.base_layer is base
    assert not base.weight.requires_grad and not base.bias.requires_grad
    trainable = lslo.LSLoLinear(nn.Linear(10, 6), [2], freeze_base=False)
    assert trainable.base_layer.weight.requires_grad


def test_per_sequence_and_per_token_ids_agree_with_truth():
    layer = _layer()
    x = torch.randn(4, 5, 16)
    seq_ids = torch.tensor([0, 2, -1, 1])
    y_seq = layer(x, lang=seq_ids)
    y_tok = layer(x, lang=seq_ids[:, None].expand(4, 5))
    torch.testing.assert_close(y_seq, y_tok)
    truth = _expected(layer, x.reshape(-1, 16), seq_ids.repeat_interleave(5))
    torch.testing.assert_close(y_seq.reshape(-1, 12), truth, atol=1e-5, rtol=1e-5)


def test_beam_expansion_repeats_each_id_for_its_rows():
    layer = _layer()
    num_beams = 5
    x = torch.randn(3 * num_beams, 4, 16)
    ids = torch.tensor([2, 0, 1])
    y = layer(x, lang=ids)
    y_expanded = layer(x, lang=ids.repeat_interleave(num_beams))
    torch.testing.assert_close(y, y_expanded)
    # row 0..4 belong to sentence 0 (language 2): differs from language 0's output
    assert not torch.allclose(y[:5], layer(x[:5], lang=torch.tensor([0])))


def test_route_context_selects_src_or_tgt_and_layers_share_routing():
    src_layer = _layer(index="src")
    tgt_layer = _layer(index="tgt", seed=1)
    x = torch.randn(2, 3, 16)
    src, tgt = torch.tensor([0, 1]), torch.tensor([2, 2])
    with lslo.route(src=src, tgt=tgt) as ctx:
        y_src = src_layer(x)
        y_tgt = tgt_layer(x)
        src_layer(x)
        assert len(ctx._routings) == 2  # one per (index, layout), reused on the second call
    torch.testing.assert_close(y_src, src_layer(x, lang=src))
    torch.testing.assert_close(y_tgt, tgt_layer(x, lang=tgt))
    assert lslo.current_route() is None


def test_route_missing_index_is_a_clear_error():
    layer = _layer(index="src")
    with lslo.route(tgt=torch.tensor([0])), pytest.raises(ValueError, match="no 'src' ids"):
        layer(torch.randn(1, 16))


def test_no_ids_and_no_route_is_a_clear_error():
    with pytest.raises(ValueError, match="without language ids"):
        _layer()(torch.randn(2, 16))


@pytest.mark.parametrize(
    "ids, exc, msg",
    [
        (torch.tensor([0, 3]), ValueError, "out of range"),
        (torch.tensor([0, -2]), ValueError, "< -1"),
        (torch.tensor([0, 1, 2]), ValueError, "fits neither"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        ([0, 1], TypeError, "tensor"),
    ],
)
def test_bad_ids_raise_before_any_kernel(ids, exc, msg):
    with pytest.raises(exc, match=msg):
        _layer()(torch.randn(2, 5, 16), lang=ids)


@pytest.mark.parametrize(
    "ranks, exc, msg",
    [([2, 0], ValueError, r"ranks\[1\] = 0"), ([], ValueError, "at least one"), ([2, 1.5], TypeError, "int"),
     (3, TypeError, "sequence")],
)
def test_bad_ranks(ranks, exc, msg):
    with pytest.raises(exc, match=msg):
        lslo.LSLoLinear(nn.Linear(4, 4), ranks)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="scale has 3 entries"):
        lslo.LSLoLinear(nn.Linear(4, 4), [1, 2], scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="index"):
        lslo.LSLoLinear(nn.Linear(4, 4), [1], index="both")
    with pytest.raises(TypeError, match="nn.Linear"):
        lslo.LSLoLinear(nn.Conv1d(4, 4, 1), [1])
    with pytest.raises(ValueError, match="backend"):
        lslo.LSLoLinear(nn.Linear(4, 4), [1], backend="fortran")


def test_dtype_and_shape_mismatch():
    layer = _layer()
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 16, dtype=torch.float64), lang=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.randn(2, 15), lang=torch.tensor([0, 1]))


def test_empty_batch_and_nan_propagation():
    layer = _layer()
    y = layer(torch.randn(0, 7, 16), lang=torch.empty(0, dtype=torch.int64))
    assert y.shape == (0, 7, 12)
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    y = layer(x, lang=torch.tensor([0, 1, 2]))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_non_contiguous_input():
    layer = _layer()
    x = torch.randn(16, 6).t()  # (6, 16), stride (1, 6)
    ids = torch.tensor([0, 1, 2, -1, 0, 1])
    torch.testing.assert_close(layer(x, lang=ids), layer(x.contiguous(), lang=ids))


def test_backward_gives_lora_grads_only_and_masks_b():
    layer = _layer()
    mask = torch.rand_like(layer.lora_B) > 0.7
    layer.set_prune_mask(mask)
    assert torch.all(layer.lora_B[~mask] == 0)
    x = torch.randn(6, 16, requires_grad=True)
    layer(x, lang=torch.tensor([0, 1, 2, -1, 0, 1])).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None
    assert x.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert torch.all(layer.lora_B.grad[~mask] == 0) and layer.lora_B.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_masked_b_entries_stay_zero_through_optimizer_steps(opt_cls):
    layer = _layer()
    layer.set_prune_mask(torch.rand_like(layer.lora_B) > 0.5)
    opt = opt_cls([layer.lora_A, layer.lora_B], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 16), lang=torch.randint(0, 3, (8,))).sum().backward()
        opt.step()
    assert torch.all(layer.lora_B[~layer.prune_mask] == 0)


def test_language_factors_are_views_into_packed_storage():
    layer = _layer(ranks=(2, 8, 3))
    a, b, m = layer.language_factors(1)
    assert a.shape == (8, 16) and b.shape == (12, 8) and m.shape == (12, 8) and m.dtype == torch.bool
    assert a.data_ptr() == layer.lora_A[2].data_ptr()
    with torch.no_grad():
        b.zero_()
    assert torch.all(layer.lora_B[:, 2:10] == 0) and layer.lora_B[:, :2].abs().sum() > 0
    with pytest.raises(ValueError, match="out of range"):
        layer.language_factors(3)


def test_merge_and_unmerge():
    layer = _layer()
    w0 = layer.base_layer.weight.clone()
    x = torch.randn(4, 16)
    y_adapted = layer(x, lang=torch.full((4,), 2))
    layer.merge(2)
    torch.testing.assert_close(layer(x, lang=torch.full((4,), 2)), y_adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), y_adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge(0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def test_adapter_state_dict_roundtrip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = _layer()
    layer.set_prune_mask(torch.rand_like(layer.lora_B) > 0.3)
    save_file({k: v.contiguous() for k, v in layer.adapter_state_dict().items()}, tmp_path / "a.safetensors")
    assert "base_layer.weight" not in layer.adapter_state_dict()
    fresh = lslo.LSLoLinear(layer.base_layer, [2, 8, 3])
    fresh.load_adapter_state_dict(load_file(tmp_path / "a.safetensors"))
    x, ids = torch.randn(5, 16), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(fresh(x, lang=ids), layer(x, lang=ids))
    with pytest.raises(ValueError, match="ranks"):
        lslo.LSLoLinear(layer.base_layer, [2, 8, 4]).load_adapter_state_dict(layer.adapter_state_dict())


def test_init_schemes():
    torch.manual_seed(0)
    lora = lslo.LSLoLinear(nn.Linear(256, 8), [4, 64])
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.9 * bound
    assert torch.all(lora.lora_B == 0)
    ref = lslo.LSLoLinear(nn.Linear(256, 8), [4, 64], init="reference")
    a4, _, _ = ref.language_factors(0)
    a64, _, _ = ref.language_factors(1)
    assert 0.4 < a4.abs().max() <= 0.5  # U(-1/sqrt(4), 1/sqrt(4))
    assert 0.1 < a64.abs().max() <= 0.125
    assert torch.all(ref.lora_B == 0)


def test_scale_per_language_and_extra_repr():
    layer = _layer(ranks=[2] * 16 + [8] * 14, scale=2.0)
    text = repr(layer)
    assert "languages=30" in text and "2x16 8x14" in text and "mask_density=1.000" in text
    layer2 = _layer(scale=[1.0, 0.0, 2.0])
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer2(x, lang=torch.tensor([1, 1, 1])), layer2.base_layer(x))


def test_matches_reference_function_directly():
    layer = _layer()
    x = torch.randn(9, 16)
    ids = torch.tensor([0, 1, 2, -1, 0, 2, 2, 1, -1])
    r = build_routing(ids, 3)
    y_ref, _ = lora_forward_reference(x, layer.base_layer(x), layer.lora_A, layer.lora_B, layer.prune_mask,
                                      layer.scales, layer.rank_offsets, r.sorted_token_idx,
                                      r.lang_offsets, layer.max_rank)
    torch.testing.assert_close(layer(x, lang=ids), y_ref)


# ------------------------------------------------------------------------------- keep mask
def test_keep_mask_names_the_kept_entries():
    layer = _layer()
    keep = torch.rand_like(layer.lora_B) > 0.5
    layer.set_prune_mask(keep=keep)
    assert layer.keep_mask is layer.prune_mask and torch.equal(layer.keep_mask, keep)
    assert torch.all(layer.lora_B[~keep] == 0) and torch.all(layer.lora_B[keep] != 0)
    assert layer.adapter_state_dict()["prune_mask"] is layer.prune_mask  # file format unchanged
    with pytest.raises(TypeError, match="exactly one mask"):
        layer.set_prune_mask(keep, keep=keep)
    with pytest.raises(TypeError, match="exactly one mask"):
        layer.set_prune_mask()


# ------------------------------------------------------------------------------ fast paths
def _forbid_custom_op(monkeypatch):
    from lslo_kernels import ops

    def forbidden(*args, **kwargs):
        raise AssertionError("the Python custom op was called on a fast path")

    monkeypatch.setattr(ops, "_grouped_lora_fwd", forbidden)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("widths", [{}, {"lora_out_features": 5, "lora_in_features": 9}])
def test_inference_reaches_the_kernel_directly_and_equals_the_autograd_path(monkeypatch, backend, widths):
    if backend not in lslo_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} not built")
    layer = _layer(backend=backend, **widths)
    x = torch.randn(3, 4, 16)
    ids = torch.tensor([0, 2, -1])
    y_train = layer(x.requires_grad_(True), lang=ids)  # autograd path (custom op or C++ autograd)
    _forbid_custom_op(monkeypatch)
    with torch.no_grad():
        y_nograd = layer(x, lang=ids)
    with torch.inference_mode():
        y_inference = layer(x, lang=ids)
    frozen = layer.requires_grad_(False)
    y_frozen = frozen(x.detach(), lang=ids)  # grad mode on, nothing requires grad: inference too
    for y in (y_nograd, y_inference, y_frozen):
        torch.testing.assert_close(y, y_train.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y_train.detach(), _expected(layer, x.detach().reshape(12, 16), ids.repeat_interleave(4))
                               .reshape(3, 4, 12), atol=1e-5, rtol=1e-5)


def test_decoding_path_is_taken_only_where_it_applies_and_equals_the_truth(monkeypatch):
    """LSLoLinear's no-grad paths against the per-token truth: the first call takes _decode_forward
    (no_grad, plain base, full widths), which leaves a plan; later calls take _planned_decode. Every
    case they must leave to the general path (hooks on the base, reduced widths, autocast, language-id
    tensors for the plan, a changed backend) still runs the hook / gives the general path's result."""
    layer = _layer()
    taken = []  # per call: "plan", "decode" or "general"

    def spy(name, original):
        def wrapped(self, *args):
            y = original(self, *args)
            if y is not None:
                taken.append(name)
            return y
        return wrapped

    monkeypatch.setattr(lslo.LSLoLinear, "_decode_forward", spy("decode", lslo.LSLoLinear._decode_forward))
    monkeypatch.setattr(lslo.LSLoLinear, "_planned_decode", spy("plan", lslo.LSLoLinear._planned_decode))

    def call(*args, **kwargs):
        before = len(taken)
        y = layer(*args, **kwargs)
        if len(taken) == before:
            taken.append("general")
        return y

    x = torch.randn(6, 16)
    ids = torch.tensor([0, 2, -1, 1, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(call(x, lang=ids), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        wide = torch.randn(6, 20)[:, 2:18]  # rows with a stride: the kernels take them as they are
        torch.testing.assert_close(call(wide, lang=ids), _expected(layer, wide.contiguous(), ids), atol=1e-5,
                                   rtol=1e-5)
        with lslo.route(tgt=torch.tensor([1, 2])):  # ids from the context, 3-D input, per-sequence ids
            x3 = torch.randn(2, 3, 16)
            want3 = _expected(layer, x3.reshape(6, 16), torch.tensor([1] * 3 + [2] * 3)).reshape(2, 3, 12)
            torch.testing.assert_close(call(x3), want3, atol=1e-5, rtol=1e-5)
            xt = torch.randn(16, 6).t()  # columns with a stride: the op refuses them, the general path copies
            torch.testing.assert_close(call(xt), _expected(layer, xt.contiguous(), torch.tensor([1] * 3 + [2] * 3)),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(call(x3), want3, atol=1e-5, rtol=1e-5)
        routing = lslo_kernels.build_routing(ids, layer.num_languages)
        torch.testing.assert_close(call(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        # Language-id tensors: the plan leaves them to _decode_forward (routing, checks). An input the op
        # refuses drops the plan; _decode_forward makes it again only from an input the op takes as it is.
        assert taken == ["decode", "decode", "plan", "decode", "decode", "plan"]
        taken.clear()
        calls = []
        want = _expected(layer, x, ids)
        handle = layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(1))
        torch.testing.assert_close(call(x, lang=routing), want, atol=1e-5, rtol=1e-5)
        handle.remove()
        assert calls == [1] and taken == ["general"]  # the hook ran: the general path called the module
        taken.clear()
        call(x, lang=routing)
        call(x, lang=routing)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = call(x, lang=routing)
        assert y.dtype == torch.bfloat16 and taken == ["decode", "plan", "general"]
        taken.clear()
        layer.backend = "reference"  # a changed backend is seen (the cache is keyed on it)
        torch.testing.assert_close(call(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        assert layer._backend_name == "reference" and taken == ["decode"] and layer._decode_plan is None
    narrow = _layer(lora_out_features=5)
    with torch.no_grad():
        taken.clear()
        layer = narrow
        torch.testing.assert_close(call(x, lang=ids), _expected(narrow, x, ids), atol=1e-5, rtol=1e-5)
        assert taken == ["general"]


def test_layer_built_under_inference_mode_decodes():
    """A layer whose tensors are inference tensors (built or loaded under torch.inference_mode) has no
    version counters to key staged factors on: it decodes with the factors staged per call, in and
    out of inference mode, and equals the per-token truth."""
    with torch.inference_mode():
        layer = lslo.LSLoLinear(nn.Linear(160, 128), [8, 64, 56])  # 128 x 128 = 16k entries of B: staged size
        layer.lora_B.normal_()
        x = torch.randn(7, 160)
        ids = torch.tensor([0, 1, 2, -1, 2, 1, 0])
        want = _expected(layer, x, ids)
        for _ in range(2):  # the general path, then the plan
            torch.testing.assert_close(layer(x, lang=ids), want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(layer(x, lang=build_routing(ids, 3)), want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, lang=ids), want, atol=1e-4, rtol=1e-4)
    assert layer._staged is None


@pytest.mark.parametrize("learn_scales", [False, True])
def test_layer_pickles_after_calls_and_copies_compute_the_same(learn_scales):
    """torch.save of a whole module, copy.deepcopy and multiprocessing pickle the layer: after training
    and decoding calls (backend ops, staged factors and the decoding plan cached) it still pickles,
    without those caches, and the copy computes what the original does, forward and gradients."""
    import copy
    import io
    import pickle

    layer = _layer(in_f=160, out_f=128, ranks=(8, 64, 56), learn_scales=learn_scales)
    x = torch.randn(7, 160)
    ids = torch.tensor([0, 1, 2, -1, 2, 1, 0])
    layer(x, lang=ids).sum().backward()
    with torch.no_grad():
        layer(x, lang=ids)
        layer(x, lang=ids)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)]
    for other in copies:
        assert other._staged is None and other._decode_plan is None and other._backend_key is None
        with torch.no_grad():
            torch.testing.assert_close(other(x, lang=ids), layer(x, lang=ids), atol=0, rtol=0)
            torch.testing.assert_close(other(x, lang=ids), layer(x, lang=ids), atol=0, rtol=0)
        other.zero_grad()
        layer.zero_grad()
        other(x, lang=ids).square().sum().backward()
        layer(x, lang=ids).square().sum().backward()
        for name, p in layer.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(dict(other.named_parameters())[name].grad, p.grad, atol=0, rtol=0)
    assert layer._decode_plan is not None  # the original keeps its caches


def test_decoding_plan_of_a_backend_without_the_one_op():
    """A checking backend without linear_decode (cpp built without it; triton) plans F.linear then its
    add_: the planned calls equal the truth, for contiguous rows, rows with a stride and 3-D input;
    the reference backend, whose loop checks nothing, gets no plan."""
    if "cpp" not in lslo_kernels.available_backends("cpu"):
        pytest.skip("cpp not built")
    layer = _layer(backend="cpp")
    x = torch.randn(6, 16)
    ids = torch.tensor([0, 2, -1, 1, 1, 0])
    routing = build_routing(ids, layer.num_languages)
    layer._backend_for(x)
    layer._backend_decode = None  # cached per (backend, device, dtype): stays off
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        plan = layer._decode_plan
        assert plan is not None and plan[2] is None and plan[4] is layer._backend_add
        wide = torch.randn(6, 20)[:, 2:18]
        torch.testing.assert_close(layer(wide, lang=routing), _expected(layer, wide.contiguous(), ids), atol=1e-5,
                                   rtol=1e-5)
        x3 = x.reshape(2, 3, 16)
        torch.testing.assert_close(layer(x3, lang=routing), _expected(layer, x, ids).reshape(2, 3, 12), atol=1e-5,
                                   rtol=1e-5)
        assert layer._decode_plan is plan
    reference = _layer(backend="reference")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(reference(x, lang=routing), _expected(reference, x, ids), atol=1e-5, rtol=1e-5)
    assert reference._decode_plan is None


def test_decoding_plan_follows_changes_of_the_layer():
    """A planned no-grad call (_planned_decode) sees what changed since the plan was made: new B values
    (optimizer step: the staged factors are rebuilt), a new prune mask, new scales, a merged
    language, a base weight replaced, a new input width (the op refuses it: the general path words
    the error), and a layer moved to float64."""
    layer = _layer()
    layer.lora_B.data.normal_()
    x = torch.randn(6, 16)
    ids = torch.tensor([0, 2, -1, 1, 1, 0])
    routing = lslo_kernels.build_routing(ids, layer.num_languages)
    with torch.no_grad():
        layer(x, lang=routing)
        assert layer._decode_plan is not None
        layer.lora_B.mul_(-2.0)
        torch.testing.assert_close(layer(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        layer.set_prune_mask(torch.rand(layer.lora_B.shape) < 0.5)
        torch.testing.assert_close(layer(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        layer.scales.mul_(0.5)
        torch.testing.assert_close(layer(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        layer.base_layer.weight = nn.Parameter(torch.randn_like(layer.base_layer.weight), requires_grad=False)
        torch.testing.assert_close(layer(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        layer.merge(2)
        assert layer._decode_plan is not None  # merge leaves the plan; the call sees the merged state
        y = layer(x[:2], lang=torch.tensor([2, 2]))
        torch.testing.assert_close(y, F.linear(x[:2], layer.base_layer.weight, layer.base_layer.bias))
        assert layer._decode_plan is None
        layer.unmerge()
        torch.testing.assert_close(layer(x, lang=routing), _expected(layer, x, ids), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="in_features=16"):
            layer(torch.randn(6, 15), lang=routing)
        assert layer._decode_plan is None
        layer(x, lang=routing)
        layer.double()
        x64 = x.double()
        torch.testing.assert_close(layer(x64, lang=routing), _expected(layer, x64, ids), atol=1e-10, rtol=1e-10)


def test_autocast_hands_fp32_factors_to_a_backend_that_takes_them(monkeypatch):
    """Under autocast, a backend with mixed_factors gets the fp32 master factors as they are (no
    cast, no cast backward); y and every gradient equal the cast path's, the factors' gradients
    being the fp32 values the cast path rounds to bf16."""
    import dataclasses

    from lslo_kernels import backends

    original = lslo_kernels.get_backend("reference")
    seen = []

    def spy(*args):
        seen.append((args[0].dtype, args[2].dtype, args[3].dtype))
        return original.forward(*args)

    x0 = torch.randn(2, 4, 16)
    ids = torch.tensor([0, 2])
    results = {}
    for mixed in (True, False):
        monkeypatch.setitem(backends._BACKENDS, "reference",
                            dataclasses.replace(original, forward=spy, mixed_factors=mixed))
        layer = _layer(backend="reference", learn_scales=True)
        seen.clear()
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, lang=ids)
        y.float().pow(2).sum().backward()
        factor_dtype = torch.float32 if mixed else torch.bfloat16
        assert seen == [(torch.bfloat16, factor_dtype, factor_dtype)]
        results[mixed] = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.scales.grad)
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])  # dx
    for name, i in (("dA", 2), ("dB", 3)):
        assert results[True][i].dtype == torch.float32
        assert torch.equal(results[True][i].bfloat16().float(), results[False][i]), name
    torch.testing.assert_close(results[True][4], results[False][4])


def test_decoding_with_staged_factors_follows_every_change_of_the_factors(monkeypatch):
    """A big enough layer on a backend with stage_factors decodes with factors staged once: equal to
    the per-call path, restaged after each in-place update of B, the mask, the scales or a new
    ``.data``, and not restaged while nothing changed."""
    if "cpp" not in lslo_kernels.available_backends("cpu"):
        pytest.skip("cpp not built")
    from lslo import layer as layer_mod

    layer = _layer(in_f=64, out_f=160, ranks=[2] * 16 + [8] * 14, backend="cpp", learn_scales=True)
    assert layer.lora_B.numel() >= layer_mod._STAGED_MIN_ENTRIES
    stagings = []
    real_stage = lslo_kernels.get_backend("cpp").stage_factors
    x = torch.randn(9, 64)
    ids = torch.tensor([0, 5, 29, -1, 5, 17, 3, 3, 20])

    def per_call():  # the same layer through the unstaged add_, in the decoding path's order
        with torch.no_grad():  # (LoRA term into the bias rows, then the base GEMM into them)
            out = layer.base_layer.bias.expand(9, 160).contiguous()
            lslo_kernels.get_backend("cpp").add_(out, x, layer.lora_A, layer.lora_B, layer.prune_mask,
                                                 layer.scales.detach(), layer.rank_offsets,
                                                 *(lambda r: (r.sorted_token_idx, r.lang_offsets))(
                                                     lslo_kernels.build_routing(ids, 30)), layer.max_rank)
            out.addmm_(x, layer.base_layer.weight.t())
            # and the same numbers, to rounding, as the base Linear followed by the LoRA term
            torch.testing.assert_close(out, _expected(layer, x, ids))
        return out

    def decode():
        layer._backend_for(x)  # resolve, then spy on the staging the layer holds
        layer._backend_staged = lambda *a: stagings.append(1) or real_stage(*a)
        with torch.no_grad():
            return layer(x, lang=ids)

    assert torch.equal(decode(), per_call()) and len(stagings) == 1
    assert torch.equal(decode(), per_call()) and len(stagings) == 1  # unchanged: reused
    with torch.no_grad():
        layer.lora_B.mul_(1.5)  # an optimizer-like in-place update
    assert torch.equal(decode(), per_call()) and len(stagings) == 2
    layer.set_prune_mask(keep=torch.rand_like(layer.lora_B) > 0.5)
    assert torch.equal(decode(), per_call()) and len(stagings) == 3
    with torch.no_grad():
        layer.scales[3] = 2.5
    assert torch.equal(decode(), per_call()) and len(stagings) == 4
    layer.lora_B.data = torch.randn_like(layer.lora_B)
    assert torch.equal(decode(), per_call()) and len(stagings) == 5
    layer.clear_decoding_cache()
    assert layer._staged is None
    assert torch.equal(decode(), per_call()) and len(stagings) == 6
    small = _layer(backend="cpp")  # below the size where staging pays: one call without staged factors
    small._backend_for(x[:, :16])
    assert small._backend_staged is None
    seen, real_decode = [], small._backend_decode
    small._backend_decode = lambda *args: seen.append(args[-1]) or real_decode(*args)
    with torch.no_grad():
        torch.testing.assert_close(small(x[:, :16], lang=ids % 3), _expected(small, x[:, :16], ids % 3))
    assert seen == [None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("widths", [{}, {"lora_out_features": 5, "lora_in_features": 9}])
@pytest.mark.parametrize("train_base", [False, True])
def test_cpp_training_uses_the_compiled_autograd_node(monkeypatch, bias, widths, train_base):
    """Training on cpp: a plain Linear base with full LoRA widths goes through the one op of the base
    Linear and the LoRA term (``Backend.linear``, autograd in C++); reduced widths take the C++ LoRA
    node after the base. Either way no Python custom op, and the reference's numbers, the base's
    weight and bias gradients included when they are trained."""
    if "cpp" not in lslo_kernels.available_backends("cpu"):
        pytest.skip("cpp not built")
    layers = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)
        layer = lslo.LSLoLinear(nn.Linear(16, 12, bias=bias), [2, 8, 3], backend=backend, learn_scales=True, **widths)
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.base_layer.requires_grad_(train_base)
        layers.append(layer)
    ref, fast = layers
    x = torch.randn(5, 16)
    ids = torch.tensor([0, 1, 2, -1, 1])
    fast._backend_for(x)
    calls, real = [], fast._backend_linear
    assert real is not None
    fast._backend_linear = lambda *args: calls.append(1) or real(*args)
    grads = []
    for layer in (ref, fast):
        if layer is fast:
            _forbid_custom_op(monkeypatch)
        xl = x.clone().requires_grad_(True)
        y = layer(xl, lang=ids)
        y.square().sum().backward()
        base = [p.grad for p in layer.base_layer.parameters()]
        grads.append((y.detach(), xl.grad, layer.lora_A.grad, layer.lora_B.grad, layer.scales.grad, *base))
    assert len(calls) == (0 if widths else 1)
    names = ("y", "dx", "dA", "dB", "dscales", "dweight", "dbias")
    for name, got, want in zip(names, grads[1], grads[0]):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- routing checks
def test_ids_are_checked_once_per_batch(monkeypatch):
    import lslo.context
    from lslo_kernels import routing

    calls = []
    real = routing.lang_id_range

    def counting(*ids):
        calls.append(len(ids))
        return real(*ids)

    monkeypatch.setattr(routing, "lang_id_range", counting)
    monkeypatch.setattr(lslo.context, "lang_id_range", counting)
    layers = [_layer(index=i, seed=s) for s, i in enumerate(("src", "src", "tgt", "tgt"))]
    src, tgt = torch.tensor([0, 1]), torch.tensor([2, -1])
    with lslo.route(src=src, tgt=tgt):
        for layer in layers:
            layer(torch.randn(2, 5, 16))
            layer(torch.randn(2, 16))  # another layout: another routing, no second check
    assert calls == [1, 1]  # one host read per index, at its first use
    calls.clear()
    with lslo.route(src=src, tgt=tgt, num_languages=3):
        for layer in layers:
            layer(torch.randn(2, 5, 16))
    assert calls == [2]  # both checked together where they entered, none in the layers
    with pytest.raises(ValueError, match=r"lslo.route\(tgt=...\) contains language id 3"), \
            lslo.route(src=src, tgt=torch.tensor([3, 0]), num_languages=3):
        pass


def test_precomputed_routing_can_be_passed():
    layer = _layer()
    x = torch.randn(6, 16)
    ids = torch.tensor([0, 1, 2, -1, 0, 1])
    r = lslo_kernels.route_tokens(ids, (6,), 3)
    torch.testing.assert_close(layer(x, lang=r), layer(x, lang=ids))
    with pytest.raises(ValueError, match="routing covers 6 tokens"):
        layer(torch.randn(5, 16), lang=r)
