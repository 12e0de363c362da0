"""What ``lslo train`` takes: :class:`TrainArguments` (one field per flag, checked when built) and
:func:`load_config_file` (a ``--config`` file of those fields)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import ShapeBuckets
from .methods import get_method
from .recipe import MIXED_PRECISION_CHOICES, PRESETS, RECIPE, resolve_mixed_precision

__all__ = ["DEFAULT_BASE_MODEL", "TrainArguments", "load_config_file"]


DEFAULT_BASE_MODEL = "facebook/flores101_mm100_615M"


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
