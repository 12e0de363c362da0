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
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .card import write_model_card
from .checkpoints import (
    LOCK_NAME,
    CheckpointError,
    RunLock,
    base_model_fingerprint,
    data_fingerprint,
    fingerprint_differences,
    loading,
    read_trainer_state,
    rng_of_rank,
    safetensors_error,
    save_error_message,
    tree_size,
    verify_checkpoint,
    write_manifest,
)
from .config import LSLoConfig
from .context import route
from .data import ShapeBuckets, pad_to_bucket
from .distributed import Heartbeat, distributed_setup, is_collective_timeout
from .fast_step import compile_loss, smoothed_losses
from .io import atomic_directory, atomic_write_file, recover_directory
from .methods import (
    TrainingMethod,
    _load_index_plan,  # noqa: F401 (lslo.train._load_index_plan: read by the analyses' tests)
    _parse_mapping,
    _parse_ranks,  # noqa: F401 (as above)
    get_method,
    language_prune_targets,
    parse_prune_spec,
)
from .model import load_adapters, load_base_model, model_fingerprint, resolve_adapter_base
from .recipe import (
    MIXED_PRECISION_CHOICES,
    PRESETS,
    RECIPE,
    apply_model_overrides,
    format_presets,
    resolve_mixed_precision,
    tokens_per_step_warning,
)

__all__ = [
    "PRESETS",
    "EvalArguments",
    "RecipeWarning",
    "TrainArguments",
    "TrainResult",
    "TrainingError",
    "dry_run",
    "evaluate_run",
    "format_presets",
    "forward_loss",
    "inverse_sqrt_lr",
    "language_prune_targets",
    "parse_prune_spec",
    "plot_run_curves",
    "plot_training_curves",
    "train",
    "train_step",
]

DEFAULT_BASE_MODEL = "facebook/flores101_mm100_615M"
RUN_CONFIG_NAME = "run_config.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
_CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
# Fields that may change between a run and its resumption (how long, how often, where to report).
# What run_config.json holds besides the TrainArguments fields: derived from them (and the data), so a
# resume does not compare them on their own (optimizer_steps follows epochs and max_steps).
_PLAN_KEYS = ("processes", "mixed_precision_source", "trainable_parameters", "batches_per_epoch", "optimizer_steps",
              "tokens_per_optimizer_step", "model_config_overrides")
_RESUMABLE_FIELDS = frozenset({
    "resume", "overwrite", "max_steps", "save_every", "keep_last", "log_every", "epochs", "preset",
    "eval_every_epoch", "eval_sentences", "num_beams", "spm_model", "progress", "config",
    "resume_or_start", "allow_data_change", "reshard", "ddp_timeout",
}) | frozenset(_PLAN_KEYS)
# Where things are, not what they are: a run folder, its model and its data may move. The model and
# the data are compared by their fingerprints (run_config["fingerprints"]) instead.
_LOCATION_FIELDS = frozenset({"output_dir", "model", "flores_dir", "train_tsv"})


class RecipeWarning(UserWarning):
    """A setting takes the run away from the authors' recipe in a way that is easy to miss."""


class TrainingError(RuntimeError):
    """Training stopped for a reason the user should read (NaN loss, ...); the last good checkpoint stays."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: a checkpoint was written and the run stopped."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint: {checkpoint}")


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
    prune_start: int = field(default=RECIPE["prune_start"], metadata=_help(
        "E: last epoch without pruning (the paper's Appendix B, Table 7: E=2)"))
    prune_duration: int = field(default=RECIPE["prune_duration"], metadata=_help(
        "k: epochs over which pruning reaches its ratio (the paper's Appendix B, Table 7: k=8; the authors' README "
        "command uses k=10)"))
    target_modules: str = field(default="all", metadata=_help("all, attn, fc, names or a regex"))
    index_plan: str = field(default="paper", metadata=_help("paper, src, tgt, or a JSON plan file"))
    init: str = field(default="lora", metadata=_help("lora or reference (the authors' A initialisation)"))
    ffn: str = field(default="full", metadata=_help("full or reference (adapt only d_model units of fc1/fc2)"))
    epochs: int = field(default=RECIPE["epochs"], metadata=_help("training epochs (the paper's Section 6.2; the "
                                                                 "authors' --max-epoch 15)"))
    max_steps: int | None = field(default=None, metadata=_help("stop after this many optimizer steps"))
    save_every: int | None = field(default=None, metadata=_help("also checkpoint every N optimizer steps"))
    keep_last: int = field(default=2, metadata=_help("checkpoints kept"))
    seed: int = field(default=RECIPE["seed"], metadata=_help("random seed (the authors' --seed 2)"))
    lr: float | None = field(default=None, metadata=_help(
        "peak learning rate (default: the method's, the paper's Section 6.2: 3e-3 lslo and weight-learning, "
        "1e-4 ft-all)"))
    warmup_updates: int = field(default=RECIPE["warmup_updates"], metadata=_help(
        "inverse-sqrt warm-up steps (the authors' --warmup-updates 1: lr / sqrt(step) from the first step)"))
    adam_betas: str = field(default=RECIPE["adam_betas"], metadata=_help("Adam betas (the recipe's (0.9, 0.98))"))
    adam_eps: float = field(default=RECIPE["adam_eps"], metadata=_help("Adam epsilon (fairseq's default 1e-8)"))
    weight_decay: float = field(default=RECIPE["weight_decay"], metadata=_help(
        "weight decay (the authors set none: fairseq's default 0)"))
    clip_norm: float = field(default=RECIPE["clip_norm"], metadata=_help(
        "gradient norm clipping, 0 = off (the authors set none: fairseq's default 0)"))
    label_smoothing: float = field(default=RECIPE["label_smoothing"], metadata=_help(
        "label smoothing of the cross-entropy (the authors' --label-smoothing 0.2)"))
    dropout: float = field(default=RECIPE["dropout"], metadata=_help(
        "dropout of the base model's layers (the authors' --dropout 0.1)"))
    attention_dropout: float = field(default=RECIPE["attention_dropout"], metadata=_help(
        "dropout of the attention weights (the recipe's 0.1: M2M-100's config default)"))
    activation_dropout: float = field(default=RECIPE["activation_dropout"], metadata=_help(
        "dropout after the FFN activation (the recipe's 0.0: M2M-100's config default)"))
    layerdrop: float = field(default=RECIPE["layerdrop"], metadata=_help(
        "layer drop of the encoder and the decoder (the authors' fairseq default 0; M2M-100 configs carry 0.05)"))
    max_tokens: int = field(default=RECIPE["max_tokens"], metadata=_help(
        "token budget of a batch per process (the authors' --max-tokens 4000)"))
    max_sentences: int | None = field(default=None, metadata=_help("sentences per batch at most"))
    pad_to_multiple: int | None = field(default=None, metadata=_help(
        "static batch shapes: pad both sides of a batch to a multiple of N tokens (with --compile: few shapes)"))
    length_buckets: str | None = field(default=None, metadata=_help(
        "static batch shapes: pad both sides to the first of these lengths that fits, e.g. '16,32,64,128'"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the forward, loss and backward (CUDA graphs on CUDA); see --pad-to-multiple"))
    max_length: int | None = field(default=256, metadata=_help("truncate sentences to this many tokens"))
    update_freq: int = field(default=RECIPE["update_freq"], metadata=_help(
        "batches per optimizer step on each process (the authors' --update-freq 4). An optimizer step takes "
        "processes x update_freq batches: on P processes pass 4/P to keep the recipe's 16k tokens a step"))
    sampling_temperature: float = field(default=RECIPE["sampling_temperature"], metadata=_help(
        "temperature of direction sampling (lslo's default: the authors' command does not state one)"))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "no, bf16 or fp16; unset: accelerate's ACCELERATE_MIXED_PRECISION or config file, else the authors' --amp "
        "(bf16 on a GPU that supports it, fp16 on another GPU, fp32 on the CPU)"))
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
    resume_or_start: bool = field(default=False, metadata=_help(
        "continue from the newest checkpoint when there is one, else start fresh (--resume alone refuses a folder "
        "without a checkpoint)"))
    allow_data_change: bool = field(default=False, metadata=_help(
        "--resume on training data that changed since the run started (the run is then no longer an exact "
        "continuation)"))
    reshard: bool = field(default=False, metadata=_help(
        "--resume on another number of processes: --update-freq is adjusted to keep the global batch; the run is "
        "then no longer bit-exact (recorded in metrics.jsonl)"))
    ddp_timeout: int = field(default=1800, metadata=_help(
        "seconds a collective of a multi-process run may wait for a stalled process before the job stops"))

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; see `lslo train --list-presets`")
        method = get_method(self.method)  # ValueError naming the registered methods
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES} or None (resolved), got "
                             f"{self.mixed_precision!r}")
        for name in ("epochs", "keep_last", "max_tokens", "update_freq", "log_every", "num_beams", "warmup_updates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup_updates" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_steps", "save_every", "max_sentences", "max_length", "eval_sentences"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("label_smoothing", "dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.sampling_temperature, (int, float)) and self.sampling_temperature > 0):
            raise ValueError(f"sampling_temperature must be > 0, got {self.sampling_temperature!r}")
        self.betas()  # parse now: a bad value must fail before the model loads
        method.check(self)
        ShapeBuckets.parse(self.pad_to_multiple, self.length_buckets)  # likewise
        if self.prune_pool not in ("language", "layer"):
            raise ValueError(f"prune_pool must be 'language' or 'layer', got {self.prune_pool!r}")
        if isinstance(self.ddp_timeout, bool) or not isinstance(self.ddp_timeout, int) or self.ddp_timeout < 1:
            raise ValueError(f"ddp_timeout must be a positive int (seconds), got {self.ddp_timeout!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TrainArguments:
        """Arguments of a paper row, with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name].values, "preset": name, **overrides})

    def betas(self) -> tuple[float, float]:
        try:
            b1, b2 = (float(v) for v in str(self.adam_betas).strip("()[] ").split(","))
        except ValueError:
            raise ValueError(f"adam_betas must be two numbers 'b1,b2', got {self.adam_betas!r}") from None
        return b1, b2

    def peak_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return get_method(self.method).default_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, *, cuda: bool | None = None) -> dict[str, Any]:
        """Every field with the value a run uses: ``lr`` the method's peak rate when unset,
        ``mixed_precision`` as :func:`lslo.recipe.resolve_mixed_precision` decides (``cuda``: whether a
        GPU is used; default: whether one is available)."""
        return {**self.to_dict(), "lr": self.peak_lr(),
                "mixed_precision": resolve_mixed_precision(self.mixed_precision, self.cpu, cuda)[0]}


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
def _prepare_output_dir(args: TrainArguments, run_config: dict[str, Any], accelerator,
                        lock: RunLock | None = None) -> Path:
    """Take the folder's lock; refuse a folder holding another run (or, with --resume, a run of another
    configuration, or no checkpoint), then record this run's configuration. Every process checks
    before the main one writes anything; the main process holds ``lock`` (taken before anything is
    deleted, so --overwrite cannot wipe a run that is still training)."""
    out = Path(args.output_dir)
    config_path = out / RUN_CONFIG_NAME
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} exists and is not a directory")
    holds_run = out.is_dir() and any(child.name != LOCK_NAME for child in out.iterdir())
    _take_lock(lock, accelerator)
    resuming = args.resume or args.resume_or_start
    if holds_run and not (resuming or args.overwrite):
        raise ValueError(f"--output-dir {out} already holds another run; pass --resume to continue it or "
                         "--overwrite to replace it")
    if args.resume and not args.resume_or_start and not list_checkpoints(out):
        raise ValueError(f"--resume: no checkpoint in {out / CHECKPOINTS_DIR}; drop --resume to start fresh "
                         "(or pass --resume-or-start)")
    if resuming and holds_run:
        if not config_path.is_file():
            raise ValueError(f"--resume: {out} holds no {RUN_CONFIG_NAME}; it is not an lslo training run")
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"--resume: {config_path} is damaged ({exc})") from None
        if not isinstance(saved, dict):
            raise ValueError(f"--resume: {config_path} is damaged (a JSON {type(saved).__name__}, not a table)")
        _check_resumable(saved, run_config, args, str(out))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite and holds_run and not resuming:
            for child in out.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_file(str(config_path), lambda tmp: Path(tmp).write_text(json.dumps(run_config, indent=2)))
    accelerator.wait_for_everyone()
    return out


def _take_lock(lock: RunLock | None, accelerator) -> None:
    """The main process takes ``lock``; every process raises when it could not."""
    error = None
    if lock is not None and accelerator.is_main_process:
        try:
            warning = lock.acquire()
        except ValueError as exc:
            error = str(exc)
        else:
            if warning:
                print(f"[lslo] warning: {warning}", file=sys.stderr)
    error = _shared(accelerator, error)
    if error:
        raise ValueError(error)


def _shared(accelerator, value):
    """The main process's ``value`` on every process (a save or lock outcome all must act on)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _resume_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(differing settings, differing data files) between a saved run configuration and this run's.

    Paths are not compared when both sides carry fingerprints: the model by its fingerprint, the
    data by its files' hashes, the output folder not at all. A setting missing from an older save
    compares as its default.
    """
    saved_prints, now_prints = saved.get("fingerprints"), now.get("fingerprints")
    by_content = isinstance(saved_prints, dict) and isinstance(now_prints, dict)
    skip = _RESUMABLE_FIELDS | {"fingerprints", "output_dir"} | (_LOCATION_FIELDS if by_content else frozenset())
    defaults = {f.name: f.default for f in fields(TrainArguments) if f.default is not dataclasses.MISSING}
    differing = [f"{k}: checkpoint {saved.get(k, defaults.get(k))!r}, now {v!r}" for k, v in now.items()
                 if k not in skip and saved.get(k, defaults.get(k)) != v]
    data = []
    if by_content:
        model = fingerprint_differences(saved_prints.get("model") or {}, now_prints.get("model") or {})
        if model:
            differing.append(f"model {now.get('model')!r} is not the model of the run: {', '.join(model[:6])}")
        data = fingerprint_differences(saved_prints.get("data") or {}, now_prints.get("data") or {})
    return differing, data


def _check_resumable(saved: Mapping[str, Any], now: Mapping[str, Any], args: TrainArguments, where: str) -> list[str]:
    """Refuse to resume ``where`` (a run folder or a checkpoint) under another configuration, or on
    changed data unless --allow-data-change. Returns the data files that changed (allowed)."""
    differing, data = _resume_differences(saved, now)
    if differing:
        raise ValueError(f"--resume: {where} was trained with a different configuration ({'; '.join(differing)})")
    if data and not args.allow_data_change:
        shown = "; ".join(data[:8]) + ("; ..." if len(data) > 8 else "")
        raise ValueError(f"--resume: the training data changed since {where} was written ({shown}); restore it, or "
                         "pass --allow-data-change to continue on the new data (the run is then not an exact "
                         "continuation)")
    return data


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of a run (``checkpoints/step-N``), oldest first; an interrupted save is
    finished or undone first. Whether each is intact is :func:`lslo.checkpoints.verify_checkpoint`'s job."""
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
            found.append((int(match.group(1)), child))  # damaged ones too: resume verifies and says so
    return [path for _, path in sorted(found)]


def describe_checkpoints(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every checkpoint of a run, oldest first, verified against its manifest.

    Returns:
        One dict per checkpoint: ``name``, ``path``, ``step``, ``epoch`` (None when its trainer state
        is unreadable), ``status`` ("intact", "damaged" or "unverified"), ``size`` (bytes), ``problem``.
    """
    rows = []
    for path in list_checkpoints(output_dir):
        status, problem = verify_checkpoint(path)
        step = epoch = None
        try:
            record = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            step, epoch = int(record["global_step"]), int(record["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            if status != "damaged":
                status, problem = "damaged", f"{path / 'trainer_state.json'}: unreadable"
        rows.append({"name": path.name, "path": str(path), "step": step, "epoch": epoch, "status": status,
                     "size": tree_size(path), "problem": problem})
    return rows


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


def _label_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss, nll, tokens): :func:`lslo.fast_step.smoothed_losses` and the number of target tokens.

    torch's ``label_smoothing``: (1 - eps) * nll + eps * mean over the vocabulary of -log p
    (fairseq spreads eps over V - 1 classes; the difference is eps / V, negligible at V >= 1000).
    """
    loss, nll = smoothed_losses(logits, labels, epsilon)
    return loss, nll, int((labels != -100).sum())


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
        self.method: TrainingMethod = get_method(args.method)
        # kept for the checkpoint code, which saves a full model when there is no LSLo config
        self.weight_learning = args.method == "weight-learning"
        self.mixed_precision, self.mixed_precision_source = resolve_mixed_precision(args.mixed_precision, args.cpu)
        cpu, handlers, launched = distributed_setup(args.cpu, args.ddp_timeout)
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=cpu, kwargs_handlers=handlers)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        if launched > 1 and self.world != launched:
            raise ValueError(f"launched as {launched} processes (WORLD_SIZE) but accelerate formed a group of "
                             f"{self.world}: this would train {launched} independent copies into one folder; check "
                             "the launcher's settings (`accelerate config`, --cpu)")
        self.lock = RunLock(args.output_dir) if args.output_dir is not None else None
        self.last_good: Path | None = None  # the newest checkpoint known to be finite and complete
        self.resume_notes: list[dict[str, Any]] = []  # what makes a resumed run inexact, for metrics.jsonl
        self.heartbeat = Heartbeat(self.world, self.accelerator.process_index)
        set_seed(args.seed)
        warning = tokens_per_step_warning(args.max_tokens, args.update_freq, self.world)
        if warning is not None and self.is_main:
            warnings.warn(warning, RecipeWarning, stacklevel=3)
        self.buckets = ShapeBuckets.parse(args.pad_to_multiple, args.length_buckets)
        shapes = self.buckets.max_shapes(args.max_length) if self.buckets is not None else None
        self.compiled_loss = compile_loss(self.accelerator.device, max_shapes=shapes) if args.compile else None

    # ---- set-up
    def load(self, dry_run: bool = False) -> None:
        """Read the data, resolve the run (:meth:`plan`), then (unless ``dry_run``) claim the output
        folder and load the model. A dry run reads the model's config only, nothing is written."""
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
        self.method.check(args)
        self.lslo_config = self.method.adapter_config(args, self.languages)
        self.prune_targets = self.method.prune_targets(self.lslo_config, args)

        if not self.method.trains:
            self.corpus = None
        elif examples is not None:
            self.corpus = data.encode_examples(self.tokenizer, examples, max_length=args.max_length)
        else:
            self.corpus = data.flores_corpus(self.tokenizer, args.flores_dir, self.languages, "dev",
                                             max_length=args.max_length)
        self.run_config = self.plan()
        if dry_run:
            return
        # Hashes the model's files: a real run only (a dry run reads no weights).
        self.run_config["fingerprints"] = _run_fingerprints(args, self.languages)
        self.output_dir = _prepare_output_dir(args, self.run_config, self.accelerator, self.lock)

        model = load_base_model(args.model)
        model.float()
        # The recipe's dropouts and layer drop, whatever the base model's config says; a saved ft-all
        # model gets its config's own values back (original_model_config).
        self.model_overrides = apply_model_overrides(model, dropout=args.dropout, attention_dropout=args.attention_dropout,
                                                     activation_dropout=args.activation_dropout,
                                                     layerdrop=args.layerdrop)
        self.method.set_up(model, self.lslo_config)
        self.model = model
        self.fingerprint = model_fingerprint(model)

    def plan(self) -> dict[str, Any]:
        """The resolved run (what ``--dry-run`` prints and ``run_config.json`` holds): every
        TrainArguments field as used, the languages, the trainable parameters (counted on the meta
        device from the model's config), the batches and steps, the model-config overrides."""
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        from .data import make_batches

        args = self.args
        config = AutoConfig.from_pretrained(args.model)
        with torch.device("meta"):  # shapes only: no weights are read
            model = AutoModelForSeq2SeqLM.from_config(config)
        overrides = apply_model_overrides(model, dropout=args.dropout, attention_dropout=args.attention_dropout,
                                          activation_dropout=args.activation_dropout, layerdrop=args.layerdrop)
        self.method.set_up(model, self.lslo_config)
        trainable = {"total": sum(p.numel() for p in self.method.trainable_parameters(model)) if self.method.trains
                     else 0, "groups": self.method.parameter_groups(model)}
        per_step = self.world * args.update_freq
        batches, steps = [], 0
        for epoch in range(1, args.epochs + 1) if self.corpus is not None else ():
            count = len(make_batches(self.corpus, max_tokens=args.max_tokens, epoch=epoch, seed=args.seed,
                                     temperature=args.sampling_temperature, max_sentences=args.max_sentences))
            batches.append(count)
            steps += count // per_step
        if args.max_steps is not None:
            steps = min(steps, args.max_steps)
        return {**args.resolved(cuda=self.accelerator.device.type == "cuda"), "languages": list(self.languages),
                "processes": self.world, "mixed_precision_source": self.mixed_precision_source,
                "trainable_parameters": trainable, "batches_per_epoch": batches, "optimizer_steps": steps,
                "tokens_per_optimizer_step": args.max_tokens * per_step, "model_config_overrides": overrides}

    def save_trained(self, model: torch.nn.Module, directory: Path) -> None:
        """The adapters (or, for weight-learning, both routings and the mixing logits) into ``directory``."""
        self.method.save(model, directory, tokenizer=self.tokenizer, config_overrides=self.model_overrides,
                         metadata={"recipe": self.run_config, "pruning": self.method.pruned(model)})

    def load_trained(self, model: torch.nn.Module, directory: Path) -> None:
        self.method.load(model, directory)

    def build_optimizer(self) -> None:
        args = self.args
        params = self.method.trainable_parameters(self.model)
        optimizer = torch.optim.Adam(params, lr=args.peak_lr(), betas=args.betas(), eps=args.adam_eps,
                                     weight_decay=args.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.trainable = params

    # ---- checkpoints
    def save_checkpoint(self, state: dict[str, Any]) -> Path | None:
        """Write ``checkpoints/step-N`` as a whole (main process), every process's RNG included.

        The trainable tensors and the optimizer state are checked finite first: a non-finite step
        is never saved, and the run stops naming the last good checkpoint. A failed write (disk
        full, read-only folder, quota) leaves no partial directory and stops the run in one line.

        Raises:
            TrainingError: non-finite state, or the write failed (the message names the device,
                the checkpoint, the folder and the last good checkpoint).
        """
        from accelerate.utils import gather_object

        path = self.output_dir / CHECKPOINTS_DIR / f"step-{state['global_step']:08d}"
        where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
        bad = self._non_finite_tensors()
        if bad:
            raise TrainingError(f"{len(bad)} tensor(s) of the trainable state hold NaN or inf at step "
                                f"{state['global_step']} (first: {bad[0]}); {path.name} was not saved; training "
                                f"stopped, {where}")
        rng_states = gather_object([_rng_state()])
        error = None
        if self.is_main:
            try:
                self._write_checkpoint(path, state, rng_states)
            except (OSError, RuntimeError, safetensors_error()) as exc:
                needed = tree_size(self.last_good) if self.last_good else 3 * sum(
                    p.numel() * p.element_size() for p in self.trainable)
                error = save_error_message(exc, what=f"checkpoint {path.name}", folder=path.parent, needed=needed,
                                           last_good=self.last_good)
        error = _shared(self.accelerator, error)
        if error:
            raise TrainingError(error)
        self.accelerator.wait_for_everyone()
        self.last_good = path
        return path

    def _write_checkpoint(self, path: Path, state: dict[str, Any], rng_states: list[dict[str, Any]]) -> None:
        from safetensors.torch import save_file

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
                      "update_freq": self.args.update_freq,
                      "scaler": scaler.state_dict() if scaler is not None else None,
                      "run_config": self.run_config}
            (tmp / "trainer_state.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
            write_manifest(tmp)  # last: a checkpoint with a manifest was complete when written
        for old in list_checkpoints(self.output_dir)[: -self.args.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _non_finite_tensors(self) -> list[str]:
        """Names of trainable parameters and optimizer-state tensors holding NaN or inf."""
        model = self.accelerator.unwrap_model(self.model)
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        for index, slots in enumerate(optimizer.state.values()):
            for key, value in slots.items():
                if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    bad.append(f"optimizer state {index}.{key}")
        return bad

    def resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        """Load the newest checkpoint that verifies and loads; (None, None) when there is none.

        A damaged newest checkpoint is skipped with a warning naming its file and the one used.

        Raises:
            CheckpointError: checkpoints exist but none is usable (each one's problem named).
        """
        problems = []
        for path in reversed(list_checkpoints(self.output_dir)):
            status, problem = verify_checkpoint(path)
            if status == "damaged":
                problems.append(problem)
                continue
            try:
                state = self.load_checkpoint(path)
            except CheckpointError as exc:
                problems.append(str(exc).removeprefix("--resume: "))
                continue
            if problems and self.is_main:
                print(f"[lslo] warning: skipped damaged checkpoint(s) ({'; '.join(problems)}); resuming from the "
                      f"newest intact one, {path}", file=sys.stderr)
            self.last_good = path
            return path, state
        if problems:
            raise CheckpointError(f"--resume: no intact checkpoint in {self.output_dir / CHECKPOINTS_DIR} "
                                  f"({'; '.join(problems)})")
        return None, None

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore adapters (or the model), optimizer, RNG and scaler from ``path``.

        Raises:
            CheckpointError: a file of the checkpoint cannot be read or does not fit (named).
            ValueError: the checkpoint belongs to another configuration or process count.
        """
        from safetensors.torch import load_file

        state = read_trainer_state(path / "trainer_state.json")
        changed = _check_resumable(state["run_config"], self.run_config, self.args, str(path))
        if changed:
            self.resume_notes.append({"type": "data_change", "files": changed, "exact": False})
        self._match_world(path, state)
        model = self.accelerator.unwrap_model(self.model)
        if self.lslo_config is not None:
            with loading(path / "adapters"):
                self.load_trained(model, path / "adapters")
        else:
            from safetensors.torch import load_model

            files = sorted((path / "model").glob("*.safetensors"))
            if len(files) != 1:
                raise CheckpointError(f"--resume: {path / 'model'} should hold one safetensors file, found {len(files)}")
            with loading(files[0]):
                load_model(model, str(files[0]), strict=False)
        with loading(path / "optimizer.pt"):
            optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(optimizer_state)
        with loading(path / "rng.safetensors"):
            tensors = load_file(str(path / "rng.safetensors"))
        self._resume_rng = rng_of_rank(path, state, tensors, self.accelerator.process_index)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            with loading(path / "trainer_state.json"):
                scaler.load_state_dict(state["scaler"])
        return state

    def _match_world(self, path: Path, state: dict[str, Any]) -> None:
        """Same process count, or --reshard: keep the global batch by adjusting update_freq."""
        saved_world = state["world_size"]
        saved_freq = state.get("update_freq", state["run_config"].get("update_freq", self.args.update_freq))
        if saved_world == self.world:
            self.args.update_freq = saved_freq  # a resharded run keeps its adjusted update_freq
            return
        if not self.args.reshard:
            raise ValueError(f"--resume: {path} was written by {saved_world} processes, this run has {self.world}; "
                             "resume with the same number of processes, or add --reshard (not bit-exact)")
        global_batch = saved_world * saved_freq
        if global_batch % self.world:
            raise ValueError(f"--resume --reshard: the global batch of {path} is {saved_world} processes x "
                             f"update_freq {saved_freq} = {global_batch} micro-batches, which {self.world} processes "
                             "cannot share evenly")
        self.args.update_freq = global_batch // self.world
        self.resume_notes.append({"type": "reshard", "from_processes": saved_world, "to_processes": self.world,
                                  "update_freq": self.args.update_freq, "exact": False})
        if self.is_main:
            print(f"[lslo] warning: resharding {path} from {saved_world} to {self.world} processes, update_freq "
                  f"{saved_freq} -> {self.args.update_freq} (same global batch); the run is no longer bit-exact "
                  "(dropout and sampling randomness differ)", file=sys.stderr)

    # ---- one epoch
    def _micro_batches(self, batches: list[list[int]], step_in_epoch: int) -> list[list[int]]:
        per_step = self.world * self.args.update_freq
        start = step_in_epoch * per_step
        step_batches = batches[start : start + per_step]
        rank = self.accelerator.process_index
        return [step_batches[u * self.world + rank] for u in range(self.args.update_freq)]

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        from .data import collate

        batch = collate(self.corpus, indices, pad_token_id=self.tokenizer.pad_token_id, languages=self.languages)
        if self.buckets is not None:  # --pad-to-multiple / --length-buckets
            batch = pad_to_bucket(batch, self.buckets, self.tokenizer.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def train_step(self, micro_batches: list[list[int]], step: int) -> dict[str, float]:
        """One optimizer step (number ``step``, from 1) over this process's micro-batches (corpus indices)."""
        lr = inverse_sqrt_lr(step, self.args.peak_lr(), self.args.warmup_updates)
        # A generator: each micro-batch is collated when its turn comes (one batch on the device at a time).
        batches = (self._batch(indices) for indices in micro_batches)
        return train_step(self.model, self.optimizer, batches, lr=lr, label_smoothing=self.args.label_smoothing,
                          num_batches=len(micro_batches), accelerator=self.accelerator, clip_norm=self.args.clip_norm,
                          parameters=self.trainable, compiled=self.compiled_loss)

    def apply_pruning(self, epoch: int) -> dict[str, float]:
        """The method's epoch-start hook (LSLo: the Gradual Pruning Schedule's ratios for ``epoch``)."""
        model = self.accelerator.unwrap_model(self.model)
        # The torch optimizer under accelerate's wrapper: pruning zeroes its moments at pruned entries.
        return self.method.on_epoch_start(model, epoch, targets=self.prune_targets, args=self.args,
                                          optimizer=getattr(self.optimizer, "optimizer", self.optimizer))


def forward_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, label_smoothing: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 compiled: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training loss of one mixed-direction batch: teacher-forced forward inside :func:`lslo.route`,
    label-smoothed cross-entropy (the engine's step; benchmarks call this, they don't copy it).

    Args:
        model: an M2M-100 model (LSLo injected or not; a DDP wrapper is fine), in train mode for dropout.
        batch: :func:`lslo.data.collate`'s dict on the model's device: ``input_ids``/``attention_mask``
            ``(batch, src_len)``, ``labels`` ``(batch, tgt_len)`` (-100 = padding), ``src_lang_ids`` and
            ``tgt_lang_ids`` ``(batch,)`` int64.
        label_smoothing: epsilon of the cross-entropy.
        autocast: a factory of the mixed-precision context (``accelerator.autocast``); None: none.
        compiled: :func:`lslo.fast_step.compile_loss`'s callable (``--compile``); None: eager.

    Returns:
        ``(loss, nll, tokens)``: the smoothed loss (scalar fp32, differentiable), the NLL (no grad),
        the number of target tokens. Both are means over the non-padding target tokens.
    """
    from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right

    config = getattr(model, "module", model).config  # DDP keeps the model under .module
    decoder_input_ids = shift_tokens_right(batch["labels"], config.pad_token_id, config.decoder_start_token_id)
    context = autocast() if autocast is not None else contextlib.nullcontext()
    if compiled is not None:  # --compile: the same forward and loss as one traced graph (lslo.fast_step)
        with context:
            loss, nll = compiled(model, batch["input_ids"], batch["attention_mask"], decoder_input_ids,
                                 batch["labels"], batch["src_lang_ids"], batch["tgt_lang_ids"], label_smoothing)
        return loss, nll, int((batch["labels"] != -100).sum())
    with route(src=batch["src_lang_ids"], tgt=batch["tgt_lang_ids"]), context:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids).logits
        return _label_smoothed_loss(logits, batch["labels"], label_smoothing)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               batches: Iterable[Mapping[str, torch.Tensor]], *, lr: float | None, label_smoothing: float,
               num_batches: int | None = None, accelerator=None,
               autocast: Callable[[], contextlib.AbstractContextManager] | None = None, clip_norm: float = 0.0,
               parameters: Sequence[torch.nn.Parameter] | None = None, compiled: Callable | None = None,
               ) -> dict[str, float]:
    """One optimizer step over ``batches`` (gradient accumulation: each batch's loss / their count).

    Args:
        model, label_smoothing, autocast, compiled: as :func:`forward_loss`.
        optimizer: updated once at the end, its learning rate set to ``lr`` first; None: backward only.
        batches: :func:`lslo.data.collate` dicts on the model's device (an iterator is consumed lazily).
        lr: the step's learning rate (e.g. :func:`inverse_sqrt_lr`); None leaves the optimizer's.
        num_batches: how many ``batches`` holds (default ``len(batches)``): each loss is divided by it.
        accelerator: an ``accelerate.Accelerator``: its backward (loss scaling), ``no_sync`` on all but
            the last batch, autocast (unless ``autocast`` is given), clipping, and the metrics summed
            over processes. None: one process, plain ``backward``.
        clip_norm: clip the gradient norm of ``parameters`` to this (0 = off).
        parameters: the trained parameters (for clipping; default: those with ``requires_grad``).

    Returns:
        ``{"loss", "nll"}`` (means over the micro-batches of every process), ``"tokens"``,
        ``"sentences"`` (sums) and ``"lr"``.
    """
    if num_batches is None:
        batches = list(batches)
        num_batches = len(batches)
    if optimizer is not None and lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    if autocast is None and accelerator is not None:
        autocast = accelerator.autocast
    device = next(model.parameters()).device
    total = torch.zeros(4, dtype=torch.float64, device=device)  # loss, nll, tokens, sentences
    for u, batch in enumerate(batches):
        last = u == num_batches - 1
        no_sync = accelerator is not None and not last
        with accelerator.no_sync(model) if no_sync else contextlib.nullcontext():
            loss, nll, tokens = forward_loss(model, batch, label_smoothing=label_smoothing, autocast=autocast,
                                             compiled=compiled)
            # Gloo/NCCL average gradients over processes; each micro-batch is a mean over its tokens,
            # so the step's gradient is the mean over its world * update_freq micro-batches.
            with route(src=batch["src_lang_ids"], tgt=batch["tgt_lang_ids"]):
                if accelerator is not None:
                    accelerator.backward(loss / num_batches)
                else:
                    (loss / num_batches).backward()
        total += torch.tensor([float(loss.detach()), float(nll), tokens, batch["input_ids"].shape[0]],
                              dtype=torch.float64, device=total.device)
    if clip_norm > 0:
        params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
        if accelerator is not None:
            accelerator.clip_grad_norm_(params, clip_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    world = 1
    if accelerator is not None:
        total = accelerator.reduce(total, reduction="sum")
        world = accelerator.num_processes
    micro = num_batches * world
    return {"loss": float(total[0]) / micro, "nll": float(total[1]) / micro,
            "tokens": int(total[2]), "sentences": int(total[3]), "lr": lr}


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "tokens": 0, "steps": 0}


def _run_fingerprints(args: TrainArguments, languages: Sequence[str]) -> dict[str, Any]:
    """What the run trains: the base model and the training files, by content (see lslo.checkpoints)."""
    from . import data

    if args.train_tsv is not None:
        files = [Path(args.train_tsv)]
    elif args.flores_dir is not None and args.method != "pretrain":
        files = [data.flores_file(args.flores_dir, "dev", code) for code in languages]
    else:
        files = []
    return {"model": base_model_fingerprint(args.model), "data": data_fingerprint(files)}


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


def dry_run(args: TrainArguments) -> dict[str, Any]:
    """Resolve a run as :func:`train` would (data read, model config read on the meta device, no
    weights) and write nothing: ``lslo train --dry-run``.

    Returns:
        What ``<output-dir>/run_config.json`` of the real run holds: every :class:`TrainArguments`
        field with the value used (``lr``, ``mixed_precision`` resolved), ``languages``,
        ``processes``, ``mixed_precision_source``, ``trainable_parameters`` ``{"total", "groups"}``,
        ``batches_per_epoch`` (one count per epoch), ``optimizer_steps``, ``tokens_per_optimizer_step``
        (the budget: processes x update_freq x max_tokens) and ``model_config_overrides``
        (``{key: {"from", "to"}}``). Bad input raises as :func:`train` does.
    """
    run = _Run(args)
    run.load(dry_run=True)
    return run.run_config


def train(args: TrainArguments) -> TrainResult:
    """Run (or resume) a training run described by ``args``; see the module docstring.

    Returns:
        A :class:`TrainResult`; ``final_dir`` holds the adapters (LSLo, loadable with
        :func:`lslo.load_adapters` and ``lslo translate --adapters``) or the full model (ft-all,
        ``save_pretrained``). Raises :class:`Interrupted` after a SIGINT/SIGTERM checkpoint and
        :class:`TrainingError` on a non-finite loss or state, a failed checkpoint write, or a
        collective that timed out (--ddp-timeout).
    """
    run = _Run(args)
    try:
        return _train(run)
    except RuntimeError as exc:
        if run.world > 1 and not isinstance(exc, TrainingError) and is_collective_timeout(exc):
            where = f"the last good checkpoint is {run.last_good}" if run.last_good else "no checkpoint was written yet"
            raise TrainingError(f"rank {run.accelerator.process_index}: a collective did not complete within "
                                f"--ddp-timeout {args.ddp_timeout} s: {run.heartbeat.stalled()}; {where}") from None
        raise
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(run: _Run) -> TrainResult:
    """The body of :func:`train`; the caller releases the run folder's lock."""
    from tqdm.auto import tqdm

    from .data import make_batches

    args = run.args
    run.load()
    if not run.method.trains:
        return _pretrain_only(run)
    run.build_optimizer()
    accelerator = run.accelerator

    # The whole position of a run; saved in every checkpoint. epoch_sums: the running epoch's totals,
    # so that an epoch resumed mid-way logs the same epoch loss as an uninterrupted one.
    state = {"epoch": 1, "step_in_epoch": 0, "global_step": 0, "pruning": {}, "pruned_epoch": 0,
             "epoch_sums": _zero_sums()}
    resume_step = None
    last_checkpoint = None
    if args.resume or args.resume_or_start:
        last_checkpoint, loaded = run.resume()
        if loaded is not None:
            state = {k: loaded[k] for k in state}
            resume_step = state["global_step"]
            if run.is_main:
                print(f"[lslo] resuming from {last_checkpoint} (epoch {state['epoch']}, step {state['global_step']})")
    log = _MetricsLog(run.output_dir / METRICS_NAME, run.is_main, resume_step)
    for note in run.resume_notes:  # what makes this resumed run inexact, on record
        log.write({**note, "step": state["global_step"], "epoch": state["epoch"]})
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
                run.heartbeat.beat(state["global_step"] + 1)
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
    error = None
    if run.is_main:
        model = accelerator.unwrap_model(run.model)
        try:
            run.save_trained(model, final_dir)
        except (OSError, RuntimeError, safetensors_error()) as exc:
            error = save_error_message(exc, what="the final weights", folder=final_dir.parent,
                                       needed=tree_size(run.last_good), last_good=run.last_good)
    error = _shared(accelerator, error)
    if error:
        raise TrainingError(error)
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


def _epoch_scores(metrics_path: Path, metric: str | None = None) -> tuple[str, dict[int, dict[str, float]]]:
    """(metric, {epoch: {group column: score}}) of a run's ``metrics.jsonl``; the metric is spBLEU
    when it was measured, else chrF++ (unless given)."""
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()
               if _parsed_step(line) is not None]
    epochs = {r["epoch"]: r for r in records if r.get("type") == "epoch"}
    if metric is None:
        metric = "spbleu" if any(k.startswith("spbleu/") for r in epochs.values() for k in r) else "chrf++"
    scores = {e: {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(metric + "/")} for e, r in epochs.items()}
    return metric, {e: s for e, s in scores.items() if s}


def plot_training_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike, *, system: str | None = None,
                         groups: Sequence[str] = ("H2H", "V2V")):
    """Figure 3 from a run's ``metrics.jsonl``: per-epoch group scores, epoch 0 (the model before
    fine-tuning) as the dashed "Pretrain" line. Uses spBLEU when it was measured, else chrF++.

    Returns:
        The figure, or None when the log holds no evaluated epoch.
    """
    from .evaluate import plot_epoch_curves

    metric, scores = _epoch_scores(Path(metrics_path))
    trained = {e: s for e, s in scores.items() if e >= 1}
    if not trained:
        return None
    available = set().union(*trained.values())
    panels = [g for g in groups if g in available] or sorted(available)[:2]
    name = system or Path(metrics_path).resolve().parent.name
    return plot_epoch_curves({name: trained}, out_png, groups=panels, metric=metric, pretrained=scores.get(0) or None,
                             title=f"{name}: devtest score per epoch")


def plot_run_curves(run_dirs: Sequence[str | os.PathLike], out_png: str | os.PathLike, *,
                    labels: Sequence[str] | None = None, groups: Sequence[str] = ("H2H", "V2V")):
    """The paper's Figure 3 from several runs: each run's per-epoch group scores (``--eval-every-epoch``)
    as one line per panel, the model before fine-tuning (epoch 0 of the first run that has it) dashed.

    Args:
        run_dirs: ``lslo train`` output folders.
        out_png: the PNG to write.
        labels: one legend label per run (default: the run's preset, else its folder name).
        groups: one panel per direction group.

    Returns:
        The matplotlib ``Figure`` (one axes per group; one line per run, plus the dashed baseline).

    Raises:
        ValueError: a folder that is not a run or has no per-epoch evaluation (both named), labels
            that do not match the runs.
    """
    from .evaluate import plot_epoch_curves

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("give at least one run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs: give one label per run")
    logs = []
    for run_dir in run_dirs:
        path = run_dir / METRICS_NAME
        if not path.is_file() and not (run_dir / RUN_CONFIG_NAME).is_file():
            raise ValueError(f"{run_dir} is not an lslo training run (no {METRICS_NAME}, no {RUN_CONFIG_NAME})")
        logs.append(path)
    spbleu_everywhere = all(p.is_file() and _epoch_scores(p)[0] == "spbleu" for p in logs)
    metric = "spbleu" if spbleu_everywhere else "chrf++"
    history, pretrained = {}, None
    for k, (run_dir, path) in enumerate(zip(run_dirs, logs)):
        scores = _epoch_scores(path, metric)[1] if path.is_file() else {}
        trained = {e: s for e, s in scores.items() if e >= 1}
        if not trained:
            raise ValueError(f"{run_dir} has no per-epoch evaluation in {METRICS_NAME}: train it with "
                             "--eval-every-epoch (and --flores-dir) to draw its curve")
        pretrained = pretrained or scores.get(0)
        label = labels[k] if labels is not None else _run_label(run_dir)
        if label in history:
            label = f"{label} ({run_dir.name})"
        history[label] = trained
    return plot_epoch_curves(history, out_png, groups=list(groups), metric=metric, pretrained=pretrained,
                             title="devtest score per epoch")


def _run_label(run_dir: Path) -> str:
    try:
        preset = json.loads((run_dir / RUN_CONFIG_NAME).read_text(encoding="utf-8")).get("preset")
    except (OSError, ValueError):
        preset = None
    return preset or run_dir.resolve().name


def _pruned(run: _Run) -> dict[str, float]:
    return run.method.pruned(run.accelerator.unwrap_model(run.model))


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

    model: str | None = field(default=None, metadata=_help(
        "base model: hub id or folder (default: the base the adapters record, else facebook/flores101_mm100_615M); "
        "refused when it is not the adapters' base"))
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
    max_length: int | None = field(default=None, metadata=_help(
        "truncate source sentences to this many tokens, with one warning counting them (default: the model's "
        "max_position_embeddings)"))


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
    if args.adapters:  # the recorded base, or a --model checked against it
        base = resolve_adapter_base(args.adapters, args.model)
        model_name, revision, tokenizer_name = base["name_or_path"], base["revision"], base["tokenizer"]
    else:
        model_name, revision = args.model or DEFAULT_BASE_MODEL, None
        tokenizer_name = model_name
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    adapter_config = read_adapter_config(args.adapters)[0] if args.adapters else None
    spec = args.languages or (",".join(adapter_config.languages) if adapter_config else "lang12")
    languages = data.resolve_languages(spec, tokenizer=tokenizer, flores_dir=args.flores_dir)
    if adapter_config is not None:
        missing = [c for c in languages if c not in adapter_config.languages]
        if missing:
            raise ValueError(f"the adapters in {args.adapters} have no adapters for {missing}")
    references = data.load_flores(args.flores_dir, languages, args.split)
    model = load_base_model(model_name, device=accelerator.device, revision=revision)
    if args.adapters:
        load_adapters(model, args.adapters)
    group_of = (adapter_config.group_of if adapter_config is not None and not args.groups
                else _group_of_for(languages, args.groups))
    directions = data.all_directions(languages)
    rows = evaluate(model, tokenizer, references, directions, num_beams=args.num_beams, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, max_sentences=args.eval_sentences, scorer=scorer,
                    accelerator=accelerator, progress=args.progress and accelerator.is_main_process, group_of=group_of,
                    max_input_length=args.max_length)
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
                             metadata={"model": model_name, "adapters": args.adapters, "split": args.split,
                                       "num_beams": args.num_beams, "eval_sentences": args.eval_sentences},
                             group_of=group_of)
        if args.adapters and adapter_config is not None and out.resolve() == (Path(args.adapters) / "eval").resolve():
            files["card"] = write_model_card(args.adapters)  # the card gets the scores
    return {"rows": rows, "table": table, "files": files, "spbleu": scorer.has_spbleu}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A run configuration from ``.toml``, ``.json`` or ``.yaml``/``.yml``: field names (``max_tokens``
    or ``max-tokens``) -> values."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--config {path} is not UTF-8 text (byte {exc.start})") from None
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
