"""The training engine: many-to-many fine-tuning with LSLo (or all parameters), gradual pruning,
exact resume, one CPU to many GPUs.

Built on Hugging Face ``accelerate``: the same script runs on a CPU, one GPU, and several GPUs or
machines under ``accelerate launch -m lslo train ...`` / ``torchrun -m lslo train ...`` (DDP), with
mixed precision and gradient accumulation. The recipe's defaults are the authors' (fairseq
``translation_multi_simple_epoch``): label-smoothed cross-entropy 0.2, Adam (0.9, 0.98), inverse
square-root schedule, lr 3e-3 for LSLo and 1e-4 for ``ft-all``, 15 epochs, dropout 0.1.

One epoch = one pass of :func:`lslo.data.make_batches` (temperature-sampled directions, batches
to a token budget). An optimizer step consumes ``num_processes * update_freq`` consecutive
batches of that list: process ``r`` takes micro-batch ``u * num_processes + r`` of the step. A run
on P processes with update_freq U therefore takes exactly the steps of a run on one process with
update_freq ``P * U``. The pruning ratio of each language (Eq. 4) is applied at the start of every
epoch.

Checkpoints (each epoch, every ``save_every`` steps, and on SIGINT/SIGTERM) are directories written
as a whole (:func:`lslo.io.atomic_directory`): adapters and masks (safetensors), optimizer state
(``torch.save``, read back with ``weights_only=True``), RNG states, data position, pruning state and
the resolved arguments. ``--resume`` continues from the newest one exactly: same batches, same
dropout masks, same learning rate, so a resumed run ends with the adapters and losses of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import GROUP_ORDER, LSLoConfig
from .context import route
from .data import ShapeBuckets, pad_to_bucket
from .fast_step import compile_loss
from .io import atomic_directory, atomic_write_file, recover_directory
from .model import apply_lslo, load_adapters, load_base_model, model_fingerprint, save_adapters
from .pruning import gradual_pruning_ratio, prune, pruning_summary

__all__ = [
    "PRESETS",
    "EvalArguments",
    "TrainArguments",
    "TrainResult",
    "TrainingError",
    "evaluate_run",
    "inverse_sqrt_lr",
    "parse_prune_spec",
    "plot_training_curves",
    "train",
]

METHODS = ("lslo", "ft-all", "pretrain", "weight-learning")
_MIXED_PRECISION = ("no", "bf16", "fp16")
RUN_CONFIG_NAME = "run_config.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
_CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
# Fields that may change between a run and its resumption (how long, how often, where to report).
_RESUMABLE_FIELDS = frozenset({
    "resume", "overwrite", "max_steps", "save_every", "keep_last", "log_every", "epochs", "preset",
    "eval_every_epoch", "eval_sentences", "num_beams", "spm_model", "progress", "config",
})


class TrainingError(RuntimeError):
    """Training stopped for a reason the user should read (NaN loss, ...); the last good checkpoint stays."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: a checkpoint was written and the run stopped."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint: {checkpoint}")


# --------------------------------------------------------------------- presets
def _gps(ranks: str, ratio: float, **more) -> dict[str, Any]:
    return {"ranks": ranks, "prune": f"H={ratio},M={ratio}", **more}


# The paper's rows (Tables 1-4). LSLo rows use the authors' initialisation and FFN adaptation so that
# the parameter counts equal the paper's (lslo params --ffn reference). "WL" = the paper's index plan.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "lang12-pretrain": ("Table 1 'Pretrain' (zero-shot; evaluation only)", {"languages": "lang12", "method": "pretrain"}),
    "lang12-ft-all": ("Table 1 'Ft-all' (615M trainable, lr 1e-4)", {"languages": "lang12", "method": "ft-all"}),
    "lang12-4-4-4": ("Table 1 '4;4;4+WL'", {"languages": "lang12", "ranks": "4;4;4"}),
    "lang12-8-8-8": ("Table 1 '8;8;8+WL'", {"languages": "lang12", "ranks": "8;8;8"}),
    "lang12-16-16-16": ("Table 1 '16;16;16+WL'", {"languages": "lang12", "ranks": "16;16;16"}),
    "lang12-64-64-64": ("Table 1 '64;64;64+WL'", {"languages": "lang12", "ranks": "64;64;64"}),
    "lang12-2-2-8": ("Table 1 '2;2;8+WL'", {"languages": "lang12", "ranks": "2;2;8"}),
    **{f"lang12-2-2-8-gps{p}": (f"Table 1 '2;2;8+WL+GPS({p})'", {"languages": "lang12", **_gps("2;2;8", p)})
       for p in (0.1, 0.3, 0.5, 0.7, 0.9)},
    "lang12-2-2-16-gps0.9": ("Table 1 '2;2;16+WL+GPS(0.9)'", {"languages": "lang12", **_gps("2;2;16", 0.9)}),
    "lang12-2-2-64-gps0.9": ("Table 1 '2;2;64+WL+GPS(0.9)'", {"languages": "lang12", **_gps("2;2;64", 0.9)}),
    "lang12-src-gps0.9": ("Table 3 '2;2;8+SRC+GPS(0.9)'", {"languages": "lang12", "index_plan": "src", **_gps("2;2;8", 0.9)}),
    "lang12-tgt-gps0.9": ("Table 3 '2;2;8+TGT+GPS(0.9)'", {"languages": "lang12", "index_plan": "tgt", **_gps("2;2;8", 0.9)}),
    "lang12-attn-2-2-8-gps0.9": ("Table 4 'Only attn 2;2;8+WL+GPS(0.9)'",
                                 {"languages": "lang12", "target_modules": "attn", **_gps("2;2;8", 0.9)}),
    "lang12-attn-2-2-16-gps0.9": ("Table 4 'Only attn 2;2;16+WL+GPS(0.9)'",
                                  {"languages": "lang12", "target_modules": "attn", **_gps("2;2;16", 0.9)}),
    **{f"lang12-fc-2-2-{r}-gps0.9": (f"Table 4 'Only fc 2;2;{r}+WL+GPS(0.9)'",
                                     {"languages": "lang12", "target_modules": "fc", **_gps(f"2;2;{r}", 0.9)})
       for r in (16, 32, 64)},
    "lang30-pretrain": ("Table 2 'Pretrain' (zero-shot; evaluation only)", {"languages": "lang30", "method": "pretrain"}),
    "lang30-ft-all": ("Table 2 'Ft-all'", {"languages": "lang30", "method": "ft-all"}),
    "lang30-8-8-8-8": ("Table 2 '8;8;8;8+WL'", {"languages": "lang30", "ranks": "8;8;8;8"}),
    "lang30-16-16-16-16": ("Table 2 '16;16;16;16+WL'", {"languages": "lang30", "ranks": "16;16;16;16"}),
    "lang30-2-2-8-8-gps0.9": ("Table 2 '2;2;8;8+WL+GPS(0.9)'", {"languages": "lang30", **_gps("2;2;8;8", 0.9)}),
}
for _row, _values in PRESETS.values():
    if _values.get("method", "lslo") == "lslo":
        _values.setdefault("init", "reference")
        _values.setdefault("ffn", "reference")


def format_presets() -> str:
    """The table ``lslo train --list-presets`` prints."""
    width = max(map(len, PRESETS))
    lines = [f"{'preset':<{width}}  paper row / settings"]
    for name, (row, values) in PRESETS.items():
        settings = ", ".join(f"{k}={v}" for k, v in values.items() if k != "languages")
        lines.append(f"{name:<{width}}  {row}  [{settings}]")
    return "\n".join(lines)


# ------------------------------------------------------------------- arguments
def _help(text: str, **more) -> dict[str, Any]:
    return {"help": text, **more}


@dataclass
class TrainArguments:
    """Everything ``lslo train`` takes; each field is also the flag ``--field-name``.

    ``preset`` records a paper row's name; build such arguments with :meth:`from_preset`, which
    puts the row's settings under the ones given (the CLI does the same with --preset).
    """

    model: str = field(default="facebook/flores101_mm100_615M",
                       metadata=_help("base model: hub id or local folder (M2M-100 architecture)"))
    output_dir: str | None = field(default=None, metadata=_help("run folder: checkpoints, metrics, final adapters"))
    flores_dir: str | None = field(default=None, metadata=_help("FLORES-101/200 folder (dev/ trains, devtest/ evaluates)"))
    train_tsv: str | None = field(default=None, metadata=_help(
        "training pairs 'src_lang<TAB>tgt_lang<TAB>source<TAB>target' instead of FLORES dev"))
    languages: str | None = field(default=None, metadata=_help(
        "lang12, lang30, all, or comma-separated codes (default: lang12 on FLORES, the TSV's languages)"))
    method: str = field(default="lslo", metadata=_help(
        "lslo, ft-all (full fine-tuning), pretrain (evaluation only) or weight-learning (both routings mixed per "
        "layer, Eq. 5; see lslo learn-index)"))
    preset: str | None = field(default=None, metadata=_help("a paper row by name (see --list-presets)"))
    ranks: str | None = field(default=None, metadata=_help(
        "ranks per resource group present, H;M;L;V order ('2;2;8'), one int, or 'en=2,oc=8,H=2'"))
    groups: str | None = field(default=None, metadata=_help("resource groups of extra languages: 'xx=V,yy=H'"))
    prune: str | None = field(default=None, metadata=_help(
        "final pruning ratio per resource group or language: 'H=0.9,M=0.9' (Gradual Pruning Schedule)"))
    prune_pool: str = field(default="language", metadata=_help(
        "language (GPS: one L1 pool per language) or layer (one pool per encoder/decoder layer across languages: "
        "Intrinsic Subspace Estimation)"))
    prune_start: int = field(default=2, metadata=_help("E: last epoch without pruning"))
    prune_duration: int = field(default=8, metadata=_help("k: epochs over which pruning reaches its ratio"))
    target_modules: str = field(default="all", metadata=_help("all, attn, fc, names or a regex"))
    index_plan: str = field(default="paper", metadata=_help("paper, src, tgt, or a JSON plan file"))
    init: str = field(default="lora", metadata=_help("lora or reference (the authors' A initialisation)"))
    ffn: str = field(default="full", metadata=_help("full or reference (adapt only d_model units of fc1/fc2)"))
    epochs: int = field(default=15, metadata=_help("training epochs"))
    max_steps: int | None = field(default=None, metadata=_help("stop after this many optimizer steps"))
    save_every: int | None = field(default=None, metadata=_help("also checkpoint every N optimizer steps"))
    keep_last: int = field(default=2, metadata=_help("checkpoints kept"))
    seed: int = field(default=1, metadata=_help("random seed"))
    lr: float | None = field(default=None, metadata=_help("peak learning rate (default 3e-3 lslo, 1e-4 ft-all)"))
    warmup_updates: int = field(default=4000, metadata=_help("inverse-sqrt warm-up steps (fairseq's default)"))
    adam_betas: str = field(default="0.9,0.98", metadata=_help("Adam betas"))
    adam_eps: float = field(default=1e-8, metadata=_help("Adam epsilon"))
    weight_decay: float = field(default=0.0, metadata=_help("weight decay"))
    clip_norm: float = field(default=0.0, metadata=_help("gradient norm clipping (0 = off)"))
    label_smoothing: float = field(default=0.2, metadata=_help("label smoothing of the cross-entropy"))
    dropout: float = field(default=0.1, metadata=_help("dropout of the base model's layers"))
    max_tokens: int = field(default=4096, metadata=_help("token budget of a batch per process"))
    max_sentences: int | None = field(default=None, metadata=_help("sentences per batch at most"))
    pad_to_multiple: int | None = field(default=None, metadata=_help(
        "static batch shapes: pad both sides of a batch to a multiple of N tokens (with --compile: few shapes)"))
    length_buckets: str | None = field(default=None, metadata=_help(
        "static batch shapes: pad both sides to the first of these lengths that fits, e.g. '16,32,64,128'"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the forward, loss and backward (CUDA graphs on CUDA); see --pad-to-multiple"))
    max_length: int | None = field(default=256, metadata=_help("truncate sentences to this many tokens"))
    update_freq: int = field(default=1, metadata=_help("gradient accumulation: batches per optimizer step"))
    sampling_temperature: float = field(default=5.0, metadata=_help("temperature of direction sampling"))
    mixed_precision: str = field(default="no", metadata=_help("no, bf16 or fp16 (GPU)"))
    cpu: bool = field(default=False, metadata=_help("train on the CPU even when a GPU is present"))
    log_every: int = field(default=10, metadata=_help("steps between logged metrics"))
    eval_every_epoch: bool = field(default=False, metadata=_help("evaluate devtest after every epoch (Figure 3)"))
    eval_sentences: int | None = field(default=None, metadata=_help("sentences per direction in per-epoch evaluation"))
    num_beams: int = field(default=5, metadata=_help("beam size of evaluation"))
    spm_model: str | None = field(default=None, metadata=_help("FLORES-101 SentencePiece model for spBLEU"))
    resume: bool = field(default=False, metadata=_help("continue from the newest checkpoint in --output-dir"))
    overwrite: bool = field(default=False, metadata=_help("replace another run in --output-dir"))
    progress: bool = field(default=True, metadata=_help("progress bars"))
    config: str | None = field(default=None, metadata=_help("a toml/json/yaml file holding any of these fields"))

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; see `lslo train --list-presets`")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {self.mixed_precision!r}")
        for name in ("epochs", "keep_last", "max_tokens", "update_freq", "log_every", "num_beams", "warmup_updates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup_updates" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_steps", "save_every", "max_sentences", "max_length", "eval_sentences"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("label_smoothing", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.sampling_temperature, (int, float)) and self.sampling_temperature > 0):
            raise ValueError(f"sampling_temperature must be > 0, got {self.sampling_temperature!r}")
        self.betas()  # parse now: a bad value must fail before the model loads
        ShapeBuckets.parse(self.pad_to_multiple, self.length_buckets)  # likewise
        if self.method == "lslo" and self.prune:
            parse_prune_spec(self.prune)
        if self.prune_pool not in ("language", "layer"):
            raise ValueError(f"prune_pool must be 'language' or 'layer', got {self.prune_pool!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TrainArguments:
        """Arguments of a paper row, with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name][1], "preset": name, **overrides})

    def betas(self) -> tuple[float, float]:
        try:
            b1, b2 = (float(v) for v in str(self.adam_betas).strip("()[] ").split(","))
        except ValueError:
            raise ValueError(f"adam_betas must be two numbers 'b1,b2', got {self.adam_betas!r}") from None
        return b1, b2

    def peak_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1e-4 if self.method == "ft-all" else 3e-3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


# ----------------------------------------------------------------- schedule
def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """fairseq's ``inverse_sqrt``: linear warm-up from 0 to ``peak`` over ``warmup`` steps, then
    ``peak * sqrt(warmup / step)``. ``step`` counts optimizer steps from 1."""
    if warmup <= 0:
        return peak / math.sqrt(max(step, 1))
    if step <= warmup:
        return peak * step / warmup
    return peak * math.sqrt(warmup / step)


# ------------------------------------------------------------------ results
@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    global_step: int
    epochs_done: int
    metrics_path: Path
    stopped_early: bool = False
    scores: list[dict] | None = None


# ------------------------------------------------------------- small helpers
def _prepare_output_dir(args: TrainArguments, run_config: dict[str, Any], accelerator) -> Path:
    """Refuse a folder holding another run (or, with --resume, a run of another configuration), then
    record this run's configuration. Every process checks before the main one writes anything."""
    out = Path(args.output_dir)
    config_path = out / RUN_CONFIG_NAME
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} exists and is not a directory")
    holds_run = out.is_dir() and any(out.iterdir())
    if holds_run and not (args.resume or args.overwrite):
        raise ValueError(f"--output-dir {out} already holds another run; pass --resume to continue it or "
                         "--overwrite to replace it")
    if args.resume and holds_run:
        if not config_path.is_file():
            raise ValueError(f"--resume: {out} holds no {RUN_CONFIG_NAME}; it is not an lslo training run")
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--resume: {config_path} is damaged ({exc})") from None
        differing = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in run_config.items()
                     if k not in _RESUMABLE_FIELDS and saved.get(k) != v]
        if differing:
            raise ValueError(f"--resume: {out} was trained with a different configuration ({'; '.join(differing)})")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite and holds_run and not args.resume:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_file(str(config_path), lambda tmp: Path(tmp).write_text(json.dumps(run_config, indent=2)))
    accelerator.wait_for_everyone()
    return out


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in list(root.iterdir()):
        if child.name.startswith(".") and ".lslo-" in child.name:
            # Debris of a save killed before its swap: finish it or delete it (lslo.io decides).
            recover_directory(root / child.name[1:].split(".lslo-", 1)[0])
    for child in root.iterdir():
        match = _CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            recover_directory(child)  # cheap; a reader may meet a swap interrupted by a kill
            if (child / "trainer_state.json").is_file():
                found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _set_dropout(model: torch.nn.Module, p: float) -> None:
    # M2M-100 layers read `self.dropout` (a float, config.dropout) in forward; attention modules hold
    # their own `dropout` (config.attention_dropout), which this leaves alone.
    model.config.dropout = p
    for module in model.modules():
        if "Attention" not in type(module).__name__ and isinstance(getattr(module, "dropout", None), float):
            module.dropout = p


def _label_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss, nll, tokens): means over the non-padding target tokens.

    torch's ``label_smoothing``: (1 - eps) * nll + eps * mean over the vocabulary of -log p
    (fairseq spreads eps over V - 1 classes; the difference is eps / V, negligible at V >= 1000).
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    tokens = int((labels != -100).sum())
    loss = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=epsilon)
    with torch.no_grad():
        nll = F.cross_entropy(logits, labels, ignore_index=-100) if epsilon else loss.detach()
    return loss, nll, tokens


class _MetricsLog:
    """``metrics.jsonl`` (main process) and, when installed, TensorBoard."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            # Drop what was logged after the checkpoint: the resumed run logs those steps again.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if _parsed_step(line) is not None and _parsed_step(line) <= resume_step]
            atomic_write_file(str(path), lambda tmp: Path(tmp).write_text("".join(f"{k}\n" for k in kept)))
        elif resume_step is None and path.exists():
            path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # noqa: BLE001 (tensorboard is optional; any import problem means "not installed")
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = record.get("type", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record.get("step", 0))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _parsed_step(line: str) -> int | None:
    # A kill -9 can leave a torn last line: it is not a record, and the resumed run rewrites it.
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


class _SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and stops. A second
    signal restores the default behaviour (a second Ctrl-C kills at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, signals behave as usual
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------- the engine
class _Run:
    """State of one training run; methods are the stages of :func:`train`."""

    def __init__(self, args: TrainArguments):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.args = args
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        set_seed(args.seed)
        self.buckets = ShapeBuckets.parse(args.pad_to_multiple, args.length_buckets)
        shapes = self.buckets.max_shapes(args.max_length) if self.buckets is not None else None
        self.compiled_loss = compile_loss(self.accelerator.device, max_shapes=shapes) if args.compile else None

    # ---- set-up
    def load(self) -> None:
        from transformers import AutoTokenizer

        from . import data

        args = self.args
        if args.flores_dir is None and args.train_tsv is None:
            raise ValueError("give --flores-dir (FLORES-101 dev/devtest) or --train-tsv (your own pairs)")
        if args.output_dir is None:
            raise ValueError("--output-dir is required")
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        # Data first: a missing file or an unknown code must fail before the model loads.
        if args.train_tsv is not None:
            examples = data.read_tsv_corpus(args.train_tsv)
            codes = list(dict.fromkeys(c for e in examples for c in (e.src_lang, e.tgt_lang)))
            languages = data.resolve_languages(args.languages or ",".join(codes), tokenizer=self.tokenizer)
            unknown = sorted(set(codes) - set(languages))
            if unknown:
                raise ValueError(f"{args.train_tsv} holds languages {unknown} that are not in --languages {list(languages)}")
        else:
            languages = data.resolve_languages(args.languages or "lang12", tokenizer=self.tokenizer,
                                               flores_dir=args.flores_dir)
            examples = None
        self.languages = tuple(languages)
        self.devtest = None
        if args.flores_dir is not None:
            # Read now, so that a missing file or a line-count mismatch fails before training; kept for evaluation.
            self.devtest = data.load_flores(args.flores_dir, self.languages, "devtest")
        self.lslo_config = None
        # Weight Learning (lslo.analysis.learn_index): LSLo's config, injected as dual-routing layers.
        self.weight_learning = args.method == "weight-learning"
        if self.weight_learning and args.prune:
            raise ValueError("--prune does not apply to --method weight-learning (it learns the index plan)")
        if args.method in ("lslo", "weight-learning"):
            groups = _parse_mapping(args.groups, "--groups") or None
            ranks = _parse_ranks(args.ranks)
            kwargs = {"ranks": ranks} if ranks is not None else {}
            self.lslo_config = LSLoConfig(languages=list(self.languages), groups=groups, target_modules=args.target_modules,
                                          index_plan=_load_index_plan(args.index_plan), init=args.init, ffn=args.ffn, **kwargs)
            self.prune_targets = language_prune_targets(self.lslo_config, args.prune)
        elif args.prune:
            raise ValueError(f"--prune applies to LSLo adapters; method {args.method!r} has none")
        else:
            self.prune_targets = {}

        self.run_config = {**args.to_dict(), "languages": list(self.languages)}
        self.output_dir = _prepare_output_dir(args, self.run_config, self.accelerator)
        if args.method == "pretrain":
            self.corpus = None
        elif examples is not None:
            self.corpus = data.encode_examples(self.tokenizer, examples, max_length=args.max_length)
        else:
            self.corpus = data.flores_corpus(self.tokenizer, args.flores_dir, self.languages, "dev",
                                             max_length=args.max_length)

        model = load_base_model(args.model)
        model.float()
        _set_dropout(model, args.dropout)
        if self.weight_learning:
            from .model import apply_weight_learning

            apply_weight_learning(model, self.lslo_config)
        elif self.lslo_config is not None:
            apply_lslo(model, self.lslo_config)
        elif args.method == "ft-all":
            for p in model.parameters():
                p.requires_grad_(True)
        self.model = model
        self.fingerprint = model_fingerprint(model)

    def save_trained(self, model: torch.nn.Module, directory: Path) -> None:
        """The adapters (or, for weight-learning, both routings and the mixing logits) into ``directory``."""
        if self.weight_learning:
            from .analysis import save_weight_learning

            save_weight_learning(model, directory)
        else:
            save_adapters(model, directory)

    def load_trained(self, model: torch.nn.Module, directory: Path) -> None:
        if self.weight_learning:
            from .analysis import load_weight_learning

            load_weight_learning(model, directory)
        else:
            load_adapters(model, directory)

    def build_optimizer(self) -> None:
        args = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=args.peak_lr(), betas=args.betas(), eps=args.adam_eps,
                                     weight_decay=args.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.trainable = params

    # ---- checkpoints
    def save_checkpoint(self, state: dict[str, Any]) -> Path | None:
        """Write ``checkpoints/step-N`` as a whole (main process), every process's RNG included."""
        from accelerate.utils import gather_object
        from safetensors.torch import save_file

        rng_states = gather_object([_rng_state()])
        path = self.output_dir / CHECKPOINTS_DIR / f"step-{state['global_step']:08d}"
        if self.is_main:
            model = self.accelerator.unwrap_model(self.model)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_directory(path) as tmp:
                tmp = Path(tmp)
                if self.lslo_config is not None:
                    self.save_trained(model, tmp / "adapters")
                else:
                    model.save_pretrained(tmp / "model", safe_serialization=True)
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                tensors = {}
                python_states = []
                for rank, rng in enumerate(rng_states):
                    tensors[f"torch.{rank}"] = rng["torch"].contiguous()
                    for device, cuda_state in enumerate(rng.get("cuda", [])):
                        tensors[f"cuda.{rank}.{device}"] = cuda_state.contiguous()
                    python_states.append(rng["python"])
                save_file(tensors, str(tmp / "rng.safetensors"))
                scaler = getattr(self.accelerator, "scaler", None)
                record = {**state, "python_rng": python_states, "world_size": self.world,
                          "scaler": scaler.state_dict() if scaler is not None else None,
                          "run_config": self.run_config}
                (tmp / "trainer_state.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
            for old in list_checkpoints(self.output_dir)[: -self.args.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if state.get("world_size") != self.world:
            raise ValueError(f"--resume: {path} was written by {state.get('world_size')} processes, this run has "
                             f"{self.world}; resume with the same number of processes")
        model = self.accelerator.unwrap_model(self.model)
        if self.lslo_config is not None:
            self.load_trained(model, path / "adapters")
        else:
            from safetensors.torch import load_model

            files = sorted((path / "model").glob("*.safetensors"))
            if len(files) != 1:
                raise ValueError(f"--resume: {path / 'model'} should hold one safetensors file, found {len(files)}")
            load_model(model, str(files[0]), strict=False)
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(optimizer_state)
        rank = self.accelerator.process_index
        tensors = load_file(str(path / "rng.safetensors"))
        rng = {"python": state["python_rng"][rank], "torch": tensors[f"torch.{rank}"]}
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith(f"cuda.{rank}."))]
        if cuda:
            rng["cuda"] = cuda
        self._resume_rng = rng
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return state

    # ---- one epoch
    def _micro_batches(self, batches: list[list[int]], step_in_epoch: int) -> list[list[int]]:
        per_step = self.world * self.args.update_freq
        start = step_in_epoch * per_step
        step_batches = batches[start : start + per_step]
        rank = self.accelerator.process_index
        return [step_batches[u * self.world + rank] for u in range(self.args.update_freq)]

    def _forward_loss(self, indices: list[int]):
        from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right

        from .data import collate

        batch = collate(self.corpus, indices, pad_token_id=self.tokenizer.pad_token_id, languages=self.languages)
        if self.buckets is not None:  # --pad-to-multiple / --length-buckets
            batch = pad_to_bucket(batch, self.buckets, self.tokenizer.pad_token_id)
        device = self.accelerator.device
        batch = {k: v.to(device) for k, v in batch.items()}
        config = self.accelerator.unwrap_model(self.model).config
        decoder_input_ids = shift_tokens_right(batch["labels"], config.pad_token_id, config.decoder_start_token_id)
        if self.compiled_loss is not None:  # --compile: lslo.fast_step
            with self.accelerator.autocast():
                loss, nll = self.compiled_loss(self.model, batch["input_ids"], batch["attention_mask"],
                                               decoder_input_ids, batch["labels"], batch["src_lang_ids"],
                                               batch["tgt_lang_ids"], self.args.label_smoothing)
            return loss, nll, int((batch["labels"] != -100).sum()), batch
        with route(src=batch["src_lang_ids"], tgt=batch["tgt_lang_ids"]), self.accelerator.autocast():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                decoder_input_ids=decoder_input_ids).logits
            loss, nll, tokens = _label_smoothed_loss(logits, batch["labels"], self.args.label_smoothing)
        return loss, nll, tokens, batch

    def train_step(self, micro_batches: list[list[int]], step: int) -> dict[str, float]:
        """One optimizer step (number ``step``, from 1) over this process's micro-batches."""
        update_freq = len(micro_batches)
        lr = inverse_sqrt_lr(step, self.args.peak_lr(), self.args.warmup_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros(4, dtype=torch.float64, device=self.accelerator.device)  # loss, nll, tokens, sentences
        for u, indices in enumerate(micro_batches):
            last = u == update_freq - 1
            context = self.accelerator.no_sync(self.model) if not last else contextlib.nullcontext()
            with context:
                loss, nll, tokens, batch = self._forward_loss(indices)
                # Gloo/NCCL average gradients over processes; each micro-batch is a mean over its tokens,
                # so the step's gradient is the mean over its world * update_freq micro-batches.
                with route(src=batch["src_lang_ids"], tgt=batch["tgt_lang_ids"]):
                    self.accelerator.backward(loss / update_freq)
            total += torch.tensor([float(loss.detach()), float(nll), tokens, len(indices)], dtype=torch.float64,
                                  device=total.device)
        if self.args.clip_norm > 0:
            self.accelerator.clip_grad_norm_(self.trainable, self.args.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = self.accelerator.reduce(total, reduction="sum")
        micro = update_freq * self.world
        return {"loss": float(total[0]) / micro, "nll": float(total[1]) / micro,
                "tokens": int(total[2]), "sentences": int(total[3]), "lr": lr}

    def apply_pruning(self, epoch: int) -> dict[str, float]:
        if not self.prune_targets:
            return {}
        args = self.args
        ratios = {code: gradual_pruning_ratio(epoch, target, start=args.prune_start, duration=args.prune_duration)
                  for code, target in self.prune_targets.items()}
        model = self.accelerator.unwrap_model(self.model)
        # The torch optimizer under accelerate's wrapper: prune() zeroes its moments at pruned entries.
        prune(model, ratios, pool=args.prune_pool, optimizer=getattr(self.optimizer, "optimizer", self.optimizer))
        return ratios


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "tokens": 0, "steps": 0}


def _load_index_plan(value: str):
    """``--index-plan``: a preset name or a JSON file written by Weight Learning."""
    if value and (value.endswith(".json") or os.path.sep in value):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"--index-plan file {path} does not exist")
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--index-plan file {path} is not valid JSON ({exc})") from None
        return plan.get("index_plan", plan) if isinstance(plan, dict) else plan
    return value


def _group_means(rows: Sequence[Mapping[str, Any]], config_group_of) -> dict[str, float]:
    from .evaluate import group_table

    out = {}
    for metric in ("spbleu", "chrf++", "bleu"):
        if rows and all(r.get(metric) is not None for r in rows):
            table = group_table(rows, metric=metric, group_of=config_group_of)
            for column, value in table["scores"].items():
                out[f"{metric}/{column}"] = value
    return out


def _group_of_for(languages: Sequence[str], groups_text: str | None):
    config = LSLoConfig(languages=list(languages), groups=_parse_mapping(groups_text, "--groups") or None, ranks=1)
    return config.group_of


def train(args: TrainArguments) -> TrainResult:
    """Run (or resume) a training run described by ``args``; see the module docstring.

    Returns:
        A :class:`TrainResult`; ``final_dir`` holds the adapters (LSLo, loadable with
        :func:`lslo.load_adapters` and ``lslo translate --adapters``) or the full model (ft-all,
        ``save_pretrained``). Raises :class:`Interrupted` after a SIGINT/SIGTERM checkpoint and
        :class:`TrainingError` on a non-finite loss.
    """
    from tqdm.auto import tqdm

    from .data import make_batches

    run = _Run(args)
    run.load()
    if args.method == "pretrain":
        return _pretrain_only(run)
    run.build_optimizer()
    accelerator = run.accelerator

    # The whole position of a run; saved in every checkpoint. epoch_sums: the running epoch's totals,
    # so that an epoch resumed mid-way logs the same epoch loss as an uninterrupted one.
    state = {"epoch": 1, "step_in_epoch": 0, "global_step": 0, "pruning": {}, "pruned_epoch": 0,
             "epoch_sums": _zero_sums()}
    resume_step = None
    last_checkpoint = None
    if args.resume:
        checkpoints = list_checkpoints(run.output_dir)
        resume_step = 0
        if checkpoints:
            last_checkpoint = checkpoints[-1]
            loaded = run.load_checkpoint(last_checkpoint)
            state = {k: loaded[k] for k in state}
            resume_step = state["global_step"]
            if run.is_main:
                print(f"[lslo] resuming from {last_checkpoint} (epoch {state['epoch']}, step {state['global_step']})")
    log = _MetricsLog(run.output_dir / METRICS_NAME, run.is_main, resume_step)
    group_of = _group_of_for(run.languages, args.groups)
    eval_refs = None
    if args.eval_every_epoch:
        if args.flores_dir is None:
            raise ValueError("--eval-every-epoch evaluates FLORES devtest: give --flores-dir")
        eval_refs = run.devtest
        if not resume_step:  # Figure 3's dashed line: the model before fine-tuning
            log.write({"type": "epoch", "epoch": 0, "step": 0, **_epoch_eval(run, eval_refs, group_of, 0)})

    if getattr(run, "_resume_rng", None) is not None:
        _set_rng_state(run._resume_rng)
    run.model.train()
    stopped_early = False
    with _SignalFlag() as flag:
        epoch = state["epoch"]
        while epoch <= args.epochs:
            batches = make_batches(run.corpus, max_tokens=args.max_tokens, epoch=epoch, seed=args.seed,
                                   temperature=args.sampling_temperature, max_sentences=args.max_sentences,
                                   buckets=run.buckets)
            steps_in_epoch = len(batches) // (run.world * args.update_freq)
            if steps_in_epoch == 0:
                raise ValueError(f"epoch {epoch} has {len(batches)} batches, fewer than processes x update_freq = "
                                 f"{run.world * args.update_freq}: lower --max-tokens or --update-freq")
            if state["pruned_epoch"] < epoch:
                state["pruning"] = run.apply_pruning(epoch)
                state["pruned_epoch"] = epoch
                if state["pruning"]:
                    log.write({"type": "pruning", "epoch": epoch, "step": state["global_step"], **{
                        f"ratio/{k}": v for k, v in state["pruning"].items()}})
            bar = tqdm(total=steps_in_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch}/{args.epochs}",
                       unit="step", disable=not (run.is_main and args.progress), dynamic_ncols=True)
            epoch_start = time.perf_counter()
            while state["step_in_epoch"] < steps_in_epoch:
                if args.max_steps is not None and state["global_step"] >= args.max_steps:
                    stopped_early = True
                    break
                step_start = time.perf_counter()
                metrics = run.train_step(run._micro_batches(batches, state["step_in_epoch"]), state["global_step"] + 1)
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                step = state["global_step"]
                if not math.isfinite(metrics["loss"]):
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
                    raise TrainingError(f"loss is {metrics['loss']} at step {step} (epoch {epoch}); training stopped, {where}")
                sums = state["epoch_sums"]
                sums["loss"] += metrics["loss"]
                sums["tokens"] += metrics["tokens"]
                sums["steps"] += 1
                if step % args.log_every == 0 or state["step_in_epoch"] == steps_in_epoch:
                    elapsed = time.perf_counter() - step_start
                    log.write({"type": "train", "step": step, "epoch": epoch, **metrics,
                               "tokens_per_s": metrics["tokens"] / elapsed if elapsed > 0 else None})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
                signalled = _any_process(accelerator, flag.signum is not None)
                if signalled or (args.save_every and step % args.save_every == 0):
                    last_checkpoint = run.save_checkpoint({**state, "epoch": epoch})
                if signalled:
                    bar.close()
                    log.close()
                    raise Interrupted(flag.signum or signal.SIGTERM, last_checkpoint)
            bar.close()
            if stopped_early:
                break
            elapsed = time.perf_counter() - epoch_start
            sums = state["epoch_sums"]
            record = {"type": "epoch", "epoch": epoch, "step": state["global_step"],
                      "loss": sums["loss"] / max(sums["steps"], 1), "tokens": sums["tokens"],
                      "seconds": elapsed, "tokens_per_s": sums["tokens"] / elapsed if elapsed > 0 else None,
                      **{f"pruned/{k}": v for k, v in _pruned(run).items()}}
            if eval_refs is not None:
                record.update(_epoch_eval(run, eval_refs, group_of, epoch))
            log.write(record)
            if eval_refs is not None and run.is_main:
                plot_training_curves(run.output_dir / METRICS_NAME, run.output_dir / CURVES_NAME)
            epoch += 1
            state = {**state, "epoch": epoch, "step_in_epoch": 0, "epoch_sums": _zero_sums()}
            last_checkpoint = run.save_checkpoint(state)

    final_dir = run.output_dir / FINAL_DIR
    if run.is_main:
        model = accelerator.unwrap_model(run.model)
        if run.lslo_config is not None:
            run.save_trained(model, final_dir)
        else:
            with atomic_directory(final_dir) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                run.tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    log.close()
    return TrainResult(run.output_dir, final_dir, state["global_step"], state["epoch"] - 1,
                       run.output_dir / METRICS_NAME, stopped_early)


def _epoch_eval(run: _Run, references, group_of, epoch: int) -> dict[str, float]:
    """Evaluate devtest (the --eval-sentences subset) now; per-direction scores to eval/epoch-NNN.*."""
    from .evaluate import write_scores

    rows = _evaluate_model(run, references, run.args.eval_sentences, group_of)
    if run.is_main:
        write_scores(rows, run.output_dir / "eval", name=f"epoch-{epoch:03d}", group_of=group_of,
                     metadata={"epoch": epoch, "eval_sentences": run.args.eval_sentences})
    run.model.train()
    return _group_means(rows, group_of)


def plot_training_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike, *, system: str | None = None,
                         groups: Sequence[str] = ("H2H", "V2V")):
    """Figure 3 from a run's ``metrics.jsonl``: per-epoch group scores, epoch 0 (the model before
    fine-tuning) as the dashed "Pretrain" line. Uses spBLEU when it was measured, else chrF++.

    Returns:
        The figure, or None when the log holds no evaluated epoch.
    """
    from .evaluate import plot_epoch_curves

    records = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines()
               if _parsed_step(line) is not None]
    epochs = {r["epoch"]: r for r in records if r.get("type") == "epoch"}
    metric = "spbleu" if any(k.startswith("spbleu/") for r in epochs.values() for k in r) else "chrf++"
    scores = {e: {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(metric + "/")} for e, r in epochs.items()}
    trained = {e: s for e, s in scores.items() if e >= 1 and s}
    if not trained:
        return None
    available = set().union(*trained.values())
    panels = [g for g in groups if g in available] or sorted(available)[:2]
    name = system or Path(metrics_path).resolve().parent.name
    return plot_epoch_curves({name: trained}, out_png, groups=panels, metric=metric, pretrained=scores.get(0) or None,
                             title=f"{name}: devtest score per epoch")


def _pruned(run: _Run) -> dict[str, float]:
    if run.lslo_config is None or run.weight_learning:
        return {}
    return pruning_summary(run.accelerator.unwrap_model(run.model))


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _evaluate_model(run: _Run, references, max_sentences, group_of):
    from .evaluate import Scorer, evaluate

    directions = [(s, t) for s in run.languages for t in run.languages if s != t]
    model = run.accelerator.unwrap_model(run.model)
    return evaluate(model, run.tokenizer, references, directions, num_beams=run.args.num_beams,
                    max_sentences=max_sentences, scorer=Scorer(run.args.spm_model), accelerator=run.accelerator,
                    progress=run.is_main and run.args.progress, group_of=group_of)


def _pretrain_only(run: _Run) -> TrainResult:
    """method "pretrain": the zero-shot system. Nothing trains; devtest is evaluated when FLORES is given."""
    args = run.args
    log = _MetricsLog(run.output_dir / METRICS_NAME, run.is_main, None)
    scores = None
    if args.flores_dir is not None:
        references = run.devtest
        group_of = _group_of_for(run.languages, args.groups)
        scores = _evaluate_model(run, references, args.eval_sentences, group_of)
        log.write({"type": "epoch", "epoch": 0, "step": 0, **_group_means(scores, group_of)})
    log.close()
    return TrainResult(run.output_dir, None, 0, 0, run.output_dir / METRICS_NAME, scores=scores)


# ------------------------------------------------------------------ lslo eval
@dataclass
class EvalArguments:
    """Everything ``lslo eval`` takes."""

    model: str = field(default="facebook/flores101_mm100_615M", metadata=_help("base model: hub id or folder"))
    adapters: str | None = field(default=None, metadata=_help("adapter folder (lslo train's <output-dir>/final)"))
    flores_dir: str | None = field(default=None, metadata=_help("FLORES-101/200 folder"))
    split: str = field(default="devtest", metadata=_help("dev or devtest"))
    languages: str | None = field(default=None, metadata=_help("languages (default: the adapters', else lang12)"))
    groups: str | None = field(default=None, metadata=_help("resource groups of extra languages: 'xx=V'"))
    num_beams: int = field(default=5, metadata=_help("beam size"))
    batch_size: int = field(default=32, metadata=_help("sentences per generate call"))
    max_new_tokens: int = field(default=256, metadata=_help("generated tokens at most"))
    eval_sentences: int | None = field(default=None, metadata=_help("first N sentences of each direction only"))
    spm_model: str | None = field(default=None, metadata=_help("FLORES-101 SentencePiece model (spBLEU)"))
    output_dir: str | None = field(default=None, metadata=_help("where scores go (default: <adapters>/eval)"))
    name: str | None = field(default=None, metadata=_help("system name in the table"))
    cpu: bool = field(default=False, metadata=_help("evaluate on the CPU even when a GPU is present"))
    progress: bool = field(default=True, metadata=_help("progress bars"))


def evaluate_run(args: EvalArguments) -> dict[str, Any]:
    """Translate a FLORES split with (or without) adapters, score every direction, write CSV/JSON.

    Returns:
        ``{"rows": per-direction rows, "table": the printed table, "files": written paths}``.
    """
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from . import data
    from .evaluate import Scorer, evaluate, format_table, write_scores
    from .model import read_adapter_config

    if args.flores_dir is None:
        raise ValueError("--flores-dir is required")
    if args.split not in data.FLORES_SPLITS:
        raise ValueError(f"--split must be one of {data.FLORES_SPLITS}, got {args.split!r}")
    accelerator = Accelerator(cpu=args.cpu)
    scorer = Scorer(args.spm_model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    adapter_config = read_adapter_config(args.adapters)[0] if args.adapters else None
    spec = args.languages or (",".join(adapter_config.languages) if adapter_config else "lang12")
    languages = data.resolve_languages(spec, tokenizer=tokenizer, flores_dir=args.flores_dir)
    if adapter_config is not None:
        missing = [c for c in languages if c not in adapter_config.languages]
        if missing:
            raise ValueError(f"the adapters in {args.adapters} have no adapters for {missing}")
    references = data.load_flores(args.flores_dir, languages, args.split)
    model = load_base_model(args.model, device=accelerator.device)
    if args.adapters:
        load_adapters(model, args.adapters)
    group_of = (adapter_config.group_of if adapter_config is not None and not args.groups
                else _group_of_for(languages, args.groups))
    directions = data.all_directions(languages)
    rows = evaluate(model, tokenizer, references, directions, num_beams=args.num_beams, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, max_sentences=args.eval_sentences, scorer=scorer,
                    accelerator=accelerator, progress=args.progress and accelerator.is_main_process, group_of=group_of)
    name = args.name or (Path(args.adapters).resolve().parent.name if args.adapters else "pretrain")
    out = Path(args.output_dir) if args.output_dir else (Path(args.adapters) / "eval" if args.adapters else Path("runs/eval"))
    files = {}
    params = None
    if adapter_config is not None:
        from .model import parameter_report

        params = {name: parameter_report(model)["total"]}
    table = format_table({name: rows}, params=params, group_of=group_of, style="plain")
    if accelerator.is_main_process:
        files = write_scores(rows, out, name=f"scores_{args.split}", scorer=scorer,
                             metadata={"model": args.model, "adapters": args.adapters, "split": args.split,
                                       "num_beams": args.num_beams, "eval_sentences": args.eval_sentences},
                             group_of=group_of)
    return {"rows": rows, "table": table, "files": files, "spbleu": scorer.has_spbleu}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A run configuration from ``.toml``, ``.json`` or ``.yaml``/``.yml``: field names (``max_tokens``
    or ``max-tokens``) -> values."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"--config {path}: use a .toml, .json or .yaml file")
    except ValueError as exc:
        if str(exc).startswith("--config"):
            raise
        raise ValueError(f"--config {path} is not valid {path.suffix[1:]} ({exc})") from None
    if not isinstance(data, dict):
        raise TypeError(f"--config {path} must hold a table of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TrainArguments)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown setting {key!r}")
        out[name] = value
    return out
