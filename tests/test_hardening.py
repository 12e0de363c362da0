"""Hardening (issue 13): adapter directories that survive SIGKILL, dead saves' debris, file modes,
damaged files, one-line CLI errors, and misuse that used to pass silently. One test per defect.

The kill test runs this file as a script (``python -m tests.test_hardening --kill-writer ROOT``):
that process forks one writer per trial and SIGKILLs it, then this process loads every directory
left behind.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lslo
import lslo.io
from lslo import LSLoConfig, LSLoLinear
from lslo.config import learned_encoder_plan, paper_encoder_plan
from lslo.io import atomic_directory, atomic_write_file, read_directory_files, recover_directory
from lslo.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

REPO = Path(__file__).resolve().parent.parent
LANGS = ["en", "fr", "oc"]


# ------------------------------------------------------------ a tiny seq2seq
class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)


class _Stack(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(_Block(width) for _ in range(depth))


class TinySeq2Seq(nn.Module):
    """Linears at encoder.layers.<i>.fc1/fc2 and decoder.layers.<i>.fc1/fc2: what apply_lslo targets."""

    def __init__(self, width: int = 64, depth: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = _Stack(width, depth)
        self.decoder = _Stack(width, depth)


def generation_config(gen: int) -> LSLoConfig:
    """The config of save number ``gen``: ranks, index plan and scale all change from one save to the next."""
    ranks = [2, 3, 8] if gen % 2 == 0 else [4, 1, 2]
    return LSLoConfig(languages=LANGS, ranks=ranks, target_modules="fc", index_plan="paper" if gen % 2 == 0 else "tgt",
                      scale=1.0 + gen)


def fill_generation(model: nn.Module, gen: int) -> nn.Module:
    with torch.no_grad():
        for module in lslo.lslo_modules(model).values():
            module.lora_A.fill_(gen + 0.25)
            module.lora_B.fill_(gen + 0.5)
            module.scales.fill_(1.0 + gen)
    return model


def generation_model(gen: int, width: int = 64) -> nn.Module:
    return fill_generation(lslo.apply_lslo(TinySeq2Seq(width), generation_config(gen)), gen)


def saved_generation(directory: Path, width: int = 64) -> int | None:
    """Which save ``directory`` holds (None: no save), after checking that config and tensors agree."""
    model = TinySeq2Seq(width)
    try:
        lslo.load_adapters(model, directory)
    except ValueError as exc:
        if "holds no LSLo adapters" in str(exc):
            return None
        raise
    config = lslo.get_lslo_config(model)
    gen = round(config.scale - 1.0)
    expected = generation_config(gen)
    assert config.to_dict() == expected.to_dict(), f"{directory}: config of save {gen} is not that save's config"
    for name, module in lslo.lslo_modules(model).items():
        assert bool((module.lora_A == gen + 0.25).all()), f"{directory}: {name}.lora_A is not from save {gen}"
        assert bool((module.lora_B == gen + 0.5).all()), f"{directory}: {name}.lora_B is not from save {gen}"
        assert bool((module.scales == 1.0 + gen).all()), f"{directory}: {name}.scales is not from save {gen}"
    return gen


# ------------------------------------------------------- the SIGKILL writer
_HOOKED_OS = ("mkdir", "rename", "replace", "fsync", "unlink", "rmdir", "chmod")


def _kill_self_at(event: int) -> None:
    """SIGKILL this process just before its ``event``-th file-system step (0-based) of a save."""
    import safetensors.torch

    count = [0]

    def hooked(function):
        def call(*args, **kwargs):
            if count[0] == event:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return function(*args, **kwargs)

        return call

    for name in _HOOKED_OS:
        setattr(os, name, hooked(getattr(os, name)))
    lslo.io._exchange = hooked(lslo.io._exchange)
    safetensors.torch.save_file = hooked(safetensors.torch.save_file)


def _run_child(body) -> int | None:
    """Fork; the child runs ``body()`` then exits 0. Returns the signal that ended it (None: it finished)."""
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        try:
            body()
        except BaseException:  # noqa: BLE001 (a child must never unwind into the caller's stack)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    if os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"writer child failed with status {os.WEXITSTATUS(status)}")
    return None


def _force_fallback() -> None:
    lslo.io._exchange = lambda first, second: False


def _kill_writer(root: Path, random_trials: int, seed: int) -> list[dict]:
    """Every trial leaves one directory ``<root>/<trial>/adapters`` and the saves it may hold."""
    torch.set_num_threads(1)  # no OpenMP pool in a process that forks
    models: dict[int, nn.Module] = {}

    def model_of(gen):  # built before any fork, so that a child only saves
        if gen not in models:
            models[gen] = generation_model(gen)
        return models[gen]

    for gen in range(3):
        model_of(gen)
    trials = []
    modes = ["exchange", "fallback"] if lslo.io._RENAMEAT2 is not None else ["fallback"]
    # The saves a trial starts from, written once and copied (a copy costs no fsync).
    templates = {gen: root / "templates" / str(gen) / "adapters" for gen in range(2)}
    for gen, template in templates.items():
        lslo.save_adapters(model_of(gen), template)

    def start_from(gen, target):
        target.parent.mkdir(parents=True)
        shutil.copytree(templates[gen], target)
    # 1. Deterministic: a kill before each file-system step of a save, first save or replacing one.
    for mode in modes:
        for case in ("first", "replace"):
            for event in range(200):
                target = root / f"{mode}-{case}-{event}" / "adapters"
                old = 1 if case == "replace" else None
                if old is not None:
                    start_from(old, target)
                new = 2 if case == "replace" else 1

                def save(mode=mode, target=target, new=new, event=event):
                    if mode == "fallback":
                        _force_fallback()
                    _kill_self_at(event)
                    lslo.save_adapters(model_of(new), target)

                killed = _run_child(save)
                trials.append({"dir": str(target), "allowed": [old, new] if killed else [new],
                               "what": f"{mode} {case}: kill before step {event}" if killed else f"{mode} {case}: done"})
                if not killed:
                    break
    # 2. A second kill during the recovery of a fallback save killed between its two renames.
    for event in range(20):
        target = root / f"recover-{event}" / "adapters"
        start_from(1, target)

        def interrupted_swap(target=target):
            _force_fallback()
            real_rename = os.rename

            def rename(src, dst, **kwargs):
                real_rename(src, dst, **kwargs)
                if os.path.basename(str(dst)).startswith(".adapters.lslo-old."):
                    os.kill(os.getpid(), signal.SIGKILL)  # the old save is aside, the new one not yet in

            os.rename = rename
            lslo.save_adapters(model_of(2), target)

        assert _run_child(interrupted_swap) == signal.SIGKILL
        assert not target.exists()

        def recover(target=target, event=event):
            _kill_self_at(event)
            recover_directory(target)

        killed = _run_child(recover)
        trials.append({"dir": str(target), "allowed": [1, 2],
                       "what": f"recovery killed before step {event}" if killed else "recovery done"})
        if not killed:
            break
    # 3. Kills at random instants while a writer saves one generation after another.
    started = time.perf_counter()
    for gen in range(3):
        lslo.save_adapters(model_of(gen), root / "timing" / "adapters")
    seconds_per_save = (time.perf_counter() - started) / 3
    shutil.rmtree(root / "timing")
    rng = random.Random(seed)
    for trial in range(random_trials):
        mode = modes[trial % len(modes)]
        target = root / f"random-{trial}" / "adapters"
        start_from(0, target)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                if mode == "fallback":
                    _force_fallback()
                for gen in range(1, 1_000_000):
                    model = model_of(gen)
                    os.write(write_end, f"{gen}\n".encode())  # announced before its save starts
                    lslo.save_adapters(model, target)
            finally:
                os._exit(1)
        os.close(write_end)
        time.sleep(rng.uniform(0.0, 4 * seconds_per_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as pipe:
            announced = [int(line) for line in pipe.read().split()]
        last = announced[-1] if announced else 0
        trials.append({"dir": str(target), "allowed": [last - 1, last] if last else [0],
                       "what": f"{mode}: random kill during save {last}"})
    shutil.rmtree(root / "templates")
    return trials


def test_sigkill_during_saves_leaves_the_previous_or_the_new_save(tmp_path):
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        pytest.skip("the kill loop forks writers and reads /proc (Linux)")
    # ~120 kills; 7-18 s on 2 busy cores (mostly fsync and fork).
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_hardening", "--kill-writer", str(tmp_path), "--random-trials", "30"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = json.loads(result.stdout.strip().splitlines()[-1])
    kills = [t for t in trials if "kill" in t["what"]]
    assert len(kills) >= 60, [t["what"] for t in trials]
    held = {}
    for trial in trials:
        directory = Path(trial["dir"])
        gen = saved_generation(directory)  # load_adapters recovers first
        assert gen in trial["allowed"], f"{trial['what']}: {directory} holds save {gen}, expected {trial['allowed']}"
        held[trial["what"]] = gen
        # The load removed every dead writer's temporary directory: only the save itself is left.
        left = os.listdir(directory.parent) if directory.parent.exists() else []  # killed before its mkdir
        assert set(left) <= {"adapters"}, (trial["what"], left)
    # Both outcomes happened: kills before the swap keep the old save, kills after it the new one.
    for mode in ("exchange", "fallback") if lslo.io._RENAMEAT2 is not None else ("fallback",):
        outcomes = {gen for what, gen in held.items() if what.startswith(f"{mode} replace: kill")}
        assert outcomes == {1, 2}, (mode, outcomes)
    assert {gen for what, gen in held.items() if what.startswith("recovery")} == {2}  # rolled forward


def test_a_reader_never_sees_a_mix_while_another_thread_saves(tmp_path):
    if lslo.io._RENAMEAT2 is None:
        pytest.skip("without renameat2 the target is briefly absent during a swap (documented)")
    target = tmp_path / "adapters"
    models = [generation_model(gen) for gen in range(40)]
    lslo.save_adapters(models[0], target)
    done = threading.Event()
    errors = []

    def writer():
        try:
            for gen in range(1, 400):
                if done.is_set():
                    return
                lslo.save_adapters(models[gen % len(models)], target)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        for _ in range(60):
            seen.add(saved_generation(target))
            if done.is_set():
                break
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert len(seen) > 1 and None not in seen  # it did read while saves went on


# ---------------------------------------------------------------- debris
def _debris(parent: Path, stage: str, pid: int, host: str | None = None, tag: str = "0123abcd") -> Path:
    path = parent / f".adapters.lslo-{stage}.{host or lslo.io._HOST}.{pid}.{tag}"
    path.mkdir()
    (path / ADAPTER_WEIGHTS_NAME).write_bytes(b"x" * 1000)
    return path


def test_only_dead_saves_debris_is_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = finished.pid
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "adapters"
        dead_entries = [_debris(tmp_path, "new", dead), _debris(tmp_path, "ready", dead, tag="00000001"),
                        _debris(tmp_path, "old", dead, tag="00000002")]
        kept = [_debris(tmp_path, "new", alive.pid), _debris(tmp_path, "new", dead, host="another-host"),
                tmp_path / ".adapters.backup", tmp_path / "notes.txt", tmp_path / ".other.lslo-new.x.1.0123abcd"]
        kept[2].mkdir()
        kept[3].write_text("mine")
        kept[4].mkdir()
        lslo.save_adapters(generation_model(3), target)  # a later save cleans up first
        assert saved_generation(target) == 3
        assert not any(p.exists() for p in dead_entries)
        assert all(p.exists() for p in kept)
        # A later load does the same.
        again = _debris(tmp_path, "new", dead, tag="00000003")
        assert saved_generation(target) == 3 and not again.exists() and all(p.exists() for p in kept)
        # A dead writer's complete save with no target: rolled forward on load (killed mid-swap).
        ready = tmp_path / "ready-source"
        lslo.save_adapters(generation_model(4), ready)
        os.rename(ready, tmp_path / f".lost.lslo-ready.{lslo.io._HOST}.{dead}.0123abcd")
        assert saved_generation(tmp_path / "lost") == 4
        # atomic_write_file removes its dead temporary files of the same target, and only those.
        stale = tmp_path / f".metrics.jsonl.lslo-file.{lslo.io._HOST}.{dead}.0123abcd"
        live = tmp_path / f".metrics.jsonl.lslo-file.{lslo.io._HOST}.{alive.pid}.0123abcd"
        stale.write_text("x")
        live.write_text("x")
        atomic_write_file(tmp_path / "metrics.jsonl", lambda tmp: Path(tmp).write_text("{}\n"))
        assert not stale.exists() and live.exists() and (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    finally:
        alive.kill()
        alive.wait()


def test_a_failed_save_keeps_the_old_one_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "adapters"
    lslo.save_adapters(generation_model(1), target)

    def disk_full(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lslo.save_adapters(generation_model(2), target)
    assert saved_generation(target) == 1
    assert os.listdir(tmp_path) == ["adapters"]


def test_save_refuses_to_replace_a_directory_holding_other_files(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"run holds entries that are not part of the save.*notes\.txt"):
        lslo.save_adapters(generation_model(1), target)
    assert os.listdir(target) == ["notes.txt"] and os.listdir(tmp_path) == ["run"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        lslo.save_adapters(generation_model(1), tmp_path / "file")
    # An adapter folder with the old per-file writer's temporary debris is replaceable.
    target = tmp_path / "adapters"
    lslo.save_adapters(generation_model(1), target)
    (target / f".{ADAPTER_WEIGHTS_NAME}.k2j3h4.tmp").write_bytes(b"old debris")
    lslo.save_adapters(generation_model(2), target)
    assert sorted(os.listdir(target)) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md"])  # + the card


def test_atomic_directory_generic_use(tmp_path):
    target = tmp_path / "deep" / "checkpoint"
    with atomic_directory(target) as staging:
        Path(staging, "a.txt").write_text("one")
        os.mkdir(os.path.join(staging, "sub"))
        Path(staging, "sub", "b.txt").write_text("two")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as staging:
        Path(staging, "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one" and (target / "sub" / "b.txt").read_text() == "two"
    assert os.listdir(target.parent) == ["checkpoint"]
    assert read_directory_files(target, ["a.txt", "missing"]) == {"a.txt": b"one", "missing": None}


# ----------------------------------------------------------------- modes
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        target = tmp_path / "adapters"
        lslo.save_adapters(generation_model(1), target)
        atomic_write_file(tmp_path / "metrics.jsonl", lambda tmp: Path(tmp).write_text("{}\n"))
        # What open() and mkdir() give under the same umask: the modes a normal writer would get.
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain-dir").mkdir()
    finally:
        os.umask(previous)
    file_mode = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    dir_mode = stat.S_IMODE((tmp_path / "plain-dir").stat().st_mode)
    assert file_mode == 0o666 & ~umask and dir_mode == 0o777 & ~umask
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        assert stat.S_IMODE((target / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE(target.stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "metrics.jsonl").stat().st_mode) == file_mode
    # A replaced directory keeps the permissions its owner gave it.
    target.chmod(0o750)
    lslo.save_adapters(generation_model(2), target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


# ----------------------------------------------------------- damaged files
def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _json_edit(edit):
    def damage(data: bytes) -> bytes:
        meta = json.loads(data)
        return json.dumps(edit(meta)).encode()

    return damage


def _float_ranks(data: bytes) -> bytes:
    from safetensors.torch import load, save

    tensors = load(data)
    return save({k: (v.double() if k.endswith(".ranks") else v) for k, v in tensors.items()})


DAMAGES = {
    "weights empty": (ADAPTER_WEIGHTS_NAME, lambda data: b"", "damaged or not a safetensors file"),
    "weights truncated": (ADAPTER_WEIGHTS_NAME, _truncate, "damaged or not a safetensors file"),
    "weights random bytes": (ADAPTER_WEIGHTS_NAME, lambda data: random.Random(0).randbytes(len(data)),
                             "damaged or not a safetensors file"),
    "weights float ranks": (ADAPTER_WEIGHTS_NAME, _float_ranks, "ranks must be a 1-D integer tensor"),
    "config empty": (ADAPTER_CONFIG_NAME, lambda data: b"", "damaged or not an LSLo adapter config"),
    "config truncated": (ADAPTER_CONFIG_NAME, _truncate, "damaged or not an LSLo adapter config"),
    "config not utf-8": (ADAPTER_CONFIG_NAME, lambda data: b"\xff\xfe" + data, "damaged or not an LSLo adapter config"),
    "config a JSON list": (ADAPTER_CONFIG_NAME, lambda data: b"[1, 2]", "not an LSLo adapter config"),
    "config without base_model": (ADAPTER_CONFIG_NAME, _json_edit(lambda m: {k: v for k, v in m.items() if k != "base_model"}),
                                  "'base_model' is missing"),
    "config of another format": (ADAPTER_CONFIG_NAME, _json_edit(lambda m: {**m, "format": "peft"}),
                                 "not an LSLo adapter file"),
    "config NaN scale": (ADAPTER_CONFIG_NAME, lambda data: data.replace(b'"scale": 1.0', b'"scale": NaN'),
                         "LSLoConfig.scale must be finite"),
    "config bad ranks": (ADAPTER_CONFIG_NAME, _json_edit(lambda m: {**m, "config": {**m["config"], "ranks": "x"}}),
                         "damaged LSLo adapter config: LSLoConfig.ranks"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_or_foreign_files_raise_value_error_naming_the_file(tmp_path, damage):
    name, corrupt, message = DAMAGES[damage]
    target = tmp_path / "adapters"
    lslo.save_adapters(generation_model(0), target)
    path = target / name
    damaged = corrupt(path.read_bytes())
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)
    model = TinySeq2Seq()
    with pytest.raises(ValueError, match=message) as info:
        lslo.load_adapters(model, target)
    assert str(path) in str(info.value)
    assert lslo.get_lslo_config(model) is None and not lslo.lslo_modules(model)  # left as it came
    if name == ADAPTER_CONFIG_NAME:
        with pytest.raises(ValueError, match=message):
            lslo.model.read_adapter_config(target)


def test_a_config_without_its_tensor_file_names_the_missing_file(tmp_path):
    target = tmp_path / "adapters"
    lslo.save_adapters(generation_model(0), target)
    (target / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=f"{ADAPTER_WEIGHTS_NAME}: not found"):
        lslo.load_adapters(TinySeq2Seq(), target)


# --------------------------------------------------------------- misuse
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, [1.0, math.nan], torch.tensor([1.0, math.inf])])
def test_layer_refuses_a_non_finite_scale(scale):
    with pytest.raises(ValueError, match=r"scale(\[1\])? = .*must be finite"):
        LSLoLinear(nn.Linear(8, 8), [2, 3], scale=scale)


@pytest.mark.parametrize("scale, name", [([1.0, "2"], r"scale\[1\] must be a number, got str '2'"),
                                         ("2.0", "scale must be a number"), ([True, 1.0], r"scale\[0\]"),
                                         (None, "scale must be a number")])
def test_layer_refuses_a_scale_that_is_not_a_number(scale, name):
    with pytest.raises(TypeError, match=name):
        LSLoLinear(nn.Linear(8, 8), [2, 3], scale=scale)


def test_layer_scales_accept_numbers_of_any_kind():
    import numpy as np

    layer = LSLoLinear(nn.Linear(8, 8), [2, 3], scale=[np.float32(0.5), 2])
    assert layer.scales.tolist() == [0.5, 2.0]
    assert LSLoLinear(nn.Linear(8, 8), [2, 3], scale=torch.tensor(1.5)).scales.tolist() == [1.5, 1.5]


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_config_refuses_a_non_finite_scale(scale):
    with pytest.raises(ValueError, match="LSLoConfig.scale must be finite"):
        LSLoConfig(scale=scale)


def test_target_module_names_that_match_nothing_are_refused():
    model = TinySeq2Seq()
    with pytest.raises(ValueError, match=r"target_modules: \['q_proj'\] matched no nn.Linear.*matched 8 modules"):
        lslo.apply_lslo(model, LSLoConfig(languages=LANGS, ranks=2, target_modules=["fc1", "q_proj", "fc2"]))
    assert not lslo.lslo_modules(model) and lslo.get_lslo_config(model) is None
    assert all(p.requires_grad for p in model.parameters())  # untouched
    applied = lslo.apply_lslo(model, LSLoConfig(languages=LANGS, ranks=2, target_modules=["encoder.layers.0.fc1", "fc2"]))
    assert len(lslo.lslo_modules(applied)) == 5


def _merged_pair(index="tgt"):
    torch.manual_seed(0)
    layer = LSLoLinear(nn.Linear(8, 6).double(), [2, 3, 1], index=index)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer, copy.deepcopy(layer)


def test_a_merged_layer_refuses_ids_of_another_language():
    layer, unmerged = _merged_pair()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.int64)
    layer.merge(1)
    torch.testing.assert_close(layer(x, lang=ones), unmerged(x, lang=ones))
    with lslo.route(tgt=ones):
        torch.testing.assert_close(layer(x), unmerged(x))
    torch.testing.assert_close(layer(x), unmerged.base_layer(x) + (unmerged(x, lang=ones) - unmerged.base_layer(x)))
    mixed = torch.tensor([1, 0, 1, 2])
    with pytest.raises(ValueError, match=r"language 1 is merged.*other languages \[0, 2\].*unmerge"):
        layer(x, lang=mixed)
    with pytest.raises(ValueError, match=r"other languages \[0, 2\]"), lslo.route(tgt=mixed):
        layer(x)
    with pytest.raises(ValueError, match=r"other languages \[-1\]"):
        layer(x, lang=torch.tensor([1, 1, -1, 1]))
    layer.unmerge()
    torch.testing.assert_close(layer(x, lang=mixed), unmerged(x, lang=mixed))


def test_translate_refuses_a_sentence_that_is_not_a_string():
    from lslo.inference import translate

    with pytest.raises(TypeError, match=r"sentences\[1\] must be a str, got NoneType None"):
        translate(nn.Linear(2, 2), tokenizer=None, sentences=["Kasa.", None], src_langs="en", tgt_langs="fr")


def test_config_ranks_as_a_list_aligned_with_languages():
    config = LSLoConfig(languages=LANGS, ranks=[2, 4, 8])
    assert config.language_ranks == (2, 4, 8)
    assert config.to_dict() == LSLoConfig(languages=LANGS, ranks={"en": 2, "fr": 4, "oc": 8}).to_dict()
    assert LSLoConfig(languages=LANGS, ranks=(1, 1, 1)).language_ranks == (1, 1, 1)
    model = lslo.apply_lslo(TinySeq2Seq(), config)
    assert {m.ranks for m in lslo.lslo_modules(model).values()} == {(2, 4, 8)}
    with pytest.raises(ValueError, match=r"2 ranks for 3 languages \(en, fr, oc\)"):
        LSLoConfig(languages=LANGS, ranks=[2, 4])
    with pytest.raises(ValueError, match=r"ranks\[1\] \(fr\): rank must be an int"):
        LSLoConfig(languages=LANGS, ranks=[2, "4", 8])
    with pytest.raises(ValueError, match=r"ranks\[2\] \(oc\): rank must be >= 1"):
        LSLoConfig(languages=LANGS, ranks=[2, 4, 0])


def test_index_preset_paper_and_its_deprecated_alias():
    paper = LSLoConfig(index_plan="paper")
    assert LSLoConfig().index_plan == "paper"
    assert paper.resolve_index_plan(12, 12) == {"encoder": ["src"] * 9 + ["tgt"] * 3, "decoder": ["tgt"] * 12}
    with pytest.warns(DeprecationWarning, match="'learned' is deprecated; use 'paper'"):
        old = LSLoConfig(index_plan="learned")
    assert old.index_plan == "paper" and old.to_dict() == paper.to_dict()
    with pytest.warns(DeprecationWarning):
        mixed = LSLoConfig(index_plan={"encoder": "learned", "decoder": "tgt"})
    assert mixed.resolve_index_plan(12, 12) == paper.resolve_index_plan(12, 12)
    # Files saved under the old name load quietly and compare equal to the new name.
    stored = {**paper.to_dict(), "index_plan": "learned"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LSLoConfig.from_dict(stored).to_dict() == paper.to_dict()
    assert learned_encoder_plan is paper_encoder_plan


# ------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tests.hf_fixtures import make_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("hardening-cli")
    tokenizer = make_tokenizer(root / "spm")
    base = tiny_model(tokenizer, seed=4, dtype=torch.float32)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lslo.save_adapters(lslo.apply_lslo(base, LSLoConfig(languages=["en", "fr"], ranks=[2, 4])), root / "adapters")
    (root / "in.tsv").write_text("en\tfr\tKasa lo.\n", encoding="utf-8")
    return root


def _cli_error(capsys, argv) -> str:
    from lslo.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    # The error is the last line; above it only transformers' own progress bars (loading the base model).
    lines = err.replace("\r", "\n").rstrip("\n").split("\n")
    assert lines[-1].startswith("lslo: error: ") and err.endswith("\n") and "Traceback" not in err, err
    assert sum("error" in line for line in lines) == 1, err
    return lines[-1]


def _damaged_copy(hf_folder, tmp_path, name, data) -> Path:
    copy_dir = tmp_path / "adapters"
    shutil.copytree(hf_folder / "adapters", copy_dir)
    (copy_dir / name).write_bytes(data)
    return copy_dir / name


@pytest.mark.parametrize("name, data", [(ADAPTER_CONFIG_NAME, b'{"format": "lslo-adap'),
                                        (ADAPTER_WEIGHTS_NAME, b"\x00" * 64)])
def test_cli_damaged_adapters_is_one_line_exit_2(hf_folder, tmp_path, capsys, name, data):
    path = _damaged_copy(hf_folder, tmp_path, name, data)
    err = _cli_error(capsys, ["translate", "--model", str(hf_folder / "model"), "--adapters", str(path.parent),
                              "--input", str(hf_folder / "in.tsv"), "--quiet"])
    assert str(path) in err and "damaged" in err


def test_cli_missing_device_backend_is_one_line_exit_2(hf_folder, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, even on a GPU box
    err = _cli_error(capsys, ["translate", "--model", str(hf_folder / "model"), "--device", "cuda",
                              "--input", str(hf_folder / "in.tsv"), "--quiet"])
    assert "device 'cuda': CUDA is not available on this machine" in err
    err = _cli_error(capsys, ["translate", "--model", str(hf_folder / "model"), "--device", "gpu0",
                              "--input", str(hf_folder / "in.tsv"), "--quiet"])
    assert "'gpu0' is not a torch device" in err


@pytest.mark.parametrize("model", ["/nonexistent/m2m", "./no-such-model-dir", "runs/a/model"])
def test_cli_missing_local_model_says_no_such_directory(hf_folder, capsys, model):
    err = _cli_error(capsys, ["translate", "--model", model, "--input", str(hf_folder / "in.tsv"), "--quiet"])
    assert f"{model}: no such directory" in err


def test_cli_user_error_through_the_console_entry(hf_folder):
    # The real process: exit status 2 and one line on stderr, no traceback.
    result = subprocess.run([sys.executable, "-m", "lslo.cli", "merge", "--model", "/nonexistent/m2m", "--adapters",
                             str(hf_folder / "adapters"), "--src", "en", "--tgt", "fr", "--output", "/tmp/unused"],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "lslo: error: /nonexistent/m2m: no such directory (a local model folder was expected)\n"


if __name__ == "__main__":  # the kill writer (see test_sigkill_during_saves_leaves_the_previous_or_the_new_save)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-writer", type=Path, required=True)
    parser.add_argument("--random-trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    print(json.dumps(_kill_writer(cli.kill_writer, cli.random_trials, cli.seed)))
