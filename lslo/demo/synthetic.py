"""Artificial languages and a multi-way parallel corpus for the demo: no download, seeded, deterministic.

Every sentence is first drawn as a *meaning* from one small probabilistic grammar over concepts
(people, animals, food, things, places; actions with selectional restrictions; attributes;
numbers; tense; negation; place and time phrases; two clauses joined by a connective), then
realised in each artificial language. The languages differ the way real ones do:

- **vocabulary**: every language generates its own words from its own syllable inventory
  (``fr``-like words look nothing like ``ja``-like ones);
- **word order**: SVO, SOV, VSO and German-like verb-second (finite verb second in a main clause,
  final in a subordinate one; a future auxiliary in second place and the verb at the end);
  adjectives before or after the noun; prepositions or postpositions; subordinate clause first
  in the SOV languages;
- **morphology**: grammatical gender with agreeing articles and adjectives, plural suffixes,
  case particles or case suffixes, object case on articles, tense suffixes or particles, verb
  agreement with a plural subject, classifiers after numerals, post-nominal articles, one- and
  two-part negation;
- **relatives**: ``oc`` descends from ``fr`` and ``nl`` from ``de``: most roots and function words
  are the parent's, passed through regular sound changes (like Occitan next to French), a few
  are their own, and the grammar differs in a couple of points.

The languages are **artificial**. They carry real M2M-100 codes only as stand-ins, so that an
M2M-100 tokenizer has a language token for each and :data:`lslo.config.RESOURCE_GROUPS` gives the
resource group the paper gives the real language (``en`` high, ``nl`` medium, ``oc`` very low).
Scores on them say nothing about the real languages.

Files (:func:`write_corpus`): the FLORES-101 layout (``dev/eng.dev``, ``devtest/eng.devtest``,
... one sentence per line, line i of every language a translation of line i of the others) that
:func:`lslo.data.load_flores` reads, and ``pretrain.tsv``
(``src_lang<TAB>tgt_lang<TAB>source<TAB>target``): an imbalanced many-to-many corpus, lots of
high-resource pairs and little very-low-resource data, as the bitext behind M2M-100.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..io import atomic_write_file

__all__ = [
    "CONTENT_CONCEPTS",
    "DEFAULT_LANGUAGES",
    "FLORES_STEMS",
    "FUNCTION_CONCEPTS",
    "LANGUAGE_SPECS",
    "NAMES",
    "Clause",
    "CorpusSpec",
    "Grammar",
    "Language",
    "LanguageSpec",
    "Meaning",
    "NounPhrase",
    "Phonology",
    "build_languages",
    "generate_corpus",
    "pretraining_pair_weights",
    "sample_meaning",
    "sound_change",
    "write_corpus",
]

# ----------------------------------------------------------------------------------- concepts
# Concepts are named by an English gloss; the artificial languages never use these strings.
_NOUN_CLASSES: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "child", "teacher", "farmer", "doctor", "king", "queen", "friend", "soldier",
               "girl", "boy", "merchant", "priest", "fisherman", "student", "mother", "father", "sister",
               "brother", "baker", "judge", "singer", "hunter"),
    "animal": ("dog", "cat", "horse", "bird", "cow", "wolf", "goat", "sheep", "bear", "fox", "lion", "mouse"),
    "food": ("bread", "apple", "rice", "milk", "meat", "cheese", "soup", "egg", "fish", "honey", "wine", "cake"),
    "thing": ("book", "letter", "stone", "knife", "box", "basket", "hat", "ring", "lamp", "key", "rope", "cup",
              "coat", "flower", "chair", "table", "tree"),
    "place": ("house", "boat", "bridge", "wall", "tower", "city", "village", "river", "forest", "garden",
              "market", "mountain", "field", "school", "road", "church", "lake", "island"),
}
NOUN_CLASS = {noun: cls for cls, nouns in _NOUN_CLASSES.items() for noun in nouns}
NOUNS = tuple(NOUN_CLASS)
_ANIMATE = _NOUN_CLASSES["person"] + _NOUN_CLASSES["animal"]
_PORTABLE = _NOUN_CLASSES["food"] + _NOUN_CLASSES["thing"][:14]  # not chairs, tables and trees
# verb -> (subjects, objects or None for intransitive)
_VERBS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    "see": (_ANIMATE, NOUNS),
    "find": (_ANIMATE, _PORTABLE + _NOUN_CLASSES["animal"]),
    "love": (_NOUN_CLASSES["person"], _ANIMATE + _NOUN_CLASSES["food"] + _NOUN_CLASSES["place"]),
    "help": (_NOUN_CLASSES["person"], _ANIMATE),
    "follow": (_ANIMATE, _ANIMATE),
    "fear": (_ANIMATE, _ANIMATE),
    "eat": (_ANIMATE, _NOUN_CLASSES["food"]),
    "buy": (_NOUN_CLASSES["person"], _PORTABLE + _NOUN_CLASSES["animal"]),
    "sell": (_NOUN_CLASSES["person"], _PORTABLE + _NOUN_CLASSES["animal"]),
    "carry": (_NOUN_CLASSES["person"] + ("horse", "cow"), _PORTABLE),
    "make": (_NOUN_CLASSES["person"], _NOUN_CLASSES["food"][6:] + _NOUN_CLASSES["thing"]),
    "read": (_NOUN_CLASSES["person"], ("book", "letter")),
    "write": (_NOUN_CLASSES["person"], ("book", "letter")),
    "build": (_NOUN_CLASSES["person"], ("house", "boat", "bridge", "wall", "tower", "school", "church", "road")),
    "open": (_NOUN_CLASSES["person"], ("box", "basket", "book", "letter")),
    "wash": (_NOUN_CLASSES["person"], _ANIMATE + ("cup", "coat", "hat", "table", "knife")),
    "hide": (_ANIMATE, _PORTABLE),
    "lose": (_NOUN_CLASSES["person"], _PORTABLE),
    "sleep": (_ANIMATE, None),
    "run": (_ANIMATE, None),
    "walk": (_ANIMATE, None),
    "sing": (_NOUN_CLASSES["person"] + ("bird",), None),
    "laugh": (_NOUN_CLASSES["person"], None),
    "cry": (_NOUN_CLASSES["person"], None),
    "work": (_NOUN_CLASSES["person"] + ("horse",), None),
    "swim": (_ANIMATE, None),
    "dance": (_NOUN_CLASSES["person"], None),
    "wait": (_ANIMATE, None),
}
VERBS = tuple(_VERBS)
_ALL_ADJ = ("big", "small", "old", "new", "good", "bad", "beautiful", "heavy", "red", "white", "black", "green")
_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "person": ("big", "small", "old", "young", "good", "bad", "happy", "sad", "tired", "rich", "poor", "clever",
               "strong", "beautiful", "quiet"),
    "animal": ("big", "small", "old", "young", "good", "bad", "black", "white", "red", "strong", "tired",
               "beautiful", "quiet", "clever"),
    "food": ("big", "small", "good", "bad", "hot", "cold", "fresh", "red", "white", "green", "heavy"),
    "thing": _ALL_ADJ + ("long", "hot", "cold"),
    "place": _ALL_ADJ + ("long", "quiet", "rich", "poor", "cold"),
}
ADJECTIVES = tuple(dict.fromkeys(a for adjs in _ADJECTIVES.values() for a in adjs))
# preposition -> nouns it takes
_PLACES: dict[str, tuple[str, ...]] = {
    "in": _NOUN_CLASSES["place"],
    "near": _NOUN_CLASSES["place"] + ("tree", "table", "chair"),
    "under": ("bridge", "tree", "table", "chair", "boat"),
    "behind": ("house", "wall", "tower", "school", "church", "tree", "market"),
    "with": _ANIMATE,
}
TIMES = {"yesterday": ("past",), "today": ("past", "present", "future"), "tomorrow": ("future",),
         "now": ("present",), "often": ("past", "present")}
CONNECTIVES = ("and", "but", "because", "when")
_SUBORDINATORS = ("because", "when")
NAMES = ("Maria", "Ali", "Jonas", "Amina", "Pedro", "Yuki", "Omar", "Lena", "Karim", "Sofia", "Tomas", "Nadia",
         "Ibrahim", "Elena", "Kofi", "Ana")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
TENSES = ("past", "present", "future")
# Grammatical morphemes: realised as a word or an affix, depending on the language.
FUNCTION_CONCEPTS = (
    "DEF", "DEF.F", "DEF.PL", "DEF.OBJ", "INDEF", "INDEF.F", "INDEF.PL", "PL", "ADJ.F", "ADJ.PL", "CLF",
    "SUBJ", "OBJ", "PAST", "PRES", "FUT", "AGR.PL", "NEG", "NEG2",
)
CONTENT_CONCEPTS = (NOUNS + VERBS + ADJECTIVES + tuple(_PLACES) + tuple(TIMES) + CONNECTIVES
                    + tuple(NUMBER_WORDS.values()))


def _zipf_weights(items: Sequence[str], salt: str, exponent: float = 0.8) -> dict[str, float]:
    """Zipf weights over ``items`` in a fixed shuffled order, summing to 1: a few concepts are
    frequent, many rare (as in real text, a small fine-tuning set leaves rare words unseen)."""
    order = list(items)
    random.Random(salt).shuffle(order)
    raw = [1.0 / (rank + 1) ** exponent for rank in range(len(order))]
    return {item: weight / sum(raw) for item, weight in zip(order, raw)}


# Each noun class has the same total mass; inside a class, Zipf.
_NOUN_WEIGHT = {n: w for cls, nouns in _NOUN_CLASSES.items() for n, w in _zipf_weights(nouns, f"zipf:{cls}").items()}
_VERB_WEIGHT = _zipf_weights(VERBS, "zipf:verbs")


@functools.cache
def _cumulative(items: tuple[str, ...], table: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    weights = _NOUN_WEIGHT if table == "noun" else _VERB_WEIGHT
    return items, tuple(itertools.accumulate(weights[i] for i in items))


# ----------------------------------------------------------------------------------- meanings
@dataclass(frozen=True)
class NounPhrase:
    """A noun phrase: a common noun (concept) or a proper name.

    ``count``: 1 singular, 0 plural without a number, 2..99 a number (2..5 as words, larger in digits).
    """

    noun: str
    count: int = 1
    definite: bool = False
    adjective: str | None = None
    name: bool = False

    @property
    def plural(self) -> bool:
        return self.count != 1


@dataclass(frozen=True)
class Clause:
    """One clause: subject, verb, optional object, optional place phrase ``(preposition, NP)`` and time word."""

    subject: NounPhrase
    verb: str
    obj: NounPhrase | None
    tense: str
    negated: bool = False
    place: tuple[str, NounPhrase] | None = None
    time: str | None = None


@dataclass(frozen=True)
class Meaning:
    """A sentence's meaning: one clause, or two joined by a connective (``and``, ``but``, ``because``, ``when``)."""

    clauses: tuple[Clause, ...]
    connective: str | None = None


def _sample(rng: random.Random, items: tuple[str, ...], table: str) -> str:
    items, cumulative = _cumulative(items, table)
    return rng.choices(items, cum_weights=cumulative)[0]


@dataclass(frozen=True)
class _Inventory:
    """The concepts sentences may use: verb -> (subjects, objects), adjectives per noun class,
    preposition -> nouns, names. The full inventory, or its most frequent share (:func:`_inventory`)."""

    verbs: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]]
    adjectives: dict[str, tuple[str, ...]]
    places: dict[str, tuple[str, ...]]
    names: tuple[str, ...]


@functools.cache
def _inventory(share: float = 1.0) -> _Inventory:
    """The ``share`` most frequent nouns of each class and verbs (by their Zipf weight; at least 2
    nouns per class), the first adjectives of each class and the first names; verbs and
    prepositions left without a possible subject, object or noun are dropped."""
    def top(items: Sequence[str], weight: Mapping[str, float] | None = None, least: int = 2) -> tuple[str, ...]:
        ranked = sorted(items, key=lambda item: -weight[item]) if weight is not None else list(items)
        return tuple(ranked[: max(least, round(share * len(ranked)))])

    nouns = {n for nouns in _NOUN_CLASSES.values() for n in top(nouns, _NOUN_WEIGHT)}

    def kept(items: Sequence[str]) -> tuple[str, ...]:
        return tuple(n for n in items if n in nouns)

    verbs = {}
    for verb in top(VERBS, _VERB_WEIGHT, least=4):
        subjects, objects = _VERBS[verb]
        if kept(subjects) and (objects is None or kept(objects)):
            verbs[verb] = (kept(subjects), None if objects is None else kept(objects))
    places = {p: kept(nouns_of) for p, nouns_of in _PLACES.items() if kept(nouns_of)}
    adjectives = {cls: top(adjs) for cls, adjs in _ADJECTIVES.items()}
    return _Inventory(verbs, adjectives, places, top(NAMES))


def _sample_np(rng: random.Random, allowed: tuple[str, ...], inventory: _Inventory,
               allow_name: bool = False) -> NounPhrase:
    if allow_name and rng.random() < 0.12:
        return NounPhrase(rng.choice(inventory.names), name=True)
    noun = _sample(rng, allowed, "noun")
    roll = rng.random()
    count = 1 if roll < 0.62 else 0 if roll < 0.78 else rng.randint(2, 5) if roll < 0.94 else rng.randint(6, 40)
    adjective = rng.choice(inventory.adjectives[NOUN_CLASS[noun]]) if rng.random() < 0.33 else None
    return NounPhrase(noun, count=count, definite=rng.random() < 0.6, adjective=adjective)


def _has_people(nouns: tuple[str, ...]) -> bool:
    return any(NOUN_CLASS[n] == "person" for n in nouns)


def _sample_clause(rng: random.Random, inventory: _Inventory) -> Clause:
    verb = _sample(rng, tuple(inventory.verbs), "verb")
    subjects, objects = inventory.verbs[verb]
    subject = _sample_np(rng, subjects, inventory, allow_name=_has_people(subjects))  # names where people may stand
    obj = _sample_np(rng, objects, inventory, allow_name=_has_people(objects)) if objects is not None else None
    tense = rng.choices(TENSES, (0.4, 0.35, 0.25))[0]
    place = None
    if rng.random() < (0.3 if obj is not None else 0.55):
        preposition = rng.choice(tuple(inventory.places))
        nouns = inventory.places[preposition]
        place = (preposition, _sample_np(rng, nouns, inventory, allow_name=preposition == "with"))
    time = None
    if rng.random() < 0.25:
        time = rng.choice([t for t, tenses in TIMES.items() if tense in tenses])
    return Clause(subject, verb, obj, tense, negated=rng.random() < 0.15, place=place, time=time)


def sample_meaning(rng: random.Random, concepts: float = 1.0) -> Meaning:
    """Draw one sentence meaning from the grammar (70% one clause, 30% two joined by a connective).

    Args:
        rng: the random source (the meaning is a function of its state).
        concepts: share of the concept inventory used, most frequent first (1.0: all of it).
    """
    if isinstance(concepts, bool) or not isinstance(concepts, (int, float)) or not 0 < concepts <= 1:
        raise ValueError(f"concepts must be in (0, 1], got {concepts!r}")
    inventory = _inventory(float(concepts))
    if rng.random() < 0.7:
        return Meaning((_sample_clause(rng, inventory),))
    return Meaning((_sample_clause(rng, inventory), _sample_clause(rng, inventory)),
                   connective=rng.choice(CONNECTIVES))


# ------------------------------------------------------------------------------------ languages
@dataclass(frozen=True)
class Phonology:
    """Syllable inventory a language builds its words from: onset + vowel + coda, ``syllables`` per root."""

    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]
    syllables: tuple[int, int] = (1, 2)

    def word(self, rng: random.Random, syllables: int | None = None) -> str:
        count = syllables if syllables is not None else rng.randint(*self.syllables)
        return "".join(rng.choice(self.onsets) + rng.choice(self.vowels) + rng.choice(self.codas)
                       for _ in range(count))

    def affix(self, rng: random.Random) -> str:
        """A short suffix: a vowel, vowel + coda, or onset + vowel."""
        shape = rng.random()
        if shape < 0.3:
            return rng.choice(self.vowels)
        if shape < 0.65:
            return rng.choice(self.vowels) + (rng.choice([c for c in self.codas if c] or [""]))
        return rng.choice(self.onsets) + rng.choice(self.vowels)


@dataclass(frozen=True)
class Grammar:
    """How a language realises a meaning.

    order: "SVO", "SOV", "VSO" or "V2" (finite verb second in main clauses, last in subordinate ones).
    tense: tense -> how it is marked: "suffix" (on the verb), "pre" / "post" (a particle word before or
        after the verb), None (unmarked). A "pre" future in a V2 language is an auxiliary in second place.
    negation: "pre", "post" (particle), "suffix" (on the verb) or "circum" (two particles around the verb).
    case: "none", "particle" (a word after the subject and the object) or "suffix" (on the object's last word).
    """

    order: str = "SVO"
    adjective_first: bool = True
    articles: bool = True
    article_after: bool = False          # the article follows the noun phrase (as Wolof "xaj bi")
    gender: bool = False                 # two genders: articles and adjectives agree
    object_article: bool = False         # a masculine singular definite object takes DEF.OBJ (de "den")
    indefinite_plural_article: bool = False  # fr "des"
    plural_suffix: bool = True
    adjective_agreement: bool = False    # adjectives take ADJ.F / ADJ.PL
    classifier: bool = False             # number + classifier + noun (zh)
    number_after_noun: bool = False      # noun + number (+ classifier) (ja)
    case: str = "none"
    tense: Mapping[str, str | None] = field(default_factory=lambda: {"past": "suffix", "present": None,
                                                                      "future": "pre"})
    agreement: bool = False              # AGR.PL on the verb of a plural subject
    negation: str = "pre"
    prepositions: bool = True
    subordinate_first: bool = False      # "[because X] Y" with the connective after the clause (ja)
    time_first: bool = True              # the time word opens the clause (else it closes it)


@dataclass(frozen=True)
class LanguageSpec:
    """One artificial language: its stand-in code, resource group, phonology and grammar.

    A relative (``parent`` set) takes ``inherit`` of its words from the parent through ``sound_changes``
    (ordered ``(regex, replacement)`` rules) and draws the rest from the parent's phonology passed
    through the same changes.
    """

    code: str
    group: str
    description: str
    grammar: Grammar
    phonology: Phonology | None = None
    parent: str | None = None
    sound_changes: tuple[tuple[str, str], ...] = ()
    inherit: float = 0.85


def sound_change(word: str, rules: Sequence[tuple[str, str]]) -> str:
    """Apply ordered sound-change rules (``re.sub`` each in turn) to a word: the regular
    correspondences between relatives (fr ``-e`` : oc ``-a``, de ``z`` : nl ``t``)."""
    for pattern, replacement in rules:
        word = re.sub(pattern, replacement, word)
    return word


_EN = Phonology(("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "w", "th", "sh", "st", "br",
                 "cl", "tr"), ("a", "e", "i", "o", "u", "ee", "oo", "ai", "ea"),
                ("", "n", "t", "s", "d", "k", "ng", "ll", "rd", "p"), (1, 2))
_FR = Phonology(("b", "d", "f", "g", "j", "l", "m", "n", "p", "r", "s", "t", "v", "ch", "gr", "pl", "tr", "br"),
                ("a", "e", "i", "o", "ou", "eau", "ai", "é", "è", "u", "oi", "au"),
                ("", "", "", "n", "r", "l", "s", "t"), (1, 2))
_DE = Phonology(("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "w", "z", "sch", "st", "kr",
                 "pf", "gl"), ("a", "e", "i", "o", "u", "ä", "ö", "ü", "ei", "au", "ie"),
                ("", "n", "t", "r", "ch", "ng", "lt", "st", "k", "nd"), (1, 2))
_JA = Phonology(("k", "s", "t", "n", "h", "m", "y", "r", "w", "g", "z", "b", "sh", "ch", "ts", "d", "p"),
                ("a", "i", "u", "e", "o"), ("", "", "", "", "n"), (2, 3))
_ZH = Phonology(("b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "zh", "ch", "sh", "r",
                 "z", "c", "s"), ("a", "o", "e", "i", "u", "ai", "ei", "ao", "ou", "ia", "ie", "iu", "ua", "uo",
                                  "ui"), ("", "", "n", "ng"), (1, 2))
_WO = Phonology(("b", "d", "g", "j", "k", "l", "m", "n", "ñ", "ng", "mb", "nd", "s", "t", "w", "y", "f", "r",
                 "x"), ("a", "e", "i", "o", "u", "aa", "ee", "ii", "oo", "uu", "ë"),
                ("", "", "l", "m", "n", "t", "k", "b", "x"), (1, 2))
_SD = Phonology(("b", "bh", "d", "dh", "g", "gh", "j", "k", "kh", "l", "m", "n", "p", "ph", "r", "s", "sh", "t",
                 "th", "w", "y", "z"), ("a", "aa", "i", "ii", "u", "uu", "e", "o"),
                ("", "", "n", "r", "t", "m"), (1, 2))

# Regular correspondences, applied in order (the parent's spelling in, the relative's out).
_FR_TO_OC = ((r"eau", "èu"), (r"ou", "o"), (r"oi", "è"), (r"ch", "c"), (r"j", "g"), (r"v", "b"), (r"é$", "at"),
             (r"e$", "a"), (r"ai", "a"), (r"au", "al"))
_DE_TO_NL = ((r"ei", "ij"), (r"au", "ou"), (r"pf", "p"), (r"z", "t"), (r"ä", "e"), (r"ö", "eu"), (r"ü", "u"),
             (r"ie", "ee"), (r"ch$", "g"), (r"st$", "s"))

LANGUAGE_SPECS: dict[str, LanguageSpec] = {
    "en": LanguageSpec("en", "H", "SVO, articles, plural suffix, past suffix, future particle, negation particle",
                       Grammar(), _EN),
    "fr": LanguageSpec(
        "fr", "H", "SVO, two genders (articles and adjectives agree), adjective after the noun, two-part "
        "negation, tense suffixes, verb agreement",
        Grammar(adjective_first=False, gender=True, indefinite_plural_article=True, adjective_agreement=True,
                tense={"past": "suffix", "present": "suffix", "future": "suffix"}, agreement=True,
                negation="circum"), _FR),
    "de": LanguageSpec(
        "de", "H", "verb-second (verb-final in subordinate clauses, future auxiliary), two genders, object case "
        "on the article, tense suffixes, verb agreement",
        Grammar(order="V2", gender=True, object_article=True, tense={"past": "suffix", "present": None,
                                                                      "future": "pre"},
                agreement=True, negation="post"), _DE),
    "nl": LanguageSpec(
        "nl", "M", "relative of de (sound changes, 85% shared roots); verb-second, no object case, no verb "
        "agreement", Grammar(order="V2", gender=True, tense={"past": "suffix", "present": None, "future": "pre"},
                              negation="post"), parent="de", sound_changes=_DE_TO_NL),
    "ja": LanguageSpec(
        "ja", "M", "SOV, no articles or plural, case particles, postpositions, number + classifier after the "
        "noun, tense and negation suffixes, subordinate clause first",
        Grammar(order="SOV", articles=False, plural_suffix=False, classifier=True, number_after_noun=True,
                case="particle", tense={"past": "suffix", "present": "suffix", "future": "suffix"},
                negation="suffix", prepositions=False, subordinate_first=True), _JA),
    "zh": LanguageSpec(
        "zh", "M", "SVO, no articles, no inflection, numeral classifiers, aspect particle after the verb, "
        "future particle before it",
        Grammar(articles=False, plural_suffix=False, classifier=True,
                tense={"past": "post", "present": None, "future": "pre"}), _ZH),
    "oc": LanguageSpec(
        "oc", "V", "relative of fr (sound changes, 80% shared roots); one-part negation after the verb",
        Grammar(adjective_first=False, gender=True, adjective_agreement=True,
                tense={"past": "suffix", "present": "suffix", "future": "suffix"}, agreement=True,
                negation="post"), parent="fr", sound_changes=_FR_TO_OC, inherit=0.8),
    "wo": LanguageSpec(
        "wo", "V", "VSO, articles after the noun, adjective after the noun, tense and negation particles, "
        "time word last", Grammar(order="VSO", adjective_first=False, article_after=True, plural_suffix=False,
                                   tense={"past": "pre", "present": "pre", "future": "pre"}, negation="post",
                                   time_first=False), _WO),
    "sd": LanguageSpec(
        "sd", "V", "SOV, no articles, object case suffix, postpositions, tense suffixes, verb agreement, "
        "subordinate clause first",
        Grammar(order="SOV", articles=False, case="suffix", tense={"past": "suffix", "present": "suffix",
                                                                    "future": "suffix"},
                agreement=True, prepositions=False, subordinate_first=True), _SD),
}
# FLORES-101 file stems of the stand-in codes (as lslo.data.FLORES101_CODES).
FLORES_STEMS = {"en": "eng", "fr": "fra", "de": "deu", "nl": "nld", "ja": "jpn", "zh": "zho_simpl", "oc": "oci",
                "wo": "wol", "sd": "snd"}
DEFAULT_LANGUAGES = tuple(LANGUAGE_SPECS)
_SUFFIXES = frozenset({"PL", "ADJ.F", "ADJ.PL", "PAST", "PRES", "FUT", "AGR.PL"})


class Language:
    """An artificial language built from its spec and a seed: lexicon, genders, realiser.

    Attributes:
        spec: the :class:`LanguageSpec`.
        lexicon: concept -> word (content words, function words) or suffix (``PL``, ``PAST``, ...).
        feminine: nouns of the second gender (languages with gender).
    """

    def __init__(self, spec: LanguageSpec, seed: int, parent: Language | None = None):
        if (spec.parent is None) != (parent is None) or (parent is not None and parent.spec.code != spec.parent):
            raise ValueError(f"language {spec.code!r}: parent {spec.parent!r} needed, got "
                             f"{None if parent is None else parent.spec.code!r}")
        self.spec = spec
        self.grammar = spec.grammar
        rng = random.Random(f"lslo-demo:{seed}:{spec.code}")
        self.lexicon: dict[str, str] = {}
        used: set[str] = set()
        phonology = spec.phonology if parent is None else parent.spec.phonology

        def fresh(concept: str) -> str:
            for attempt in range(1000):
                if concept in _SUFFIXES:
                    form = phonology.affix(rng)
                elif concept in FUNCTION_CONCEPTS or concept in CONNECTIVES or concept in _PLACES:
                    form = phonology.word(rng, 1)
                else:
                    form = phonology.word(rng)
                if parent is not None:
                    form = sound_change(form, spec.sound_changes)
                if form and form not in used and (concept in _SUFFIXES or len(form) > 1 or attempt > 50):
                    return form
            raise RuntimeError(f"could not draw a new word for {concept!r} in {spec.code!r}")

        for concept in FUNCTION_CONCEPTS + CONTENT_CONCEPTS:
            form = None
            if parent is not None and rng.random() < spec.inherit:
                inherited = sound_change(parent.lexicon[concept], spec.sound_changes)
                if inherited and inherited not in used:
                    form = inherited
            if form is None:
                form = fresh(concept)
            self.lexicon[concept] = form
            if concept not in _SUFFIXES:
                used.add(form)
        if parent is not None and parent.grammar.gender:
            self.feminine = set(parent.feminine)
        else:
            self.feminine = {noun for noun in NOUNS if rng.random() < 0.45} if self.grammar.gender else set()

    @property
    def code(self) -> str:
        return self.spec.code

    def __repr__(self) -> str:
        return f"Language({self.spec.code!r}, group={self.spec.group!r})"

    # -------------------------------------------------------------------------- noun phrases
    def _noun_phrase(self, np: NounPhrase, role: str) -> list[str]:
        """role: "subj", "obj" or "obl" (inside a place phrase)."""
        g, lex = self.grammar, self.lexicon
        if np.name:
            words = [np.noun]
        else:
            feminine = np.noun in self.feminine
            noun = lex[np.noun] + (lex["PL"] if np.plural and g.plural_suffix else "")
            adjective = []
            if np.adjective is not None:
                form = lex[np.adjective]
                if g.adjective_agreement:
                    form += (lex["ADJ.F"] if feminine else "") + (lex["ADJ.PL"] if np.plural else "")
                adjective = [form]
            number = []
            if np.count >= 2:
                number = [lex[NUMBER_WORDS[np.count]] if np.count in NUMBER_WORDS else str(np.count)]
                if g.classifier:
                    number.append(lex["CLF"])
            article = []
            if g.articles:
                if np.definite:
                    if np.plural:
                        article = [lex["DEF.PL"]]
                    elif feminine:
                        article = [lex["DEF.F"]]
                    else:
                        article = [lex["DEF.OBJ"] if role == "obj" and g.object_article else lex["DEF"]]
                elif np.count == 1:
                    article = [lex["INDEF.F"] if feminine else lex["INDEF"]]
                elif np.count == 0 and g.indefinite_plural_article:
                    article = [lex["INDEF.PL"]]
            core = adjective + [noun] if g.adjective_first else [noun] + adjective
            words = core + number if g.number_after_noun else number + core
            words = words + article if g.article_after else article + words
        if g.case == "particle" and role in ("subj", "obj"):
            words = words + [lex["SUBJ" if role == "subj" else "OBJ"]]
        elif g.case == "suffix" and role == "obj":
            words = words[:-1] + [words[-1] + "-" + lex["OBJ"] if np.name else words[-1] + lex["OBJ"]]
        return words

    def _place(self, place: tuple[str, NounPhrase]) -> list[str]:
        preposition, np = place
        words = self._noun_phrase(np, "obl")
        return [self.lexicon[preposition]] + words if self.grammar.prepositions else words + [self.lexicon[preposition]]

    # ---------------------------------------------------------------------------------- verbs
    def _verb(self, clause: Clause) -> tuple[list[str], list[str]]:
        """(finite part, non-finite rest): the rest is non-empty only for a V2 future auxiliary."""
        g, lex = self.grammar, self.lexicon
        marker = {"past": "PAST", "present": "PRES", "future": "FUT"}[clause.tense]
        how = g.tense.get(clause.tense)
        stem = lex[clause.verb]
        if how == "suffix":
            stem += lex[marker]
        if g.agreement and clause.subject.plural and not (how == "pre" and g.order == "V2"):
            stem += lex["AGR.PL"]
        if clause.negated and g.negation == "suffix":
            stem += lex["NEG"]
        before, after = [], []
        if how == "pre":
            before.append(lex[marker])
        elif how == "post":
            after.append(lex[marker])
        if clause.negated:
            if g.negation == "pre":
                before.insert(0, lex["NEG"])
            elif g.negation == "post":
                after.append(lex["NEG"])
            elif g.negation == "circum":
                before.insert(0, lex["NEG"])
                after.append(lex["NEG2"])
        if g.order == "V2" and how == "pre":
            auxiliary = lex[marker] + (lex["AGR.PL"] if g.agreement and clause.subject.plural else "")
            finite = [auxiliary] + ([lex["NEG"]] if clause.negated else [])
            return finite, [lex[clause.verb]]
        return before + [stem] + after, []

    def _clause(self, clause: Clause, subordinate: bool) -> list[str]:
        g = self.grammar
        subject = self._noun_phrase(clause.subject, "subj")
        obj = self._noun_phrase(clause.obj, "obj") if clause.obj is not None else []
        place = self._place(clause.place) if clause.place is not None else []
        time = [self.lexicon[clause.time]] if clause.time is not None else []
        finite, rest = self._verb(clause)
        if g.order == "SVO":
            words = subject + finite + rest + obj + place
        elif g.order == "SOV":
            words = subject + place + obj + finite + rest
        elif g.order == "VSO":
            words = finite + rest + subject + obj + place
        elif g.order == "V2":
            if subordinate:
                return time + subject + obj + place + rest + finite
            if time:
                return time + finite + subject + obj + place + rest
            return subject + finite + obj + place + rest
        else:
            raise ValueError(f"unknown word order {g.order!r}")
        return time + words if g.time_first else words + time

    def realise(self, meaning: Meaning) -> str:
        """The sentence for ``meaning`` in this language (capitalised, with a final full stop)."""
        if len(meaning.clauses) == 1:
            words = self._clause(meaning.clauses[0], subordinate=False)
        else:
            first, second = meaning.clauses
            connective = self.lexicon[meaning.connective]
            subordinate = meaning.connective in _SUBORDINATORS
            main = self._clause(first, subordinate=False)
            other = self._clause(second, subordinate=subordinate)
            if subordinate and self.grammar.subordinate_first:
                words = other + [connective] + main
            else:
                words = main + [connective] + other
        text = " ".join(words)
        return text[:1].upper() + text[1:] + "."


def build_languages(seed: int = 0, codes: Sequence[str] = DEFAULT_LANGUAGES) -> dict[str, Language]:
    """Build the artificial languages (a relative's parent is built too, when it is not in ``codes``).

    Args:
        seed: the languages' lexicons and genders depend on it and on nothing else.
        codes: stand-in codes from :data:`LANGUAGE_SPECS`.

    Returns:
        ``{code: Language}`` in the order of ``codes``.
    """
    codes = _check_codes(codes)
    built: dict[str, Language] = {}

    def build(code: str) -> Language:
        if code not in built:
            spec = LANGUAGE_SPECS[code]
            built[code] = Language(spec, seed, build(spec.parent) if spec.parent else None)
        return built[code]

    return {code: build(code) for code in codes}


def _check_codes(codes: Sequence[str]) -> list[str]:
    if isinstance(codes, str):
        raise TypeError("languages must be a list of codes, not one string")
    codes = list(dict.fromkeys(codes))
    unknown = [c for c in codes if c not in LANGUAGE_SPECS]
    if unknown:
        raise ValueError(f"no artificial language for {unknown}; the demo has {', '.join(LANGUAGE_SPECS)}")
    if len(codes) < 2:
        raise ValueError(f"a multilingual corpus needs at least 2 languages, got {codes}")
    return codes


# ------------------------------------------------------------------------------------ the corpus
# Relative amount of pretraining bitext per pair of resource groups: a few million-sentence
# high-resource pairs, medium ones an order less, very-low-resource languages almost nothing and
# only with high-resource ones (as M2M-100's mined and OPUS bitext: Occitan had 5K pairs).
_GROUP_PAIR_WEIGHTS = {("H", "H"): 1.0, ("H", "M"): 0.35, ("M", "M"): 0.04, ("H", "V"): 0.03,
                       ("M", "V"): 0.0, ("V", "V"): 0.0}


def pretraining_pair_weights(codes: Sequence[str]) -> dict[tuple[str, str], float]:
    """Share of the pretraining corpus per unordered language pair (sums to 1).

    English-centric (pairs with ``en`` x2) and relatives (``oc``-``fr``, ``nl``-``de``) x3, on top of
    the per-group weights above. Pairs with weight 0 get no data (zero-shot directions).
    """
    codes = _check_codes(codes)
    weights = {}
    for i, a in enumerate(codes):
        for b in codes[i + 1:]:
            key = tuple(sorted((LANGUAGE_SPECS[a].group, LANGUAGE_SPECS[b].group), key="HMV".index))
            weight = _GROUP_PAIR_WEIGHTS[key]
            if "en" in (a, b):
                weight *= 2
            if LANGUAGE_SPECS[a].parent == b or LANGUAGE_SPECS[b].parent == a:
                weight *= 3
            if weight > 0:
                weights[(a, b)] = weight
    total = sum(weights.values())
    return {pair: weight / total for pair, weight in weights.items()}


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes of the demo corpus.

    dev_size / devtest_size: multi-way sentences per language (FLORES has 997 / 1,012).
    pretrain_size: rows of ``pretrain.tsv`` (one direction each), split over pairs by
        :func:`pretraining_pair_weights`.
    concepts: share of the concept inventory sentences use, most frequent first (1.0: all 83 nouns,
        28 verbs, ...). Less makes a smaller language that a tiny model learns in seconds (tests, --quick).
    """

    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    dev_size: int = 100
    devtest_size: int = 100
    pretrain_size: int = 100_000
    concepts: float = 0.5
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "languages", tuple(_check_codes(self.languages)))
        for name in ("dev_size", "devtest_size", "pretrain_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CorpusSpec.{name} must be a positive int, got {value!r}")
        if isinstance(self.concepts, bool) or not isinstance(self.concepts, (int, float)) or not 0 < self.concepts <= 1:
            raise ValueError(f"CorpusSpec.concepts must be in (0, 1], got {self.concepts!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"CorpusSpec.seed must be an int, got {self.seed!r}")


@dataclass
class SyntheticCorpus:
    """What :func:`generate_corpus` returns: texts per split and language, and the pretraining rows."""

    spec: CorpusSpec
    languages: dict[str, Language]
    dev: dict[str, list[str]]
    devtest: dict[str, list[str]]
    pretrain: list[tuple[str, str, str, str]]  # (src_lang, tgt_lang, source, target)
    meanings: dict[str, list[Meaning]]  # "dev" / "devtest": line i's meaning


def _unique_meanings(rng: random.Random, count: int, exclude: set[Meaning], concepts: float) -> Iterator[Meaning]:
    produced = 0
    while produced < count:
        meaning = sample_meaning(rng, concepts)
        if meaning in exclude:
            continue
        exclude.add(meaning)
        produced += 1
        yield meaning


def generate_corpus(spec: CorpusSpec | None = None, **overrides) -> SyntheticCorpus:
    """Generate the multi-way ``dev`` / ``devtest`` sets and the imbalanced pretraining rows.

    Meanings are unique within and across the three splits (no test sentence is seen in
    pretraining or fine-tuning). Everything depends only on the spec (seed included).

    Args:
        spec: sizes, languages and seed (default :class:`CorpusSpec`); ``overrides`` replace its fields.

    Returns:
        a :class:`SyntheticCorpus`.
    """
    spec = replace(spec or CorpusSpec(), **overrides) if overrides else (spec or CorpusSpec())
    languages = build_languages(spec.seed, spec.languages)
    seen: set[Meaning] = set()
    splits, split_meanings = {}, {}
    for split, size in (("devtest", spec.devtest_size), ("dev", spec.dev_size)):
        rng = random.Random(f"lslo-demo:{spec.seed}:{split}")
        meanings = list(_unique_meanings(rng, size, seen, spec.concepts))
        split_meanings[split] = meanings
        splits[split] = {code: [lang.realise(m) for m in meanings] for code, lang in languages.items()}
    weights = pretraining_pair_weights(spec.languages)
    pairs = list(weights)
    counts = _largest_remainder([weights[p] for p in pairs], spec.pretrain_size)
    rng = random.Random(f"lslo-demo:{spec.seed}:pretrain")
    rows = []
    for (a, b), count in zip(pairs, counts):
        for meaning in _unique_meanings(rng, count, seen, spec.concepts):
            src, tgt = (a, b) if rng.random() < 0.5 else (b, a)
            rows.append((src, tgt, languages[src].realise(meaning), languages[tgt].realise(meaning)))
    rng.shuffle(rows)
    return SyntheticCorpus(spec, languages, splits["dev"], splits["devtest"], rows, split_meanings)


def _largest_remainder(shares: Sequence[float], total: int) -> list[int]:
    """Integer counts proportional to ``shares`` summing to ``total``."""
    raw = [s * total for s in shares]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def write_corpus(directory: str | os.PathLike, spec: CorpusSpec | None = None, **overrides) -> SyntheticCorpus:
    """Generate the corpus and write it in the FLORES-101 layout plus the pretraining TSV.

    Files: ``dev/<stem>.dev``, ``devtest/<stem>.devtest`` (stem as FLORES-101: ``eng``, ``fra``,
    ``zho_simpl``, ...), ``pretrain.tsv`` (header ``src_lang source ...``, then one row per pair),
    ``languages.json`` (each language's group, description, parent, word order and the sizes), and
    ``README.txt`` (these are artificial languages). Each file is written atomically
    (:func:`lslo.io.atomic_write_file`): a reader never sees half a file.

    Args:
        directory: created if missing; existing files of the same names are replaced.
        spec, overrides: as :func:`generate_corpus`.

    Returns:
        the :class:`SyntheticCorpus` written.
    """
    corpus = generate_corpus(spec, **overrides)
    root = Path(directory)
    for split, texts in (("dev", corpus.dev), ("devtest", corpus.devtest)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for code, lines in texts.items():
            _write_text(root / split / f"{FLORES_STEMS[code]}.{split}", "".join(line + "\n" for line in lines))
    header = "src_lang\ttgt_lang\tsource\ttarget\n"
    _write_text(root / "pretrain.tsv", header + "".join("\t".join(row) + "\n" for row in corpus.pretrain))
    per_language = {code: 0 for code in corpus.spec.languages}
    for src, tgt, _, _ in corpus.pretrain:
        per_language[src] += 1
        per_language[tgt] += 1
    info = {
        "note": "ARTIFICIAL languages generated by lslo.demo.synthetic; the codes are stand-ins for the "
                "tokenizer's language tokens and resource groups, not the real languages",
        "seed": corpus.spec.seed,
        "sizes": {"dev": corpus.spec.dev_size, "devtest": corpus.spec.devtest_size,
                  "pretrain": corpus.spec.pretrain_size},
        "languages": {
            code: {"group": lang.spec.group, "flores_stem": FLORES_STEMS[code], "parent": lang.spec.parent,
                   "order": lang.grammar.order, "description": lang.spec.description,
                   "pretrain_sentences": per_language[code]}
            for code, lang in corpus.languages.items() if code in corpus.spec.languages
        },
    }
    _write_text(root / "languages.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    _write_text(root / "README.txt", _README.format(languages=", ".join(corpus.spec.languages)))
    return corpus


_README = """Synthetic corpus of lslo's demo (lslo.demo.synthetic): ARTIFICIAL languages.

The codes ({languages}) are stand-ins: each artificial language borrows a real M2M-100 code so
that the tokenizer has a language token for it and lslo's resource groups apply (en/fr/de high,
nl/ja/zh medium, oc/wo/sd very low). The texts are generated from one meaning grammar; they are
not English, French or any real language, and scores on them say nothing about real languages.

dev/, devtest/   FLORES-101 layout: multi-way parallel, line i of every file is the same meaning
pretrain.tsv     src_lang, tgt_lang, source, target: the imbalanced pretraining bitext
languages.json   groups, parents, word orders and sizes
"""


def _write_text(path: Path, text: str) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)

    atomic_write_file(path, write)
