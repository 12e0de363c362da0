"""Weight Learning (paper Section 4.1, Eq. 5; Figure 1): both routings in every module, mixed per layer.

A source- and a target-indexed LSLo in every target Linear (:class:`~lslo.LSLoDualLinear`, in
:mod:`lslo.layer`), mixed by ``softmax`` of two logits per encoder/decoder layer
(:class:`~lslo.LSLoMix`, shared by the dual modules of that layer). This module holds the rest:

- the injection (:func:`apply_weight_learning`, through :func:`lslo.injection.inject`, the path
  :func:`lslo.apply_lslo` uses) and its undoing;
- the mixing state: the mixes of a model, their learned weights, every tensor to save;
- the saved state's files (:func:`save_weight_learning` / :func:`load_weight_learning`, which
  :func:`lslo.save_adapters` / :func:`lslo.load_adapters` use for such a model);
- the index plan derived from the weights: written (:func:`write_index_plan`) and read
  (:func:`read_index_plan`; ``lslo train --index-plan`` reads the same file through
  :func:`index_plan_document`).

Training it is ``lslo train --method weight-learning``; ``lslo learn-index``
(:func:`lslo.analysis.learn_index`) trains it and writes the plan.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LSLoConfig
from .injection import (
    find_targets,
    get_lslo_config,
    inject,
    lslo_modules,
    model_fingerprint,
    restore_requires_grad,
    set_module,
)
from .io import atomic_directory, atomic_write_file, recover_directory
from .layer import LSLoDualLinear, LSLoMix

__all__ = [
    "INDEX_PLAN_FORMAT",
    "MIX_ATTR",
    "WL_CONFIG_NAME",
    "WL_FORMAT",
    "WL_WEIGHTS_NAME",
    "apply_weight_learning",
    "derive_index_plan",
    "holds_weight_learning",
    "index_plan_document",
    "learned_mix_weights",
    "load_weight_learning",
    "read_index_plan",
    "remove_weight_learning",
    "save_weight_learning",
    "weight_learning_config",
    "weight_learning_mixes",
    "weight_learning_state",
    "write_index_plan",
]

_SIDES = ("encoder", "decoder")
WL_FORMAT = "lslo-weight-learning"
WL_CONFIG_NAME = "lslo_weight_learning.json"
WL_WEIGHTS_NAME = "lslo_weight_learning.safetensors"
INDEX_PLAN_FORMAT = "lslo-index-plan"
_WL_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)$")
_WEIGHT_LEARNING_ATTR = "_lslo_weight_learning"
MIX_ATTR = "lslo_mix"  # name of the LSLoMix registered on each encoder/decoder layer


def apply_weight_learning(model: nn.Module, config: LSLoConfig, *, learn_scales: bool = False,
                          mix_init: tuple[float, float] = (0.0, 0.0)) -> nn.Module:
    """Weight Learning (paper Section 4.1, Eq. 5): both routings in every target Linear, mixed per layer.

    Freezes ``model`` and swaps each Linear ``config`` targets for an :class:`~lslo.layer.LSLoDualLinear`
    (a source-indexed and a target-indexed factor set around the frozen Linear), and registers one
    :class:`~lslo.layer.LSLoMix` (two logits, ``(w_src, w_tgt) = softmax(logits)``) on every encoder
    and decoder layer, shared by all the dual modules of that layer:
    ``y = W x + w_src * LSLo_src(x) + w_tgt * LSLo_tgt(x)``. The config's index plan is not used
    (learning it is the point); its ranks, targets, scale, init, ffn and backend are.

    Run the model inside ``with lslo.route(src=..., tgt=...)`` (both ids are needed). Trainable after
    the call: both factor sets, the mixing logits, and the scales when ``learn_scales``.
    :func:`weight_learning_mixes` reads the learned weights back; :func:`remove_weight_learning`
    undoes the call.

    Args:
        model: an M2M-100-architecture model (see :func:`apply_lslo`), without LSLo adapters.
        config: ranks, targets, scale, init, ffn and backend of both factor sets.
        learn_scales: hold each set's per-language scales as trainable Parameters.
        mix_init: initial (src, tgt) logits of every layer.

    Returns:
        ``model`` itself.
    """
    if not isinstance(config, LSLoConfig):
        raise TypeError(f"config must be an LSLoConfig, got {type(config).__name__}")
    if get_lslo_config(model) is not None or lslo_modules(model):
        raise ValueError("the model already carries LSLo adapters; call lslo.remove_lslo(model) first")
    if getattr(model, _WEIGHT_LEARNING_ATTR, None) is not None:
        raise ValueError("apply_weight_learning was already applied to this model; call remove_weight_learning first")
    targets = find_targets(model, config)
    mixes: dict[str, LSLoMix] = {}

    def wrap(target, widths):
        layer_name = target.name[: len(target.name) - len(target.layer_path) - 1]  # "...encoder.layers.3"
        if layer_name not in mixes:
            mixes[layer_name] = LSLoMix(mix_init).to(target.linear.weight.device)
            model.get_submodule(layer_name).add_module(MIX_ATTR, mixes[layer_name])
        return LSLoDualLinear(
            target.linear, config.language_ranks, mix=mixes[layer_name], scale=config.scale, init=config.init,
            backend=config.backend, learn_scales=learn_scales, **widths,
        )

    setattr(model, _WEIGHT_LEARNING_ATTR, inject(model, config, targets, wrap))
    return model


def weight_learning_mixes(model: nn.Module) -> dict[str, Any]:
    """The :class:`~lslo.layer.LSLoMix` of every layer, by layer path (e.g. ``"model.encoder.layers.3"``).

    ``mix()`` gives that layer's (2,) weights ``(w_src, w_tgt)``; ``mix.logits`` the trained logits.
    """
    return {name.rpartition(".")[0]: m for name, m in model.named_modules()
            if isinstance(m, LSLoMix) and name.endswith("." + MIX_ATTR)}


def weight_learning_config(model: nn.Module) -> LSLoConfig | None:
    """The :class:`LSLoConfig` :func:`apply_weight_learning` used on ``model``, or None when it was not applied."""
    state = getattr(model, _WEIGHT_LEARNING_ATTR, None)
    return None if state is None else state.config


def remove_weight_learning(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_weight_learning`: the original Linears back, mixes removed, ``requires_grad`` restored."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LSLoDualLinear)]:
        set_module(model, name, module.base_layer)
    for layer_name in weight_learning_mixes(model):
        delattr(model.get_submodule(layer_name), MIX_ATTR)
    state = getattr(model, _WEIGHT_LEARNING_ATTR, None)
    if state is not None:
        restore_requires_grad(model, state)
        delattr(model, _WEIGHT_LEARNING_ATTR)
    return model


def _dual_modules(model: nn.Module) -> dict[str, LSLoDualLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LSLoDualLinear)}


def weight_learning_state(model: nn.Module) -> dict[str, Any]:
    """Every tensor Weight Learning trains or needs to reload: ``{name}.src.lora_A`` ... of each dual
    module (factors, mask, ranks, scales of both sets) and ``{layer}.lslo_mix.logits`` of each layer."""
    config = weight_learning_config(model)
    if config is None:
        raise ValueError("the model carries no Weight Learning layers (lslo.model.apply_weight_learning)")
    tensors = {}
    for name, module in _dual_modules(model).items():
        for index in ("src", "tgt"):
            for key, tensor in getattr(module, index).adapter_state_dict().items():
                tensors[f"{name}.{index}.{key}"] = tensor.detach().to("cpu").contiguous()
    for layer, mix in weight_learning_mixes(model).items():
        tensors[f"{layer}.lslo_mix.logits"] = mix.logits.detach().to("cpu").contiguous()
    return tensors


def save_weight_learning(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write a Weight-Learning model's trainable state (safetensors) and config (JSON), all-or-nothing.

    The training engine saves ``method="weight-learning"`` runs (checkpoints and ``final/``) with it;
    :func:`load_weight_learning` reads it back onto a fresh base model.
    """
    from safetensors.torch import save_file

    tensors = weight_learning_state(model)
    meta = {"format": WL_FORMAT, "version": 1, "config": weight_learning_config(model).to_dict(),
            "base_model": model_fingerprint(model), "mix_weights": _mix_weights_json(learned_mix_weights(model))}
    text = json.dumps(meta, indent=2, allow_nan=False)
    with atomic_directory(directory, replaceable=(WL_CONFIG_NAME, WL_WEIGHTS_NAME)) as staging:
        save_file(tensors, os.path.join(staging, WL_WEIGHTS_NAME))
        Path(staging, WL_CONFIG_NAME).write_text(text, encoding="utf-8")


def load_weight_learning(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load what :func:`save_weight_learning` wrote into ``model`` (applying Weight Learning if needed).

    Refused with ValueError: another base model, another config than the one already applied, a
    tensor file that does not cover exactly the model's dual layers and mixes. Returns ``model``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    recover_directory(directory)
    config_path, weights_path = directory / WL_CONFIG_NAME, directory / WL_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory} holds no Weight-Learning state ({WL_CONFIG_NAME} and {WL_WEIGHTS_NAME})")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        config = LSLoConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} is damaged or not a Weight-Learning config ({exc})") from None
    if meta.get("format") != WL_FORMAT:
        raise ValueError(f"{config_path} is not a Weight-Learning config (format {meta.get('format')!r})")
    fingerprint = model_fingerprint(model)
    differences = [k for k, v in meta.get("base_model", {}).items() if fingerprint.get(k) != v]
    if differences:
        raise ValueError(f"{directory} was saved for a different base model (differs in {differences})")
    current = weight_learning_config(model)
    if current is None:
        apply_weight_learning(model, config)
    elif current.to_dict() != config.to_dict():
        raise ValueError(f"{directory} holds Weight Learning of another config than the model's")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 (any failure to deserialise means a damaged file)
        raise ValueError(f"{weights_path}: damaged or not a safetensors file ({exc})") from None
    expected = set(weight_learning_state(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{weights_path} does not match the model's Weight-Learning layers: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, module in _dual_modules(model).items():
            for index in ("src", "tgt"):
                prefix = f"{name}.{index}."
                getattr(module, index).load_adapter_state_dict(
                    {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for layer, mix in weight_learning_mixes(model).items():
            mix.logits.copy_(tensors[f"{layer}.lslo_mix.logits"])
    return model


def learned_mix_weights(model: nn.Module) -> dict[str, list[tuple[float, float]]]:
    """Each layer's ``(w_src, w_tgt) = softmax(logits)`` (Eq. 5), by side, in layer order.

    Returns:
        ``{"encoder": [(w_src, w_tgt), ...], "decoder": [...]}``; ValueError when the model has no
        mixes or a layer of a side has none (every layer needs a weight for an index plan).
    """
    found: dict[str, dict[int, tuple[float, float]]] = {}
    for layer, mix in weight_learning_mixes(model).items():
        match = _WL_LAYER.search(layer)
        if match is None:
            continue
        with torch.no_grad():
            w = mix().double().tolist()
        found.setdefault(match.group(1), {})[int(match.group(2))] = (float(w[0]), float(w[1]))
    if not found:
        raise ValueError("the model has no Weight-Learning mixes (lslo.model.apply_weight_learning)")
    out = {}
    for side in _SIDES:
        if side not in found:
            continue
        layers = found[side]
        missing = [i for i in range(max(layers) + 1) if i not in layers]
        if missing:
            raise ValueError(f"{side} layers {missing} have no Weight-Learning mix: no index can be derived for them")
        out[side] = [layers[i] for i in range(len(layers))]
    return out


def _mix_weights_json(weights: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[dict[str, float]]]:
    return {side: [{"layer": i + 1, "w_src": w[0], "w_tgt": w[1]} for i, w in enumerate(values)]
            for side, values in weights.items()}


def _check_weights(weights: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[tuple[float, float]]]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("mix weights must be {'encoder': [(w_src, w_tgt), ...], 'decoder': [...]}")
    out = {}
    for side, values in weights.items():
        if side not in _SIDES:
            raise ValueError(f"mix weights: unknown side {side!r}; use 'encoder' and 'decoder'")
        pairs = []
        for i, pair in enumerate(values):
            pair = (pair["w_src"], pair["w_tgt"]) if isinstance(pair, Mapping) else tuple(pair)
            if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
                raise ValueError(f"mix weights[{side!r}][{i}] must be two finite numbers (w_src, w_tgt), got {pair!r}")
            pairs.append((float(pair[0]), float(pair[1])))
        if not pairs:
            raise ValueError(f"mix weights[{side!r}] is empty")
        out[side] = pairs
    return out


def derive_index_plan(weights: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[str]]:
    """The index with the larger weight in every layer (paper Section 4.1): ``"src"`` where
    ``w_src > w_tgt``, else ``"tgt"`` (a tie, as untrained logits give, keeps the target index that
    every decoder layer and the top of the encoder follow in the paper's Figure 1).

    Returns:
        ``{"encoder": ["src", ...], "decoder": [...]}``, as ``LSLoConfig.index_plan`` takes it.
    """
    return {side: ["src" if w_src > w_tgt else "tgt" for w_src, w_tgt in pairs]
            for side, pairs in _check_weights(weights).items()}


def write_index_plan(weights: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike) -> Path:
    """Write the derived index plan as ``lslo train --index-plan FILE`` reads it (JSON, atomically):
    ``{"format", "index_plan": {"encoder": [...], "decoder": [...]}, "num_layers", "weights"}``."""
    weights = _check_weights(weights)
    plan = derive_index_plan(weights)
    document = {"format": INDEX_PLAN_FORMAT, "index_plan": plan,
                "num_layers": {side: len(v) for side, v in plan.items()}, "weights": _mix_weights_json(weights)}
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"index plan {path}: use a .json file name (lslo train --index-plan reads JSON)")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1)
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def read_index_plan(path: str | os.PathLike, *, num_encoder_layers: int | None = None,
                    num_decoder_layers: int | None = None) -> dict[str, list[str] | str]:
    """An index plan file (``{"index_plan": {...}}`` or the plan itself), checked against a model's depth.

    ValueError naming the file when it is not JSON, holds no valid plan, or was learned for another
    number of encoder/decoder layers than given.
    """
    path = Path(path)
    plan = index_plan_document(path)
    try:
        plan = LSLoConfig(languages=["en"], ranks=1, index_plan=plan).index_plan
    except ValueError as exc:
        raise ValueError(f"index plan file {path}: {exc}") from None
    for side, depth in (("encoder", num_encoder_layers), ("decoder", num_decoder_layers)):
        value = plan.get(side) if isinstance(plan, Mapping) else None
        if depth is not None and isinstance(value, list) and len(value) != depth:
            raise ValueError(f"index plan file {path} was learned for a {len(value)}-layer {side}; this model's "
                             f"{side} has {depth} layers")
    return plan


def holds_weight_learning(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a :func:`save_weight_learning` save (its JSON file; no LSLo adapter config)."""
    return os.path.exists(os.path.join(os.fspath(directory), WL_CONFIG_NAME))


def index_plan_document(path: str | os.PathLike, *, what: str = "index plan file"):
    """The index plan a JSON file holds: its ``"index_plan"`` entry (as :func:`write_index_plan` writes),
    or the whole document (a plan written by hand), not yet checked.

    ValueError (``what`` names the file in the message) when the file is missing or not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc})") from None
    return document.get("index_plan", document) if isinstance(document, dict) else document
