"""lslo.train on a tiny model and a generated FLORES-layout corpus: learning, what trains, exact
resume after real signals, 2-process DDP, bad input, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lslo
from lslo.train import (
    PRESETS,
    TrainArguments,
    TrainingError,
    inverse_sqrt_lr,
    language_prune_targets,
    list_checkpoints,
    parse_prune_spec,
    train,
)
from tests.hf_fixtures import RUN_LANGS, RUN_STEMS, tiny_run_setup

ROOT = Path(__file__).resolve().parents[1]
LANGS, STEMS = RUN_LANGS, RUN_STEMS

pytestmark = pytest.mark.usefixtures("hf_one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("train"))


def _args(setup, out, **overrides) -> TrainArguments:
    values = {
        "model": setup["model"], "flores_dir": setup["flores"], "languages": ",".join(LANGS), "ranks": "2;8",
        "output_dir": str(out), "epochs": 2, "max_tokens": 160, "warmup_updates": 4, "lr": 3e-3, "progress": False,
        "log_every": 1, "cpu": True, "seed": 3, "update_freq": 1, "attention_dropout": 0.0,
    }
    values.update(overrides)
    return TrainArguments(**values)


def _losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if r["type"] == "train"]


def _adapters(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "lslo_adapters.safetensors"))


# ------------------------------------------------------------- small pieces
def test_inverse_sqrt_schedule_is_fairseqs():
    assert inverse_sqrt_lr(1, 1e-3, 4) == pytest.approx(2.5e-4)
    assert inverse_sqrt_lr(4, 1e-3, 4) == pytest.approx(1e-3)
    assert inverse_sqrt_lr(16, 1e-3, 4) == pytest.approx(5e-4)  # 1e-3 * sqrt(4 / 16)


def test_prune_spec_resolves_groups_and_codes():
    config = lslo.LSLoConfig(languages=list(LANGS), ranks="2;8")
    assert language_prune_targets(config, "H=0.9") == {"en": 0.9, "fr": 0.9}
    assert language_prune_targets(config, "H=0.9,fr=0.5,wo=0.1") == {"en": 0.9, "fr": 0.5, "wo": 0.1}
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        parse_prune_spec("H=1.0")
    with pytest.raises(ValueError, match="not a number"):
        parse_prune_spec("H=lots")
    with pytest.raises(ValueError, match="'M'"):
        language_prune_targets(config, "M=0.5")  # no medium-resource language here
    with pytest.raises(ValueError, match="'de'"):
        language_prune_targets(config, "de=0.5")
    assert language_prune_targets(config, "0.7") == dict.fromkeys(LANGS, 0.7)  # every language (ISE)


def test_presets_name_the_paper_rows():
    assert {"lang12-2-2-8-gps0.9", "lang12-ft-all", "lang12-pretrain", "lang30-2-2-8-8-gps0.9",
            "lang30-8-8-8-8", "lang12-fc-2-2-32-gps0.9", "lang12-attn-2-2-8-gps0.9"} <= set(PRESETS)
    args = TrainArguments.from_preset("lang12-2-2-8-gps0.9", output_dir="x")
    assert (args.languages, args.ranks, args.prune, args.ffn, args.init) == ("lang12", "2;2;8", "H=0.9,M=0.9",
                                                                             "reference", "reference")
    config = lslo.LSLoConfig(languages="lang12", ranks=args.ranks, ffn=args.ffn)
    from lslo.testing import m2m124_config

    with torch.device("meta"):
        from transformers import M2M100ForConditionalGeneration

        model = M2M100ForConditionalGeneration(m2m124_config())
    lslo.apply_lslo(model, config)
    assert lslo.parameter_report(model)["total"] == 15_335_424  # Table 1's 15.3M


# ---------------------------------------------------------------- training
def test_lslo_training_lowers_loss_and_trains_only_adapters(setup, tmp_path):
    from safetensors.torch import load_file

    result = train(_args(setup, tmp_path / "run", epochs=3, prune="H=0.6", prune_start=1, prune_duration=1))
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch_loss = [r["loss"] for r in epochs if r["type"] == "epoch"]
    assert epoch_loss[-1] < epoch_loss[0] - 0.05, epoch_loss
    assert len(losses) == result.global_step
    # Base weights bit-identical: the adapters are the only thing that trained.
    base = load_file(str(Path(setup["model"]) / "model.safetensors"))
    model = lslo.load_base_model(setup["model"])
    lslo.load_adapters(model, result.final_dir)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for key, value in base.items():
        assert torch.equal(state[key], value), key
    # GPS: the H languages are pruned to 0.6 from epoch 2 on (E=1, k=1); V untouched; B is 0 there.
    summary = lslo.pruning.pruning_summary(model)
    assert summary["en"] == pytest.approx(0.6, abs=1e-3) and summary["fr"] == pytest.approx(0.6, abs=1e-3)
    assert summary["oc"] == 0.0 and summary["wo"] == 0.0
    for module in lslo.lslo_modules(model).values():
        assert torch.all(module.lora_B[~module.prune_mask] == 0)
        assert module.lora_B.abs().sum() > 0
    pruning = [r for r in epochs if r["type"] == "pruning"]
    assert [r["epoch"] for r in pruning] == [1, 2, 3] and pruning[1]["ratio/en"] == pytest.approx(0.6)


def test_ft_all_trains_the_base(setup, tmp_path):
    from safetensors.torch import load_file

    result = train(_args(setup, tmp_path / "ft", method="ft-all", ranks=None, epochs=1, lr=1e-3))
    before = load_file(str(Path(setup["model"]) / "model.safetensors"))
    after = load_file(str(next(result.final_dir.glob("*.safetensors"))))
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert (result.final_dir / "tokenizer_config.json").is_file()


def test_metrics_and_checkpoints_are_kept(setup, tmp_path):
    out = tmp_path / "ck"
    train(_args(setup, out, epochs=3, keep_last=2, save_every=2))
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 2
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["epoch"] == 4 and state["step_in_epoch"] == 0
    assert (out / "final" / "lslo_config.json").is_file()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ resume
_CHILD = """
import sys, torch
torch.set_num_threads(1)
from lslo.train import TrainArguments, train, Interrupted
args = TrainArguments(**{kwargs!r})
try:
    train(args)
except Interrupted as exc:
    print("INTERRUPTED", exc.checkpoint, flush=True)
    sys.exit(3)
"""


def _child(kwargs: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    code = _CHILD.format(kwargs=kwargs)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"child ended early: {proc.stdout.read()}")
        metrics = out / "metrics.jsonl"
        if metrics.is_file():
            steps = [s for s, _ in _losses_tolerant(metrics)]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError("child did not reach the step in time")


def _losses_tolerant(path: Path):
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "train":
            out.append((record["step"], record["loss"]))
    return out


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    args = _args(setup, out, epochs=3, prune="H=0.5", prune_start=1, prune_duration=2)
    train(args)
    return out, args


@pytest.mark.parametrize("how", ["sigterm", "sigint", "sigkill"])
def test_resume_after_a_real_signal_equals_an_uninterrupted_run(setup, uninterrupted, tmp_path, how):
    straight, args = uninterrupted
    out = tmp_path / "run"
    kwargs = {**args.__dict__, "output_dir": str(out)}
    if how == "sigkill":
        kwargs["save_every"] = 2  # kill -9 gets no chance to save: resume from the last periodic one
    proc = _child(kwargs)
    total = len(_losses(straight))
    _wait_for_step(out, total // 2, proc)
    proc.send_signal({"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}[how])
    output, _ = proc.communicate(timeout=120)
    if how == "sigkill":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 3, output
        assert "INTERRUPTED" in output
    assert list_checkpoints(out), "no checkpoint to resume from"
    with pytest.raises(ValueError, match="--resume"):
        train(_args(setup, out, epochs=3, prune="H=0.5", prune_start=1, prune_duration=2))
    resumed = train(_args(setup, out, epochs=3, prune="H=0.5", prune_start=1, prune_duration=2, resume=True))
    assert resumed.global_step == total
    assert _losses(out) == _losses(straight)
    mine, reference = _adapters(out / "final"), _adapters(straight / "final")
    assert mine.keys() == reference.keys()
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key


def test_resume_refuses_a_different_config(setup, uninterrupted):
    straight, _ = uninterrupted
    with pytest.raises(ValueError, match=r"ranks: checkpoint '2;8', now '2;4'"):
        train(_args(setup, straight, epochs=3, ranks="2;4", prune="H=0.5", prune_start=1, prune_duration=2,
                    resume=True))


# ----------------------------------------------------------------- distributed
def test_two_process_torchrun_equals_one_process(setup, tmp_path):
    """gloo on CPU: 2 processes x update_freq 1 take the same steps as 1 process x update_freq 2."""
    common = {"model": setup["model"], "flores_dir": setup["flores"], "languages": ",".join(LANGS), "ranks": "2;8",
              "epochs": 1, "max_tokens": 160, "warmup_updates": 4, "lr": 3e-3, "progress": False, "cpu": True,
              "seed": 5, "dropout": 0.0, "attention_dropout": 0.0}
    one = train(TrainArguments(**common, output_dir=str(tmp_path / "one"), update_freq=2))
    script = tmp_path / "ddp.py"
    script.write_text(
        "import torch\ntorch.set_num_threads(1)\n"
        "from lslo.train import TrainArguments, train\n"
        f"train(TrainArguments(**{common!r}, output_dir={str(tmp_path / 'two')!r}, update_freq=1))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(29500 + os.getpid() % 1000), str(script)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mine, reference = _adapters(tmp_path / "two" / "final"), _adapters(one.final_dir)
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [s for s, _ in _losses(tmp_path / "two")] == [s for s, _ in _losses(tmp_path / "one")]
    for (_, a), (_, b) in zip(_losses(tmp_path / "two"), _losses(tmp_path / "one")):
        assert a == pytest.approx(b, rel=1e-4)


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_training(setup, tmp_path):
    flores = Path(setup["flores"])
    cases = [
        ({"languages": "en,fr,xx"}, "xx"),
        ({"languages": "en,fr,de"}, "deu"),                 # no file: names the expected path
        ({"ranks": "2;2;8"}, "ranks"),                       # 3 ranks for 2 groups (H, V)
        ({"prune": "H=1.5"}, r"\[0, 1\)"),
        ({"flores_dir": str(tmp_path / "nowhere")}, "nowhere"),
        ({"method": "finetune"}, "method"),
        ({"method": "ft-all", "ranks": None, "prune": "H=0.5"}, "prune"),
    ]
    for overrides, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern):
            train(_args(setup, tmp_path / "bad", **overrides))
        assert not (tmp_path / "bad" / "checkpoints").exists()
    short = tmp_path / "short"
    for split in ("dev", "devtest"):
        (short / split).mkdir(parents=True)
        for code, stem in STEMS.items():
            lines = (flores / split / f"{stem}.{split}").read_text().splitlines()
            (short / split / f"{stem}.{split}").write_text("\n".join(lines[: -1 if code == "oc" else None]) + "\n")
    with pytest.raises(ValueError, match="oci"):
        train(_args(setup, tmp_path / "bad2", flores_dir=str(short)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's run")
    with pytest.raises(ValueError, match="already holds another run"):
        train(_args(setup, other))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train(_args(setup, out, epochs=1))
    good = list_checkpoints(out)[-1]
    before = _adapters(good / "adapters")
    from lslo import train as engine

    real = engine._label_smoothed_loss

    def poisoned(logits, labels, epsilon):
        loss, nll, tokens = real(logits, labels, epsilon)
        return loss * float("nan"), nll, tokens

    monkeypatch.setattr(engine, "_label_smoothed_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step \d+ .*last good checkpoint"):
        train(_args(setup, out, epochs=2, resume=True))
    assert list_checkpoints(out)[-1] == good
    after = _adapters(good / "adapters")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_config_file_and_flags(setup, tmp_path):
    from lslo.train import load_config_file

    toml = tmp_path / "run.toml"
    toml.write_text('ranks = "2;8"\nmax-tokens = 200\nepochs = 4\n')
    assert load_config_file(toml) == {"ranks": "2;8", "max_tokens": 200, "epochs": 4}
    bad = tmp_path / "bad.json"
    bad.write_text('{"max_tokenz": 3}')
    with pytest.raises(ValueError, match="max_tokenz"):
        load_config_file(bad)



@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_autocast_bf16_forward_and_backward_track_fp32(backend):
    """Mixed precision (accelerate's bf16): LSLo layers follow autocast and their gradients reach the
    fp32 factors; loss and factor gradients stay close to the fp32 run."""
    from transformers import M2M100ForConditionalGeneration

    import lslo_kernels
    from lslo.testing import tiny_config

    if backend not in lslo_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} backend not built")
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(tiny_config(vocab_size=64))
    lslo.apply_lslo(model, lslo.LSLoConfig(languages=["en", "fr", "wo"], ranks=4, backend=backend))
    with torch.no_grad():
        for module in lslo.lslo_modules(model).values():
            module.lora_B.normal_(0.0, 0.3)
    batch = {"input_ids": torch.randint(4, 60, (3, 7)), "labels": torch.randint(4, 60, (3, 5))}
    src, tgt = ["en", "fr", "wo"], ["fr", "wo", "en"]
    loss32 = lslo.forward_with_langs(model, batch, src, tgt).loss
    loss32.backward()
    grads32 = {n: m.lora_B.grad.clone() for n, m in lslo.lslo_modules(model).items()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = lslo.forward_with_langs(model, batch, src, tgt).loss
    loss16.backward()
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    for name, module in lslo.lslo_modules(model).items():
        assert module.lora_B.grad.dtype == torch.float32
        # bf16 has 8 bits of mantissa: compare whole gradients by relative norm, not entry by entry.
        error = (module.lora_B.grad - grads32[name]).norm() / grads32[name].norm()
        assert error < 0.05, (name, float(error))


def test_eval_every_epoch_logs_group_scores_and_draws_figure3(setup, tmp_path):
    from PIL import Image

    out = tmp_path / "curves"
    train(_args(setup, out, epochs=2, eval_every_epoch=True, eval_sentences=2, num_beams=1))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["epoch"]: r for r in epochs if r["type"] == "epoch"}
    assert sorted(epochs) == [0, 1, 2]
    for record in epochs.values():
        # chrF++ and BLEU under their own names; no spBLEU without the FLORES SentencePiece model
        assert {"chrf++/H2H", "chrf++/V2V", "bleu/H2V"} <= set(record)
        assert not any(k.startswith("spbleu") for k in record)
    for epoch in (0, 1, 2):
        scores = json.loads((out / "eval" / f"epoch-{epoch:03d}.json").read_text())
        assert len(scores["rows"]) == 12 and all(row["n"] == 2 for row in scores["rows"])
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 400


# --------------------------------------------------------------------- CLI
def test_cli_train_then_eval(setup, tmp_path, capsys):
    from lslo.cli import main

    out = tmp_path / "cli"
    flags = ["--model", setup["model"], "--flores-dir", setup["flores"], "--languages", ",".join(LANGS),
             "--ranks", "2;8", "--prune", "H=0.5", "--epochs", "1", "--max-tokens", "160", "--output-dir", str(out),
             "--no-progress", "--cpu", "--max-steps", "3", "--save-every", "2"]
    assert main(["train", *flags]) == 0
    assert "final weights in" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["prune"] == "H=0.5"
    assert main(["train", *flags]) == 2  # the folder holds a run now
    assert "already holds another run" in capsys.readouterr().err
    assert main(["eval", "--model", setup["model"], "--adapters", str(out / "final"), "--flores-dir", setup["flores"],
                 "--num-beams", "1", "--eval-sentences", "2", "--no-progress", "--output-dir", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "chrF++" in printed and "H2V" in printed and "spBLEU" not in printed
    rows = json.loads((tmp_path / "ev" / "scores_devtest.json").read_text())["rows"]
    assert {(r["src"], r["tgt"]) for r in rows} == {(s, t) for s in LANGS for t in LANGS if s != t}


def test_cli_train_errors_are_one_line(setup, tmp_path, capsys):
    from lslo.cli import main

    base = ["train", "--model", setup["model"], "--flores-dir", setup["flores"], "--languages", ",".join(LANGS),
            "--output-dir", str(tmp_path / "x"), "--no-progress", "--cpu"]
    for extra, needle in ((["--ranks", "2;2;8"], "resource groups"), (["--prune", "H=2"], "[0, 1)"),
                          (["--preset", "nope"], "unknown preset"), (["--languages", "en,zz"], "zz")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lslo: error: ") and needle in err and err.count("\n") == 1, err
    assert main(["train", "--list-presets"]) == 0
    assert "lang12-2-2-8-gps0.9" in capsys.readouterr().out


def test_cli_config_file_sits_under_flags(setup, tmp_path):
    from lslo.cli import main

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": setup["model"], "flores_dir": setup["flores"], "languages": ",".join(LANGS),
                                  "ranks": "2;8", "epochs": 5, "max_tokens": 160, "cpu": True, "progress": False}))
    out = tmp_path / "cfg"
    assert main(["train", "--config", str(config), "--epochs", "1", "--max-steps", "2", "--output-dir", str(out)]) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["epochs"] == 1 and saved["max_tokens"] == 160 and saved["ranks"] == "2;8"
