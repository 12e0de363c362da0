"""Smoke test of the benchmark suite: every provider computes lslo's op, and a tiny run writes
the CSV, a plot and the README table (into a temporary folder)."""

from __future__ import annotations

import csv

import pytest
import torch

import lslo_kernels
from benchmarks import providers as P
from benchmarks import report
from benchmarks.suite import (
    Case,
    Options,
    make_lang,
    measure_case,
    ranks_for,
    run_suite,
)

from .utils import TOLERANCES

ATOL, RTOL = (max(t, 1e-4) for t in TOLERANCES[torch.float32])  # sums reordered by padding / grouping


def _tiny_problem(spread: str = "uniform", seed: int = 0) -> P.LayerProblem:
    # odd sizes, three languages of different ranks, one language absent, tokens without adapter
    ranks = [2, 8, 3, 5]
    gen = torch.Generator().manual_seed(seed)
    lang = torch.randint(-1, 3, (37,), generator=gen) if spread == "with_none" else make_lang(37, ranks, spread, seed)
    return P.make_problem(24, 40, ranks, lang, mask_density=[0.5, 1.0, 0.3, 0.1], seed=seed)


def _reference(problem: P.LayerProblem, x: torch.Tensor, grad: torch.Tensor | None = None):
    """lslo's own reference backend: output, and with ``grad`` the packed gradients too."""
    a = problem.lora_a.clone().requires_grad_(grad is not None)
    b = problem.lora_b.clone().requires_grad_(grad is not None)
    routing = lslo_kernels.build_routing(problem.lang, problem.num_languages)
    y = lslo_kernels.grouped_lora(x, problem.base(x), a, b, problem.prune_mask, problem.scales,
                                  problem.rank_offsets, routing, problem.max_rank, backend="reference")
    if grad is None:
        return y, None
    y.backward(grad)
    return y, (a.grad, b.grad)


def _prepared(name: str, problem: P.LayerProblem) -> P.PreparedProvider:
    try:
        return P.prepare_provider(name, problem)
    except P.Skip as exc:
        pytest.skip(f"{name}: {exc}")


@pytest.mark.parametrize("spread", ["uniform", "with_none", "single", "tiny"])
@pytest.mark.parametrize("name", P.available_providers("cpu"))
def test_provider_forward_matches_reference(name, spread):
    problem = _tiny_problem(spread)
    pp = _prepared(name, problem)
    with torch.no_grad():
        y = pp.run(problem.x, pp.prepare(problem.lang))
        expected, _ = _reference(problem, problem.x)
    if name == "base":
        torch.testing.assert_close(y, problem.base(problem.x))
        assert not torch.allclose(y, expected, atol=1e-3), "the cases must have a non-trivial LoRA term"
    else:
        torch.testing.assert_close(y, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", [n for n in P.available_providers("cpu") if n != "base"])
def test_provider_gradients_match_reference(name):
    problem = _tiny_problem("with_none", seed=1)
    pp = _prepared(name, problem)
    if not pp.training:
        assert pp.skip_training_reason
        pytest.skip(pp.skip_training_reason)
    grad = torch.randn(problem.x.shape[0], problem.lora_b.shape[0])
    for t in pp.params:
        t.requires_grad_(True)
    x = problem.x.clone().requires_grad_(True)
    pp.run(x, pp.prepare(problem.lang)).backward(grad)
    x_ref = problem.x.clone().requires_grad_(True)
    _, (grad_a, grad_b) = _reference(problem, x_ref, grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=ATOL, rtol=RTOL)
    got_a, got_b = pp.packed_grads()
    torch.testing.assert_close(got_a, grad_a, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_b * problem.prune_mask, grad_b, atol=ATOL, rtol=RTOL)


def test_suite_flags_a_wrong_provider(monkeypatch):
    # A provider that drops one language's scale must be reported, not silently timed.
    def wrong_naive(x, base, lora_a, lora_b, prune_mask, scales, ranks, lang):
        scales = scales.clone()
        scales[1] = 0
        return correct_naive(x, base, lora_a, lora_b, prune_mask, scales, ranks, lang)

    correct_naive = P.naive_loop
    monkeypatch.setattr(P, "naive_loop", wrong_naive)
    opts = Options(threads=1, min_reps=1, max_reps=1, min_measure_s=0.0, measure_memory=False,
                   providers=["naive", "reference"], log=lambda msg: None)
    rows = measure_case(Case("t", "T", 16, 24, 30, languages=3, ranks="r4", modes=("fwd",)), "fwd", opts)
    notes = {r["provider"]: r["note"] for r in rows if r["metric"] == "max_abs_err"}
    assert notes == {"naive": "WRONG OUTPUT", "reference": ""}


@pytest.mark.parametrize("label,count", [("lang30", 30), ("r8", 5), ("mix2/8/64", 7)])
def test_ranks_labels(label, count):
    ranks, densities = ranks_for(label, count)
    assert len(ranks) == count
    if label == "lang30":
        assert ranks.count(2) == 16 and ranks.count(8) == 14 and densities[0] == 0.1 and densities[-1] == 1.0


@pytest.mark.parametrize("spread", ["uniform", "zipf", "single", "tiny"])
def test_spreads(spread):
    ranks = [2, 8, 64, 8]
    lang = make_lang(50, ranks, spread)
    assert lang.shape == (50,) and lang.dtype == torch.int64 and 0 <= int(lang.min()) and int(lang.max()) < 4
    if spread == "single":
        assert set(lang.tolist()) == {2}  # the language of largest rank
    if spread == "tiny":
        counts = torch.bincount(lang, minlength=4).tolist()
        assert counts[1:] == [2, 2, 2] and counts[0] == 44


def test_suite_writes_csv_plot_and_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# hand-written intro\n\nkept.\n")
    out = tmp_path / "out"
    cases = [
        Case("headline", "shape", 32, 48, 40, modes=("fwd+bwd", "fwd")),
        Case("T_decode", "T", 32, 48, 7, modes=("fwd",)),
        Case("L", "L", 32, 48, 24, languages=3, ranks="mix2/8/64", spread="tiny", modes=("bwd",)),
    ]
    log = []
    opts = Options(threads=1, min_reps=2, max_reps=2, budget_s=0.1, min_measure_s=0.0, log=log.append)
    run_id = run_suite(cases, opts, out, readme, history_csv=tmp_path / "history.csv", mode_name="test")

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(csv.DictReader((tmp_path / "history.csv").open())) == rows  # published: the run's rows
    # the terminal output ends with the summary table, what the ratio means, and the providers
    summary = log[-1]
    assert "32->48 T=40" in summary and "ratio = provider time / base nn.Linear time" in summary
    assert "providers:" in summary and "naive" in summary.split("providers:")[1]
    assert (out / "README.md").read_text().count(report.BEGIN) == 1
    assert {r["run_id"] for r in rows} == {run_id}
    layer = [r for r in rows if r["op"] == "lslo_linear"]
    timed = {(r["provider"], r["mode"]) for r in layer if r["metric"] == "time_ms"}
    skipped = {(r["provider"], r["mode"]): r["note"] for r in layer if r["metric"] == "skipped"}
    for name in P.available_providers("cpu"):
        for mode in ("fwd", "fwd+bwd"):
            assert (name, mode) in timed or skipped.get((name, mode)), (name, mode)
    assert ("peft", "fwd") in timed and "training" in skipped[("peft", "fwd+bwd")]
    errors = [r for r in layer if r["metric"] == "max_abs_err"]
    assert errors and all(not r["note"] for r in errors), [r for r in errors if r["note"]]
    for metric in ("ratio_vs_base", "speedup_vs_naive", "peak_mb", "saved_mb", "prep_ms"):
        assert any(r["metric"] == metric for r in layer), metric
    assert all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in layer if r["metric"] == "time_ms")
    assert rows[-1]["op"] == "suite" and float(rows[-1]["p50"]) > 0

    assert (out / "ratio_vs_base.png").stat().st_size > 0
    text = readme.read_text()
    assert text.startswith("# hand-written intro\n\nkept.\n")
    assert report.BEGIN in text and report.END in text
    assert "lslo `reference`" in text and "`naive`" in text and "32->48 T=40 L=30 lang30 uniform" in text

    # Regenerating replaces the block, never duplicates it, and keeps the intro.
    report.update_readme(readme, report.render(rows, run_id))
    again = readme.read_text()
    assert again.count(report.BEGIN) == 1 and again.startswith("# hand-written intro")


def test_a_crashing_backend_is_excluded_not_fatal(monkeypatch):
    import subprocess

    from benchmarks import suite

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, -11, "", "")  # SIGSEGV in the child

    monkeypatch.setattr(suite.subprocess, "run", fake_run)
    bad = suite.crashing_providers(["base", "naive", "reference", "cpp"], "cpu")
    assert list(bad) == ["cpp"] and "SIGSEGV" in bad["cpp"] and len(calls) == 1  # baselines not probed

    opts = Options(threads=1, min_reps=1, max_reps=1, min_measure_s=0.0, measure_memory=False,
                   providers=["naive", "cpp"], excluded=bad, log=lambda msg: None)
    rows = measure_case(Case("t", "T", 16, 24, 30, languages=3, ranks="r4", modes=("fwd",)), "fwd", opts)
    assert {r["note"] for r in rows if r["provider"] == "cpp"} == {bad["cpp"]}
    assert any(r["provider"] == "naive" and r["metric"] == "time_ms" for r in rows)


def test_time_cap_records_unmeasured_cases(tmp_path):
    cases = [Case("headline", "shape", 32, 48, 40, modes=("fwd",)), Case("T_decode", "T", 32, 48, 7, modes=("fwd",))]
    opts = Options(threads=1, hard_stop_s=0.0, log=lambda msg: None)
    run_suite(cases, opts, tmp_path, mode_name="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results.csv"]  # nothing else written
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    skipped = [r for r in rows if r["op"] == "lslo_linear"]
    assert len(skipped) == 2 and all(r["metric"] == "skipped" and "cap" in r["note"] for r in skipped)
    assert "not measured" in (tmp_path / "README.md").read_text()


def test_cli_lists_cases_and_rejects_unknown_provider(capsys):
    from benchmarks.__main__ import main

    assert main(["--quick", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "lang30" in listed and "T=2048" in listed and "T=160" in listed
    with pytest.raises(SystemExit):
        main(["--quick", "--providers", "naive,nope", "--list"])


def test_e2e_on_a_toy_model():
    from benchmarks.e2e import run_e2e

    pytest.importorskip("transformers")
    toy = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
           "encoder_attention_heads": 2, "decoder_attention_heads": 2, "vocab_size": 64,
           "max_position_embeddings": 32}
    rows = run_e2e(model_overrides=toy, batch=2, src_len=5, tgt_len=4, warmup=0, reps=1, beam5=False,
                   log=lambda msg: None)
    train = {r["provider"]: r for r in rows if r["op"] == "e2e_train"}
    import lslo

    if not hasattr(lslo, "apply_lslo"):
        assert train["lslo"]["metric"] == "skipped"
        return
    assert train["lslo"]["metric"] == "tokens_per_s", train["lslo"].get("note")
    assert train["naive"]["metric"] == "tokens_per_s" and train["peft"]["metric"] == "skipped"


def test_cli_writes_under_runs_by_default_and_publishes_only_on_request(monkeypatch, tmp_path):
    from benchmarks import __main__ as cli
    from benchmarks import suite

    calls = []
    monkeypatch.setattr(suite, "run_suite", lambda cases, opts, out, readme, **kw: calls.append((out, readme, kw)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--quick", "--only", "fixed_cost"]) == 0
    out, readme, kw = calls[-1]
    assert out.parts[:2] == ("runs", "benchmarks") and readme is None and kw["history_csv"] is None
    assert cli.main(["--quick", "--only", "fixed_cost", "--readme"]) == 0
    out, readme, kw = calls[-1]
    assert readme == cli.DEFAULT_README and kw["history_csv"] == cli.HISTORY_CSV


def test_fixed_cost_and_dual_cases_report_their_metrics(tmp_path):
    if "cpp" not in lslo_kernels.available_backends("cpu"):
        pytest.skip("cpp not built")
    opts = Options(threads=1, min_reps=2, max_reps=2, budget_s=0.1, min_measure_s=0.0, measure_memory=False,
                   providers=["cpp"], log=lambda msg: None)
    fixed = measure_case(Case("fixed_cost", "T", 16, 16, 3, languages=4, ranks="r2", modes=("fwd",)), "fwd", opts)
    assert any(r["provider"] == "cpp" and r["metric"] == "above_base_us" for r in fixed)
    dual = measure_case(Case("weight_learning", "shape", 16, 24, 40, languages=4, ranks="mix2/8",
                             extra_providers=("dual",)), "fwd+bwd", opts)
    metrics = {(r["provider"], r["metric"]): r for r in dual}
    assert ("dual", "ratio_vs_single") in metrics and ("dual", "time_ms") in metrics
    assert not metrics[("dual", "max_abs_err")]["note"]  # checked against two weighted reference calls


def test_translate_table_reports_time_over_base_and_the_adapters_overheads():
    """bench_translate's summary: per-round time over the base model, and the overhead line computed from it."""
    from benchmarks import bench_translate

    seconds = {"base": [1.0, 2.0, 1.0], "lslo_mixed": [1.1, 2.2, 1.05], "peft_adapter_names": [3.0, 6.2, 3.1]}
    rows = []
    for name, times in seconds.items():
        for metric, values in (("sentences_per_s", [30 / t for t in times]),
                               ("time_vs_base", [t / b for t, b in zip(times, seconds["base"])])):
            p20, p50, p80 = bench_translate._quantiles(values)
            rows.append({"case": "toy", "provider": name, "metric": metric, "p20": p20, "p50": p50, "p80": p80})
    table = bench_translate._table(rows)
    lines = {line.split()[1]: line for line in table.splitlines() if line.startswith("toy ")}
    assert lines["lslo_mixed"].endswith("1.10x") and lines["peft_adapter_names"].endswith("3.10x")
    assert "+10% (lslo, one mixed batch) and +210% (PEFT adapter_names) (21x lslo's)" in table
    assert "bounded by base/peft = 3.10x" in table
