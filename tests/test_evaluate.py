"""Evaluation: sacrebleu's scores per direction, direction-group tables, files, figures, evaluate()."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import pytest
import sacrebleu
from sacrebleu.tokenizers import tokenizer_spm

import lslo
import lslo.inference
from lslo import LANGUAGE_SETS, LSLoConfig
from lslo import evaluate as ev
from tests.hf_fixtures import make_sentences, randomize_adapters, tiny_model

# H, H, M, V: columns H2H H2M H2V M2H M2V V2H V2M (no M2M, V2V: one language each).
LANGS = ["en", "fr", "zh", "wo"]


@pytest.fixture(autouse=True)
def empty_sacrebleu_cache(tmp_path, monkeypatch):
    """sacrebleu's cache is an empty directory: the user's ~/.sacrebleu never leaks into a test."""
    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "sacrebleu"))
    monkeypatch.setattr(ev, "_warned_no_spm", False)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A SentencePiece model trained here, standing in for FLORES-101's (which can't be downloaded)."""
    import sentencepiece

    prefix = tmp_path_factory.mktemp("flores_spm") / "spm"
    text = make_sentences(1500, seed=7) + [s.replace(" ", ", ") + "?" for s in make_sentences(300, seed=8)]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(prefix), vocab_size=120,
                                             model_type="unigram", character_coverage=1.0, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def corpus():
    """References and hypotheses that share words, subwords and punctuation only in part."""
    refs = make_sentences(40, seed=3)
    hyps = []
    for i, ref in enumerate(refs):
        words = ref.split()
        if i % 3 == 0:
            words = words[::-1]
        elif i % 3 == 1:
            words = [w[:-1] if len(w) > 3 else w for w in words]  # subword overlap only
        hyps.append(", ".join(words) if i % 4 == 0 else " ".join(words))
    return hyps, refs


def put_in_sacrebleu_cache(model_file):
    path = ev.flores101_spm_cache_path()
    path.parent.mkdir(parents=True)
    shutil.copy(model_file, path)
    return path


# ------------------------------------------------------------------------------------------ scoring
def test_chrf_and_bleu_equal_sacrebleu(corpus):
    hyps, refs = corpus
    scores = ev.Scorer().score(hyps, refs)
    assert scores["chrf++"] == sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    assert scores["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert scores["chrf++"] != sacrebleu.corpus_chrf(hyps, [refs]).score  # word n-grams count: it is chrF++
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf++"] < 100


def test_spbleu_refused_honestly_without_the_model(corpus, caplog):
    hyps, refs = corpus
    with caplog.at_level(logging.WARNING, logger="lslo.evaluate"):
        scorer = ev.Scorer()
        again = ev.Scorer()
        rows = ev.score_directions({("en", "fr"): hyps, ("fr", "wo"): hyps}, {("en", "fr"): refs, ("fr", "wo"): refs},
                                   scorer=again)
    warnings = [r.getMessage() for r in caplog.records if "spBLEU is not reported" in r.getMessage()]
    assert len(warnings) == 1  # once, however many scorers and directions
    assert "--spm-model PATH" in warnings[0] and str(ev.flores101_spm_cache_path()) in warnings[0]
    assert not scorer.has_spbleu and scorer.spm_model is None and scorer.metrics == ("chrf++", "bleu")
    assert "spbleu" not in scorer.signatures()
    assert all(row["spbleu"] is None and row["chrf++"] > 0 for row in rows)
    table = ev.format_table({"sys": rows})
    assert "spBLEU" not in table and "| chrF++ |" in table and "| BLEU |" in table
    assert ev.group_table(rows)["label"] == "chrF++"
    with pytest.raises(ValueError, match="spBLEU is not available"):
        ev.group_table(rows, metric="spbleu")


def test_spbleu_equals_sacrebleu_flores101_bleu_with_the_same_spm_model(corpus, spm_model):
    hyps, refs = corpus
    given = ev.Scorer(spm_model=spm_model)
    assert given.has_spbleu and given.spm_model == spm_model
    mine = given.score(hyps, refs)
    # The reference: sacrebleu's own tokenize="flores101", reading the same model from its cache.
    put_in_sacrebleu_cache(spm_model)
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="flores101")
    assert mine["spbleu"] == expected.score
    assert mine["spbleu"] != mine["bleu"]  # subword tokenization changed the score: the test has teeth
    assert "tok:flores101" in given.signatures()["spbleu"]
    cached = ev.Scorer()  # no path given: sacrebleu's cache is used
    assert cached.spm_model == ev.flores101_spm_cache_path() and cached.score(hyps, refs) == mine


def test_spm_model_download_goes_through_sacrebleu(corpus, spm_model, monkeypatch, caplog):
    def fake_download(url, dest):
        assert url == tokenizer_spm.SPM_MODELS["flores101"]["url"]
        shutil.copy(spm_model, dest)

    monkeypatch.setattr(tokenizer_spm, "download_file", fake_download)
    ev.flores101_spm_cache_path().parent.mkdir(parents=True)
    assert ev.Scorer(download=True).has_spbleu

    def offline(url, dest):
        raise OSError("no network")

    ev.flores101_spm_cache_path().unlink()
    monkeypatch.setattr(tokenizer_spm, "download_file", offline)
    with caplog.at_level(logging.WARNING, logger="lslo.evaluate"):
        assert not ev.Scorer(download=True).has_spbleu
    assert "could not be downloaded (no network)" in caplog.text


def test_bad_spm_model(tmp_path):
    with pytest.raises(ValueError, match="spm_model '.*missing.model': no such file"):
        ev.Scorer(spm_model=tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        ev.Scorer(spm_model=junk)


# ------------------------------------------------------------------------------------------- tables
def known_rows():
    scores = {  # direction: spBLEU; the hand-computed group means are in the test below
        ("en", "fr"): 30.0, ("fr", "en"): 34.0, ("en", "zh"): 20.0, ("fr", "zh"): 22.0, ("en", "wo"): 5.0,
        ("fr", "wo"): 7.0, ("zh", "en"): 18.0, ("zh", "fr"): 16.0, ("zh", "wo"): 3.0, ("wo", "en"): 10.0,
        ("wo", "fr"): 8.0, ("wo", "zh"): 4.0,
    }
    return [{"src": s, "tgt": t, "group": ev.direction_group(s, t), "n": 5, "spbleu": v, "chrf++": v + 20,
             "bleu": v - 1} for (s, t), v in scores.items()]


def test_direction_group():
    assert ev.direction_group("en", "zh") == "H2M" and ev.direction_group("kam", "oc") == "V2V"
    assert ev.direction_group("xx", "en", {"xx": "L", "en": "H"}) == "L2H"
    assert ev.direction_group("xx", "yy", lambda code: "V") == "V2V"
    assert ev.direction_group("fr", "xx", LSLoConfig(languages=["fr", "xx"], groups={"xx": "M"}, ranks=2)) == "H2M"
    with pytest.raises(ValueError, match="language 'xx' has no resource group"):
        ev.direction_group("en", "xx")


def test_group_table_from_known_scores():
    table = ev.group_table(known_rows())
    assert table["metric"] == "spbleu" and table["label"] == "spBLEU"
    assert table["columns"] == ["H2H", "H2M", "H2V", "M2H", "M2V", "V2H", "V2M"]
    assert table["scores"] == {"H2H": 32.0, "H2M": 21.0, "H2V": 6.0, "M2H": 17.0, "M2V": 3.0, "V2H": 9.0, "V2M": 4.0}
    assert table["directions"] == {"H2H": 2, "H2M": 2, "H2V": 2, "M2H": 2, "M2V": 1, "V2H": 2, "V2M": 1}
    assert table["avg_directions"] == pytest.approx(177 / 12)  # 14.75
    assert table["avg_groups"] == pytest.approx(92 / 7)  # 13.14
    assert ev.group_table(known_rows(), metric="chrf++")["avg_directions"] == pytest.approx(177 / 12 + 20)
    # Regrouping by a custom group_of: French as medium-resource.
    regrouped = ev.group_table(known_rows(), group_of={**lslo.RESOURCE_GROUPS, "fr": "M"})
    assert regrouped["scores"]["M2M"] == (22.0 + 16.0) / 2 and "H2H" not in regrouped["scores"]


@pytest.mark.parametrize("name, columns", [
    ("lang12", ["H2H", "H2M", "H2V", "M2H", "M2M", "M2V", "V2H", "V2M", "V2V"]),
    ("lang30", [f"{a}2{b}" for a in "HMLV" for b in "HMLV"]),
])
def test_paper_language_sets_give_the_papers_columns(name, columns):
    langs = LANGUAGE_SETS[name]
    rows = [{"src": s, "tgt": t, "spbleu": 1.0} for s in langs for t in langs if s != t]
    table = ev.group_table(rows)
    assert table["columns"] == columns and table["num_directions"] == len(langs) * (len(langs) - 1)


def test_papers_avg_is_the_mean_over_directions():
    """Table 1, Pretrain: its AVG 12.26 is the mean over the 132 directions; the mean of group means is 12.61."""
    pretrain = {"H2H": 31.76, "H2M": 20.06, "H2V": 5.56, "M2H": 20.71, "M2M": 17.12, "M2V": 3.47, "V2H": 9.24,
                "V2M": 5.03, "V2V": 0.52}
    langs = LANGUAGE_SETS["lang12"]
    rows = [{"src": s, "tgt": t, "spbleu": pretrain[ev.direction_group(s, t)]} for s in langs for t in langs if s != t]
    table = ev.group_table(rows)
    assert round(table["avg_directions"], 2) == 12.26 and round(table["avg_groups"], 2) == 12.61


def test_format_table_markdown_and_plain():
    other = [{**row, "spbleu": row["spbleu"] + 1} for row in known_rows()]
    markdown = ev.format_table({"Pretrain": known_rows(), "2;2;8+GPS(0.9)": other},
                               params={"2;2;8+GPS(0.9)": 15_300_000})
    lines = markdown.splitlines()
    assert lines[0] == ("| spBLEU | #Params | H2H | H2M | H2V | M2H | M2V | V2H | V2M | AVG (directions) | "
                        "AVG (groups) |")
    assert lines[2] == "| Pretrain | - | 32.00 | 21.00 | 6.00 | 17.00 | 3.00 | 9.00 | 4.00 | 14.75 | 13.14 |"
    assert lines[3].startswith("| 2;2;8+GPS(0.9) | 15.3M | 33.00 |") and lines[3].endswith("| 15.75 | 14.14 |")
    assert "mean over all 12 directions" in lines[4] and "mean of the 7 direction-group means" in lines[4]
    plain = ev.format_table({"Pretrain": known_rows()}, style="plain", metric="bleu", digits=1)
    header, rule, row = plain.splitlines()[:3]
    assert header.split()[0] == "BLEU" and set(rule) <= {"-", " "} and len(header) == len(rule) == len(row)
    assert row.split() == ["Pretrain", "31.0", "20.0", "5.0", "16.0", "2.0", "8.0", "3.0", "13.8", "12.1"]
    both = ev.format_table({"Pretrain": known_rows()}, metric=["chrf++", "bleu"])
    assert both.count("| Pretrain |") == 2
    assert ev.format_table({"Pretrain": ev.group_table(known_rows())}) == ev.format_table({"Pretrain": known_rows()})


# -------------------------------------------------------------------------------------------- files
def test_write_scores(tmp_path):
    rows = known_rows()
    rows[0] = {**rows[0], "hypotheses": ["a\nb", "c"]}
    paths = ev.write_scores(rows, tmp_path / "out", metadata={"system": "pretrain"}, scorer=ev.Scorer())
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert [(r["src"], r["tgt"], r["group"], float(r["spbleu"]), float(r["chrf++"])) for r in read] == [
        (r["src"], r["tgt"], r["group"], r["spbleu"], r["chrf++"]) for r in rows]
    document = json.loads(paths["json"].read_text())
    assert document["system"] == "pretrain" and document["spbleu_available"]
    assert document["rows"][1] == rows[1]
    assert "hypotheses" not in document["rows"][0]
    assert document["groups"]["spbleu"]["avg_groups"] == pytest.approx(92 / 7)
    assert set(document["scorer"]["signatures"]) == {"chrf++", "bleu"} and document["scorer"]["spm_model"] is None
    assert (paths["hypotheses"] / "en-fr.txt").read_text() == "a b\nc\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.csv", "scores.hyp", "scores.json"]

    no_spbleu = [{**r, "spbleu": None} for r in known_rows()]
    paths = ev.write_scores(no_spbleu, tmp_path / "out", name="chrf")
    document = json.loads(paths["json"].read_text())
    assert not document["spbleu_available"] and set(document["groups"]) == {"chrf++", "bleu"}
    assert all(r["spbleu"] is None for r in document["rows"])
    assert {r["spbleu"] for r in csv.DictReader(paths["csv"].open())} == {""}


# ------------------------------------------------------------------------------------------ figures
def test_plot_epoch_curves(tmp_path):
    from PIL import Image

    history = {
        "2;2;8+GPS(0.9)": [{"H2H": 32.0, "V2V": 5.0}, {"H2H": 33.0, "V2V": 6.0}, {"H2H": 33.1, "V2V": 7.0}],
        "Ft-all": {1: known_rows(), 2: known_rows()},  # rows work too (no V2V here: that line is empty)
    }
    figure = ev.plot_epoch_curves(history, tmp_path / "fig3.png", pretrained={"H2H": 31.76, "V2V": 0.52})
    assert len(figure.axes) == 2
    h2h, v2v = figure.axes
    assert [list(line.get_ydata()) for line in h2h.lines] == [[32.0, 33.0, 33.1], [32.0, 32.0], [31.76, 31.76]]
    assert h2h.lines[-1].get_linestyle() == "--" and list(h2h.lines[0].get_xdata()) == [1, 2, 3]
    assert "spBLEU" in h2h.get_ylabel() and list(v2v.lines[1].get_ydata()) == []
    with Image.open(tmp_path / "fig3.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    three = ev.plot_epoch_curves(history, tmp_path / "three.png", groups=["H2H", "H2M", "V2V"])
    assert len(three.axes) == 3
    with pytest.raises(ValueError, match="direction group 'L2L' is in no evaluation"):
        ev.plot_epoch_curves(history, tmp_path / "x.png", groups=["L2L"])
    bare = {"a": [{"H2H": 1.0, "V2V": 2.0}]}
    with pytest.raises(ValueError, match="don't say which metric"):  # never guess "spBLEU"
        ev.plot_epoch_curves(bare, tmp_path / "x.png")
    chrf = ev.plot_epoch_curves(bare, tmp_path / "chrf.png", metric="chrf++")
    assert chrf.axes[0].get_ylabel() == "chrF++"


def test_plot_group_bars(tmp_path):
    from PIL import Image

    figure = ev.plot_group_bars({"a": known_rows(), "b": known_rows()}, tmp_path / "bars.png")
    assert len(figure.axes) == 1
    assert len(figure.axes[0].patches) == 2 * (7 + 2)  # two systems x (7 groups + both AVGs)
    assert max(p.get_height() for p in figure.axes[0].patches) == 32.0
    with Image.open(tmp_path / "bars.png") as image:
        image.verify()
        assert image.format == "PNG"


# ----------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def model(tokenizer):
    model = lslo.apply_lslo(tiny_model(tokenizer, seed=1), LSLoConfig(languages=LANGS, ranks="2;2;8"))
    randomize_adapters(model, seed=2, std=1.0)
    return model


@pytest.fixture(scope="module")
def references():
    return {code: make_sentences(5, seed=20 + i) for i, code in enumerate(LANGS)}


GEN = {"num_beams": 2, "max_new_tokens": 8, "progress": False}


@pytest.mark.usefixtures("hf_one_thread")
def test_evaluate_one_row_per_direction(model, tokenizer, references, spm_model, monkeypatch):
    scorer = ev.Scorer(spm_model=spm_model)
    calls = []
    original = lslo.inference.translate

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "translate", counting)  # evaluate calls the translate it imported
    rows = ev.evaluate(model, tokenizer, references, None, max_sentences=3, scorer=scorer, keep_hypotheses=True, **GEN)
    monkeypatch.undo()
    assert calls == [36]  # all 12 directions x 3 sentences in one translate call
    assert [(r["src"], r["tgt"]) for r in rows] == [(s, t) for s in LANGS for t in LANGS if s != t]
    for row in rows:
        src, tgt = row["src"], row["tgt"]
        expected = lslo.translate(model, tokenizer, references[src][:3], src, tgt, **GEN)
        assert row["hypotheses"] == expected and row["n"] == 3
        assert row["group"] == ev.direction_group(src, tgt)
        assert {k: row[k] for k in ev.METRICS} == scorer.score(expected, references[tgt][:3])
    assert len({tuple(r["hypotheses"]) for r in rows}) > 6  # routing makes directions differ

    # The same test set given per direction; "src-tgt" strings as directions.
    explicit = {(s, t): (references[s], references[t]) for s in LANGS for t in LANGS if s != t}
    again = ev.evaluate(model, tokenizer, explicit, ["fr-wo", ("zh", "en")], max_sentences=3, scorer=scorer, **GEN)
    assert again == [{k: v for k, v in r.items() if k != "hypotheses"} for r in rows
                     if (r["src"], r["tgt"]) in {("fr", "wo"), ("zh", "en")}]


@pytest.mark.usefixtures("hf_one_thread")
def test_evaluate_model_without_lslo(tokenizer, references):
    plain = tiny_model(tokenizer, seed=3)  # ft-all / pretrain: no routing, paper's groups
    rows = ev.evaluate(plain, tokenizer, references, [("en", "wo"), ("wo", "zh")], max_sentences=2, **GEN)
    assert [(r["group"], r["n"], r["spbleu"]) for r in rows] == [("H2V", 2, None), ("V2M", 2, None)]
    hyps = lslo.translate(plain, tokenizer, references["en"][:2], "en", "wo", **GEN)
    assert rows[0]["chrf++"] == sacrebleu.corpus_chrf(hyps, [references["wo"][:2]], word_order=2).score


class FakeAccelerator:
    def __init__(self, rank, world=2):
        self.process_index, self.num_processes = rank, world

    def unwrap_model(self, model):
        return model


@pytest.mark.usefixtures("hf_one_thread")
def test_evaluate_sharded_across_processes(model, tokenizer, references, monkeypatch):
    """Two 'processes' run one after the other, each translating and scoring its own directions; the
    gather returns what accelerate's would (the rows of rank 0, then rank 1)."""
    directions = [("en", "fr"), ("zh", "wo"), ("wo", "en")]
    single = ev.evaluate(model, tokenizer, references, directions, keep_hypotheses=True, **GEN)

    class Stop(Exception):
        pass

    shards = {}
    for rank in (0, 1):
        def capture(objects, rank=rank):
            shards[rank] = objects
            raise Stop

        monkeypatch.setattr(ev, "_gather_object", capture)
        with pytest.raises(Stop):
            ev.evaluate(model, tokenizer, references, directions, accelerator=FakeAccelerator(rank),
                        keep_hypotheses=True, **GEN)
    assert [(r["src"], r["tgt"]) for r in shards[0]] == [("en", "fr"), ("wo", "en")]
    assert [(r["src"], r["tgt"]) for r in shards[1]] == [("zh", "wo")]
    assert sorted(shards[0] + shards[1], key=lambda r: directions.index((r["src"], r["tgt"]))) == single
    monkeypatch.setattr(ev, "_gather_object", lambda objects: shards[0] + shards[1])
    for rank in (0, 1):
        rows = ev.evaluate(model, tokenizer, references, directions, accelerator=FakeAccelerator(rank),
                           keep_hypotheses=True, **GEN)
        assert rows == single


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input(model, tokenizer, references, corpus):
    hyps, refs = corpus
    with pytest.raises(ValueError, match="unknown metric 'ter'"):
        ev.group_table(known_rows(), metric="ter")
    with pytest.raises(ValueError, match="unknown metric 'ter'"):
        ev.format_table({"a": known_rows()}, metric="ter")
    with pytest.raises(ValueError, match="unknown metric 'ter'"):
        ev.plot_group_bars({"a": known_rows()}, "x.png", metric="ter")
    with pytest.raises(ValueError, match="no sentences for language 'de' \\(direction en-de\\)"):
        ev.evaluate(model, tokenizer, references, [("en", "de")], **GEN)
    with pytest.raises(ValueError, match="directions is empty"):
        ev.evaluate(model, tokenizer, references, [], **GEN)
    with pytest.raises(ValueError, match="direction en-en: source and target are the same"):
        ev.evaluate(model, tokenizer, references, [("en", "en")], **GEN)
    with pytest.raises(ValueError, match="direction en-fr is listed twice"):
        ev.evaluate(model, tokenizer, references, ["en-fr", ("en", "fr")], **GEN)
    with pytest.raises(ValueError, match="max_sentences must be a positive int"):
        ev.evaluate(model, tokenizer, references, [("en", "fr")], max_sentences=0, **GEN)
    with pytest.raises(ValueError, match="as many sentences in every language"):
        ev.evaluate(model, tokenizer, {**references, "fr": references["fr"][:4]}, [("en", "fr")], **GEN)
    with pytest.raises(ValueError, match="no sentences for direction en-zh"):
        ev.evaluate(model, tokenizer, {("en", "fr"): (["a"], ["b"])}, [("en", "zh")], **GEN)
    with pytest.raises(ValueError, match="language 'xx' has no resource group"):
        ev.evaluate(model, tokenizer, {("en", "xx"): (["a"], ["b"])}, None, group_of=lslo.RESOURCE_GROUPS, **GEN)
    with pytest.raises(ValueError, match="3 hypotheses for 2 references"):
        ev.Scorer().score(hyps[:3], refs[:2])
    with pytest.raises(TypeError, match="not one string"):
        ev.Scorer().score("a", "a")
    with pytest.raises(ValueError, match="no rows"):
        ev.group_table([])
    with pytest.raises(ValueError, match="style must be"):
        ev.format_table({"a": known_rows()}, style="html")
