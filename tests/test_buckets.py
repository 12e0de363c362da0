"""Static batch shapes (``--pad-to-multiple`` / ``--length-buckets``): the budget, the ids, the shapes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lslo.data import ParallelExample, ShapeBuckets, collate, encode_examples, make_batches, pad_to_bucket
from tests.hf_fixtures import make_sentences


@pytest.fixture(scope="module")
def corpus(tokenizer):
    sources = make_sentences(60, seed=3, max_words=9)
    targets = make_sentences(60, seed=4, max_words=9)
    directions = [("en", "fr"), ("fr", "en"), ("en", "de")]
    examples = [ParallelExample(*directions[i % 3], s, t) for i, (s, t) in enumerate(zip(sources, targets))]
    return examples, encode_examples(tokenizer, examples)


def test_parse_and_padded_length():
    assert ShapeBuckets.parse() is None
    buckets = ShapeBuckets.parse(8, "16,32")
    assert buckets == ShapeBuckets(8, (16, 32))
    assert [buckets.padded_length(n) for n in (1, 16, 17, 32, 33, 41)] == [16, 16, 32, 32, 40, 48]
    assert ShapeBuckets.parse(pad_to_multiple=5).padded_length(11) == 15
    assert ShapeBuckets(1, (16, 32)).max_shapes(None) == 4
    assert ShapeBuckets(8, (16, 32)).max_shapes(64) == 2 * (2 + 4)  # 40, 48, 56, 64 past the buckets
    assert ShapeBuckets(8, ()).max_shapes(64) == 2 * 8
    assert ShapeBuckets(8, ()).max_shapes(None) is None
    for bad in ({"pad_to_multiple": 0}, {"length_buckets": "32,16"}, {"length_buckets": "a,b"},
                {"length_buckets": "8,8"}):
        with pytest.raises(ValueError):
            ShapeBuckets.parse(**bad)


@pytest.mark.parametrize("buckets", [ShapeBuckets(8, ()), ShapeBuckets(1, (8, 16, 24)), ShapeBuckets(4, (12,))])
def test_bucketed_batches_respect_the_budget_and_carry_the_right_ids(tokenizer, corpus, buckets):
    examples, encoded = corpus
    max_tokens = 96
    plain = make_batches(encoded, max_tokens=max_tokens, epoch=2, seed=7, temperature=1.0)
    batches = make_batches(encoded, max_tokens=max_tokens, epoch=2, seed=7, temperature=1.0, buckets=buckets)
    # The same examples, each as often as without buckets.
    assert Counter(i for b in batches for i in b) == Counter(i for b in plain for i in b)
    shapes = Counter()
    for batch in batches:
        out = pad_to_bucket(collate(encoded, batch, pad_token_id=tokenizer.pad_token_id, languages=("en", "fr", "de")),
                            buckets, tokenizer.pad_token_id)
        rows, length = out["input_ids"].shape
        assert out["labels"].shape == out["attention_mask"].shape == (rows, length)
        assert rows * length <= max_tokens  # the budget counts the padded shape
        longest = max(int(encoded.src_lengths[i]) for i in batch) if batch else 0
        assert length == buckets.padded_length(max(longest, max(int(encoded.tgt_lengths[i]) for i in batch)))
        shapes[rows, length] += 1
        for row, index in enumerate(batch):
            n_src = int(out["attention_mask"][row].sum())
            assert n_src == int(encoded.src_lengths[index])
            assert out["input_ids"][row, n_src:].eq(tokenizer.pad_token_id).all()
            labels = out["labels"][row]
            assert int((labels != -100).sum()) == int(encoded.tgt_lengths[index])
            assert ("en", "fr", "de")[out["src_lang_ids"][row]] == examples[index].src_lang
            assert ("en", "fr", "de")[out["tgt_lang_ids"][row]] == examples[index].tgt_lang
    # A small fixed set of shapes: per padded length one full batch size, plus at most one remainder.
    per_length = Counter(length for _rows, length in shapes)
    assert all(count <= 2 for count in per_length.values())


def test_bucket_that_does_not_fit_the_budget(corpus):
    _examples, encoded = corpus
    longest = int(torch.maximum(encoded.src_lengths, encoded.tgt_lengths).max())
    with pytest.raises(ValueError, match="pads to"):
        make_batches(encoded, max_tokens=longest, epoch=1, seed=0, buckets=ShapeBuckets(1, (longest + 1,)))
