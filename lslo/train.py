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
import json
import math
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data
from .arguments import DEFAULT_BASE_MODEL, TrainArguments, _help, load_config_file  # noqa: F401 (re-exported)
from .checkpoints import (
    CheckpointError,
    RunLock,
    _rng_state,
    _set_rng_state,
    base_model_fingerprint,
    data_fingerprint,
    loading,
    read_trainer_state,
    rng_of_rank,
    safetensors_error,
    save_error_message,
    tree_size,
    verify_checkpoint,
    write_manifest,
)
from .context import route
from .data import ShapeBuckets, collate, make_batches, pad_to_bucket
from .distributed import Heartbeat, _any_process, _SignalFlag, distributed_setup, is_collective_timeout
from .eval_run import EvalArguments, _group_of_for, evaluate_run
from .fast_step import compile_loss, smoothed_losses
from .io import atomic_directory
from .methods import (
    TrainingMethod,
    _load_index_plan,  # noqa: F401 (lslo.train._load_index_plan: read by the analyses' tests)
    _parse_ranks,  # noqa: F401 (as above)
    get_method,
    language_prune_targets,
    parse_prune_spec,
)
from .model import (
    load_base_model,
    model_fingerprint,
)
from .recipe import (
    PRESETS,
    apply_model_overrides,
    format_presets,
    resolve_mixed_precision,
    tokens_per_step_warning,
)
from .run_folder import (  # noqa: F401 (the run folder's plumbing lived here: lslo.train.* keeps working)
    _CHECKPOINT_PATTERN,
    _LOCATION_FIELDS,
    _PLAN_KEYS,
    _RESUMABLE_FIELDS,
    CHECKPOINTS_DIR,
    CURVES_NAME,
    FINAL_DIR,
    METRICS_NAME,
    RUN_CONFIG_NAME,
    _check_resumable,
    _epoch_scores,
    _MetricsLog,
    _parsed_step,
    _prepare_output_dir,
    _resume_differences,
    _run_label,
    _shared,
    _take_lock,
    describe_checkpoints,
    list_checkpoints,
    plot_run_curves,
    plot_training_curves,
)
from .tables import group_table, write_scores

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
def _label_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss, nll, tokens): :func:`lslo.fast_step.smoothed_losses` and the number of target tokens.

    torch's ``label_smoothing``: (1 - eps) * nll + eps * mean over the vocabulary of -log p
    (fairseq spreads eps over V - 1 classes; the difference is eps / V, negligible at V >= 1000).
    """
    loss, nll = smoothed_losses(logits, labels, epsilon)
    return loss, nll, int((labels != -100).sum())


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
    if args.train_tsv is not None:
        files = [Path(args.train_tsv)]
    elif args.flores_dir is not None and args.method != "pretrain":
        files = [data.flores_file(args.flores_dir, "dev", code) for code in languages]
    else:
        files = []
    return {"model": base_model_fingerprint(args.model), "data": data_fingerprint(files)}


def _group_means(rows: Sequence[Mapping[str, Any]], config_group_of) -> dict[str, float]:
    out = {}
    for metric in ("spbleu", "chrf++", "bleu"):
        if rows and all(r.get(metric) is not None for r in rows):
            table = group_table(rows, metric=metric, group_of=config_group_of)
            for column, value in table["scores"].items():
                out[f"{metric}/{column}"] = value
    return out


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

    args = run.args
    run.load()
    if not run.method.trains:
        return _pretrain_only(run)
    run.build_optimizer()
    accelerator = run.accelerator
    state, resume_step, last_checkpoint = _start_state(run)
    log = _MetricsLog(run.output_dir / METRICS_NAME, run.is_main, resume_step)
    for note in run.resume_notes:  # what makes this resumed run inexact, on record
        log.write({**note, "step": state["global_step"], "epoch": state["epoch"]})
    group_of = _group_of_for(run.languages, args.groups)
    eval_refs = _start_evaluation(run, log, group_of, resume_step)

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
            _prune_for_epoch(run, state, epoch, log)
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
            _end_epoch(run, state, epoch, time.perf_counter() - epoch_start, log, eval_refs, group_of)
            epoch += 1
            state = {**state, "epoch": epoch, "step_in_epoch": 0, "epoch_sums": _zero_sums()}
            last_checkpoint = run.save_checkpoint(state)

    final_dir = _save_final(run)
    log.close()
    return TrainResult(run.output_dir, final_dir, state["global_step"], state["epoch"] - 1,
                       run.output_dir / METRICS_NAME, stopped_early)


def _start_state(run: _Run) -> tuple[dict[str, Any], int | None, Path | None]:
    """(state, resume step or None, last checkpoint or None): a fresh run's position, or the checkpoint's."""
    args = run.args
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
    return state, resume_step, last_checkpoint


def _start_evaluation(run: _Run, log: _MetricsLog, group_of, resume_step: int | None):
    """The devtest references of --eval-every-epoch (None without it); a fresh run logs epoch 0 first."""
    args = run.args
    eval_refs = None
    if args.eval_every_epoch:
        if args.flores_dir is None:
            raise ValueError("--eval-every-epoch evaluates FLORES devtest: give --flores-dir")
        eval_refs = run.devtest
        if not resume_step:  # Figure 3's dashed line: the model before fine-tuning
            log.write({"type": "epoch", "epoch": 0, "step": 0, **_epoch_eval(run, eval_refs, group_of, 0)})
    return eval_refs


def _prune_for_epoch(run: _Run, state: dict[str, Any], epoch: int, log: _MetricsLog) -> None:
    """Apply the epoch's pruning ratios once (a resumed epoch has them already) and log them."""
    if state["pruned_epoch"] < epoch:
        state["pruning"] = run.apply_pruning(epoch)
        state["pruned_epoch"] = epoch
        if state["pruning"]:
            log.write({"type": "pruning", "epoch": epoch, "step": state["global_step"], **{
                f"ratio/{k}": v for k, v in state["pruning"].items()}})


def _end_epoch(run: _Run, state: Mapping[str, Any], epoch: int, elapsed: float, log: _MetricsLog, eval_refs,
               group_of) -> None:
    """Log the finished epoch (loss, speed, pruned share, devtest scores) and redraw the curves."""
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


def _save_final(run: _Run) -> Path:
    """Write the trained weights to ``<output-dir>/final`` (main process); every process raises when that failed."""
    accelerator = run.accelerator
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
    return final_dir


def _epoch_eval(run: _Run, references, group_of, epoch: int) -> dict[str, float]:
    """Evaluate devtest (the --eval-sentences subset) now; per-direction scores to eval/epoch-NNN.*."""
    rows = _evaluate_model(run, references, run.args.eval_sentences, group_of)
    if run.is_main:
        write_scores(rows, run.output_dir / "eval", name=f"epoch-{epoch:03d}", group_of=group_of,
                     metadata={"epoch": epoch, "eval_sentences": run.args.eval_sentences})
    run.model.train()
    return _group_means(rows, group_of)


def _pruned(run: _Run) -> dict[str, float]:
    return run.method.pruned(run.accelerator.unwrap_model(run.model))


def _evaluate_model(run: _Run, references, max_sentences, group_of):
    # lslo.evaluate loads transformers and sacrebleu: deferred so that the CLI starts fast
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


