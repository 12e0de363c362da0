"""The demo's base model: a SentencePiece tokenizer and a tiny M2M-100 pretrained on the synthetic corpus.

As M2M-124 for the paper, the base model must start out knowing the high-resource languages well
and the very-low-resource ones hardly at all; it learns that from the imbalanced ``pretrain.tsv``
of :mod:`lslo.demo.synthetic` (many-to-many, most of it high-resource pairs).

- :func:`train_demo_tokenizer`: a BPE SentencePiece model trained on the pretraining text with
  temperature sampling over languages (as M2M-100's), wrapped as a real ``M2M100Tokenizer``
  (language tokens ``__en__`` ... at the ids of the released checkpoints' layout).
- :func:`demo_model_config`: the tiny ``M2M100Config`` (d_model 64, 2 + 2 layers by default).
- :func:`pretrain_base_model`: builds both, pretrains the model many-to-many, and saves a folder
  that ``lslo.load_base_model(path)`` and ``M2M100Tokenizer.from_pretrained(path)`` load unchanged
  (``save_pretrained``, safetensors), with ``lslo_demo.json`` recording how it was made.
- :func:`zero_shot_scores`: BLEU/chrF++ per direction of a model on the corpus's devtest, and the
  direction-group table (H2H ... V2V).

Pretraining is a run of the project's engine, :func:`lslo.train.train` with ``method="ft-all"`` on
``pretrain.tsv`` from a randomly initialised model, with ``sampling_temperature=1`` (pretraining
keeps the corpus's natural imbalance; fine-tuning's T=5 would upsample the very-low-resource pairs)
and a higher learning rate and shorter warm-up than fine-tuning a 615M model (a 0.4M-parameter
model trained from scratch for about a thousand steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import RESOURCE_GROUPS
from ..data import load_flores, read_tsv_corpus
from ..evaluate import Scorer, evaluate, group_table
from ..io import atomic_directory, atomic_write_file
from ..testing import make_tokenizer
from ..train import RecipeWarning, TrainArguments, train

__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "demo_model_config",
    "pretrain_base_model",
    "train_demo_tokenizer",
    "zero_shot_scores",
]

METADATA_FILE = "lslo_demo.json"


# ------------------------------------------------------------------------------------ tokenizer
def train_demo_tokenizer(examples: Sequence, directory: str | os.PathLike, *,
                         vocab_size: int = 1000, sentences: int = 40_000, temperature: float = 5.0, seed: int = 0):
    """Train the demo's SentencePiece model on pretraining text and wrap it as an ``M2M100Tokenizer``.

    Languages are sampled with probability proportional to ``share ** (1 / temperature)`` (M2M-100
    and XLM-R do the same), so that a very-low-resource language still gets pieces of its own;
    its few sentences are then seen several times.

    Args:
        examples: pretraining pairs ``(src_lang, tgt_lang, source, target)`` (e.g.
            :func:`lslo.data.read_tsv_corpus`).
        directory: where ``spm.model`` and ``vocab.json`` are written.
        vocab_size: SentencePiece pieces.
        sentences: sentences drawn for training SentencePiece.
        temperature: sampling temperature over languages (1 = the corpus's proportions).
        seed: the draw's seed.

    Returns:
        the ``M2M100Tokenizer``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    texts: dict[str, list[str]] = {}
    for src, tgt, source, target in examples:
        texts.setdefault(src, []).append(source)
        texts.setdefault(tgt, []).append(target)
    total = sum(len(t) for t in texts.values())
    weights = {code: (len(t) / total) ** (1.0 / temperature) for code, t in texts.items()}
    norm = sum(weights.values())
    rng = random.Random(f"lslo-demo-spm:{seed}")
    sample = []
    for code in sorted(texts):
        count = max(1, round(sentences * weights[code] / norm))
        pool = texts[code]
        sample.extend(rng.sample(pool, count) if count <= len(pool) else rng.choices(pool, k=count))
    rng.shuffle(sample)
    return make_tokenizer(directory, vocab_size, sample)


# ---------------------------------------------------------------------------------------- model
def demo_model_config(tokenizer, *, d_model: int = 64, layers: int = 2, heads: int = 4, ffn_dim: int = 256,
                      dropout: float = 0.1, **overrides):
    """The demo's ``M2M100Config``: a tiny M2M-100 whose vocabulary covers ``tokenizer``.

    As the released checkpoints: the SentencePiece pieces, then the language tokens, then the
    tokenizer's "madeup words"; shared, tied embeddings scaled by sqrt(d_model); sinusoidal positions.

    Args:
        tokenizer: the ``M2M100Tokenizer``.
        d_model, layers (each side), heads, ffn_dim, dropout: the shape.
        overrides: any other ``M2M100Config`` field.
    """
    from transformers import M2M100Config

    kwargs = {
        "vocab_size": max(tokenizer.lang_code_to_id.values()) + 1 + tokenizer.num_madeup_words,
        "d_model": d_model, "encoder_layers": layers, "decoder_layers": layers,
        "encoder_attention_heads": heads, "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn_dim, "decoder_ffn_dim": ffn_dim, "max_position_embeddings": 256,
        "dropout": dropout, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "scale_embedding": True,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": tokenizer.eos_token_id,
    }
    kwargs.update(overrides)
    return M2M100Config(**kwargs)


@dataclass(frozen=True)
class PretrainConfig:
    """Shape and schedule of the demo's pretraining (the defaults are the full demo's).

    d_model, layers, heads, ffn_dim, dropout: the model (:func:`demo_model_config`).
    vocab_size: SentencePiece pieces.
    steps: optimizer steps (the engine's ``max_steps``); max_tokens: batch budget in padded tokens.
    lr: peak learning rate after ``warmup`` steps, then decaying as 1/sqrt(step) (fairseq's inverse_sqrt).
    label_smoothing, clip_norm, betas: as fairseq's transformer recipes.
    weight_decay: the engine's (Adam's L2) decay; 0 because Adam normalises the L2 gradient of a
        rarely seen piece (a very-low-resource language's) into a full-size step towards zero
        (1e-4 cost 6 BLEU on H2H after 1,000 steps: 23.1 vs 29.3, d_model 64, 2 + 2 layers).
    threads: torch intra-op threads while training (restored after). 1: at d_model 64 a second
        thread only adds synchronisation on a busy 2-core machine (a training step took 0.15 s on
        one thread and 0.96 s on two there, torch 2.13, load average ~1.4).
    compile, length_buckets: the engine's ``--compile`` and ``--length-buckets`` (static batch
        shapes, so that the compiled step is compiled once per shape); off by default (see
        benchmarks/README.md for what they cost and save on the demo's pretraining).
    """

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 256
    dropout: float = 0.1
    vocab_size: int = 1000
    steps: int = 1200
    max_tokens: int = 4096
    lr: float = 3e-3
    warmup: int = 200
    label_smoothing: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    threads: int = 1
    seed: int = 0
    compile: bool = False
    length_buckets: str | None = None

    def __post_init__(self):
        for name in ("d_model", "layers", "heads", "ffn_dim", "vocab_size", "steps", "max_tokens", "warmup",
                     "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PretrainConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"PretrainConfig.d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        for name in ("lr", "label_smoothing", "dropout", "weight_decay", "clip_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PretrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr must be > 0, got {self.lr!r}")


@dataclass
class PretrainResult:
    """What :func:`pretrain_base_model` did: the saved folder and the measured costs.

    seconds: wall-clock time of each stage ("tokenizer", "train" (the engine: encoding included), "save").
    losses: (step, label-smoothed loss of that step) every 50 steps, from the engine's metrics.jsonl.
    target_tokens: target tokens of the logged steps.
    """

    path: Path
    steps: int
    target_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)
    num_parameters: int = 0


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain_base_model(
    corpus_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: PretrainConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Train the demo tokenizer, pretrain a tiny M2M-100 many-to-many on ``pretrain.tsv``, save both.

    Stages: the tokenizer (:func:`train_demo_tokenizer`); a random model
    (:func:`demo_model_config`) saved with the tokenizer as the engine's starting point; an
    :func:`lslo.train.train` run (``method="ft-all"``, ``max_steps=config.steps``) in a work
    folder beside ``output_dir``; the run's ``final/`` copied into ``output_dir`` with ``lslo_demo.json``.

    Args:
        corpus_dir: a folder written by :func:`lslo.demo.synthetic.write_corpus` (``pretrain.tsv``).
        output_dir: the model folder to create or replace (written atomically: a kill leaves the old
            folder or the new one). It holds ``config.json``, ``model.safetensors``,
            ``generation_config.json``, the tokenizer's files and ``lslo_demo.json``.
        config: the :class:`PretrainConfig` (default: the full demo's).
        progress: the engine's progress bars.
        log: called with one-line messages (default: none).

    Returns:
        a :class:`PretrainResult` (path, steps, timings, loss curve).
    """
    import shutil
    import tempfile

    config = config or PretrainConfig()
    log = log or (lambda message: None)
    tsv = Path(corpus_dir) / "pretrain.tsv"
    examples = read_tsv_corpus(tsv)
    result = PretrainResult(Path(output_dir), 0, 0)
    Path(output_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".lslo-demo-pretrain-", dir=Path(output_dir).resolve().parent) as work:
        work = Path(work)
        tokenizer = train_demo_tokenizer(examples, work / "spm", vocab_size=config.vocab_size, seed=config.seed)
        result.seconds["tokenizer"] = time.perf_counter() - clock
        result.num_parameters = _save_initial_model(tokenizer, config, work / "init")
        log(f"tokenizer: {config.vocab_size} pieces in {result.seconds['tokenizer']:.1f} s; model: "
            f"{result.num_parameters / 1e6:.2f}M parameters; pretraining on {len(examples)} pairs")

        args = _pretrain_arguments(config, work / "init", tsv, work / "run", progress)
        clock = time.perf_counter()
        with _threads(config.threads), warnings.catch_warnings():
            warnings.simplefilter("ignore", RecipeWarning)  # pretraining is not the paper's fine-tuning recipe
            run = train(args)
        result.seconds["train"] = time.perf_counter() - clock
        result.steps = run.global_step
        _read_losses(run.metrics_path, result)
        log(f"pretrained {run.global_step} steps in {result.seconds['train']:.0f} s; final loss "
            f"{result.losses[-1][1] if result.losses else float('nan'):.3f}")

        clock = time.perf_counter()
        metadata = {
            "note": "tiny M2M-100 pretrained on ARTIFICIAL languages by lslo.demo (the language codes are stand-ins)",
            "pretrain": asdict(config),
            "pairs": len(examples),
            "steps": run.global_step,
            "seconds": result.seconds,
            "losses": result.losses,
            "num_parameters": result.num_parameters,
        }
        with atomic_directory(output_dir) as folder:
            for item in run.final_dir.iterdir():
                shutil.copy2(item, Path(folder) / item.name)
            atomic_write_file(Path(folder) / METADATA_FILE,
                              lambda path: Path(path).write_text(json.dumps(metadata, indent=2) + "\n"))
        result.seconds["save"] = time.perf_counter() - clock
    return result


# ------------------------------------------------------------------------------------ evaluation
def zero_shot_scores(model, tokenizer, flores_dir: str | os.PathLike, languages: Sequence[str], *,
                     split: str = "devtest", num_beams: int = 1, max_sentences: int | None = None,
                     group_of: Mapping[str, str] | None = None, progress: bool = False,
                     threads: int = 1) -> tuple[list[dict], dict]:
    """Translate a FLORES-layout split in every direction of ``languages`` and score it.

    Args:
        model, tokenizer: an M2M-100-architecture model (with or without LSLo) and its tokenizer.
        flores_dir: the corpus folder (``dev/``, ``devtest/``).
        languages: codes; every ordered pair is a direction.
        split: "dev" or "devtest".
        num_beams: beam size (1 = greedy).
        max_sentences: the first N sentences of each direction (default all).
        group_of: code -> resource group (default :data:`lslo.config.RESOURCE_GROUPS`).
        threads: torch intra-op threads while translating.

    Returns:
        (rows, table): :func:`lslo.evaluate.evaluate` rows per direction (bleu, chrf++) and
        :func:`lslo.evaluate.group_table` of BLEU (``table["scores"]["H2H"]`` ...).
    """
    languages = list(languages)
    references = load_flores(flores_dir, languages, split)
    group_of = dict(group_of) if group_of is not None else {c: RESOURCE_GROUPS[c] for c in languages}
    with _threads(threads):
        rows = evaluate(model, tokenizer, references, None, num_beams=num_beams, max_sentences=max_sentences,
                        scorer=Scorer(warn=False), progress=progress, group_of=group_of, max_new_tokens=64)
    return rows, group_table(rows, metric="bleu", group_of=group_of)


def _save_initial_model(tokenizer, config: PretrainConfig, folder: Path) -> int:
    """Save a random demo model (seeded by ``config.seed``) and ``tokenizer`` to ``folder``; its parameter count."""
    from transformers import M2M100ForConditionalGeneration

    torch.manual_seed(config.seed)
    model = M2M100ForConditionalGeneration(demo_model_config(
        tokenizer, d_model=config.d_model, layers=config.layers, heads=config.heads, ffn_dim=config.ffn_dim,
        dropout=config.dropout))
    num_parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return num_parameters


def _pretrain_arguments(config: PretrainConfig, init: Path, tsv: Path, run_dir: Path, progress: bool) -> TrainArguments:
    """The engine's arguments of the pretraining run: ``ft-all`` from ``init`` on ``tsv`` for ``config.steps`` steps."""
    return TrainArguments(
        model=str(init), train_tsv=str(tsv), method="ft-all", output_dir=str(run_dir),
        max_steps=config.steps, epochs=10_000, seed=config.seed, lr=config.lr, warmup_updates=config.warmup,
        adam_betas=f"{config.betas[0]},{config.betas[1]}", weight_decay=config.weight_decay,
        clip_norm=config.clip_norm, label_smoothing=config.label_smoothing, dropout=config.dropout,
        max_tokens=config.max_tokens, sampling_temperature=1.0, log_every=50, cpu=True, progress=progress,
        keep_last=1, update_freq=1, attention_dropout=0.0, compile=config.compile,
        length_buckets=config.length_buckets,
    )


def _read_losses(metrics_path: Path, result: PretrainResult) -> None:
    """The run's training losses and target tokens, from its ``metrics.jsonl``, into ``result``."""
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("type") == "train":
            result.losses.append((int(record["step"]), float(record["loss"])))
            result.target_tokens += int(record.get("tokens", 0))
