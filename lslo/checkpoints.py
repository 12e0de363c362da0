"""What makes a training run folder trustworthy after the real world happened to it.

- **Manifests.** Every checkpoint directory holds ``manifest.json``, written last, with the size
  and SHA-256 of each file; :func:`verify_checkpoint` reads a checkpoint back against it, so a
  truncated, overwritten or emptied file is found before it is loaded.
- **Fingerprints.** A run records what it was trained on by content, not by path: the base model
  by its configuration and the hashes of its weight files (:func:`base_model_fingerprint`), the
  training data by the sizes and hashes of its files (:func:`data_fingerprint`). A run folder (or
  the model, or the data) can then move and still resume; a changed model or corpus is named.
- **One writer per run folder.** :class:`RunLock` holds an ``fcntl.flock`` on a lock file in the
  folder for the run's life; a second writer is refused, naming the pid and host that hold it.
- **Errors during a save** are described in one line naming the device, the checkpoint, the
  folder and the last good checkpoint (:func:`save_error_message`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .io import process_alive

__all__ = [
    "MANIFEST_NAME",
    "CheckpointError",
    "RunLock",
    "base_model_fingerprint",
    "data_fingerprint",
    "fingerprint_differences",
    "format_checkpoint_table",
    "loading",
    "read_trainer_state",
    "rng_of_rank",
    "safetensors_error",
    "save_error_message",
    "tree_size",
    "verify_checkpoint",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lslo-train.lock"
_MANIFEST_FORMAT = 1
_CHUNK = 1 << 20
# config.json keys that say where or by which version a model was saved, not what it is.
_CONFIG_NOISE = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".json")


class CheckpointError(ValueError):
    """A checkpoint (or one of its files) cannot be used; the message names the file."""


# ------------------------------------------------------------------ hashes
def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def tree_size(directory: str | os.PathLike) -> int:
    """Bytes of every regular file under ``directory`` (0 when it does not exist)."""
    root = Path(directory)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------- manifests
def write_manifest(directory: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file under ``directory`` in its ``manifest.json``.

    Called last, inside the temporary directory of an atomic save: a checkpoint whose manifest
    exists was complete when it was written.
    """
    root = Path(directory)
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in _files_under(root)}
    (root / MANIFEST_NAME).write_text(json.dumps({"format": _MANIFEST_FORMAT, "files": files}, indent=1),
                                      encoding="utf-8")


def verify_checkpoint(directory: str | os.PathLike) -> tuple[str, str | None]:
    """Check a checkpoint against its manifest.

    Args:
        directory: a ``checkpoints/step-N`` folder.

    Returns:
        ``(status, problem)``: ``("intact", None)``; ``("damaged", "<file>: what is wrong")``; or
        ``("unverified", None)`` for a checkpoint written before manifests existed (its files are
        checked as they load).
    """
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        legacy = (root / "trainer_state.json").is_file()
        return ("unverified", None) if legacy else ("damaged", f"{manifest_path}: missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a table")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return "damaged", f"{manifest_path}: not a manifest ({type(exc).__name__}: {exc})"
    for name, expected in sorted(files.items()):
        path = root / name
        if not path.is_file():
            return "damaged", f"{path}: missing"
        try:
            size = path.stat().st_size
            if size != expected.get("size"):
                return "damaged", f"{path}: {size} bytes, the manifest says {expected.get('size')}"
            if file_digest(path) != expected.get("sha256"):
                return "damaged", f"{path}: content differs from the manifest (SHA-256 mismatch)"
        except (OSError, AttributeError) as exc:
            return "damaged", f"{path}: unreadable ({exc})"
    return "intact", None


def format_checkpoint_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table ``lslo checkpoints DIR`` prints: one row per checkpoint, oldest first.

    Args:
        rows: dicts with ``name``, ``step``, ``epoch``, ``status``, ``size`` (bytes), ``problem``.
    """
    if not rows:
        return "no checkpoint"
    lines = [f"{'checkpoint':<16} {'step':>8} {'epoch':>5}  {'status':<10} {'size':>10}"]
    for row in rows:
        size = f"{row['size'] / 1e6:.2f} MB"
        epoch = "?" if row.get("epoch") is None else str(row["epoch"])
        step = "?" if row.get("step") is None else str(row["step"])
        line = f"{row['name']:<16} {step:>8} {epoch:>5}  {row['status']:<10} {size:>10}"
        if row.get("problem"):
            line += f"  ({row['problem']})"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------ fingerprints
def data_fingerprint(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """Sizes and SHA-256 of training files, keyed by a name that survives the folder moving.

    Args:
        paths: the files a run trains on (FLORES dev files, a TSV).

    Returns:
        ``{"<parent>/<name>": {"size": bytes, "sha256": hex}}``.
    """
    out = {}
    for path in map(Path, paths):
        out[f"{path.parent.name}/{path.name}"] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    return out


def _model_folder(model: str) -> Path | None:
    if Path(model).is_dir():
        return Path(model)
    try:  # a hub id already in the local cache; huggingface_hub comes with transformers
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, offline, not a hub id: fall back to the name)
        return None


def base_model_fingerprint(model: str) -> dict[str, Any]:
    """What a base model is, independent of how its path is spelled.

    Args:
        model: a local folder or a hub id (resolved through the local Hugging Face cache).

    Returns:
        ``{"config": config.json without its path/version keys, "files": {name: SHA-256}}`` for
        a folder (weights, tokenizer and config files); ``{"id": model}`` when no local copy exists.
    """
    folder = _model_folder(model)
    if folder is None:
        return {"id": model}
    config_path = folder / "config.json"
    config = {}
    if config_path.is_file():
        loaded = json.loads(config_path.read_text(encoding="utf-8-sig"))
        config = {k: v for k, v in loaded.items() if k not in _CONFIG_NOISE} if isinstance(loaded, dict) else {}
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and p.name != "config.json"}
    return {"config": config, "files": files}


def fingerprint_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints of :func:`base_model_fingerprint` or :func:`data_fingerprint`.

    Returns:
        Human-readable differences, e.g. ``"config d_model: 32 -> 64"``, ``"model.safetensors: content
        differs"``; empty when they are the same.
    """
    if "config" in saved or "config" in now or "id" in saved or "id" in now:
        out = []
        if saved.get("id") != now.get("id"):
            out.append(f"id: {saved.get('id')!r} -> {now.get('id')!r}")
        old_config, new_config = saved.get("config") or {}, now.get("config") or {}
        for key in sorted(set(old_config) | set(new_config)):
            if old_config.get(key) != new_config.get(key):
                out.append(f"config {key}: {old_config.get(key)!r} -> {new_config.get(key)!r}")
        return out + fingerprint_differences(saved.get("files") or {}, now.get("files") or {})
    out = []
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            out.append(f"{name}: gone")
        elif name not in saved:
            out.append(f"{name}: new")
        elif saved[name] != now[name]:
            old, new = saved[name], now[name]
            if isinstance(old, dict) and isinstance(new, dict) and old.get("size") != new.get("size"):
                out.append(f"{name}: {old.get('size')} -> {new.get('size')} bytes")
            else:
                out.append(f"{name}: content differs")
    return out


# -------------------------------------------------------------------- lock
def _host() -> str:
    return socket.gethostname()


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<folder>/.lslo-train.lock``, held for a run's life.

    The file records the holder's pid and host. The kernel drops the lock when its holder dies,
    so a killed run leaves only a stale record, which the next run takes over with a warning.

    Args:
        folder: the run folder (created if missing).
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock.

        Returns:
            A warning to show when a stale lock of a dead process was taken over, else None.

        Raises:
            ValueError: another process holds the lock (its pid and host named).
        """
        import fcntl  # POSIX only; lslo trains on Linux and macOS

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._read(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            raise ValueError(f"{self.path.parent} is in use by another lslo train ({who}); wait for it to end or "
                             "give another --output-dir") from None
        previous = self._read(fd)
        warning = None
        pid, host = previous.get("pid"), previous.get("host")
        if isinstance(pid, int) and pid != os.getpid():
            if host == _host() and not process_alive(pid):
                warning = f"took over the stale lock of {self.path.parent} left by pid {pid} (no longer running)"
            elif host != _host():
                warning = f"took over the lock of {self.path.parent} last held by pid {pid} on host {host}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": _host()}).encode(), 0)
        self._fd = fd
        return warning

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        """Drop the lock (the record is cleared: a run that ended cleanly leaves nothing stale)."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------- reading back
@contextlib.contextmanager
def loading(path: Path) -> Iterator[None]:
    """Any failure while loading ``path`` becomes one CheckpointError naming it (no library traceback)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 (torch, safetensors and pickle raise many types for one damaged file)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointError(f"--resume: {path} cannot be loaded ({type(exc).__name__}: {reason})") from None


def safetensors_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors: its errors are OSErrors
        return OSError
    return SafetensorError


# name -> (accepted types, what it must be); the keys a resume reads from trainer_state.json
_STATE_TYPES = {
    "epoch": (int, "an int"), "step_in_epoch": (int, "an int"), "global_step": (int, "an int"),
    "pruned_epoch": (int, "an int"), "world_size": (int, "an int"), "pruning": (dict, "a table"),
    "epoch_sums": (dict, "a table"), "python_rng": (list, "a list"), "run_config": (dict, "a table"),
}


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, every field a resume uses checked for presence and type.

    Raises:
        CheckpointError: naming the file and, for a wrong or missing field, the field.
    """
    with loading(path):
        state = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {path} holds a JSON {type(state).__name__}, not a table")
    for key, (kind, what) in _STATE_TYPES.items():
        value = state.get(key)
        if key not in state or isinstance(value, bool) or not isinstance(value, kind):
            found = "missing" if key not in state else f"{type(value).__name__} {value!r}"[:80]
            raise CheckpointError(f"--resume: {path}: {key!r} must be {what}, found {found}")
    sums = state["epoch_sums"]
    for key in ("loss", "tokens", "steps"):
        if isinstance(sums.get(key), bool) or not isinstance(sums.get(key), (int, float)):
            raise CheckpointError(f"--resume: {path}: epoch_sums[{key!r}] must be a number, found {sums.get(key)!r}")
    if state["world_size"] < 1 or state["global_step"] < 0 or state["epoch"] < 1:
        raise CheckpointError(f"--resume: {path}: world_size, global_step or epoch out of range")
    return state


def rng_of_rank(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int) -> dict[str, Any]:
    """This process's RNG states from a checkpoint, checked so that setting them later cannot fail.

    Args:
        path: the checkpoint; state: its trainer state; tensors: its ``rng.safetensors``.
        rank: this process (a resharded process beyond the saved count takes rank ``rank % saved``'s).

    Returns:
        ``{"python": state, "torch": (N,) uint8 tensor, "cuda": [...] when saved}``.
    """
    saved = rank % state["world_size"]
    key = f"torch.{saved}"
    if key not in tensors:
        raise CheckpointError(f"--resume: {path / 'rng.safetensors'} has no {key!r} entry")
    torch_state = tensors[key]
    if torch_state.dtype != torch.uint8 or torch_state.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"--resume: {path / 'rng.safetensors'}: {key!r} is not a torch RNG state")
    if len(state["python_rng"]) <= saved:
        raise CheckpointError(f"--resume: {path / 'trainer_state.json'}: no python_rng entry for rank {saved}")
    python = state["python_rng"][saved]
    try:
        random.Random().setstate((python[0], tuple(python[1]), python[2]))
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise CheckpointError(f"--resume: {path / 'trainer_state.json'}: python_rng[{saved}] is not a Python RNG "
                              f"state ({exc})") from None
    rng = {"python": python, "torch": torch_state}
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith(f"cuda.{saved}."))]
    if cuda:
        rng["cuda"] = cuda
    return rng


# ------------------------------------------------------------ save errors
def _mount_of(path: str | os.PathLike) -> str:
    """``"<source> (<fstype> at <mount point>)"`` of the file system holding ``path``."""
    target = os.path.realpath(os.fspath(path))
    while not os.path.exists(target) and os.path.dirname(target) != target:
        target = os.path.dirname(target)
    best = None
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point = parts[1].replace("\\040", " ")
                if (target == point or target.startswith(point.rstrip("/") + "/")) and (
                        best is None or len(point) > len(best[1])):
                    best = (parts[0], point, parts[2])
    except OSError:
        pass
    if best is None:
        return f"the device holding {target}"
    return f"{best[0]} ({best[2]} at {best[1]})"


def is_out_of_space(exc: BaseException, folder: str | os.PathLike, needed: int) -> bool:
    """Whether a failed write ran out of space (or quota), whatever library wrapped the OSError."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    # torch.save reports a short write as "unexpected pos": check what is left.
    try:
        import shutil

        return shutil.disk_usage(folder).free < max(needed, 1 << 20)
    except OSError:
        return False


def save_error_message(exc: BaseException, *, what: str, folder: str | os.PathLike, needed: int,
                       last_good: str | os.PathLike | None) -> str:
    """One line for a save that failed.

    Args:
        exc: the exception the write raised.
        what: what was being written (``"checkpoint step-00000004"``).
        folder: where it was being written.
        needed: bytes the save needs, about.
        last_good: the newest checkpoint known to be good, or None.
    """
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before"
    if is_out_of_space(exc, folder, needed):
        return (f"no space left on {_mount_of(folder)} while writing {what} in {folder} "
                f"(needs ~{max(needed, 1) / 1e6:.1f} MB); {where}; free space and run again with --resume")
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"could not write {what} in {folder} ({reason}); {where}; fix that and run again with --resume"


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
