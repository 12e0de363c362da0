"""Mixed-direction batched translation: one generate call per batch must give, sentence by
sentence, what each direction gives in its own batch (greedy and beam search)."""

from __future__ import annotations

import copy

import pytest
import torch

import lslo
from lslo import LSLoConfig
from lslo.inference import ForcedLanguageTokens
from tests.hf_fixtures import (
    make_sentences,
    randomize_adapters,
    tiny_model,
)

LANGS = ["en", "fr", "de", "oc", "wo"]
# 10 sentences over 8 directions, lengths 2..12 words: padding on the encoder side, and
# beams finishing at different steps on the decoder side.
SRC = ["en", "fr", "oc", "de", "en", "wo", "fr", "oc", "de", "en"]
TGT = ["fr", "oc", "en", "wo", "de", "fr", "de", "en", "wo", "fr"]
MAX_NEW = 12


pytestmark = pytest.mark.usefixtures("hf_one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    model = lslo.apply_lslo(tiny_model(tokenizer, seed=1), LSLoConfig(languages=LANGS, ranks="2;8"))
    randomize_adapters(model, seed=2, std=1.0)
    return model


@pytest.fixture(scope="module")
def sentences():
    return make_sentences(len(SRC), seed=11)


def per_direction(model, tokenizer, sentences, num_beams, **kwargs):
    """Translate each direction in its own lslo.translate call; results in input order."""
    out = [None] * len(sentences)
    for direction in dict.fromkeys(zip(SRC, TGT)):
        rows = [i for i, d in enumerate(zip(SRC, TGT)) if d == direction]
        got = lslo.translate(model, tokenizer, [sentences[i] for i in rows], direction[0], direction[1],
                             num_beams=num_beams, max_new_tokens=MAX_NEW, progress=False, return_token_ids=True,
                             **kwargs)
        for i, ids in zip(rows, got):
            out[i] = ids
    return out


@pytest.mark.parametrize("num_beams", [1, 5])
def test_mixed_batch_equals_one_batch_per_direction(model, tokenizer, sentences, num_beams):
    mixed = lslo.translate(model, tokenizer, sentences, SRC, TGT, num_beams=num_beams, max_new_tokens=MAX_NEW,
                           progress=False, return_token_ids=True)
    assert mixed == per_direction(model, tokenizer, sentences, num_beams)
    assert [ids[0] for ids in mixed] == [tokenizer.get_lang_id(t) for t in TGT]
    assert len({tuple(ids[1:]) for ids in mixed}) > len(mixed) // 2  # outputs differ: the test has teeth


@pytest.mark.parametrize("num_beams", [1, 5])
def test_mixed_batch_equals_hf_forced_bos_generation(model, tokenizer, sentences, num_beams):
    """The reference is transformers' own one-direction path: forced_bos_token_id in generate."""
    mixed = lslo.translate(model, tokenizer, sentences, SRC, TGT, num_beams=num_beams, max_new_tokens=MAX_NEW,
                           progress=False, return_token_ids=True)
    config = lslo.get_lslo_config(model)
    for direction in dict.fromkeys(zip(SRC, TGT)):
        rows = [i for i, d in enumerate(zip(SRC, TGT)) if d == direction]
        tokenizer.src_lang = direction[0]
        inputs = tokenizer([sentences[i] for i in rows], return_tensors="pt", padding=True)
        src_ids, tgt_ids = (torch.full((len(rows),), config.lang_id(code)) for code in direction)
        with torch.no_grad(), lslo.route(src=src_ids, tgt=tgt_ids):
            out = model.generate(**inputs, num_beams=num_beams, max_new_tokens=MAX_NEW,
                                 forced_bos_token_id=tokenizer.get_lang_id(direction[1]))
        for j, i in enumerate(rows):
            expected = out[j, 1:].tolist()
            while expected and expected[-1] == tokenizer.pad_token_id:
                expected.pop()
            assert mixed[i] == expected, (i, direction)


def test_routing_changes_translations(model, tokenizer, sentences):
    plain = lslo.remove_lslo(copy.deepcopy(model))
    with_adapters = lslo.translate(model, tokenizer, sentences, SRC, TGT, num_beams=1, max_new_tokens=MAX_NEW,
                                   progress=False)
    without = lslo.translate(plain, tokenizer, sentences, SRC, TGT, num_beams=1, max_new_tokens=MAX_NEW,
                             progress=False)  # a model without LSLo translates too (no routing)
    assert with_adapters != without


def test_beam_reordering_stays_inside_each_sentences_rows(model, tokenizer, sentences, monkeypatch):
    """Routing ids are per sentence, repeated over its num_beams consecutive rows: they stay right
    only if every cache reorder maps a row to a row of the same sentence."""
    from transformers.cache_utils import EncoderDecoderCache

    num_beams, seen = 5, []
    original = EncoderDecoderCache.reorder_cache

    def recording(self, beam_idx):
        seen.append(beam_idx.clone())
        return original(self, beam_idx)

    monkeypatch.setattr(EncoderDecoderCache, "reorder_cache", recording)
    lslo.translate(model, tokenizer, sentences, SRC, TGT, num_beams=num_beams, max_new_tokens=MAX_NEW, progress=False)
    assert seen, "beam search never reordered its cache"
    rows = torch.arange(len(sentences) * num_beams)
    assert any(not torch.equal(idx, rows) for idx in seen)  # beams really moved
    for beam_idx in seen:
        assert torch.equal(beam_idx // num_beams, rows // num_beams)


def test_order_is_restored_across_batches(model, tokenizer, sentences):
    one_batch = lslo.translate(model, tokenizer, sentences, SRC, TGT, num_beams=2, max_new_tokens=MAX_NEW,
                               progress=False)
    small_batches = lslo.translate(model, tokenizer, sentences, SRC, TGT, num_beams=2, max_new_tokens=MAX_NEW,
                                   batch_size=3, progress=False)
    assert small_batches == one_batch and all(isinstance(t, str) for t in one_batch)


def test_one_code_for_all_and_empty_input(model, tokenizer, sentences):
    both = lslo.translate(model, tokenizer, sentences[:3], "en", "fr", num_beams=1, max_new_tokens=4, progress=False)
    listed = lslo.translate(model, tokenizer, sentences[:3], ["en"] * 3, ["fr"] * 3, num_beams=1, max_new_tokens=4,
                            progress=False)
    assert both == listed
    assert lslo.translate(model, tokenizer, [], [], [], progress=False) == []


def test_bad_inputs(model, tokenizer, sentences):
    tokenizer.src_lang = "de"
    with pytest.raises(ValueError, match="unknown language code 'ja'; this config knows en, fr, de, oc, wo"):
        lslo.translate(model, tokenizer, sentences[:2], ["en", "ja"], ["fr", "fr"], progress=False)
    with pytest.raises(ValueError, match="sentences \\(2\\), src_langs \\(1\\) and tgt_langs \\(2\\)"):
        lslo.translate(model, tokenizer, sentences[:2], ["en"], ["fr", "fr"], progress=False)
    with pytest.raises(ValueError, match="num_beams"):
        lslo.translate(model, tokenizer, sentences[:2], "en", "fr", num_beams=0, progress=False)
    with pytest.raises(TypeError, match="list of strings"):
        lslo.translate(model, tokenizer, "one sentence", "en", "fr", progress=False)
    assert tokenizer.src_lang == "de"  # left as found


def test_language_the_tokenizer_lacks(tokenizer):
    # Kamba is in the paper's lang30 (M2M-124) but not among M2M-100's 100 language tokens.
    model = lslo.apply_lslo(tiny_model(tokenizer), LSLoConfig(languages=["en", "kam"], ranks=2))
    with pytest.raises(ValueError, match="no language token for 'kam'"):
        lslo.translate(model, tokenizer, ["Kasa."], ["en"], ["kam"], progress=False)
    with pytest.raises(ValueError, match="no language token for 'xx'"):
        lslo.lang_token_id(tokenizer, "xx")


def test_forced_language_tokens_per_row():
    processor = ForcedLanguageTokens(torch.tensor([4, 7]))
    scores = torch.randn(6, 10)  # 2 sentences x 3 beams
    forced = processor(torch.zeros(6, 1, dtype=torch.long), scores)
    assert forced.argmax(-1).tolist() == [4, 4, 4, 7, 7, 7]
    assert torch.isinf(forced).sum() == 6 * 9 and (forced.max(-1).values == 0).all()
    later = processor(torch.zeros(6, 2, dtype=torch.long), scores)
    assert later is scores  # only the first generated token is forced


def test_benchmark_providers_run(tokenizer):
    """Smoke test of benchmarks/bench_translate.py: 30 distinct directions, every provider runs."""
    from benchmarks import bench_translate

    directions = bench_translate._directions(["en", "fr", "de", "oc", "wo", "zh"], 30)
    assert len(set(directions)) == 30 and all(s != t for s, t in directions)
    case = bench_translate._Case("smoke", sentences_per_direction=1, max_new_tokens=2, reps=1, big=False)
    _base, providers, n, note = bench_translate._build(case, tokenizer, log=lambda msg: None)
    assert n == 30 and "30 directions" in note
    assert {"base", "lslo_mixed", "lslo_per_direction"} <= set(providers)
    for run_provider in providers.values():
        run_provider()
