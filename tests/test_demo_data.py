"""The demo's synthetic languages, corpus files and pretrained tiny base model (lslo.demo)."""

from __future__ import annotations

import difflib
import random
import statistics

import pytest
import sacrebleu

import lslo
from lslo.data import FLORES101_CODES, load_flores, read_tsv_corpus
from lslo.demo.synthetic import (
    CONTENT_CONCEPTS,
    FLORES_STEMS,
    FUNCTION_CONCEPTS,
    LANGUAGE_SPECS,
    NAMES,
    Clause,
    CorpusSpec,
    Meaning,
    NounPhrase,
    build_languages,
    generate_corpus,
    pretraining_pair_weights,
    sound_change,
    write_corpus,
)

ALL = tuple(LANGUAGE_SPECS)
SMALL = CorpusSpec(languages=ALL, dev_size=40, devtest_size=30, pretrain_size=3000, seed=7)


def group(code: str) -> str:
    return LANGUAGE_SPECS[code].group


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    return directory, write_corpus(directory, SMALL)


# ------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_for_a_seed():
    spec = CorpusSpec(dev_size=20, devtest_size=20, pretrain_size=500, seed=7)
    first, again = generate_corpus(spec), generate_corpus(spec)
    assert first.dev == again.dev and first.devtest == again.devtest and first.pretrain == again.pretrain
    other = generate_corpus(spec, seed=8)
    assert other.dev["en"] != first.dev["en"]
    assert build_languages(8)["fr"].lexicon != build_languages(7)["fr"].lexicon
    # A language does not depend on which others are built with it.
    assert build_languages(7, ["oc", "en"])["oc"].lexicon == build_languages(7)["oc"].lexicon


def test_languages_cover_three_resource_groups_with_real_m2m_codes():
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    assert len(ALL) >= 6
    for code in ALL:
        assert code in FAIRSEQ_LANGUAGE_CODES["m2m100"]  # the tokenizer has its language token
        assert lslo.RESOURCE_GROUPS[code] == group(code)
        assert FLORES_STEMS[code] == FLORES101_CODES[code]
    assert {group(c) for c in ALL} == {"H", "M", "V"}


def test_meanings_are_realised_line_by_line_in_every_language(small_corpus):
    _, corpus = small_corpus
    for split in ("dev", "devtest"):
        meanings = corpus.meanings[split]
        assert len(set(meanings)) == len(meanings)
        for code, language in corpus.languages.items():
            assert getattr(corpus, split)[code] == [language.realise(m) for m in meanings]
        # What translations share: the names and digits of line i appear in line i of every language.
        for i, meaning in enumerate(meanings):
            anchors = {w for w in getattr(corpus, split)["en"][i].rstrip(".").split() if w in NAMES or w.isdigit()}
            for code in ALL:
                assert anchors <= set(getattr(corpus, split)[code][i].rstrip(".").replace("-", " ").split())
    # The languages really differ: a line is never the same in two languages, unless one descends
    # from the other and the sentence happens to hold only inherited words (and names).
    relatives = {frozenset((c, s.parent)) for c, s in LANGUAGE_SPECS.items() if s.parent}
    same = {frozenset((a, b)) for i in range(SMALL.dev_size) for a in ALL for b in ALL
            if a != b and corpus.dev[a][i] == corpus.dev[b][i]}
    assert same <= relatives, same


def test_flores_layout_read_by_lslo_data(small_corpus):
    directory, corpus = small_corpus
    for split, size in (("dev", SMALL.dev_size), ("devtest", SMALL.devtest_size)):
        texts = load_flores(directory, list(ALL), split)
        assert texts == getattr(corpus, split)
        for code in ALL:
            path = directory / split / f"{FLORES101_CODES[code]}.{split}"
            raw = path.read_text(encoding="utf-8")
            assert raw.endswith("\n") and raw.count("\n") == size
            assert all(line.strip() and "\t" not in line for line in texts[code])
    # No test sentence is seen in fine-tuning or pretraining.
    devtest, dev = set(corpus.devtest["en"]), set(corpus.dev["en"])
    pretrain_en = {s for src, tgt, a, b in corpus.pretrain for s, c in ((a, src), (b, tgt)) if c == "en"}
    assert not devtest & dev and not devtest & pretrain_en and not dev & pretrain_en
    assert "ARTIFICIAL" in (directory / "README.txt").read_text()


def test_pretraining_tsv_is_imbalanced_many_to_many(small_corpus):
    directory, corpus = small_corpus
    examples = read_tsv_corpus(directory / "pretrain.tsv")
    assert [tuple(e) for e in examples] == corpus.pretrain and len(examples) == SMALL.pretrain_size
    per_group_pair: dict[str, int] = {}
    per_language = dict.fromkeys(ALL, 0)
    for e in examples:
        key = "".join(sorted(group(e.src_lang) + group(e.tgt_lang), key="HMV".index))
        per_group_pair[key] = per_group_pair.get(key, 0) + 1
        per_language[e.src_lang] += 1
        per_language[e.tgt_lang] += 1
    assert all(per_language.values())  # every language has some bitext
    very_low = per_group_pair.get("HV", 0) + per_group_pair.get("MV", 0) + per_group_pair.get("VV", 0)
    assert per_group_pair["HH"] > 8 * very_low > 0
    assert per_group_pair["HH"] > per_group_pair["HM"] > per_group_pair["MM"] > 0
    assert max(per_language[c] for c in ALL if group(c) == "V") * 20 < min(per_language[c] for c in ALL
                                                                            if group(c) == "H")
    # Both directions of a pair occur; no V-V bitext (those directions are zero-shot).
    assert {(e.src_lang, e.tgt_lang) for e in examples} >= {("en", "fr"), ("fr", "en")}
    assert not [e for e in examples if group(e.src_lang) == group(e.tgt_lang) == "V"]
    assert sum(pretraining_pair_weights(ALL).values()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- linguistics
def _inherited_share(child, parent) -> float:
    rules = child.spec.sound_changes
    return statistics.mean(child.lexicon[c] == sound_change(parent.lexicon[c], rules) for c in CONTENT_CONCEPTS)


def test_relatives_share_roots_through_regular_sound_changes():
    languages = build_languages(0)
    assert sound_change("chante", LANGUAGE_SPECS["oc"].sound_changes) == "canta"
    oc, fr, nl, de = languages["oc"], languages["fr"], languages["nl"], languages["de"]
    assert _inherited_share(oc, fr) > 0.6 and _inherited_share(nl, de) > 0.7
    # The same rules do not turn an unrelated language's words into the child's.
    for unrelated in ("en", "de", "ja", "wo", "sd"):
        assert _inherited_share(oc, languages[unrelated]) < 0.05
    for unrelated in ("en", "fr", "ja", "zh", "oc"):
        assert _inherited_share(nl, languages[unrelated]) < 0.05

    def similarity(a, b) -> float:
        return statistics.mean(difflib.SequenceMatcher(None, a.lexicon[c], b.lexicon[c]).ratio()
                               for c in CONTENT_CONCEPTS)

    assert similarity(oc, fr) > similarity(oc, languages["en"]) + 0.3
    assert similarity(nl, de) > similarity(nl, languages["en"]) + 0.3
    assert oc.feminine == fr.feminine  # grammatical gender is inherited


def _position(words: list[str], form: str, function_words: set[str]) -> int:
    """Index of the word of ``form`` (the form itself or form + suffixes, never a function word)."""
    return next(i for i, w in enumerate(w.lower() for w in words)
                if w == form or (w.startswith(form) and w not in function_words))


def test_word_orders_and_morphology_differ():
    languages = build_languages(0)
    dog, cat = NounPhrase("dog", definite=True), NounPhrase("cat", definite=True)
    simple = Meaning((Clause(dog, "see", cat, "present"),))

    def order(code: str, meaning: Meaning = simple) -> list[str]:
        language = languages[code]
        words = language.realise(meaning).rstrip(".").split()
        function_words = {language.lexicon[c] for c in FUNCTION_CONCEPTS}
        positions = {role: _position(words, language.lexicon[concept], function_words)
                     for role, concept in (("S", "dog"), ("V", "see"), ("O", "cat"))}
        return sorted(positions, key=positions.get)

    assert order("en") == order("fr") == order("zh") == ["S", "V", "O"]
    assert order("ja") == order("sd") == ["S", "O", "V"]
    assert order("wo") == ["V", "S", "O"]
    assert order("de") == ["S", "V", "O"]
    # Verb second: a time word first pushes the subject after the verb; a subordinate clause puts it last.
    assert order("de", Meaning((Clause(dog, "see", cat, "present", time="today"),))) == ["V", "S", "O"]
    because = Meaning((Clause(NounPhrase("man"), "sleep", None, "past"), Clause(dog, "see", cat, "present")), "because")
    assert languages["de"].realise(because).rstrip(".").split()[-1].startswith(languages["de"].lexicon["see"])

    # Morphology: plural and gender agreement (fr), case particles (ja), case suffix (sd), none (zh).
    plural = Meaning((Clause(NounPhrase("dog", count=0, adjective="big"), "sleep", None, "present"),))
    fr = languages["fr"]
    fr_words = fr.realise(plural).rstrip(".").lower().split()
    assert fr.lexicon["dog"] + fr.lexicon["PL"] in fr_words
    assert any(w.startswith(fr.lexicon["big"]) and w.endswith(fr.lexicon["ADJ.PL"]) for w in fr_words)
    assert languages["ja"].lexicon["SUBJ"] in languages["ja"].realise(simple).split()
    sd = languages["sd"]
    assert sd.lexicon["cat"] + sd.lexicon["OBJ"] in sd.realise(simple).lower().split()
    zh = languages["zh"]
    assert len(zh.realise(simple).split()) == 3 < len(languages["en"].realise(simple).split())


def test_make_tokenizer_trains_on_the_given_text(tmp_path):
    from lslo.testing import make_tokenizer

    words = ["zorblax", "quintaro", "mefistel"]
    texts = [" ".join(random.Random(i).choices(words, k=6)) for i in range(300)]
    tokenizer = make_tokenizer(tmp_path, 60, iter(texts))
    assert tokenizer.tokenize("zorblax quintaro") == ["▁zorblax", "▁quintaro"]
    assert tokenizer("zorblax")["input_ids"][0] == tokenizer.get_lang_id("en")  # language tokens are there
    with pytest.raises(TypeError, match="iterable of sentences"):
        make_tokenizer(tmp_path, 60, "zorblax quintaro")
    with pytest.raises(ValueError, match="vocab_size"):
        make_tokenizer(tmp_path, 3, texts)


# ----------------------------------------------------------------------------------- base model
# Seconds of pretraining on high-resource pairs of a small meaning space (a fifth of the concepts):
# enough to translate far above chance (58 BLEU after 500 steps, 28 s CPU on the 2-core machine).
TINY_SPEC = CorpusSpec(languages=("en", "fr", "de"), dev_size=10, devtest_size=40, pretrain_size=6000, concepts=0.2,
                       seed=3)
BLEU_FLOOR = 20.0  # mean BLEU of the 6 H2H directions, greedy, sacrebleu 13a; chance is ~1


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from lslo.demo.base_model import PretrainConfig, pretrain_base_model

    root = tmp_path_factory.mktemp("demo")
    write_corpus(root / "corpus", TINY_SPEC)
    config = PretrainConfig(d_model=64, layers=2, heads=4, ffn_dim=128, vocab_size=300, steps=400, max_tokens=1024,
                            lr=7e-3, warmup=50, dropout=0.0)
    result = pretrain_base_model(root / "corpus", root / "model", config, progress=False)
    return root, result


def test_pretrained_folder_loads_unchanged(tiny_base):
    from transformers import AutoTokenizer, M2M100Tokenizer

    root, result = tiny_base
    folder = root / "model"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    model = lslo.load_base_model(str(folder))
    tokenizer = M2M100Tokenizer.from_pretrained(folder)
    assert type(AutoTokenizer.from_pretrained(folder)) is M2M100Tokenizer
    assert model.config.d_model == 64 and model.config.vocab_size > max(tokenizer.lang_code_to_id.values())
    assert tokenizer.get_lang_id("oc") < model.config.vocab_size
    # The tokenizer was trained on the corpus: whole words and syllables, not characters.
    text = " ".join(generate_corpus(TINY_SPEC).devtest["fr"])
    assert len(tokenizer.tokenize(text)) < 0.5 * len(text.replace(" ", ""))
    assert result.steps == 400 and result.losses[-1][1] < result.losses[0][1] - 1.0


def test_pretrained_model_translates_high_resource_directions(tiny_base):
    from transformers import M2M100Tokenizer

    from lslo.evaluate import Scorer, evaluate
    from lslo.testing import one_thread

    root, _ = tiny_base
    model = lslo.load_base_model(str(root / "model"))
    tokenizer = M2M100Tokenizer.from_pretrained(root / "model")
    references = load_flores(root / "corpus", ["en", "fr", "de"], "devtest")
    with one_thread():
        rows = evaluate(model, tokenizer, references, None, num_beams=1, max_new_tokens=64, scorer=Scorer(warn=False),
                        progress=False, keep_hypotheses=True)
    assert len(rows) == 6
    bleu = statistics.mean(row["bleu"] for row in rows)
    # Chance level: the same hypotheses scored against the references of other sentences.
    rng = random.Random(0)
    shuffled = []
    for row in rows:
        refs = list(references[row["tgt"]])
        rng.shuffle(refs)
        shuffled.append(sacrebleu.corpus_bleu(row["hypotheses"], [refs]).score)
    chance = statistics.mean(shuffled)
    assert bleu >= BLEU_FLOOR, (bleu, chance)
    assert bleu > chance + 8, (bleu, chance)
