"""Every FLORES-101 language in one run (issue 23): the data stage and evaluation at 101 languages.

    python -m benchmarks.bench_scale --flores-tar ../shared/data/flores101_dataset.tar.xz --out runs/scale

Measures, each in a fresh process (peak RSS = that process's ``ru_maxrss`` minus its RSS when the
stage starts):

1. **Data stage** (one epoch at 101 languages, FLORES-101 dev, 10,100 directions x 997 lines):
   ``flores_corpus`` (tokenize) + ``make_batches(max_tokens=4096)``, against the same tokenization
   followed by a copy of the per-example loop ``make_batches`` used before (``old_make_batches``,
   kept here as the baseline: same batches, the old cost).
2. **Evaluation tokenization**: evaluate's once-per-(language, sentence) encoding against a copy of
   the old per-request encoding (``_old_encode_by_source``: each sentence once per target language,
   one scan of all requests per language), at ``--eval-sentences`` devtest sentences per direction.
3. **Evaluation** with :func:`lslo.evaluate.evaluate` on a tiny LSLo model (d_model 32, 2 + 2 layers,
   101 languages), greedy: total time and the tokenize / translate / score split (timers around the
   three calls evaluate makes), at 2 and at ``--eval-sentences`` sentences per direction.

The tokenizer is a sentencepiece model trained here on FLORES dev text (``--vocab-size`` pieces)
wrapped as an ``M2M100Tokenizer`` whose table knows M2M-100's 100 codes and whose vocabulary carries
M2M-124's other 24 (``lslo.testing.make_tokenizer``), so lengths are FLORES-like, not M2M-124's own.
Results go to ``<out>/bench_scale.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import resource
import tarfile
import time
from pathlib import Path

import torch

__all__ = ["main"]


# ----------------------------------------------------------------------------- the old code (baselines)
def _old_epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"lslo.data:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def old_make_batches(corpus, *, max_tokens, epoch, seed, temperature=5.0, max_sentences=None, epoch_size=None,
                     oversize="error"):
    """lslo.data.make_batches as it was before issue 23 (a per-example Python loop): the baseline of
    this benchmark and the reference tests/test_scale.py holds the vectorised cut to. Argument checks
    left out."""
    from lslo.data import direction_sample_counts

    cost = torch.maximum(corpus.src_lengths, corpus.tgt_lengths).long()
    too_long = cost > max_tokens
    eligible = torch.arange(len(corpus))
    if too_long.any():
        assert oversize == "skip"
        eligible = eligible[~too_long]
    generator = _old_epoch_generator(seed, epoch)
    directions = corpus.direction[eligible].long()
    order = torch.argsort(directions, stable=True)
    grouped = eligible[order]
    sizes = torch.bincount(directions, minlength=len(corpus.directions))
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    counts = direction_sample_counts(sizes, temperature=temperature, total=epoch_size, generator=generator)
    picked = []
    for d in sizes.nonzero().flatten().tolist():
        members = grouped[starts[d] : starts[d + 1]]
        size, count = int(sizes[d]), int(counts[d])
        repeats, rest = divmod(count, size)
        if repeats:
            picked.append(members.repeat(repeats))
        if rest:
            picked.append(members[torch.randperm(size, generator=generator)[:rest]])
    selected = torch.cat(picked)
    selected = selected[torch.randperm(selected.numel(), generator=generator)]
    src_len, tgt_len, longer = corpus.src_lengths[selected].long(), corpus.tgt_lengths[selected].long(), cost[selected]
    base = int(longer.max()) + 1
    if base**3 < 2**62:
        selected = selected[torch.argsort((longer * base + src_len) * base + tgt_len, stable=True)]
    else:
        for key in (corpus.tgt_lengths, corpus.src_lengths, cost):
            selected = selected[torch.argsort(key[selected].long(), stable=True)]
    batches, current, current_max = [], [], 0
    limit = max_sentences if max_sentences is not None else max_tokens
    for index, length in zip(selected.tolist(), cost[selected].tolist()):
        longest = max(current_max, length)
        if current and (longest * (len(current) + 1) > max_tokens or len(current) >= limit):
            batches.append(current)
            current, longest = [], length
        current.append(index)
        current_max = longest
    if current:
        batches.append(current)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _old_encode_by_source(tokenizer, sentences, src_langs):
    """evaluate's tokenization before issue 23: one call per source language over its requests
    (each test sentence once per target language), found by a scan of every request."""
    encoded = [None] * len(sentences)
    previous = tokenizer.src_lang
    try:
        for lang in dict.fromkeys(src_langs):
            indices = [i for i, s in enumerate(src_langs) if s == lang]
            # The old code failed on a language outside the table; "en" stands in (same cost).
            tokenizer.src_lang = lang if lang in tokenizer.lang_code_to_id else "en"
            ids = tokenizer([sentences[i] for i in indices], add_special_tokens=True)["input_ids"]
            for i, row in zip(indices, ids):
                encoded[i] = row
    finally:
        if previous is not None:
            tokenizer.src_lang = previous
    return encoded


# ----------------------------------------------------------------------------- measurement helpers
def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(function, *args):
    """Run ``function(*args)`` in a fresh spawned process (its own peak RSS); return its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def _setup(out: Path, flores_tar: Path, vocab_size: int) -> dict:
    """Unpack FLORES-101 (once), train the tokenizer on dev text (once); paths as str."""
    from lslo.data import FLORES101_CODES, M2M124_CODES
    from lslo.testing import make_tokenizer

    flores = out / "flores101_dataset"
    if not (flores / "dev").is_dir():
        with tarfile.open(flores_tar) as archive:
            archive.extractall(out, filter="data")
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        texts = []
        for stem in FLORES101_CODES.values():
            texts.extend((flores / "dev" / f"{stem}.dev").read_text(encoding="utf-8").splitlines()[:200])
        from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

        table = set(FAIRSEQ_LANGUAGE_CODES["m2m100"])
        extra = [c for c in M2M124_CODES if c not in table]
        tokenizer = make_tokenizer(out / "spm", vocab_size=vocab_size, texts=texts, extra_language_codes=extra)
        tokenizer.save_pretrained(tokenizer_dir)
    return {"flores": str(flores), "tokenizer": str(tokenizer_dir)}


def _load_tokenizer(folder: str):
    from transformers import M2M100Tokenizer

    return M2M100Tokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- stages (run in children)
def data_stage(paths: dict, variant: str, max_tokens: int) -> dict:
    """Tokenize FLORES dev at 101 languages and batch one epoch, with the new or the old make_batches."""
    from lslo.data import FLORES101_CODES, flores_corpus, make_batches

    torch.set_num_threads(1)
    tokenizer = _load_tokenizer(paths["tokenizer"])
    before = _rss_mb()
    start = time.perf_counter()
    corpus = flores_corpus(tokenizer, paths["flores"], list(FLORES101_CODES), "dev", max_length=256)
    tokenized = time.perf_counter()
    batcher = make_batches if variant == "new" else old_make_batches
    batches = batcher(corpus, max_tokens=max_tokens, epoch=1, seed=1)
    done = time.perf_counter()
    return {"variant": variant, "examples": len(corpus), "batches": len(batches), "tokenize_s": tokenized - start,
            "batch_s": done - tokenized, "total_s": done - start, "peak_mb": _peak_mb() - before}


def eval_tokenization(paths: dict, variant: str, sentences: int) -> dict:
    """Tokenize the evaluation requests of ``sentences`` devtest lines per direction at 101 languages."""
    from lslo.data import FLORES101_CODES, load_flores
    from lslo.tokenization import encode_sentences

    torch.set_num_threads(1)
    tokenizer = _load_tokenizer(paths["tokenizer"])
    codes = list(FLORES101_CODES)
    texts = {code: lines[:sentences] for code, lines in load_flores(paths["flores"], codes, "devtest").items()}
    before = _rss_mb()
    start = time.perf_counter()
    if variant == "new":
        encoded = {code: encode_sentences(tokenizer, code, texts[code]) for code in codes}
        count = sum(len(rows) for rows in encoded.values())
    else:
        requests = [(s, t, i) for s in codes for t in codes if s != t for i in range(sentences)]
        encoded = _old_encode_by_source(tokenizer, [texts[s][i] for s, _, i in requests], [s for s, _, _ in requests])
        count = len(encoded)
    return {"variant": variant, "sentences": sentences, "rows_tokenized": count,
            "tokenize_s": time.perf_counter() - start, "peak_mb": _peak_mb() - before}


def eval_stage(paths: dict, sentences: int, max_new_tokens: int, batch_size: int) -> dict:
    """evaluate() over all 10,100 directions, greedy, on a tiny LSLo model; stage times by timers."""
    import lslo
    import lslo.evaluate as ev
    import lslo.inference
    from lslo.data import FLORES101_CODES, load_flores
    from lslo.testing import tiny_model

    torch.set_num_threads(1)
    tokenizer = _load_tokenizer(paths["tokenizer"])
    codes = list(FLORES101_CODES)
    references = load_flores(paths["flores"], codes, "devtest")
    model = lslo.apply_lslo(tiny_model(tokenizer, dtype=torch.float32, weight_std=0.1), lslo.LSLoConfig(languages=codes))
    spent = {"tokenize": 0.0, "translate": 0.0, "score": 0.0}

    def timed(stage, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - start
        return wrapper

    # The three calls evaluate makes, looked up as module attributes at call time.
    ev.encode_sentences = timed("tokenize", ev.encode_sentences)
    lslo.inference.translate = timed("translate", lslo.inference.translate)
    ev.score_directions = timed("score", ev.score_directions)
    before = _rss_mb()
    start = time.perf_counter()
    rows = ev.evaluate(model, tokenizer, references, None, max_sentences=sentences, num_beams=1,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, scorer=ev.Scorer(warn=False),
                       progress=False)
    total = time.perf_counter() - start
    return {"sentences": sentences, "directions": len(rows), "requests": len(rows) * sentences, "total_s": total,
            **{f"{k}_s": v for k, v in spent.items()}, "peak_mb": _peak_mb() - before,
            "max_new_tokens": max_new_tokens, "batch_size": batch_size}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--flores-tar", default="../shared/data/flores101_dataset.tar.xz")
    parser.add_argument("--out", default="runs/bench_scale")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--eval-sentences", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--only", default="data,evaltok,eval2,evalN", help="stages to run, comma-separated")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _setup(out, Path(args.flores_tar), args.vocab_size)
    stages = set(args.only.split(","))
    results: dict = {"args": vars(args)}
    if "data" in stages:
        results["data"] = [_in_child(data_stage, paths, v, args.max_tokens) for v in ("old", "new")]
    if "evaltok" in stages:
        results["eval_tokenization"] = [_in_child(eval_tokenization, paths, v, args.eval_sentences)
                                        for v in ("old", "new")]
    for stage, sentences in (("eval2", 2), ("evalN", args.eval_sentences)):
        if stage in stages:
            results[stage] = _in_child(eval_stage, paths, sentences, args.max_new_tokens, args.batch_size)
        (out / "bench_scale.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
