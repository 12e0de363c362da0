"""lslo.pruning against torch.nn.utils.prune: Eq. 4, language and layer pools, masks, optimizer state, Eq. 6."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import lslo
from lslo.pruning import gradual_pruning_ratio, pool_entries, prune, pruning_summary, subspace_scores
from tests.hf_fixtures import tiny_config

LANGS = ["en", "fr", "oc", "wo"]


def _model(seed=0, ranks=None, languages=LANGS):
    from transformers import M2M100ForConditionalGeneration

    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(tiny_config(vocab_size=64))
    config = lslo.LSLoConfig(languages=languages, ranks=ranks or {"en": 2, "fr": 3, "oc": 8, "wo": 5})
    lslo.apply_lslo(model, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # distinct random magnitudes: no ties, so the choice is unique
        for module in lslo.lslo_modules(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator))
    return model


# ----------------------------------------------------------------------- Eq. 4
@pytest.mark.parametrize(("epoch", "expected"), [
    (1, 0.0), (2, 0.0),
    (3, 0.9 - 0.9 * (7 / 8) ** 3),   # 0.2970703125
    (4, 0.9 - 0.9 * (6 / 8) ** 3),   # 0.5203125
    (6, 0.9 - 0.9 * (4 / 8) ** 3),   # 0.7875
    (10, 0.9), (11, 0.9), (15, 0.9),
])
def test_gradual_pruning_ratio_eq4(epoch, expected):
    assert gradual_pruning_ratio(epoch, 0.9) == pytest.approx(expected, abs=1e-12)


def test_gradual_pruning_ratio_hand_values():
    # Hand-computed: P=0.5, E=1, k=2: epoch 2 -> 0.5 - 0.5 * 0.5**3 = 0.4375; epoch 3 -> 0.5.
    assert gradual_pruning_ratio(2, 0.5, start=1, duration=2) == 0.4375
    assert gradual_pruning_ratio(3, 0.5, start=1, duration=2) == 0.5
    assert gradual_pruning_ratio(1, 0.5, start=1, duration=2) == 0.0
    ratios = [gradual_pruning_ratio(e, 0.7) for e in range(1, 16)]
    assert ratios == sorted(ratios), "the schedule never decreases"


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5])
def test_gradual_pruning_ratio_rejects_bad_target(bad):
    with pytest.raises(ValueError, match="target"):
        gradual_pruning_ratio(3, bad)


def test_gradual_pruning_ratio_rejects_bad_epoch():
    with pytest.raises(ValueError, match="epoch"):
        gradual_pruning_ratio(0, 0.5)
    with pytest.raises(TypeError, match="epoch"):
        gradual_pruning_ratio(1.5, 0.5)
    with pytest.raises(ValueError, match="duration"):
        gradual_pruning_ratio(3, 0.5, duration=0)


# ----------------------------------------------------------- torch's choice
def _torch_choice(blocks: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Keep-masks torch's global_unstructured(L1Unstructured) picks on the given values."""
    holders = []
    for block in blocks:
        holder = nn.Linear(1, 1, bias=False)
        holder.weight = nn.Parameter(block.clone().detach())
        holders.append(holder)
    torch_prune.global_unstructured([(h, "weight") for h in holders], pruning_method=torch_prune.L1Unstructured,
                                    amount=ratio)
    return [h.weight_mask.bool() for h in holders]


def _language_blocks(model, code):
    return [e for e in pool_entries(model) if e.language == code]


@pytest.mark.parametrize("ratios", [{"en": 0.5}, {"en": 0.9, "fr": 0.3}, {"en": 0.1, "fr": 0.7, "oc": 0.45, "wo": 0.05}])
def test_language_pool_equals_torch_global_unstructured(ratios):
    model = _model()
    expected = {}
    for code, ratio in ratios.items():
        entries = _language_blocks(model, code)
        values = [(e.module.lora_B[:, e.col0:e.col1] * e.mask()).detach() for e in entries]
        expected[code] = _torch_choice(values, ratio)
    prune(model, ratios, pool="language")
    for code, masks in expected.items():
        for entry, mask in zip(_language_blocks(model, code), masks):
            assert torch.equal(entry.mask(), mask), (code, entry.name)
            assert torch.all(entry.module.lora_B[:, entry.col0:entry.col1][~mask] == 0)
    for entry in pool_entries(model):  # languages not named are untouched
        if entry.language not in ratios:
            assert entry.mask().all()
    summary = pruning_summary(model)
    for code, ratio in ratios.items():
        n = sum(e.mask().numel() for e in _language_blocks(model, code))
        assert summary[code] == pytest.approx(round(ratio * n) / n)


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_layer_pool_equals_torch_global_unstructured(ratio):
    model = _model(seed=3)
    pools: dict[str, list] = {}
    for entry in pool_entries(model):
        pools.setdefault(f"{entry.side}.{entry.layer}", []).append(entry)
    assert len(pools) == 4  # 2 encoder + 2 decoder layers
    expected = {name: _torch_choice([(e.module.lora_B[:, e.col0:e.col1] * e.mask()).detach() for e in members], ratio)
                for name, members in pools.items()}
    summary = prune(model, ratio, pool="layer")
    assert set(summary) == set(pools)
    for name, members in pools.items():
        for entry, mask in zip(members, expected[name]):
            assert torch.equal(entry.mask(), mask), (name, entry.name, entry.language)
        assert summary[name]["pruned"] == round(ratio * summary[name]["numel"])


def test_masks_only_grow_across_the_schedule():
    model = _model(seed=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    previous = {id(e.module): e.module.prune_mask.clone() for e in pool_entries(model)}
    for epoch in range(1, 12):
        ratio = gradual_pruning_ratio(epoch, 0.9)
        prune(model, {"en": ratio, "fr": ratio}, optimizer=optimizer)
        for module in lslo.lslo_modules(model).values():
            old = previous[id(module)]
            assert torch.all(module.prune_mask <= old), "a pruned entry came back"
            previous[id(module)] = module.prune_mask.clone()
        # move B so that next epoch's magnitudes differ from this one's (kept entries can shrink below pruned ones)
        with torch.no_grad():
            for module in lslo.lslo_modules(model).values():
                module.lora_B.mul_(torch.rand_like(module.lora_B)).mul_(module.prune_mask)
    assert pruning_summary(model)["en"] == pytest.approx(0.9, abs=1e-3)


def test_pruned_entries_stay_zero_through_adamw_steps():
    model = _model(seed=7)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(4, 60, (4, 9))
    labels = torch.randint(4, 60, (4, 7))
    src, tgt = ["en", "fr", "oc", "wo"], ["fr", "en", "wo", "oc"]

    def step():
        optimizer.zero_grad()
        out = lslo.forward_with_langs(model, {"input_ids": x, "labels": labels}, src, tgt)
        out.loss.backward()
        optimizer.step()

    for _ in range(3):  # gather Adam momentum on every entry first
        step()
    prune(model, {"en": 0.6, "fr": 0.8, "oc": 0.5, "wo": 0.3}, optimizer=optimizer)
    for _ in range(4):
        step()
    for module in lslo.lslo_modules(model).values():
        assert torch.all(module.lora_B[~module.prune_mask] == 0)
        state = optimizer.state[module.lora_B]
        assert torch.all(state["exp_avg"][~module.prune_mask] == 0)
        assert torch.all(state["exp_avg_sq"][~module.prune_mask] == 0)


def test_without_optimizer_reset_adam_momentum_would_revive_entries():
    # The reason prune() takes the optimizer: the contrast case, so the test above proves something.
    model = _model(seed=7)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(4, 60, (4, 9))
    labels = torch.randint(4, 60, (4, 7))
    for _ in range(2):
        optimizer.zero_grad()
        lslo.forward_with_langs(model, {"input_ids": x, "labels": labels}, ["en"] * 4, ["fr"] * 4).loss.backward()
        optimizer.step()
    prune(model, {"fr": 0.8})
    optimizer.zero_grad()
    lslo.forward_with_langs(model, {"input_ids": x, "labels": labels}, ["en"] * 4, ["fr"] * 4).loss.backward()
    optimizer.step()
    revived = sum(int((m.lora_B[~m.prune_mask] != 0).sum()) for m in lslo.lslo_modules(model).values())
    assert revived > 0


def test_prune_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="xx"):
        prune(model, {"xx": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune(model, 1.0)
    with pytest.raises(ValueError, match="pool"):
        prune(model, 0.5, pool="global")
    with pytest.raises(ValueError, match="one ratio"):
        prune(model, {"en": 0.5, "fr": 0.3}, pool="layer")
    with pytest.raises(ValueError, match="LSLo"):
        prune(nn.Linear(2, 2), 0.5)


# ------------------------------------------------------------------- Eq. 6
def test_subspace_scores_sum_to_zero_per_pool_and_flag_the_big_language():
    model = _model(seed=11, ranks={"en": 4, "fr": 4, "oc": 4, "wo": 4})
    with torch.no_grad():  # wo's B carries larger magnitudes: it should survive pruning, i.e. need more space
        for entry in pool_entries(model):
            if entry.language == "wo":
                entry.module.lora_B[:, entry.col0:entry.col1].mul_(10.0)
    target = 0.7
    summary = prune(model, target, pool="layer")
    rows = subspace_scores(model, target)
    assert {r["language"] for r in rows} == set(LANGS)
    per_pool: dict[str, float] = {}
    for row in rows:
        per_pool[f"{row['side']}.{row['layer']}"] = per_pool.get(f"{row['side']}.{row['layer']}", 0.0) + row["score"]
    for name, total in per_pool.items():
        exact = summary[name]["pruned"] - target * summary[name]["numel"]
        assert total == pytest.approx(exact, abs=1e-6)
        assert abs(total) <= 0.5 + 1e-9  # round(P * n) differs from P * n by at most 1/2
    by_language = {code: sum(r["score"] for r in rows if r["language"] == code) for code in LANGS}
    assert by_language["wo"] < 0
    assert by_language["wo"] == min(by_language.values())
    for row in rows:
        assert row["score"] == row["pruned"] - target * row["numel"]
