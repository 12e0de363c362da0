"""The authors' training recipe and the paper's rows as presets.

The recipe is what the paper (Section 6.2, Appendix B) and the authors' fairseq command
(``Spike0924/LSLo`` README) set::

    --lr-scheduler inverse_sqrt --lr 3e-3 --warmup-updates 1 --max-tokens 4000 --update-freq 4
    --max-epoch 15 --dropout 0.1 --label-smoothing 0.2 --seed 2 --amp

with layer drop 0 (fairseq's default; M2M-100's Hugging Face configs carry 0.05), attention dropout
0.1 and activation dropout 0 (M2M-100's config defaults), Adam (0.9, 0.98) with epsilon 1e-8,
no weight decay, no clipping, lr 1e-4 for full fine-tuning, and the Gradual Pruning Schedule E=2,
k=8 over 15 epochs (Appendix B, Table 7; the authors' README uses k=10). The direction-sampling
temperature (5) is lslo's default: the authors' command does not state one.

Every preset carries the whole recipe, so that ``TrainArguments.from_preset(name)`` and
``lslo train --preset name`` state it whatever the dataclass defaults become.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from .config import LSLoConfig
from .model import apply_lslo, parameter_report
from .testing import m2m124_config

__all__ = [
    "PRESETS",
    "RECIPE",
    "RECIPE_LR",
    "RECIPE_TOKENS_PER_STEP",
    "Preset",
    "apply_model_overrides",
    "format_presets",
    "original_model_config",
    "preset_parameters",
    "resolve_mixed_precision",
    "tokens_per_step_warning",
]

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")

# The authors' recipe as TrainArguments fields (everything but the learning rate, which depends on the method).
RECIPE: dict[str, Any] = {
    "epochs": 15, "seed": 2, "warmup_updates": 1, "adam_betas": "0.9,0.98", "adam_eps": 1e-8, "weight_decay": 0.0,
    "clip_norm": 0.0, "label_smoothing": 0.2, "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
    "layerdrop": 0.0, "max_tokens": 4000, "update_freq": 4, "sampling_temperature": 5.0,
    "prune_start": 2, "prune_duration": 8,
}
# Peak learning rate per method (Section 6.2: 1e-4 for full fine-tuning, 3e-3 for LSLo).
RECIPE_LR: dict[str, float] = {"lslo": 3e-3, "weight-learning": 3e-3, "ft-all": 1e-4, "pretrain": 3e-3}
# --max-tokens 4000 x --update-freq 4 on one process: the global batch each optimizer step sees.
RECIPE_TOKENS_PER_STEP = RECIPE["max_tokens"] * RECIPE["update_freq"]


class Preset(NamedTuple):
    """A paper row: where it is printed, the TrainArguments fields it sets, #Params as the paper prints it."""

    row: str
    values: dict[str, Any]
    paper_params: str


def _row(row: str, paper_params: str, method: str = "lslo", **values) -> Preset:
    recipe = {**RECIPE, "lr": RECIPE_LR[method]} if method != "pretrain" else {}
    if method == "lslo":
        # The authors' initialisation and FFN adaptation, so that the parameter counts equal the paper's.
        values = {"init": "reference", "ffn": "reference", **values}
    return Preset(row, {**recipe, "method": method, **values}, paper_params)


def _gps(ranks: str, ratio: float, **more) -> dict[str, Any]:
    return {"ranks": ranks, "prune": f"H={ratio},M={ratio}", **more}


_L12 = {"languages": "lang12"}
_L30 = {"languages": "lang30"}
# The paper's rows (Tables 1-4, 8). "WL" = the paper's index plan (Weight Learning's result).
PRESETS: dict[str, Preset] = {
    "lang12-pretrain": _row("Table 1 'Pretrain' (zero-shot; evaluation only)", "-", "pretrain", **_L12),
    "lang12-ft-all": _row("Table 1 'Ft-all'", "615M", "ft-all", **_L12),
    "lang12-4-4-4": _row("Table 1 '4;4;4+WL'", "15.35M", **_L12, ranks="4;4;4"),
    "lang12-8-8-8": _row("Table 1 '8;8;8+WL'", "30.7M", **_L12, ranks="8;8;8"),
    "lang12-16-16-16": _row("Table 1 '16;16;16+WL'", "61.4M", **_L12, ranks="16;16;16"),
    "lang12-64-64-64": _row("Table 1 '64;64;64+WL'", "245.6M", **_L12, ranks="64;64;64"),
    "lang12-2-2-8": _row("Table 1 '2;2;8+WL'", "15.3M", **_L12, ranks="2;2;8"),
    **{f"lang12-2-2-8-gps{p}": _row(f"Table 1 '2;2;8+WL+GPS({p})'", "15.3M", **_L12, **_gps("2;2;8", p))
       for p in (0.1, 0.3, 0.5, 0.7, 0.9)},
    "lang12-2-2-16-gps0.9": _row("Table 1 '2;2;16+WL+GPS(0.9)'", "25.6M", **_L12, **_gps("2;2;16", 0.9)),
    "lang12-2-2-64-gps0.9": _row("Table 1 '2;2;64+WL+GPS(0.9)'", "86.9M", **_L12, **_gps("2;2;64", 0.9)),
    "lang12-src-gps0.9": _row("Table 3 '2;2;8+SRC+GPS(0.9)'", "15.3M", **_L12, index_plan="src", **_gps("2;2;8", 0.9)),
    "lang12-tgt-gps0.9": _row("Table 3 '2;2;8+TGT+GPS(0.9)'", "15.3M", **_L12, index_plan="tgt", **_gps("2;2;8", 0.9)),
    "lang12-attn-2-2-8-gps0.9": _row("Table 4 'Only attn 2;2;8+WL+GPS(0.9)'", "10.6M", **_L12, target_modules="attn",
                                     **_gps("2;2;8", 0.9)),
    "lang12-attn-2-2-16-gps0.9": _row("Table 4 'Only attn 2;2;16+WL+GPS(0.9)'", "17.7M", **_L12,
                                      target_modules="attn", **_gps("2;2;16", 0.9)),
    **{f"lang12-fc-2-2-{r}-gps0.9": _row(f"Table 4 'Only fc 2;2;{r}+WL+GPS(0.9)'", params, **_L12,
                                         target_modules="fc", **_gps(f"2;2;{r}", 0.9))
       for r, params in ((16, "7.7M"), (32, "14.1M"), (64, "26.7M"))},
    # Table 8: the pruning schedule's start E and duration k at 2;2;8+WL+GPS(0.9) (E=2, k=8 is Table 1's row).
    **{f"lang12-2-2-8-gps0.9-e{e}k{k}": _row(f"Table 8 'E={e},K={k}'", "15.3M", **_L12,
                                            **_gps("2;2;8", 0.9, prune_start=e, prune_duration=k))
       for e, k in ((2, 8), (5, 8), (7, 8), (2, 2), (7, 2))},
    "lang30-pretrain": _row("Table 2 'Pretrain' (zero-shot; evaluation only)", "-", "pretrain", **_L30),
    "lang30-ft-all": _row("Table 2 'Ft-all'", "615M", "ft-all", **_L30),
    "lang30-8-8-8-8": _row("Table 2 '8;8;8;8+WL'", "76.7M", **_L30, ranks="8;8;8;8"),
    "lang30-16-16-16-16": _row("Table 2 '16;16;16;16+WL'", "153.4M", **_L30, ranks="16;16;16;16"),
    "lang30-2-2-8-8-gps0.9": _row("Table 2 '2;2;8;8+WL+GPS(0.9)'", "46M", **_L30, **_gps("2;2;8;8", 0.9)),
}

# M2M-124 615M (flores101_mm100_615M): the 256k vocabulary gives the paper's 615M total.
_M2M124_VOCAB = 256206


@functools.cache
def preset_parameters(name: str) -> int | None:
    """Trainable parameters of a preset on M2M-124 615M as lslo counts them (shapes only, meta device).

    Returns:
        The count (``lslo.parameter_report(model)["total"]`` for LSLo, every parameter for
        ``ft-all``), or None for an evaluation-only row.
    """
    from transformers import M2M100ForConditionalGeneration  # deferred: transformers is slow to import

    values = PRESETS[name].values
    method = values["method"]
    if method == "pretrain":
        return None
    with torch.device("meta"):
        model = M2M100ForConditionalGeneration(m2m124_config(vocab_size=_M2M124_VOCAB))
    if method == "ft-all":
        return sum(p.numel() for p in model.parameters())
    config = LSLoConfig(languages=values["languages"], ranks=values["ranks"], target_modules=values.get("target_modules",
                        "all"), index_plan=values.get("index_plan", "paper"), ffn=values.get("ffn", "full"),
                        init=values.get("init", "lora"))
    apply_lslo(model, config)
    return parameter_report(model)["total"]


def _short(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.1f}M"


def format_presets(count: bool = True) -> str:
    """The table ``lslo train --list-presets`` prints: each preset's paper row, #Params as the paper
    prints it and as lslo counts it on M2M-124 615M (``count=False`` skips the counting), and its settings."""
    width = max(map(len, PRESETS))
    lines = [f"{'preset':<{width}}  {'paper':>7}  {'lslo':>7}  paper row / settings (besides the recipe)"]
    for name, preset in PRESETS.items():
        settings = ", ".join(f"{k}={v}" for k, v in preset.values.items()
                             if k != "languages" and (k not in RECIPE or RECIPE[k] != v) and k != "lr")
        counted = _short(preset_parameters(name)) if count else "?"
        lines.append(f"{name:<{width}}  {preset.paper_params:>7}  {counted:>7}  {preset.row}  [{settings}]")
    recipe = ", ".join(f"{k}={v}" for k, v in RECIPE.items())
    lines.append(f"every trained preset: lr 3e-3 (LSLo) / 1e-4 (ft-all), {recipe}")
    return "\n".join(lines)


# ------------------------------------------------------------ mixed precision
def _accelerate_config_precision() -> str | None:
    """``mixed_precision`` of accelerate's default config file (``accelerate config``), if one is there."""
    try:
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    except ImportError:  # an accelerate without the config command: no file to read
        return None
    if not os.path.isfile(default_config_file):
        return None
    try:
        value = getattr(load_config_from_file(default_config_file), "mixed_precision", None)
    except Exception:  # noqa: BLE001 (a damaged accelerate config is accelerate's to report; we fall back)
        return None
    return None if value is None else str(getattr(value, "value", value)).lower()


def resolve_mixed_precision(flag: str | None, cpu: bool, cuda: bool | None = None) -> tuple[str, str]:
    """The precision a run uses, and where it came from.

    An explicit ``--mixed-precision`` wins; then accelerate's ``ACCELERATE_MIXED_PRECISION`` (set by
    ``accelerate launch`` and by users) and accelerate's config file; then the authors' ``--amp``:
    bf16 on a GPU that supports it, fp16 on another GPU, fp32 ("no") on the CPU.

    Args:
        flag: ``TrainArguments.mixed_precision`` (None: not given).
        cpu: the run is forced onto the CPU (``--cpu``).
        cuda: whether a GPU is used (default: ``torch.cuda.is_available()``).

    Returns:
        ``(precision, source)``: precision in ``("no", "bf16", "fp16")``; source one of ``"flag"``,
        ``"ACCELERATE_MIXED_PRECISION"``, ``"accelerate config"``, ``"default"``.
    """
    found = [(flag, "flag"), (os.environ.get("ACCELERATE_MIXED_PRECISION"), "ACCELERATE_MIXED_PRECISION")]
    for value, source in found:
        if value:
            value = str(value).lower()
            if value not in MIXED_PRECISION_CHOICES:
                raise ValueError(f"mixed_precision ({source}) must be one of {MIXED_PRECISION_CHOICES}, got {value!r}")
            return value, source
    from_file = _accelerate_config_precision()
    if from_file in MIXED_PRECISION_CHOICES:
        return from_file, "accelerate config"
    on_gpu = (torch.cuda.is_available() if cuda is None else cuda) and not cpu
    if not on_gpu:
        return "no", "default"
    return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), "default"


def tokens_per_step_warning(max_tokens: int, update_freq: int, processes: int) -> str | None:
    """The warning a run prints once when processes x update_freq changes the recipe's global batch.

    Returns:
        The message, or None when ``processes * update_freq`` equals the recipe's update_freq (4).
    """
    product = processes * update_freq
    if product == RECIPE["update_freq"]:
        return None
    tokens = max_tokens * product
    advice = ""
    if RECIPE["update_freq"] % processes == 0:
        advice = f"; --update-freq {RECIPE['update_freq'] // processes} on {processes} process(es) keeps it"
    return (f"{processes} process(es) x --update-freq {update_freq} x --max-tokens {max_tokens} = {tokens} tokens per "
            f"optimizer step at most; the authors' recipe takes {RECIPE['update_freq']} batches a step "
            f"({RECIPE_TOKENS_PER_STEP} tokens at --max-tokens {RECIPE['max_tokens']}){advice}")


# ------------------------------------------------------- model-config overrides
def _dropout_modules(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, str]]:
    """(module, attribute, config key) for every float the M2M-100 modules copied from their config."""
    for module in model.modules():
        kind = type(module).__name__
        for attribute, key in (("dropout", "attention_dropout" if "Attention" in kind else "dropout"),
                               ("activation_dropout", "activation_dropout")):
            if isinstance(getattr(module, attribute, None), float):
                yield module, attribute, key
        if isinstance(getattr(module, "layerdrop", None), float):
            yield module, "layerdrop", "decoder_layerdrop" if "Decoder" in kind else "encoder_layerdrop"


def apply_model_overrides(model: torch.nn.Module, *, dropout: float, attention_dropout: float,
                          activation_dropout: float, layerdrop: float) -> dict[str, dict[str, float]]:
    """Set the recipe's dropouts and layer drop on a loaded model: its config and the floats its
    layers copied from the config when built (M2M-100 reads ``self.dropout`` & co. in forward).

    Returns:
        ``{config key: {"from": the config's value, "to": the value set}}`` for each key changed
        (what :func:`original_model_config` restores).
    """
    wanted = {"dropout": dropout, "attention_dropout": attention_dropout, "activation_dropout": activation_dropout,
              "encoder_layerdrop": layerdrop, "decoder_layerdrop": layerdrop}
    config = model.config
    overrides = {}
    for key, value in wanted.items():
        before = getattr(config, key, None)
        if before is None:
            continue
        if float(before) != float(value):
            overrides[key] = {"from": float(before), "to": float(value)}
        setattr(config, key, float(value))
    for module, attribute, key in _dropout_modules(model):
        if key in wanted:
            setattr(module, attribute, float(wanted[key]))
    return overrides


@contextlib.contextmanager
def original_model_config(model: torch.nn.Module, overrides: Mapping[str, Mapping[str, float]]):
    """Inside: ``model.config`` holds the values it had before :func:`apply_model_overrides` (what a
    saved full model should carry); the training values come back on exit. Layers are not touched."""
    config = model.config
    for key, change in overrides.items():
        setattr(config, key, change["from"])
    try:
        yield config
    finally:
        for key, change in overrides.items():
            setattr(config, key, change["to"])
