"""LSLoConfig: the paper's presets, rank resolution, index plans, target matching, validation."""

from __future__ import annotations

import json

import pytest
import torch

from lslo import LANGUAGE_SETS, RESOURCE_GROUPS, LSLoConfig
from lslo.config import learned_encoder_plan


def test_language_sets_follow_the_papers_tables():
    assert len(LANGUAGE_SETS["lang12"]) == 12 and len(LANGUAGE_SETS["lang30"]) == 30
    groups12 = [RESOURCE_GROUPS[c] for c in LANGUAGE_SETS["lang12"]]
    assert groups12 == ["H"] * 4 + ["M"] * 4 + ["V"] * 4  # Table 5
    groups30 = [RESOURCE_GROUPS[c] for c in LANGUAGE_SETS["lang30"]]
    assert [groups30.count(g) for g in "HMLV"] == [7, 9, 8, 6]  # Table 6
    assert set(LANGUAGE_SETS["lang12"]) <= set(LANGUAGE_SETS["lang30"])


def test_defaults_are_the_papers_best_settings():
    config = LSLoConfig()
    assert config.languages == LANGUAGE_SETS["lang12"]
    assert config.language_ranks == (2,) * 8 + (8,) * 4  # 2;2;8
    assert LSLoConfig(languages="lang30").language_ranks == (2,) * 16 + (8,) * 14  # 2;2;8;8
    assert config.ffn == "full" and config.target_modules == "all" and config.index_plan == "paper"


@pytest.mark.parametrize(
    "languages, ranks, expected",
    [
        ("lang12", "2;2;8", (2,) * 8 + (8,) * 4),
        ("lang12", "8", (8,) * 12),
        ("lang12", 4, (4,) * 12),
        ("lang12", {"H": 2, "M": 4, "V": 16}, (2,) * 4 + (4,) * 4 + (16,) * 4),
        ("lang12", {"H": 2, "M": 4, "V": 16, "nl": 1}, (2,) * 4 + (4, 1, 4, 4) + (16,) * 4),
        ("lang30", "1;2;3;4", (1,) * 7 + (2,) * 9 + (3,) * 8 + (4,) * 6),
        (["en", "oc"], "2;8", (2, 8)),  # groups present: H and V
        (["en", "fr"], {"en": 3, "fr": 5}, (3, 5)),
    ],
)
def test_rank_resolution(languages, ranks, expected):
    assert LSLoConfig(languages=languages, ranks=ranks).language_ranks == expected


def test_groups_extend_the_tables():
    # kac (Jingpho) is an M2M-124 language outside FLORES-101: in no table ("xh" used to be, before
    # FLORES-101's classification covered all 101 languages).
    config = LSLoConfig(languages=["en", "kac"], ranks="2;16", groups={"kac": "V"})
    assert config.language_ranks == (2, 16)
    assert config.group_of("kac") == "V" and config.group_of("en") == "H"
    with pytest.raises(ValueError, match=r"groups.*\['kac'\]|\['kac'\].*group"):
        LSLoConfig(languages=["en", "kac"], ranks="2;16")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"languages": "lang99"}, "languages"),
        ({"languages": []}, "languages"),
        ({"languages": ["en", "en"]}, "languages"),
        ({"languages": ["EN!"]}, "languages"),
        ({"ranks": "2;2"}, "ranks"),
        ({"ranks": "2;x;8"}, "ranks"),
        ({"ranks": 0}, "ranks"),
        ({"ranks": True}, "ranks"),
        ({"ranks": {"H": 2, "M": 2}}, "ranks"),  # no rank for V
        ({"ranks": {"H": 2, "M": 2, "V": 8, "xx": 1}}, "ranks"),
        ({"ranks": {"H": 2, "M": 2, "V": -1}}, "ranks"),
        ({"groups": {"en": "Z"}}, "groups"),
        ({"target_modules": "(unclosed"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"index_plan": "sideways"}, "index_plan"),
        ({"index_plan": {"encoder": ["src", "up"]}}, "index_plan"),
        ({"index_plan": {"middle": "src"}}, "index_plan"),
        ({"scale": "big"}, "scale"),
        ({"init": "xavier"}, "init"),
        ({"ffn": "half"}, "ffn"),
    ],
)
def test_bad_fields_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LSLoConfig\.{field}"):
        LSLoConfig(**kwargs)


def test_every_field_has_a_help_string():
    from dataclasses import fields

    for f in fields(LSLoConfig):
        assert f.metadata.get("help"), f.name


def test_lang_id_and_unknown_codes():
    config = LSLoConfig()
    assert config.lang_id("en") == 0 and config.lang_id("wo") == 11
    assert config.lang_ids(["oc", "fr"]).tolist() == [8, 1]
    assert config.lang_ids(["oc"]).dtype == torch.int64
    with pytest.raises(ValueError, match="unknown language code 'xx'.*en, fr, de"):
        config.lang_id("xx")
    with pytest.raises(TypeError):
        config.lang_ids("en")


@pytest.mark.parametrize("depth, num_src", [(12, 9), (6, 4), (24, 18), (2, 1), (1, 0)])
def test_learned_plan_scales_with_depth(depth, num_src):
    plan = learned_encoder_plan(depth)
    assert plan == ["src"] * num_src + ["tgt"] * (depth - num_src)


def test_index_plans():
    learned = LSLoConfig().resolve_index_plan(12, 12)
    assert learned["encoder"] == ["src"] * 9 + ["tgt"] * 3 and learned["decoder"] == ["tgt"] * 12
    src = LSLoConfig(index_plan="src").resolve_index_plan(3, 2)
    assert src == {"encoder": ["src"] * 3, "decoder": ["tgt"] * 2}  # Table 3's SRC: decoder stays tgt
    assert LSLoConfig(index_plan="tgt").resolve_index_plan(3, 2) == {"encoder": ["tgt"] * 3, "decoder": ["tgt"] * 2}
    explicit = LSLoConfig(index_plan={"encoder": ["tgt", "src"], "decoder": ["src", "tgt"]})
    assert explicit.resolve_index_plan(2, 2) == {"encoder": ["tgt", "src"], "decoder": ["src", "tgt"]}
    with pytest.raises(ValueError, match=r"index_plan\['encoder'\] has 2 entries for a 3-layer encoder"):
        explicit.resolve_index_plan(3, 2)


@pytest.mark.parametrize(
    "targets, path, layer_path, expected",
    [
        ("all", "model.encoder.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
        ("all", "model.decoder.layers.1.encoder_attn.v_proj", "encoder_attn.v_proj", True),
        ("all", "model.decoder.layers.1.fc2", "fc2", True),
        ("all", "model.encoder.layers.0.self_attn.out_proj", "self_attn.out_proj", False),
        ("fc", "model.encoder.layers.0.self_attn.q_proj", "self_attn.q_proj", False),
        ("fc", "model.encoder.layers.0.fc1", "fc1", True),
        ("attn", "model.decoder.layers.0.encoder_attn.k_proj", "encoder_attn.k_proj", True),
        ("attn", "model.decoder.layers.0.fc1", "fc1", False),
        (["q_proj"], "model.decoder.layers.0.encoder_attn.q_proj", "encoder_attn.q_proj", True),
        (["encoder_attn.q_proj"], "model.decoder.layers.0.self_attn.q_proj", "self_attn.q_proj", False),
        (r".*decoder\.layers\.\d+\.fc1", "model.decoder.layers.3.fc1", "fc1", True),
        (r".*decoder\.layers\.\d+\.fc1", "model.encoder.layers.3.fc1", "fc1", False),
    ],
)
def test_target_matching(targets, path, layer_path, expected):
    assert LSLoConfig(target_modules=targets).is_target(path, layer_path) is expected


def test_dict_round_trip_is_json_and_stable():
    config = LSLoConfig(languages="lang30", ranks="2;2;8;8", target_modules=["q_proj", "fc1"],
                        index_plan={"encoder": "src"}, scale=2.0, init="reference", ffn="reference")
    data = json.loads(json.dumps(config.to_dict()))
    again = LSLoConfig.from_dict(data)
    assert again.to_dict() == config.to_dict()
    assert again.language_ranks == config.language_ranks
    with pytest.raises(ValueError, match="unknown fields"):
        LSLoConfig.from_dict({**data, "rank": 3})


def test_describe_lists_groups():
    text = LSLoConfig().describe()
    assert "H (high): en fr de it, rank 2" in text and "V (very low): oc or sd wo, rank 8" in text
