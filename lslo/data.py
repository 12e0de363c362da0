"""Training data: FLORES / TSV corpora -> token ids -> mixed-direction batches under a token budget.

The pipeline, one stage per function:

1. Sentences. :func:`load_flores` reads FLORES-101 (``dev/<iso>.dev``, ``devtest/<iso>.devtest``;
   M2M-100 / M2M-124 codes are mapped to file names by :data:`FLORES101_CODES`) or FLORES-200
   (``dev/fra_Latn.dev``; a code of that form names its own file). :func:`multiway_examples` turns
   a multi-way parallel set into every requested direction without copying a sentence;
   :func:`read_tsv_corpus` reads ``src_lang<TAB>tgt_lang<TAB>source<TAB>target`` lines for corpora
   that are not multi-way parallel.
2. Token ids. :func:`encode_examples` tokenizes as :func:`lslo.translate` does: a sentence of
   language ``l`` becomes ``[l's language token] pieces [eos]`` (:mod:`lslo.tokenization`), with
   one tokenizer call per language. That form is the source (``src_lang = l``) and also the label sequence when ``l`` is
   the target: the model's ``shift_tokens_right`` then feeds the decoder ``[eos, l's token,
   pieces]``, which is exactly what beam search with the forced language token sees. A sentence is
   tokenized once and shared by every direction it appears in (lang12 dev: 12 x 997 calls' worth
   of text, not 132 x 997).
3. Batches. :func:`make_batches` draws an epoch by temperature sampling over directions (fairseq's
   ``translation_multi_simple_epoch`` words: ``p_d ~ (n_d / N) ** (1 / T)``), sorts by length and
   cuts batches under ``max_tokens`` (padded tokens ``max(len) * n`` of the longer side), then
   shuffles the batch order. Everything random comes from a generator seeded by ``(seed, epoch)``,
   so every process of a distributed run builds the same list and shards it.
4. Tensors. :func:`collate` pads one batch and gives the per-sentence language ids
   ``lslo.route(src=..., tgt=...)`` needs.

A run on the paper's lang12 set::

    languages = resolve_languages("lang12", tokenizer=tokenizer, flores_dir=flores_dir)
    texts = load_flores(flores_dir, languages, "dev")
    corpus = encode_examples(tokenizer, multiway_examples(texts, all_directions(languages)))
    for indices in make_batches(corpus, max_tokens=4096, epoch=1, seed=0):
        batch = collate(corpus, indices, pad_token_id=tokenizer.pad_token_id, languages=languages)
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .config import LANGUAGE_SETS
from .tokenization import encode_sentences, lang_token_id

__all__ = [
    "FLORES101_CODES",
    "FLORES_SPLITS",
    "M2M124_CODES",
    "Batches",
    "EncodedCorpus",
    "MultiwayExamples",
    "ParallelExample",
    "ShapeBuckets",
    "all_directions",
    "bucketed_batches",
    "collate",
    "direction_sample_counts",
    "encode_examples",
    "flores_corpus",
    "flores_file",
    "flores_stem",
    "load_flores",
    "make_batches",
    "multiway_examples",
    "pad_to_bucket",
    "read_tsv_corpus",
    "resolve_languages",
    "sampling_probabilities",
]

FLORES_SPLITS = ("dev", "devtest")

# M2M-100 / M2M-124 code -> FLORES-101 file stem, all 101 languages that have an M2M code (the
# codes are those of fairseq's examples/flores101 table for flores101_mm100_615M/175M). The
# release's 102nd file, zho_trad, has no code of its own: M2M's "zh" is evaluated on zho_simpl.
# Not one-to-one by ISO rule: no -> nob (Bokmal), ku -> ckb (Sorani), ff -> ful, or -> ory,
# ms -> msa, ne -> npi, fa -> fas, sw -> swh, az -> azj, ns -> nso, om -> orm, zh -> zho_simpl.
FLORES101_CODES: dict[str, str] = {
    "af": "afr", "am": "amh", "ar": "ara", "as": "asm", "ast": "ast", "az": "azj", "be": "bel", "bg": "bul",
    "bn": "ben", "bs": "bos", "ca": "cat", "ceb": "ceb", "cs": "ces", "cy": "cym", "da": "dan", "de": "deu",
    "el": "ell", "en": "eng", "es": "spa", "et": "est", "fa": "fas", "ff": "ful", "fi": "fin", "fr": "fra",
    "ga": "gle", "gl": "glg", "gu": "guj", "ha": "hau", "he": "heb", "hi": "hin", "hr": "hrv", "hu": "hun",
    "hy": "hye", "id": "ind", "ig": "ibo", "is": "isl", "it": "ita", "ja": "jpn", "jv": "jav", "ka": "kat",
    "kam": "kam", "kea": "kea", "kk": "kaz", "km": "khm", "kn": "kan", "ko": "kor", "ku": "ckb", "ky": "kir",
    "lb": "ltz", "lg": "lug", "ln": "lin", "lo": "lao", "lt": "lit", "luo": "luo", "lv": "lav", "mi": "mri",
    "mk": "mkd", "ml": "mal", "mn": "mon", "mr": "mar", "ms": "msa", "mt": "mlt", "my": "mya", "ne": "npi",
    "nl": "nld", "no": "nob", "ns": "nso", "ny": "nya", "oc": "oci", "om": "orm", "or": "ory", "pa": "pan",
    "pl": "pol", "ps": "pus", "pt": "por", "ro": "ron", "ru": "rus", "sd": "snd", "sk": "slk", "sl": "slv",
    "sn": "sna", "so": "som", "sr": "srp", "sv": "swe", "sw": "swh", "ta": "tam", "te": "tel", "tg": "tgk",
    "th": "tha", "tl": "tgl", "tr": "tur", "uk": "ukr", "umb": "umb", "ur": "urd", "uz": "uzb", "vi": "vie",
    "wo": "wol", "xh": "xho", "yo": "yor", "zh": "zho_simpl", "zu": "zul",
}
_STEM_TO_CODE = {stem: code for code, stem in FLORES101_CODES.items()}

# The language codes of M2M-124 (flores101_mm100_615M): M2M-100's 100 and the 24 the FLORES-101
# work added. Used to tell a typo from a real code when no tokenizer is at hand.
M2M124_CODES: tuple[str, ...] = (
    "af", "am", "ar", "as", "ast", "ay", "az", "ba", "be", "bg", "bn", "br", "bs", "ca", "ceb", "cjk", "cs", "cy",
    "da", "de", "dyu", "el", "en", "es", "et", "fa", "ff", "fi", "fr", "fy", "ga", "gd", "gl", "gu", "ha", "he",
    "hi", "hr", "ht", "hu", "hy", "id", "ig", "ilo", "is", "it", "ja", "jv", "ka", "kac", "kam", "kea", "kg", "kk",
    "km", "kmb", "kmr", "kn", "ko", "ku", "ky", "lb", "lg", "ln", "lo", "lt", "luo", "lv", "mg", "mi", "mk", "ml",
    "mn", "mr", "ms", "mt", "my", "ne", "nl", "no", "ns", "ny", "oc", "om", "or", "pa", "pl", "ps", "pt", "qu",
    "ro", "ru", "sd", "shn", "si", "sk", "sl", "sn", "so", "sq", "sr", "ss", "su", "sv", "sw", "ta", "te", "tg",
    "th", "ti", "tl", "tn", "tr", "uk", "umb", "ur", "uz", "vi", "wo", "xh", "yi", "yo", "zh", "zu",
)
_M2M124 = frozenset(M2M124_CODES)
# FLORES-200 / NLLB names: ISO 639-3 + "_" + ISO 15924 script ("fra_Latn", "zho_Hans").
_FLORES200_PATTERN = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_TSV_HEADER = ("src_lang", "tgt_lang", "source", "target")
# Sentences per tokenizer call: bounds the memory of one call on a large TSV corpus; a FLORES
# language (997 / 1012 lines) is always one call.
_ENCODE_CHUNK = 50_000


# ----------------------------------------------------------------------------- language codes
def _flores200_codes() -> frozenset[str]:
    try:
        from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES
    except ImportError:  # an older/newer transformers: fall back on the pattern alone
        return frozenset()
    return frozenset(FAIRSEQ_LANGUAGE_CODES)


def _close_matches(code: str, candidates: Iterable[str]) -> str:
    candidates = sorted(set(candidates))
    matches = difflib.get_close_matches(code, candidates, n=6, cutoff=0.5)
    if not matches and code.lower() != code:
        matches = difflib.get_close_matches(code.lower(), candidates, n=6, cutoff=0.5)
    return f"; close matches: {', '.join(matches)}" if matches else ""


def _unknown_code_message(code: str, what: str = "language code") -> str:
    hint = ""
    if code in _STEM_TO_CODE:
        hint = f"; {code!r} is a FLORES-101 file name, its M2M code is {_STEM_TO_CODE[code]!r}"
    elif code == "zho_trad":
        hint = "; FLORES-101's zho_trad has no M2M code (M2M's 'zh' is zho_simpl)"
    elif code in LANGUAGE_SETS or code == "all":
        hint = f"; {code!r} is a language set: pass it alone, not inside a list"
    known = [*M2M124_CODES, *LANGUAGE_SETS, "all"]
    if "_" in code:
        known = sorted(_flores200_codes())
    return (f"unknown {what} {code!r} (expected an M2M-100/M2M-124 code such as 'fr', a FLORES-200 code "
            f"such as 'fra_Latn', or a set: {', '.join(LANGUAGE_SETS)}, all){hint or _close_matches(code, known)}")


def _check_code(code) -> str:
    """``code`` if it is an M2M-124 or FLORES-200 code, else ValueError with close matches."""
    if not isinstance(code, str):
        raise TypeError(f"a language code must be a str, got {type(code).__name__} {code!r}")
    if code in _M2M124:
        return code
    if _FLORES200_PATTERN.match(code):
        known = _flores200_codes()
        if not known or code in known:
            return code
    raise ValueError(_unknown_code_message(code))


def flores_stem(code: str) -> str:
    """FLORES file stem of a language code: ``"fr" -> "fra"``, ``"zh" -> "zho_simpl"``, ``"fra_Latn" -> "fra_Latn"``.

    Args:
        code: an M2M-100 / M2M-124 code of one of FLORES-101's languages, or a FLORES-200 code.

    Returns:
        The file name without the split suffix (``dev/<stem>.dev``).

    Raises:
        ValueError: the code names no FLORES language (the message lists close matches).
    """
    if not isinstance(code, str):
        raise TypeError(f"a language code must be a str, got {type(code).__name__} {code!r}")
    if code in FLORES101_CODES:
        return FLORES101_CODES[code]
    if _FLORES200_PATTERN.match(code):
        return _check_code(code)
    if code in _M2M124:
        raise ValueError(f"language {code!r} is an M2M-124 language but not one of FLORES-101's: no FLORES file for "
                         "it (use a TSV corpus)")
    raise ValueError(_unknown_code_message(code))


def _tokenizer_codes(tokenizer) -> list[str]:
    table = getattr(tokenizer, "lang_code_to_id", None)
    if isinstance(table, Mapping):
        return list(table)
    return [t for t in getattr(tokenizer, "additional_special_tokens", None) or [] if isinstance(t, str)]


def _language_token_ids(tokenizer, codes: Iterable[str]) -> dict[str, int]:
    """Language token id of every code; one ValueError listing all codes the tokenizer lacks."""
    ids, missing = {}, []
    for code in dict.fromkeys(codes):
        try:
            ids[code] = lang_token_id(tokenizer, code)
        except ValueError:
            missing.append(code)
    if missing:
        known = _tokenizer_codes(tokenizer)
        described = []
        for code in missing:
            close = difflib.get_close_matches(code, sorted(known), n=3, cutoff=0.5)
            described.append(f"{code!r} (close: {', '.join(close)})" if close else repr(code))
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no language token for {', '.join(described)}; "
            "M2M-100's tokenizer lacks languages that M2M-124 added (kam, mt, ny, sn, ...): use the M2M-124 model "
            "facebook/flores101_mm100_615M, or drop those languages"
        )
    return ids


# ----------------------------------------------------------------------------- FLORES files
def _check_flores_layout(flores_dir, split: str) -> Path:
    if split not in FLORES_SPLITS:
        raise ValueError(f"FLORES split must be one of {FLORES_SPLITS}, got {split!r}")
    if not isinstance(flores_dir, (str, os.PathLike)):
        raise TypeError(f"flores_dir must be a path, got {type(flores_dir).__name__}")
    root = Path(flores_dir)
    if not root.exists():
        raise ValueError(f"FLORES directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"FLORES directory {str(root)!r} is not a directory")
    split_dir = root / split
    if split_dir.is_dir():
        return split_dir
    hint = ""
    inner = [p for p in sorted(root.iterdir()) if p.is_dir() and (p / split).is_dir()]
    if inner:
        hint = f"; did you mean {str(inner[0])!r}?"
    elif any(root.glob(f"*.{split}")) or root.name in FLORES_SPLITS:
        hint = f"; it holds the split files themselves: pass its parent {str(root.parent)!r}"
    raise ValueError(
        f"{str(root)!r} is not in the FLORES layout: expected {str(split_dir)!r} holding <language>.{split} files "
        f"(FLORES-101: dev/eng.dev, devtest/eng.devtest; FLORES-200: dev/eng_Latn.dev){hint}"
    )


def flores_file(flores_dir: str | os.PathLike, split: str, code: str, *, must_exist: bool = True) -> Path:
    """Path of one language's FLORES file: ``<flores_dir>/<split>/<stem>.<split>``.

    Args:
        flores_dir: the unpacked release (``flores101_dataset/`` or ``flores200_dataset/``).
        split: ``"dev"`` or ``"devtest"``.
        code: M2M-100 / M2M-124 code (``"fr"``, mapped by :data:`FLORES101_CODES`) or FLORES-200 code
            (``"fra_Latn"``, its own file name).
        must_exist: raise when the file is missing.

    Returns:
        The file's path.

    Raises:
        ValueError: unknown code, a directory not in the FLORES layout, or (``must_exist``) no file
            for the language; the message names the code and the expected path.
    """
    stem = flores_stem(code)
    path = _check_flores_layout(flores_dir, split) / f"{stem}.{split}"
    if must_exist and not path.is_file():
        raise ValueError(f"FLORES has no file for language {code!r}: expected {str(path)!r}")
    return path


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM, as some editors write one, is not part of the first sentence
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{str(path)!r} is not UTF-8 text (line {line}, byte {error.start})") from None
    # split on "\n" only: str.splitlines would also break lines at U+2028, U+0085 or form feeds,
    # which may occur inside a sentence and would silently misalign the files.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _other_layout_hint(path: Path) -> str:
    stem, split = path.name.rsplit(".", 1)
    if "_" not in stem:
        others = sorted(path.parent.glob(f"{stem}_*.{split}"))
        if others:
            return f"; the directory has {others[0].name}: FLORES-200 files take FLORES-200 codes such as " \
                   f"{others[0].name.rsplit('.', 1)[0]!r}"
    return ""


def load_flores(flores_dir: str | os.PathLike, languages: Sequence[str], split: str) -> dict[str, list[str]]:
    """Read one split of FLORES for the given languages and check that the files line up.

    Args:
        flores_dir: the FLORES directory (``dev/``, ``devtest/`` inside).
        languages: language codes (see :func:`flores_file`).
        split: ``"dev"`` (the paper trains on it) or ``"devtest"`` (evaluates on it).

    Returns:
        ``{code: sentences}`` in the order of ``languages``; line i of every language is a
        translation of line i of the others.

    Raises:
        ValueError: before reading any text: an unknown code, a directory not in the FLORES layout,
        missing files (all of them named, with their expected paths); then: a file that is not
        UTF-8, is empty or has an empty line, or whose line count differs from the first
        language's (both files and counts named).
    """
    if isinstance(languages, str):
        raise TypeError("languages must be a list of codes; resolve a set such as 'lang12' with resolve_languages")
    languages = list(dict.fromkeys(languages))
    if not languages:
        raise ValueError("load_flores needs at least one language")
    paths = {code: flores_file(flores_dir, split, code, must_exist=False) for code in languages}
    missing = [f"{code!r} (expected {str(path)!r}{_other_layout_hint(path)})"
               for code, path in paths.items() if not path.is_file()]
    if missing:
        raise ValueError(f"FLORES {split} has no file for {len(missing)} language(s): " + "; ".join(missing))
    texts: dict[str, list[str]] = {}
    first = languages[0]
    for code, path in paths.items():
        lines = _read_lines(path)
        if not lines:
            raise ValueError(f"FLORES file {str(path)!r} (language {code!r}) is empty")
        empty = next((i for i, line in enumerate(lines) if not line.strip()), None)
        if empty is not None:
            raise ValueError(f"FLORES file {str(path)!r} (language {code!r}) has an empty line {empty + 1}")
        if code != first and len(lines) != len(texts[first]):
            raise ValueError(
                f"FLORES files are not line-aligned: {str(paths[first])!r} ({first!r}) has {len(texts[first])} lines "
                f"but {str(path)!r} ({code!r}) has {len(lines)}"
            )
        texts[code] = lines
    return texts


# ----------------------------------------------------------------------------- languages, directions
def resolve_languages(
    spec: str | Sequence[str],
    *,
    tokenizer=None,
    flores_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = FLORES_SPLITS,
) -> tuple[str, ...]:
    """The language codes a ``--languages`` value names, checked against the tokenizer and data.

    Args:
        spec: ``"lang12"`` / ``"lang30"`` (the paper's sets, in its tables' order), ``"all"``
            (every FLORES-101 language the tokenizer has a language token for, in
            :data:`FLORES101_CODES` order; with ``flores_dir``, only those whose files exist in
            every split of ``splits``), a comma-separated string ``"en,fr,oc"`` or a list of codes.
        tokenizer: the model's tokenizer: every code must have a language token (needed for "all").
        flores_dir: FLORES directory: every code must name a FLORES language (files are checked by
            :func:`load_flores`, which names each missing one); for "all", filters by file presence.
        splits: the splits "all" requires files in.

    Returns:
        The codes, in order (language id = position), at least two, no duplicates.

    Raises:
        ValueError: unknown set or code (with close matches), duplicates, fewer than two languages,
            codes the tokenizer has no token for (all listed), "all" without a tokenizer.
    """
    if isinstance(spec, str):
        name = spec.strip()
        if name in LANGUAGE_SETS:
            codes = list(LANGUAGE_SETS[name])
        elif name == "all":
            return _all_languages(tokenizer, flores_dir, splits)
        else:
            codes = [part.strip() for part in name.split(",")]
            if any(not part for part in codes):
                raise ValueError(f"languages {spec!r}: empty code in the comma-separated list")
    elif isinstance(spec, Sequence):
        codes = list(spec)
    else:
        raise TypeError(f"languages must be a set name, a comma-separated string or a list, got {type(spec).__name__}")
    for code in codes:
        if not isinstance(code, str):
            raise TypeError(f"a language code must be a str, got {type(code).__name__} {code!r}")
    duplicates = sorted({c for c in codes if codes.count(c) > 1})
    if duplicates:
        raise ValueError(f"languages {spec!r}: duplicate codes {duplicates}")
    if len(codes) < 2:
        raise ValueError(f"languages {spec!r}: need at least two languages to have a translation direction")
    if flores_dir is not None:
        for code in codes:
            flores_stem(code)
    if tokenizer is not None:
        _language_token_ids(tokenizer, codes)  # the tokenizer is the authority on what it knows
    else:
        for code in codes:
            _check_code(code)
    return tuple(codes)


def _all_languages(tokenizer, flores_dir, splits) -> tuple[str, ...]:
    if tokenizer is None:
        raise ValueError("languages 'all' means every FLORES-101 language the model's tokenizer knows: pass the tokenizer")
    codes = []
    for code in FLORES101_CODES:
        try:
            lang_token_id(tokenizer, code)
        except ValueError:
            continue
        codes.append(code)
    if flores_dir is not None:
        split_dirs = [_check_flores_layout(flores_dir, split) for split in splits]
        codes = [c for c in codes if all((d / f"{FLORES101_CODES[c]}.{s}").is_file() for d, s in zip(split_dirs, splits))]
    if len(codes) < 2:
        where = f" with files in {str(flores_dir)!r} ({', '.join(splits)})" if flores_dir is not None else ""
        raise ValueError(
            f"languages 'all': only {codes} of FLORES-101's languages have a language token in the tokenizer{where}; "
            "'all' takes M2M-100/M2M-124 codes (for NLLB, list FLORES-200 codes such as 'fra_Latn,deu_Latn')"
        )
    return tuple(codes)


def all_directions(languages: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered pair of distinct languages (many-to-many): ``n * (n - 1)`` directions.

    Args:
        languages: codes, at least two, no duplicates.

    Returns:
        ``[(src, tgt), ...]`` source-major in the order of ``languages`` (lang12: 132 directions).
    """
    if isinstance(languages, str):
        raise TypeError("languages must be a list of codes, not one string")
    languages = list(languages)
    duplicates = sorted({c for c in languages if languages.count(c) > 1})
    if duplicates:
        raise ValueError(f"duplicate language codes {duplicates}")
    if len(languages) < 2:
        raise ValueError(f"need at least two languages for a direction, got {languages}")
    return [(src, tgt) for src in languages for tgt in languages if src != tgt]


# ----------------------------------------------------------------------------- examples
class ParallelExample(NamedTuple):
    """One sentence pair: ``source`` in ``src_lang`` and its translation ``target`` in ``tgt_lang``."""

    src_lang: str
    tgt_lang: str
    source: str
    target: str


class MultiwayExamples(Sequence):
    """Every direction of a multi-way parallel corpus, as a lazy sequence of :class:`ParallelExample`.

    Example ``d * num_lines + i`` is line ``i`` of ``directions[d]``. Nothing is copied: lang30's
    870 directions x 997 lines are 867k examples over 30 lists of sentences.
    """

    def __init__(self, texts: Mapping[str, Sequence[str]], directions: Sequence[tuple[str, str]]):
        self.texts = texts
        self.directions = tuple(directions)
        self.num_lines = len(next(iter(texts.values()))) if texts else 0

    def __len__(self) -> int:
        return len(self.directions) * self.num_lines

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range ({len(self)} examples)")
        direction, line = divmod(index, self.num_lines)
        src, tgt = self.directions[direction]
        return ParallelExample(src, tgt, self.texts[src][line], self.texts[tgt][line])


def multiway_examples(texts: Mapping[str, Sequence[str]], directions: Sequence[tuple[str, str]]) -> MultiwayExamples:
    """The examples of ``directions`` over a multi-way parallel corpus (FLORES).

    Args:
        texts: ``{code: sentences}``, line i of every language translating line i of the others
            (what :func:`load_flores` returns).
        directions: ``(src, tgt)`` pairs, e.g. :func:`all_directions`.

    Returns:
        A lazy sequence of ``len(directions) * num_lines`` :class:`ParallelExample`, direction-major.

    Raises:
        ValueError: no directions, a direction whose language has no text, languages with different
            line counts, a direction from a language to itself, a repeated direction.
    """
    if not isinstance(texts, Mapping):
        raise TypeError(f"texts must be a dict code -> sentences, got {type(texts).__name__}")
    directions = [tuple(d) for d in directions]
    if not directions:
        raise ValueError("multiway_examples needs at least one direction")
    for direction in directions:
        if len(direction) != 2 or not all(isinstance(c, str) for c in direction):
            raise ValueError(f"a direction is a (src, tgt) pair of codes, got {direction!r}")
        if direction[0] == direction[1]:
            raise ValueError(f"direction {direction[0]}-{direction[1]} translates a language into itself")
    repeated = sorted(d for d, n in Counter(directions).items() if n > 1)
    if repeated:
        raise ValueError(f"repeated directions {repeated}")
    used = list(dict.fromkeys(code for direction in directions for code in direction))
    missing = [code for code in used if code not in texts]
    if missing:
        raise ValueError(f"directions use languages with no text: {missing} (have {list(texts)})")
    counts = {code: len(texts[code]) for code in used}
    if len(set(counts.values())) != 1:
        raise ValueError(f"a multi-way parallel corpus needs the same number of lines in every language, got {counts}")
    if next(iter(counts.values())) == 0:
        raise ValueError("the multi-way corpus has no lines")
    return MultiwayExamples({code: texts[code] for code in used}, directions)


def read_tsv_corpus(path: str | os.PathLike) -> list[ParallelExample]:
    """Read a parallel corpus of ``src_lang<TAB>tgt_lang<TAB>source<TAB>target`` lines (UTF-8).

    A first line ``src_lang<TAB>tgt_lang<TAB>source<TAB>target`` is taken as a header and skipped.

    Args:
        path: the TSV file.

    Returns:
        One :class:`ParallelExample` per line, in file order.

    Raises:
        ValueError: naming the file and line number: not UTF-8, not exactly four fields, an empty
            field, an unknown language code, or a pair whose source and target language are the same;
            a file with no example.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"TSV corpus {str(path)!r} does not exist or is not a file")
    examples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{str(path)!r} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where} is not UTF-8 (byte {error.start})") from None
            line = line.rstrip("\n")
            line = line.removesuffix("\r")
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write one
            fields = line.split("\t")
            if number == 1 and tuple(f.strip().lower() for f in fields) == _TSV_HEADER:
                continue
            if len(fields) != 4:
                raise ValueError(
                    f"{where}: expected 4 tab-separated fields (src_lang, tgt_lang, source, target), got {len(fields)}"
                )
            src_lang, tgt_lang, source, target = fields
            for name, value in zip(_TSV_HEADER, fields):
                if not value.strip():
                    raise ValueError(f"{where}: empty {name}")
            for code in (src_lang, tgt_lang):
                try:
                    _check_code(code)
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
            if src_lang == tgt_lang:
                raise ValueError(f"{where}: source and target language are both {src_lang!r}")
            examples.append(ParallelExample(src_lang, tgt_lang, source, target))
    if not examples:
        raise ValueError(f"TSV corpus {str(path)!r} has no examples")
    return examples


# ----------------------------------------------------------------------------- token ids
class EncodedCorpus:
    """Token ids of a parallel corpus, each distinct (language, sentence) stored once.

    Attributes:
        languages: codes of the languages that occur, in order of first appearance.
        directions: the ``(src, tgt)`` pairs that occur.
        tokens: (total_tokens,) int32, the ids of every distinct sentence, concatenated.
        segment_offsets: (num_segments + 1,) int64, sentence s is ``tokens[offsets[s]:offsets[s+1]]``.
        src_segment, tgt_segment: (N,) int32, the sentences of example i.
        direction: (N,) int32, index of example i's direction in ``directions``.
        src_lengths, tgt_lengths: (N,) int32 token counts (language token and eos included).
        num_truncated: distinct sentences cut to ``max_length``.
    """

    def __init__(self, *, languages, directions, tokens, segment_offsets, src_segment, tgt_segment, direction,
                 num_truncated: int = 0):
        self.languages: tuple[str, ...] = tuple(languages)
        self.directions: tuple[tuple[str, str], ...] = tuple(directions)
        self.tokens = tokens
        self.segment_offsets = segment_offsets
        self.src_segment = src_segment
        self.tgt_segment = tgt_segment
        self.direction = direction
        self.num_truncated = num_truncated
        segment_lengths = (segment_offsets[1:] - segment_offsets[:-1]).to(torch.int32)
        self.src_lengths = segment_lengths[src_segment.long()]
        self.tgt_lengths = segment_lengths[tgt_segment.long()]
        lang_index = {code: i for i, code in enumerate(self.languages)}
        self._direction_src = torch.tensor([lang_index[s] for s, _ in self.directions], dtype=torch.int64)
        self._direction_tgt = torch.tensor([lang_index[t] for _, t in self.directions], dtype=torch.int64)
        self._lang_maps: dict[tuple[str, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.src_segment.shape[0])

    def __repr__(self) -> str:
        return (f"EncodedCorpus({len(self)} examples, {len(self.directions)} directions, "
                f"{len(self.languages)} languages, {self.segment_offsets.shape[0] - 1} distinct sentences)")

    @property
    def src_lang(self) -> torch.Tensor:
        """(N,) int64, index of each example's source language in :attr:`languages`."""
        return self._direction_src[self.direction.long()]

    @property
    def tgt_lang(self) -> torch.Tensor:
        """(N,) int64, index of each example's target language in :attr:`languages`."""
        return self._direction_tgt[self.direction.long()]

    def _segment(self, segment: int) -> list[int]:
        start, end = self.segment_offsets[segment].item(), self.segment_offsets[segment + 1].item()
        return self.tokens[start:end].tolist()

    def source_ids(self, index: int) -> list[int]:
        """Source token ids of example ``index``: ``[src lang token] pieces [eos]``."""
        return self._segment(int(self.src_segment[index]))

    def target_ids(self, index: int) -> list[int]:
        """Target token ids (the labels) of example ``index``: ``[tgt lang token] pieces [eos]``."""
        return self._segment(int(self.tgt_segment[index]))

    def direction_of(self, index: int) -> tuple[str, str]:
        """``(src, tgt)`` codes of example ``index``."""
        return self.directions[int(self.direction[index])]

    def direction_sizes(self) -> torch.Tensor:
        """(num_directions,) int64, the number of examples of each direction."""
        return torch.bincount(self.direction.long(), minlength=len(self.directions))

    def language_ids(self, languages: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example source and target ids as positions in ``languages`` (the model's order).

        Returns:
            src_lang_ids, tgt_lang_ids: (N,) int64.
        """
        lang_map = self._language_map(languages)
        return lang_map[self.src_lang], lang_map[self.tgt_lang]

    def _language_map(self, languages: Sequence[str]) -> torch.Tensor:
        key = tuple(languages)
        if key not in self._lang_maps:
            if isinstance(languages, str):
                raise TypeError("languages must be a list of codes, not one string")
            position = {code: i for i, code in enumerate(key)}
            absent = [code for code in self.languages if code not in position]
            if absent:
                raise ValueError(f"the corpus has languages {absent} that are not in languages={list(key)}")
            self._lang_maps[key] = torch.tensor([position[code] for code in self.languages], dtype=torch.int64)
        return self._lang_maps[key]


def _encode_language(tokenizer, code: str, sentences: Sequence[str], lang_id: int, max_length: int | None):
    """Ids ``[lang] pieces [eos]`` of ``sentences`` in language ``code`` (lslo.tokenization's form), one
    tokenizer call per 50k sentences."""
    rows: list[list[int]] = []
    for start in range(0, len(sentences), _ENCODE_CHUNK):
        rows.extend(encode_sentences(tokenizer, code, sentences[start : start + _ENCODE_CHUNK], lang_id))
    eos = tokenizer.eos_token_id
    truncated = 0
    if max_length is not None:
        for i, row in enumerate(rows):
            if len(row) > max_length:
                rows[i] = row[: max_length - 1] + [eos]
                truncated += 1
    return rows, truncated


def encode_examples(tokenizer, examples: Sequence[ParallelExample], *, max_length: int | None = None,
                    progress: bool = False) -> EncodedCorpus:
    """Tokenize a parallel corpus the way :func:`lslo.translate` does, each distinct sentence once.

    Sources are ``[src token] pieces [eos]``, built by :func:`lslo.tokenization.encode_sentences`
    (the pieces from the tokenizer, the language token from its table or its vocabulary: no
    ``src_lang`` is set that the tokenizer does not know; where it knows the language, its own form
    is checked to be this one). Targets get the same form with the target's language: ``[tgt token] pieces [eos]``
    (what ``tokenizer(text_target=..)`` gives with ``tgt_lang`` set), so that the model's
    ``shift_tokens_right`` gives decoder inputs ``[eos, tgt token, pieces]``, as in beam search with
    the target language token forced first.

    Args:
        tokenizer: an M2M100Tokenizer or NllbTokenizer (any tokenizer with ``src_lang`` giving that
            form); its ``src_lang`` is restored afterwards.
        examples: :class:`ParallelExample` sequence, e.g. from :func:`multiway_examples` (fast path:
            one call per language over its lines) or :func:`read_tsv_corpus`.
        max_length: cut longer sequences to ``max_length`` tokens, keeping the language token and
            eos (``[lang] pieces[:max_length - 2] [eos]``); None keeps everything.
        progress: a tqdm bar over languages.

    Returns:
        The :class:`EncodedCorpus`; example i of ``examples`` is example i of the corpus.

    Raises:
        ValueError: no examples, a language without a token in the tokenizer (all listed, before
            tokenizing anything), ``max_length < 2``, a tokenizer that does not give the form above.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 (language token + eos) or None, got {max_length!r}")
    if not hasattr(tokenizer, "src_lang"):
        raise TypeError(f"{type(tokenizer).__name__} has no src_lang: not a multilingual translation tokenizer")
    if len(examples) == 0:
        raise ValueError("encode_examples: no examples")
    from tqdm.auto import tqdm

    if isinstance(examples, MultiwayExamples):
        directions = list(examples.directions)
        languages = list(examples.texts)
        sentences = {code: examples.texts[code] for code in languages}
        lines = examples.num_lines
    else:
        sentences, local = {}, {}
        directions_index: dict[tuple[str, str], int] = {}
        src_local, tgt_local, direction_list, src_langs, tgt_langs = [], [], [], [], []
        for number, example in enumerate(examples):
            if not isinstance(example, tuple) or len(example) != 4:
                raise TypeError(f"example {number} must be a ParallelExample (src_lang, tgt_lang, source, target), "
                                f"got {example!r}")
            src, tgt, source, target = example
            for code, text in ((src, source), (tgt, target)):
                if not isinstance(code, str) or not isinstance(text, str):
                    raise TypeError(f"example {number}: codes and sentences must be str, got {example!r}")
            ids = []
            for code, text in ((src, source), (tgt, target)):
                table = local.setdefault(code, {})
                if text not in table:
                    table[text] = len(table)
                    sentences.setdefault(code, []).append(text)
                ids.append(table[text])
            src_local.append(ids[0])
            tgt_local.append(ids[1])
            direction_list.append(directions_index.setdefault((src, tgt), len(directions_index)))
            src_langs.append(src)
            tgt_langs.append(tgt)
        directions = list(directions_index)
        languages = list(sentences)

    token_ids = _language_token_ids(tokenizer, languages)  # every missing language named before any work
    chunks, offsets, base, truncated, total = [], [0], {}, 0, 0
    for code in tqdm(languages, desc="tokenize", unit="lang", disable=not progress):
        rows, cut = _encode_language(tokenizer, code, sentences[code], token_ids[code], max_length)
        truncated += cut
        base[code] = len(offsets) - 1
        for row in rows:
            total += len(row)
            offsets.append(total)
            chunks.append(row)
    tokens = torch.tensor([t for row in chunks for t in row], dtype=torch.int32)
    segment_offsets = torch.tensor(offsets, dtype=torch.int64)

    if isinstance(examples, MultiwayExamples):
        line = torch.arange(lines, dtype=torch.int32)
        src_base = torch.tensor([base[s] for s, _ in directions], dtype=torch.int32)
        tgt_base = torch.tensor([base[t] for _, t in directions], dtype=torch.int32)
        src_segment = (src_base[:, None] + line[None, :]).reshape(-1)
        tgt_segment = (tgt_base[:, None] + line[None, :]).reshape(-1)
        direction = torch.arange(len(directions), dtype=torch.int32).repeat_interleave(lines)
    else:
        src_segment = torch.tensor([base[c] + i for c, i in zip(src_langs, src_local)], dtype=torch.int32)
        tgt_segment = torch.tensor([base[c] + i for c, i in zip(tgt_langs, tgt_local)], dtype=torch.int32)
        direction = torch.tensor(direction_list, dtype=torch.int32)
    return EncodedCorpus(languages=languages, directions=directions, tokens=tokens, segment_offsets=segment_offsets,
                         src_segment=src_segment, tgt_segment=tgt_segment, direction=direction,
                         num_truncated=truncated)


def flores_corpus(tokenizer, flores_dir: str | os.PathLike, languages: Sequence[str], split: str, *,
                  directions: Sequence[tuple[str, str]] | None = None, max_length: int | None = None) -> EncodedCorpus:
    """:func:`load_flores` + :func:`multiway_examples` + :func:`encode_examples` in one call.

    Args:
        tokenizer, max_length: as :func:`encode_examples`.
        flores_dir, languages, split: as :func:`load_flores`.
        directions: default every direction among ``languages`` (:func:`all_directions`).

    Returns:
        The encoded corpus, direction-major (example ``d * num_lines + i`` is line i of direction d).
    """
    texts = load_flores(flores_dir, languages, split)
    directions = all_directions(list(texts)) if directions is None else directions
    return encode_examples(tokenizer, multiway_examples(texts, directions), max_length=max_length)


# ----------------------------------------------------------------------------- sampling and batches
def sampling_probabilities(sizes: Sequence[int] | torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """Temperature sampling over directions: ``p_d = (n_d / N) ** (1 / T) / sum_e (n_e / N) ** (1 / T)``.

    Args:
        sizes: (D,) examples per direction, non-negative, not all zero.
        temperature: T > 0; 1 = proportional to size, ``math.inf`` = uniform over non-empty directions.

    Returns:
        (D,) float64 probabilities (0 for an empty direction).
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    if sizes.dim() != 1 or sizes.numel() == 0 or (sizes < 0).any() or sizes.sum() <= 0:
        raise ValueError(f"sizes must be a non-empty 1-D list of counts >= 0, not all zero, got {sizes.tolist()}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"sampling temperature must be a number > 0, got {temperature!r}")
    shares = sizes / sizes.sum()
    weights = (shares > 0).double() if math.isinf(temperature) else shares ** (1.0 / temperature)
    return weights / weights.sum()


def direction_sample_counts(sizes: Sequence[int] | torch.Tensor, *, temperature: float = 5.0,
                            total: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """How many examples of each direction one epoch draws: ``total * p_d``, rounded without bias.

    The integer parts are fixed; the leftover units go to directions drawn (without replacement)
    with weights equal to the fractional parts, so ``E[count_d] = total * p_d`` up to that scheme
    and ``|count_d - total * p_d| < 1``. Values within 1e-6 of an integer are that integer, so a
    corpus whose directions have equal sizes gets exactly its sizes back.

    Args:
        sizes: (D,) examples per direction.
        temperature: see :func:`sampling_probabilities`.
        total: examples in the epoch, default ``sum(sizes)`` (fairseq's epoch).
        generator: the random source of the rounding.

    Returns:
        (D,) int64 counts summing to ``total``.
    """
    probabilities = sampling_probabilities(sizes, temperature)
    total = int(torch.as_tensor(sizes).sum()) if total is None else total
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"epoch size must be a positive int, got {total!r}")
    expected = probabilities * total
    nearest = expected.round()
    expected = torch.where((expected - nearest).abs() < 1e-6, nearest, expected)
    counts = expected.floor()
    fractions = expected - counts
    leftover = total - int(counts.sum())
    if leftover > 0:
        chosen = torch.multinomial(fractions, leftover, replacement=False, generator=generator)
        counts[chosen] += 1
    return counts.to(torch.int64)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A stable hash: the same (seed, epoch) gives the same stream on every process and machine,
    # and neighbouring epochs get unrelated streams.
    digest = hashlib.sha256(f"lslo.data:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    return value


def make_batches(
    corpus: EncodedCorpus,
    *,
    max_tokens: int,
    epoch: int,
    seed: int,
    temperature: float = 5.0,
    max_sentences: int | None = None,
    epoch_size: int | None = None,
    oversize: str = "error",
    buckets: ShapeBuckets | None = None,
) -> Batches:
    """One epoch of mixed-direction batches under a token budget (fairseq's ``--max-tokens``).

    1. Sampling: direction d contributes ``c_d`` examples (:func:`direction_sample_counts`,
       ``p_d ~ (n_d / N) ** (1 / T)``, epoch size ``N`` by default). ``c_d <= n_d``: ``c_d``
       distinct examples; ``c_d > n_d``: every example ``c_d // n_d`` times plus ``c_d % n_d``
       distinct others. With equal ``n_d`` (FLORES: every direction 997 lines) ``c_d = n_d``:
       one pass over every example.
    2. Batching: examples sorted by length (longer side, then source, then target; ties in a
       random order) and cut greedily so that ``max(len) * n <= max_tokens`` on both sides (and
       ``n <= max_sentences``), one binary search per batch (:func:`_cut_points`); sorting across
       directions is what mixes them within a batch.
    3. The batch order is shuffled.

    All randomness comes from ``(seed, epoch)``: every process gets the same list (the engine
    shards it); a resumed run rebuilds the same epoch.

    Args:
        corpus: the :class:`EncodedCorpus`.
        max_tokens: token budget of a batch (padded size of the longer side).
        epoch: epoch number (any int; the engine counts from 1).
        seed: run seed.
        temperature: sampling temperature T (fairseq's default set-up and the paper's: 5).
        max_sentences: at most this many sentences a batch (fairseq's ``--batch-size``).
        epoch_size: examples drawn per epoch, default all ``N``.
        oversize: what to do with an example longer than ``max_tokens`` on its own: ``"error"``
            (default: ValueError naming it and how many there are, before any batch is made; cut
            them with ``encode_examples(max_length=...)``) or ``"skip"`` (leave them out of
            sampling, with a warning giving the count).
        buckets: static batch shapes (:class:`ShapeBuckets`): the cut of step 2 is
            :func:`bucketed_batches`'; pad each collated batch with :func:`pad_to_bucket`.

    Returns:
        :class:`Batches`: a sequence of example-index lists into ``corpus`` (an upsampled example may
        appear more than once), held as one index tensor plus offsets.
    """
    if not isinstance(corpus, EncodedCorpus):
        raise TypeError(f"corpus must be an EncodedCorpus (from encode_examples), got {type(corpus).__name__}")
    _check_int("max_tokens", max_tokens, 1)
    _check_int("epoch", epoch)
    _check_int("seed", seed)
    if max_sentences is not None:
        _check_int("max_sentences", max_sentences, 1)
    if oversize not in ("error", "skip"):
        raise ValueError(f"oversize must be 'error' or 'skip', got {oversize!r}")
    cost = torch.maximum(corpus.src_lengths, corpus.tgt_lengths).long()
    too_long = cost > max_tokens
    eligible = torch.arange(len(corpus))
    if too_long.any():
        count = int(too_long.sum())
        first = int(too_long.nonzero()[0])
        src, tgt = corpus.direction_of(first)
        if oversize == "error":
            raise ValueError(
                f"{count} example(s) do not fit max_tokens={max_tokens} on their own; the first is example {first} "
                f"({src}-{tgt}: {int(corpus.src_lengths[first])} source and {int(corpus.tgt_lengths[first])} target "
                "tokens). Raise max_tokens, cut long sentences with max_length, or pass oversize='skip'"
            )
        warnings.warn(f"make_batches: skipping {count} example(s) longer than max_tokens={max_tokens}", stacklevel=2)
        eligible = eligible[~too_long]
    if eligible.numel() == 0:
        raise ValueError("make_batches: no example to batch")

    generator = _epoch_generator(seed, epoch)
    selected = _sample_epoch(corpus, eligible, temperature, epoch_size, generator)
    # Random order first, then a stable sort by (longer side, source, target): equal lengths end up
    # in a random order. One sort on a combined key, computed once per example in corpus order and
    # gathered once (three gathers in random order cost more than the sort at 10M examples).
    permutation = torch.randperm(selected.numel(), generator=generator)
    all_eligible = eligible.numel() == len(corpus)
    selected = permutation if selected.numel() == len(corpus) and all_eligible and _is_identity(selected) \
        else selected[permutation]
    base = int(cost[eligible].max()) + 1  # any base above every length gives the same lexicographic order
    if base**3 < 2**62:
        key = (cost * base + corpus.src_lengths.long()) * base + corpus.tgt_lengths.long()
        sorted_key, order = torch.sort(key[selected], stable=True)
        selected, sorted_cost = selected[order], sorted_key // (base * base)
    else:  # lengths beyond 2**20 tokens: three stable sorts, least significant key first
        for key in (corpus.tgt_lengths, corpus.src_lengths, cost):
            selected = selected[torch.argsort(key[selected].long(), stable=True)]
        sorted_cost = cost[selected]

    if buckets is not None:  # static shapes on request (see ShapeBuckets)
        cut = bucketed_batches(selected, sorted_cost, buckets, max_tokens=max_tokens, max_sentences=max_sentences)
        sizes = torch.tensor([len(batch) for batch in cut], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        indices = torch.tensor([index for batch in cut for index in batch], dtype=torch.int64)
        return Batches(indices, offsets, torch.randperm(len(cut), generator=generator))
    limit = max_sentences if max_sentences is not None else max_tokens
    starts = _cut_points(sorted_cost, max_tokens, limit)
    offsets = torch.cat([starts, torch.tensor([selected.numel()])])
    return Batches(selected, offsets, torch.randperm(starts.numel(), generator=generator))


def _is_identity(indices: torch.Tensor) -> bool:
    return bool((indices == torch.arange(indices.numel())).all())


def _sample_epoch(corpus: EncodedCorpus, eligible: torch.Tensor, temperature: float, epoch_size: int | None,
                  generator: torch.Generator) -> torch.Tensor:
    """The examples of one epoch, direction by direction (see :func:`make_batches`, step 1).

    Returns:
        (epoch_size,) int64 example indices: direction d's ``c_d`` examples, directions in order.
    """
    # Group eligible examples by direction once: members of direction d are grouped[starts[d]:starts[d+1]].
    directions = corpus.direction[eligible].long()
    in_order = bool((directions[1:] >= directions[:-1]).all())  # multi-way corpora are direction-major
    grouped = eligible if in_order else eligible[torch.argsort(directions, stable=True)]
    sizes = torch.bincount(directions, minlength=len(corpus.directions))
    counts = direction_sample_counts(sizes, temperature=temperature, total=epoch_size, generator=generator)
    if torch.equal(counts, sizes):  # one pass over every example (FLORES): no draw, no copy
        return grouped
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).tolist()
    picked = []
    for d, (size, count) in enumerate(zip(sizes.tolist(), counts.tolist())):
        if size == 0:
            continue
        members = grouped[starts[d] : starts[d + 1]]
        repeats, rest = divmod(count, size)
        if repeats:
            picked.append(members.repeat(repeats))
        if rest:
            picked.append(members[torch.randperm(size, generator=generator)[:rest]])
    return torch.cat(picked)


def _cut_points(sorted_cost: torch.Tensor, max_tokens: int, limit: int) -> torch.Tensor:
    """First positions of the greedy token-budget batches over length-sorted examples.

    The greedy rule (add the next example while ``max(len) * n <= max_tokens`` and ``n <= limit``)
    with non-decreasing costs: the batch starting at ``s`` holds ``j`` iff ``j - s + 1 <=
    cap[j] = min(max_tokens // cost[j], limit)``, i.e. ``s >= first[j] = j + 1 - cap[j]``.
    ``first`` is strictly increasing (``cap`` never grows), so a batch's end is one
    ``searchsorted`` of its start in ``first``. Inside a run of equal ``cap = k`` every batch that
    ends in the run holds exactly k examples, so those starts are one ``arange``: the loop runs
    once per run of equal cost (a few hundred), not once per batch or example.

    Args:
        sorted_cost: (N,) int64, non-decreasing, each ``<= max_tokens``.
        max_tokens, limit: the budget and the most sentences a batch.

    Returns:
        (num_batches,) int64 start positions, from 0.
    """
    n = sorted_cost.numel()
    cap = torch.clamp((max_tokens // sorted_cost), max=limit)
    first = (torch.arange(1, n + 1, dtype=torch.int64) - cap).numpy()
    caps, lengths = torch.unique_consecutive(cap, return_counts=True)
    run_ends = lengths.cumsum(0).tolist()
    pieces, position, run = [], 0, 0
    while position < n:
        while run_ends[run] <= position:
            run += 1
        k, end = int(caps[run]), run_ends[run]
        whole = (end - position) // k  # batches that start here and end inside this run
        if whole:
            pieces.append(torch.arange(position, position + whole * k, k, dtype=torch.int64))
            position += whole * k
        if position < end:  # the batch that crosses into the next run(s)
            pieces.append(torch.tensor([position], dtype=torch.int64))
            position = int(first.searchsorted(position, side="right"))
    return torch.cat(pieces)


class Batches(Sequence):
    """One epoch's batches as one index tensor plus offsets and an order.

    Batch ``b`` is ``indices[offsets[k]:offsets[k+1]]`` with ``k = order[b]``: the examples stay in
    their length-sorted order and only the batch order is shuffled (no copy of the epoch). A
    sequence of ``list[int]`` (what :func:`collate` and the engine take; ``batches[a:b]`` is a list
    of lists); equal to another :class:`Batches` or to a list of lists with the same batches.

    Attributes:
        indices: (total,) int64 example indices, length-sorted.
        offsets: (num_batches + 1,) int64 batch bounds in ``indices``, from 0 to ``total``.
        order: (num_batches,) int64, the epoch's batch order (a permutation).
    """

    def __init__(self, indices: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor | None = None):
        self.indices = indices.to(torch.int64)
        self.offsets = offsets.to(torch.int64)
        self.order = torch.arange(self.offsets.numel() - 1) if order is None else order.to(torch.int64)
        self._bounds = self.offsets.tolist()
        self._order = self.order.tolist()

    def __len__(self) -> int:
        return len(self._order)

    def _batch(self, b: int) -> list[int]:
        k = self._order[b]
        return self.indices[self._bounds[k] : self._bounds[k + 1]].tolist()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._batch(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        return self._batch(index)

    def __iter__(self):
        for b in range(len(self)):
            yield self._batch(b)

    def __eq__(self, other) -> bool:
        if isinstance(other, Batches):
            return torch.equal(self.sizes, other.sizes) and torch.equal(self.flat(), other.flat())
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(list(a) == b for a, b in zip(other, self))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"Batches({len(self)} batches, {self.indices.numel()} examples)"

    @property
    def sizes(self) -> torch.Tensor:
        """(num_batches,) int64 examples per batch, in batch order."""
        return (self.offsets[1:] - self.offsets[:-1])[self.order]

    def flat(self) -> torch.Tensor:
        """(total,) int64 example indices in batch order (batch 0's, then batch 1's, ...)."""
        sizes = self.sizes
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
        shift = (self.offsets[:-1][self.order] - starts).repeat_interleave(sizes)
        return self.indices[torch.arange(self.indices.numel()) + shift]

    def tolist(self) -> list[list[int]]:
        """The batches as plain lists (JSON-ready)."""
        return list(self)


def collate(corpus: EncodedCorpus, indices: Sequence[int], *, pad_token_id: int,
            languages: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pad one batch of examples into model inputs, right-padded.

    Args:
        corpus: the :class:`EncodedCorpus`.
        indices: B example indices (one entry of :func:`make_batches`).
        pad_token_id: the tokenizer's ``pad_token_id``.
        languages: the model's language codes in id order (``LSLoConfig.languages``); every
            language of the batch must be among them.

    Returns:
        ``input_ids`` (B, S) int64, ``attention_mask`` (B, S) int64, ``labels`` (B, T) int64 with
        -100 on padding (the model derives ``decoder_input_ids = [eos, labels[:-1]]``),
        ``src_lang_ids`` (B,) int64 and ``tgt_lang_ids`` (B,) int64: positions in ``languages``,
        for ``lslo.route(src=..., tgt=...)``.
    """
    indices = torch.as_tensor(list(indices), dtype=torch.int64)
    if indices.numel() == 0:
        raise ValueError("collate: empty batch")
    if indices.min() < 0 or indices.max() >= len(corpus):
        raise ValueError(f"collate: indices must be in [0, {len(corpus)}), got {indices.min()}..{indices.max()}")
    _check_int("pad_token_id", pad_token_id, 0)
    lang_map = corpus._language_map(languages)

    def pad(segments: torch.Tensor, value: int) -> torch.Tensor:
        starts = corpus.segment_offsets[segments.long()]
        lengths = corpus.segment_offsets[segments.long() + 1] - starts
        out = torch.full((len(segments), int(lengths.max())), value, dtype=torch.int64)
        for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
            out[row, :length] = corpus.tokens[start : start + length]
        return out

    input_ids = pad(corpus.src_segment[indices], pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    src_lengths = corpus.src_lengths[indices].long()
    attention_mask[torch.arange(input_ids.shape[1])[None, :] < src_lengths[:, None]] = 1
    direction = corpus.direction[indices].long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad(corpus.tgt_segment[indices], -100),
        "src_lang_ids": lang_map[corpus._direction_src[direction]],
        "tgt_lang_ids": lang_map[corpus._direction_tgt[direction]],
    }


# ------------------------------------------------------------------------- static batch shapes
class ShapeBuckets(NamedTuple):
    """Static batch shapes on request (``lslo train --pad-to-multiple`` / ``--length-buckets``).

    A batch's padded length is its longest example (either side) rounded up to the first of
    ``lengths`` that holds it, or, past them or without them, to a multiple of ``pad_to_multiple``;
    both sides are padded to that length and every batch of one length holds the same number of
    sentences (all but the last of each length), so a run sees a small fixed set of
    (sentences, length) shapes: what ``torch.compile`` and CUDA graphs need to reuse their work.

    Attributes:
        pad_to_multiple: round lengths up to a multiple of this (1 = no rounding).
        lengths: increasing bucket lengths (may be empty).
    """

    pad_to_multiple: int = 1
    lengths: tuple[int, ...] = ()

    @classmethod
    def parse(cls, pad_to_multiple: int | None = None, length_buckets: str | Sequence[int] | None = None):
        """The buckets of the two flags, or None when neither is given.

        Args:
            pad_to_multiple: ``--pad-to-multiple``, an int >= 1.
            length_buckets: ``--length-buckets``, e.g. ``"16,32,64,128"`` or a sequence of ints.
        """
        if pad_to_multiple is None and length_buckets is None:
            return None
        multiple = 1 if pad_to_multiple is None else pad_to_multiple
        _check_int("pad_to_multiple", multiple, 1)
        if isinstance(length_buckets, str):
            try:
                lengths = tuple(int(v) for v in length_buckets.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"length_buckets must be comma-separated ints, got {length_buckets!r}") from None
        else:
            lengths = tuple(length_buckets or ())
        for value in lengths:
            _check_int("length_buckets entry", value, 1)
        if list(lengths) != sorted(set(lengths)):
            raise ValueError(f"length_buckets must be strictly increasing, got {list(lengths)}")
        return cls(multiple, lengths)

    def max_shapes(self, max_length: int | None) -> int | None:
        """How many (sentences, length) shapes batches of examples up to ``max_length`` tokens can
        take at most (two per padded length: the full batch and one remainder); without
        ``max_length``, those of the buckets alone (None without buckets)."""
        if max_length is None:
            return 2 * len(self.lengths) if self.lengths else None
        past = max_length - (self.lengths[-1] if self.lengths else 0)  # lengths past the last bucket
        return 2 * (len(self.lengths) + max(0, -(-past // self.pad_to_multiple)))

    def padded_length(self, length: int) -> int:
        """The padded length of a batch whose longest example has ``length`` tokens."""
        for bucket in self.lengths:
            if length <= bucket:
                return bucket
        return -(-length // self.pad_to_multiple) * self.pad_to_multiple


def bucketed_batches(selected: torch.Tensor, cost: torch.Tensor, buckets: ShapeBuckets, *, max_tokens: int,
                     max_sentences: int | None = None) -> list[list[int]]:
    """Cut examples sorted by length into batches of static shapes (see :class:`ShapeBuckets`).

    Args:
        selected: (N,) int64 example indices, sorted by ``cost`` (increasing).
        cost: (N,) int64 longer side of each selected example, in the same order.
        buckets: the shapes.
        max_tokens: budget: ``padded length * sentences <= max_tokens`` for every batch.
        max_sentences: at most this many sentences a batch.

    Returns:
        Batches of example indices (in ``selected``'s order); each batch's examples share one padded length.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    current_length = 0
    for index, length in zip(selected.tolist(), cost.tolist()):
        padded = buckets.padded_length(length)
        if padded > max_tokens:
            raise ValueError(f"example {index} ({length} tokens) pads to {padded} tokens, over max_tokens={max_tokens}; "
                             "raise max_tokens or change the length buckets")
        per_batch = max_tokens // padded if max_sentences is None else min(max_sentences, max_tokens // padded)
        if current and (padded != current_length or len(current) >= per_batch):
            batches.append(current)
            current = []
        current.append(index)
        current_length = padded
    if current:
        batches.append(current)
    return batches


def pad_to_bucket(batch: Mapping[str, torch.Tensor], buckets: ShapeBuckets, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A :func:`collate` batch with both sides padded to its bucket's length.

    Args:
        batch: ``input_ids`` (B, S), ``attention_mask`` (B, S), ``labels`` (B, T) (-100 on padding), ...
        buckets: the shapes.
        pad_token_id: the tokenizer's pad id (for ``input_ids``).

    Returns:
        The same entries, ``input_ids``/``attention_mask``/``labels`` (B, P) with
        ``P = buckets.padded_length(max(S, T))``; the other entries unchanged.
    """
    length = buckets.padded_length(max(batch["input_ids"].shape[1], batch["labels"].shape[1]))
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    out = dict(batch)
    for name, fill in fills.items():
        value = batch[name]
        out[name] = torch.nn.functional.pad(value, (0, length - value.shape[1]), value=fill)
    return out
