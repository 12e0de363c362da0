"""lslo.analysis: Eq. 6 scores against torch's global pruning, a constructed needy language, plans under a
budget, figures, correlations against scipy, bad input, and `lslo estimate` / `lslo plan` end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lslo
from lslo import analysis, weight_learning
from lslo.pruning import prune
from lslo.testing import randomize_adapters, tiny_config
from tests.hf_fixtures import RUN_LANGS, tiny_run_setup

pytestmark = pytest.mark.usefixtures("hf_one_thread")

LANGS = RUN_LANGS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bare_model(ranks=4, languages=LANGS, seed=0, **config):
    """A d_model-32, 2 + 2 layer M2M-100 with LSLo (random factors) in every module; no tokenizer needed."""
    from transformers import M2M100ForConditionalGeneration

    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(tiny_config(vocab_size=64)).eval()
    lslo.apply_lslo(model, lslo.LSLoConfig(languages=list(languages), ranks=ranks, **config))
    randomize_adapters(model, seed=seed)
    return model


def torch_layer_pool_scores(model, ratio: float) -> dict[tuple, float]:
    """Eq. 6 from torch.nn.utils.prune.global_unstructured (L1) on copies of each layer's B blocks."""
    import torch.nn.utils.prune as torch_prune

    config = lslo.get_lslo_config(model)
    pools: dict[str, list[tuple[tuple, nn.Module]]] = {}
    for name, module in lslo.lslo_modules(model).items():
        side, _, rest = name.partition(".layers.")
        side = side.rsplit(".", 1)[-1]
        layer, _, module_type = rest.partition(".")
        col = 0
        for code, rank in zip(config.languages, module.ranks):
            holder = nn.Module()
            holder.weight = nn.Parameter(module.lora_B[:, col : col + rank].detach().clone())
            pools.setdefault(f"{side}.{layer}", []).append(((code, side, int(layer), module_type), holder))
            col += rank
    scores = {}
    for members in pools.values():
        torch_prune.global_unstructured([(h, "weight") for _, h in members], pruning_method=torch_prune.L1Unstructured,
                                        amount=ratio)
        for key, holder in members:
            mask = holder.weight_mask
            scores[key] = int((mask == 0).sum()) - ratio * mask.numel()
    return scores


# ---------------------------------------------------------------- scores
def test_layer_pool_scores_equal_torch_global_pruning_and_sum_to_zero():
    model = bare_model()
    prune(model, 0.7, pool="layer")
    scores = analysis.score_model(model, 0.7, pool="layer")
    expected = torch_layer_pool_scores(bare_model(), 0.7)  # same seed: same factors, pruned by torch
    got = {(r["language"], r["side"], r["layer"], r["module"]): r["score"] for r in scores["rows"]}
    assert got.keys() == expected.keys()
    assert got == pytest.approx(expected)
    pools: dict[str, float] = {}
    for row in scores["rows"]:
        key = f"{row['side']}.{row['layer']}"
        pools[key] = pools.get(key, 0.0) + row["score"]
    assert len(pools) == 4
    for total in pools.values():  # #pruned(pool) = round(0.7 n): the sum is zero up to that rounding
        assert abs(total) <= 0.5
    assert {m["module"] for m in scores["modules"]} >= {"self_attn.q_proj", "encoder_attn.v_proj", "fc1", "fc2"}
    assert scores["rank"] == 4 and scores["languages"] == list(LANGS)


def test_language_pool_scores_sum_to_zero_per_language():
    model = bare_model(ranks=[2, 2, 8, 8])  # unequal ranks are fine for language pools
    prune(model, 0.7, pool="language")
    scores = analysis.score_model(model, 0.7, pool="language")
    per_language = analysis.language_demands(scores)
    for code in LANGS:
        assert abs(per_language[code]["score"]) <= 0.5
        assert per_language[code]["kept"] == pytest.approx(0.3, abs=1e-3)
    assert scores["rank"] is None


def test_language_with_larger_b_needs_more_space():
    model = bare_model()
    needy = lslo.get_lslo_config(model).lang_id("oc")
    with torch.no_grad():
        for module in lslo.lslo_modules(model).values():
            _, b, _ = module.language_factors(needy)
            b.mul_(3.0)
    prune(model, 0.7, pool="layer")
    scores = analysis.score_model(model, 0.7)
    for row in scores["rows"]:
        if row["language"] == "oc":
            assert row["score"] < 0, row
    totals = {c: d["score"] for c, d in analysis.language_demands(scores).items()}
    assert min(totals, key=totals.get) == "oc"
    assert all(totals[c] > 0 for c in LANGS if c != "oc")


# ------------------------------------------------------------------ plans
def synthetic_scores(kept: dict[str, float], *, layers=2, out=32, inp=32, rank=8, target=0.7) -> dict:
    """A scores document whose languages kept the given share of their B entries in every module."""
    modules, rows = [], []
    for side in ("encoder", "decoder"):
        for layer in range(layers):
            for module in ("self_attn.q_proj", "fc1"):
                modules.append({"name": f"model.{side}.layers.{layer}.{module}", "side": side, "layer": layer,
                                "module": module, "in_features": inp, "out_features": out})
                for code, share in kept.items():
                    numel = out * rank
                    pruned = round((1 - share) * numel)
                    rows.append({"language": code, "side": side, "layer": layer, "module": module, "numel": numel,
                                 "pruned": pruned, "score": pruned - target * numel})
    return {"format": analysis.SCORES_FORMAT, "version": 1, "pool": "layer", "target": target, "rank": rank,
            "languages": list(kept), "ranks": dict.fromkeys(kept, rank), "target_modules": "all", "ffn": "full",
            "modules": modules, "rows": rows}


def test_plan_respects_the_budget_and_follows_the_scores():
    scores = synthetic_scores({"en": 0.15, "fr": 0.2, "oc": 0.45, "wo": 0.4})
    plan = analysis.plan_from_scores(scores, "2;8")  # en, fr H; oc, wo V: the budget of 2;2;8;8
    per_rank = 8 * 64  # 8 modules x (32 in + 32 out)
    assert plan["parameters_per_rank"] == per_rank
    assert plan["budget"] == (2 + 2 + 8 + 8) * per_rank
    assert plan["budget"] - per_rank < plan["parameters"] <= plan["budget"]
    assert sum(plan["ranks"].values()) * per_rank == plan["parameters"]
    order = sorted(LANGS, key=lambda c: plan["scores"][c])  # most negative score first
    assert order[0] == "oc"
    ranks = [plan["ranks"][c] for c in order]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]
    assert min(plan["ranks"].values()) >= 1
    assert "oc" not in plan["prune"]  # the neediest language is not pruned
    assert plan["prune"]["en"] == pytest.approx(min(0.9, round(1 - 0.15 / 0.45, 2)))
    # Sharper plans give the needy more (the default sharpness is 4).
    assert plan["sharpness"] == 4.0
    flat = analysis.plan_from_scores(scores, "2;8", sharpness=1.0)
    assert plan["ranks"]["oc"] > flat["ranks"]["oc"] and flat["parameters"] <= flat["budget"]
    assert plan["ranks"]["en"] < flat["ranks"]["en"]
    # A number works too, and a budget of n rank-1 adapters gives rank 1 to everyone.
    one_each = analysis.plan_from_scores(scores, str(4 * per_rank))
    assert one_each["ranks"] == dict.fromkeys(LANGS, 1)


def test_plan_budget_from_ranks_equals_the_parameter_report():
    model = bare_model(ranks=8)
    prune(model, 0.7, pool="layer")
    scores = analysis.score_model(model, 0.7)
    total, _ = analysis.parse_budget("2;8", scores)
    reference = bare_model(ranks="2;8")
    assert total == lslo.parameter_report(reference)["total"]


def test_plan_config_is_read_by_lslo_train(tmp_path):
    from lslo.train import TrainArguments, _parse_ranks, language_prune_targets, load_config_file

    scores = synthetic_scores({"en": 0.15, "fr": 0.2, "oc": 0.45, "wo": 0.4})
    plan = analysis.plan_from_scores(scores, "2;8")
    for suffix in (".toml", ".json"):
        path = analysis.write_plan_config(plan, tmp_path / f"plan{suffix}", index_plan="paper")
        values = load_config_file(path)
        args = TrainArguments(**values, output_dir=str(tmp_path / "run"))
        config = lslo.LSLoConfig(languages=args.languages.split(","), ranks=_parse_ranks(args.ranks),
                                 target_modules=args.target_modules)
        assert dict(zip(config.languages, config.language_ranks)) == plan["ranks"]
        assert language_prune_targets(config, args.prune) == plan["prune"]
        assert args.prune_pool == "language" and args.index_plan == "paper"
    assert json.loads((tmp_path / "plan.details.json").read_text())["ranks"] == plan["ranks"]


# ---------------------------------------------------------------- figures
def _heatmaps(figure) -> int:
    return sum(1 for ax in figure.get_axes() if ax.images)


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


def test_figures_are_pngs_with_one_panel_per_side_layer_and_language(tmp_path):
    model = bare_model()
    prune(model, 0.7, pool="layer")
    scores = analysis.score_model(model, 0.7)
    cases = [(analysis.plot_language_modules, 2), (analysis.plot_layer_modules, 2),
             (analysis.plot_per_layer, 2 * 2), (analysis.plot_per_language, 2 * len(LANGS))]
    for plot, panels in cases:
        path = tmp_path / f"{plot.__name__}.png"
        figure = plot(scores, path)
        _check_png(path)
        assert _heatmaps(figure) == panels, plot.__name__
    labels, columns, matrix = analysis.score_matrix(scores, side="decoder", by="language")
    assert labels == list(LANGS) and columns == ["q", "k", "v", "c-q", "c-k", "c-v", "fc1", "fc2"]
    rows = [r for r in scores["rows"] if r["side"] == "decoder" and r["language"] == "oc" and r["module"] == "fc2"]
    assert matrix[2, 7] == pytest.approx(sum(r["score"] for r in rows) / len(rows))


# ----------------------------------------------------------- correlations
def test_correlations_equal_scipy_pearsonr():
    from scipy.stats import pearsonr

    kept = {"en": 0.2, "fr": 0.21, "de": 0.25, "zh": 0.3, "ja": 0.28, "oc": 0.45, "wo": 0.4, "sd": 0.5}
    scores = synthetic_scores(kept)
    # Give fc1 of the decoder its own pattern, so modules differ.
    for row in scores["rows"]:
        if row["side"] == "decoder" and row["module"] == "fc1" and row["layer"] == 1:
            row["score"] += {"fr": 40.0, "oc": -25.0}.get(row["language"], 3.0)
    result = analysis.module_correlations(scores)  # the paper's sizes: English has none
    codes = [c for c in kept if c != "en"]
    assert result["languages"] == codes
    sizes = [analysis.PAPER_BITEXT_SIZES[c] for c in codes]
    for side in ("encoder", "decoder"):
        for entry in result[side]["modules"]:
            module = {"q": "self_attn.q_proj", "fc1": "fc1"}[entry["module"]]
            means = [sum(r["score"] for r in scores["rows"] if r["language"] == c and r["side"] == side
                         and r["module"] == module) / 2 for c in codes]
            expected = pearsonr(sizes, means)
            assert entry["r"] == pytest.approx(expected.statistic, abs=1e-12)
            assert entry["p"] == pytest.approx(expected.pvalue, abs=1e-12)
            assert entry["n"] == len(codes)
        modules = result[side]["modules"]
        assert result[side]["avg"]["r"] == pytest.approx(sum(m["r"] for m in modules) / len(modules))
    logs = analysis.module_correlations(scores, log_sizes=True)
    totals = [sum(r["score"] for r in scores["rows"] if r["language"] == c) for c in codes]
    assert logs["overall"]["r"] == pytest.approx(pearsonr([math.log10(s) for s in sizes], totals).statistic)
    text = analysis.format_correlations(result)
    assert "Table 9 (encoder)" in text and "Table 10 (decoder)" in text and "AVG" in text
    # The paper's Tables 5/6 built in, as sentence pairs.
    assert analysis.PAPER_BITEXT_SIZES["fr"] == 289e6 and analysis.PAPER_BITEXT_SIZES["oc"] == 5110
    assert analysis.PAPER_BITEXT_SIZES["en"] is None
    assert set(analysis.PAPER_BITEXT_SIZES) == set(lslo.LANGUAGE_SETS["lang30"])


def test_sizes_files_and_size_strings(tmp_path):
    assert analysis.parse_size("5.11K") == pytest.approx(5110)
    assert analysis.parse_size("289M") == 289e6 and analysis.parse_size(86_900) == 86900
    (tmp_path / "s.tsv").write_text("language\tsize\nxx\t1.5M\n# comment\nyy\t2000\n")
    assert analysis.read_sizes(tmp_path / "s.tsv") == {"xx": 1.5e6, "yy": 2000}
    (tmp_path / "s.json").write_text('{"xx": "3K", "yy": 12}')
    assert analysis.read_sizes(tmp_path / "s.json") == {"xx": 3000, "yy": 12}
    (tmp_path / "bad.tsv").write_text("xx lots\n")
    with pytest.raises(ValueError, match="xx"):
        analysis.read_sizes(tmp_path / "bad.tsv")
    with pytest.raises(ValueError, match="positive"):
        analysis.parse_size(-3)


# --------------------------------------------------------------- bad input
def test_bad_input_is_refused():
    from transformers import M2M100ForConditionalGeneration

    plain = M2M100ForConditionalGeneration(tiny_config(vocab_size=64))
    with pytest.raises(ValueError, match="no LSLo"):
        analysis.score_model(plain, 0.7)
    unequal = bare_model(ranks=[2, 2, 8, 8])
    prune(unequal, 0.7, pool="layer")
    with pytest.raises(ValueError, match=r"one rank .*'en': 2.*'oc': 8"):
        analysis.score_model(unequal, 0.7, pool="layer")
    half = bare_model()
    prune(half, 0.35, pool="layer")  # a run that stopped before the schedule reached 0.7
    with pytest.raises(ValueError, match="not the target 0.7"):
        analysis.score_model(half, 0.7)
    scores = synthetic_scores({"en": 0.2, "oc": 0.4})
    with pytest.raises(ValueError, match="smaller than one rank-1 adapter per language"):
        analysis.plan_from_scores(scores, str(2 * 8 * 64 - 1))
    with pytest.raises(ValueError, match="--budget"):
        analysis.plan_from_scores(scores, "lots")
    with pytest.raises(ValueError, match="pool 'layer'"):
        analysis.plan_from_scores({**scores, "pool": "language"}, "2;8")
    with pytest.raises(ValueError, match="reaches prune_ratio"):
        analysis.EstimateArguments(output_dir="x", epochs=5, prune_start=2, prune_duration=8)
    with pytest.raises(ValueError, match="pool"):
        analysis.EstimateArguments(pool="global")
    with pytest.raises(ValueError, match="at least 3 languages"):
        analysis.module_correlations(scores)


# ----------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("analysis"), dev_lines=6, devtest_lines=2)


def test_cli_estimate_then_plan(hf_setup, tmp_path, capsys):
    from lslo.cli import main
    from lslo.train import TrainArguments, load_config_file

    out = tmp_path / "ise"
    (tmp_path / "sizes.txt").write_text("en 1000000\nfr 500000\noc 2000\nwo 800\n")
    status = main(["estimate", "--model", hf_setup["model"], "--flores-dir", hf_setup["flores"], "--languages",
                   ",".join(LANGS), "--output-dir", str(out), "--epochs", "3", "--prune-start", "1",
                   "--prune-duration", "2", "--max-tokens", "160", "--warmup-updates", "4", "--cpu", "--no-progress",
                   "--sizes", str(tmp_path / "sizes.txt")])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "Intrinsic Subspace Estimation" in printed.out and "Table 9 (encoder)" in printed.out
    for name in ("subspace_scores.json", "subspace_scores.csv", "fig2_language_modules.png", "fig5_per_layer.png",
                 "fig4_layer_modules.png", "fig6_per_language.png", "correlations.json", "correlations.txt"):
        assert (out / name).is_file(), name
    scores = analysis.read_scores(out)
    assert scores["pool"] == "layer" and scores["rank"] == 8
    correlations = json.loads((out / "correlations.json").read_text())
    assert correlations["languages"] == list(LANGS) and correlations["sizes"]["wo"] == 800
    # The adapters of the run score the same without training again.
    again = analysis.estimate_subspace(analysis.EstimateArguments(
        model=hf_setup["model"], output_dir=str(tmp_path / "rescored"), adapters=str(out / "run" / "final")))
    assert again.scores["rows"] == scores["rows"]

    assert main(["plan", "--scores", str(out), "--budget", "2;8"]) == 0
    printed = capsys.readouterr()
    assert "rank" in printed.out
    values = load_config_file(out / "plan.toml")
    TrainArguments(**values, output_dir=str(tmp_path / "run"))  # valid lslo train settings
    assert set(values["languages"].split(",")) == set(LANGS)

    assert main(["plan", "--scores", str(out), "--budget", "100"]) == 2
    assert "smaller than one rank-1 adapter per language" in capsys.readouterr().err
    assert main(["estimate", "--model", hf_setup["model"], "--output-dir", str(tmp_path / "x"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reaches prune_ratio" in err


def test_run_analyses_reports_recovery(hf_setup, tmp_path):
    sizes = {"en": 1e6, "fr": 5e5, "oc": 2e3, "wo": 8e2}
    result = analysis.run_analyses(hf_setup["model"], hf_setup["flores"], tmp_path, resource_sizes=sizes, epochs=3,
                                   prune_start=1, prune_duration=2, max_tokens=160, warmup_updates=4, wl_epochs=1)
    assert isinstance(result["recovered"], bool)
    overall = result["correlation_log"]["overall"]
    totals = analysis.language_demands(result["estimate"].scores)
    from scipy.stats import pearsonr

    expected = pearsonr([math.log10(sizes[c]) for c in LANGS], [totals[c]["score"] for c in LANGS])
    assert overall["r"] == pytest.approx(expected.statistic)
    assert result["recovered"] == (overall["r"] > 0 and overall["p"] < 0.05)
    assert set(result["group_means"]) == {"H", "V"}
    assert result["plan_config"].is_file() and "ISE recovers the resource levels" in result["summary"]
    assert result["plan"]["parameters"] <= result["plan"]["budget"]
    # Weight Learning ran first and the plan's config trains with its index plan.
    assert result["index"] is not None and result["index"].files["index_plan"].is_file()
    assert "index_plan" in result["plan_config"].read_text()


# --------------------------------------------------------- weight learning
def wl_model(dtype=torch.float32, seed=0):
    """A tiny M2M-100 with Weight Learning (both routings, rank 4) and random B in both sets."""
    from transformers import M2M100ForConditionalGeneration

    from lslo.model import apply_weight_learning

    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(tiny_config(vocab_size=64)).eval()
    apply_weight_learning(model, lslo.LSLoConfig(languages=list(LANGS), ranks=4))
    model.to(dtype)  # the mixing logits too
    with torch.no_grad():
        for module in weight_learning._dual_modules(model).values():
            for factors in (module.src, module.tgt):
                factors.lora_B.normal_(0.0, 0.3)
    return model


def _wl_loss(model, batch):
    with lslo.route(src=batch["src"], tgt=batch["tgt"]):
        logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def _wl_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(4, 64, (4, 7), generator=generator),
            "decoder_input_ids": torch.randint(4, 64, (4, 5), generator=generator),
            "labels": torch.randint(4, 64, (4, 5), generator=generator),
            "src": torch.tensor([0, 1, 2, 3]), "tgt": torch.tensor([3, 2, 1, 0])}


def test_mixing_logits_get_gradients_and_are_shared_by_the_layer():
    from lslo.model import weight_learning_mixes

    model = wl_model(torch.float64)
    mixes = weight_learning_mixes(model)
    assert sorted(mixes) == [f"model.{side}.layers.{i}" for side in ("decoder", "encoder") for i in range(2)]
    logits = [name for name, p in model.named_parameters() if p.requires_grad and name.endswith("logits")]
    assert len(logits) == 4  # two logits per layer, none per module
    for name, module in weight_learning._dual_modules(model).items():
        layer = re.match(r"(.*\.layers\.\d+)\.", name).group(1)
        with torch.no_grad():
            mixes[layer].logits.add_(torch.tensor([0.25, -0.5]))  # moving a layer's logits moves all its modules...
            torch.testing.assert_close(module.mix_weights_now().double(), torch.softmax(mixes[layer].logits.double(), 0))
            mixes[layer].logits.sub_(torch.tensor([0.25, -0.5]))
    batch = _wl_batch()
    loss = _wl_loss(model, batch)
    loss.backward()
    for layer, mix in mixes.items():
        assert mix.logits.grad is not None and bool(torch.isfinite(mix.logits.grad).all()), layer
        assert mix.logits.grad.abs().max() > 0, layer
    # ...and the gradient is that of the loss through every module of the layer (central differences).
    mix = mixes["model.encoder.layers.1"]
    eps = 1e-5
    with torch.no_grad():
        mix.logits[0] += eps
        up = _wl_loss(model, batch)
        mix.logits[0] -= 2 * eps
        down = _wl_loss(model, batch)
        mix.logits[0] += eps
    assert mix.logits.dtype == torch.float64
    assert float(mix.logits.grad[0]) == pytest.approx(float(up - down) / (2 * eps), rel=1e-6)


def test_index_plan_is_the_argmax_per_layer_and_lslo_train_reads_it(tmp_path):
    from lslo.model import weight_learning_mixes
    from lslo.train import _load_index_plan

    model = wl_model()
    chosen = {"model.encoder.layers.0": (1.0, -1.0), "model.encoder.layers.1": (-0.5, 0.5),
              "model.decoder.layers.0": (0.3, 0.2), "model.decoder.layers.1": (-2.0, 0.1)}
    with torch.no_grad():
        for layer, values in chosen.items():
            weight_learning_mixes(model)[layer].logits.copy_(torch.tensor(values))
    weights = analysis.learned_mix_weights(model)
    for side in ("encoder", "decoder"):
        for i, pair in enumerate(weights[side]):
            expected = torch.softmax(torch.tensor(chosen[f"model.{side}.layers.{i}"], dtype=torch.float64), 0)
            assert pair == pytest.approx(tuple(expected.tolist()))
    plan = analysis.derive_index_plan(weights)
    assert plan == {"encoder": ["src", "tgt"], "decoder": ["src", "tgt"]}
    generator = torch.Generator().manual_seed(1)
    table = torch.softmax(torch.randn(12, 2, generator=generator), dim=1)
    derived = analysis.derive_index_plan({"encoder": table.tolist()})["encoder"]
    assert derived == [("src", "tgt")[int(i)] for i in torch.argmax(table, dim=1)]

    path = analysis.write_index_plan(weights, tmp_path / "index_plan.json")
    target = bare_model(index_plan=_load_index_plan(str(path)))
    for name, module in lslo.lslo_modules(target).items():
        side = "encoder" if ".encoder." in name else "decoder"
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert module.index == plan[side][layer], name
    assert analysis.read_index_plan(path, num_encoder_layers=2, num_decoder_layers=2) == plan
    figure = analysis.plot_index_weights(weights, tmp_path / "fig1.png")
    _check_png(tmp_path / "fig1.png")
    assert len(figure.axes[0].get_lines()) == 4


def test_weight_learning_state_round_trips(tmp_path):
    from transformers import M2M100ForConditionalGeneration

    from lslo.model import weight_learning_mixes

    model = wl_model()
    with torch.no_grad():
        for mix in weight_learning_mixes(model).values():
            mix.logits.normal_()
    analysis.save_weight_learning(model, tmp_path / "wl")

    torch.manual_seed(0)  # the base weights of wl_model
    fresh = M2M100ForConditionalGeneration(tiny_config(vocab_size=64)).eval()
    analysis.load_weight_learning(fresh, tmp_path / "wl")
    before, after = analysis.weight_learning_state(model), analysis.weight_learning_state(fresh)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    batch = _wl_batch()
    with torch.no_grad():
        torch.testing.assert_close(_wl_loss(fresh, batch), _wl_loss(model, batch))


def test_save_and_load_adapters_take_weight_learning_models(tmp_path):
    """lslo.save_adapters / load_adapters on a Weight-Learning model (dual layers, no LSLo config)
    write and read its state through the Weight-Learning files: a fresh base model gets the same
    tensors and the same loss."""
    from transformers import M2M100ForConditionalGeneration

    from lslo.model import weight_learning_mixes

    model = wl_model()
    with torch.no_grad():
        for mix in weight_learning_mixes(model).values():
            mix.logits.normal_()
    lslo.save_adapters(model, tmp_path / "wl")
    assert sorted(p.name for p in (tmp_path / "wl").iterdir()) == sorted([analysis.WL_CONFIG_NAME,
                                                                           analysis.WL_WEIGHTS_NAME])
    torch.manual_seed(0)  # the base weights of wl_model
    fresh = M2M100ForConditionalGeneration(tiny_config(vocab_size=64)).eval()
    assert lslo.load_adapters(fresh, tmp_path / "wl") is fresh
    before, after = analysis.weight_learning_state(model), analysis.weight_learning_state(fresh)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    batch = _wl_batch()
    with torch.no_grad():
        torch.testing.assert_close(_wl_loss(fresh, batch), _wl_loss(model, batch))
    with pytest.raises(ValueError, match="no LSLo adapters|holds no|lslo_config"):
        lslo.load_adapters(M2M100ForConditionalGeneration(tiny_config(vocab_size=64)), tmp_path / "nothing")


def test_index_plan_of_another_depth_is_refused(tmp_path):
    from lslo.train import _load_index_plan

    path = analysis.write_index_plan({"encoder": [(0.6, 0.4)] * 3, "decoder": [(0.2, 0.8)] * 3}, tmp_path / "p.json")
    with pytest.raises(ValueError, match="learned for a 3-layer encoder; this model's encoder has 2 layers"):
        analysis.read_index_plan(path, num_encoder_layers=2, num_decoder_layers=2)
    with pytest.raises(ValueError, match="3 entries for a 2-layer encoder"):
        bare_model(index_plan=_load_index_plan(str(path)))
    (tmp_path / "bad.json").write_text('{"index_plan": {"encoder": ["up", "down"]}}')
    with pytest.raises(ValueError, match="bad.json"):
        analysis.read_index_plan(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="two finite numbers"):
        analysis.derive_index_plan({"encoder": [(0.5, float("nan"))]})


def test_cli_learn_index(hf_setup, tmp_path, capsys):
    from lslo.cli import main
    from lslo.train import TrainArguments

    out = tmp_path / "wl"
    status = main(["learn-index", "--model", hf_setup["model"], "--flores-dir", hf_setup["flores"], "--languages",
                   ",".join(LANGS), "--output-dir", str(out), "--epochs", "1", "--max-tokens", "160",
                   "--warmup-updates", "4", "--lr", "0.03", "--cpu", "--no-progress"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "w_src" in printed.out
    for name in ("mix_weights.json", "fig1_index_weights.png", "index_plan.json"):
        assert (out / name).is_file(), name
    document = json.loads((out / "index_plan.json").read_text())
    weights = json.loads((out / "mix_weights.json").read_text())["weights"]
    for side in ("encoder", "decoder"):
        assert len(document["index_plan"][side]) == 2
        for entry, index in zip(weights[side], document["index_plan"][side]):
            assert entry["w_src"] + entry["w_tgt"] == pytest.approx(1.0)
            assert index == ("src" if entry["w_src"] > entry["w_tgt"] else "tgt")
            assert entry["w_src"] != 0.5  # the logits trained
    with pytest.raises(ValueError, match="--prune does not apply"):
        from lslo.train import train

        train(TrainArguments(model=hf_setup["model"], flores_dir=hf_setup["flores"], languages=",".join(LANGS),
                             output_dir=str(tmp_path / "bad"), method="weight-learning", prune="0.5", cpu=True))
