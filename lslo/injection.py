"""The one injection path: find the Linears a config targets, freeze the model, swap each for a wrapper.

:func:`lslo.apply_lslo` (one routing per layer, :class:`~lslo.LSLoLinear`) and
:func:`lslo.weight_learning.apply_weight_learning` (both routings mixed, :class:`~lslo.LSLoDualLinear`)
differ only in the wrapper they build; everything else (which modules, FFN widths, ``requires_grad``
kept for undoing) is here, once. Also the base-model fingerprint both adapter formats are bound to.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from .config import LSLoConfig
from .layer import LSLoLinear

__all__ = [
    "InjectionState",
    "Target",
    "find_targets",
    "get_lslo_config",
    "inject",
    "layer_counts",
    "lslo_modules",
    "model_fingerprint",
    "module_type",
    "restore_requires_grad",
    "set_module",
]

# Where a Linear sits: "<...>.encoder.layers.3.self_attn.q_proj" -> ("encoder", 3, "self_attn.q_proj").
LAYER_PATH = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)\.(.+)$")
# The attribute apply_lslo keeps its InjectionState in.
LSLO_STATE_ATTR = "_lslo_state"
# The fields of the base model an adapter file is bound to.
FINGERPRINT_KEYS = ("model_type", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
                     "decoder_ffn_dim", "vocab_size")


@dataclass
class InjectionState:
    """What an injection did, kept on the model so that it can be checked and undone."""

    config: LSLoConfig
    requires_grad: dict[str, bool]  # base parameter name -> requires_grad before injection


class Target(NamedTuple):
    """One Linear a config targets: its module path, the module, its side, layer index and path inside the layer."""

    name: str
    linear: nn.Linear
    side: str
    layer: int
    layer_path: str


def get_lslo_config(model: nn.Module) -> LSLoConfig | None:
    """The config :func:`lslo.apply_lslo` used on ``model``, or None if it carries no LSLo."""
    state = getattr(model, LSLO_STATE_ATTR, None)
    return None if state is None else state.config


def lslo_modules(model: nn.Module) -> dict[str, LSLoLinear]:
    """Every :class:`LSLoLinear` of ``model`` by its module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LSLoLinear)}


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The base-model fields an adapter file is bound to (from ``model.config``)."""
    model_config = getattr(model, "config", None)
    return {key: getattr(model_config, key, None) for key in FINGERPRINT_KEYS}


def module_type(name: str) -> str:
    """"model.encoder.layers.3.self_attn.q_proj" -> "encoder.self_attn.q_proj"."""
    match = LAYER_PATH.search(name)
    return f"{match.group(1)}.{match.group(3)}" if match else name


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def restore_requires_grad(model: nn.Module, state: InjectionState) -> None:
    """Give every base parameter the ``requires_grad`` it had before the injection."""
    for name, flag in state.requires_grad.items():
        model.get_parameter(name).requires_grad_(flag)


def find_targets(model: nn.Module, config: LSLoConfig) -> list[Target]:
    """Every Linear the config targets, in module order; ValueError when it targets none."""
    found = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:  # subclasses (quantised layers, ...) are not supported
            continue
        match = LAYER_PATH.search(name)
        if match is None:
            continue  # embeddings, lm_head: outside the encoder/decoder layers, no index to follow
        side, layer, layer_path = match.group(1), int(match.group(2)), match.group(3)
        if config.is_target(name, layer_path):
            found.append(Target(name, module, side, layer, layer_path))
    if not found:
        raise ValueError(
            f"LSLoConfig.target_modules={config.target_modules!r} matched no nn.Linear inside "
            "encoder.layers.<i> / decoder.layers.<i> of this model"
        )
    return found


def layer_counts(model: nn.Module) -> tuple[int, int]:
    """(encoder, decoder) depth of ``model``: from its HF config, else counted from its module paths."""
    counts = {"encoder": 0, "decoder": 0}
    model_config = getattr(model, "config", None)
    for side in counts:
        depth = getattr(model_config, f"{side}_layers", None)
        if isinstance(depth, int):
            counts[side] = depth
    if not all(counts.values()):  # not an HF config: count the layers by their module paths
        for name, _ in model.named_modules():
            match = LAYER_PATH.search(name)
            if match:
                counts[match.group(1)] = max(counts[match.group(1)], int(match.group(2)) + 1)
    return counts["encoder"], counts["decoder"]


def _ffn_widths(config: LSLoConfig, target: Target) -> dict[str, int]:
    """With ``ffn="reference"``, fc1 adapts only its first d_model outputs and fc2 its first d_model inputs."""
    linear = target.linear
    if config.ffn == "reference" and target.layer_path == "fc1":
        return {"lora_out_features": min(linear.in_features, linear.out_features)}  # first d_model units
    if config.ffn == "reference" and target.layer_path == "fc2":
        return {"lora_in_features": min(linear.in_features, linear.out_features)}
    return {}


def inject(model: nn.Module, config: LSLoConfig, targets: list[Target],
           wrap: Callable[[Target, dict[str, int]], nn.Module]) -> InjectionState:
    """Freeze ``model`` and put ``wrap(target, widths)`` in the place of every target Linear.

    Args:
        model: the model, changed in place.
        config: the config the targets came from (its ``ffn`` decides the adapted widths).
        targets: :func:`find_targets` of ``model`` and ``config``.
        wrap: builds the wrapper of one Linear; ``widths`` holds the ``lora_in_features`` /
            ``lora_out_features`` keyword arguments of the LSLo layers.

    Returns:
        The :class:`InjectionState` to keep on the model (``requires_grad`` before the call).
    """
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for target in targets:
        set_module(model, target.name, wrap(target, _ffn_widths(config, target)))
    return InjectionState(config=config, requires_grad=requires_grad)
