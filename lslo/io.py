"""Crash-safe files and directories: a kill at any instant leaves the old version or the new one.

Three rules, for adapter folders now and training checkpoints later:

- A file is written beside its target under a temporary name, fsynced, then renamed over it
  (:func:`atomic_write_file`).
- A directory of several files is written as a fresh directory beside the target, fsynced, then
  swapped in as a whole (:func:`atomic_directory`). On Linux the swap is one
  ``renameat2(RENAME_EXCHANGE)``: the target path never stops existing. Elsewhere (or on a file
  system without it) the old directory is renamed aside and the new one renamed in; a kill between
  the two renames leaves no target, and :func:`recover_directory` rolls the new one forward.
- Temporary names carry the writer's host and pid (``.<name>.lslo-<stage>.<host>.<pid>.<random>``),
  so that a later save or load can tell a dead writer's debris, which it deletes, from a live
  writer's files, which it never touches.

Stages of a directory save: ``new`` (being written), ``ready`` (complete and fsynced, waiting for
the swap), ``old`` (the replaced directory, being deleted). A ``file`` entry is the temporary file
of :func:`atomic_write_file`.

One writer per target at a time is assumed (two concurrent savers both succeed, the last swap
wins, and neither save is ever mixed with the other on Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

__all__ = ["atomic_directory", "atomic_write_file", "process_alive", "read_directory_files", "recover_directory"]

_STAGES = ("file", "new", "ready", "old")
# What follows ".<name>.lslo-" in a temporary name: stage, host, pid, random tag.
_TEMP_SUFFIX = re.compile(r"^(file|new|ready|old)\.([A-Za-z0-9-]{1,32})\.([1-9][0-9]{0,9})\.([0-9a-f]{8})$")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"

# renameat2 flags and the "current directory" fd of the *at() calls (Linux uapi values).
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


# ------------------------------------------------------------------ names
def _temp_path(parent: str, name: str, stage: str) -> str:
    return os.path.join(parent, f".{name}.lslo-{stage}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}")


def _resolve(path: str | os.PathLike) -> tuple[str, str, str]:
    """(target, parent, name): absolute, with a symlink at the last component followed.

    A symlinked target is saved where the link points: the swap must happen inside the directory
    that really holds it, or it would replace the link by a directory.
    """
    target = os.path.abspath(os.fspath(path))
    if os.path.islink(target):
        target = os.path.realpath(target)
    parent, name = os.path.split(target)
    if not name or name in (".", ".."):
        raise ValueError(f"{os.fspath(path)!r} does not name a file or directory")
    return target, parent, name


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still be running (when unsure: yes).

    Used by the temporary-name recovery here and by the run lock (:mod:`lslo.checkpoints`).
    """
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists under another user
        return True
    # A killed child that its parent has not reaped yet is a zombie: it still answers kill(pid, 0).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[:1]
    except OSError:
        return True
    return state not in (["Z"], ["X"])


def _writer_alive(host: str, pid: int) -> bool:
    """Whether the process that owns a temporary name may still be running (when unsure: yes)."""
    if host != _HOST or pid == os.getpid():
        return True  # another machine's process cannot be checked from here
    return process_alive(pid)


def _dead_entries(parent: str, name: str, stages: Sequence[str] = _STAGES) -> list[tuple[str, str]]:
    """(stage, path) of the temporary entries for ``name`` in ``parent`` whose writer is dead."""
    prefix = f".{name}.lslo-"
    try:
        entries = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    dead = []
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        match = _TEMP_SUFFIX.match(entry[len(prefix):])
        if match is None or match.group(1) not in stages:
            continue
        if not _writer_alive(match.group(2), int(match.group(3))):
            dead.append((match.group(1), os.path.join(parent, entry)))
    return dead


def _remove(path: str) -> None:
    # Best effort: debris that cannot be deleted (read-only share, ...) must not fail a load.
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


# ------------------------------------------------------------------ fsync
def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some platforms cannot open a directory for fsync (Windows)
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # file systems that can't fsync a directory still keep renames in order
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if not os.path.islink(path):
                _fsync_path(path)
        _fsync_path(dirpath, directory=True)


# ---------------------------------------------------------------- renames
def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def _exchange(first: str, second: str) -> bool:
    """Swap two existing paths in one atomic step; False when the platform or file system can't."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), first, None, second)


# ------------------------------------------------------------------- files
def atomic_write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file all-or-nothing: readers see the old content or the new, never a part.

    ``write(tmp)`` writes the content to the path it is given, a temporary file beside ``path``
    whose name carries this process's pid; the file is then fsynced, given the mode a normally
    created file gets under the current umask (0644 under umask 022, not mkstemp's 0600), and
    renamed over ``path``. An exception in ``write`` removes the temporary file and propagates.
    Temporary files of earlier writers of ``path`` that died are removed first.

    Args:
        path: the file to create or replace; its folder must exist.
        write: called once with the temporary path.
    """
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: no such directory (to write {name})")
    for _, debris in _dead_entries(parent, name, ("file",)):
        _remove(debris)
    tmp = _temp_path(parent, name, "file")
    # Created the way open(path, "w") creates a file, so its mode is what the umask gives;
    # recorded now and restored after write(), which may replace the file (save_file does).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(parent, directory=True)  # the rename itself must survive a power cut


# ------------------------------------------------------------- directories
def recover_directory(path: str | os.PathLike) -> None:
    """Finish or undo an interrupted :func:`atomic_directory` swap of ``path``; delete dead debris.

    If ``path`` is missing and a dead writer left a complete new directory (stage ``ready``), it
    is renamed into place (roll forward); failing that, a directory it had moved aside (stage
    ``old``) is put back (roll back). Then every temporary entry for ``path`` whose writer is dead
    is deleted; entries of live writers (and of other machines) are left alone, and so is
    everything else in the folder. Cheap when there is nothing to do (one ``listdir``).

    Args:
        path: the directory a save targets (need not exist).
    """
    target, parent, name = _resolve(path)
    dead = _dead_entries(parent, name)
    if not dead:
        return
    if not os.path.lexists(target):
        for stage in ("ready", "old"):
            candidates = [p for s, p in dead if s == stage and os.path.isdir(p)]
            if candidates:
                newest = max(candidates, key=lambda p: os.stat(p).st_mtime_ns)
                os.rename(newest, target)
                _fsync_path(parent, directory=True)
                dead = [(s, p) for s, p in dead if p != newest]
                break
    for _, debris in dead:
        _remove(debris)


def _check_replaceable(target: str, replaceable: Iterable[str] | None) -> None:
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise ValueError(f"{target} exists and is not a directory")
    if replaceable is None:
        return
    patterns = list(replaceable)
    foreign = sorted(e for e in os.listdir(target) if not any(fnmatch.fnmatchcase(e, p) for p in patterns))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{target} holds entries that are not part of the save that would replace it ({shown}); "
            "a save replaces the whole directory: give it an empty or dedicated directory"
        )


def _swap_in(ready: str, target: str, parent: str, name: str) -> None:
    """Make the complete directory ``ready`` be ``target``; delete what ``target`` was."""
    if not os.path.lexists(target):
        try:
            os.rename(ready, target)  # atomic; also replaces an empty directory created meanwhile
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        else:
            _fsync_path(parent, directory=True)
            return
    old = _temp_path(parent, name, "old")
    if _exchange(ready, target):
        # `ready` now holds the replaced directory. Rename it to an `old` name before deleting it,
        # so that a half-deleted directory never carries a name that recovery could roll forward.
        _fsync_path(parent, directory=True)
        os.rename(ready, old)
    else:
        os.rename(target, old)
        try:
            os.rename(ready, target)
        except BaseException:
            os.rename(old, target)
            raise
        _fsync_path(parent, directory=True)
    _remove(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replaceable: Iterable[str] | None = None) -> Iterator[str]:
    """Write a directory all-or-nothing: yields a fresh temporary directory to fill.

    On normal exit every file in it is fsynced and the whole directory is swapped in as ``path``
    (an existing ``path`` is replaced, with whatever it held); on an exception it is deleted and
    ``path`` is untouched. A kill at any instant leaves ``path`` as the old directory or the new
    one, never a mix, once :func:`recover_directory` has run (saves and loads run it first).
    The temporary directory is created with ``mkdir`` (mode per umask), beside ``path``.

    Args:
        path: the directory to create or replace; missing parents are created.
        replaceable: glob patterns of the entries an existing ``path`` may hold. When given, a
            ``path`` holding anything else is refused with ValueError before anything is written
            (a save must not delete a user's other files). None: replace whatever is there.

    Yields:
        The temporary directory's path (a str).
    """
    target, parent, name = _resolve(path)
    os.makedirs(parent, exist_ok=True)
    recover_directory(target)
    patterns = None if replaceable is None else list(replaceable)
    _check_replaceable(target, patterns)
    new = _temp_path(parent, name, "new")
    os.mkdir(new)  # mode per umask, as a normally created directory
    if os.path.isdir(target):  # a replaced directory keeps its permissions
        os.chmod(new, stat.S_IMODE(os.stat(target).st_mode))
    current = new
    try:
        yield new
        _fsync_tree(new)
        ready = _temp_path(parent, name, "ready")
        os.rename(new, ready)  # from here on, recovery may roll this directory forward
        current = ready
        _fsync_path(parent, directory=True)
        _check_replaceable(target, patterns)  # again: files may have appeared while writing
        _swap_in(ready, target, parent, name)
    except BaseException:
        if os.path.lexists(current):
            shutil.rmtree(current, ignore_errors=True)
        raise


def read_directory_files(path: str | os.PathLike, names: Sequence[str]) -> dict[str, bytes | None]:
    """Read several files of one directory as they were in one save.

    All files are opened relative to one handle on the directory, so a concurrent
    :func:`atomic_directory` swap cannot hand back one file from the old save and another from the
    new one; if the old directory is deleted while the files are being opened, the read starts again.

    Args:
        path: the directory.
        names: file names inside it.

    Returns:
        {name: content, or None for a file that does not exist}.

    Raises:
        FileNotFoundError / NotADirectoryError: ``path`` is not a directory.
    """
    target = os.fspath(path)
    if os.open not in os.supports_dir_fd:  # Windows: no directory handles; plain reads
        contents = {}
        for name in names:
            try:
                with open(os.path.join(target, name), "rb") as f:
                    contents[name] = f.read()
            except FileNotFoundError:
                contents[name] = None
        return contents
    for attempt in range(3):
        contents = _read_through_handle(target, names, retry=attempt < 2)
        if contents is not None:
            return contents
    raise AssertionError("unreachable: the last attempt does not retry")


def _read_through_handle(target: str, names: Sequence[str], retry: bool) -> dict[str, bytes | None] | None:
    dir_fd = os.open(target, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    handles: dict[str, int | None] = {}
    try:
        for name in names:
            try:
                handles[name] = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:
                handles[name] = None
        if retry and None in handles.values():
            try:
                swapped = not os.path.samestat(os.fstat(dir_fd), os.stat(target))
            except FileNotFoundError:
                swapped = True
            if swapped:
                return None  # the directory was replaced while we opened it: read the new one
        contents: dict[str, bytes | None] = {}
        for name, fd in handles.items():
            if fd is None:
                contents[name] = None
            else:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    contents[name] = f.read()
        return contents
    finally:
        for fd in handles.values():
            if fd is not None:
                os.close(fd)
        os.close(dir_fd)
