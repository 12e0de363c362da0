"""Runs that survive the real world (issue 21): a full disk, a damaged or moved checkpoint, two writers
on one folder, changed data, a NaN checkpoint called good, torchrun that is not distributed, hostile
text. Each test is one finding of the issue; real subprocesses where the fault needs one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lslo.cli import main as cli_main
from lslo.train import TrainArguments, TrainingError, list_checkpoints, train
from tests.hf_fixtures import RUN_LANGS, tiny_run_setup

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("hf_one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("faults"))


def _values(setup, out, **overrides) -> dict:
    values = {"model": setup["model"], "flores_dir": setup["flores"], "languages": ",".join(RUN_LANGS),
              "ranks": "2;8", "output_dir": str(out), "epochs": 1, "max_tokens": 160, "warmup_updates": 4,
              "lr": 3e-3, "progress": False, "log_every": 1, "cpu": True, "seed": 3, "save_every": 1, "max_steps": 2}
    values.update(overrides)
    return values


def _args(setup, out, **overrides) -> TrainArguments:
    return TrainArguments(**_values(setup, out, **overrides))


def _cli_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def two_checkpoints(setup, tmp_path_factory):
    """A run with checkpoints step-1 and step-2 (keep_last 2); tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(_args(setup, out))
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    return out


def _copy_run(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where


# ------------------------------------------------ 3. damaged checkpoints fall back
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes((b * 7 + 13) % 256 for b in data[:64]) + data[64:])
    else:
        path.write_bytes(b"")


CHECKPOINT_FILES = ["adapters/lslo_adapters.safetensors", "adapters/lslo_config.json", "optimizer.pt",
                    "rng.safetensors", "trainer_state.json", "manifest.json"]


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(setup, two_checkpoints, tmp_path, capsys, how):
    """Finding 3: every file of the newest checkpoint damaged three ways; resume says which file and
    continues from step-1 (max_steps 1: it only loads)."""
    for name in CHECKPOINT_FILES:
        out = _copy_run(two_checkpoints, tmp_path / f"{how}-{name.replace('/', '_')}")
        _damage(out / "checkpoints" / "step-00000002" / name, how)
        capsys.readouterr()
        result = train(_args(setup, out, resume=True, max_steps=1))
        captured = capsys.readouterr()
        assert result.global_step == 1, name
        assert "resuming from" in captured.out and "step-00000001" in captured.out, (name, captured)
        assert name.split("/")[-1] in captured.err and "step-00000001" in captured.err, (name, captured.err)


def _drop_manifests(run: Path) -> None:
    for manifest in run.glob("checkpoints/*/manifest.json"):
        manifest.unlink()


def _edit_state(path: Path, **changes) -> None:
    state = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    path.write_text(json.dumps(state))


def test_every_load_error_is_one_line_naming_the_file(setup, two_checkpoints, tmp_path, capsys):
    """Finding 3 without manifests (checkpoints of older versions): optimizer, trainer state (damaged JSON,
    a wrong type, a missing key), RNG file and keys. With only that checkpoint: a one-line refusal
    (exit 2) naming the file; with an older intact one: the fallback."""
    damages = {
        "optimizer.pt": lambda p: _damage(p, "garbage"),
        "optimizer.pt ": lambda p: _damage(p, "truncated"),
        "trainer_state.json": lambda p: _damage(p, "truncated"),
        "trainer_state.json ": lambda p: _edit_state(p, global_step="2"),
        "trainer_state.json  ": lambda p: _edit_state(p, python_rng=None),
        "rng.safetensors": lambda p: _damage(p, "garbage"),
        "rng.safetensors ": lambda p: __import__("safetensors.torch").torch.save_file(
            {"cuda.9.0": torch.zeros(3, dtype=torch.uint8)}, str(p)),
    }
    for i, (name, damage) in enumerate(damages.items()):
        out = _copy_run(two_checkpoints, tmp_path / f"r{i}")
        _drop_manifests(out)
        shutil.rmtree(out / "checkpoints" / "step-00000001")
        damage(out / "checkpoints" / "step-00000002" / name.strip())
        capsys.readouterr()
        code = cli_main(["train", *_cli_flags(_values(setup, out, resume=True, max_steps=1))])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        lines = [line for line in err.splitlines() if line.startswith("lslo")]
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert f"step-00000002/{name.strip()}" in lines[0], (name, lines[0])


def test_all_checkpoints_damaged_refuses_naming_each(setup, two_checkpoints, tmp_path):
    out = _copy_run(two_checkpoints, tmp_path / "run")
    for checkpoint in list_checkpoints(out):
        _damage(checkpoint / "optimizer.pt", "empty")
    with pytest.raises(ValueError, match=r"no intact checkpoint.*step-00000002/optimizer.pt.*step-00000001/optim"):
        train(_args(setup, out, resume=True))


def test_lslo_checkpoints_lists_step_epoch_status_size(setup, two_checkpoints, tmp_path, capsys):
    out = _copy_run(two_checkpoints, tmp_path / "run")
    _damage(out / "checkpoints" / "step-00000002" / "rng.safetensors", "garbage")
    assert cli_main(["checkpoints", str(out)]) == 1  # the newest is damaged
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["checkpoint", "step", "epoch", "status", "size"]
    first, second = lines[1].split(), lines[2].split()
    assert first[:4] == ["step-00000001", "1", "1", "intact"] and float(first[4]) > 0.01 and first[5] == "MB"
    assert second[:4] == ["step-00000002", "2", "1", "damaged"] and "rng.safetensors" in lines[2]
    assert cli_main(["train", "--output-dir", str(two_checkpoints), "--list-checkpoints"]) == 0
    assert capsys.readouterr().out.count("intact") == 2


# ----------------------------------------------------- 4. --resume is explicit
def test_resume_without_a_checkpoint_refuses_unless_resume_or_start(setup, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code = cli_main(["train", *_cli_flags(_values(setup, out, resume=True))])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint in" in err and "drop --resume" in err, err
    assert not (out / "checkpoints").exists()
    assert cli_main(["train", *_cli_flags(_values(setup, out, resume_or_start=True, max_steps=1))]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]


# ------------------------------------------------------- 2. a run can move
def test_a_copied_run_resumes_with_the_model_spelled_differently(setup, two_checkpoints, tmp_path, monkeypatch):
    moved = _copy_run(two_checkpoints, tmp_path / "elsewhere" / "run")
    shutil.copytree(setup["model"], tmp_path / "models" / "m2m")
    monkeypatch.chdir(tmp_path)
    result = train(_args(setup, "elsewhere/run", model="./models/m2m/", resume=True, max_steps=3))
    assert result.global_step == 3
    steps = [r["step"] for r in _records(moved) if r["type"] == "train"]
    assert steps == [1, 2, 3]
    # A changed model is still refused, naming what differs.
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "models" / "m2m" / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model .* is not the model of the run: model.safetensors"):
        train(_args(setup, "elsewhere/run", model="models/m2m", resume=True, max_steps=4))


# ---------------------------------------------------- 5. changed data is named
def test_resume_on_changed_data_is_refused_unless_allowed(setup, two_checkpoints, tmp_path):
    out = _copy_run(two_checkpoints, tmp_path / "run")
    flores = Path(shutil.copytree(setup["flores"], tmp_path / "flores"))
    dev = flores / "dev" / "fra.dev"
    lines = dev.read_text().splitlines()
    lines[0] = lines[0][: len(lines[0]) // 2]  # a shortened sentence: same line count
    dev.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"training data changed.*dev/fra.dev.*--allow-data-change"):
        train(_args(setup, out, flores_dir=str(flores), resume=True, max_steps=3))
    result = train(_args(setup, out, flores_dir=str(flores), resume=True, max_steps=3, allow_data_change=True))
    assert result.global_step == 3
    notes = [r for r in _records(out) if r["type"] == "data_change"]
    assert len(notes) == 1 and notes[0]["exact"] is False and "dev/fra.dev" in notes[0]["files"][0]


# ------------------------- 11. settings are checked inside every checkpoint too
def test_resume_checks_the_settings_saved_in_the_checkpoint(setup, two_checkpoints, tmp_path):
    """run_config.json of one run, checkpoints of another (what --overwrite beside a live run left)."""
    out = _copy_run(two_checkpoints, tmp_path / "run")
    other = tmp_path / "other"
    train(_args(setup, other, ranks="2;4", max_steps=1))
    shutil.copy(other / "run_config.json", out / "run_config.json")
    with pytest.raises(ValueError, match=r"step-00000002 was trained with a different configuration.*ranks"):
        train(_args(setup, out, ranks="2;4", resume=True, max_steps=3))


# --------------------------------------------- 6, 11. one writer per folder
_HOLDER = """
import sys, torch
torch.set_num_threads(1)
from lslo.train import TrainArguments, train
train(TrainArguments(**{kwargs!r}))
"""


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(setup, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(kwargs=_values(setup, out, epochs=500,
                              max_steps=None, save_every=1))], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(out):
            assert holder.poll() is None and time.time() < deadline, holder.stdout.read() if holder.poll() else "slow"
            time.sleep(0.1)
        # 6: a second `lslo train` (a real process) refuses at once, naming pid and host.
        second = subprocess.run([sys.executable, "-m", "lslo", "train", *_cli_flags(_values(setup, out, resume=True))],
                                env=ENV, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 2, second.stderr
        assert f"pid {holder.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        # 11: --overwrite beside the live run refuses too, before deleting anything.
        with pytest.raises(ValueError, match=f"in use by another lslo train \\(pid {holder.pid}"):
            train(_args(setup, out, overwrite=True))
        assert list_checkpoints(out) and (out / "run_config.json").is_file()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # The killed holder left a stale record: the next run takes it over with a warning.
    capsys.readouterr()
    train(_args(setup, out, resume=True, max_steps=None, epochs=1))
    assert f"stale lock of {out} left by pid {holder.pid}" in capsys.readouterr().err


# ---------------------------------------------- 12. a good checkpoint is finite
def test_the_nan_stop_names_a_checkpoint_that_really_is_good(setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lslo import train as engine

    real = engine._Run.train_step

    def planted(self, micro_batches, step):
        metrics = real(self, micro_batches, step)
        if step == 2:  # the step's loss was finite; the adapters it leaves are not
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return metrics

    monkeypatch.setattr(engine._Run, "train_step", planted)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train(_args(setup, out, max_steps=4))
    message = str(info.value)
    assert "NaN or inf" in message and "step-00000001" in message and "step-00000002" in message.split("not saved")[0]
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001"]
    named = out / "checkpoints" / "step-00000001"
    tensors = load_file(str(named / "adapters" / "lslo_adapters.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    optimizer = torch.load(named / "optimizer.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for s in optimizer["state"].values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point())


# ------------------------------------------------ 1. a failed save is one line
@pytest.mark.parametrize("error", [OSError(errno.EROFS, "Read-only file system"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 0")])
def test_an_error_while_saving_is_one_line_and_leaves_nothing(setup, tmp_path, monkeypatch, capsys, error):
    """Any OSError during a save (a read-only folder, a quota), and torch.save's RuntimeError of a short
    write: one line naming the checkpoint, the folder and the last good one, exit 1, no debris."""
    from lslo import train as engine

    real = engine.torch.save
    calls = []

    def failing(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            real(obj, f, *a, **k)
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(engine.torch, "save", failing)
    if isinstance(error, RuntimeError):  # a short write by torch.save: the disk has no room left
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    out = tmp_path / "run"
    code = cli_main(["train", *_cli_flags(_values(setup, out, max_steps=3))])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lslo")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "step-00000002" in lines[0] and str(out / "checkpoints") in lines[0]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-00000001'}" in lines[0]
    assert ("no space left on" in lines[0]) == isinstance(error, RuntimeError), lines[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="mounting a tmpfs needs root")
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_device_and_folder(setup, tmp_path):
    """A real tmpfs, filled by the run's own checkpoints: room for two and a half."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "lslo-test-tmpfs", str(mount)], check=True)
    try:
        out = mount / "run"
        proc = subprocess.run([sys.executable, "-m", "lslo", "train", *_cli_flags(_values(setup, out, max_steps=6))],
                              env=ENV, capture_output=True, text=True, timeout=300, check=False)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("lslo")]
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"no space left on lslo-test-tmpfs (tmpfs at {mount})" in lines[0], lines[0]
        assert str(out / "checkpoints") in lines[0] and "the last good checkpoint is" in lines[0]
        debris = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
        assert not debris
        from lslo.train import describe_checkpoints

        assert all(row["status"] == "intact" for row in describe_checkpoints(out))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------- 7. resume on another process count
def test_reshard_keeps_the_global_batch_and_says_it_is_not_exact(setup, tmp_path):
    """A checkpoint of 2 processes x update_freq 1 (rewritten from a 1-process x 2 run, which takes the
    same steps), resumed on 1 process with --reshard: update_freq 2, the same losses as the straight
    run (dropout off), and a record in metrics.jsonl that the run is no longer bit-exact."""
    from safetensors.torch import load_file, save_file

    from lslo.checkpoints import write_manifest

    common = {"update_freq": 2, "dropout": 0.0, "max_steps": 3}
    straight = tmp_path / "straight"
    train(_args(setup, straight, **common))
    out = tmp_path / "run"
    train(_args(setup, out, **{**common, "max_steps": 1}))
    checkpoint = list_checkpoints(out)[-1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.update(world_size=2, update_freq=1, python_rng=state["python_rng"] * 2)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    rng = load_file(str(checkpoint / "rng.safetensors"))
    save_file({**rng, "torch.1": rng["torch.0"].clone()}, str(checkpoint / "rng.safetensors"))
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    with pytest.raises(ValueError, match=r"written by 2 processes, this run has 1.*--reshard"):
        train(_args(setup, out, **common, resume=True))
    train(_args(setup, out, **common, resume=True, reshard=True))
    notes = [r for r in _records(out) if r["type"] == "reshard"]
    assert notes == [{"type": "reshard", "from_processes": 2, "to_processes": 1, "update_freq": 2, "exact": False,
                      "step": 1, "epoch": 1}]
    losses = [(r["step"], r["loss"]) for r in _records(out) if r["type"] == "train"]
    assert losses == [(r["step"], r["loss"]) for r in _records(straight) if r["type"] == "train"]
    assert json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())["update_freq"] == 2


# ------------------------------------------------------------- 8, 10. hostile text
def _stdin(monkeypatch, data: bytes) -> None:
    import io

    # What a C locale gives Python: UTF-8 with surrogateescape, so invalid bytes arrive as surrogates.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))


def test_invalid_utf8_on_stdin_is_one_line_with_the_line_number(setup, monkeypatch, capsys):
    _stdin(monkeypatch, b"en\tfr\tHa lo sapije.\nen\tfr\tBa \xff\xfe sabade.\n")
    code = cli_main(["translate", "--model", setup["model"], "--quiet", "--num-beams", "1", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "Unable to cast" not in err, err
    assert err.strip().splitlines() == ["lslo: error: input line 2 is not UTF-8 (byte 9 of the line)"]


def test_a_bom_is_not_part_of_the_first_line(setup, tmp_path, monkeypatch, capsys):
    from lslo.data import load_flores, read_tsv_corpus

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("en\tfr\tHa lo sapije.\tBa sabade fozu.\n", encoding="utf-8-sig")
    assert read_tsv_corpus(tsv)[0].src_lang == "en"
    flores = Path(shutil.copytree(setup["flores"], tmp_path / "flores"))
    dev = flores / "dev" / "eng.dev"
    dev.write_text(dev.read_text(), encoding="utf-8-sig")
    assert not load_flores(flores, ["en"], "dev")["en"][0].startswith("\ufeff")
    (flores / "dev" / "fra.dev").write_bytes(b"ok\n\xc3(\n")
    with pytest.raises(ValueError, match=r"fra.dev' is not UTF-8 text \(line 2"):
        load_flores(flores, ["fr"], "dev")
    _stdin(monkeypatch, "\ufeffen\tfr\tHa lo sapije.\n".encode())
    assert cli_main(["translate", "--model", setup["model"], "--quiet", "--num-beams", "1", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


# ------------------------------------------------- 9. one long line is bounded
_LONG_LINE_CHILD = """
import random, resource, sys
import lslo.cli, transformers, torch
from transformers import M2M100ForConditionalGeneration
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
limit = vm + 360 * 2**20  # imports done; what is left for loading the tiny model and translating
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(lslo.cli.main(["translate", "--model", sys.argv[1], "--quiet", "--num-beams", "16", "--max-new-tokens", "64"]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_20000_character_line_translates_under_a_memory_limit(setup):
    """Bound: the input is cut to the model's positions (128 here), so one generate call holds
    batch x beams rows of at most 128 source + 64 target tokens. Untruncated, the 20,000 random letters
    are ~19k tokens, and 16 beams of them need more than the 360 MiB the child allows itself."""
    rng = __import__("random").Random(0)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20000))
    proc = subprocess.run([sys.executable, "-c", _LONG_LINE_CHILD, setup["model"]], input=f"en\tfr\t{text}\n",
                          env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 1
    assert "1 of 1 input(s) longer than 128 tokens were truncated to 128" in proc.stderr


# ------------------------------------------------ 13, 14. distributed means distributed
_DDP_CHILD = """
import os, signal, sys, time, torch
torch.set_num_threads(1)
from lslo import train as engine
from lslo.cli import main
real = engine._Run.train_step
def train_step(self, micro_batches, step):
    if step == {stall_at} and self.accelerator.process_index == 1:
        # A stalled worker: alive, never answering (SIGSTOP would do the same, but torchrun then waits
        # 30 s before its SIGKILL; this one ends at torchrun's SIGTERM).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(3600)
    return real(self, micro_batches, step)
engine._Run.train_step = train_step
sys.exit(main(["train", *{flags!r}]))
"""


def _torchrun(tmp_path: Path, flags: list[str], stall_at: int = 0, timeout: float = 240):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_CHILD.format(flags=flags, stall_at=stall_at))
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # a host without a GPU, whatever this one has
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(29500 + os.getpid() % 1000 + stall_at), str(script)], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    return proc, time.time() - start


def test_torchrun_without_cpu_on_a_host_without_gpu_forms_the_process_group(setup, tmp_path):
    out = tmp_path / "run"
    values = _values(setup, out, cpu=False, max_steps=2)
    proc, _ = _torchrun(tmp_path, _cli_flags(values))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert [r["step"] for r in _records(out) if r["type"] == "train"] == [1, 2]  # each step logged once


def test_a_stalled_worker_ends_the_job_naming_its_rank(setup, tmp_path):
    out = tmp_path / "run"
    values = _values(setup, out, max_steps=4, save_every=None, ddp_timeout=5)
    proc, seconds = _torchrun(tmp_path, _cli_flags(values), stall_at=2)
    assert proc.returncode != 0
    assert "rank 1 stalled or died" in proc.stderr and "--ddp-timeout 5 s" in proc.stderr, proc.stderr[-3000:]
    assert seconds < 120


def test_translate_truncates_long_inputs_with_one_warning_counting_them(setup):
    """The in-process side of finding 9 (``lslo eval`` passes --max-length the same way): inputs over
    max_input_length are cut (the EOS kept), one warning counts them, short ones are untouched."""
    import warnings

    from transformers import AutoTokenizer

    import lslo
    from lslo.train import EvalArguments

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    model = lslo.load_base_model(setup["model"])
    short, long = "Ha lo sapije.", " ".join(["Tojeka vipizu viguvi vipide je."] * 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = lslo.translate(model, tokenizer, [long, short, long], "en", "fr", num_beams=1, max_new_tokens=3,
                             progress=False, max_input_length=8)
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert messages == ["translate: 2 of 3 input(s) longer than 8 tokens were truncated to 8 (--max-length)"]
    tokenizer.src_lang = "en"
    ids = tokenizer([" ".join(long.split()[:40])])["input_ids"][0]
    expected = lslo.translate(model, tokenizer, [tokenizer.decode(ids[1:7])], "en", "fr", num_beams=1,
                              max_new_tokens=3, progress=False)
    assert cut[0] == cut[2] == expected[0]
    with pytest.raises(ValueError, match="max_input_length"):
        lslo.translate(model, tokenizer, [short], "en", "fr", max_input_length=1, progress=False)
    assert EvalArguments(max_length=64).max_length == 64
