"""Beam-5 translation throughput of a batch mixing 30 directions: lslo vs the alternatives.

Question: how many sentences per second does ``lslo.translate`` get when one batch mixes 30
translation directions, against (a) translating each direction in its own batch with the same
LSLo model, (b) PEFT LoRA with one adapter per language run through PEFT's mixed batch
(``adapter_names=``), and the frozen base model without adapters as the floor?

Providers (same sentences, same beam search, same max_new_tokens; rounds interleaved and the
provider order rotated, so that a drift of the machine hits all alike):

``base``                the model without adapters, one batch (lower bound on cost).
``lslo_mixed``          ``lslo.translate``: one ``generate`` call for the whole mixed batch.
``lslo_per_direction``  ``lslo.translate`` called once per direction (30 smaller batches).
``peft_adapter_names``  PEFT LoRA, one adapter per language (the same ranks), one ``generate``
                        call with ``adapter_names`` = target language per sentence (PEFT can't
                        route encoder layers by source language; the FLOPs are the same).

Models: ``tiny`` (tests' d_model-32 M2M-100, 2 + 2 layers) always; in full mode also the
M2M-124 615M shape (d_model 1024, 12 + 12 layers, FFN 4096, 256k vocabulary) with random
weights, on CPU. LSLo: ``LSLoConfig(languages="lang30")`` (ranks 2;2;8;8, learned index plan,
q/k/v of self- and cross-attention + fc1/fc2, full-width FFN LoRA).

Metric: ``sentences_per_s`` (p20/p50/p80 over the repetitions, after one warm-up round).

    python -m benchmarks.bench_translate --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["main", "run"]

NUM_BEAMS = 5
LANGUAGES = "lang30"


@dataclass
class _Case:
    name: str
    sentences_per_direction: int
    max_new_tokens: int
    reps: int
    big: bool
    warmup: bool = True


def _directions(codes: list[str], count: int) -> list[tuple[str, str]]:
    """``count`` distinct directions spread over the languages (src i -> tgt i + 1, i + 2, ...)."""
    out = []
    step = 1
    while len(out) < count:
        for i, src in enumerate(codes):
            tgt = codes[(i + step) % len(codes)]
            if len(out) < count and (src, tgt) not in out and src != tgt:
                out.append((src, tgt))
        step += 1
    return out


def _shared_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy whose parameters and buffers are the original's tensors (no extra memory):
    lslo and PEFT each wrap the same frozen base weights in their own module tree."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return tuple(float(v) for v in q)


def _build(case: _Case, tokenizer, log) -> tuple[torch.nn.Module, dict[str, Callable[[], object]], int, str]:
    """The providers of one case: name -> a callable translating the whole benchmark set."""
    import lslo
    from lslo.inference import ForcedLanguageTokens, encode_by_source, lang_token_id
    from lslo.testing import (
        m2m124_config,
        make_sentences,
        randomize_adapters,
        tiny_model,
    )

    if case.big:
        from transformers import M2M100ForConditionalGeneration

        torch.manual_seed(0)
        # facebook/flores101_mm100_615M's 256k vocabulary: the LM head is most of a decoding step.
        base = M2M100ForConditionalGeneration(m2m124_config(vocab_size=256206)).eval()
    else:
        base = tiny_model(tokenizer, seed=0, dtype=torch.float32)
    config = lslo.LSLoConfig(languages=LANGUAGES)
    # The tokenizer (M2M-100's 100 codes) lacks kam, mt, ny, sn of lang30: directions avoid them.
    known = [c for c in config.languages if c in tokenizer.lang_code_to_id]
    directions = _directions(known, 30)
    src_langs = [s for s, _ in directions for _ in range(case.sentences_per_direction)]
    tgt_langs = [t for _, t in directions for _ in range(case.sentences_per_direction)]
    sentences = make_sentences(len(src_langs), seed=7, min_words=4, max_words=14)
    n = len(sentences)

    lslo_model = lslo.apply_lslo(_shared_weight_copy(base), config)
    randomize_adapters(lslo_model, seed=1, std=0.05)
    common = {"num_beams": NUM_BEAMS, "max_new_tokens": case.max_new_tokens, "batch_size": n, "progress": False}

    def per_direction():
        for src, tgt in directions:
            rows = [i for i in range(n) if (src_langs[i], tgt_langs[i]) == (src, tgt)]
            lslo.translate(lslo_model, tokenizer, [sentences[i] for i in rows], src, tgt, **common)

    providers: dict[str, Callable[[], object]] = {
        "base": lambda: lslo.translate(base, tokenizer, sentences, src_langs, tgt_langs, **common),
        "lslo_mixed": lambda: lslo.translate(lslo_model, tokenizer, sentences, src_langs, tgt_langs, **common),
        "lslo_per_direction": per_direction,
    }
    try:
        import peft
    except ImportError as exc:
        log(f"  peft_adapter_names: skipped ({exc})")
    else:
        from transformers import LogitsProcessorList

        peft_model = None
        with warnings.catch_warnings():
            # PEFT warns that adapter "or" (Oriya) is a substring of its "lora_" prefix: harmless here.
            warnings.filterwarnings("ignore", message="Adapter name")
            for code, rank in zip(config.languages, config.language_ranks):
                lora = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                       target_modules=["q_proj", "k_proj", "v_proj", "fc1", "fc2"])
                if peft_model is None:
                    peft_model = peft.get_peft_model(_shared_weight_copy(base), lora, adapter_name=code)
                else:
                    peft_model.add_adapter(code, lora)
        peft_model.eval()
        encoded = encode_by_source(tokenizer, sentences, src_langs)
        forced = torch.tensor([lang_token_id(tokenizer, t) for t in tgt_langs])

        def peft_translate():
            # What lslo.translate does around generate (tokenize, pad, force the language token,
            # decode), with PEFT's per-sample adapters in place of lslo.route.
            inputs = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
            with torch.no_grad():
                out = peft_model.generate(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], num_beams=NUM_BEAMS,
                    max_new_tokens=case.max_new_tokens, forced_bos_token_id=None, adapter_names=list(tgt_langs),
                    logits_processor=LogitsProcessorList([ForcedLanguageTokens(forced)]),
                )
            return tokenizer.batch_decode(out[:, 2:], skip_special_tokens=True)

        providers["peft_adapter_names"] = peft_translate
    note = (f"{len(directions)} directions x {case.sentences_per_direction} sentences, beam {NUM_BEAMS}, "
            f"max_new_tokens {case.max_new_tokens}, lslo backend {lslo_kernels_backend()}")
    return base, providers, n, note


def lslo_kernels_backend() -> str:
    import lslo_kernels

    return lslo_kernels.resolve_backend("auto", torch.device("cpu"), torch.float32)


def _measure(case: _Case, tokenizer, log, only: list[str] | None = None) -> list[dict]:
    _base, providers, n, note = _build(case, tokenizer, log)
    names = [name for name in providers if only is None or name in only]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    first = 0 if case.warmup else 1  # round 0 warms up (allocator, caches, lazy imports)
    for round_index in range(first, case.reps + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            providers[name]()
            elapsed = time.perf_counter() - start
            if round_index:
                seconds[name].append(elapsed)
        if round_index:
            log(f"  {case.name} round {round_index}: " + ", ".join(f"{k} {seconds[k][-1]:.2f}s" for k in names))
    rows = []
    for name in names:
        common = {"op": "e2e_beam5", "provider": name, "mode": "fwd", "case": case.name, "x_name": "sentences",
                  "x_value": n, "languages": 30, "ranks": "2;2;8;8", "dtype": "float32", "reps": case.reps,
                  "device": "cpu", "threads": torch.get_num_threads(), "torch_version": torch.__version__,
                  "note": note}
        p20, p50, p80 = _quantiles([n / s for s in seconds[name]])
        rows.append({**common, "metric": "sentences_per_s", "unit": "sent/s", "p20": p20, "p50": p50, "p80": p80})
        if "base" in seconds:
            # Per-round time over the base model's in the same round: what the adapters cost on top of
            # the model (1 + overhead), less exposed to a drift of the machine than sentences/s.
            p20, p50, p80 = _quantiles([s / b for s, b in zip(seconds[name], seconds["base"])])
            rows.append({**common, "metric": "time_vs_base", "unit": "x", "p20": p20, "p50": p50, "p80": p80})
    return rows


def run(quick: bool = True, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr), *,
        big_only: bool = False, providers: list[str] | None = None, big_reps: int = 1) -> list[dict]:
    """Measure every provider; returns one row per (model, provider) with p20/p50/p80 sentences/s.

    quick: the tiny model only (~1 min on 2 CPU cores); otherwise also M2M-124 615M, one round
        without warm-up (~8 min on 2 busy CPU cores: one beam-5 decoding step of the 615M
        model with its 256k-token LM head took ~2 s there, and per-direction runs 30 generate calls).
    big_only: the 615M shape only (``quick`` is then ignored).
    providers: measure only these (``base``, ``lslo_mixed``, ``lslo_per_direction``,
        ``peft_adapter_names``); default all.
    big_reps: rounds of the 615M case; above 1, one more round warms up first.
    """
    from lslo.testing import make_tokenizer, one_thread

    cases = [] if big_only else [
        _Case("tiny d32 2+2 layers", sentences_per_direction=3, max_new_tokens=24, reps=3 if quick else 5, big=False)]
    if big_only or not quick:
        cases.append(_Case("M2M-124 615M shape", sentences_per_direction=1, max_new_tokens=4, reps=big_reps, big=True,
                           warmup=big_reps > 1))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(folder)
        for case in cases:
            log(f"bench_translate: {case.name}")
            if case.big:
                rows += _measure(case, tokenizer, log, providers)
            else:
                with one_thread():  # a d32 model gains nothing from a second thread (see one_thread)
                    rows += _measure(case, tokenizer, log, providers)
    return rows


def _table(rows: list[dict]) -> str:
    """sentences/s per provider and, where the base model was measured, time over the base's and what
    the adapters add on top of it (PEFT's addition over lslo's)."""
    header = (f"{'case':<22} {'provider':<20} {'sent/s p50':>11} {'(p20-p80)':>17} {'vs lslo_mixed':>14} "
              f"{'time/base':>10}")
    lines = [header]
    notes = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rates = [r for r in rows if r["case"] == case and r["metric"] == "sentences_per_s"]
        vs_base = {r["provider"]: r["p50"] for r in rows if r["case"] == case and r["metric"] == "time_vs_base"}
        mixed = next((r["p50"] for r in rates if r["provider"] == "lslo_mixed"), None)
        for r in rates:
            ratio = f"{r['p50'] / mixed:.2f}x" if mixed else "-"
            tb = f"{vs_base[r['provider']]:.2f}x" if r["provider"] in vs_base else "-"
            lines.append(f"{case:<22} {r['provider']:<20} {r['p50']:>11.2f} {r['p20']:>8.2f}-{r['p80']:<8.2f} "
                         f"{ratio:>14} {tb:>10}")
        lslo_extra, peft_extra = vs_base.get("lslo_mixed"), vs_base.get("peft_adapter_names")
        if lslo_extra is not None and peft_extra is not None:
            lslo_pct, peft_pct = 100 * (lslo_extra - 1), 100 * (peft_extra - 1)
            times = f" ({peft_pct / lslo_pct:.0f}x lslo's)" if lslo_pct > 1 else ""
            notes.append(f"{case}: the adapters add {lslo_pct:+.0f}% (lslo, one mixed batch) and {peft_pct:+.0f}% "
                         f"(PEFT adapter_names){times} to the base model's time; lslo_mixed/peft sentences/s is "
                         f"bounded by base/peft = {peft_extra:.2f}x")
    lines += ["", "time/base: median over rounds of the provider's time over the base model's in the same round.",
              *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_translate", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the 615M case")
    parser.add_argument("--csv", default=None, help="append the rows to this CSV (benchmarks.suite's columns)")
    parser.add_argument("--big-only", action="store_true", help="the 615M shape only")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of base,lslo_mixed,lslo_per_direction,peft_adapter_names")
    parser.add_argument("--big-reps", type=int, default=1, help="rounds of the 615M case (>1: plus a warm-up round)")
    args = parser.parse_args(argv)
    known = ("base", "lslo_mixed", "lslo_per_direction", "peft_adapter_names")
    providers = args.providers.split(",") if args.providers else None
    if providers and any(p not in known for p in providers):
        parser.error(f"--providers: unknown {sorted(set(providers) - set(known))}; known: {', '.join(known)}")
    if args.big_reps < 1:
        parser.error("--big-reps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(quick=args.quick, big_only=args.big_only, providers=providers, big_reps=args.big_reps)
    print(_table(rows))
    if args.csv:
        from benchmarks.suite import append_rows

        append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
