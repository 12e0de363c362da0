"""A training run's folder: its files' names, taking it (lock, refusal of another run, the resume
comparison), its checkpoints listed and verified, its ``metrics.jsonl`` log and the curves drawn from it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .arguments import TrainArguments
from .checkpoints import LOCK_NAME, RunLock, fingerprint_differences, tree_size, verify_checkpoint
from .io import atomic_write_file, recover_directory
from .tables import plot_epoch_curves

__all__ = ["describe_checkpoints", "list_checkpoints", "plot_run_curves", "plot_training_curves"]

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
