"""LSLo on a live Hugging Face M2M-100 / NLLB model: injection, removal, adapter files, reports, merging.

Injection is explicit, idempotent and reversible (PEFT's pattern): :func:`apply_lslo` freezes the
base and swaps each target ``nn.Linear`` for an :class:`~lslo.LSLoLinear` wrapping it (never a
copy); :func:`remove_lslo` puts the original modules back and restores ``requires_grad``.

Routing: every LSLo layer reads the ids of :func:`lslo.route`; encoder layer ``i`` follows the
config's index plan, decoder layers the target language (unless the plan says otherwise). A
forward, a loss and a backward all run inside one ``with lslo.route(src=..., tgt=...)`` block,
or through :func:`forward_with_langs`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .card import CARD_NAME, model_card
from .config import GROUP_ORDER, LSLoConfig
from .context import route
from .injection import (
    FINGERPRINT_KEYS,
    LSLO_STATE_ATTR,
    find_targets,
    get_lslo_config,
    inject,
    lslo_modules,
    model_fingerprint,
)
from .injection import layer_counts as _layer_counts
from .injection import module_type as _module_type
from .injection import restore_requires_grad as _restore_requires_grad
from .injection import set_module as _set_module
from .io import atomic_directory, atomic_write_file, read_directory_files, recover_directory
from .layer import LSLoLinear
from .shared_inputs import group_shared_inputs
from .weight_learning import (  # the F401 names: Weight Learning's injection lived here, re-exported
    MIX_ATTR,  # noqa: F401
    apply_weight_learning,  # noqa: F401
    holds_weight_learning,
    load_weight_learning,
    remove_weight_learning,  # noqa: F401
    save_weight_learning,
    weight_learning_config,
    weight_learning_mixes,  # noqa: F401
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "apply_lslo",
    "base_model_record",
    "format_parameter_report",
    "forward_with_langs",
    "get_lslo_config",
    "load_adapters",
    "load_base_model",
    "lslo_modules",
    "merge_direction",
    "model_fingerprint",
    "parameter_report",
    "read_adapter_config",
    "read_adapter_meta",
    "remove_lslo",
    "resolve_adapter_base",
    "save_adapters",
    "to_lang_ids",
]

ADAPTER_CONFIG_NAME = "lslo_config.json"
ADAPTER_WEIGHTS_NAME = "lslo_adapters.safetensors"
_FORMAT = "lslo-adapters"
_FORMAT_VERSION = 1
_STATE_ATTR = LSLO_STATE_ATTR
# Projections an M2M-100 attention block calls on one input tensor: their LoRA terms run in one
# op call per input (lslo.shared_inputs); cross-attention's q reads the decoder, its k/v the encoder.
_SHARED_INPUTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  ("encoder_attn.k_proj", "encoder_attn.v_proj"))
# Keys of LSLoLinear.adapter_state_dict().
_ADAPTER_KEYS = ("lora_A", "lora_B", "prune_mask", "ranks", "scales")
# Config fields that do not change what the saved tensors mean.
_RUNTIME_FIELDS = ("backend", "init")
# What an adapter directory may hold when a save replaces it: one save, and the temporary files of
# the per-file writes of older versions of this module.
_REPLACEABLE = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, f".{ADAPTER_CONFIG_NAME}.*", f".{ADAPTER_WEIGHTS_NAME}.*",
                CARD_NAME, f".{CARD_NAME}.*")


# ------------------------------------------------------------------ helpers
def _require_config(model: nn.Module, what: str) -> LSLoConfig:
    config = get_lslo_config(model)
    if config is None:
        raise ValueError(f"{what}: the model carries no LSLo adapters; call lslo.apply_lslo(model, config) first")
    return config


# ------------------------------------------------------------- injection
def apply_lslo(model: nn.Module, config: LSLoConfig) -> nn.Module:
    """Freeze ``model`` and give each target Linear one LoRA pair per language, in place.

    Idempotent: applying the same config again does nothing; a different config is refused
    (call :func:`remove_lslo` first). With ``config.ffn == "reference"``, fc1 adapts only its
    first d_model outputs and fc2 its first d_model inputs, as the authors' code.

    Works on any device, ``meta`` included (to count parameters of a full-size model).

    Args:
        model: an ``M2M100ForConditionalGeneration`` (M2M-100, M2M-124, NLLB dense), an
            ``M2M100Model``, or any module whose layers live at ``encoder.layers.<i>`` /
            ``decoder.layers.<i>``.
        config: the :class:`LSLoConfig`.

    Returns:
        ``model`` itself.
    """
    if not isinstance(config, LSLoConfig):
        raise TypeError(f"config must be an LSLoConfig, got {type(config).__name__}")
    current = get_lslo_config(model)
    if current is not None:
        if current.to_dict() == config.to_dict():
            return model
        raise ValueError("the model already carries LSLo adapters with a different config; call lslo.remove_lslo(model) first")
    if lslo_modules(model):
        raise ValueError("the model holds LSLoLinear modules that apply_lslo did not inject; remove them first")
    targets = find_targets(model, config)
    # As PEFT: a listed name that matches nothing is a typo or a different architecture, not a no-op.
    unmatched = config.unmatched_targets([target.name for target in targets])
    if unmatched:
        raise ValueError(
            f"LSLoConfig.target_modules: {unmatched} matched no nn.Linear inside encoder.layers.<i> / "
            f"decoder.layers.<i> of this model (other names matched {len(targets)} modules)"
        )
    plan = config.resolve_index_plan(*_layer_counts(model))

    wrapped_at = {}  # (side, layer, path inside the layer) -> its LSLo layer, for the shared-input groups

    def wrap(target, widths):
        wrapped = LSLoLinear(
            target.linear, config.language_ranks, index=plan[target.side][target.layer], scale=config.scale,
            init=config.init, backend=config.backend, **widths,
        )
        wrapped_at[target.side, target.layer, target.layer_path] = wrapped
        return wrapped

    setattr(model, _STATE_ATTR, inject(model, config, targets, wrap))
    group_shared_inputs(_shared_input_groups(wrapped_at))
    return model


def _shared_input_groups(wrapped_at: Mapping[tuple[str, int, str], LSLoLinear]) -> list[list[LSLoLinear]]:
    """The injected layers of each (side, layer) that read one input (``_SHARED_INPUTS``), two or more."""
    blocks = sorted({(side, layer) for side, layer, _ in wrapped_at})
    groups = []
    for side, layer in blocks:
        for paths in _SHARED_INPUTS:
            members = [wrapped_at[side, layer, p] for p in paths if (side, layer, p) in wrapped_at]
            if len(members) >= 2:
                groups.append(members)
    return groups


def remove_lslo(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lslo`: put every wrapped Linear back (unmerged) and restore ``requires_grad``.

    A model without LSLo is returned unchanged. Returns ``model`` itself.
    """
    for name, module in lslo_modules(model).items():
        module.unmerge()
        _set_module(model, name, module.base_layer)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        _restore_requires_grad(model, state)
        delattr(model, _STATE_ATTR)
    return model


# --------------------------------------------------------------- routing
def to_lang_ids(config: LSLoConfig, langs, name: str = "langs", device: torch.device | str | None = None) -> torch.Tensor:
    """Language codes, ints or a tensor -> (n,) int64 ids on ``device``.

    Unknown codes raise ValueError listing the config's languages; ints are range-checked.
    """
    if isinstance(langs, torch.Tensor):
        if langs.dtype.is_floating_point or langs.dtype.is_complex or langs.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer language ids, got dtype {langs.dtype}")
        ids = langs.to(device=device, dtype=torch.int64)
    elif isinstance(langs, str):
        raise TypeError(f"{name} must be one code per sentence, not the single string {langs!r}")
    else:
        values = list(langs)
        if all(isinstance(v, str) for v in values):
            return config.lang_ids(values, device=device)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{name} must be language codes or int ids, got {values!r}")
        ids = torch.tensor(values, dtype=torch.int64, device=device)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= config.num_languages):
        raise ValueError(f"{name} holds ids outside [-1, {config.num_languages}) ({config.num_languages} languages)")
    return ids


def forward_with_langs(model: nn.Module, batch: Mapping[str, Any], src_lang_ids, tgt_lang_ids, **kwargs):
    """``model(**batch, **kwargs)`` routed by per-sentence source and target languages.

    Args:
        batch: model inputs, e.g. input_ids (B, S), attention_mask (B, S), labels (B, T).
        src_lang_ids: (B,) int64 tensor, or B codes / ints: source language of each sentence.
        tgt_lang_ids: same for the target language.

    Returns:
        The model's output (loss and logits when ``labels`` are given); differentiable.

    With gradient checkpointing the backward recomputes layer forwards, which read the ids of
    the active route: call ``loss.backward()`` inside ``with lslo.route(...)`` in that case.
    """
    config = _require_config(model, "forward_with_langs")
    device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), None)
    src = to_lang_ids(config, src_lang_ids, "src_lang_ids", device)
    tgt = to_lang_ids(config, tgt_lang_ids, "tgt_lang_ids", device)
    for key in ("input_ids", "inputs_embeds", "labels", "decoder_input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:  # noqa: SIM102 (one condition per line)
            if src.shape[0] != value.shape[0] or tgt.shape[0] != value.shape[0]:
                raise ValueError(
                    f"batch[{key!r}] has {value.shape[0]} sentences but src_lang_ids has {src.shape[0]} and "
                    f"tgt_lang_ids {tgt.shape[0]}"
                )
    with route(src=src, tgt=tgt):
        return model(**batch, **kwargs)


# ------------------------------------------------------------ adapter i/o
def base_model_record(model: nn.Module, tokenizer=None) -> dict[str, str | None]:
    """Which base model (and tokenizer) ``model`` was loaded from, as :func:`save_adapters` records it.

    Returns:
        ``{"name_or_path": hub id or absolute folder (None if unknown), "revision": the hub commit
        it came from (None for a folder), "tokenizer": the tokenizer's hub id or folder}``.
    """
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    local = bool(name) and os.path.isdir(name)
    tokenizer_name = getattr(tokenizer, "name_or_path", "") or ""
    return {
        "name_or_path": os.path.abspath(name) if local else (name or None),
        "revision": None if local or not name else getattr(config, "_commit_hash", None),
        "tokenizer": (os.path.abspath(tokenizer_name) if os.path.isdir(tokenizer_name) else tokenizer_name)
        or (os.path.abspath(name) if local else (name or None)),
    }


def save_adapters(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None,
                  metadata: Mapping[str, Any] | None = None) -> None:
    """Write the adapters (not the base) to ``directory``, all-or-nothing.

    Files: ``lslo_adapters.safetensors`` (per module: lora_A, lora_B, prune_mask, ranks, scales),
    ``lslo_config.json`` (config, base-model fingerprint, the base model's name, hub revision and
    tokenizer (:func:`base_model_record`), and ``metadata``) and a ``README.md`` model card
    (:mod:`lslo.card`). ``tokenizer``: the tokenizer used with the base (recorded by name);
    ``metadata``: JSON-ready extras such as ``lslo train``'s ``{"recipe": ..., "pruning": ...}``. They are written into a fresh
    directory beside ``directory`` that is then swapped in whole (:func:`lslo.io.atomic_directory`):
    a kill at any instant leaves the previous save or this one, never one file of each. An existing
    ``directory`` holding other files than a save is refused (ValueError) rather than replaced.
    Files get the mode the umask gives (0644 under umask 022).

    A Weight-Learning model (:func:`apply_weight_learning`: dual layers and mixes, no LSLo config)
    is saved with :func:`lslo.weight_learning.save_weight_learning` (its own two files, same guarantees).
    """
    from safetensors.torch import save_file

    if get_lslo_config(model) is None and weight_learning_config(model) is not None:
        save_weight_learning(model, directory)
        return
    config = _require_config(model, "save_adapters")
    tensors = {}
    for name, module in lslo_modules(model).items():
        for key, tensor in module.adapter_state_dict().items():
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    meta = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "config": config.to_dict(),
        "base_model": model_fingerprint(model),
        "base": base_model_record(model, tokenizer),
    }
    if metadata:
        meta["metadata"] = json.loads(json.dumps(dict(metadata), allow_nan=False, default=str))

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, allow_nan=False)

    with atomic_directory(directory, replaceable=_REPLACEABLE) as staging:
        atomic_write_file(os.path.join(staging, ADAPTER_WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp))
        atomic_write_file(os.path.join(staging, ADAPTER_CONFIG_NAME), write_json)
        card = model_card(meta, directory)

        def write_card(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(card)

        atomic_write_file(os.path.join(staging, CARD_NAME), write_card)


def _read_adapter_files(directory: str | os.PathLike, with_weights: bool) -> dict[str, bytes | None]:
    """The raw files of one save in ``directory``, after finishing or undoing an interrupted save."""
    path = os.fspath(directory)
    recover_directory(path)
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise ValueError(f"{path} holds no LSLo adapters ({what})")
    names = [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME] if with_weights else [ADAPTER_CONFIG_NAME]
    files = read_directory_files(path, names)
    if files[ADAPTER_CONFIG_NAME] is None:
        raise ValueError(f"{path} holds no LSLo adapters ({ADAPTER_CONFIG_NAME} not found)")
    return files


def _parse_adapter_config(raw: bytes, path: str) -> tuple[LSLoConfig, dict[str, Any]]:
    # A file with the wrong JSON types is bad data, not a programming error: ValueError throughout.
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: damaged or not an LSLo adapter config (not valid JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not an LSLo adapter config (a JSON {type(meta).__name__}, not an object)")  # noqa: TRY004
    if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: not an LSLo adapter file of version {_FORMAT_VERSION} "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    for key in ("config", "base_model"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{path}: damaged LSLo adapter config: {key!r} is missing or not an object")  # noqa: TRY004
    try:
        config = LSLoConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: damaged LSLo adapter config: {exc}") from None
    return config, meta["base_model"]


def _parse_adapter_tensors(raw: bytes | None, path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if raw is None:
        raise ValueError(f"{path}: not found; the adapter directory holds a config but no tensors")
    try:
        return load(raw)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 (any failure to deserialise means a damaged or foreign file)
        raise ValueError(f"{path}: damaged or not a safetensors file ({type(exc).__name__}: {exc})") from None


def _check_adapter_state(state: Mapping[str, torch.Tensor], module: LSLoLinear, where: str) -> None:
    """Dtypes and shapes of one module's saved tensors (load_adapter_state_dict checks the rest)."""
    for key in ("lora_A", "lora_B", "scales"):
        if not state[key].dtype.is_floating_point:
            raise ValueError(f"{where}.{key} has dtype {state[key].dtype}, expected a floating-point tensor")
    if state["ranks"].dtype.is_floating_point or state["ranks"].dtype == torch.bool or state["ranks"].dim() != 1:
        raise ValueError(f"{where}.ranks must be a 1-D integer tensor, got {state['ranks'].dtype} "
                         f"of shape {tuple(state['ranks'].shape)}")
    if state["prune_mask"].dtype.is_floating_point:
        raise ValueError(f"{where}.prune_mask has dtype {state['prune_mask'].dtype}, expected bool")
    if tuple(state["scales"].shape) != (module.num_languages,):
        raise ValueError(f"{where}.scales has shape {tuple(state['scales'].shape)}, "
                         f"expected ({module.num_languages},)")
    if not bool(torch.isfinite(state["scales"]).all()):
        raise ValueError(f"{where}.scales holds NaN or inf: {state['scales'].tolist()}")


def read_adapter_config(directory: str | os.PathLike) -> tuple[LSLoConfig, dict[str, Any]]:
    """(config, base-model fingerprint) stored in an adapter folder.

    Finishes or undoes an interrupted save first (:func:`lslo.io.recover_directory`). A damaged or
    foreign ``lslo_config.json`` raises ValueError naming the file.
    """
    files = _read_adapter_files(directory, with_weights=False)
    return _parse_adapter_config(files[ADAPTER_CONFIG_NAME], os.path.join(os.fspath(directory), ADAPTER_CONFIG_NAME))


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The whole ``lslo_config.json`` of an adapter folder (config, fingerprint, base record, metadata)."""
    read_adapter_config(directory)  # validates the file, naming it when damaged
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_adapter_base(directory: str | os.PathLike, model: str | None = None) -> dict[str, str | None]:
    """The base model to load for the adapters in ``directory``.

    Args:
        directory: an adapter folder (:func:`save_adapters`).
        model: an explicit base (``--model``): checked against the adapters' fingerprint from its
            config alone (no weights read). None: the base the folder records.

    Returns:
        ``{"name_or_path", "revision", "tokenizer"}`` to load.

    Raises:
        ValueError: no recorded base and no ``model``; a recorded folder that is gone or a hub id
            that cannot be loaded (offline, not cached), both asking for ``--model``; an explicit
            ``model`` whose shape differs from the adapters' base (both named).
    """
    from transformers import AutoConfig

    directory = os.fspath(directory)
    meta = read_adapter_meta(directory)
    record = meta.get("base") or {}
    recorded = record.get("name_or_path")
    if model is not None:
        model_config = _base_config(os.path.expanduser(os.fspath(model)))
        fingerprint = {key: getattr(model_config, key, None) for key in FINGERPRINT_KEYS}
        saved = meta.get("base_model") or {}
        differences = [f"{k} {saved.get(k)!r} vs {fingerprint[k]!r}" for k in FINGERPRINT_KEYS
                       if saved.get(k) != fingerprint[k]]
        if differences:
            raise ValueError(f"--model {model} is not the base the adapters in {directory} were trained on "
                             f"({recorded or 'base not recorded'}): {'; '.join(differences)}")
        return {"name_or_path": model, "revision": None, "tokenizer": model}
    if not recorded:
        raise ValueError(f"the adapters in {directory} do not record their base model (saved by an older lslo); "
                         "pass --model")
    if _looks_like_local_path(recorded) or os.path.isabs(recorded):
        if not os.path.isdir(recorded):
            raise ValueError(f"the adapters in {directory} were trained on {recorded}, which is not there any more; "
                             "pass --model")
    else:
        try:
            AutoConfig.from_pretrained(recorded, revision=record.get("revision"))
        except OSError:
            raise ValueError(f"the adapters in {directory} were trained on {recorded} (revision "
                             f"{record.get('revision')}), which cannot be loaded here (hub offline and not cached?); "
                             "pass --model") from None
    tokenizer = record.get("tokenizer") or recorded
    if (_looks_like_local_path(tokenizer) or os.path.isabs(tokenizer)) and not os.path.isdir(tokenizer):
        tokenizer = recorded
    return {"name_or_path": recorded, "revision": record.get("revision"), "tokenizer": tokenizer}


def load_adapters(model: nn.Module | None, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (injecting LSLo if it has none).

    ``model=None`` loads the base model the folder records (:func:`resolve_adapter_base`) first.

    Finishes or undoes an interrupted save first (:func:`lslo.io.recover_directory`), and reads
    both files of one save even while another process replaces it. Refused with ValueError:
    adapters saved for another base model (type, width, depth, FFN, vocabulary), for another
    language list or LSLo layout, a tensor file that doesn't cover exactly this model's LSLo
    modules, and damaged or foreign files (the message names the file). Returns ``model``.

    A directory holding a Weight-Learning save (:func:`save_adapters` of a model with dual layers)
    is loaded with :func:`lslo.weight_learning.load_weight_learning`, which applies Weight Learning to
    ``model`` if needed.
    """
    directory = os.fspath(directory)
    recover_directory(directory)  # an interrupted swap decides which files are there
    if model is None:
        base = resolve_adapter_base(directory)
        model = load_base_model(base["name_or_path"], revision=base["revision"])
    if not os.path.exists(os.path.join(directory, ADAPTER_CONFIG_NAME)) and holds_weight_learning(directory):
        return load_weight_learning(model, directory)
    files = _read_adapter_files(directory, with_weights=True)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    config, saved_fingerprint = _parse_adapter_config(files[ADAPTER_CONFIG_NAME],
                                                      os.path.join(directory, ADAPTER_CONFIG_NAME))
    tensors = _parse_adapter_tensors(files[ADAPTER_WEIGHTS_NAME], weights_path)
    fingerprint = model_fingerprint(model)
    differences = [f"{k}: adapters {saved_fingerprint.get(k)!r}, model {fingerprint[k]!r}"
                   for k in FINGERPRINT_KEYS if saved_fingerprint.get(k) != fingerprint[k]]
    if differences:
        raise ValueError(f"adapters in {directory} were saved for a different base model ({'; '.join(differences)})")
    current = get_lslo_config(model)
    if current is None:
        apply_lslo(model, config)
    else:
        if tuple(current.languages) != tuple(config.languages):
            raise ValueError(
                f"adapters in {directory} are for languages {list(config.languages)} but the model's LSLo has "
                f"{list(current.languages)}"
            )
        saved, mine = config.to_dict(), current.to_dict()
        differing = [k for k in saved if k not in _RUNTIME_FIELDS and saved[k] != mine[k]]
        if differing:
            raise ValueError(f"adapters in {directory} differ from the model's LSLo config in {differing}")
    try:
        modules = lslo_modules(model)
        expected = {f"{name}.{key}" for name in modules for key in _ADAPTER_KEYS}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"adapters in {directory} do not match the model's LSLo modules: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        states = {name: {key: tensors[f"{name}.{key}"] for key in _ADAPTER_KEYS} for name in modules}
        for name, module in modules.items():  # check every module before changing any
            try:
                _check_adapter_state(states[name], module, name)
                ranks = states[name]["ranks"].tolist()
                if tuple(ranks) != module.ranks:
                    raise ValueError(f"{name}.ranks = {ranks}, but the config gives this layer {list(module.ranks)}")
            except ValueError as exc:
                raise ValueError(f"{weights_path}: damaged or inconsistent with its config: {exc}") from None
        for name, module in modules.items():
            try:
                module.load_adapter_state_dict(states[name])
            except (ValueError, TypeError, RuntimeError) as exc:
                raise ValueError(f"{weights_path}: {name}: {exc}") from None
    except BaseException:
        if current is None:  # leave the model as it came: no half-loaded adapters
            remove_lslo(model)
        raise
    return model


# ------------------------------------------------------------------ report
def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Count LSLo parameters (A and B; pruning not subtracted) of a model, meta device included.

    Returns:
        dict with ``languages`` {code: n}, ``groups`` {H/M/L/V: n}, ``module_types``
        {"encoder.self_attn.q_proj": n, ...}, ``num_modules``, ``total``, ``base`` (parameters of
        the model outside LSLo, tied weights once) and ``percent_of_base``.
    """
    config = _require_config(model, "parameter_report")
    modules = lslo_modules(model)
    per_language = dict.fromkeys(config.languages, 0)
    per_type: dict[str, int] = {}
    for name, module in modules.items():
        width = module.lora_in_features + module.lora_out_features
        for code, rank in zip(config.languages, module.ranks):
            per_language[code] += rank * width
        module_type = _module_type(name)
        per_type[module_type] = per_type.get(module_type, 0) + module.lora_A.numel() + module.lora_B.numel()
    per_group: dict[str, int] = {}
    for code, count in per_language.items():
        group = config.group_of(code) or "?"
        per_group[group] = per_group.get(group, 0) + count
    per_group = {g: per_group[g] for g in [*GROUP_ORDER, "?"] if g in per_group}
    adapter_ids = {id(p) for m in modules.values() for p in (m.lora_A, m.lora_B)}
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    total = sum(per_language.values())
    return {
        "languages": per_language,
        "groups": per_group,
        "module_types": per_type,
        "num_modules": len(modules),
        "total": total,
        "base": base,
        "percent_of_base": 100.0 * total / base if base else float("nan"),
    }


def format_parameter_report(report: Mapping[str, Any]) -> str:
    """A readable table of :func:`parameter_report`'s dict."""
    def rows(title: str, entries: Mapping[str, int]) -> list[str]:
        width = max(len(k) for k in entries) if entries else 0
        return [title] + [f"  {k:<{width}}  {v:>14,}" for k, v in entries.items()]

    headline = (f"LSLo parameters: {report['total']:,} in {report['num_modules']} modules "
                f"= {report['percent_of_base']:.2f}% of the base model's {report['base']:,}")
    lines = [
        headline,
        *rows("per resource group:", report["groups"]),
        *rows("per module type:", report["module_types"]),
        *rows("per language:", report["languages"]),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ merging
def merge_direction(model: nn.Module, src: str | int, tgt: str | int) -> nn.Module:
    """A plain transformers model for one translation direction.

    Deep-copies ``model`` (so it needs the model's memory once more), folds into each LSLo
    layer the language its index follows (``src`` or ``tgt``), and puts the merged base Linear
    back in its place. The copy has no LSLo left: it runs, ``save_pretrained``s and reloads as
    the base architecture; ``requires_grad`` is as before :func:`apply_lslo`.

    Args:
        src, tgt: language codes (or ids) of the direction.
    """
    config = _require_config(model, "merge_direction")
    src_id = src if isinstance(src, int) else config.lang_id(src)
    tgt_id = tgt if isinstance(tgt, int) else config.lang_id(tgt)
    merged = copy.deepcopy(model)
    for name, module in lslo_modules(merged).items():
        module.unmerge()
        module.merge(src_id if module.index == "src" else tgt_id)
        _set_module(merged, name, module.base_layer)
    _restore_requires_grad(merged, getattr(merged, _STATE_ATTR))
    delattr(merged, _STATE_ATTR)
    return merged


# ------------------------------------------------------------------ loading
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "subfolder")


def _looks_like_local_path(name: str) -> bool:
    """A folder path rather than a hub id ("org/name", "name"): absolute, ./ ../ ~, or 2+ separators."""
    if os.path.isabs(name) or name in (".", "..") or name.startswith(("./", "../", ".\\", "..\\")):
        return True
    return name.count("/") > 1 or "\\" in name or name.endswith("/")


def _check_device(device: torch.device | str) -> None:
    """ValueError when ``device`` is not a torch device or its backend is absent on this machine."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if parsed.type in ("cpu", "meta"):
        return
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu: is_available / device_count
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        build = " (this torch is a CPU-only build)" if parsed.type == "cuda" and torch.version.cuda is None else ""
        raise ValueError(f"device {str(device)!r}: {parsed.type.upper()} is not available on this machine{build}")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and callable(count) and parsed.index >= count():
        raise ValueError(f"device {str(device)!r}: this machine has {count()} {parsed.type} device(s)")


def _check_local_folder(name_or_path: str) -> None:
    if _looks_like_local_path(name_or_path) and not os.path.isdir(name_or_path):
        what = "not a directory" if os.path.exists(name_or_path) else "no such directory"
        raise FileNotFoundError(f"{name_or_path}: {what} (a local model folder was expected)")


def _base_config(name_or_path: str, **hub_kwargs):
    """The model's ``AutoConfig``; a missing local folder or an unreachable hub id raise naming both sides."""
    from transformers import AutoConfig

    _check_local_folder(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    except OSError as exc:
        if os.path.exists(name_or_path):
            raise
        # Neither a folder here nor reachable on the hub: say both, not only the hub's side.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"{name_or_path}: no such directory, and not loadable from the Hugging Face hub ({reason})") from exc


def load_base_model(name_or_path: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    **from_pretrained_kwargs) -> nn.Module:
    """Load an M2M-100-architecture translation model (M2M-100, M2M-124, NLLB dense) in eval mode.

    Args:
        name_or_path: hub id (e.g. ``"facebook/flores101_mm100_615M"``) or a local folder.
        dtype: weights dtype (default: as stored).
        device: where to put the model (default: CPU).
        from_pretrained_kwargs: passed to ``from_pretrained`` (revision, cache_dir, local_files_only, ...).
    """
    from transformers import M2M100ForConditionalGeneration

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a hub id or a folder, got {type(name_or_path).__name__}")
    name_or_path = os.path.expanduser(os.fspath(name_or_path))
    _check_local_folder(name_or_path)  # before the device: a wrong path is the first thing to say
    if device is not None:
        _check_device(device)
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    model_config = _base_config(name_or_path, **hub_kwargs)
    if model_config.model_type != "m2m_100":
        raise ValueError(f"{name_or_path} is a {model_config.model_type!r} model; LSLo supports the M2M-100 "
                         "architecture (model_type 'm2m_100': M2M-100, M2M-124, NLLB dense)")
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    model = M2M100ForConditionalGeneration.from_pretrained(name_or_path, config=model_config, **from_pretrained_kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()
