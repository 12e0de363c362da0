"""``lslo`` command line: translate (files, stdin/stdout), merge, params, bench forwarding, errors."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch

import lslo
from lslo import LSLoConfig
from lslo.cli import main, read_tsv
from tests.hf_fixtures import (
    make_sentences,
    make_tokenizer,
    randomize_adapters,
    tiny_model,
)

SRC = ["en", "fr", "oc", "de", "fr"]
TGT = ["fr", "oc", "en", "en", "de"]


pytestmark = pytest.mark.usefixtures("hf_one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model + tokenizer folder and an adapter folder; the in-memory model too."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tokenizer(root / "spm")
    base = tiny_model(tokenizer, seed=4, dtype=torch.float32)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    model = lslo.apply_lslo(base, LSLoConfig(languages=["en", "fr", "de", "oc"], ranks="2;8"))
    randomize_adapters(model, seed=5, std=1.0)
    lslo.save_adapters(model, root / "adapters")
    return {"root": root, "model": model, "tokenizer": tokenizer}


def _tsv(sentences) -> str:
    return "".join(f"{s}\t{t}\t{x}\n" for s, t, x in zip(SRC, TGT, sentences))


def test_read_tsv_keeps_tabs_in_sentences_and_rejects_bad_lines():
    assert read_tsv(["en\tfr\ta\tb\n", "de\toc\tc\r\n"]) == (["en", "de"], ["fr", "oc"], ["a\tb", "c"])
    with pytest.raises(Exception, match="input line 2"):
        read_tsv(["en\tfr\tok\n", "no tabs here\n"])


def test_translate_files_equal_the_library(saved, tmp_path):
    sentences = make_sentences(len(SRC), seed=9)
    (tmp_path / "in.tsv").write_text(_tsv(sentences), encoding="utf-8")
    root = saved["root"]
    status = main(["translate", "--model", str(root / "model"), "--adapters", str(root / "adapters"),
                   "--input", str(tmp_path / "in.tsv"), "--output", str(tmp_path / "out.txt"),
                   "--num-beams", "3", "--max-new-tokens", "8", "--batch-size", "2", "--quiet"])
    assert status == 0
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(SRC) + 1
    expected = lslo.translate(saved["model"], saved["tokenizer"], sentences, SRC, TGT, num_beams=3, max_new_tokens=8,
                              progress=False)
    assert lines[:-1] == [t.replace("\n", " ") for t in expected]


def test_translate_stdin_to_stdout(saved, monkeypatch, capsys):
    sentences = make_sentences(len(SRC), seed=10)
    monkeypatch.setattr(sys, "stdin", io.StringIO(_tsv(sentences)))
    root = saved["root"]
    assert main(["translate", "--model", str(root / "model"), "--adapters", str(root / "adapters"),
                 "--num-beams", "1", "--max-new-tokens", "6", "--quiet"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert len(out) == len(SRC) + 1
    expected = lslo.translate(saved["model"], saved["tokenizer"], sentences, SRC, TGT, num_beams=1, max_new_tokens=6,
                              progress=False)
    assert out[:-1] == expected


def test_translate_errors_exit_2_with_a_message(saved, tmp_path, capsys):
    root = saved["root"]
    (tmp_path / "bad.tsv").write_text("en\tja\tKasa.\n", encoding="utf-8")
    args = ["translate", "--model", str(root / "model"), "--adapters", str(root / "adapters"), "--quiet"]
    assert main(args + ["--input", str(tmp_path / "bad.tsv")]) == 2
    assert "unknown language code 'ja'" in capsys.readouterr().err
    (tmp_path / "malformed.tsv").write_text("en fr Kasa.\n", encoding="utf-8")
    assert main(args + ["--input", str(tmp_path / "malformed.tsv")]) == 2
    assert "input line 1" in capsys.readouterr().err
    assert main(args + ["--input", str(tmp_path / "missing.tsv")]) == 2


def test_merge_writes_a_plain_model(saved, tmp_path):
    from transformers import M2M100ForConditionalGeneration

    root = saved["root"]
    assert main(["merge", "--model", str(root / "model"), "--adapters", str(root / "adapters"),
                 "--src", "oc", "--tgt", "fr", "--output", str(tmp_path / "oc-fr")]) == 0
    merged = M2M100ForConditionalGeneration.from_pretrained(tmp_path / "oc-fr").eval()
    expected = lslo.merge_direction(saved["model"], "oc", "fr")
    ids = torch.tensor([[5, 6, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, decoder_input_ids=ids).logits,
                                   expected(input_ids=ids, decoder_input_ids=ids).logits)
    assert (tmp_path / "oc-fr" / "vocab.json").exists()  # the tokenizer travels with it


def test_params_prints_the_papers_count(capsys):
    assert main(["params", "--languages", "lang12", "--ranks", "2;2;8", "--ffn", "reference"]) == 0
    out = capsys.readouterr().out
    assert "15,335,424" in out and "V (very low): oc or sd wo, rank 8" in out
    assert main(["params", "--ranks", "2;2"]) == 2
    assert "one rank per group" in capsys.readouterr().err


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("benchmarks.__main__")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "benchmarks.__main__", fake)
    assert main(["bench", "--quick", "--only", "headline"]) == 0
    assert seen == [["--quick", "--only", "headline"]]


def test_bench_without_a_checkout_says_so(monkeypatch, tmp_path, capsys):
    # benchmarks/ is not installed: outside a source checkout `lslo bench` says where it runs, no traceback.
    import lslo.cli

    # From this repository the suite is found beside lslo/ (whatever the current directory).
    assert any((root / "benchmarks" / "__main__.py").is_file() for root in lslo.cli._checkout_roots())
    monkeypatch.setattr(lslo.cli, "_checkout_roots", lambda: [tmp_path])
    monkeypatch.delitem(sys.modules, "benchmarks.__main__", raising=False)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lslo: error: lslo bench runs the benchmark suite of a source checkout") and "Traceback" not in err


def test_benchmarks_are_not_installed_and_use_public_names_only():
    # pyproject installs lslo and lslo_kernels only; the benchmarks import no private name of either.
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    find = (root / "pyproject.toml").read_text(encoding="utf-8").split("[tool.setuptools.packages.find]")[1]
    include = re.findall(r'"([^"]+)"', re.search(r"include = \[(.*?)\]", find).group(1))
    assert include and not [name for name in include if name.split(".")[0] == "benchmarks"]
    private = []
    for path in sorted((root / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("lslo", "lslo_kernels"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []  # bench_train_step calls the engine's public train_step (no copy of it)


def test_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "translate" in capsys.readouterr().out
