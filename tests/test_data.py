"""lslo.data: FLORES / TSV loading, language codes, tokenization, token-budget batches, sampling, collate.

The FLORES tests read the real release from ../shared/data (unpacked to a temporary directory);
where the tarball is absent they run on a generated directory in the same layout (all 102 files,
997 / 1012 lines, a line number in every sentence), never skipped.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import unicodedata
from pathlib import Path

import pytest
import torch

from lslo.config import LANGUAGE_SETS
from lslo.data import (
    FLORES101_CODES,
    M2M124_CODES,
    EncodedCorpus,
    ParallelExample,
    all_directions,
    collate,
    direction_sample_counts,
    encode_examples,
    flores_corpus,
    flores_file,
    load_flores,
    make_batches,
    multiway_examples,
    read_tsv_corpus,
    resolve_languages,
    sampling_probabilities,
)
from tests.hf_fixtures import make_sentences

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "flores101_dataset.tar.xz"
# The FLORES-101 release's 102 files (101 languages with an M2M code + zho_trad), from its dev/ directory.
FLORES101_STEMS = (
    "afr", "amh", "ara", "asm", "ast", "azj", "bel", "ben", "bos", "bul", "cat", "ceb", "ces", "ckb", "cym", "dan",
    "deu", "ell", "eng", "est", "fas", "fin", "fra", "ful", "gle", "glg", "guj", "hau", "heb", "hin", "hrv", "hun",
    "hye", "ibo", "ind", "isl", "ita", "jav", "jpn", "kam", "kan", "kat", "kaz", "kea", "khm", "kir", "kor", "lao",
    "lav", "lin", "lit", "ltz", "lug", "luo", "mal", "mar", "mkd", "mlt", "mon", "mri", "msa", "mya", "nld", "nob",
    "npi", "nso", "nya", "oci", "orm", "ory", "pan", "pol", "por", "pus", "ron", "rus", "slk", "slv", "sna", "snd",
    "som", "spa", "srp", "swe", "swh", "tam", "tel", "tgk", "tgl", "tha", "tur", "ukr", "umb", "urd", "uzb", "vie",
    "wol", "xho", "yor", "zho_simpl", "zho_trad", "zul",
)
LINES = {"dev": 997, "devtest": 1012}


def write_flores_dir(root: Path, stems, lines=None, numbered: bool = True) -> Path:
    """A directory in the FLORES layout; line i of every file carries the number 1000 + i when ``numbered``."""
    lines = lines or {"dev": 20, "devtest": 24}
    for split, count in lines.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for k, stem in enumerate(stems):
            sentences = make_sentences(count, seed=1000 * k + len(split))
            if numbered:
                sentences = [f"{s[:-1]} {1000 + i}." for i, s in enumerate(sentences)]
            (root / split / f"{stem}.{split}").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def flores(tmp_path_factory):
    """(directory, is_real): the real FLORES-101 release when the tarball is there, else a generated one."""
    root = tmp_path_factory.mktemp("flores")
    if TARBALL.is_file():
        with tarfile.open(TARBALL, "r:xz") as archive:
            archive.extractall(root, filter="data")
        return root / "flores101_dataset", True
    return write_flores_dir(root / "flores101_dataset", FLORES101_STEMS, LINES), False


@pytest.fixture(scope="module")
def small_flores(tmp_path_factory):
    """Generated FLORES-101 directory for 4 languages, digit-free text the test tokenizer round-trips."""
    return write_flores_dir(tmp_path_factory.mktemp("small") / "flores", ["eng", "fra", "oci", "deu"], numbered=False)


def _numbers(sentence: str) -> set[str]:
    # Every Unicode decimal digit (Devanagari, Arabic-Indic, ...) read as its ASCII value.
    ascii_digits = "".join(str(unicodedata.digit(c)) if not c.isascii() and unicodedata.digit(c, None) is not None
                           else c for c in sentence)
    return set(re.findall(r"\d{2,}", ascii_digits))


# ----------------------------------------------------------------------------- code table
def test_code_table_covers_flores101():
    assert len(FLORES101_CODES) == 101
    assert len(set(FLORES101_CODES.values())) == 101  # one file per code
    assert set(FLORES101_CODES.values()) | {"zho_trad"} == set(FLORES101_STEMS)
    assert len(M2M124_CODES) == len(set(M2M124_CODES)) == 124
    assert set(FLORES101_CODES) <= set(M2M124_CODES)
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    assert set(FAIRSEQ_LANGUAGE_CODES["m2m100"]) <= set(M2M124_CODES)  # M2M-124 extends M2M-100
    expected = {"en": "eng", "zh": "zho_simpl", "no": "nob", "kam": "kam", "ff": "ful", "oc": "oci", "or": "ory",
                "ku": "ckb", "ms": "msa", "ne": "npi", "sw": "swh", "fa": "fas", "wo": "wol", "sd": "snd"}
    assert {code: FLORES101_CODES[code] for code in expected} == expected
    assert all(code in FLORES101_CODES for code in LANGUAGE_SETS["lang30"])


def test_flores_release_files_match_the_table(flores):
    directory, _ = flores
    for split in LINES:
        stems = {p.name[: -len(split) - 1] for p in (directory / split).glob(f"*.{split}")}
        assert stems == set(FLORES101_STEMS)
        for code, stem in FLORES101_CODES.items():
            assert flores_file(directory, split, code) == directory / split / f"{stem}.{split}"


# ----------------------------------------------------------------------------- FLORES loading
@pytest.mark.parametrize("split", ["dev", "devtest"])
def test_flores_paper_languages_load_and_align(flores, split):
    directory, _ = flores
    languages = resolve_languages("lang30", flores_dir=directory)
    assert languages == LANGUAGE_SETS["lang30"]
    texts = load_flores(directory, languages, split)
    assert list(texts) == list(languages)
    assert {len(lines) for lines in texts.values()} == {LINES[split]}
    assert all(line.strip() and "\n" not in line for lines in texts.values() for line in lines)
    # Line i of every language translates line i of English: the numbers of an English line come
    # back in the same line of the other language far more often than in the next line.
    english = [_numbers(s) for s in texts["en"]]
    numbered = [i for i in range(len(english) - 1) if english[i]]
    assert len(numbered) > 100
    for code in languages[1:]:
        other = [_numbers(s) for s in texts[code]]
        aligned = sum(bool(english[i] & other[i]) for i in numbered) / len(numbered)
        shifted = sum(bool(english[i] & other[i + 1]) for i in numbered) / len(numbered)
        assert aligned >= 0.5 and shifted <= 0.2 and aligned >= 4 * shifted, (code, aligned, shifted)


def test_flores_real_text_spot_check(flores):
    directory, real = flores
    texts = load_flores(directory, ["en", "zh", "ja"], "dev")
    if real:  # the release's own text: Chinese and Japanese lines are in their scripts
        assert all(any("\u4e00" <= c <= "\u9fff" for c in line) for line in texts["zh"][:50])
        assert any("\u3040" <= c <= "\u30ff" for c in "".join(texts["ja"][:20]))
        assert texts["en"][0] != texts["zh"][0]
    else:
        assert all(str(1000 + i) in line for i, line in enumerate(texts["zh"]))


def test_generated_directory_flores101_and_flores200(tmp_path):
    write_flores_dir(tmp_path / "f101", ["eng", "fra", "zho_simpl"])
    texts = load_flores(tmp_path / "f101", ["en", "fr", "zh"], "devtest")
    assert {len(v) for v in texts.values()} == {24}
    assert texts["zh"] == (tmp_path / "f101/devtest/zho_simpl.devtest").read_text(encoding="utf-8").splitlines()
    write_flores_dir(tmp_path / "f200", ["eng_Latn", "fra_Latn"])
    assert flores_file(tmp_path / "f200", "dev", "fra_Latn") == tmp_path / "f200/dev/fra_Latn.dev"
    texts = load_flores(tmp_path / "f200", ["eng_Latn", "fra_Latn"], "dev")
    assert all(str(1000 + i) in a and str(1000 + i) in b for i, (a, b) in enumerate(zip(*texts.values())))


def test_lines_split_on_newline_only(tmp_path):
    write_flores_dir(tmp_path, ["eng", "fra"], {"dev": 3})
    # U+2028 and U+0085 inside a sentence are not line breaks (str.splitlines would say they are).
    (tmp_path / "dev/fra.dev").write_text("Un\u2028deux.\r\nTrois\x85.\nQuatre.\n", encoding="utf-8")
    assert load_flores(tmp_path, ["en", "fr"], "dev")["fr"] == ["Un\u2028deux.", "Trois\x85.", "Quatre."]


# ----------------------------------------------------------------------------- bad FLORES input
def test_flores_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_flores(tmp_path / "nowhere", ["en"], "dev")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_flores(tmp_path / "file", ["en"], "dev")
    write_flores_dir(tmp_path / "outer" / "flores101_dataset", ["eng", "fra"])
    with pytest.raises(ValueError, match=r"not in the FLORES layout.*did you mean .*flores101_dataset"):
        load_flores(tmp_path / "outer", ["en", "fr"], "dev")
    with pytest.raises(ValueError, match=r"not in the FLORES layout.*pass its parent"):
        load_flores(tmp_path / "outer" / "flores101_dataset" / "dev", ["en", "fr"], "dev")
    with pytest.raises(ValueError, match="split must be one of"):
        load_flores(tmp_path / "outer" / "flores101_dataset", ["en"], "test")


def test_flores_missing_file_names_code_and_path(tmp_path):
    write_flores_dir(tmp_path, ["eng", "fra"])
    expected = re.escape(str(tmp_path / "dev" / "oci.dev"))
    with pytest.raises(ValueError, match=rf"'oc' \(expected '{expected}'\)"):
        load_flores(tmp_path, ["en", "fr", "oc"], "dev")
    with pytest.raises(ValueError, match=rf"no file for language 'oc': expected '{expected}'"):
        flores_file(tmp_path, "dev", "oc")
    write_flores_dir(tmp_path / "f200", ["eng_Latn"])
    with pytest.raises(ValueError, match="FLORES-200 files take FLORES-200 codes such as 'eng_Latn'"):
        load_flores(tmp_path / "f200", ["en"], "dev")


def test_flores_line_count_mismatch_names_both_files(tmp_path):
    write_flores_dir(tmp_path, ["eng", "fra"], {"dev": 20})
    write_flores_dir(tmp_path / "short", ["fra"], {"dev": 19})
    (tmp_path / "short/dev/fra.dev").replace(tmp_path / "dev/fra.dev")
    with pytest.raises(ValueError, match=r"eng\.dev' \('en'\) has 20 lines but .*fra\.dev' \('fr'\) has 19"):
        load_flores(tmp_path, ["en", "fr"], "dev")


def test_flores_bad_files(tmp_path):
    write_flores_dir(tmp_path, ["eng", "fra"], {"dev": 3})
    (tmp_path / "dev/fra.dev").write_bytes(b"ok\n\xff\xfe\nok\n")
    with pytest.raises(ValueError, match=r"fra\.dev' is not UTF-8"):
        load_flores(tmp_path, ["en", "fr"], "dev")
    (tmp_path / "dev/fra.dev").write_text("a\n\nc\n")
    with pytest.raises(ValueError, match=r"fra\.dev' \(language 'fr'\) has an empty line 2"):
        load_flores(tmp_path, ["en", "fr"], "dev")
    (tmp_path / "dev/fra.dev").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_flores(tmp_path, ["en", "fr"], "dev")


@pytest.mark.parametrize(("code", "message"), [
    ("xx", "unknown language code 'xx'.*close matches: xh"),
    ("eng", "FLORES-101 file name, its M2M code is 'en'"),
    ("zho_trad", "zho_trad has no M2M code"),
    ("fra_latn", "close matches: fra_Latn"),
    ("ba", "not one of FLORES-101's"),  # an M2M-100 language that FLORES-101 lacks
])
def test_unknown_codes(flores, code, message):
    directory, _ = flores
    with pytest.raises(ValueError, match=message):
        flores_file(directory, "dev", code)
    with pytest.raises(ValueError, match=message):
        resolve_languages(["en", code], flores_dir=directory)


# ----------------------------------------------------------------------------- languages and directions
def test_resolve_language_sets_and_lists(tokenizer, flores):
    directory, _ = flores
    lang12 = resolve_languages("lang12", tokenizer=tokenizer, flores_dir=directory)
    assert lang12 == LANGUAGE_SETS["lang12"]
    directions = all_directions(lang12)
    assert len(directions) == 132 == len(set(directions)) and all(s != t for s, t in directions)
    assert len(all_directions(LANGUAGE_SETS["lang30"])) == 870
    assert resolve_languages(" en, fr ,oc") == ("en", "fr", "oc")
    assert resolve_languages(["fra_Latn", "deu_Latn"]) == ("fra_Latn", "deu_Latn")
    assert resolve_languages("kam,wo") == ("kam", "wo")  # M2M-124 codes are known without a tokenizer


def test_resolve_all_is_flores_intersect_tokenizer(tokenizer, flores, tmp_path):
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    directory, _ = flores
    expected = [c for c in FLORES101_CODES if c in set(FAIRSEQ_LANGUAGE_CODES["m2m100"])]
    languages = resolve_languages("all", tokenizer=tokenizer, flores_dir=directory)
    assert list(languages) == expected and len(languages) == 87
    assert "kam" not in languages and "en" in languages
    # Only languages whose files exist in both splits.
    write_flores_dir(tmp_path, ["eng", "fra", "deu", "kam"])
    (tmp_path / "devtest" / "deu.devtest").unlink()
    assert resolve_languages("all", tokenizer=tokenizer, flores_dir=tmp_path) == ("en", "fr")
    with pytest.raises(ValueError, match="pass the tokenizer"):
        resolve_languages("all")


def test_resolve_bad_specs(tokenizer):
    with pytest.raises(ValueError, match=r"no language token for 'mt' \(close: .*'kam' \(close: km, ka, am\); M2M-100's"):
        resolve_languages("lang30", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="duplicate codes"):
        resolve_languages("en,fr,en")
    with pytest.raises(ValueError, match="at least two languages"):
        resolve_languages("en")
    with pytest.raises(ValueError, match="empty code"):
        resolve_languages("en,,fr")
    with pytest.raises(ValueError, match="language set: pass it alone"):
        resolve_languages("lang12,en")
    with pytest.raises(TypeError):
        resolve_languages(12)
    with pytest.raises(ValueError, match="at least two languages"):
        all_directions(["en"])


def test_multiway_examples():
    texts = {"en": ["a", "b", "c"], "fr": ["A", "B", "C"], "de": ["x", "y", "z"]}
    examples = multiway_examples(texts, all_directions(list(texts)))
    assert len(examples) == 18
    assert examples[1] == ParallelExample("en", "fr", "b", "B")  # direction-major: en-fr, en-de, fr-en, ...
    assert examples[-1] == ParallelExample("de", "fr", "z", "C")
    assert list(examples[3:5]) == [ParallelExample("en", "de", "a", "x"), ParallelExample("en", "de", "b", "y")]
    with pytest.raises(ValueError, match="no text"):
        multiway_examples(texts, [("en", "oc")])
    with pytest.raises(ValueError, match="same number of lines"):
        multiway_examples({"en": ["a"], "fr": ["A", "B"]}, [("en", "fr")])
    with pytest.raises(ValueError, match="into itself"):
        multiway_examples(texts, [("en", "en")])
    with pytest.raises(ValueError, match="repeated directions"):
        multiway_examples(texts, [("en", "fr"), ("en", "fr")])


# ----------------------------------------------------------------------------- TSV corpora
def test_read_tsv(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("src_lang\ttgt_lang\tsource\ttarget\nen\tfr\tHello.\tBonjour.\r\nkam\tfra_Latn\tx\ty\n",
                    encoding="utf-8")
    assert read_tsv_corpus(path) == [ParallelExample("en", "fr", "Hello.", "Bonjour."),
                                     ParallelExample("kam", "fra_Latn", "x", "y")]


@pytest.mark.parametrize(("content", "message"), [
    (b"en\tfr\ta\tb\nen\tfr\ta\n", "line 2: expected 4 tab-separated fields.*got 3"),
    (b"en\tfr\ta\tb\n\n", "line 2: expected 4"),
    (b"en\tfr\ta\tb\tc\n", "line 1: expected 4.*got 5"),
    (b"en\tfr\ta\tb\nen\tfr\t \tb\n", "line 2: empty source"),
    (b"en\tfr\ta\tb\nen\tfx\ta\tb\n", "line 2: unknown language code 'fx'.*close matches"),
    (b"en\ten\ta\tb\n", "line 1: source and target language are both 'en'"),
    (b"en\tfr\ta\tb\nen\tfr\t\xff\tb\n", "line 2 is not UTF-8"),
    (b"", "has no examples"),
])
def test_read_tsv_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "c.tsv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_tsv_corpus(path)


def test_read_tsv_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_tsv_corpus(tmp_path / "none.tsv")


# ----------------------------------------------------------------------------- tokenization
def _encode_with(tokenizer, lang, sentences, **kwargs):
    previous = tokenizer.src_lang
    tokenizer.src_lang = lang
    try:
        return tokenizer(list(sentences), **kwargs)["input_ids"]
    finally:
        tokenizer.src_lang = previous


def test_encoding_matches_translate_and_text_target(tokenizer, small_flores):
    from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right

    from lslo.inference import _encode_by_source, lang_token_id

    languages = ("en", "fr", "oc")
    texts = load_flores(small_flores, languages, "dev")
    examples = multiway_examples(texts, all_directions(languages))
    corpus = encode_examples(tokenizer, examples)
    assert len(corpus) == 6 * 20 and corpus.segment_offsets.numel() - 1 == 3 * 20  # each sentence once
    previous = tokenizer.src_lang
    sources = _encode_by_source(tokenizer, [e.source for e in examples], [e.src_lang for e in examples])
    assert tokenizer.src_lang == previous
    for i, example in enumerate(examples):
        assert corpus.source_ids(i) == sources[i]  # exactly what lslo.translate feeds the encoder
        assert corpus.direction_of(i) == (example.src_lang, example.tgt_lang)
    for src, tgt in [("en", "fr"), ("oc", "en")]:
        tokenizer.src_lang, tokenizer.tgt_lang = src, tgt
        expected = tokenizer(text_target=texts[tgt])["input_ids"]  # the M2M100Tokenizer target form
        d = corpus.directions.index((src, tgt))
        assert [corpus.target_ids(d * 20 + i) for i in range(20)] == expected
        labels = torch.tensor([corpus.target_ids(d * 20)])
        decoder_inputs = shift_tokens_right(labels, tokenizer.pad_token_id, tokenizer.eos_token_id)
        # What beam search sees: decoder start (eos), then the forced target-language token.
        assert decoder_inputs[0, :2].tolist() == [tokenizer.eos_token_id, lang_token_id(tokenizer, tgt)]
    tokenizer.src_lang = previous


def test_encode_tsv_shares_sentences_and_truncates(tokenizer):
    long = " ".join(make_sentences(8, seed=3))
    examples = [ParallelExample("en", "fr", "Kalo mine.", long), ParallelExample("fr", "en", long, "Kalo mine."),
                ParallelExample("en", "de", "Kalo mine.", "Tovi ba.")]
    corpus = encode_examples(tokenizer, examples, max_length=12)
    assert corpus.languages == ("en", "fr", "de") and corpus.directions == (("en", "fr"), ("fr", "en"), ("en", "de"))
    assert corpus.segment_offsets.numel() - 1 == 3 and corpus.num_truncated == 1
    assert corpus.target_ids(0) == corpus.source_ids(1) == _encode_with(tokenizer, "fr", [long], truncation=True,
                                                                        max_length=12)[0]
    assert len(corpus.target_ids(0)) == 12
    assert corpus.source_ids(2) == corpus.target_ids(1) == _encode_with(tokenizer, "en", ["Kalo mine."])[0]
    assert corpus.src_lengths.tolist() == [len(corpus.source_ids(i)) for i in range(3)]
    with pytest.raises(ValueError, match="max_length"):
        encode_examples(tokenizer, examples, max_length=1)


def test_encode_missing_language_token_fails_before_tokenizing(tokenizer):
    examples = [ParallelExample("en", "kam", "a", "b"), ParallelExample("mt", "en", "c", "d")]
    with pytest.raises(ValueError, match=r"no language token for 'kam' \(close: km.*\), 'mt' \(close"):
        encode_examples(tokenizer, examples)


def test_nllb_form_and_legacy_refusal():
    from transformers import NllbTokenizer

    tokenizer = NllbTokenizer()  # empty vocabulary, but the FLORES-200 language tokens and the layout
    corpus = encode_examples(tokenizer, [ParallelExample("fra_Latn", "deu_Latn", "a b", "c")])
    fra, deu = tokenizer.convert_tokens_to_ids(["fra_Latn", "deu_Latn"])
    assert corpus.source_ids(0)[0] == fra and corpus.target_ids(0)[0] == deu
    assert corpus.source_ids(0)[-1] == corpus.target_ids(0)[-1] == tokenizer.eos_token_id
    tokenizer.tgt_lang = "deu_Latn"
    assert corpus.target_ids(0) == tokenizer(text_target="c")["input_ids"]
    legacy = NllbTokenizer(legacy_behaviour=True)
    with pytest.raises(ValueError, match=r"needs \[language token"):
        encode_examples(legacy, [ParallelExample("fra_Latn", "deu_Latn", "a b", "c")])


# ----------------------------------------------------------------------------- batches
def _check_budget(corpus, batches, max_tokens):
    for batch in batches:
        assert max(corpus.src_lengths[batch].tolist()) * len(batch) <= max_tokens
        assert max(corpus.tgt_lengths[batch].tolist()) * len(batch) <= max_tokens


def test_flores_batches_budget_one_pass_mixed_directions(tokenizer, flores):
    directory, _ = flores
    languages = ("en", "fr", "zh", "or")
    corpus = flores_corpus(tokenizer, directory, languages, "dev", max_length=128)
    assert len(corpus) == 12 * 997
    batches = make_batches(corpus, max_tokens=1024, epoch=1, seed=0)  # temperature 5
    _check_budget(corpus, batches, 1024)
    # Multi-way parallel: every direction has 997 examples, so temperature sampling is one pass.
    assert sorted(i for batch in batches for i in batch) == list(range(len(corpus)))
    mixed = sum(len({corpus.direction_of(i) for i in batch}) > 1 for batch in batches)
    assert mixed > 0.8 * len(batches)
    # The budget is used: merging two neighbours in length would mostly break it.
    assert sum(len(b) for b in batches) / len(batches) > 4


def test_batches_carry_the_right_ids(tokenizer, small_flores):
    languages = ("en", "fr", "oc", "de")
    texts = load_flores(small_flores, languages, "dev")
    examples = multiway_examples(texts, all_directions(languages))
    corpus = encode_examples(tokenizer, examples)
    model_languages = ("de", "xx_Unused", "oc", "en", "fr")  # the model's order differs from the corpus's
    batches = make_batches(corpus, max_tokens=300, epoch=3, seed=1)
    from lslo.inference import lang_token_id

    for batch in batches[:5]:
        out = collate(corpus, batch, pad_token_id=tokenizer.pad_token_id, languages=model_languages)
        assert all(t.dtype == torch.int64 for t in out.values())
        assert out["input_ids"].shape == out["attention_mask"].shape and out["labels"].shape[0] == len(batch)
        for row, index in enumerate(batch):
            example = examples[index]
            n_src = int(out["attention_mask"][row].sum())
            src = out["input_ids"][row].tolist()
            assert src[n_src:] == [tokenizer.pad_token_id] * (len(src) - n_src)
            assert src[0] == lang_token_id(tokenizer, example.src_lang)
            assert tokenizer.decode(src[1:n_src], skip_special_tokens=True) == example.source
            labels = [t for t in out["labels"][row].tolist() if t != -100]
            assert out["labels"][row].tolist() == labels + [-100] * (out["labels"].shape[1] - len(labels))
            assert labels[0] == lang_token_id(tokenizer, example.tgt_lang) and labels[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(labels[1:], skip_special_tokens=True) == example.target
            assert model_languages[out["src_lang_ids"][row]] == example.src_lang
            assert model_languages[out["tgt_lang_ids"][row]] == example.tgt_lang
    src_ids, tgt_ids = corpus.language_ids(model_languages)
    assert tgt_ids[batches[0]].tolist() == collate(corpus, batches[0], pad_token_id=1,
                                                   languages=model_languages)["tgt_lang_ids"].tolist()
    assert src_ids[batches[0]].tolist() == collate(corpus, batches[0], pad_token_id=1,
                                                   languages=model_languages)["src_lang_ids"].tolist()
    with pytest.raises(ValueError, match=r"languages \['fr'\] that are not in"):
        collate(corpus, batches[0], pad_token_id=1, languages=("en", "oc", "de"))
    with pytest.raises(ValueError, match="indices must be in"):
        collate(corpus, [len(corpus)], pad_token_id=1, languages=languages)


def test_collate_feeds_the_model(tokenizer):
    from tests.hf_fixtures import tiny_model

    examples = [ParallelExample("en", "fr", s, t) for s, t in zip(make_sentences(4, 5), make_sentences(4, 6))]
    corpus = encode_examples(tokenizer, examples)
    batch = collate(corpus, [0, 1, 2, 3], pad_token_id=tokenizer.pad_token_id, languages=("en", "fr"))
    model = tiny_model(tokenizer, dtype=torch.float32)
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def test_max_sentences_and_oversize(tokenizer):
    long = " ".join(make_sentences(10, seed=4))
    examples = [ParallelExample("en", "fr", s, s) for s in make_sentences(30, seed=9)]
    examples.append(ParallelExample("fr", "en", long, "Kalo."))
    corpus = encode_examples(tokenizer, examples)
    longest = int(corpus.src_lengths[-1])
    with pytest.raises(ValueError, match=rf"1 example\(s\) do not fit max_tokens=60.*example 30 \(fr-en: {longest} "):
        make_batches(corpus, max_tokens=60, epoch=1, seed=0)
    with pytest.warns(UserWarning, match="skipping 1 example"):
        batches = make_batches(corpus, max_tokens=60, epoch=1, seed=0, temperature=1.0, oversize="skip")
    assert sorted(i for b in batches for i in b) == list(range(30))
    _check_budget(corpus, batches, 60)
    batches = make_batches(corpus, max_tokens=10_000, epoch=1, seed=0, max_sentences=7, temperature=1.0)
    assert max(map(len, batches)) == 7 and sum(map(len, batches)) == 31
    for bad in ({"max_tokens": 0}, {"max_tokens": 100, "temperature": 0}, {"max_tokens": 100, "oversize": "drop"},
                {"max_tokens": 100, "max_sentences": 0}):
        with pytest.raises(ValueError):
            make_batches(corpus, epoch=1, seed=0, **bad)


# ----------------------------------------------------------------------------- temperature sampling
SIZES = {("en", "fr"): 400, ("fr", "en"): 120, ("en", "de"): 30, ("de", "fr"): 6}


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory, tokenizer):
    sentences = make_sentences(400, seed=11, max_words=4)
    path = tmp_path_factory.mktemp("tsv") / "corpus.tsv"
    lines = [f"{s}\t{t}\t{sentences[i]}\t{sentences[-1 - i]}" for (s, t), n in SIZES.items() for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return encode_examples(tokenizer, read_tsv_corpus(path))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, math.inf])
def test_temperature_sampling_follows_the_formula(imbalanced, temperature):
    corpus = imbalanced
    sizes = torch.tensor([SIZES[d] for d in corpus.directions], dtype=torch.float64)
    total = int(sizes.sum())
    # fairseq's temperature-based sampling ratio, written out here independently.
    shares = (sizes / total) ** (0 if math.isinf(temperature) else 1 / temperature)
    expected = total * shares / shares.sum()
    assert torch.allclose(sampling_probabilities(sizes, temperature), shares / shares.sum())
    start = 0
    for d, direction in enumerate(corpus.directions):
        members = list(range(start, start + SIZES[direction]))
        start += SIZES[direction]
        for epoch in (1, 2):
            batches = make_batches(corpus, max_tokens=512, epoch=epoch, seed=0, temperature=temperature)
            drawn = collections.Counter(i for b in batches for i in b)
            count = sum(drawn[i] for i in members)
            assert abs(count - expected[d].item()) < 1, (direction, count, expected[d].item())
            # Without replacement up to n_d: each example drawn floor or ceil(count / n_d) times.
            assert {drawn[i] for i in members} <= {count // len(members), -(-count // len(members))}
            assert sum(drawn.values()) == total


def test_sample_counts_unbiased_and_exact_for_equal_sizes():
    generator = torch.Generator().manual_seed(0)
    assert direction_sample_counts([997] * 132, temperature=5.0, generator=generator).tolist() == [997] * 132
    sizes = [50, 7, 3]
    expected = 60 * sampling_probabilities(sizes, 5.0)
    draws = torch.stack([direction_sample_counts(sizes, generator=generator) for _ in range(2000)]).double()
    assert (draws.sum(1) == 60).all()
    assert torch.allclose(draws.mean(0), expected, atol=0.05)  # randomized rounding has the right mean
    assert direction_sample_counts(sizes, temperature=1.0, total=600, generator=generator).tolist() == [500, 70, 30]


# ----------------------------------------------------------------------------- determinism
def test_batches_deterministic_in_seed_and_epoch(imbalanced):
    first = make_batches(imbalanced, max_tokens=256, epoch=4, seed=7)
    assert make_batches(imbalanced, max_tokens=256, epoch=4, seed=7) == first
    assert make_batches(imbalanced, max_tokens=256, epoch=5, seed=7) != first
    assert make_batches(imbalanced, max_tokens=256, epoch=4, seed=8) != first


def test_batches_identical_in_another_process(imbalanced, tokenizer, tmp_path):
    """Every rank of a distributed run builds the same list: another interpreter (other hash seed,
    one thread) gets the same batches."""
    tsv = tmp_path / "c.tsv"
    rows = [f"{s}\t{t}\t{x}\t{y}" for s, t, x, y in [("en", "fr", "Kalo mine.", "Tovi ba."), ("fr", "de", "Ba.", "Lo mi."),
                                                     ("de", "en", "Sa to vi.", "Ne ru.")] * 40]
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import M2M100Tokenizer
        from lslo.data import encode_examples, make_batches, read_tsv_corpus
        torch.set_num_threads(1)
        tokenizer = M2M100Tokenizer({tokenizer.vocab_file!r}, {tokenizer.spm_file!r}, language_codes="m2m100")
        corpus = encode_examples(tokenizer, read_tsv_corpus({str(tsv)!r}))
        print(json.dumps(make_batches(corpus, max_tokens=64, epoch=2, seed=3).tolist()))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    here = make_batches(encode_examples(tokenizer, read_tsv_corpus(tsv)), max_tokens=64, epoch=2, seed=3)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here


def test_encoded_corpus_type_checks(tokenizer):
    with pytest.raises(TypeError, match="EncodedCorpus"):
        make_batches([[1, 2]], max_tokens=10, epoch=1, seed=0)
    with pytest.raises(ValueError, match="no examples"):
        encode_examples(tokenizer, [])
    corpus = encode_examples(tokenizer, [ParallelExample("en", "fr", "a", "b")])
    assert isinstance(corpus, EncodedCorpus) and "1 examples" in repr(corpus)
