"""Every FLORES-101 language in one run (issue 23): resource groups for all 101, language tokens
beyond the tokenizer's table, batching and evaluation that scale."""

from __future__ import annotations

import pytest
import torch

import lslo
import lslo.evaluate as ev
import lslo.inference
from lslo.batching import _epoch_generator
from lslo.cli import main
from lslo.config import FLORES101_RESOURCE_GROUPS, GROUP_ORDER, LANGUAGE_SETS, RESOURCE_GROUPS, LSLoConfig
from lslo.data import (
    FLORES101_CODES,
    M2M124_CODES,
    Batches,
    EncodedCorpus,
    all_directions,
    direction_sample_counts,
    encode_examples,
    make_batches,
    multiway_examples,
)
from lslo.evaluate import Scorer, direction_group, score_directions
from lslo.model import read_adapter_config
from lslo.testing import make_sentences, make_tokenizer, randomize_adapters, tiny_model
from lslo.tokenization import decode_ids, encode_sentences, lang_token_id

# M2M-100's 100 language codes, as M2M100Tokenizer's built-in table lists them.
M2M100_TABLE = frozenset(__import__("transformers").models.m2m_100.tokenization_m2m_100.FAIRSEQ_LANGUAGE_CODES["m2m100"])


# ------------------------------------------------------------------------------ resource groups
def test_every_flores101_language_has_a_group_and_the_paper_table_is_kept():
    assert set(FLORES101_RESOURCE_GROUPS) == set(FLORES101_CODES)
    assert set(FLORES101_RESOURCE_GROUPS.values()) <= set(GROUP_ORDER)
    for code, group in RESOURCE_GROUPS.items():  # the paper's 30 win over FLORES-101's classification
        assert FLORES101_RESOURCE_GROUPS[code] == group
    config = LSLoConfig(languages=list(FLORES101_CODES))  # default ranks H;M;L;V = 2;2;8;8
    assert [config.group_of(c) for c in config.languages] == [FLORES101_RESOURCE_GROUPS[c] for c in FLORES101_CODES]
    assert {config.rank_of(c) for c in config.languages} == {2, 8}
    for name in ("lang12", "lang30"):
        paper = LSLoConfig(languages=name)
        assert {c: paper.group_of(c) for c in LANGUAGE_SETS[name]} == {c: RESOURCE_GROUPS[c] for c in LANGUAGE_SETS[name]}


def test_groups_override_and_the_error_names_the_cli_flag():
    assert LSLoConfig(languages=["en", "pl"], groups={"pl": "V"}).rank_of("pl") == 8
    with pytest.raises(ValueError, match=r"--groups kac=V"):
        LSLoConfig(languages=["en", "kac"])  # Jingpho: M2M-124, not FLORES-101, in no table
    with pytest.raises(ValueError, match=r"--groups kac=V"):
        direction_group("en", "kac")


def test_params_takes_languages_all(capsys):
    assert main(["params", "--languages", "all", "--ranks", "2;2;8;8"]) == 0
    out = capsys.readouterr().out
    for code in ("kam", "te", "umb", "zu"):
        assert f"\n  {code} " in out
    assert main(["params", "--languages", "en,kac"]) == 2
    assert "--groups kac=V" in capsys.readouterr().err
    assert main(["params", "--languages", "en,kac", "--groups", "kac=L"]) == 0
    assert "L (low): kac" in capsys.readouterr().out


# ------------------------------------------------------------------------------ language tokens
M2M124_EXTRA = [c for c in M2M124_CODES if c not in M2M100_TABLE]


@pytest.fixture(scope="module")
def tokenizer124(tmp_path_factory):
    """A tokenizer whose table knows M2M-100's 100 codes; M2M-124's other 24 are vocabulary entries."""
    return make_tokenizer(tmp_path_factory.mktemp("tok124"), extra_language_codes=M2M124_EXTRA)


def test_language_tokens_beyond_the_table(tokenizer124):
    assert len(M2M124_EXTRA) == 24 and "kam" in M2M124_EXTRA and "fr" not in M2M124_EXTRA
    for code in M2M124_EXTRA:
        assert code not in tokenizer124.lang_code_to_id
        assert lang_token_id(tokenizer124, code) == tokenizer124.convert_tokens_to_ids(f"__{code}__")
    assert lang_token_id(tokenizer124, "fr") == tokenizer124.lang_code_to_id["fr"]
    assert lslo.inference.lang_token_id is lang_token_id and lslo.lang_token_id is lang_token_id
    with pytest.raises(ValueError, match="no language token for 'xx'"):
        lang_token_id(tokenizer124, "xx")
    # NLLB: the FLORES-200 code is its own (added) token; a bare M2M code is never read as a word piece.
    from transformers import NllbTokenizer

    nllb = NllbTokenizer()
    assert lang_token_id(nllb, "fra_Latn") == nllb.convert_tokens_to_ids("fra_Latn")
    with pytest.raises(ValueError, match="no language token for 'fr'"):
        lang_token_id(nllb, "fr")


def test_encoding_is_lslo_form_without_setting_an_unknown_src_lang(tokenizer124):
    sentences = make_sentences(5, seed=3)
    eos = tokenizer124.eos_token_id
    tokenizer124.src_lang = "de"
    # A code the table knows: exactly the tokenizer's own src_lang form.
    own = []
    for sentence in sentences:
        tokenizer124.src_lang = "fr"
        own.append(tokenizer124(sentence)["input_ids"])
    tokenizer124.src_lang = "de"
    assert encode_sentences(tokenizer124, "fr", sentences) == own
    # A vocabulary-only code: M2M100Tokenizer would raise KeyError on src_lang = "kam".
    with pytest.raises(KeyError):
        tokenizer124.src_lang = "kam"
    tokenizer124.src_lang = "de"
    kam = lang_token_id(tokenizer124, "kam")
    rows = encode_sentences(tokenizer124, "kam", sentences)
    pieces = tokenizer124(sentences, add_special_tokens=False)["input_ids"]
    assert rows == [[kam, *p, eos] for p in pieces]
    assert tokenizer124.src_lang == "de"


def test_decoding_strips_vocabulary_language_tokens(tokenizer124):
    kam, fr = lang_token_id(tokenizer124, "kam"), lang_token_id(tokenizer124, "fr")
    pieces = tokenizer124("Kasa lomi.", add_special_tokens=False)["input_ids"]
    plain = tokenizer124.decode(pieces, skip_special_tokens=True)
    assert "__kam__" in tokenizer124.decode([kam, *pieces], skip_special_tokens=True)  # the bug decode_ids fixes
    assert decode_ids(tokenizer124, [kam, *pieces, kam, tokenizer124.eos_token_id], {kam, fr}) == plain
    model = lslo.apply_lslo(tiny_model(tokenizer124), LSLoConfig(languages=["en", "kam", "te"], ranks=2))
    out = lslo.translate(model, tokenizer124, make_sentences(4, seed=5), ["en", "kam", "te", "en"],
                         ["kam", "te", "en", "te"], num_beams=2, max_new_tokens=8, progress=False)
    assert len(out) == 4 and not any("__" in text for text in out)
    ids = lslo.translate(model, tokenizer124, ["Kasa."], "en", "kam", num_beams=1, max_new_tokens=4,
                         progress=False, return_token_ids=True)
    assert ids[0][0] == kam


# ------------------------------------------------------------------------------ batches
def _old_make_batches(corpus, *, max_tokens, epoch, seed, temperature=5.0, max_sentences=None, epoch_size=None,
                      oversize="error"):
    """lslo.data.make_batches as it was before issue 23 (a per-example Python loop), the reference
    the vectorised cut must reproduce exactly. Argument checks left out."""
    cost = torch.maximum(corpus.src_lengths, corpus.tgt_lengths).long()
    too_long = cost > max_tokens
    eligible = torch.arange(len(corpus))
    if too_long.any():
        assert oversize == "skip"
        eligible = eligible[~too_long]
    generator = _epoch_generator(seed, epoch)
    directions = corpus.direction[eligible].long()
    order = torch.argsort(directions, stable=True)
    grouped = eligible[order]
    sizes = torch.bincount(directions, minlength=len(corpus.directions))
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    counts = direction_sample_counts(sizes, temperature=temperature, total=epoch_size, generator=generator)
    picked = []
    for d in sizes.nonzero().flatten().tolist():
        members = grouped[starts[d] : starts[d + 1]]
        size, count = int(sizes[d]), int(counts[d])
        repeats, rest = divmod(count, size)
        if repeats:
            picked.append(members.repeat(repeats))
        if rest:
            picked.append(members[torch.randperm(size, generator=generator)[:rest]])
    selected = torch.cat(picked)
    selected = selected[torch.randperm(selected.numel(), generator=generator)]
    src_len, tgt_len, longer = corpus.src_lengths[selected].long(), corpus.tgt_lengths[selected].long(), cost[selected]
    base = int(longer.max()) + 1
    if base**3 < 2**62:
        selected = selected[torch.argsort((longer * base + src_len) * base + tgt_len, stable=True)]
    else:
        for key in (corpus.tgt_lengths, corpus.src_lengths, cost):
            selected = selected[torch.argsort(key[selected].long(), stable=True)]
    batches, current, current_max = [], [], 0
    limit = max_sentences if max_sentences is not None else max_tokens
    for index, length in zip(selected.tolist(), cost[selected].tolist()):
        longest = max(current_max, length)
        if current and (longest * (len(current) + 1) > max_tokens or len(current) >= limit):
            batches.append(current)
            current, longest = [], length
        current.append(index)
        current_max = longest
    if current:
        batches.append(current)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _multiway_corpus(tokenizer, codes, lines, seed=0):
    base = make_sentences(lines, seed=seed, max_words=14)
    texts = {code: [" ".join(w[::-1] if k % 2 else w for w in s.split()) + f" {code}" * (k % 3) for s in base]
             for k, code in enumerate(codes)}
    return encode_examples(tokenizer, multiway_examples(texts, all_directions(list(codes))))


def test_batches_identical_to_the_old_loop_on_lang12(tokenizer124):
    corpus = _multiway_corpus(tokenizer124, LANGUAGE_SETS["lang12"], 40)
    settings = [{"max_tokens": 256, "epoch": 1, "seed": 0}, {"max_tokens": 97, "epoch": 3, "seed": 5, "max_sentences": 3},
                {"max_tokens": 4096, "epoch": 2, "seed": 1, "temperature": 1.0, "epoch_size": 3001},
                {"max_tokens": 40, "epoch": 1, "seed": 2, "temperature": 2.0, "oversize": "skip"}]
    for kwargs in settings:
        new = make_batches(corpus, **kwargs)
        old = _old_make_batches(corpus, **kwargs)
        assert isinstance(new, Batches) and new == old and new.tolist() == old, kwargs
        assert new[1:3] == old[1:3] and new[-1] == old[-1]
    assert make_batches(corpus, **settings[0]) == make_batches(corpus, **settings[0])
    assert make_batches(corpus, **settings[0]) != make_batches(corpus, **{**settings[0], "epoch": 2})
    # An imbalanced (TSV-like) corpus: upsampled directions repeat examples.
    keep = torch.cat([torch.arange(0, len(corpus), 7), torch.arange(3, 400)])
    small = EncodedCorpus(languages=corpus.languages, directions=corpus.directions, tokens=corpus.tokens,
                          segment_offsets=corpus.segment_offsets, src_segment=corpus.src_segment[keep],
                          tgt_segment=corpus.tgt_segment[keep], direction=corpus.direction[keep])
    assert make_batches(small, max_tokens=300, epoch=4, seed=7) == _old_make_batches(small, max_tokens=300, epoch=4,
                                                                                       seed=7)


def test_batches_respect_the_budget_at_101_languages(tokenizer124):
    corpus = _multiway_corpus(tokenizer124, FLORES101_CODES, 12, seed=4)
    assert len(corpus.directions) == 101 * 100
    batches = make_batches(corpus, max_tokens=512, epoch=1, seed=0)
    assert batches == _old_make_batches(corpus, max_tokens=512, epoch=1, seed=0)
    assert sorted(batches.flat().tolist()) == list(range(len(corpus)))  # equal sizes: one pass over every example
    batch_of = torch.repeat_interleave(torch.arange(len(batches)), batches.sizes)
    for lengths in (corpus.src_lengths, corpus.tgt_lengths):
        longest = torch.zeros(len(batches), dtype=torch.int64).scatter_reduce(
            0, batch_of, lengths[batches.flat()].long(), "amax")
        assert int((longest * batches.sizes).max()) <= 512
    mixed = {tuple(corpus.direction[torch.as_tensor(b)].unique().tolist()) for b in batches[:20]}
    assert any(len(d) > 1 for d in mixed)  # batches mix directions


# ------------------------------------------------------------------------------ evaluation
EVAL_LANGS = ("en", "fr", "kam", "te")
GEN = {"num_beams": 2, "max_new_tokens": 8, "progress": False}


def _old_evaluate(model, tokenizer, references, directions, max_sentences, **gen):
    """evaluate's path before issue 23: every request in one translate call, then each direction scored."""
    requests = [(d, i) for d in directions for i in range(max_sentences)]
    translations = lslo.translate(model, tokenizer, [references[d[0]][i] for d, i in requests],
                                  [d[0] for d, _ in requests], [d[1] for d, _ in requests], **gen)
    hypotheses = {d: [] for d in directions}
    for (d, _), text in zip(requests, translations):
        hypotheses[d].append(text)
    return score_directions(hypotheses, {d: references[d[1]][:max_sentences] for d in directions},
                            scorer=Scorer(warn=False), group_of=lslo.get_lslo_config(model), keep_hypotheses=True)


@pytest.fixture(scope="module")
def eval_model(tokenizer124):
    model = lslo.apply_lslo(tiny_model(tokenizer124, seed=2), LSLoConfig(languages=list(EVAL_LANGS), ranks=2))
    randomize_adapters(model, seed=1)
    return model


def test_evaluation_tokenizes_each_sentence_once_and_scores_as_before(tokenizer124, eval_model, monkeypatch):
    references = {code: make_sentences(6, seed=40 + k) for k, code in enumerate(EVAL_LANGS)}
    directions = all_directions(EVAL_LANGS)
    calls = []

    def spy(tokenizer, code, sentences, lang_id=None):
        calls.append((code, len(sentences)))
        return encode_sentences(tokenizer, code, sentences, lang_id)

    def no_second_encoding(*args, **kwargs):
        raise AssertionError("translate tokenized again")

    old = _old_evaluate(eval_model, tokenizer124, references, directions, 4, **GEN)
    monkeypatch.setattr(ev, "encode_sentences", spy)
    monkeypatch.setattr(lslo.inference, "_encode_by_source", no_second_encoding)
    for chunk_size in (8192, 5):  # one chunk (the old batches exactly) and chunks of 2 directions
        calls.clear()
        rows = ev.evaluate(eval_model, tokenizer124, references, None, max_sentences=4, keep_hypotheses=True,
                           scorer=Scorer(warn=False), chunk_size=chunk_size, **GEN)
        assert sorted(calls) == sorted((code, 4) for code in EVAL_LANGS)  # L lists, not L * (L - 1)
        assert rows == old
    assert len({tuple(r["hypotheses"]) for r in old}) > 6 and not any("__" in h for r in old for h in r["hypotheses"])


def test_direction_chunks_are_whole_directions_and_bounded():
    sources = {("a", str(i)): ["x"] * 3 for i in range(7)}
    chunks = list(ev._direction_chunks(list(sources), sources, 7))
    assert chunks == [list(sources)[0:3], list(sources)[3:6], list(sources)[6:7]]
    assert [d for chunk in chunks for d in chunk] == list(sources)


_SHARDED_SCRIPT = """
import json, sys
import torch
from accelerate import PartialState
from transformers import M2M100Tokenizer
import lslo
from lslo.evaluate import Scorer, evaluate
from lslo.testing import make_sentences, tiny_model, randomize_adapters

torch.set_num_threads(1)
folder, out = sys.argv[1], sys.argv[2]
state = PartialState(cpu=True)
tokenizer = M2M100Tokenizer.from_pretrained(folder)
langs = {langs!r}
model = lslo.apply_lslo(tiny_model(tokenizer, seed=2), lslo.LSLoConfig(languages=list(langs), ranks=2))
randomize_adapters(model, seed=1)
references = {{code: make_sentences(4, seed=40 + k) for k, code in enumerate(langs)}}
rows = evaluate(model, tokenizer, references, None, max_sentences=3, scorer=Scorer(warn=False),
                accelerator=state, keep_hypotheses=True, num_beams=2, max_new_tokens=8, progress=False)
with open(f"{{out}}.{{state.process_index}}", "w") as handle:
    json.dump(rows, handle)
"""


def test_sharded_scoring_equals_single_process_under_torchrun(tokenizer124, eval_model, tmp_path):
    """Two gloo processes (torchrun): each scores its own directions; the gathered rows, on every
    process, equal one process scoring everything."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "tok"
    tokenizer124.save_pretrained(folder)
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED_SCRIPT.format(langs=EVAL_LANGS), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(folder), str(tmp_path / "rows")], capture_output=True, text=True, env=env, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    references = {code: make_sentences(4, seed=40 + k) for k, code in enumerate(EVAL_LANGS)}
    single = ev.evaluate(eval_model, tokenizer124, references, None, max_sentences=3, scorer=Scorer(warn=False),
                         keep_hypotheses=True, **GEN)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rows.{rank}").read_text(encoding="utf-8")) == single


# ------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def run124(tokenizer124, tmp_path_factory):
    """A tiny model folder with the M2M-124-like tokenizer and a FLORES-101 folder of all 101 languages."""
    root = tmp_path_factory.mktemp("run124")
    model = tiny_model(tokenizer124, dtype=torch.float32, weight_std=0.1)
    model.save_pretrained(root / "model")
    tokenizer124.save_pretrained(root / "model")
    for split, lines, seed in (("dev", 3, 1), ("devtest", 2, 2)):
        (root / "flores" / split).mkdir(parents=True)
        base = make_sentences(lines, seed=seed, max_words=5)
        for k, (code, stem) in enumerate(FLORES101_CODES.items()):
            text = [" ".join(w[::-1] if k % 2 else w for w in s.split()) + f" {code}" for s in base]
            (root / "flores" / split / f"{stem}.{split}").write_text("\n".join(text) + "\n", encoding="utf-8")
    return {"model": str(root / "model"), "flores": str(root / "flores"), "root": root}


@pytest.mark.parametrize("languages", ["all", "lang30"])
def test_cli_train_eval_translate_beyond_the_tokenizer_table(run124, languages, capsys):
    import json

    expected = list(FLORES101_CODES) if languages == "all" else list(LANGUAGE_SETS["lang30"])
    out = run124["root"] / f"train-{languages}"
    assert main(["train", "--model", run124["model"], "--flores-dir", run124["flores"], "--languages", languages,
                 "--epochs", "1", "--max-steps", "1", "--max-tokens", "4096", "--output-dir", str(out),
                 "--no-progress", "--cpu"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    saved = read_adapter_config(out / "final")[0]
    assert list(saved.languages) == expected and saved.rank_of("kam") == 8  # kam: V, default ranks
    # eval: every direction of the run's languages (10,100 at 101), greedy, one sentence each.
    assert main(["eval", "--model", run124["model"], "--adapters", str(out / "final"), "--flores-dir",
                 run124["flores"], "--languages", languages, "--num-beams", "1", "--max-new-tokens", "3",
                 "--eval-sentences", "1", "--no-progress", "--output-dir", str(out / "ev")]) == 0
    capsys.readouterr()
    rows = json.loads((out / "ev" / "scores_devtest.json").read_text())["rows"]
    assert len(rows) == len(expected) * (len(expected) - 1) and {r["src"] for r in rows} == set(expected)
    # translate: directions into and out of vocabulary-only languages.
    tsv = out / "in.tsv"
    tsv.write_text("en\tkam\tKasa lomi.\nkam\tny\tVi ba.\nmt\ten\tRu sa.\n", encoding="utf-8")
    assert main(["translate", "--model", run124["model"], "--adapters", str(out / "final"), "--input", str(tsv),
                 "--num-beams", "1", "--max-new-tokens", "4", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and not any("__" in line for line in lines)
    assert main(["params", "--languages", languages]) == 0
    assert "kam" in capsys.readouterr().out
