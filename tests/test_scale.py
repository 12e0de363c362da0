"""Every FLORES-101 language in one run (issue 23): resource groups for all 101, language tokens
beyond the tokenizer's table, batching and evaluation that scale."""

from __future__ import annotations

import pytest

from lslo.cli import main
from lslo.config import FLORES101_RESOURCE_GROUPS, GROUP_ORDER, LANGUAGE_SETS, RESOURCE_GROUPS, LSLoConfig
from lslo.data import FLORES101_CODES
from lslo.evaluate import direction_group


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
