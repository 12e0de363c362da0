"""Training methods as small objects: what ``lslo train --method NAME`` sets up, trains, saves and
does at the start of each epoch.

The engine (:mod:`lslo.train`) asks the method; it never branches on the method's name. A new method
is a :class:`TrainingMethod` subclass passed to :func:`register_method`:

- :class:`LSLoMethod` (``lslo``): LSLo adapters on a frozen base; the Gradual Pruning Schedule at
  the start of each epoch; adapters saved with :func:`lslo.save_adapters`.
- :class:`WeightLearningMethod` (``weight-learning``): both routings mixed per layer (Eq. 5).
- :class:`FullFineTuning` (``ft-all``): every parameter trains; the whole model is saved, with the
  base config's own dropouts and layer drop (:func:`lslo.recipe.original_model_config`).
- :class:`ZeroShot` (``pretrain``): nothing trains (evaluation only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from .config import GROUP_ORDER, LSLoConfig
from .io import atomic_directory
from .model import apply_lslo, load_adapters, parameter_report, save_adapters
from .pruning import gradual_pruning_ratio, prune, pruning_summary
from .recipe import RECIPE_LR, original_model_config
from .weight_learning import apply_weight_learning, index_plan_document, load_weight_learning, save_weight_learning

__all__ = [
    "METHODS",
    "FullFineTuning",
    "LSLoMethod",
    "TrainingMethod",
    "WeightLearningMethod",
    "ZeroShot",
    "get_method",
    "language_prune_targets",
    "parse_prune_spec",
    "register_method",
]


# ------------------------------------------------------------------ parsing
def parse_prune_spec(spec: str | float | Mapping[str, float] | None) -> dict[str, float]:
    """``"H=0.9,M=0.9"`` (groups and/or language codes) -> ``{key: ratio}``; each ratio in [0, 1).
    A bare number (``"0.7"``) applies to every language: key ``"*"``."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, (int, float)) or (isinstance(spec, str) and "=" not in spec and "," not in spec):
        spec = {"*": spec}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--prune expects 'GROUP=ratio' or 'code=ratio' entries, got {part!r} in {spec!r}")
            items.append((key.strip(), value.strip()))
    ratios = {}
    for key, value in items:
        try:
            ratio = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--prune ratio of {key!r} is not a number: {value!r}") from None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"--prune ratio of {key!r} must be in [0, 1), got {ratio}")
        ratios[key] = ratio
    return ratios


def _parse_mapping(text: str | None, what: str) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{what} expects 'key=value' entries, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_ranks(text: str | None):
    if text is None:
        return None
    text = str(text).strip()
    if "=" in text:
        return {k: int(v) for k, v in _parse_mapping(text, "--ranks").items()}
    if text.isdigit():
        return int(text)
    return text


def _load_index_plan(value: str):
    """``--index-plan``: a preset name or a JSON file written by Weight Learning."""
    if value and (value.endswith(".json") or os.path.sep in value):
        return index_plan_document(value, what="--index-plan file")
    return value


def language_prune_targets(config: LSLoConfig, spec) -> dict[str, float]:
    """Per-language final ratio from a ``--prune`` spec of groups and/or codes (a code's own entry wins)."""
    ratios = parse_prune_spec(spec)
    known_groups = set(GROUP_ORDER)
    if "*" in ratios:
        return dict.fromkeys(config.languages, ratios["*"])
    for key in ratios:
        if key not in known_groups and key not in config.languages:
            raise ValueError(f"--prune names {key!r}, which is neither a resource group (H, M, L, V) nor one of the "
                             f"languages {list(config.languages)}")
    targets = {}
    for code in config.languages:
        if code in ratios:
            targets[code] = ratios[code]
        elif config.group_of(code) in ratios:
            targets[code] = ratios[config.group_of(code)]
    groups_named = [k for k in ratios if k in known_groups]
    present = {config.group_of(c) for c in config.languages}
    missing = [g for g in groups_named if g not in present]
    if missing:
        raise ValueError(f"--prune names resource group(s) {missing} but no language of {list(config.languages)} is in them")
    return targets


# ------------------------------------------------------------------ methods
class TrainingMethod:
    """One way of training. Subclasses override what differs; ``args`` is a
    :class:`lslo.train.TrainArguments`."""

    name: ClassVar[str]
    trains: ClassVar[bool] = True  # False: evaluation only

    @property
    def default_lr(self) -> float:
        """The peak learning rate when ``--lr`` is not given (the paper's Section 6.2)."""
        return RECIPE_LR[self.name]

    def check(self, args) -> None:
        """Refuse settings the method cannot use (ValueError naming them), before anything loads."""
        if args.prune:
            raise ValueError(f"--prune applies to LSLo adapters; method {self.name!r} has none")

    def adapter_config(self, args, languages: Sequence[str]) -> LSLoConfig | None:
        """The LSLo configuration this method injects (None: no adapters)."""
        return None

    def prune_targets(self, config: LSLoConfig | None, args) -> dict[str, float]:
        """Final pruning ratio per language (empty: no pruning)."""
        return {}

    def set_up(self, model: torch.nn.Module, config: LSLoConfig | None) -> None:
        """Make ``model`` trainable the method's way (inject adapters, unfreeze, ...)."""

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in model.parameters() if p.requires_grad]

    def save(self, model: torch.nn.Module, directory: Path, *, tokenizer=None,
             config_overrides: Mapping[str, Mapping[str, float]] | None = None,
             metadata: Mapping[str, object] | None = None) -> None:
        """Write what a trained run keeps (``<output-dir>/final``) into ``directory``; ``metadata``
        (the run's recipe and pruning reached) goes where the format has room for it."""
        raise NotImplementedError(f"method {self.name!r} saves nothing")

    def load(self, model: torch.nn.Module, directory: Path) -> None:
        """Read what :meth:`save` wrote back into ``model`` (which :meth:`set_up` prepared)."""
        raise NotImplementedError(f"method {self.name!r} loads nothing")

    def on_epoch_start(self, model: torch.nn.Module, epoch: int, *, targets: Mapping[str, float], args,
                       optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        """Called before epoch ``epoch`` (from 1) trains. Returns what it applied (logged), e.g. pruning ratios."""
        return {}

    def pruned(self, model: torch.nn.Module) -> dict[str, float]:
        """Share of pruned adapter entries per language (logged each epoch); empty when nothing prunes."""
        return {}

    def parameter_groups(self, model: torch.nn.Module) -> dict[str, int]:
        """Trainable parameters per resource group (H/M/L/V) where the method has per-language ones."""
        return {}


class LSLoMethod(TrainingMethod):
    """LSLo adapters on a frozen base, pruned by the Gradual Pruning Schedule (Eq. 4) each epoch."""

    name = "lslo"

    def check(self, args) -> None:
        parse_prune_spec(args.prune)

    def adapter_config(self, args, languages: Sequence[str]) -> LSLoConfig:
        groups = _parse_mapping(args.groups, "--groups") or None
        ranks = _parse_ranks(args.ranks)
        kwargs = {"ranks": ranks} if ranks is not None else {}
        return LSLoConfig(languages=list(languages), groups=groups, target_modules=args.target_modules,
                          index_plan=_load_index_plan(args.index_plan), init=args.init, ffn=args.ffn, **kwargs)

    def prune_targets(self, config, args) -> dict[str, float]:
        return language_prune_targets(config, args.prune)

    def set_up(self, model, config) -> None:
        apply_lslo(model, config)

    def save(self, model, directory, *, tokenizer=None, config_overrides=None, metadata=None) -> None:
        save_adapters(model, directory, tokenizer=tokenizer, metadata=metadata)

    def load(self, model, directory) -> None:
        load_adapters(model, directory)

    def on_epoch_start(self, model, epoch, *, targets, args, optimizer) -> dict[str, float]:
        if not targets:
            return {}
        ratios = {code: gradual_pruning_ratio(epoch, target, start=args.prune_start, duration=args.prune_duration)
                  for code, target in targets.items()}
        # prune() zeroes the optimizer's moments at pruned entries.
        prune(model, ratios, pool=args.prune_pool, optimizer=optimizer)
        return ratios

    def pruned(self, model) -> dict[str, float]:
        return pruning_summary(model)

    def parameter_groups(self, model) -> dict[str, int]:
        return parameter_report(model)["groups"]


class WeightLearningMethod(LSLoMethod):
    """Weight Learning (Section 4.1, Eq. 5): a source- and a target-indexed LSLo mixed per layer."""

    name = "weight-learning"

    def check(self, args) -> None:
        if args.prune:
            raise ValueError("--prune does not apply to --method weight-learning (it learns the index plan)")

    def prune_targets(self, config, args) -> dict[str, float]:
        return {}

    def set_up(self, model, config) -> None:
        apply_weight_learning(model, config)

    def save(self, model, directory, *, tokenizer=None, config_overrides=None, metadata=None) -> None:
        save_weight_learning(model, directory)

    def load(self, model, directory) -> None:
        load_weight_learning(model, directory)

    def on_epoch_start(self, model, epoch, *, targets, args, optimizer) -> dict[str, float]:
        return {}

    def pruned(self, model) -> dict[str, float]:
        return {}

    def parameter_groups(self, model) -> dict[str, int]:
        return {}  # both routings: no single language's parameters to count


class FullFineTuning(TrainingMethod):
    """Every parameter trains (the paper's Ft-all); the whole model is saved with ``save_pretrained``."""

    name = "ft-all"

    def set_up(self, model, config) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def save(self, model, directory, *, tokenizer=None, config_overrides=None, metadata=None) -> None:
        with atomic_directory(directory) as tmp, original_model_config(model, config_overrides or {}):
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)


class ZeroShot(TrainingMethod):
    """The model before fine-tuning (the paper's Pretrain row): nothing trains."""

    name = "pretrain"
    trains = False


METHODS: dict[str, TrainingMethod] = {}


def register_method(method: TrainingMethod) -> TrainingMethod:
    """Make ``method`` available as ``--method method.name`` (a later registration replaces an earlier one).

    Returns:
        ``method``.
    """
    if not isinstance(method, TrainingMethod):
        raise TypeError(f"register_method expects a TrainingMethod, got {type(method).__name__}")
    METHODS[method.name] = method
    return method


for _method in (LSLoMethod(), FullFineTuning(), ZeroShot(), WeightLearningMethod()):
    register_method(_method)


def get_method(name: str) -> TrainingMethod:
    """The registered method called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}") from None
