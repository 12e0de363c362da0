"""``LSLoConfig``: which languages, which ranks, which modules, and which index each layer follows.

Follows PEFT's ``LoraConfig`` pattern: a dataclass with a help string per field, validated in
``__post_init__`` (``ValueError`` naming the field), serialisable to and from a plain dict.

Defaults are the paper's (Cao et al. 2024, "Exploring Intrinsic Language-specific Subspaces in
Fine-tuning Multilingual Neural Machine Translation"):

- languages: ``lang12`` (Table 5); ``lang30`` (Table 6) is the other built-in set;
- ranks by resource group ``H;M;L;V = 2;2;8;8`` (``2;2;8`` on lang12, ``2;2;8;8`` on lang30);
- targets: q, k, v of encoder self-attention; q, k, v of decoder self- and cross-attention; fc1
  and fc2 everywhere; no output projection (Section 6.1, Table 4 "All");
- index plan ``"paper"``: the paper's Weight-Learning result (Section 6.1, Figure 1): encoder
  layers 0-8 source-indexed, 9-11 target-indexed, every decoder layer target-indexed. (Its old
  name ``"learned"`` still works, with a DeprecationWarning: it is a fixed plan, not one that lslo
  learns for your model.)
"""

# Every invalid field raises ValueError naming the field (PEFT's convention), type errors included.
# ruff: noqa: TRY004

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = [
    "FLORES101_RESOURCE_GROUPS",
    "GROUP_ORDER",
    "INDEX_PRESETS",
    "LANGUAGE_SETS",
    "RESOURCE_GROUPS",
    "TARGET_PRESETS",
    "LSLoConfig",
    "learned_encoder_plan",
    "paper_encoder_plan",
]

# Resource types of FLORES-101 (bitext with English), Tables 5 and 6 of the paper; lang12's
# languages have the same type in both tables.
GROUP_ORDER = ("H", "M", "L", "V")
_GROUP_NAMES = {"H": "high", "M": "medium", "L": "low", "V": "very low"}
RESOURCE_GROUPS: dict[str, str] = {
    **dict.fromkeys(("en", "fr", "de", "it", "pt", "ru", "es"), "H"),
    **dict.fromkeys(("ar", "zh", "nl", "he", "hi", "ja", "ko", "mt", "no"), "M"),
    **dict.fromkeys(("af", "am", "hy", "ha", "ny", "sn", "yo", "zu"), "L"),
    **dict.fromkeys(("ff", "kam", "oc", "or", "sd", "wo"), "V"),
}
# The other 71 languages of FLORES-101, classified by the same rule: their bitext with English in
# the FLORES-101 paper (Goyal et al. 2022, "The Flores-101 Evaluation Benchmark for Low-Resource
# and Multilingual Machine Translation", TACL, Table 1, column "Bitext w/ En"), cut at the
# thresholds that reproduce the paper's 30 languages above: H > 100M sentence pairs, M 1M-100M,
# L 100K-1M, V < 100K. RESOURCE_GROUPS (the paper's own table) always wins; ``groups`` /
# ``--groups xx=V`` overrides both.
FLORES101_RESOURCE_GROUPS: dict[str, str] = {
    **dict.fromkeys((
        "be", "bg", "bn", "bs", "ca", "cs", "da", "el", "et", "fa", "fi", "gl", "hr", "hu", "id", "is", "jv",
        "ka", "lb", "lt", "lv", "mk", "ns", "pl", "ro", "sk", "sl", "sr", "sv", "th", "tr", "uk", "vi", "xh",
    ), "M"),
    **dict.fromkeys((
        "ast", "az", "ceb", "cy", "ga", "gu", "ig", "kk", "km", "kn", "ku", "ky", "lg", "luo", "mi", "ml", "mn",
        "mr", "ms", "my", "om", "pa", "ps", "so", "sw", "ta", "te", "tg", "tl", "umb", "ur", "uz",
    ), "L"),
    **dict.fromkeys(("as", "kea", "ln", "lo", "ne"), "V"),
    **RESOURCE_GROUPS,
}
# In the order of the paper's tables: language id = position in this tuple.
LANGUAGE_SETS: dict[str, tuple[str, ...]] = {
    "lang12": ("en", "fr", "de", "it", "zh", "nl", "ja", "ko", "oc", "or", "sd", "wo"),
    "lang30": (
        "en", "fr", "de", "it", "pt", "ru", "es",
        "ar", "zh", "nl", "he", "hi", "ja", "ko", "mt", "no",
        "af", "am", "hy", "ha", "ny", "sn", "yo", "zu",
        "ff", "kam", "oc", "or", "sd", "wo",
    ),
}

# Module paths inside one encoder/decoder layer of M2M-100 / NLLB ("self_attn.q_proj", "fc1", ...).
_ATTN = tuple(f"{block}.{proj}" for block in ("self_attn", "encoder_attn") for proj in ("q_proj", "k_proj", "v_proj"))
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "all": (*_ATTN, "fc1", "fc2"),  # the paper's default; encoder layers have no encoder_attn
    "attn": _ATTN,
    "fc": ("fc1", "fc2"),
}
INDEX_PRESETS = ("paper", "src", "tgt")
# Deprecated preset names -> current ones ("learned" read as if lslo learned the plan for your model).
_INDEX_ALIASES = {"learned": "paper"}
_INDEXES = ("src", "tgt")
_INITS = ("lora", "reference")
_FFN_MODES = ("full", "reference")
# M2M-100 codes ("en", "kam") and NLLB/FLORES-200 codes ("fra_Latn").
_CODE_PATTERN = re.compile(r"^[a-z]{2,3}(_[A-Za-z]{4})?$")


def _default_ranks() -> dict[str, int]:
    # The paper's best settings: 2;2;8 on lang12 and 2;2;8;8 on lang30 (Tables 1, 2).
    return {"H": 2, "M": 2, "L": 8, "V": 8}


def paper_encoder_plan(num_layers: int) -> list[str]:
    """The paper's Weight-Learning plan for an encoder of ``num_layers`` layers (preset ``"paper"``).

    The paper learned it on 12 layers: the first 9 follow the source language, the last 3 the
    target (Figure 1: the switch happens near the top of the encoder). Other depths keep the same
    proportion: the first ``floor(3 * num_layers / 4)`` layers are source-indexed (6 -> 4 + 2,
    24 -> 18 + 6, 2 -> 1 + 1, 1 -> 0 + 1).
    """
    num_src = (3 * num_layers) // 4
    return ["src"] * num_src + ["tgt"] * (num_layers - num_src)


# The former name of paper_encoder_plan, kept for existing imports.
learned_encoder_plan = paper_encoder_plan


def _index_preset(value: str, where: str) -> str:
    """A current preset name for ``value``; warns on a deprecated alias (``"learned"``)."""
    if value in _INDEX_ALIASES:
        current = _INDEX_ALIASES[value]
        warnings.warn(f"{where} = {value!r} is deprecated; use {current!r} (the same plan)", DeprecationWarning,
                      stacklevel=4)
        return current
    return value


@dataclass
class LSLoConfig:
    """Configuration of language-specific LoRA on an M2M-100 / NLLB model.

    Language id ``i`` is ``languages[i]``; see :meth:`lang_id`. The resolved rank of every
    language is :attr:`language_ranks`.
    """

    languages: str | Sequence[str] = field(
        default="lang12",
        metadata={"help": "Language codes of the adapters, in id order (M2M-100 codes such as 'en', or "
                          "NLLB codes such as 'fra_Latn'), or a built-in set: 'lang12', 'lang30'."},
    )
    ranks: int | str | Sequence[int] | Mapping[str, int] = field(
        default_factory=_default_ranks,
        metadata={"help": "Rank of each language: one int for all; a list with one rank per language, in the "
                          "order of `languages` (as LSLoLinear takes them); a dict keyed by language code "
                          "and/or resource group (H, M, L, V; a language's own entry wins); or a string "
                          "'2;2;8' giving one rank per resource group present, in H;M;L;V order "
                          "(lang12 has H, M, V; lang30 has H, M, L, V). Default H=M=2, L=V=8."},
    )
    groups: Mapping[str, str] | None = field(
        default=None,
        metadata={"help": "Resource group (H, M, L, V) of languages missing from the paper's tables and from "
                          "FLORES-101's classification, or overrides; used only to resolve group ranks."},
    )
    target_modules: str | Sequence[str] = field(
        default="all",
        metadata={"help": "Linear layers that get LSLo: a preset ('all': self/cross-attention q, k, v and "
                          "fc1, fc2, the paper's default; 'attn'; 'fc'), a list of names matched as suffixes "
                          "of module paths ('q_proj', 'encoder_attn.v_proj', 'fc1'), or a regular expression "
                          "that must match the whole module path (as PEFT)."},
    )
    index_plan: str | Mapping[str, str | Sequence[str]] = field(
        default="paper",
        metadata={"help": "Which language ids each layer follows. 'paper': the plan the paper's Weight "
                          "Learning found (encoder: first 3/4 of the layers source-indexed, the rest target-"
                          "indexed; decoder: target; 'learned' is its deprecated name); 'src': whole encoder "
                          "source-indexed; 'tgt': everything target-indexed; or {'encoder': preset or list of "
                          "'src'/'tgt' per layer, 'decoder': ...} (decoder default 'tgt')."},
    )
    scale: float = field(default=1.0, metadata={"help": "Scale s of every language's update s * B A x (finite)."})
    init: str = field(
        default="lora",
        metadata={"help": "'lora' (A Kaiming-uniform, B = 0) or 'reference' (the authors' code: "
                          "A ~ U(-1/sqrt(r), 1/sqrt(r)), B = 0)."},
    )
    ffn: str = field(
        default="full",
        metadata={"help": "'full': LoRA over the whole fc1 / fc2. 'reference': as the authors' code, adapt only "
                          "the first d_model units of fc1's output and of fc2's input; the parameter counts then "
                          "equal the paper's tables."},
    )
    backend: str = field(
        default="auto",
        metadata={"help": "Grouped-LoRA backend of every layer: 'auto', 'reference', 'cpp' or 'triton'."},
    )

    # ------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.languages = self._check_languages(self.languages)
        self._lang_index = {code: i for i, code in enumerate(self.languages)}
        self._check_groups()
        self.language_ranks: tuple[int, ...] = self._resolve_ranks()
        self._check_target_modules()
        self._check_index_plan()
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"LSLoConfig.scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"LSLoConfig.scale must be finite, got {self.scale!r}")
        self.scale = float(self.scale)
        if self.init not in _INITS:
            raise ValueError(f"LSLoConfig.init must be one of {_INITS}, got {self.init!r}")
        if self.ffn not in _FFN_MODES:
            raise ValueError(f"LSLoConfig.ffn must be one of {_FFN_MODES}, got {self.ffn!r}")
        if not isinstance(self.backend, str):
            raise ValueError(f"LSLoConfig.backend must be a backend name, got {self.backend!r}")

    @staticmethod
    def _check_languages(languages) -> tuple[str, ...]:
        if isinstance(languages, str):
            if languages not in LANGUAGE_SETS:
                raise ValueError(
                    f"LSLoConfig.languages: {languages!r} is not a built-in set ({', '.join(LANGUAGE_SETS)}); "
                    "pass a list of language codes"
                )
            return LANGUAGE_SETS[languages]
        codes = tuple(languages)
        if not codes:
            raise ValueError("LSLoConfig.languages must name at least one language")
        bad = [c for c in codes if not isinstance(c, str) or not _CODE_PATTERN.match(c)]
        if bad:
            raise ValueError(f"LSLoConfig.languages: invalid language codes {bad} (expected e.g. 'en', 'kam', 'fra_Latn')")
        duplicates = sorted({c for c in codes if codes.count(c) > 1})
        if duplicates:
            raise ValueError(f"LSLoConfig.languages: duplicate codes {duplicates}")
        return codes

    def _check_groups(self) -> None:
        if self.groups is None:
            return
        if not isinstance(self.groups, Mapping):
            raise ValueError(f"LSLoConfig.groups must be a dict language -> group, got {type(self.groups).__name__}")
        self.groups = dict(self.groups)
        for code, group in self.groups.items():
            if group not in GROUP_ORDER:
                raise ValueError(f"LSLoConfig.groups[{code!r}] = {group!r}: groups are {GROUP_ORDER}")

    def group_of(self, code: str) -> str | None:
        """Resource group (H, M, L, V) of a language: ``groups``, else the paper's table, else FLORES-101's
        classification (:data:`FLORES101_RESOURCE_GROUPS`); None for a language outside all three."""
        if self.groups and code in self.groups:
            return self.groups[code]
        return FLORES101_RESOURCE_GROUPS.get(code)

    def _groups_present(self) -> list[str]:
        present = {self.group_of(code) for code in self.languages}
        return [g for g in GROUP_ORDER if g in present]

    def _resolve_ranks(self) -> tuple[int, ...]:
        ranks = self.ranks
        if isinstance(ranks, bool):
            raise ValueError(f"LSLoConfig.ranks must be an int, a list, a 'H;M;V' string or a dict, got {ranks!r}")
        if isinstance(ranks, int):
            return tuple(_check_rank(ranks, "LSLoConfig.ranks") for _ in self.languages)
        if isinstance(ranks, str):
            return self._ranks_from_string(ranks)
        if isinstance(ranks, Mapping):
            return self._ranks_from_mapping(ranks)
        if isinstance(ranks, (Sequence, torch.Tensor)) and not isinstance(ranks, (bytes, bytearray)):
            return self._ranks_from_sequence(ranks)
        raise ValueError(f"LSLoConfig.ranks must be an int, a list, a 'H;M;V' string or a dict, "
                         f"got {type(ranks).__name__}")

    def _ranks_from_sequence(self, ranks) -> tuple[int, ...]:
        values = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
        if len(values) != len(self.languages):
            raise ValueError(
                f"LSLoConfig.ranks: a list needs one rank per language in the order of `languages`; got "
                f"{len(values)} ranks for {len(self.languages)} languages ({', '.join(self.languages)})"
            )
        return tuple(_check_rank(v, f"LSLoConfig.ranks[{i}] ({code})")
                     for i, (v, code) in enumerate(zip(values, self.languages)))

    def _ranks_from_string(self, text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(";")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"LSLoConfig.ranks: {text!r} is not a ';'-separated list of ints like '2;2;8'") from None
        values = [_check_rank(v, f"LSLoConfig.ranks {text!r}") for v in values]
        if len(values) == 1:
            return tuple(values * len(self.languages))
        self._require_groups(f"ranks {text!r}")
        present = self._groups_present()
        if len(values) != len(present):
            raise ValueError(
                f"LSLoConfig.ranks: {text!r} has {len(values)} entries but the languages span "
                f"{len(present)} resource groups ({';'.join(present)}); give one rank per group"
            )
        by_group = dict(zip(present, values))
        return tuple(by_group[self.group_of(code)] for code in self.languages)

    def _ranks_from_mapping(self, ranks: Mapping[str, int]) -> tuple[int, ...]:
        unknown = [k for k in ranks if k not in GROUP_ORDER and k not in self._lang_index]
        if unknown:
            raise ValueError(
                f"LSLoConfig.ranks: keys {unknown} are neither resource groups {GROUP_ORDER} nor languages of "
                f"this config ({', '.join(self.languages)})"
            )
        for key, value in ranks.items():
            _check_rank(value, f"LSLoConfig.ranks[{key!r}]")
        resolved, missing = [], []
        for code in self.languages:
            if code in ranks:
                resolved.append(int(ranks[code]))
            elif self.group_of(code) in ranks:
                resolved.append(int(ranks[self.group_of(code)]))
            else:
                missing.append(code)
        if missing:
            ungrouped = [c for c in missing if self.group_of(c) is None]
            hint = f"; {ungrouped} have no resource group: {_groups_hint(ungrouped)}" if ungrouped else ""
            raise ValueError(f"LSLoConfig.ranks: no rank for languages {missing}{hint}")
        return tuple(resolved)

    def _require_groups(self, what: str) -> None:
        ungrouped = [c for c in self.languages if self.group_of(c) is None]
        if ungrouped:
            raise ValueError(
                f"LSLoConfig.{what} is given per resource group but {ungrouped} are in no group of the paper's or "
                f"FLORES-101's tables: {_groups_hint(ungrouped)}, or give ranks per language"
            )

    def _check_target_modules(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            if targets in TARGET_PRESETS:
                return
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(
                    f"LSLoConfig.target_modules: {targets!r} is neither a preset ({', '.join(TARGET_PRESETS)}) "
                    f"nor a valid regular expression ({exc})"
                ) from None
            return
        names = list(targets)
        if not names or any(not isinstance(n, str) or not n for n in names):
            raise ValueError(f"LSLoConfig.target_modules must be a preset, a regex or a non-empty list of names, got {targets!r}")
        self.target_modules = names

    def unmatched_targets(self, module_paths: Sequence[str]) -> list[str]:
        """Names of a ``target_modules`` list that match none of ``module_paths`` (presets, regexes: [])."""
        if isinstance(self.target_modules, str):
            return []
        return [name for name in self.target_modules
                if not any(path == name or path.endswith("." + name) for path in module_paths)]

    def _check_index_plan(self) -> None:
        plan = self.index_plan
        if isinstance(plan, str):
            plan = _index_preset(plan, "LSLoConfig.index_plan")
            if plan not in INDEX_PRESETS:
                raise ValueError(f"LSLoConfig.index_plan must be one of {INDEX_PRESETS} or a dict, got {plan!r}")
            self.index_plan = plan
            return
        if not isinstance(plan, Mapping):
            raise ValueError(f"LSLoConfig.index_plan must be a preset or a dict, got {type(plan).__name__}")
        extra = set(plan) - {"encoder", "decoder"}
        if extra:
            raise ValueError(f"LSLoConfig.index_plan: unknown keys {sorted(extra)}; use 'encoder' and 'decoder'")
        normalised = {}
        for side, value in plan.items():
            if isinstance(value, str):
                value = _index_preset(value, f"LSLoConfig.index_plan[{side!r}]")
                if value not in INDEX_PRESETS:
                    raise ValueError(f"LSLoConfig.index_plan[{side!r}] = {value!r}: presets are {INDEX_PRESETS}")
                normalised[side] = value
            else:
                value = list(value)
                bad = [v for v in value if v not in _INDEXES]
                if bad or not value:
                    raise ValueError(f"LSLoConfig.index_plan[{side!r}] must list 'src'/'tgt' per layer, got {value!r}")
                normalised[side] = value
        self.index_plan = normalised

    # ------------------------------------------------------------ resolution
    @property
    def num_languages(self) -> int:
        return len(self.languages)

    def lang_id(self, code: str) -> int:
        """Id of language ``code``; ValueError listing the known codes if it isn't one."""
        try:
            return self._lang_index[code]
        except (KeyError, TypeError):
            raise ValueError(f"unknown language code {code!r}; this config knows {', '.join(self.languages)}") from None

    def lang_ids(self, codes: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Ids of ``codes``: (len(codes),) int64."""
        if isinstance(codes, str):
            raise TypeError("lang_ids takes a sequence of codes; use lang_id for one code")
        return torch.tensor([self.lang_id(c) for c in codes], dtype=torch.int64, device=device)

    def rank_of(self, code: str) -> int:
        return self.language_ranks[self.lang_id(code)]

    def resolve_index_plan(self, num_encoder_layers: int, num_decoder_layers: int) -> dict[str, list[str]]:
        """'src'/'tgt' for every layer: {'encoder': [...], 'decoder': [...]}; ValueError on a length mismatch."""
        plan = self.index_plan
        if isinstance(plan, str):
            plan = {"encoder": plan}
        resolved = {}
        for side, depth in (("encoder", num_encoder_layers), ("decoder", num_decoder_layers)):
            value = plan.get(side, "tgt" if side == "decoder" else "paper")
            if value == "paper":
                value = paper_encoder_plan(depth) if side == "encoder" else ["tgt"] * depth
            elif value in _INDEXES:
                value = [value] * depth
            elif len(value) != depth:
                raise ValueError(f"LSLoConfig.index_plan[{side!r}] has {len(value)} entries for a {depth}-layer {side}")
            resolved[side] = list(value)
        return resolved

    def is_target(self, module_path: str, layer_path: str) -> bool:
        """Whether the nn.Linear at ``module_path`` gets LSLo.

        Args:
            module_path: full name in the model, e.g. ``model.encoder.layers.3.self_attn.q_proj``.
            layer_path: its path inside the layer, e.g. ``self_attn.q_proj``.
        """
        targets = self.target_modules
        if isinstance(targets, str):
            if targets in TARGET_PRESETS:
                return layer_path in TARGET_PRESETS[targets]
            return re.fullmatch(targets, module_path) is not None
        return any(module_path == name or module_path.endswith("." + name) for name in targets)

    # --------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ranks are written per language so a reload needs no group table."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["languages"] = list(self.languages)
        out["ranks"] = dict(zip(self.languages, self.language_ranks))
        out["groups"] = None if self.groups is None else dict(self.groups)
        out["index_plan"] = self.index_plan if isinstance(self.index_plan, str) else {
            k: (v if isinstance(v, str) else list(v)) for k, v in self.index_plan.items()
        }
        out["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LSLoConfig:
        """Inverse of :meth:`to_dict`. Files written before the "paper" preset was renamed load silently."""
        if not isinstance(data, Mapping):
            raise ValueError(f"LSLoConfig.from_dict takes a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"LSLoConfig.from_dict: unknown fields {sorted(unknown)}")
        data = dict(data)
        plan = data.get("index_plan")
        if isinstance(plan, str):
            data["index_plan"] = _INDEX_ALIASES.get(plan, plan)
        elif isinstance(plan, Mapping):
            data["index_plan"] = {k: _INDEX_ALIASES.get(v, v) if isinstance(v, str) else v for k, v in plan.items()}
        return cls(**data)

    def describe(self) -> str:
        """One line per resource group: 'H (high): en fr de it, rank 2'."""
        lines = []
        by_group: dict[str | None, list[str]] = {}
        for code in self.languages:
            by_group.setdefault(self.group_of(code), []).append(code)
        for group in [*GROUP_ORDER, None]:
            codes = by_group.get(group)
            if not codes:
                continue
            label = f"{group} ({_GROUP_NAMES[group]})" if group else "ungrouped"
            ranks = sorted({self.rank_of(c) for c in codes})
            lines.append(f"{label}: {' '.join(codes)}, rank {'/'.join(map(str, ranks))}")
        return "\n".join(lines)


def _groups_hint(codes: Sequence[str]) -> str:
    """How to give ``codes`` a group, CLI flag first (most users meet this error on the command line)."""
    example = ",".join(f"{code}=V" for code in codes[:3])
    return f"give their groups with --groups {example} (H, M, L or V; groups={{code: group}} in Python)"


def _check_rank(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: rank must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: rank must be >= 1, got {value}")
    return value

