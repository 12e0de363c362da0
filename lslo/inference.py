"""Mixed-direction batched translation: one ``generate`` call per batch, whatever its directions.

Per batch of B sentences:

- sources are tokenized per source language as ``[language token] pieces [eos]``
  (:mod:`lslo.tokenization`) and padded together;
- ``lslo.route(src=(B,), tgt=(B,))`` routes every LSLo layer; beam search runs the encoder on B
  rows and the decoder on B * num_beams rows, sentence i owning rows ``i*num_beams ..
  (i+1)*num_beams - 1``. ``lslo.route`` repeats each id over its sentence's consecutive rows, and
  beam reordering only permutes rows inside a sentence's group, so the ids stay right all along;
- the first generated token is forced per row to the sentence's target-language token
  (:class:`ForcedLanguageTokens`), exactly what ``forced_bos_token_id`` does for a one-direction
  batch: the scores, lengths and length penalty of beam search are the same as translating each
  direction in its own batch.

Sentences are sorted by length before batching (less padding) and returned in input order.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from .config import LSLoConfig
from .context import route
from .model import get_lslo_config
from .tokenization import all_language_token_ids, decode_ids, encode_sentences, lang_token_id

__all__ = ["ForcedLanguageTokens", "encode_by_source", "lang_token_id", "translate"]


class ForcedLanguageTokens(LogitsProcessor):
    """Force each sentence's first generated token (its target-language token), per row.

    Args:
        token_ids: (B,) int64, the token to force for sentence i. The scores passed in have
            B * k rows (k = num_beams), sentence i owning k consecutive rows.
    """

    def __init__(self, token_ids: torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be (B,), got shape {tuple(token_ids.shape)}")
        self.token_ids = token_ids.to(torch.int64)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids: (B*k, cur_len); scores: (B*k, vocab). Acts only at cur_len == 1 (after decoder start)."""
        if input_ids.shape[-1] != 1:
            return scores
        rows, sentences = scores.shape[0], self.token_ids.shape[0]
        if rows % sentences:
            raise ValueError(f"{rows} score rows do not split into {sentences} sentences")
        per_row = self.token_ids.to(scores.device).repeat_interleave(rows // sentences)
        # As ForcedBOSTokenLogitsProcessor: every other token -inf, the forced one log-prob 0.
        forced = torch.full_like(scores, -math.inf)
        forced.scatter_(1, per_row[:, None], 0.0)
        return forced


def _per_sentence(values, n: int, name: str) -> list[str]:
    if isinstance(values, str):
        return [values] * n
    values = list(values)
    if any(not isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be language codes (str), got {values!r}")
    return values


def _encode_by_source(tokenizer, sentences: Sequence[str], src_langs: Sequence[str]) -> list[list[int]]:
    """Token ids ``[src lang] pieces [eos]`` of each sentence (lslo.tokenization's form), one tokenizer
    call per source language; the requests are grouped by language in one pass."""
    if not hasattr(tokenizer, "src_lang"):
        raise TypeError(f"{type(tokenizer).__name__} has no src_lang: not a multilingual translation tokenizer")
    by_language: dict[str, list[int]] = {}
    for i, lang in enumerate(src_langs):
        by_language.setdefault(lang, []).append(i)
    encoded: list[list[int] | None] = [None] * len(sentences)
    for lang, indices in by_language.items():
        for i, row in zip(indices, encode_sentences(tokenizer, lang, [sentences[i] for i in indices])):
            encoded[i] = row
    return encoded


# Public: the ids translate() feeds the model, for baselines that must see the same input (benchmarks/).
encode_by_source = _encode_by_source


def _truncate_inputs(encoded: list[list[int]], model: nn.Module, max_length: int | None) -> list[list[int]]:
    """Cut id lists longer than ``max_length`` (default: the model's positions), keeping the last id (EOS)."""
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not isinstance(max_length, int):
            return encoded
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_input_length must be an int >= 2, got {max_length!r}")
    long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if long:
        warnings.warn(f"translate: {len(long)} of {len(encoded)} input(s) longer than {max_length} tokens were "
                      f"truncated to {max_length} (--max-length)", stacklevel=3)
        for i in long:
            encoded[i] = encoded[i][: max_length - 1] + encoded[i][-1:]
    return encoded


def translate(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    src_langs: Sequence[str] | str,
    tgt_langs: Sequence[str] | str,
    *,
    num_beams: int = 5,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    config: LSLoConfig | None = None,
    progress: bool = True,
    return_token_ids: bool = False,
    max_input_length: int | None = None,
    input_ids: Sequence[Sequence[int]] | None = None,
    **generate_kwargs,
) -> list[str] | list[list[int]]:
    """Translate sentences of any mix of directions, one ``generate`` call per batch.

    Args:
        model: an M2M-100-architecture model, with LSLo (routed by ``config``, default the one
            :func:`lslo.apply_lslo` used) or without (plain multilingual translation).
        tokenizer: its tokenizer (M2M100Tokenizer, NLLB tokenizers); its ``src_lang`` is
            restored afterwards.
        sentences: N source sentences.
        src_langs, tgt_langs: N language codes each, or one code for all.
        num_beams: beam size (the paper uses 5).
        batch_size: sentences per ``generate`` call (after sorting by length).
        max_new_tokens: generated tokens per sentence at most, the language token included.
        progress: show a tqdm progress bar (sentences).
        return_token_ids: return the generated ids (language token first, trailing padding
            removed) instead of decoded text.
        max_input_length: source tokens per sentence at most (default: the model's
            ``max_position_embeddings``); longer inputs are cut there, keeping their final
            end-of-sentence token, with one warning counting them. With it, the memory one
            ``generate`` call takes is bounded by that of ``batch_size * num_beams`` rows of
            ``max_input_length`` source and ``max_new_tokens`` target tokens, whatever the input's length.
        input_ids: the sentences' ids, already ``[src lang] pieces [eos]``
            (:func:`lslo.tokenization.encode_sentences`): no tokenization here (evaluation
            tokenizes each test sentence once for all its directions).
        generate_kwargs: more ``generate`` options (length_penalty, no_repeat_ngram_size, ...).

    Returns:
        N translations (or id lists), in input order.
    """
    sentences, src_langs, tgt_langs = _checked_requests(sentences, src_langs, tgt_langs)
    n = len(sentences)
    for name, value in (("num_beams", num_beams), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("translate returns one translation per sentence: num_return_sequences must be 1")
    if config is None:
        config = get_lslo_config(model)
    # Every check before any compute: a bad code in line 10,000 must not cost the first 9,999.
    lang_tokens = {code: lang_token_id(tokenizer, code) for code in dict.fromkeys(src_langs + tgt_langs)}
    routes = (config.lang_ids(src_langs), config.lang_ids(tgt_langs)) if config is not None else None
    if input_ids is not None and len(input_ids) != n:
        raise ValueError(f"input_ids has {len(input_ids)} rows for {n} sentences")
    if n == 0:
        return []

    encoded = _encode_by_source(tokenizer, sentences, src_langs) if input_ids is None else list(input_ids)
    encoded = _truncate_inputs(encoded, model, max_input_length)
    forced = [lang_tokens[code] for code in tgt_langs]
    return _generate_all(model, tokenizer, encoded, forced, routes, batch_size=batch_size, num_beams=num_beams,
                         max_new_tokens=max_new_tokens, progress=progress, return_token_ids=return_token_ids,
                         language_ids=all_language_token_ids(tokenizer) | set(lang_tokens.values()),
                         generate_kwargs=generate_kwargs)


def _checked_requests(sentences, src_langs, tgt_langs) -> tuple[list[str], list[str], list[str]]:
    """(sentences, src_langs, tgt_langs) as N-long lists, each sentence checked to be a str."""
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, not one string")
    sentences = list(sentences)
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(f"sentences[{i}] must be a str, got {type(sentence).__name__} {sentence!r}"[:200])
    n = len(sentences)
    src_langs = _per_sentence(src_langs, n, "src_langs")
    tgt_langs = _per_sentence(tgt_langs, n, "tgt_langs")
    if not len(src_langs) == len(tgt_langs) == n:
        raise ValueError(f"sentences ({n}), src_langs ({len(src_langs)}) and tgt_langs ({len(tgt_langs)}) "
                         "must have the same length")
    return sentences, src_langs, tgt_langs


def _generate_all(model: nn.Module, tokenizer, encoded: list[list[int]], forced_ids: list[int], routes, *,
                  batch_size: int, num_beams: int, max_new_tokens: int, progress: bool, return_token_ids: bool,
                  language_ids: set[int], generate_kwargs) -> list:
    """The body of :func:`translate` once everything is checked: ``encoded`` (N source id lists) in
    batches of similar length, ``forced_ids`` the N target language tokens, ``routes`` the N source and
    target language ids of the LSLo config (None: no routing)."""
    from tqdm.auto import tqdm

    n = len(encoded)
    order = sorted(range(n), key=lambda i: -len(encoded[i]))  # longest first, stable
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    outputs: list = [None] * n
    was_training = model.training
    model.eval()  # dropout off: a translation must not depend on the batch it was in
    try:
        with torch.no_grad(), tqdm(total=n, unit="sent", disable=not progress, desc="translate") as bar:
            for start in range(0, n, batch_size):
                chunk = order[start : start + batch_size]
                inputs = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(device)
                forced = torch.tensor([forced_ids[i] for i in chunk], dtype=torch.int64)
                routing = (
                    route(src=routes[0][chunk].to(device), tgt=routes[1][chunk].to(device))
                    if routes is not None else contextlib.nullcontext()
                )
                with routing:
                    generated = model.generate(
                        input_ids=inputs["input_ids"],
                        attention_mask=inputs["attention_mask"],
                        num_beams=num_beams,
                        max_new_tokens=max_new_tokens,
                        logits_processor=LogitsProcessorList([ForcedLanguageTokens(forced)]),
                        forced_bos_token_id=None,  # ours forces per row; a global one would fight it
                        **generate_kwargs,
                    )
                for row, index in enumerate(chunk):
                    ids = generated[row, 1:].tolist()  # drop the decoder start token
                    while ids and ids[-1] == pad_id:
                        ids.pop()
                    # ids[0] is the forced language token: some tokenizers (M2M100Tokenizer in
                    # transformers 5) don't count it as special, nor a vocabulary entry such as
                    # __kam__, so skip_special_tokens alone would keep them.
                    outputs[index] = ids if return_token_ids else decode_ids(tokenizer, ids[1:], language_ids)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return outputs
