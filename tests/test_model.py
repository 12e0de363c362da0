"""LSLo on a live M2M-100: injection, routing through the whole model, PEFT equivalence, the
paper's parameter counts, adapter files, merging."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import lslo
from lslo import LSLoConfig, LSLoLinear
from tests.hf_fixtures import (
    encode_pairs,
    m2m124_config,
    make_sentences,
    randomize_adapters,
    tiny_model,
)

LANGS = ["en", "fr", "de", "oc"]  # groups H, H, H, V
RANKS = {"en": 2, "fr": 3, "de": 1, "oc": 8}
# A mixed batch: every sentence its own direction, lengths differ (padding on both sides).
SRC = ["en", "fr", "oc", "de", "en", "oc", "fr"]
TGT = ["fr", "oc", "en", "en", "de", "fr", "de"]


pytestmark = pytest.mark.usefixtures("hf_one_thread")


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def batch(tokenizer):
    sources = make_sentences(len(SRC), seed=1)
    targets = make_sentences(len(SRC), seed=2)
    return encode_pairs(tokenizer, sources, targets, SRC, TGT)


def lslo_model(base, seed=0, **config_overrides):
    config = LSLoConfig(**{"languages": LANGS, "ranks": RANKS, **config_overrides})
    model = lslo.apply_lslo(copy.deepcopy(base), config)
    randomize_adapters(model, seed=seed)
    return model


def sub_batch(batch, rows):
    """Rows of a padded batch, re-trimmed to their own longest sentence (different padding)."""
    out = {k: v[rows] for k, v in batch.items()}
    src_len = int(out["attention_mask"].sum(1).max())
    tgt_len = int((out["labels"] != -100).sum(1).max())
    return {"input_ids": out["input_ids"][:, :src_len], "attention_mask": out["attention_mask"][:, :src_len],
            "labels": out["labels"][:, :tgt_len]}


# ------------------------------------------------------------------ injection
def test_apply_wraps_the_papers_targets_with_the_learned_plan(base):
    model = lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=LANGS, ranks=RANKS))
    modules = lslo.lslo_modules(model)
    assert len(modules) == 2 * 5 + 2 * 8  # encoder q,k,v,fc1,fc2; decoder + cross q,k,v
    assert not any(name.endswith("out_proj") for name in modules)
    assert all(not name.endswith("lm_head") for name in modules)
    # 2-layer encoder: layer 0 source-indexed, layer 1 target-indexed; decoder target-indexed.
    for name, module in modules.items():
        expected = "src" if ".encoder.layers.0." in name else "tgt"
        assert module.index == expected, name
        assert module.ranks == (2, 3, 1, 8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_apply_is_idempotent_and_remove_restores_the_original_modules(base, batch):
    model = copy.deepcopy(base)
    model.model.shared.weight.requires_grad_(True)
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LSLoConfig(languages=LANGS, ranks=RANKS)
    lslo.apply_lslo(model, config)
    wrapped = lslo.lslo_modules(model)
    lslo.apply_lslo(model, LSLoConfig(languages=LANGS, ranks=RANKS))  # equal config: no-op
    assert lslo.lslo_modules(model) == wrapped
    with pytest.raises(ValueError, match="different config"):
        lslo.apply_lslo(model, LSLoConfig(languages=LANGS, ranks=4))
    lslo.remove_lslo(model)
    assert not lslo.lslo_modules(model) and lslo.get_lslo_config(model) is None
    for name, module in model.named_modules():
        if name in originals:
            assert module is originals[name], name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_flags
    lslo.remove_lslo(model)  # no-op
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)


def test_target_presets_and_bad_targets(base):
    fc = lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=LANGS, ranks=RANKS, target_modules="fc"))
    assert sorted({n.rsplit(".", 1)[1] for n in lslo.lslo_modules(fc)}) == ["fc1", "fc2"]
    attn = lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=LANGS, ranks=RANKS, target_modules="attn"))
    assert len(lslo.lslo_modules(attn)) == 2 * 3 + 2 * 6
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=LANGS, ranks=RANKS, target_modules=["nothing"]))
    with pytest.raises(ValueError, match="index_plan"):
        lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=LANGS, ranks=RANKS,
                                                        index_plan={"encoder": ["src"] * 3}))


# -------------------------------------------------------------------- routing
def test_zero_adapters_give_the_base_logits(base, batch):
    model = lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=LANGS, ranks=RANKS))
    with torch.no_grad():
        out = lslo.forward_with_langs(model, batch, SRC, TGT)
        torch.testing.assert_close(out.logits, base(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("ffn", ["full", "reference"])
def test_mixed_batch_equals_per_direction_batches(base, batch, ffn):
    model = lslo_model(base, ffn=ffn)
    with torch.no_grad():
        mixed = lslo.forward_with_langs(model, batch, SRC, TGT).logits
        assert not torch.allclose(mixed, base(**batch).logits)  # the adapters matter
        for direction in sorted(set(zip(SRC, TGT))):
            rows = [i for i, d in enumerate(zip(SRC, TGT)) if d == direction]
            part = sub_batch(batch, rows)
            with lslo.route(src=torch.tensor([LANGS.index(direction[0])] * len(rows)),
                            tgt=torch.tensor([LANGS.index(direction[1])] * len(rows))):
                alone = model(**part).logits
            for j, row in enumerate(rows):
                length = int((part["labels"][j] != -100).sum())
                torch.testing.assert_close(mixed[row, :length], alone[j, :length], rtol=1e-10, atol=1e-10)


def test_routing_follows_the_index_plan(base, batch):
    # A source-indexed encoder layer must change with the source language and ignore the target.
    model = lslo_model(base, index_plan={"encoder": ["src", "src"]},
                       target_modules=r".*encoder\.layers\.\d+\.fc1")
    with torch.no_grad():
        one = lslo.forward_with_langs(model, batch, SRC, TGT).logits
        other_tgt = lslo.forward_with_langs(model, batch, SRC, list(reversed(TGT))).logits
        other_src = lslo.forward_with_langs(model, batch, list(reversed(SRC)), TGT).logits
    torch.testing.assert_close(one, other_tgt, rtol=0, atol=0)
    assert not torch.allclose(one, other_src)


def test_loss_and_backward_through_the_routed_model(base, batch):
    model = lslo_model(base)
    model.train()
    present = sorted({LANGS.index(c) for c in SRC + TGT})
    out = lslo.forward_with_langs(model, batch, SRC, TGT)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    module = lslo.lslo_modules(model)["model.decoder.layers.0.fc1"]
    for lang_id in range(len(LANGS)):
        r0, r1 = module._span(lang_id)
        grad_norm = float(module.lora_B.grad[:, r0:r1].abs().sum())
        assert (grad_norm > 0) == (lang_id in present)
    # Same loss by a plain `with lslo.route(...)` block.
    with lslo.route(src=torch.tensor([LANGS.index(c) for c in SRC]), tgt=torch.tensor([LANGS.index(c) for c in TGT])):
        again = model(**batch).loss
    torch.testing.assert_close(again, out.loss)


def test_forward_with_langs_rejects_bad_ids(base, batch):
    model = lslo_model(base)
    with pytest.raises(ValueError, match="unknown language code 'xx'; this config knows en, fr, de, oc"):
        lslo.forward_with_langs(model, batch, ["xx"] * len(SRC), TGT)
    with pytest.raises(ValueError, match="7 sentences but src_lang_ids has 6"):
        lslo.forward_with_langs(model, batch, SRC[:6], TGT)
    with pytest.raises(ValueError, match="outside"):
        lslo.forward_with_langs(model, batch, [9] * len(SRC), TGT)
    with pytest.raises(ValueError, match="apply_lslo"):
        lslo.forward_with_langs(copy.deepcopy(base), batch, SRC, TGT)


def test_equals_peft_lora_with_adapter_names(base, batch):
    peft = pytest.importorskip("peft")
    model = lslo_model(base, index_plan="tgt", seed=3)
    peft_model = None
    for code in LANGS:
        lora_config = peft.LoraConfig(r=RANKS[code], lora_alpha=RANKS[code], lora_dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "fc1", "fc2"])
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(base), lora_config, adapter_name=code)
        else:
            peft_model.add_adapter(code, lora_config)
    modules = lslo.lslo_modules(model)
    peft_targets = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.endswith(("proj", "fc1", "fc2"))}
    assert {"base_model.model." + n for n in modules} == peft_targets
    with torch.no_grad():
        for name, module in modules.items():
            target = peft_model.get_submodule("base_model.model." + name)
            for lang_id, code in enumerate(LANGS):
                a, b, _ = module.language_factors(lang_id)
                target.lora_A[code].weight.copy_(a)
                target.lora_B[code].weight.copy_(b)
                assert target.scaling[code] == 1.0
    peft_model.eval()
    with torch.no_grad():
        ours = lslo.forward_with_langs(model, batch, SRC, TGT).logits
        theirs = peft_model(**batch, adapter_names=TGT).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ parameter counts
def _meta_model():
    from transformers import M2M100ForConditionalGeneration

    with torch.device("meta"):
        return M2M100ForConditionalGeneration(m2m124_config())


@pytest.mark.parametrize(
    "languages, ranks, targets, expected",
    [
        ("lang12", "2;2;8", "all", 15_335_424),  # Table 1: 2;2;8+WL, 15.3M
        ("lang12", "8;8;8", "all", 30_670_848),  # Table 1: 8;8;8+WL, 30.7M
        ("lang30", "2;2;8;8", "all", 46_006_272),  # Table 2: 2;2;8;8+WL, 46M
        ("lang12", "2;2;32", "fc", 14_155_776),  # Table 4: Only fc 2;2;32, 14.1M
    ],
)
def test_reference_ffn_reproduces_the_papers_parameter_counts(languages, ranks, targets, expected):
    model = lslo.apply_lslo(_meta_model(), LSLoConfig(languages=languages, ranks=ranks, target_modules=targets,
                                                      ffn="reference"))
    report = lslo.parameter_report(model)
    assert report["total"] == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(report["languages"].values()) == sum(report["module_types"].values()) == expected


def test_full_ffn_counts_a_full_width_lora():
    config = m2m124_config()
    lslo_config = LSLoConfig(languages="lang12", ranks="2;2;8", ffn="full")
    model = lslo.apply_lslo(_meta_model(), lslo_config)
    d, f = config.d_model, config.encoder_ffn_dim
    attn = d + d  # r * (in + out) per q/k/v
    ffn = (d + f) + (f + d)  # fc1 and fc2, full width
    per_rank = config.encoder_layers * (3 * attn + ffn) + config.decoder_layers * (6 * attn + ffn)
    expected = per_rank * sum(lslo_config.language_ranks)
    report = lslo.parameter_report(model)
    assert report["total"] == expected == 22_413_312
    assert report["groups"] == {"H": per_rank * 8, "M": per_rank * 8, "V": per_rank * 32}
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert report["base"] == base
    assert report["percent_of_base"] == pytest.approx(100 * expected / base)
    text = lslo.format_parameter_report(report)
    assert "22,413,312" in text and "decoder.encoder_attn.q_proj" in text and "oc" in text


# ---------------------------------------------------------------- adapter i/o
def test_save_load_round_trip(base, batch, tmp_path):
    model = lslo_model(base, seed=5, ffn="reference")
    module = lslo.lslo_modules(model)["model.encoder.layers.1.fc1"]
    mask = torch.rand(module.prune_mask.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    module.set_prune_mask(mask)
    lslo.save_adapters(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([lslo.model.ADAPTER_CONFIG_NAME, lslo.model.ADAPTER_WEIGHTS_NAME,
                                                   "README.md"])  # the model card
    meta = json.loads((tmp_path / lslo.model.ADAPTER_CONFIG_NAME).read_text())
    assert meta["base_model"]["d_model"] == 32 and meta["config"]["languages"] == LANGS

    fresh = copy.deepcopy(base)
    lslo.load_adapters(fresh, tmp_path)  # injects from the saved config
    assert lslo.get_lslo_config(fresh).to_dict() == lslo.get_lslo_config(model).to_dict()
    loaded = lslo.lslo_modules(fresh)["model.encoder.layers.1.fc1"]
    assert torch.equal(loaded.prune_mask, mask)
    with torch.no_grad():
        torch.testing.assert_close(lslo.forward_with_langs(fresh, batch, SRC, TGT).logits,
                                   lslo.forward_with_langs(model, batch, SRC, TGT).logits, rtol=0, atol=0)
    # Into a model already injected with the same layout: fine, and idempotent.
    lslo.load_adapters(fresh, tmp_path)
    lslo.save_adapters(model, tmp_path)  # overwrite in place, no temp file left behind
    assert len(os.listdir(tmp_path)) == 3  # config, tensors, model card


def test_load_refuses_adapters_of_another_model_or_language_list(tokenizer, base, tmp_path):
    lslo.save_adapters(lslo_model(base), tmp_path)
    wider = tiny_model(tokenizer, d_model=48)
    with pytest.raises(ValueError, match="different base model.*d_model: adapters 32, model 48"):
        lslo.load_adapters(wider, tmp_path)
    more_words = tiny_model(tokenizer, vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size"):
        lslo.load_adapters(more_words, tmp_path)
    other_langs = lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=["en", "fr", "de", "wo"],
                                                                  ranks={"en": 2, "fr": 3, "de": 1, "wo": 8}))
    with pytest.raises(ValueError, match=r"languages \['en', 'fr', 'de', 'oc'\].*\['en', 'fr', 'de', 'wo'\]"):
        lslo.load_adapters(other_langs, tmp_path)
    other_plan = lslo.apply_lslo(copy.deepcopy(base), LSLoConfig(languages=LANGS, ranks=RANKS, index_plan="src"))
    with pytest.raises(ValueError, match="index_plan"):
        lslo.load_adapters(other_plan, tmp_path)
    # A tensor file that doesn't cover the model's modules: refused, and the model left without LSLo.
    from safetensors.torch import load_file, save_file

    weights = tmp_path / lslo.model.ADAPTER_WEIGHTS_NAME
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if ".decoder.layers.1.fc2." not in k}, weights)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"do not match.*missing \['model.decoder.layers.1.fc2.lora_A'"):
        lslo.load_adapters(fresh, tmp_path)
    assert lslo.get_lslo_config(fresh) is None and not lslo.lslo_modules(fresh)
    with pytest.raises(ValueError, match="holds no LSLo adapters"):
        lslo.load_adapters(copy.deepcopy(base), tmp_path / "missing")
    with pytest.raises(ValueError, match="apply_lslo"):
        lslo.save_adapters(copy.deepcopy(base), tmp_path / "plain")


# -------------------------------------------------------------------- merging
@pytest.mark.parametrize("ffn", ["full", "reference"])
def test_merge_direction_gives_a_plain_model(base, batch, tmp_path, ffn):
    from transformers import M2M100ForConditionalGeneration

    model = lslo_model(base, seed=7, ffn=ffn)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    merged = lslo.merge_direction(model, "oc", "fr")
    assert not lslo.lslo_modules(merged) and lslo.get_lslo_config(merged) is None
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # the original is untouched
    rows = [i for i in range(len(SRC))]
    with torch.no_grad():
        routed = lslo.forward_with_langs(model, batch, ["oc"] * len(rows), ["fr"] * len(rows)).logits
        plain = merged(**batch).logits
    torch.testing.assert_close(plain, routed, rtol=1e-10, atol=1e-10)
    merged.save_pretrained(tmp_path)
    reloaded = M2M100ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, plain, rtol=0, atol=0)


# ------------------------------------------------- LSLoLinear reduced widths
@pytest.mark.parametrize("widths", [{"lora_out_features": 5}, {"lora_in_features": 3}, {}])
def test_reduced_width_layer_equals_its_padded_delta(widths):
    """ffn="reference" relies on LoRA over a slice: y = base(x) + x @ delta_l^T with delta_l zero
    outside the adapted (lora_out, lora_in) block; gradients only reach the factors."""
    torch.manual_seed(0)
    layer = LSLoLinear(nn.Linear(8, 12, dtype=torch.float64), [2, 3], **widths)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    lang = torch.tensor([1, -1, 0])
    y = layer(x, lang=lang)
    for row, lang_id in enumerate(lang.tolist()):
        delta = layer.delta_weight(lang_id) if lang_id >= 0 else torch.zeros(12, 8, dtype=torch.float64)
        torch.testing.assert_close(y[row], layer.base_layer(x[row]) + x[row] @ delta.t())
    lora_in, lora_out = widths.get("lora_in_features", 8), widths.get("lora_out_features", 12)
    assert layer.delta_weight(0)[lora_out:].abs().sum() == 0 and layer.delta_weight(0)[:, lora_in:].abs().sum() == 0
    y.sum().backward()
    assert layer.lora_A.grad.shape == (5, lora_in) and layer.lora_B.grad.shape == (lora_out, 5)
    assert layer.base_layer.weight.grad is None and x.grad is not None
    weight = layer.base_layer.weight.clone()
    layer.merge(1)
    torch.testing.assert_close(layer(x[0:1]), y[0:1])
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight)


def test_reduced_widths_are_validated_and_meta_friendly():
    with pytest.raises(ValueError, match="lora_out_features = 13 must be in \\[1, 12\\]"):
        LSLoLinear(nn.Linear(8, 12), [2], lora_out_features=13)
    with pytest.raises(TypeError, match="lora_in_features"):
        LSLoLinear(nn.Linear(8, 12), [2], lora_in_features=2.0)
    with torch.device("meta"):
        base = nn.Linear(1024, 4096)
    layer = LSLoLinear(base, [2, 8], lora_out_features=1024, init="reference")
    assert layer.lora_B.shape == (1024, 10) and layer.lora_A.is_meta
    assert "lora_out_features=1024" in repr(layer) and "mask_density=n/a" in repr(layer)
