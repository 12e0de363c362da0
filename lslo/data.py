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
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .batching import (  # stages 3 and 4 of the pipeline: lslo.data.* keeps working
    Batches,
    EncodedCorpus,
    ShapeBuckets,
    bucketed_batches,
    collate,
    direction_sample_counts,
    make_batches,
    pad_to_bucket,
    sampling_probabilities,
)
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
    if isinstance(examples, MultiwayExamples):
        directions = list(examples.directions)
        languages = list(examples.texts)
        sentences = {code: examples.texts[code] for code in languages}
        lines = examples.num_lines
    else:
        indexed = _index_examples(examples)
        sentences, directions = indexed.sentences, indexed.directions
        languages = list(sentences)

    tokens, segment_offsets, base, truncated = _encode_segments(tokenizer, languages, sentences, max_length, progress)

    if isinstance(examples, MultiwayExamples):
        line = torch.arange(lines, dtype=torch.int32)
        src_base = torch.tensor([base[s] for s, _ in directions], dtype=torch.int32)
        tgt_base = torch.tensor([base[t] for _, t in directions], dtype=torch.int32)
        src_segment = (src_base[:, None] + line[None, :]).reshape(-1)
        tgt_segment = (tgt_base[:, None] + line[None, :]).reshape(-1)
        direction = torch.arange(len(directions), dtype=torch.int32).repeat_interleave(lines)
    else:
        src_segment = torch.tensor([base[c] + i for c, i in zip(indexed.src_langs, indexed.src_local)],
                                   dtype=torch.int32)
        tgt_segment = torch.tensor([base[c] + i for c, i in zip(indexed.tgt_langs, indexed.tgt_local)],
                                   dtype=torch.int32)
        direction = torch.tensor(indexed.direction, dtype=torch.int32)
    return EncodedCorpus(languages=languages, directions=directions, tokens=tokens, segment_offsets=segment_offsets,
                         src_segment=src_segment, tgt_segment=tgt_segment, direction=direction,
                         num_truncated=truncated)


class _IndexedExamples(NamedTuple):
    """A list of examples with each distinct (language, sentence) numbered once, per language."""

    sentences: dict[str, list[str]]  # language -> its distinct sentences, in order of first appearance
    directions: list[tuple[str, str]]
    src_local: list[int]  # example i's source: sentences[src_langs[i]][src_local[i]]
    tgt_local: list[int]
    direction: list[int]  # example i's position in directions
    src_langs: list[str]
    tgt_langs: list[str]


def _index_examples(examples: Sequence[ParallelExample]) -> _IndexedExamples:
    """Number the distinct sentences of ``examples`` (checked to be ParallelExamples of str)."""
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
    return _IndexedExamples(sentences, list(directions_index), src_local, tgt_local, direction_list, src_langs,
                            tgt_langs)


def _encode_segments(tokenizer, languages: Sequence[str], sentences: Mapping[str, Sequence[str]],
                     max_length: int | None, progress: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], int]:
    """(tokens, segment_offsets, first segment of each language, truncated count): every language's
    sentences tokenized, one after the other (see :class:`EncodedCorpus`)."""
    from tqdm.auto import tqdm

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
    return tokens, segment_offsets, base, truncated


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
