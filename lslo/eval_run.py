"""``lslo eval``: translate a FLORES split with (or without) a run's adapters and score every direction
(:class:`EvalArguments`, :func:`evaluate_run`); the scoring itself is :mod:`lslo.evaluate`'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data
from .arguments import DEFAULT_BASE_MODEL, _help
from .card import write_model_card
from .config import LSLoConfig
from .methods import _parse_mapping
from .model import load_adapters, load_base_model, parameter_report, read_adapter_config, resolve_adapter_base
from .tables import format_table, write_scores

__all__ = ["EvalArguments", "evaluate_run"]


def _group_of_for(languages: Sequence[str], groups_text: str | None):
    config = LSLoConfig(languages=list(languages), groups=_parse_mapping(groups_text, "--groups") or None, ranks=1)
    return config.group_of


@dataclass
class EvalArguments:
    """Everything ``lslo eval`` takes."""

    model: str | None = field(default=None, metadata=_help(
        "base model: hub id or folder (default: the base the adapters record, else facebook/flores101_mm100_615M); "
        "refused when it is not the adapters' base"))
    adapters: str | None = field(default=None, metadata=_help("adapter folder (lslo train's <output-dir>/final)"))
    flores_dir: str | None = field(default=None, metadata=_help("FLORES-101/200 folder"))
    split: str = field(default="devtest", metadata=_help("dev or devtest"))
    languages: str | None = field(default=None, metadata=_help("languages (default: the adapters', else lang12)"))
    groups: str | None = field(default=None, metadata=_help("resource groups of extra languages: 'xx=V'"))
    num_beams: int = field(default=5, metadata=_help("beam size"))
    batch_size: int = field(default=32, metadata=_help("sentences per generate call"))
    max_new_tokens: int = field(default=256, metadata=_help("generated tokens at most"))
    eval_sentences: int | None = field(default=None, metadata=_help("first N sentences of each direction only"))
    spm_model: str | None = field(default=None, metadata=_help("FLORES-101 SentencePiece model (spBLEU)"))
    output_dir: str | None = field(default=None, metadata=_help("where scores go (default: <adapters>/eval)"))
    name: str | None = field(default=None, metadata=_help("system name in the table"))
    cpu: bool = field(default=False, metadata=_help("evaluate on the CPU even when a GPU is present"))
    progress: bool = field(default=True, metadata=_help("progress bars"))
    max_length: int | None = field(default=None, metadata=_help(
        "truncate source sentences to this many tokens, with one warning counting them (default: the model's "
        "max_position_embeddings)"))


def evaluate_run(args: EvalArguments) -> dict[str, Any]:
    """Translate a FLORES split with (or without) adapters, score every direction, write CSV/JSON.

    Returns:
        ``{"rows": per-direction rows, "table": the printed table, "files": written paths}``.
    """
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    # lslo.evaluate loads transformers and sacrebleu: deferred so that the CLI starts fast
    from .evaluate import Scorer, evaluate

    if args.flores_dir is None:
        raise ValueError("--flores-dir is required")
    if args.split not in data.FLORES_SPLITS:
        raise ValueError(f"--split must be one of {data.FLORES_SPLITS}, got {args.split!r}")
    accelerator = Accelerator(cpu=args.cpu)
    scorer = Scorer(args.spm_model)
    if args.adapters:  # the recorded base, or a --model checked against it
        base = resolve_adapter_base(args.adapters, args.model)
        model_name, revision, tokenizer_name = base["name_or_path"], base["revision"], base["tokenizer"]
    else:
        model_name, revision = args.model or DEFAULT_BASE_MODEL, None
        tokenizer_name = model_name
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    adapter_config = read_adapter_config(args.adapters)[0] if args.adapters else None
    spec = args.languages or (",".join(adapter_config.languages) if adapter_config else "lang12")
    languages = data.resolve_languages(spec, tokenizer=tokenizer, flores_dir=args.flores_dir)
    if adapter_config is not None:
        missing = [c for c in languages if c not in adapter_config.languages]
        if missing:
            raise ValueError(f"the adapters in {args.adapters} have no adapters for {missing}")
    references = data.load_flores(args.flores_dir, languages, args.split)
    model = load_base_model(model_name, device=accelerator.device, revision=revision)
    if args.adapters:
        load_adapters(model, args.adapters)
    group_of = (adapter_config.group_of if adapter_config is not None and not args.groups
                else _group_of_for(languages, args.groups))
    directions = data.all_directions(languages)
    rows = evaluate(model, tokenizer, references, directions, num_beams=args.num_beams, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, max_sentences=args.eval_sentences, scorer=scorer,
                    accelerator=accelerator, progress=args.progress and accelerator.is_main_process, group_of=group_of,
                    max_input_length=args.max_length)
    name = args.name or (Path(args.adapters).resolve().parent.name if args.adapters else "pretrain")
    out = Path(args.output_dir) if args.output_dir else (Path(args.adapters) / "eval" if args.adapters else Path("runs/eval"))
    files = {}
    params = None
    if adapter_config is not None:
        params = {name: parameter_report(model)["total"]}
    table = format_table({name: rows}, params=params, group_of=group_of, style="plain")
    if accelerator.is_main_process:
        files = write_scores(rows, out, name=f"scores_{args.split}", scorer=scorer,
                             metadata={"model": model_name, "adapters": args.adapters, "split": args.split,
                                       "num_beams": args.num_beams, "eval_sentences": args.eval_sentences},
                             group_of=group_of)
        if args.adapters and adapter_config is not None and out.resolve() == (Path(args.adapters) / "eval").resolve():
            files["card"] = write_model_card(args.adapters)  # the card gets the scores
    return {"rows": rows, "table": table, "files": files, "spbleu": scorer.has_spbleu}
