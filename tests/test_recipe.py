"""The authors' recipe: every preset against a table written from the paper and the authors' fairseq
command, the dropouts and layer drop set on the trained model (and restored in ft-all's saved
config), mixed-precision resolution, the tokens-per-step warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lslo import recipe
from lslo.recipe import PRESETS, resolve_mixed_precision, tokens_per_step_warning
from lslo.train import RecipeWarning, TrainArguments, train
from tests.hf_fixtures import RUN_LANGS, tiny_run_setup

pytestmark = pytest.mark.usefixtures("hf_one_thread")

# Written from the paper (Section 6.2; Appendix B, Tables 7-8) and the authors' command
# (--lr 3e-3 --warmup-updates 1 --max-tokens 4000 --update-freq 4 --max-epoch 15 --dropout 0.1
# --label-smoothing 0.2 --seed 2, Adam (0.9, 0.98), inverse_sqrt, layer drop 0), not from lslo.recipe.
AUTHORS = {"epochs": 15, "seed": 2, "warmup_updates": 1, "max_tokens": 4000, "update_freq": 4,
           "label_smoothing": 0.2, "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
           "layerdrop": 0.0, "adam_eps": 1e-8, "weight_decay": 0.0, "clip_norm": 0.0, "sampling_temperature": 5.0}
G9 = "H=0.9,M=0.9"
# preset: (languages, method, lr, ranks, prune, E, k, target_modules, index_plan)
ROWS = {
    "lang12-pretrain": ("lang12", "pretrain", None, None, None, None, None, "all", "paper"),
    "lang12-ft-all": ("lang12", "ft-all", 1e-4, None, None, 2, 8, "all", "paper"),
    "lang12-4-4-4": ("lang12", "lslo", 3e-3, "4;4;4", None, 2, 8, "all", "paper"),
    "lang12-8-8-8": ("lang12", "lslo", 3e-3, "8;8;8", None, 2, 8, "all", "paper"),
    "lang12-16-16-16": ("lang12", "lslo", 3e-3, "16;16;16", None, 2, 8, "all", "paper"),
    "lang12-64-64-64": ("lang12", "lslo", 3e-3, "64;64;64", None, 2, 8, "all", "paper"),
    "lang12-2-2-8": ("lang12", "lslo", 3e-3, "2;2;8", None, 2, 8, "all", "paper"),
    "lang12-2-2-8-gps0.1": ("lang12", "lslo", 3e-3, "2;2;8", "H=0.1,M=0.1", 2, 8, "all", "paper"),
    "lang12-2-2-8-gps0.3": ("lang12", "lslo", 3e-3, "2;2;8", "H=0.3,M=0.3", 2, 8, "all", "paper"),
    "lang12-2-2-8-gps0.5": ("lang12", "lslo", 3e-3, "2;2;8", "H=0.5,M=0.5", 2, 8, "all", "paper"),
    "lang12-2-2-8-gps0.7": ("lang12", "lslo", 3e-3, "2;2;8", "H=0.7,M=0.7", 2, 8, "all", "paper"),
    "lang12-2-2-8-gps0.9": ("lang12", "lslo", 3e-3, "2;2;8", G9, 2, 8, "all", "paper"),
    "lang12-2-2-16-gps0.9": ("lang12", "lslo", 3e-3, "2;2;16", G9, 2, 8, "all", "paper"),
    "lang12-2-2-64-gps0.9": ("lang12", "lslo", 3e-3, "2;2;64", G9, 2, 8, "all", "paper"),
    "lang12-src-gps0.9": ("lang12", "lslo", 3e-3, "2;2;8", G9, 2, 8, "all", "src"),
    "lang12-tgt-gps0.9": ("lang12", "lslo", 3e-3, "2;2;8", G9, 2, 8, "all", "tgt"),
    "lang12-attn-2-2-8-gps0.9": ("lang12", "lslo", 3e-3, "2;2;8", G9, 2, 8, "attn", "paper"),
    "lang12-attn-2-2-16-gps0.9": ("lang12", "lslo", 3e-3, "2;2;16", G9, 2, 8, "attn", "paper"),
    "lang12-fc-2-2-16-gps0.9": ("lang12", "lslo", 3e-3, "2;2;16", G9, 2, 8, "fc", "paper"),
    "lang12-fc-2-2-32-gps0.9": ("lang12", "lslo", 3e-3, "2;2;32", G9, 2, 8, "fc", "paper"),
    "lang12-fc-2-2-64-gps0.9": ("lang12", "lslo", 3e-3, "2;2;64", G9, 2, 8, "fc", "paper"),
    "lang12-2-2-8-gps0.9-e2k8": ("lang12", "lslo", 3e-3, "2;2;8", G9, 2, 8, "all", "paper"),
    "lang12-2-2-8-gps0.9-e5k8": ("lang12", "lslo", 3e-3, "2;2;8", G9, 5, 8, "all", "paper"),
    "lang12-2-2-8-gps0.9-e7k8": ("lang12", "lslo", 3e-3, "2;2;8", G9, 7, 8, "all", "paper"),
    "lang12-2-2-8-gps0.9-e2k2": ("lang12", "lslo", 3e-3, "2;2;8", G9, 2, 2, "all", "paper"),
    "lang12-2-2-8-gps0.9-e7k2": ("lang12", "lslo", 3e-3, "2;2;8", G9, 7, 2, "all", "paper"),
    "lang30-pretrain": ("lang30", "pretrain", None, None, None, None, None, "all", "paper"),
    "lang30-ft-all": ("lang30", "ft-all", 1e-4, None, None, 2, 8, "all", "paper"),
    "lang30-8-8-8-8": ("lang30", "lslo", 3e-3, "8;8;8;8", None, 2, 8, "all", "paper"),
    "lang30-16-16-16-16": ("lang30", "lslo", 3e-3, "16;16;16;16", None, 2, 8, "all", "paper"),
    "lang30-2-2-8-8-gps0.9": ("lang30", "lslo", 3e-3, "2;2;8;8", G9, 2, 8, "all", "paper"),
}


def test_every_preset_is_in_the_table():
    assert set(PRESETS) == set(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_resolves_to_the_authors_recipe(name):
    languages, method, lr, ranks, prune, start, duration, targets, index_plan = ROWS[name]
    args = TrainArguments.from_preset(name, output_dir="x")
    resolved = args.resolved(cuda=False)
    got = (resolved["languages"], resolved["method"], resolved["ranks"], resolved["prune"], resolved["target_modules"],
           resolved["index_plan"])
    assert got == (languages, method, ranks, prune, targets, index_plan)
    assert resolved["preset"] == name and resolved["mixed_precision"] == "no"  # fp32 on the CPU
    if method == "pretrain":
        return
    assert resolved["lr"] == lr and args.betas() == (0.9, 0.98)
    assert (resolved["prune_start"], resolved["prune_duration"]) == (start, duration)
    assert {k: resolved[k] for k in AUTHORS} == AUTHORS
    if method == "lslo":  # the authors' A initialisation and FFN adaptation: the paper's #Params
        assert (resolved["init"], resolved["ffn"]) == ("reference", "reference")


def test_the_defaults_are_the_recipe():
    args = TrainArguments()
    assert {k: getattr(args, k) for k in AUTHORS} == AUTHORS
    assert args.peak_lr() == 3e-3 and TrainArguments(method="ft-all").peak_lr() == 1e-4
    assert (args.prune_start, args.prune_duration, args.mixed_precision) == (2, 8, None)
    assert "k=10" in next(f for f in TrainArguments.__dataclass_fields__.values()
                          if f.name == "prune_duration").metadata["help"]


def test_list_presets_prints_rows_and_both_parameter_counts():
    text = recipe.format_presets()
    line = next(row for row in text.splitlines() if row.startswith("lang12-2-2-8-gps0.9 "))
    assert "15.3M" in line.split("Table")[0] and "Table 1 '2;2;8+WL+GPS(0.9)'" in line
    assert recipe.preset_parameters("lang12-2-2-8-gps0.9") == 15_335_424
    assert recipe.preset_parameters("lang12-pretrain") is None
    assert "Table 8 'E=7,K=2'" in text and "prune_start=7" in text


def test_mixed_precision_resolution(monkeypatch, tmp_path):
    from accelerate.commands.config import config_args

    monkeypatch.setattr(config_args, "default_config_file", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision(None, cpu=False, cuda=False) == ("no", "default")
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision(None, cpu=False, cuda=True) == ("bf16", "default")
    assert resolve_mixed_precision(None, cpu=True, cuda=True) == ("no", "default")
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision(None, cpu=False, cuda=True) == ("fp16", "default")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision(None, cpu=True) == ("bf16", "ACCELERATE_MIXED_PRECISION")
    assert TrainArguments(cpu=True).resolved()["mixed_precision"] == "bf16"
    assert resolve_mixed_precision("no", cpu=True) == ("no", "flag")  # a flag wins
    assert TrainArguments(cpu=True, mixed_precision="fp16").resolved()["mixed_precision"] == "fp16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    config_file = tmp_path / "default_config.yaml"
    config_file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n")
    monkeypatch.setattr(config_args, "default_config_file", str(config_file))
    assert resolve_mixed_precision(None, cpu=True) == ("bf16", "accelerate config")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bfloat")
    with pytest.raises(ValueError, match="bfloat"):
        resolve_mixed_precision(None, cpu=True)
    with pytest.raises(ValueError, match="fp8"):
        TrainArguments(mixed_precision="fp8")


def test_tokens_per_step_warning_names_the_product():
    assert tokens_per_step_warning(4000, 4, 1) is None and tokens_per_step_warning(4000, 2, 2) is None
    message = tokens_per_step_warning(4000, 4, 2)
    assert "32000 tokens" in message and "16000" in message and "--update-freq 2" in message


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("recipe"))


def _base_with_config(setup, root: Path, **config) -> str:
    folder = root / "base"
    shutil.copytree(setup["model"], folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, **config}))
    return str(folder)


def test_dropouts_and_layerdrop_are_set_while_training_and_restored_in_ft_all(setup, tmp_path, monkeypatch):
    from lslo import train as engine

    original = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.25, "encoder_layerdrop": 0.05,
                "decoder_layerdrop": 0.05}
    base = _base_with_config(setup, tmp_path, **original)
    seen = []
    step = engine._Run.train_step

    def watching(self, micro_batches, number):
        model = self.accelerator.unwrap_model(self.model)
        seen.append({(type(m).__name__, name): getattr(m, name) for m in model.modules()
                     for name in ("dropout", "activation_dropout", "layerdrop")
                     if isinstance(getattr(m, name, None), float)})
        seen[-1]["config"] = {k: getattr(model.config, k) for k in original}
        return step(self, micro_batches, number)

    monkeypatch.setattr(engine._Run, "train_step", watching)
    args = TrainArguments(model=base, flores_dir=setup["flores"], languages=",".join(RUN_LANGS), method="ft-all",
                          output_dir=str(tmp_path / "run"), epochs=1, max_steps=2, max_tokens=160, update_freq=1,
                          cpu=True, progress=False)
    with pytest.warns(RecipeWarning, match="update-freq 1"):
        result = train(args)
    assert len(seen) == 2
    floats = seen[0]
    assert floats.pop("config") == {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
                                    "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0}
    by_kind = {}
    for (kind, name), value in floats.items():
        by_kind.setdefault(("Attention" in kind, name), set()).add(value)
    assert by_kind == {(True, "dropout"): {0.1}, (False, "dropout"): {0.1}, (False, "activation_dropout"): {0.0},
                       (False, "layerdrop"): {0.0}}
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert {k: saved[k] for k in original} == original  # the base model's own values, not the training ones
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["lr"] == 1e-4 and run_config["mixed_precision"] == "no" and run_config["layerdrop"] == 0.0


# ------------------------------------------------------------ training methods
def test_methods_are_registered_objects_with_their_lr():
    from lslo.methods import METHODS, TrainingMethod, get_method, register_method

    assert {name: method.default_lr for name, method in METHODS.items() if method.trains} == {
        "lslo": 3e-3, "ft-all": 1e-4, "weight-learning": 3e-3}
    assert not METHODS["pretrain"].trains
    with pytest.raises(ValueError, match="'lslo', 'ft-all'"):
        get_method("lora")
    with pytest.raises(ValueError, match="method 'ft-all' has none"):
        TrainArguments(method="ft-all", prune="H=0.5")
    with pytest.raises(ValueError, match="weight-learning"):
        TrainArguments(method="weight-learning", prune="H=0.5")

    class Frozen(TrainingMethod):
        name = "frozen-test"

        @property
        def default_lr(self):
            return 0.5

    register_method(Frozen())
    try:
        assert TrainArguments(method="frozen-test").peak_lr() == 0.5
    finally:
        del METHODS["frozen-test"]
    with pytest.raises(TypeError, match="TrainingMethod"):
        register_method("lslo")


def test_public_train_step_is_the_reference_step(setup):
    """lslo.train.train_step on one batch = the step written out with torch's own label-smoothed
    cross-entropy (what benchmarks/bench_train_step.py used to copy)."""
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer
    from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right

    import lslo
    from lslo.data import collate, flores_corpus
    from lslo.train import forward_loss, train_step
    from tests.hf_fixtures import randomize_adapters

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    corpus = flores_corpus(tokenizer, setup["flores"], RUN_LANGS, "dev")
    batch = collate(corpus, [0, 5, 17, 30], pad_token_id=tokenizer.pad_token_id, languages=RUN_LANGS)
    model = lslo.load_base_model(setup["model"])
    lslo.apply_lslo(model, lslo.LSLoConfig(languages=list(RUN_LANGS), ranks="2;8"))
    randomize_adapters(model, std=0.05)
    mine, reference = model, copy.deepcopy(model)
    params_mine = [p for p in mine.parameters() if p.requires_grad]
    params_ref = [p for p in reference.parameters() if p.requires_grad]
    opt_mine = torch.optim.Adam(params_mine, lr=1.0, betas=(0.9, 0.98), eps=1e-8)
    opt_ref = torch.optim.Adam(params_ref, lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
    metrics = train_step(mine, opt_mine, [batch], lr=1e-3, label_smoothing=0.2)

    config = reference.config
    decoder_input_ids = shift_tokens_right(batch["labels"], config.pad_token_id, config.decoder_start_token_id)
    with lslo.route(src=batch["src_lang_ids"], tgt=batch["tgt_lang_ids"]):
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=decoder_input_ids).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=-100, label_smoothing=0.2)
        loss.backward()
    opt_ref.step()
    assert metrics["loss"] == float(loss) and metrics["lr"] == 1e-3
    assert metrics["tokens"] == int((batch["labels"] != -100).sum()) and metrics["sentences"] == 4
    for a, b in zip(params_mine, params_ref, strict=True):
        assert torch.equal(a, b)
    again, nll, tokens = forward_loss(mine, batch, label_smoothing=0.0)
    assert float(again) == float(nll) and tokens == metrics["tokens"] and float(again) != float(loss)


# ------------------------------------------------------------------ --dry-run
LANG12 = ("en", "fr", "de", "it", "zh", "nl", "ja", "ko", "oc", "or", "sd", "wo")
TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "flores101_dataset.tar.xz"


@pytest.fixture(scope="module")
def lang12_flores(tmp_path_factory):
    """The 12 lang12 languages' first lines of FLORES-101 (dev 40, devtest 8) from ../shared/data, or
    generated lines in the same layout where the tarball is absent."""
    import tarfile

    from lslo.data import flores_stem
    from tests.hf_fixtures import make_sentences

    root = tmp_path_factory.mktemp("flores12")
    wanted = {f"{split}/{flores_stem(c)}.{split}": (split, 40 if split == "dev" else 8)
              for c in LANG12 for split in ("dev", "devtest")}
    found = {}
    if TARBALL.is_file():
        with tarfile.open(TARBALL, "r:xz") as archive:
            for member in archive:
                name = member.name.split("/", 1)[-1]
                if name in wanted and member.isfile():
                    text = archive.extractfile(member).read().decode("utf-8")
                    found[name] = text.splitlines()[: wanted[name][1]]
    for k, (name, (split, lines)) in enumerate(sorted(wanted.items())):
        (root / split).mkdir(exist_ok=True)
        rows = found.get(name) or make_sentences(lines, seed=k)
        (root / name).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return root


def _dry_flags(setup, flores, out) -> list[str]:
    return ["--model", setup["model"], "--flores-dir", str(flores), "--preset", "lang12-2-2-8-gps0.9",
            "--output-dir", str(out), "--cpu", "--no-progress", "--epochs", "3"]


def test_dry_run_prints_the_resolved_run_and_writes_nothing(setup, lang12_flores, tmp_path, capsys, monkeypatch):
    import dataclasses

    import lslo
    from lslo.cli import main

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    out = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "--dry-run", *_dry_flags(setup, lang12_flores, out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()  # nothing written
    assert {f.name for f in dataclasses.fields(TrainArguments)} <= set(plan)
    assert plan["lr"] == 3e-3 and plan["mixed_precision"] == "no" and plan["mixed_precision_source"] == "default"
    assert plan["languages"] == list(LANG12) and plan["epochs"] == 3 and plan["update_freq"] == 4
    model = lslo.load_base_model(setup["model"])
    lslo.apply_lslo(model, lslo.LSLoConfig(languages=list(LANG12), ranks="2;2;8", init="reference", ffn="reference"))
    report = lslo.parameter_report(model)
    assert plan["trainable_parameters"] == {"total": report["total"], "groups": report["groups"]}
    assert set(plan["trainable_parameters"]["groups"]) == {"H", "M", "V"}
    assert len(plan["batches_per_epoch"]) == 3 and all(b > 4 for b in plan["batches_per_epoch"])
    assert plan["optimizer_steps"] == sum(b // 4 for b in plan["batches_per_epoch"])
    assert plan["tokens_per_optimizer_step"] == 16000 and plan["processes"] == 1
    # the tiny base has no dropout at all: the recipe's 0.1 and 0.1 go onto the model
    assert plan["model_config_overrides"] == {"dropout": {"from": 0.0, "to": 0.1},
                                              "attention_dropout": {"from": 0.0, "to": 0.1}}
    # A real run writes the same object.
    assert main(["train", *_dry_flags(setup, lang12_flores, out), "--max-steps", "1"]) == 0
    capsys.readouterr()
    saved = json.loads((out / "run_config.json").read_text())
    # ... plus the content fingerprints of the model and the data that resume compares (a dry run
    # reads no weights, so it cannot hash them).
    assert set(saved.pop("fingerprints")) == {"model", "data"}
    assert saved == {**plan, "max_steps": 1, "optimizer_steps": 1}


def test_dry_run_fails_like_a_real_run(setup, lang12_flores, tmp_path, capsys):
    from lslo.cli import main

    broken = tmp_path / "flores"
    shutil.copytree(lang12_flores, broken)
    (broken / "dev" / "wol.dev").unlink()
    for flags, needle in ((_dry_flags(setup, broken, tmp_path / "a"), "wol"),
                          ([*_dry_flags(setup, lang12_flores, tmp_path / "b"), "--preset", "lang12-9-9-9"], "unknown preset")):
        for dry in (["--dry-run"], []):
            assert main(["train", *dry, *flags]) == 2
            err = capsys.readouterr().err
            assert err.startswith("lslo: error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------- adapters name their base
@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A tiny LSLo run (GPS on H) whose final adapters record their base."""
    out = tmp_path_factory.mktemp("named") / "run"
    args = TrainArguments(model=setup["model"], flores_dir=setup["flores"], languages=",".join(RUN_LANGS), ranks="2;8",
                          prune="H=0.5", prune_start=0, prune_duration=1, output_dir=str(out), epochs=1, max_tokens=160,
                          update_freq=1, cpu=True, progress=False)
    with pytest.warns(RecipeWarning):
        return train(args)


def test_adapters_record_their_base_and_card(setup, trained):
    from lslo.model import read_adapter_meta

    meta = read_adapter_meta(trained.final_dir)
    assert meta["base"] == {"name_or_path": str(Path(setup["model"]).resolve()), "revision": None,
                            "tokenizer": str(Path(setup["model"]).resolve())}
    recipe_saved = meta["metadata"]["recipe"]
    assert recipe_saved == json.loads((trained.output_dir / "run_config.json").read_text())
    assert meta["metadata"]["pruning"]["en"] == pytest.approx(0.5, abs=1e-3)
    card = (trained.final_dir / "README.md").read_text()
    assert f"`{Path(setup['model']).resolve()}`" in card
    assert "| en | H | 2 | 0.500 |" in card and "| wo | V | 8 | 0.000 |" in card
    assert "| warmup_updates | 1 |" in card and "| lr | 0.003 |" in card and "| update_freq | 1 |" in card
    assert f"lslo.load_adapters(None, {str(trained.final_dir)!r})" in card


def test_translate_and_load_without_model_and_refuse_another_base(setup, trained, tmp_path, capsys, monkeypatch):
    import io

    import lslo
    from lslo.cli import main
    from tests.hf_fixtures import make_tokenizer, tiny_model

    monkeypatch.setattr("sys.stdin", io.StringIO("en\two\thello world\n"))
    assert main(["translate", "--adapters", str(trained.final_dir), "--num-beams", "1", "--max-new-tokens", "5",
                 "--quiet"]) == 0
    without = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("en\two\thello world\n"))
    assert main(["translate", "--adapters", str(trained.final_dir), "--model", setup["model"], "--num-beams", "1",
                 "--max-new-tokens", "5", "--quiet"]) == 0
    assert capsys.readouterr().out == without and without.count("\n") == 1
    model = lslo.load_adapters(None, trained.final_dir)  # the recorded base, then the adapters
    assert tuple(lslo.get_lslo_config(model).languages) == tuple(RUN_LANGS)

    other = tmp_path / "other"
    tokenizer = make_tokenizer(tmp_path / "spm")
    tiny_model(tokenizer, dtype=torch_float32(), d_model=48).save_pretrained(other)
    tokenizer.save_pretrained(other)
    capsys.readouterr()
    assert main(["translate", "--adapters", str(trained.final_dir), "--model", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lslo: error: ") and str(other) in err and str(Path(setup["model"]).resolve()) in err
    assert "d_model" in err and err.count("\n") == 1

    # the recorded base is gone: say so and ask for --model
    moved = tmp_path / "adapters"
    shutil.copytree(trained.final_dir, moved)
    meta = json.loads((moved / "lslo_config.json").read_text())
    meta["base"]["name_or_path"] = str(tmp_path / "gone")
    (moved / "lslo_config.json").write_text(json.dumps(meta))
    assert main(["translate", "--adapters", str(moved), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not there any more" in err and "--model" in err and str(tmp_path / "gone") in err
    del meta["base"]
    (moved / "lslo_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not record their base model.*--model"):
        lslo.load_adapters(None, moved)


def torch_float32():
    import torch

    return torch.float32


def test_eval_without_model_puts_scores_on_the_card(setup, trained, capsys):
    from lslo.cli import main

    assert main(["eval", "--adapters", str(trained.final_dir), "--flores-dir", setup["flores"], "--num-beams", "1",
                 "--eval-sentences", "2", "--no-progress", "--cpu"]) == 0
    capsys.readouterr()
    card = (trained.final_dir / "README.md").read_text()
    assert "## Scores" in card and "chrF++ on FLORES devtest" in card and "| H2H |" in card.replace("| H2H | H2V", "| H2H |")


# -------------------------------------------------------------- lslo plot curves
def test_plot_curves_overlays_runs(setup, trained, tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    from lslo.cli import main
    from lslo.train import plot_run_curves

    runs = []
    for name, ranks in (("a", "2;8"), ("b", "8;8")):
        out = tmp_path / name
        args = TrainArguments(model=setup["model"], flores_dir=setup["flores"], languages=",".join(RUN_LANGS),
                              ranks=ranks, output_dir=str(out), epochs=1, max_tokens=160, update_freq=1, cpu=True,
                              progress=False, eval_every_epoch=True, eval_sentences=1, num_beams=1)
        with pytest.warns(RecipeWarning):
            train(args)
        runs.append(out)
    png = tmp_path / "fig3.png"
    assert main(["plot", "curves", *map(str, runs), "--out", str(png), "--labels", "two-eight,eight-eight"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = plot_run_curves(runs, tmp_path / "again.png")
    for axes in figure.axes:  # one panel per group (H2H, V2V), a line per run and the dashed Pretrain line
        labels = [line.get_label() for line in axes.lines]
        assert "a" in labels and "b" in labels, labels
    assert len(figure.axes) == 2

    bare = trained.output_dir  # trained without --eval-every-epoch
    capsys.readouterr()
    assert main(["plot", "curves", str(runs[0]), str(bare), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(bare) in err and "--eval-every-epoch" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
