"""Evaluation by direction group: spBLEU, chrF++ and BLEU per direction, the paper's tables and curves.

- :class:`Scorer` scores one direction with sacrebleu: spBLEU (BLEU over the FLORES-101
  SentencePiece tokenization, sacrebleu's ``tokenize="flores101"``), chrF++ (``CHRF(word_order=2)``)
  and BLEU (``13a``). sacrebleu downloads the SentencePiece model on first use; where it cannot
  (no network, no file in its cache, no ``spm_model``) spBLEU is not reported, the user is told so
  once, and chrF++ and BLEU are reported under their own names.
- :func:`evaluate` translates every (direction, sentence) request of a multi-way parallel test set
  with one :func:`lslo.translate` call (mixed-direction batches), sharded across processes under
  ``accelerate``, and scores each direction: one row per direction.
- :func:`group_table` / :func:`format_table` give the paper's table (Tables 1-4): one column per
  direction group (H2H, H2M, ..., V2V in H, M, L, V order) and two averages, each labelled: the
  mean over directions and the mean of the group means (they differ when groups have different
  numbers of directions: lang12 has 12 H2H directions and 6 V2V ones).
- :func:`write_scores` writes per-direction CSV and JSON atomically; :func:`plot_epoch_curves`
  draws Figure 3 (H2H and V2V per epoch), :func:`plot_group_bars` a bar chart of the table.

The tables and figures live in :mod:`lslo.tables` (which needs neither sacrebleu nor transformers),
re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers import tokenizer_spm

from .inference import translate
from .model import get_lslo_config
from .tables import (  # the tables and figures lived here: lslo.evaluate.* keeps working
    AVG_DIRECTIONS,  # noqa: F401 (lslo.evaluate.AVG_*: the table's average columns)
    AVG_GROUPS,  # noqa: F401
    METRIC_LABELS,
    METRICS,
    GroupOf,
    _group_function,
    direction_group,
    format_table,
    group_columns,
    group_table,
    plot_epoch_curves,
    plot_group_bars,
    write_scores,
)
from .tokenization import encode_sentences

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "Scorer",
    "direction_group",
    "evaluate",
    "flores101_spm_cache_path",
    "format_table",
    "group_columns",
    "group_table",
    "plot_epoch_curves",
    "plot_group_bars",
    "score_directions",
    "write_scores",
]

logger = logging.getLogger(__name__)

_SPM_KEY = "flores101"
_SPM_URL = tokenizer_spm.SPM_MODELS[_SPM_KEY]["url"]

# Requests translated, and their hypotheses held, at once: bounds evaluation's memory whatever the
# test set (the full devtest at 101 languages is 10.2M requests).
_CHUNK_REQUESTS = 8192

# "Say so once": one process-wide flag, so that an evaluation every epoch doesn't repeat it.
_warned_no_spm = False


# ----------------------------------------------------------------------------------------- scoring
def flores101_spm_cache_path() -> Path:
    """Where sacrebleu's ``flores101`` tokenizer looks for its SentencePiece model (and downloads it).

    ``$SACREBLEU/models/sacrebleu_tokenizer_spm.model`` (``$SACREBLEU`` defaults to ``~/.sacrebleu``);
    read from sacrebleu's own module at call time, so it follows sacrebleu's setting.
    """
    return Path(tokenizer_spm.SACREBLEU_DIR, "models", os.path.basename(_SPM_URL))


class _FileSPMTokenizer(tokenizer_spm.TokenizerSPM):
    """sacrebleu's ``flores101`` tokenizer loaded from a given file instead of its cache/URL.

    Only ``__init__`` differs: tokenization (``__call__``: the pieces joined by spaces) and the
    signature (``tok:flores101``) are sacrebleu's own, so the BLEU is exactly sacrebleu's spBLEU.
    """

    def __init__(self, model_file: Path):  # no super().__init__(): it would download
        import sentencepiece

        self.name = tokenizer_spm.SPM_MODELS[_SPM_KEY]["signature"]
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as exc:  # which one depends on the sentencepiece version
            raise ValueError(f"spm_model {str(model_file)!r} is not a SentencePiece model: {exc}") from None


def _warn_no_spm(reason: str) -> None:
    global _warned_no_spm
    if _warned_no_spm:
        return
    _warned_no_spm = True
    logger.warning(
        "spBLEU is not reported: %s; chrF++ and BLEU are reported instead, under their own names. To get "
        "spBLEU, pass --spm-model PATH (spm_model=PATH) with the FLORES-101 SentencePiece model (%s), or put "
        "that file at %s.", reason, _SPM_URL, flores101_spm_cache_path(),
    )


class Scorer:
    """Corpus-level spBLEU, chrF++ and BLEU of one direction, all computed by sacrebleu.

    Args:
        spm_model: path of the FLORES-101 SentencePiece model (``sacrebleu_tokenizer_spm.model``).
            It must exist (else ValueError naming it). None: use sacrebleu's cache
            (:func:`flores101_spm_cache_path`) when the file is there; otherwise spBLEU is not
            reported (``has_spbleu`` False) and a warning says so once per process.
        download: when neither exists, let sacrebleu download the model into its cache (needs the
            internet); a failed download is reported like a missing model.
        warn: log the "spBLEU is not reported" warning (False on non-main processes).

    Attributes:
        has_spbleu: whether :meth:`score` returns spBLEU.
        spm_model: the SentencePiece model used, or None.
        metrics: the metric names scored, in :data:`METRICS` order.
    """

    def __init__(self, spm_model: str | os.PathLike | None = None, *, download: bool = False, warn: bool = True):
        self._bleu = BLEU()
        self._chrf = CHRF(word_order=2)
        self._spbleu: BLEU | None = None
        self.spm_model: Path | None = None
        reason = None
        if spm_model is not None:
            path = Path(spm_model).expanduser()
            if not path.is_file():
                raise ValueError(f"spm_model {str(path)!r}: no such file (the FLORES-101 SentencePiece model)")
            self.spm_model = path
        elif flores101_spm_cache_path().is_file():
            self.spm_model = flores101_spm_cache_path()
        elif download:
            try:
                tokenizer_spm.Flores101Tokenizer()  # sacrebleu downloads into its cache
                self.spm_model = flores101_spm_cache_path()
            except (OSError, RuntimeError, SystemExit) as exc:  # URLError is an OSError; SSL errors sys.exit
                reason = f"the FLORES-101 SentencePiece model could not be downloaded ({exc})"
        else:
            reason = (f"no FLORES-101 SentencePiece model was given and sacrebleu's cache has none "
                      f"({flores101_spm_cache_path()})")
        if self.spm_model is not None:
            bleu = BLEU(tokenize="none")
            bleu.tokenizer = _FileSPMTokenizer(self.spm_model)
            bleu.tokenizer_signature = bleu.tokenizer.signature()
            self._spbleu = bleu
        elif warn:
            _warn_no_spm(reason)
        for metric in self._metric_objects():
            # sacrebleu learns the number of references from the first corpus scored; we always give
            # one, so set it now and signatures() works before any scoring.
            metric.num_refs = 1

    def _metric_objects(self):
        return [m for m in (self._spbleu, self._chrf, self._bleu) if m is not None]

    @property
    def has_spbleu(self) -> bool:
        return self._spbleu is not None

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS if self.has_spbleu else METRICS[1:]

    def score(self, hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
        """Corpus scores of one direction.

        Args:
            hypotheses: N translations.
            references: N reference sentences (one reference each), N >= 1.

        Returns:
            ``{"spbleu": float | None, "chrf++": float, "bleu": float}`` on sacrebleu's 0-100 scale;
            spbleu is None when :attr:`has_spbleu` is False.
        """
        hypotheses, references = _check_sentences(hypotheses, "hypotheses"), _check_sentences(references, "references")
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
        if not hypotheses:
            raise ValueError("nothing to score: no hypotheses")
        refs = [references]
        return {
            "spbleu": self._spbleu.corpus_score(hypotheses, refs).score if self._spbleu is not None else None,
            "chrf++": self._chrf.corpus_score(hypotheses, refs).score,
            "bleu": self._bleu.corpus_score(hypotheses, refs).score,
        }

    def signatures(self) -> dict[str, str]:
        """sacrebleu's signature of each metric scored, e.g. ``{"spbleu": "nrefs:1|case:mixed|...|tok:flores101|..."}``."""
        out = {"spbleu": str(self._spbleu.get_signature())} if self._spbleu is not None else {}
        out["chrf++"] = str(self._chrf.get_signature())
        out["bleu"] = str(self._bleu.get_signature())
        return out

    def describe(self) -> dict[str, Any]:
        """What :func:`write_scores` records: metrics, signatures, the SentencePiece file and its sha256."""
        info: dict[str, Any] = {"metrics": list(self.metrics), "signatures": self.signatures(), "spm_model": None}
        if self.spm_model is not None:
            info["spm_model"] = str(self.spm_model)
            info["spm_model_sha256"] = hashlib.sha256(self.spm_model.read_bytes()).hexdigest()
        return info


def _check_sentences(values, name: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of sentences, not one string")
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(value).__name__}")
    return values


# ------------------------------------------------------------------------------- direction groups


# -------------------------------------------------------------------------------- per-direction rows
def _direction(item) -> tuple[str, str]:
    if isinstance(item, str) and item.count("-") == 1:
        item = tuple(item.split("-"))
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(c, str) and c for c in item)):
        raise ValueError(f"a direction must be a (src, tgt) pair of language codes or 'src-tgt', got {item!r}")
    src, tgt = item
    if src == tgt:
        raise ValueError(f"direction {src}-{tgt}: source and target are the same language")
    return src, tgt


def _check_directions(directions) -> list[tuple[str, str]]:
    if directions is None or isinstance(directions, str):
        raise ValueError(f"directions must be a list of (src, tgt) pairs, got {directions!r}")
    checked = [_direction(d) for d in directions]
    if not checked:
        raise ValueError("directions is empty: nothing to evaluate")
    seen = set()
    for d in checked:
        if d in seen:
            raise ValueError(f"direction {d[0]}-{d[1]} is listed twice")
        seen.add(d)
    return checked


def score_directions(
    hypotheses: Mapping[tuple[str, str], Sequence[str]],
    references: Mapping[tuple[str, str], Sequence[str]],
    *,
    scorer: Scorer | None = None,
    group_of: GroupOf | None = None,
    keep_hypotheses: bool = False,
) -> list[dict[str, Any]]:
    """Score each direction's translations against its references.

    Args:
        hypotheses: (src, tgt) -> N translations, in the order the rows should have.
        references: (src, tgt) -> N references for every direction of ``hypotheses``.
        scorer: the :class:`Scorer` (default ``Scorer()``: spBLEU when sacrebleu's cache has the model).
        group_of: code -> resource group (see :func:`direction_group`).
        keep_hypotheses: add each row's translations under ``"hypotheses"``.

    Returns:
        One row per direction: ``{"src", "tgt", "direction": "src-tgt", "group": "H2M", "n",
        "spbleu": float | None, "chrf++", "bleu"}`` (+ ``"hypotheses"``).
    """
    directions = _check_directions(list(hypotheses))
    group = _group_function(group_of)
    for src, tgt in directions:  # every check before any scoring
        if (src, tgt) not in references:
            raise ValueError(f"no references for direction {src}-{tgt}")
        group(src), group(tgt)
    scorer = scorer if scorer is not None else Scorer()
    rows = []
    for src, tgt in directions:
        hyps = _check_sentences(hypotheses[(src, tgt)], f"hypotheses[{src}-{tgt}]")
        refs = _check_sentences(references[(src, tgt)], f"references[{src}-{tgt}]")
        if len(hyps) != len(refs):
            raise ValueError(f"direction {src}-{tgt}: {len(hyps)} hypotheses for {len(refs)} references")
        if not hyps:
            raise ValueError(f"direction {src}-{tgt}: no sentences")
        row = {"src": src, "tgt": tgt, "direction": f"{src}-{tgt}", "group": f"{group(src)}2{group(tgt)}",
               "n": len(hyps), **scorer.score(hyps, refs)}
        if keep_hypotheses:
            row["hypotheses"] = hyps
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ tables


# ---------------------------------------------------------------------------------------- writing


# ----------------------------------------------------------------------------------------- figures


# -------------------------------------------------------------------------------------- evaluation
def _gather_object(objects: list) -> list:
    """Every process's list, concatenated in process order (accelerate's all_gather_object)."""
    from accelerate.utils import gather_object

    return gather_object(objects)


def _test_set(references, directions, max_sentences) -> tuple[list[tuple[str, str]], dict, dict]:
    """Checked directions, and the source and reference sentences of each (first max_sentences)."""
    if not isinstance(references, Mapping) or not references:
        raise ValueError("references must be a non-empty mapping: {lang: sentences} or {(src, tgt): (sources, refs)}")
    if max_sentences is not None and (isinstance(max_sentences, bool) or not isinstance(max_sentences, int)
                                      or max_sentences < 1):
        raise ValueError(f"max_sentences must be a positive int or None, got {max_sentences!r}")
    keys = list(references)
    multiway = all(isinstance(k, str) for k in keys)
    if not multiway and not all(isinstance(k, tuple) for k in keys):
        raise ValueError("references keys must be all language codes (multi-way parallel) or all (src, tgt) pairs")
    if directions is None:
        directions = [(a, b) for a in keys for b in keys if a != b] if multiway else keys
    directions = _check_directions(directions)
    limit = slice(None, max_sentences)
    sources, targets = {}, {}
    if multiway:
        texts = {}
        for src, tgt in directions:
            for code in (src, tgt):
                if code not in references:
                    raise ValueError(f"references have no sentences for language {code!r} (direction {src}-{tgt}); "
                                     f"they have {', '.join(keys)}")
                if code not in texts:
                    texts[code] = _check_sentences(references[code], f"references[{code!r}]")
        counts = {code: len(lines) for code, lines in texts.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"multi-way parallel references must have as many sentences in every language: {counts}")
        limited = {code: lines[limit] for code, lines in texts.items()}  # one list per language, shared by
        for src, tgt in directions:                                     # its directions (no copy per direction)
            sources[(src, tgt)], targets[(src, tgt)] = limited[src], limited[tgt]
    else:
        for direction in directions:
            if direction not in references:
                raise ValueError(f"references have no sentences for direction {direction[0]}-{direction[1]}")
            pair = references[direction]
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"references[{direction}] must be (source sentences, reference sentences)")
            src_lines = _check_sentences(pair[0], f"references[{direction}] sources")
            ref_lines = _check_sentences(pair[1], f"references[{direction}] references")
            if len(src_lines) != len(ref_lines):
                raise ValueError(f"direction {direction[0]}-{direction[1]}: {len(src_lines)} sources for "
                                 f"{len(ref_lines)} references")
            sources[direction], targets[direction] = src_lines[limit], ref_lines[limit]
    for direction in directions:
        if not sources[direction]:
            raise ValueError(f"direction {direction[0]}-{direction[1]} has no sentences")
    return directions, sources, targets


def evaluate(
    model,
    tokenizer,
    references: Mapping[str, Sequence[str]] | Mapping[tuple[str, str], tuple[Sequence[str], Sequence[str]]],
    directions: Sequence[tuple[str, str] | str] | None,
    *,
    num_beams: int = 5,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    max_sentences: int | None = None,
    scorer: Scorer | None = None,
    accelerator=None,
    progress: bool = True,
    group_of: GroupOf | None = None,
    keep_hypotheses: bool = False,
    chunk_size: int = _CHUNK_REQUESTS,
    **generate_kwargs,
) -> list[dict[str, Any]]:
    """Translate a test set in every direction at once and score each direction.

    Three stages, each with its progress bar:

    1. tokenize: each (language, sentence) once (:func:`lslo.tokenization.encode_sentences`), shared
       by every direction out of that language (a multi-way set of L languages: L lists, not
       L * (L - 1));
    2. translate: the requests of about ``chunk_size`` sentences of whole directions at a time, one
       :func:`lslo.translate` call per chunk (batches mix directions; every sentence is routed to
       its own source and target adapters), so memory holds one chunk's hypotheses, not the test
       set's;
    3. score: each chunk's directions as soon as they are translated.

    Under ``accelerate`` with several processes each process translates and scores every
    num_processes-th direction; the rows are gathered, and every process returns all of them.

    Args:
        model: an M2M-100 / NLLB model with LSLo (:func:`lslo.apply_lslo`) or without (full
            fine-tuning, the pretrained model); a model wrapped by ``accelerator.prepare`` is unwrapped.
        tokenizer: its tokenizer.
        references: multi-way parallel ``{lang: N sentences}`` (FLORES devtest: sentence i of every
            language is one meaning), or per direction ``{(src, tgt): (sources, references)}``.
        directions: (src, tgt) pairs or "src-tgt" strings; None: every ordered pair of the
            languages (multi-way) or every key (per direction).
        num_beams, batch_size, max_new_tokens, generate_kwargs: passed to :func:`lslo.translate`.
        max_sentences: score only the first N sentences of each direction (``--eval-sentences``).
        scorer: the :class:`Scorer` (default ``Scorer()``).
        accelerator: an ``accelerate.Accelerator`` (or ``PartialState``); None or 1 process: no sharding.
        progress: a progress bar (main process only).
        group_of: code -> resource group; default the model's LSLoConfig, else the paper's table.
        keep_hypotheses: keep each direction's translations in its row (``"hypotheses"``).
        chunk_size: sentences translated (and hypotheses held) at once, rounded up to whole
            directions.

    Returns:
        One row per direction, in ``directions`` order: ``{"src", "tgt", "direction", "group",
        "n", "spbleu" (None without the SentencePiece model), "chrf++", "bleu"}`` (+ ``"hypotheses"``).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    directions, sources, targets = _test_set(references, directions, max_sentences)
    if accelerator is not None and hasattr(accelerator, "unwrap_model"):
        model = accelerator.unwrap_model(model)
    if group_of is None:
        group_of = get_lslo_config(model)
    group = _group_function(group_of)
    for src, tgt in directions:  # fail before translating anything
        group(src), group(tgt)
    world, rank = _world_and_rank(accelerator)
    is_main = rank == 0
    if scorer is None:
        scorer = Scorer(warn=is_main)

    # Strided shards of directions: each process translates and scores its own (multi-way test
    # sets give every direction the same number of sentences, so the shards are balanced).
    mine = directions[rank::world]
    show = progress and is_main
    encoded = _encode_sources(tokenizer, mine, sources, progress=show)
    options = {"num_beams": num_beams, "batch_size": batch_size, "max_new_tokens": max_new_tokens, **generate_kwargs}
    rows = _translate_and_score(model, tokenizer, mine, sources, targets, encoded, options, scorer=scorer, group=group,
                                chunk_size=chunk_size, keep_hypotheses=keep_hypotheses, show=show)
    return _gathered(rows, directions) if world > 1 else rows


def _world_and_rank(accelerator) -> tuple[int, int]:
    """(number of processes, this process's index); (1, 0) without an accelerator."""
    world = int(getattr(accelerator, "num_processes", 1)) if accelerator is not None else 1
    rank = int(getattr(accelerator, "process_index", 0)) if accelerator is not None else 0
    return world, rank


def _gathered(rows: list[dict[str, Any]], directions: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Every process's rows, in ``directions`` order (each process scored every num_processes-th direction)."""
    rows = _gather_object(rows)
    if len(rows) != len(directions):
        raise RuntimeError(f"gathered {len(rows)} scored directions for {len(directions)}")
    position = {direction: i for i, direction in enumerate(directions)}
    return sorted(rows, key=lambda row: position[(row["src"], row["tgt"])])


def _translate_and_score(model, tokenizer, mine: list[tuple[str, str]], sources: Mapping, targets: Mapping,
                         encoded: Mapping, options: Mapping[str, Any], *, scorer: Scorer, group, chunk_size: int,
                         keep_hypotheses: bool, show: bool) -> list[dict[str, Any]]:
    """Stages 2 and 3 of :func:`evaluate` on this process's directions ``mine``, one chunk at a time."""
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    total = sum(len(sources[d]) for d in mine)
    with tqdm(total=total, unit="sent", desc="translate", disable=not show) as translated, \
            tqdm(total=len(mine), unit="dir", desc="score", disable=not show) as scored:
        for chunk in _direction_chunks(mine, sources, chunk_size):
            hypotheses = _translate_chunk(model, tokenizer, chunk, sources, encoded, options)
            translated.update(sum(len(sources[direction]) for direction in chunk))
            rows.extend(score_directions(hypotheses, {d: targets[d] for d in chunk}, scorer=scorer, group_of=group,
                                         keep_hypotheses=keep_hypotheses))
            scored.update(len(chunk))
    return rows


def _translate_chunk(model, tokenizer, chunk: Sequence[tuple[str, str]], sources: Mapping, encoded: Mapping,
                     options: Mapping[str, Any]) -> dict[tuple[str, str], list[str]]:
    """{direction: hypotheses} of the directions of ``chunk``, from one :func:`lslo.translate` call."""
    texts, src_langs, tgt_langs, input_ids = [], [], [], []
    for direction in chunk:
        lines = sources[direction]
        texts.extend(lines)
        src_langs.extend([direction[0]] * len(lines))
        tgt_langs.extend([direction[1]] * len(lines))
        input_ids.extend(encoded[_source_key(direction, sources)])
    hypotheses_flat = translate(model, tokenizer, texts, src_langs, tgt_langs, progress=False, input_ids=input_ids,
                                **options)
    hypotheses, position = {}, 0
    for direction in chunk:
        count = len(sources[direction])
        hypotheses[direction] = hypotheses_flat[position : position + count]
        position += count
    return hypotheses


def _source_key(direction: tuple[str, str], sources: Mapping) -> tuple[str, int]:
    # Directions that share a source list (every direction out of a language of a multi-way test
    # set) share its token ids: the key is the language and the list itself.
    return direction[0], id(sources[direction])


def _encode_sources(tokenizer, directions, sources, *, progress: bool) -> dict[tuple[str, int], list[list[int]]]:
    """Token ids of every source list the directions use, each (language, sentence) tokenized once."""
    from tqdm.auto import tqdm

    if not hasattr(tokenizer, "src_lang"):
        raise TypeError(f"{type(tokenizer).__name__} has no src_lang: not a multilingual translation tokenizer")
    lists = {_source_key(d, sources): sources[d] for d in directions}
    return {key: encode_sentences(tokenizer, key[0], lines)
            for key, lines in tqdm(lists.items(), desc="tokenize", unit="list", disable=not progress)}


def _direction_chunks(directions, sources, chunk_size: int):
    """Consecutive runs of whole directions of about ``chunk_size`` requests (at least one direction):
    what is translated, held and scored at once, so memory does not grow with the test set."""
    chunk, count = [], 0
    for direction in directions:
        chunk.append(direction)
        count += len(sources[direction])
        if count >= chunk_size:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk
