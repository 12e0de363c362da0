"""`lslo demo --quick` end to end: every file of the report, valid PNGs, a table with every direction group,
resume of a finished or interrupted demo, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lslo.cli import main
from lslo.demo.run import STATE_FILE

GROUP_COLUMNS = ["H2H", "H2M", "H2V", "M2H", "M2M", "M2V", "V2H", "V2M", "V2V"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    status = main(["demo", "--quick", "--output-dir", str(out), "--no-progress"])
    return out, status


def _png(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_quick_demo_writes_every_file(quick_demo, capsys):
    out, status = quick_demo
    assert status == 0
    for name in ("report.md", "curves.png", "table.png", STATE_FILE, "data/languages.json", "data/pretrain.tsv",
                 "base_model/config.json", "base_model/model.safetensors"):
        assert (out / name).is_file(), name
    assert _png(out / "curves.png")[0] > 300 and _png(out / "table.png")[0] > 300
    slugs = {"pretrain", "ft-all", "lslo-8-8-8", "lslo-2-2-8", "lslo-2-2-8-gps-0-9"}
    assert {p.name for p in (out / "systems").iterdir()} == slugs
    for slug in slugs:
        scores = json.loads((out / "systems" / slug / "scores.json").read_text())
        assert len(scores["rows"]) == 42  # 7 languages, every direction
        assert (out / "systems" / slug / "scores.csv").is_file()
    assert (out / "systems" / "lslo-2-2-8-gps-0-9" / "run" / "final" / "lslo_adapters.safetensors").is_file()
    assert (out / "systems" / "ft-all" / "run" / "final" / "model.safetensors").is_file()


def test_report_has_every_direction_group_and_honest_labels(quick_demo):
    out, _ = quick_demo
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| BLEU"))
    for column in GROUP_COLUMNS + ["AVG (directions)", "AVG (groups)"]:
        assert column in header
    for system in ("Pretrain", "Ft-all", "LSLo 8;8;8", "LSLo 2;2;8", "LSLo 2;2;8+GPS(0.9)"):
        assert f"| {system} " in report
    assert "What the table shows:" in report and "ARTIFICIAL" in report
    assert "spBLEU" in report and "not spBLEU" in report  # named only to say it is not that
    assert "| total |" in report  # stage times


def test_gps_system_is_pruned_and_only_adapters_trained(quick_demo):
    import torch

    import lslo
    from lslo.pruning import pruning_summary

    out, _ = quick_demo
    model = lslo.load_base_model(str(out / "base_model"))
    lslo.load_adapters(model, out / "systems" / "lslo-2-2-8-gps-0-9" / "run" / "final")
    summary = pruning_summary(model)
    for code in ("en", "fr", "de", "nl", "ja"):  # H and M: the quick schedule reaches 0.9 at epoch 2
        assert summary[code] == pytest.approx(0.9, abs=1e-3)
    for code in ("oc", "wo"):
        assert summary[code] == 0.0
    assert all(torch.all(m.lora_B[~m.prune_mask] == 0) for m in lslo.lslo_modules(model).values())


def test_finished_demo_resumes_instantly_and_refuses_without_flags(quick_demo, capsys):
    out, _ = quick_demo
    state = json.loads((out / STATE_FILE).read_text())
    done_before = dict(state["done"])
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", "--resume"]) == 0
    state = json.loads((out / STATE_FILE).read_text())
    for stage, info in done_before.items():
        if stage != "report":
            assert state["done"][stage] == info, stage  # nothing re-run
    capsys.readouterr()
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(out), "--no-progress", "--resume"]) == 2  # full settings != quick
    assert "other settings" in capsys.readouterr().err


def test_bad_flores_dir_is_refused(tmp_path, capsys):
    (tmp_path / "notflores").mkdir()
    status = main(["demo", "--quick", "--output-dir", str(tmp_path / "o"), "--model", "m",
                   "--flores-dir", str(tmp_path / "notflores"), "--languages", "en,fr"])
    assert status == 2
    assert capsys.readouterr().err.startswith("lslo: error: ")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "o2"), "--model", "m"]) == 2


def test_ctrl_c_saves_what_is_done_and_resume_finishes(quick_demo, tmp_path, monkeypatch, capsys):
    import shutil

    from lslo.demo import run as demo_run

    out, _ = quick_demo
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / STATE_FILE).read_text())
    for system in ("LSLo 2;2;8", "LSLo 2;2;8+GPS(0.9)"):  # as if the demo had not got that far
        state["done"].pop(f"system:{system}")
    state["done"].pop("report")
    (copy / STATE_FILE).write_text(json.dumps(state))
    for slug in ("lslo-2-2-8", "lslo-2-2-8-gps-0-9"):
        shutil.rmtree(copy / "systems" / slug)
    real = demo_run._run_system

    def interrupted_at_gps(*args, **kwargs):
        if args[6].name == "LSLo 2;2;8+GPS(0.9)":  # (out, settings, codes, seed, base, corpus, system, ...)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_run, "_run_system", interrupted_at_gps)
    # --workers 1: systems run in this process, where the patch applies (the fixture ran 2 processes)
    assert main(["demo", "--quick", "--output-dir", str(copy), "--no-progress", "--resume", "--workers", "1"]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and str(copy) in err
    done = json.loads((copy / STATE_FILE).read_text())["done"]
    assert "system:LSLo 2;2;8" in done and "system:LSLo 2;2;8+GPS(0.9)" not in done
    monkeypatch.setattr(demo_run, "_run_system", real)
    assert main(["demo", "--quick", "--output-dir", str(copy), "--no-progress", "--resume", "--workers", "1"]) == 0
    final = json.loads((copy / STATE_FILE).read_text())["done"]
    assert final["system:LSLo 2;2;8"] == done["system:LSLo 2;2;8"]  # not run again
    assert "system:LSLo 2;2;8+GPS(0.9)" in final and (copy / "report.md").is_file()
