"""Language tokens and lslo's sentence form ``[language token] pieces [eos]``, for every language a model has.

A multilingual translation tokenizer lists its languages in a table (``M2M100Tokenizer.lang_code_to_id``:
M2M-100's 100 codes). A model can have more: M2M-124 (``flores101_mm100_615M``) adds 24 languages
(kam, mt, ny, sn, te, ...) whose tokens ``__kam__`` sit in its vocabulary, outside a stock
tokenizer's table; NLLB tokenizers carry ``fra_Latn`` tokens as added tokens. The rules here:

- :func:`lang_token_id`: the table first; otherwise the ``__xx__`` token (M2M-100 style) for any
  code, or the code itself for a FLORES-200 code ``xxx_Xxxx`` (NLLB style), found in the vocabulary
  or the added tokens.
- :func:`encode_sentences`: lslo builds ``[lang] pieces [eos]`` itself from the pieces
  (``add_special_tokens=False``), so a language the tokenizer's table lacks is encoded without
  setting a ``src_lang`` the tokenizer would refuse. Where the tokenizer does know the language,
  its own form is checked once per call against lslo's (a tokenizer that puts the language token
  elsewhere, such as ``NllbTokenizer(legacy_behaviour=True)``, is refused).
- :func:`decode_ids`: text of generated ids without the language tokens
  (:func:`all_language_token_ids`), including those the tokenizer does not count as special (a
  vocabulary entry ``__kam__``; M2M100Tokenizer's own table tokens in transformers 5).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence

__all__ = ["all_language_token_ids", "decode_ids", "encode_sentences", "lang_token_id", "language_token_ids",
           "tokenizer_knows"]

# FLORES-200 / NLLB codes are their own token ("fra_Latn"); any other code is looked up as __xx__.
_NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_M2M_TOKEN = re.compile(r"^__[a-z]{2,3}__$")


def _table(tokenizer) -> Mapping[str, int] | None:
    table = getattr(tokenizer, "lang_code_to_id", None)
    return table if isinstance(table, Mapping) else None


def _vocab_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` in the vocabulary or the added tokens, None when it is absent (maps to unk)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        return None
    return token_id


def lang_token_id(tokenizer, code: str) -> int:
    """Id of the language token of ``code``.

    Args:
        tokenizer: an M2M-100 / NLLB tokenizer.
        code: an M2M-100 / M2M-124 code ("fr", "kam") or a FLORES-200 code ("fra_Latn").

    Returns:
        The tokenizer's table entry for ``code``; else the id of ``__code__`` or, for a FLORES-200
        code, of ``code`` itself, in the vocabulary or the added tokens.

    Raises:
        ValueError: the tokenizer has no token for that language.
    """
    if not isinstance(code, str):
        raise TypeError(f"a language code must be a str, got {type(code).__name__} {code!r}")
    table = _table(tokenizer)
    if table is not None and code in table:
        return int(table[code])
    candidates = [code, f"__{code}__"] if _NLLB_CODE.match(code) else [f"__{code}__"]
    for token in candidates:
        token_id = _vocab_id(tokenizer, token)
        if token_id is not None:
            return token_id
    known = f"; its table has {', '.join(sorted(table))}" if table else ""
    raise ValueError(f"the tokenizer has no language token for {code!r} (no table entry, no "
                     f"{' or '.join(repr(t) for t in candidates)} token){known}")


def language_token_ids(tokenizer, codes: Iterable[str]) -> dict[str, int]:
    """``{code: lang_token_id(tokenizer, code)}`` for the distinct ``codes``, in first-seen order."""
    return {code: lang_token_id(tokenizer, code) for code in dict.fromkeys(codes)}


def all_language_token_ids(tokenizer) -> frozenset[int]:
    """Ids of every language token the tokenizer has: its table, and the ``__xx__`` / ``xxx_Xxxx``
    tokens of its vocabulary and added tokens (what :func:`decode_ids` drops from generated text)."""
    ids = set((_table(tokenizer) or {}).values())
    for token, token_id in tokenizer.get_vocab().items():
        if _M2M_TOKEN.match(token) or _NLLB_CODE.match(token):
            ids.add(int(token_id))
    return frozenset(ids)


def tokenizer_knows(tokenizer, code: str) -> bool:
    """Whether ``tokenizer.src_lang = code`` is a language the tokenizer itself handles.

    True for a code in its table, or, for a tokenizer without a table (NLLB), a FLORES-200 code
    whose token it has; False for a token found only as an ``__xx__`` vocabulary entry.
    """
    table = _table(tokenizer)
    if table is not None:
        return code in table
    return bool(_NLLB_CODE.match(code)) and _vocab_id(tokenizer, code) is not None


def encode_sentences(tokenizer, code: str, sentences: Sequence[str], lang_id: int | None = None) -> list[list[int]]:
    """Token ids ``[lang] pieces [eos]`` of ``sentences`` in language ``code``, one tokenizer call.

    Args:
        tokenizer: an M2M-100 / NLLB tokenizer; its ``src_lang`` is left as found.
        code: the sentences' language.
        sentences: N sentences.
        lang_id: ``lang_token_id(tokenizer, code)`` when the caller has it.

    Returns:
        N id lists, each ``[lang_id, *pieces, eos_token_id]``.

    Raises:
        ValueError: no token for ``code``; or a tokenizer that knows ``code`` but whose own form
            (``src_lang = code``) differs from lslo's (checked on the first sentence).
    """
    lang_id = lang_token_id(tokenizer, code) if lang_id is None else lang_id
    eos = tokenizer.eos_token_id
    sentences = list(sentences)
    if not sentences:
        return []
    pieces = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    rows = [[lang_id, *row, eos] for row in pieces]
    if tokenizer_knows(tokenizer, code) and hasattr(tokenizer, "src_lang"):
        _check_own_form(tokenizer, code, sentences[0], rows[0])
    return rows


def _check_own_form(tokenizer, code: str, sentence: str, expected: list[int]) -> None:
    previous = tokenizer.src_lang
    try:
        tokenizer.src_lang = code
        own = tokenizer(sentence, add_special_tokens=True)["input_ids"]
    finally:
        if previous is not None:
            tokenizer.src_lang = previous
    if own != expected:
        raise ValueError(
            f"{type(tokenizer).__name__} encodes {sentence[:40]!r} ({code}) as {own[:3]}...{own[-3:]}: lslo needs "
            f"[language token {expected[0]}] pieces [eos {expected[-1]}] on both sides, as M2M100Tokenizer and "
            "NllbTokenizer (legacy_behaviour=False) give"
        )


def decode_ids(tokenizer, ids: Sequence[int], language_ids: Collection[int] = ()) -> str:
    """Text of generated ids, without special tokens and without any of ``language_ids``.

    Args:
        tokenizer: the tokenizer.
        ids: token ids (the forced language token may be among them).
        language_ids: language token ids to drop wherever they are (a set, for speed): those the
            tokenizer does not count as special (``__kam__`` as a vocabulary entry) are kept by
            ``skip_special_tokens`` alone.

    Returns:
        The decoded string.
    """
    if language_ids:
        ids = [i for i in ids if i not in language_ids]
    return tokenizer.decode(ids, skip_special_tokens=True)
