"""``lslo`` command line.

    lslo translate [--model PATH_OR_HUB_ID] [--adapters DIR] [--input FILE] [--output FILE] ...
        reads lines ``src_lang<TAB>tgt_lang<TAB>sentence`` (stdin by default) and writes one
        translation per line (stdout by default), in input order; mixed directions are batched.
        With --adapters, --model defaults to the base the adapters record (another base is refused).
    lslo merge --model M --adapters DIR --src fr --tgt oc --output DIR
        a plain transformers model (and its tokenizer) for one direction.
    lslo params [--model M] [--languages lang12] [--ranks 2;2;8] [--targets all] [--ffn reference]
        LSLo parameter counts, on the meta device (no weights loaded; default shape M2M-124 615M).
    lslo train --model M --flores-dir D --languages lang12 --ranks "2;2;8" --prune "H=0.9,M=0.9" --output-dir R
        many-to-many fine-tuning with LSLo and the Gradual Pruning Schedule (``--preset`` a paper row,
        ``--method ft-all``, ``--resume``, ``--dry-run``); ``accelerate launch -m lslo train ...`` on several GPUs.
    lslo checkpoints R
        the checkpoints of a training run: step, epoch, intact/damaged (against each one's manifest), size.
    lslo eval [--model M] --adapters R/final --flores-dir D [--split devtest] [--num-beams 5]
        spBLEU / chrF++ / BLEU per direction and the direction-group table.
    lslo estimate --model M --flores-dir D --languages lang12 --pool layer --output-dir O
        Intrinsic Subspace Estimation (``--pool language``: language-specific pruning): Eq. 6 scores,
        Figures 2/4/5/6, correlations with bitext sizes (Tables 9-10).
    lslo learn-index --model M --flores-dir D --languages lang12 --output-dir O
        Weight Learning (Eq. 5): per-layer source/target weights, Figure 1, and O/index_plan.json for
        ``lslo train --index-plan``.
    lslo plan --scores O --budget "2;2;8" [--output plan.toml]
        per-language ranks and pruning ratios from ISE scores, as a ``lslo train --config`` file.
    lslo serve --adapters R/final [--model M] [--port 5000] [--max-batch-size 32] [--workers 1] ...
        a LibreTranslate-compatible HTTP API (POST /translate, GET /languages, /health, /metrics) that
        batches requests of every direction into one generate call (lslo.serve; the ``serve`` extra).
    lslo plot curves RUN_DIR [RUN_DIR ...] --out fig3.png [--labels a,b]
        the paper's Figure 3: per-epoch H2H and V2V curves of runs trained with --eval-every-epoch.
    lslo bench [ARGS...]
        runs ``benchmarks.__main__.main(ARGS)``: the benchmark suite of a source checkout (not installed).

User errors (bad values, missing or damaged files, a device this machine lacks) print one line
``lslo: error: ...`` on stderr, no traceback, and exit with status 2; other operating-system
errors (disk full, hub unreachable) exit with 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import lslo
from lslo.analysis import (
    EstimateArguments,
    LearnIndexArguments,
    PlanArguments,
    estimate_subspace,
    format_plan,
    learn_index,
    make_plan,
)
from lslo.checkpoints import format_checkpoint_table
from lslo.data import FLORES101_CODES
from lslo.io import atomic_write_file
from lslo.model import read_adapter_config, resolve_adapter_base
from lslo.serve_config import ServeConfig
from lslo.tables import format_table
from lslo.train import (
    PRESETS,
    EvalArguments,
    Interrupted,
    TrainArguments,
    TrainingError,
    describe_checkpoints,
    dry_run,
    evaluate_run,
    format_presets,
    load_config_file,
    plot_run_curves,
    train,
)

__all__ = ["main", "read_tsv"]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}


class CLIError(Exception):
    """A user error found by the CLI itself: printed as ``lslo: error: ...``, exit status 2."""


# Raised by the library for bad input (values, types, paths): the user's to fix, exit status 2.
_USER_ERRORS = (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError)
_EXIT_USER_ERROR = 2
_EXIT_OS_ERROR = 1
_EXIT_INTERRUPTED = 130


def read_tsv(lines) -> tuple[list[str], list[str], list[str]]:
    """Parse ``src_lang<TAB>tgt_lang<TAB>sentence`` lines -> (src_langs, tgt_langs, sentences).

    The sentence may itself contain tabs (split at the first two only); blank lines are errors,
    as they would shift every following output line against its input.
    """
    src_langs, tgt_langs, sentences = [], [], []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise CLIError(f"input line {number}: expected 'src_lang<TAB>tgt_lang<TAB>sentence', got {line[:80]!r}")
        src_langs.append(parts[0].strip())
        tgt_langs.append(parts[1].strip())
        sentences.append(parts[2])
    return src_langs, tgt_langs, sentences


def decode_lines(handle, where: str):
    """UTF-8 lines of a binary stream (or of a text stream, checked), a leading byte-order mark dropped.

    Raises:
        CLIError: naming ``where`` and the line number of the first line that is not UTF-8 (in a text
            stream: that holds the surrogates Python decodes invalid bytes to under a C locale).
    """
    for number, raw in enumerate(handle, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            line.encode("utf-8")
        except (UnicodeDecodeError, UnicodeEncodeError) as error:
            raise CLIError(f"{where} line {number} is not UTF-8 (byte {error.start} of the line)") from None
        yield line.removeprefix("\ufeff") if number == 1 else line


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, _DTYPES[name])


def _load(args):
    """(model, tokenizer) from --model/--tokenizer/--adapters/--dtype/--device."""
    from transformers import AutoTokenizer

    if args.adapters:  # a missing or damaged adapter config fails before the model is loaded
        read_adapter_config(args.adapters)
        base = resolve_adapter_base(args.adapters, args.model)  # the recorded base, or --model checked against it
        name, revision, tokenizer_name = base["name_or_path"], base["revision"], base["tokenizer"]
    elif args.model is None:
        raise CLIError("give --model (the base model), or --adapters DIR whose base model is recorded")
    else:
        name, revision, tokenizer_name = args.model, None, args.model
    model = lslo.load_base_model(name, dtype=_torch_dtype(args.dtype), device=args.device, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or tokenizer_name)
    if args.adapters:
        lslo.load_adapters(model, args.adapters)
    return model, tokenizer


def _cmd_translate(args) -> int:
    # Bytes, decoded here: text-mode stdin under a C locale lets invalid bytes through as surrogates,
    # which only the tokenizer's C++ code would trip on.
    if args.input == "-":
        src_langs, tgt_langs, sentences = read_tsv(decode_lines(getattr(sys.stdin, "buffer", sys.stdin), "input"))
    else:
        with open(args.input, "rb") as f:
            src_langs, tgt_langs, sentences = read_tsv(decode_lines(f, args.input))
    model, tokenizer = _load(args)
    translations = lslo.translate(
        model, tokenizer, sentences, src_langs, tgt_langs, num_beams=args.num_beams, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, progress=not args.quiet, max_length=args.max_length,
    )
    # One line per input line, whatever the model emits.
    text = "".join(t.replace("\r", " ").replace("\n", " ") + "\n" for t in translations)
    if args.output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:  # all-or-nothing: a killed run never leaves a half-written translation file
        atomic_write_file(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return 0


def _cmd_merge(args) -> int:
    model, tokenizer = _load(args)
    merged = lslo.merge_direction(model, args.src, args.tgt)
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"merged {args.src}->{args.tgt} into {args.output}", file=sys.stderr)
    return 0


def _cmd_params(args) -> int:
    import torch
    from transformers import AutoConfig, M2M100Config, M2M100ForConditionalGeneration

    if args.model:
        model_config = AutoConfig.from_pretrained(args.model)
    else:  # M2M-124 615M (flores101_mm100_615M): d_model 1024, 12 + 12 layers, FFN 4096
        model_config = M2M100Config(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
                                    decoder_ffn_dim=4096, vocab_size=args.vocab_size)
    extra = {} if args.ranks is None else {"ranks": int(args.ranks) if args.ranks.isdigit() else args.ranks}
    # "all" = the 101 FLORES-101 languages, all of which M2M-124 (the default shape) has a token for.
    spec = args.languages.strip()
    languages = list(FLORES101_CODES) if spec == "all" else spec.split(",") if "," in spec else spec
    config = lslo.LSLoConfig(languages=languages, groups=_parse_groups(args.groups), target_modules=args.targets,
                             index_plan=args.index_plan, ffn=args.ffn, **extra)
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = M2M100ForConditionalGeneration(model_config)
    lslo.apply_lslo(model, config)
    print(config.describe())
    print(lslo.format_parameter_report(lslo.parameter_report(model)))
    return 0


def _checkout_roots() -> list[Path]:
    """Where `lslo bench` looks for a source checkout: the current directory, then the one holding lslo/."""
    return [Path.cwd(), Path(lslo.__file__).resolve().parent.parent]


def _parse_groups(text: str | None) -> dict[str, str] | None:
    """``--groups 'xx=V,yy=H'`` -> ``{"xx": "V", "yy": "H"}`` (LSLoConfig checks the groups)."""
    if not text:
        return None
    groups = {}
    for part in text.split(","):
        code, sep, group = part.partition("=")
        if not sep or not code.strip():
            raise CLIError(f"--groups expects 'code=GROUP' entries such as 'kam=V', got {part!r}")
        groups[code.strip()] = group.strip()
    return groups


def _cmd_bench(argv: Sequence[str]) -> int:
    # benchmarks/ is not installed with the package (pyproject.toml): it runs from a source checkout.
    root = next((r for r in _checkout_roots() if (r / "benchmarks" / "__main__.py").is_file()), None)
    if root is None:
        raise CLIError("lslo bench runs the benchmark suite of a source checkout (benchmarks/ is not installed with "
                       "the package) and found none in the current directory or beside lslo/; run it from the "
                       "repository root")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    bench = importlib.import_module("benchmarks.__main__")
    status = bench.main(list(argv))
    return int(status or 0)


def _add_model_args(parser: argparse.ArgumentParser, adapters_required: bool = False) -> None:
    parser.add_argument("--model", help="base model: local folder or hub id (e.g. facebook/flores101_mm100_615M); "
                                        "default with --adapters: the base they record (a different --model is refused)")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: --model)")
    parser.add_argument("--adapters", required=adapters_required, help="folder written by lslo.save_adapters")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="weights dtype (default: as stored)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda:0 (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The ``lslo`` parser. Each sub-command sets ``handler`` (``args -> exit status``) through
    ``set_defaults``; a new verb is one more ``commands.add_parser(...)`` with its handler.
    """
    parser = argparse.ArgumentParser(prog="lslo", description="Language-specific LoRA for multilingual NMT.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_model_commands(commands)
    commands.add_parser("bench", help="run the benchmark suite of a source checkout (arguments go to benchmarks.__main__)",
                        add_help=False)

    train = commands.add_parser("train", help="fine-tune many-to-many with LSLo (or ft-all) and gradual pruning",
                                description="Many-to-many fine-tuning on FLORES-101 dev (or a TSV) with LSLo and the "
                                            "Gradual Pruning Schedule. Runs on CPU, one GPU, or many under "
                                            "`accelerate launch -m lslo train ...` / `torchrun -m lslo train ...`.")
    _add_dataclass_arguments(train, TrainArguments)
    train.add_argument("--list-presets", action="store_true", help="list the paper rows --preset reproduces, and exit")
    train.add_argument("--list-checkpoints", action="store_true",
                       help="list the checkpoints in --output-dir (as `lslo checkpoints`), and exit")
    train.add_argument("--dry-run", action="store_true",
                       help="resolve everything (preset < --config < flags, accelerate's settings), read the data and "
                            "the model's config (no weights), print the run as JSON (what run_config.json will hold) "
                            "and exit without writing anything")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="translate a FLORES split and score it by direction group",
                                   description="Beam search over every direction at once (mixed-direction batches), "
                                               "spBLEU (with the FLORES-101 SentencePiece model), chrF++ and BLEU per "
                                               "direction, and the paper's direction-group table.")
    _add_dataclass_arguments(evaluate, EvalArguments)
    evaluate.set_defaults(handler=_cmd_eval)

    checkpoints = commands.add_parser("checkpoints", help="list a training run's checkpoints: step, epoch, status, size",
                                      description="Verify every checkpoint of an `lslo train` run folder against its "
                                                  "manifest (sizes and SHA-256 of its files) and list them.")
    checkpoints.add_argument("run_dir", metavar="DIR", help="the run folder (lslo train's --output-dir)")
    checkpoints.set_defaults(handler=_cmd_checkpoints)

    _add_demo_command(commands)
    _add_analysis_commands(commands)
    _add_plot_command(commands)
    _add_serve_command(commands)
    return parser


def _add_model_commands(commands) -> None:
    """``lslo translate``, ``lslo merge`` and ``lslo params``."""
    translate = commands.add_parser("translate", help="translate TSV lines 'src<TAB>tgt<TAB>sentence'",
                                    description="Translate mixed-direction input, one generate call per batch.")
    _add_model_args(translate)
    translate.add_argument("--input", default="-", help="input TSV file (default: stdin)")
    translate.add_argument("--output", default="-", help="output file, one translation per line (default: stdout)")
    translate.add_argument("--num-beams", type=int, default=5, help="beam size (default: 5, as the paper)")
    translate.add_argument("--batch-size", type=int, default=32, help="sentences per generate call (default: 32)")
    translate.add_argument("--max-new-tokens", type=int, default=256, help="max generated tokens (default: 256)")
    translate.add_argument("--max-length", type=int, default=None,
                           help="truncate inputs to this many tokens, with one warning counting them (default: the "
                                "model's max_position_embeddings)")
    translate.add_argument("--quiet", action="store_true", help="no progress bar")
    translate.set_defaults(handler=_cmd_translate)

    merge = commands.add_parser("merge", help="write a plain model for one direction")
    _add_model_args(merge, adapters_required=True)
    merge.add_argument("--src", required=True, help="source language code")
    merge.add_argument("--tgt", required=True, help="target language code")
    merge.add_argument("--output", required=True, help="folder for save_pretrained")
    merge.set_defaults(handler=_cmd_merge)

    params = commands.add_parser("params", help="count LSLo parameters (meta device, no weights)")
    params.add_argument("--model", help="hub id or folder whose config to use (default: M2M-124 615M shape)")
    params.add_argument("--vocab-size", type=int, default=128112, help="vocabulary without --model (default: 128112)")
    params.add_argument("--languages", default="lang12",
                        help="lang12, lang30, all (the 101 FLORES-101 languages) or comma-separated codes")
    params.add_argument("--groups", help="resource groups of languages outside the paper's and FLORES-101's "
                                         "tables: 'xx=V,yy=H'")
    params.add_argument("--ranks", help="'2;2;8' (one per resource group present) or one int "
                                         "(default: the paper's H;M;L;V = 2;2;8;8)")
    params.add_argument("--targets", default="all", help="all, attn, fc, or a regex")
    params.add_argument("--index-plan", default="paper", choices=["paper", "src", "tgt", "learned"],
                        help="paper (default): the paper's Weight-Learning plan; src; tgt "
                             "('learned' is the deprecated name of 'paper')")
    params.add_argument("--ffn", default="reference", choices=["full", "reference"],
                        help="reference (default) reproduces the paper's counts")
    params.set_defaults(handler=_cmd_params)


def _add_demo_command(commands) -> None:
    """``lslo demo``."""
    demo = commands.add_parser("demo", help="the paper's experiment on synthetic languages, on a CPU, no downloads",
                               description="Synthetic languages, a tiny pretrained M2M-100, then Pretrain / Ft-all / "
                                           "LSLo (equal ranks, 2;2;8, 2;2;8+GPS) fine-tuned with `lslo train` and "
                                           "scored by direction group.")
    demo.add_argument("--output-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="small settings (about 2 minutes)")
    demo.add_argument("--model", help="a real base model instead of the synthetic one (with --flores-dir)")
    demo.add_argument("--flores-dir", help="FLORES-101 folder instead of the synthetic corpus (with --model)")
    demo.add_argument("--languages", help="codes or lang12/lang30 (default: the synthetic languages; lang12 with FLORES)")
    demo.add_argument("--epochs", type=int, help="fine-tuning epochs (default: 8, --quick 2)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the corpus, pretraining and runs (default: 0)")
    demo.add_argument("--overwrite", action="store_true", help="start again in an output dir that holds a run")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo (stages done are kept)")
    demo.add_argument("--analyses", action="store_true",
                      help="also Weight Learning, ISE, and ISE rank plans trained against the resource-group ranks "
                           "at the same budget")
    demo.add_argument("--workers", type=int, help="systems trained at once, one process each (default: 2)")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)


def _add_plot_command(commands) -> None:
    """``lslo plot curves``."""
    plot = commands.add_parser("plot", help="figures from saved runs", description="Figures drawn from saved runs.")
    figures = plot.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    curves = figures.add_parser("curves", help="Figure 3: per-epoch H2H and V2V curves of several runs",
                                description="Overlay the per-epoch direction-group scores of runs trained with "
                                            "--eval-every-epoch (the paper's Figure 3).")
    curves.add_argument("runs", nargs="+", metavar="RUN_DIR", help="lslo train output folders")
    curves.add_argument("--out", required=True, help="the PNG to write")
    curves.add_argument("--labels", help="comma-separated legend labels, one per run (default: presets or folder names)")
    curves.add_argument("--groups", default="H2H,V2V", help="direction groups, one panel each (default: H2H,V2V)")
    curves.set_defaults(handler=_cmd_plot_curves)


def _add_serve_command(commands) -> None:
    """``lslo serve`` (lslo.serve): flags from ServeConfig's fields."""
    serve = commands.add_parser(
        "serve", help="a LibreTranslate-compatible HTTP API batching every direction together",
        description="Serve the model and its adapters over HTTP (POST /translate, GET /languages, /health, "
                    "/metrics); requests of different directions that arrive together are decoded in one "
                    "generate call. SIGTERM or Ctrl-C drains the in-flight requests and exits 0.")
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(str(f.type))
        default = None if f.default is dataclasses.MISSING else f.default
        text = f.metadata.get("help", "")
        if f.name == "model":
            text += " (default: the base recorded with --adapters)"
        serve.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                           help=f"{text} (default: {default})" if default is not None else text)
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    try:
        # imported here: the serving stack is an optional extra and slow to import
        from lslo.serve import default_model, serve
    except ModuleNotFoundError as exc:
        if exc.name in ("lslo", "lslo.serve"):
            raise
        raise CLIError(f"lslo serve needs the serve extra ({exc.name} is not installed): "
                       "pip install 'lslo[serve]'") from None
    given = _given(args, ServeConfig)
    if "model" not in given:
        recorded = default_model(given["adapters"]) if "adapters" in given else None
        if recorded is None:
            raise CLIError("--model is required (no --adapters folder recording its base model was given)")
        given["model"] = recorded
    serve(ServeConfig(**given))
    # Drained and stopped: a second SIGTERM or Ctrl-C while the interpreter exits must not turn
    # this exit status 0 into a kill (at exit Python puts its own handlers back to the defaults).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    return 0


def _cmd_plot_curves(args) -> int:
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    plot_run_curves(args.runs, args.out, labels=labels, groups=[g.strip() for g in args.groups.split(",") if g.strip()])
    print(f"[lslo] wrote {args.out}", file=sys.stderr)
    return 0


def _add_analysis_commands(commands) -> None:
    """``lslo estimate``, ``lslo plan`` and ``lslo learn-index`` (lslo.analysis)."""
    estimate = commands.add_parser(
        "estimate", help="Intrinsic Subspace Estimation (--pool layer) or language-specific pruning (--pool language)",
        description="Train LSLo with one rank everywhere under the Gradual Pruning Schedule, then score every "
                    "language x module x layer with Eq. 6; writes scores (CSV, JSON), Figures 2/4/5/6 and the "
                    "correlations with bitext sizes (Tables 9-10) to --output-dir.")
    _add_dataclass_arguments(estimate, EstimateArguments)
    estimate.set_defaults(handler=_cmd_estimate)
    plan = commands.add_parser(
        "plan", help="per-language ranks and pruning ratios from ISE scores under a parameter budget",
        description="Turn `lslo estimate --pool layer` scores into a rank and a pruning ratio per language under a "
                    "budget of trainable parameters; writes a config file for `lslo train --config`.")
    _add_dataclass_arguments(plan, PlanArguments)
    plan.set_defaults(handler=_cmd_plan)
    learn = commands.add_parser(
        "learn-index", help="Weight Learning: learn per layer whether LSLo follows the source or the target language",
        description="Train a source- and a target-indexed LSLo in every module, mixed by two softmax logits per "
                    "encoder/decoder layer (paper Eq. 5); writes the learned weights (JSON), Figure 1 and the "
                    "index plan that `lslo train --index-plan FILE` reads.")
    _add_dataclass_arguments(learn, LearnIndexArguments)
    learn.set_defaults(handler=_cmd_learn_index)


def _cmd_estimate(args) -> int:
    return _run_analysis(lambda: estimate_subspace(EstimateArguments(**_given(args, EstimateArguments))))


def _cmd_learn_index(args) -> int:
    return _run_analysis(lambda: learn_index(LearnIndexArguments(**_given(args, LearnIndexArguments))))


def _run_analysis(run) -> int:
    """Run an analysis that trains: print its summary and files; interruptions as ``lslo train``."""
    import signal

    try:
        result = run()
    except Interrupted as exc:
        print(f"lslo: interrupted by {signal.Signals(exc.signum).name}; checkpoint {exc.checkpoint}; continue with the "
              "same command and --resume", file=sys.stderr)
        return 128 + int(exc.signum)
    except TrainingError as exc:
        print(f"lslo: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    if result.summary:
        print(result.summary)
    for path in result.files.values():
        print(f"[lslo] wrote {path}", file=sys.stderr)
    return 0


def _cmd_plan(args) -> int:
    plan, path = make_plan(PlanArguments(**_given(args, PlanArguments)))
    print(format_plan(plan))
    print(f"[lslo] wrote {path}; train with: lslo train --config {path} --model ... --output-dir ...", file=sys.stderr)
    return 0


def _field_type(annotation: str):
    # Annotations are strings here (postponed evaluation); the dataclasses use int, float, str, bool.
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation.split("|")[0].strip() == name:
            return kind
    return str


def _add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` flag per dataclass field, with the field's help. Defaults are left to the
    dataclass (every flag defaults to None here), so that a config file or preset can sit between
    the dataclass default and what was typed."""
    import dataclasses

    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(str(f.type))
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {'on' if default else 'off'})")
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                                help=f"{text} (default: {default})" if default is not None else text)


def _given(args, cls) -> dict:
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def _cmd_train(args) -> int:
    import signal

    if args.list_presets:
        print(format_presets())
        return 0
    if args.list_checkpoints:
        if args.output_dir is None:
            raise CLIError("--list-checkpoints lists the checkpoints of --output-dir: give it")
        return _list_checkpoints(args.output_dir)
    given = _given(args, TrainArguments)
    from_file = load_config_file(given["config"]) if "config" in given else {}
    preset = given.get("preset", from_file.get("preset"))
    if preset is not None and preset not in PRESETS:
        raise CLIError(f"unknown preset {preset!r}; `lslo train --list-presets` lists them")
    values = {**(PRESETS[preset].values if preset else {}), **from_file, **given}
    if args.dry_run:
        print(json.dumps(dry_run(TrainArguments(**values)), indent=2))
        return 0
    try:
        result = train(TrainArguments(**values))
    except Interrupted as exc:
        where = f"checkpoint saved to {exc.checkpoint}" if exc.checkpoint else "no checkpoint"
        print(f"lslo: interrupted by {signal.Signals(exc.signum).name}; {where}; continue with the same command "
              "and --resume", file=sys.stderr)
        return 128 + int(exc.signum)
    except TrainingError as exc:
        print(f"lslo: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    if result.final_dir is not None:
        print(f"[lslo] {result.global_step} steps over {result.epochs_done} epochs; final weights in {result.final_dir}; "
              f"metrics in {result.metrics_path}")
    if result.scores:
        print(format_table({values.get("method", "pretrain"): result.scores}, style="plain"))
    return 0


def _cmd_checkpoints(args) -> int:
    return _list_checkpoints(args.run_dir)


def _list_checkpoints(run_dir: str) -> int:
    """Print the checkpoint table; exit status 1 when the newest checkpoint is damaged."""
    if not Path(run_dir).is_dir():
        raise CLIError(f"{run_dir} is not a directory")
    rows = describe_checkpoints(run_dir)
    print(format_checkpoint_table(rows))
    return 1 if rows and rows[-1]["status"] == "damaged" else 0


def _cmd_demo(args) -> int:
    import signal

    # the demo's modules (synthetic corpus, pretraining, transformers): loaded by `lslo demo` only
    from lslo.demo.run import run_demo

    try:
        run_demo(args.output_dir, quick=args.quick, model=args.model, flores_dir=args.flores_dir,
                 languages=args.languages, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
                 resume=args.resume, analyses=args.analyses, workers=args.workers, progress=args.progress)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"lslo: demo interrupted; what is done is saved in {args.output_dir}; continue with "
              f"`lslo demo --output-dir {args.output_dir} --resume`", file=sys.stderr)
        return 128 + int(signum)
    return 0


def _cmd_eval(args) -> int:
    result = evaluate_run(EvalArguments(**_given(args, EvalArguments)))
    print(result["table"])
    for path in result["files"].values():
        print(f"[lslo] wrote {path}", file=sys.stderr)
    return 0


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (library messages may span several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 1 other OS error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv[:1] == ["bench"]:  # everything after 'bench' belongs to the benchmark's own parser
            return _cmd_bench(argv[1:])
        args = parser.parse_args(argv)  # usage errors: argparse prints them and exits with 2
        return args.handler(args)
    except _USER_ERRORS as exc:
        print(f"lslo: error: {_one_line(exc)}", file=sys.stderr)
        return _EXIT_USER_ERROR
    except BrokenPipeError:  # `lslo ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except OSError as exc:
        print(f"lslo: error: {_one_line(exc)}", file=sys.stderr)
        return _EXIT_OS_ERROR
    except KeyboardInterrupt:
        print("lslo: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
