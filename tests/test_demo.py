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


def test_analyses_compare_ise_plans_with_resource_groups_at_equal_budget(quick_demo, tmp_path, capsys):
    """--analyses on a finished quick demo (resumed): ISE correlation, plan, Weight Learning, and the plans
    trained with the demo's recipe at the budget of 2;2;8, compared with it per direction group."""
    import math
    import shutil

    from scipy.stats import pearsonr

    import lslo
    from lslo import analysis
    from lslo.evaluate import group_table
    from lslo.pruning import pruning_summary

    out, _ = quick_demo
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = json.loads((copy / STATE_FILE).read_text())["done"]
    assert main(["demo", "--quick", "--output-dir", str(copy), "--no-progress", "--resume", "--analyses"]) == 0
    terminal = capsys.readouterr().out
    state = json.loads((copy / STATE_FILE).read_text())
    assert state["done"]["system:LSLo 2;2;8+GPS(0.9)"] == before["system:LSLo 2;2;8+GPS(0.9)"]  # reused, not retrained
    summary = json.loads((copy / "analyses" / "summary.json").read_text())

    # ISE against the synthetic languages' true pretraining sizes, as scipy computes it.
    languages = json.loads((copy / "data" / "languages.json").read_text())["languages"]
    scores = analysis.read_scores(copy / "analyses" / "ise")
    totals = analysis.language_demands(scores)
    codes = list(scores["languages"])
    expected = pearsonr([math.log10(languages[c]["pretrain_sentences"]) for c in codes],
                        [totals[c]["score"] for c in codes])
    assert summary["correlation_log"]["overall"]["r"] == pytest.approx(expected.statistic)
    assert summary["correlation_log"]["overall"]["p"] == pytest.approx(expected.pvalue)
    assert "ISE recovers the resource levels" in summary["summary"]

    # Weight Learning: one (w_src, w_tgt) pair per layer, a softmax.
    weights = summary["weight_learning"]["weights"]
    assert set(weights) == {"encoder", "decoder"} and all(len(pairs) == 2 for pairs in weights.values())
    assert all(p["w_src"] + p["w_tgt"] == pytest.approx(1.0, abs=1e-5) for pairs in weights.values() for p in pairs)

    # The comparison: both plans and the resource-group system, every group, the same parameters.
    comparison = summary["comparison"]
    reference = "LSLo 2;2;8+GPS(0.9)"
    assert comparison["reference"] == reference and comparison["metric"] == "BLEU" and comparison["budget"] == "2;2;8"
    plans = ["LSLo ISE plan s=1", "LSLo ISE plan s=4"]
    assert {reference, *plans} <= set(comparison["systems"])
    for name in [reference, *plans]:
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
        rows = json.loads((copy / "systems" / slug / "scores.json").read_text())["rows"]
        table = group_table(rows, metric="bleu")
        entry = comparison["systems"][name]
        assert list(entry["scores"]) == GROUP_COLUMNS
        assert entry["scores"] == pytest.approx(table["scores"])
        assert entry["avg_directions"] == pytest.approx(table["avg_directions"])
        assert entry["params"] == state["done"][f"system:{name}"]["params"] == comparison["systems"][reference]["params"]
    for verdict in comparison["verdicts"]:
        mine, theirs = comparison["systems"][verdict["system"]], comparison["systems"][reference]
        assert verdict["equal_budget"] is True and verdict["directions"] == 42
        assert verdict["delta_avg_directions"] == pytest.approx(mine["avg_directions"] - theirs["avg_directions"])
        assert verdict["winner"] in (verdict["system"], reference, "tie") and isinstance(verdict["clear"], bool)
    # The sharper plan is the default one, and the trained adapters carry its ranks and pruning ratios.
    assert summary["plan"]["ranks"] == comparison["systems"]["LSLo ISE plan s=4"]["ranks"]
    plan = comparison["systems"]["LSLo ISE plan s=4"]
    model = lslo.load_base_model(str(copy / "base_model"))
    lslo.load_adapters(model, copy / "systems" / "lslo-ise-plan-s-4" / "run" / "final")
    config = lslo.get_lslo_config(model)
    assert dict(zip(config.languages, config.language_ranks)) == plan["ranks"]
    assert lslo.parameter_report(model)["total"] == plan_params(plan, scores)
    achieved = pruning_summary(model)
    for code in codes:  # the quick GPS schedule reaches the full ratio by the last epoch
        assert achieved[code] == pytest.approx(plan["prune"].get(code, 0.0), abs=0.02)

    # Figures, report, terminal.
    for png in ("wl/fig1_index_weights.png", "ise/fig2_language_modules.png", "ise/fig5_per_layer.png"):
        assert _png(copy / "analyses" / png)[0] > 200
    report = (copy / "report.md").read_text()
    assert "ISE plans against the resource-group ranks at the budget of 2;2;8" in report
    assert "| LSLo ISE plan s=4 |" in report and ("wins" in report or "a tie" in report)
    assert "ISE plan vs resource-group ranks at the same budget" in terminal

    # Resumed again: nothing re-run; other analysis settings are refused only once analyses are done.
    assert main(["demo", "--quick", "--output-dir", str(copy), "--no-progress", "--resume", "--analyses"]) == 0
    again = json.loads((copy / STATE_FILE).read_text())["done"]
    assert all(again[k] == v for k, v in state["done"].items() if k != "report")
    from lslo.demo.run import _State

    settings = json.loads((copy / STATE_FILE).read_text())["settings"]
    with pytest.raises(ValueError, match=r"other settings \(analysis\)"):
        _State(copy / STATE_FILE, {**settings, "analysis": {**settings["analysis"], "wl_epochs": 9}}, resume=True)
    _State(copy / STATE_FILE, {**settings, "analyses": False, "analysis": {}}, resume=True)  # not asked: not compared


def plan_params(plan, scores):
    from lslo import plans

    return sum(plan["ranks"].values()) * plans._parameters_per_rank(scores)


def test_compare_systems_on_fixed_rows():
    from scipy.stats import sem

    from lslo.demo.run import compare_systems

    codes = {"en": "H", "fr": "H", "oc": "V", "wo": "V"}
    pairs = [(s, t) for s in codes for t in codes if s != t]
    base = [{"src": s, "tgt": t, "group": f"{codes[s]}2{codes[t]}", "bleu": 10.0 + i} for i, (s, t) in enumerate(pairs)]
    gains = [0.5 * ((i % 3) - 0.5) for i in range(len(pairs))]
    plan = [{**row, "bleu": row["bleu"] + g} for row, g in zip(base, gains)]
    result = compare_systems({"groups": base}, {"plan": plan}, reference="groups", params={"groups": 10, "plan": 10},
                             plans={"plan": {"ranks": {"en": 1}, "prune": {}, "sharpness": 4.0}}, budget="2;8")
    verdict = result["verdicts"][0]
    mean_gain = sum(gains) / len(gains)
    assert verdict["delta_avg_directions"] == pytest.approx(mean_gain)
    assert verdict["paired_se"] == pytest.approx(sem(gains))
    assert verdict["directions_better"] == sum(g > 0 for g in gains) and verdict["equal_budget"] is True
    h2h = [g for (s, t), g in zip(pairs, gains) if codes[s] == codes[t] == "H"]
    assert verdict["delta"]["H2H"] == pytest.approx(sum(h2h) / len(h2h))
    assert verdict["winner"] == ("plan" if mean_gain >= 0.005 else "groups" if mean_gain <= -0.005 else "tie")
    assert verdict["clear"] == (abs(mean_gain) > 2 * sem(gains))
    assert result["systems"]["plan"]["ranks"] == {"en": 1} and result["metric"] == "BLEU"
    # A clear loss is named as one.
    worse = [{**row, "bleu": row["bleu"] - 1.0 - 0.01 * i} for i, row in enumerate(base)]
    lost = compare_systems({"groups": base}, {"plan": worse}, reference="groups")["verdicts"][0]
    assert lost["winner"] == "groups" and lost["clear"] and lost["equal_budget"] is None
    with pytest.raises(ValueError, match="reference 'nope'"):
        compare_systems({"groups": base}, {"plan": plan}, reference="nope")


def _synthetic_rows(offsets):
    codes = {"en": "H", "fr": "H", "oc": "V", "wo": "V"}
    pairs = [(s, t) for s in codes for t in codes if s != t]
    return {name: [{"src": s, "tgt": t, "group": f"{codes[s]}2{codes[t]}", "bleu": 10.0 + i + f(i)}
                   for i, (s, t) in enumerate(pairs)] for name, f in offsets.items()}


def test_paired_differences_on_synthetic_rows():
    from scipy.stats import sem

    from lslo.demo.run import paired_differences

    noise = [0.3 * ((i * 7) % 5 - 2) for i in range(12)]
    rows = _synthetic_rows({"Ft-all": lambda i: 0.0, "LSLo 8;8;8": lambda i: 2.0 + 0.1 * (i % 2),
                            "LSLo 2;2;8": lambda i: noise[i]})
    verdicts = {(v["system"], v["against"]): v for v in paired_differences(rows, ["Ft-all", "LSLo 8;8;8", "absent"])}
    assert set(verdicts) == {("LSLo 8;8;8", "Ft-all"), ("LSLo 2;2;8", "Ft-all"), ("Ft-all", "LSLo 8;8;8"),
                             ("LSLo 2;2;8", "LSLo 8;8;8")}
    clear = verdicts[("LSLo 8;8;8", "Ft-all")]
    assert clear["delta"] == pytest.approx(2.05) and clear["directions"] == 12 and not clear["within_noise"]
    assert clear["paired_se"] == pytest.approx(sem([2.0 + 0.1 * (i % 2) for i in range(12)]))
    tie = verdicts[("LSLo 2;2;8", "Ft-all")]
    assert tie["delta"] == pytest.approx(sum(noise) / 12) and tie["paired_se"] == pytest.approx(sem(noise))
    assert tie["within_noise"] == (abs(sum(noise) / 12) <= 2 * sem(noise)) and tie["within_noise"]
    assert verdicts[("Ft-all", "LSLo 8;8;8")]["delta"] == pytest.approx(-2.05)


def test_report_fairness_section_states_rules_noise_and_share():
    from lslo.demo.run import FULL, PAPER_LR, _fairness_section, gps_schedule

    assert gps_schedule(15) == (2, 8) and gps_schedule(10) == (1, 6)  # the paper's shape at any length
    for system in FULL.systems:
        if system.train and system.train.get("method") == "ft-all":
            assert system.train["lr"] == PAPER_LR["ft-all"] == 1e-4
        elif system.train:
            assert system.train["lr"] == PAPER_LR["lslo"] == 3e-3
    rows = _synthetic_rows({"Pretrain": lambda i: -3.0, "Ft-all": lambda i: 0.0,
                            "LSLo 8;8;8": lambda i: 2.0 + 0.1 * (i % 2), "LSLo 2;2;8": lambda i: 0.05 * (-1) ** i})
    params = {"Pretrain": None, "Ft-all": 1_000_000, "LSLo 8;8;8": 400_000, "LSLo 2;2;8": 200_000}
    text = "\n".join(_fairness_section(FULL, rows, params))
    assert "Ft-all 0.0001, LSLo 0.003" in text and "after epoch 1 and reaches its ratio at epoch 7 of 10" in text
    assert "| LSLo 8;8;8 | +2.05 +- 0.02 | - |" in text
    assert "| LSLo 2;2;8 | +0.00 +- 0.02 (within noise) | -2.05 +- 0.03 |" in text
    assert "Within noise: " in text and "LSLo 2;2;8 vs Ft-all" in text
    assert "40.0% of the model's 1,000,000" in text and "2.5% of M2M-124 615M" in text and "16x the paper's" in text
    assert "update_freq 1" in text and "attention_dropout 0.0" in text
