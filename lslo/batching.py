"""Mixed-direction batches of an encoded corpus: :class:`EncodedCorpus` (the token ids that
:func:`lslo.data.encode_examples` builds), :func:`make_batches` (temperature sampling over directions,
batches cut under a token budget), :func:`collate` (one batch as padded tensors) and the static shape
buckets (:class:`ShapeBuckets`, :func:`bucketed_batches`, :func:`pad_to_bucket`).

Stages 3 and 4 of :mod:`lslo.data`'s pipeline; every name here is also importable from ``lslo.data``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "Batches",
    "EncodedCorpus",
    "ShapeBuckets",
    "bucketed_batches",
    "collate",
    "direction_sample_counts",
    "make_batches",
    "pad_to_bucket",
    "sampling_probabilities",
]


class EncodedCorpus:
    """Token ids of a parallel corpus, each distinct (language, sentence) stored once.

    Attributes:
        languages: codes of the languages that occur, in order of first appearance.
        directions: the ``(src, tgt)`` pairs that occur.
        tokens: (total_tokens,) int32, the ids of every distinct sentence, concatenated.
        segment_offsets: (num_segments + 1,) int64, sentence s is ``tokens[offsets[s]:offsets[s+1]]``.
        src_segment, tgt_segment: (N,) int32, the sentences of example i.
        direction: (N,) int32, index of example i's direction in ``directions``.
        src_lengths, tgt_lengths: (N,) int32 token counts (language token and eos included).
        num_truncated: distinct sentences cut to ``max_length``.
    """

    def __init__(self, *, languages, directions, tokens, segment_offsets, src_segment, tgt_segment, direction,
                 num_truncated: int = 0):
        self.languages: tuple[str, ...] = tuple(languages)
        self.directions: tuple[tuple[str, str], ...] = tuple(directions)
        self.tokens = tokens
        self.segment_offsets = segment_offsets
        self.src_segment = src_segment
        self.tgt_segment = tgt_segment
        self.direction = direction
        self.num_truncated = num_truncated
        segment_lengths = (segment_offsets[1:] - segment_offsets[:-1]).to(torch.int32)
        self.src_lengths = segment_lengths[src_segment.long()]
        self.tgt_lengths = segment_lengths[tgt_segment.long()]
        lang_index = {code: i for i, code in enumerate(self.languages)}
        self._direction_src = torch.tensor([lang_index[s] for s, _ in self.directions], dtype=torch.int64)
        self._direction_tgt = torch.tensor([lang_index[t] for _, t in self.directions], dtype=torch.int64)
        self._lang_maps: dict[tuple[str, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.src_segment.shape[0])

    def __repr__(self) -> str:
        return (f"EncodedCorpus({len(self)} examples, {len(self.directions)} directions, "
                f"{len(self.languages)} languages, {self.segment_offsets.shape[0] - 1} distinct sentences)")

    @property
    def src_lang(self) -> torch.Tensor:
        """(N,) int64, index of each example's source language in :attr:`languages`."""
        return self._direction_src[self.direction.long()]

    @property
    def tgt_lang(self) -> torch.Tensor:
        """(N,) int64, index of each example's target language in :attr:`languages`."""
        return self._direction_tgt[self.direction.long()]

    def _segment(self, segment: int) -> list[int]:
        start, end = self.segment_offsets[segment].item(), self.segment_offsets[segment + 1].item()
        return self.tokens[start:end].tolist()

    def source_ids(self, index: int) -> list[int]:
        """Source token ids of example ``index``: ``[src lang token] pieces [eos]``."""
        return self._segment(int(self.src_segment[index]))

    def target_ids(self, index: int) -> list[int]:
        """Target token ids (the labels) of example ``index``: ``[tgt lang token] pieces [eos]``."""
        return self._segment(int(self.tgt_segment[index]))

    def direction_of(self, index: int) -> tuple[str, str]:
        """``(src, tgt)`` codes of example ``index``."""
        return self.directions[int(self.direction[index])]

    def direction_sizes(self) -> torch.Tensor:
        """(num_directions,) int64, the number of examples of each direction."""
        return torch.bincount(self.direction.long(), minlength=len(self.directions))

    def language_ids(self, languages: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example source and target ids as positions in ``languages`` (the model's order).

        Returns:
            src_lang_ids, tgt_lang_ids: (N,) int64.
        """
        lang_map = self._language_map(languages)
        return lang_map[self.src_lang], lang_map[self.tgt_lang]

    def _language_map(self, languages: Sequence[str]) -> torch.Tensor:
        key = tuple(languages)
        if key not in self._lang_maps:
            if isinstance(languages, str):
                raise TypeError("languages must be a list of codes, not one string")
            position = {code: i for i, code in enumerate(key)}
            absent = [code for code in self.languages if code not in position]
            if absent:
                raise ValueError(f"the corpus has languages {absent} that are not in languages={list(key)}")
            self._lang_maps[key] = torch.tensor([position[code] for code in self.languages], dtype=torch.int64)
        return self._lang_maps[key]


# ----------------------------------------------------------------------------- sampling and batches
def sampling_probabilities(sizes: Sequence[int] | torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """Temperature sampling over directions: ``p_d = (n_d / N) ** (1 / T) / sum_e (n_e / N) ** (1 / T)``.

    Args:
        sizes: (D,) examples per direction, non-negative, not all zero.
        temperature: T > 0; 1 = proportional to size, ``math.inf`` = uniform over non-empty directions.

    Returns:
        (D,) float64 probabilities (0 for an empty direction).
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    if sizes.dim() != 1 or sizes.numel() == 0 or (sizes < 0).any() or sizes.sum() <= 0:
        raise ValueError(f"sizes must be a non-empty 1-D list of counts >= 0, not all zero, got {sizes.tolist()}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"sampling temperature must be a number > 0, got {temperature!r}")
    shares = sizes / sizes.sum()
    weights = (shares > 0).double() if math.isinf(temperature) else shares ** (1.0 / temperature)
    return weights / weights.sum()


def direction_sample_counts(sizes: Sequence[int] | torch.Tensor, *, temperature: float = 5.0,
                            total: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """How many examples of each direction one epoch draws: ``total * p_d``, rounded without bias.

    The integer parts are fixed; the leftover units go to directions drawn (without replacement)
    with weights equal to the fractional parts, so ``E[count_d] = total * p_d`` up to that scheme
    and ``|count_d - total * p_d| < 1``. Values within 1e-6 of an integer are that integer, so a
    corpus whose directions have equal sizes gets exactly its sizes back.

    Args:
        sizes: (D,) examples per direction.
        temperature: see :func:`sampling_probabilities`.
        total: examples in the epoch, default ``sum(sizes)`` (fairseq's epoch).
        generator: the random source of the rounding.

    Returns:
        (D,) int64 counts summing to ``total``.
    """
    probabilities = sampling_probabilities(sizes, temperature)
    total = int(torch.as_tensor(sizes).sum()) if total is None else total
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"epoch size must be a positive int, got {total!r}")
    expected = probabilities * total
    nearest = expected.round()
    expected = torch.where((expected - nearest).abs() < 1e-6, nearest, expected)
    counts = expected.floor()
    fractions = expected - counts
    leftover = total - int(counts.sum())
    if leftover > 0:
        chosen = torch.multinomial(fractions, leftover, replacement=False, generator=generator)
        counts[chosen] += 1
    return counts.to(torch.int64)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A stable hash: the same (seed, epoch) gives the same stream on every process and machine,
    # and neighbouring epochs get unrelated streams.
    digest = hashlib.sha256(f"lslo.data:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    return value


def make_batches(
    corpus: EncodedCorpus,
    *,
    max_tokens: int,
    epoch: int,
    seed: int,
    temperature: float = 5.0,
    max_sentences: int | None = None,
    epoch_size: int | None = None,
    oversize: str = "error",
    buckets: ShapeBuckets | None = None,
) -> Batches:
    """One epoch of mixed-direction batches under a token budget (fairseq's ``--max-tokens``).

    1. Sampling: direction d contributes ``c_d`` examples (:func:`direction_sample_counts`,
       ``p_d ~ (n_d / N) ** (1 / T)``, epoch size ``N`` by default). ``c_d <= n_d``: ``c_d``
       distinct examples; ``c_d > n_d``: every example ``c_d // n_d`` times plus ``c_d % n_d``
       distinct others. With equal ``n_d`` (FLORES: every direction 997 lines) ``c_d = n_d``:
       one pass over every example.
    2. Batching: examples sorted by length (longer side, then source, then target; ties in a
       random order) and cut greedily so that ``max(len) * n <= max_tokens`` on both sides (and
       ``n <= max_sentences``), one binary search per batch (:func:`_cut_points`); sorting across
       directions is what mixes them within a batch.
    3. The batch order is shuffled.

    All randomness comes from ``(seed, epoch)``: every process gets the same list (the engine
    shards it); a resumed run rebuilds the same epoch.

    Args:
        corpus: the :class:`EncodedCorpus`.
        max_tokens: token budget of a batch (padded size of the longer side).
        epoch: epoch number (any int; the engine counts from 1).
        seed: run seed.
        temperature: sampling temperature T (fairseq's default set-up and the paper's: 5).
        max_sentences: at most this many sentences a batch (fairseq's ``--batch-size``).
        epoch_size: examples drawn per epoch, default all ``N``.
        oversize: what to do with an example longer than ``max_tokens`` on its own: ``"error"``
            (default: ValueError naming it and how many there are, before any batch is made; cut
            them with ``encode_examples(max_length=...)``) or ``"skip"`` (leave them out of
            sampling, with a warning giving the count).
        buckets: static batch shapes (:class:`ShapeBuckets`): the cut of step 2 is
            :func:`bucketed_batches`'; pad each collated batch with :func:`pad_to_bucket`.

    Returns:
        :class:`Batches`: a sequence of example-index lists into ``corpus`` (an upsampled example may
        appear more than once), held as one index tensor plus offsets.
    """
    if not isinstance(corpus, EncodedCorpus):
        raise TypeError(f"corpus must be an EncodedCorpus (from encode_examples), got {type(corpus).__name__}")
    _check_int("max_tokens", max_tokens, 1)
    _check_int("epoch", epoch)
    _check_int("seed", seed)
    if max_sentences is not None:
        _check_int("max_sentences", max_sentences, 1)
    if oversize not in ("error", "skip"):
        raise ValueError(f"oversize must be 'error' or 'skip', got {oversize!r}")
    cost = torch.maximum(corpus.src_lengths, corpus.tgt_lengths).long()
    eligible = _eligible(corpus, cost, max_tokens, oversize)
    generator = _epoch_generator(seed, epoch)
    selected = _sample_epoch(corpus, eligible, temperature, epoch_size, generator)
    selected, sorted_cost = _sorted_by_length(corpus, cost, eligible, selected, generator)

    if buckets is not None:  # static shapes on request (see ShapeBuckets)
        cut = bucketed_batches(selected, sorted_cost, buckets, max_tokens=max_tokens, max_sentences=max_sentences)
        sizes = torch.tensor([len(batch) for batch in cut], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        indices = torch.tensor([index for batch in cut for index in batch], dtype=torch.int64)
        return Batches(indices, offsets, torch.randperm(len(cut), generator=generator))
    limit = max_sentences if max_sentences is not None else max_tokens
    starts = _cut_points(sorted_cost, max_tokens, limit)
    offsets = torch.cat([starts, torch.tensor([selected.numel()])])
    return Batches(selected, offsets, torch.randperm(starts.numel(), generator=generator))


def _eligible(corpus: EncodedCorpus, cost: torch.Tensor, max_tokens: int, oversize: str) -> torch.Tensor:
    """(M,) int64, the examples that fit ``max_tokens`` on their own; the others raise or are skipped."""
    too_long = cost > max_tokens
    eligible = torch.arange(len(corpus))
    if too_long.any():
        count = int(too_long.sum())
        first = int(too_long.nonzero()[0])
        src, tgt = corpus.direction_of(first)
        if oversize == "error":
            raise ValueError(
                f"{count} example(s) do not fit max_tokens={max_tokens} on their own; the first is example {first} "
                f"({src}-{tgt}: {int(corpus.src_lengths[first])} source and {int(corpus.tgt_lengths[first])} target "
                "tokens). Raise max_tokens, cut long sentences with max_length, or pass oversize='skip'"
            )
        # stacklevel 3: the warning names make_batches' caller
        warnings.warn(f"make_batches: skipping {count} example(s) longer than max_tokens={max_tokens}", stacklevel=3)
        eligible = eligible[~too_long]
    if eligible.numel() == 0:
        raise ValueError("make_batches: no example to batch")
    return eligible


def _sorted_by_length(corpus: EncodedCorpus, cost: torch.Tensor, eligible: torch.Tensor, selected: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected sorted by length, their costs): the order step 2 of :func:`make_batches` cuts."""
    # Random order first, then a stable sort by (longer side, source, target): equal lengths end up
    # in a random order. One sort on a combined key, computed once per example in corpus order and
    # gathered once (three gathers in random order cost more than the sort at 10M examples).
    permutation = torch.randperm(selected.numel(), generator=generator)
    all_eligible = eligible.numel() == len(corpus)
    selected = permutation if selected.numel() == len(corpus) and all_eligible and _is_identity(selected) \
        else selected[permutation]
    base = int(cost[eligible].max()) + 1  # any base above every length gives the same lexicographic order
    if base**3 < 2**62:
        key = (cost * base + corpus.src_lengths.long()) * base + corpus.tgt_lengths.long()
        sorted_key, order = torch.sort(key[selected], stable=True)
        selected, sorted_cost = selected[order], sorted_key // (base * base)
    else:  # lengths beyond 2**20 tokens: three stable sorts, least significant key first
        for key in (corpus.tgt_lengths, corpus.src_lengths, cost):
            selected = selected[torch.argsort(key[selected].long(), stable=True)]
        sorted_cost = cost[selected]
    return selected, sorted_cost


def _is_identity(indices: torch.Tensor) -> bool:
    return bool((indices == torch.arange(indices.numel())).all())


def _sample_epoch(corpus: EncodedCorpus, eligible: torch.Tensor, temperature: float, epoch_size: int | None,
                  generator: torch.Generator) -> torch.Tensor:
    """The examples of one epoch, direction by direction (see :func:`make_batches`, step 1).

    Returns:
        (epoch_size,) int64 example indices: direction d's ``c_d`` examples, directions in order.
    """
    # Group eligible examples by direction once: members of direction d are grouped[starts[d]:starts[d+1]].
    directions = corpus.direction[eligible].long()
    in_order = bool((directions[1:] >= directions[:-1]).all())  # multi-way corpora are direction-major
    grouped = eligible if in_order else eligible[torch.argsort(directions, stable=True)]
    sizes = torch.bincount(directions, minlength=len(corpus.directions))
    counts = direction_sample_counts(sizes, temperature=temperature, total=epoch_size, generator=generator)
    if torch.equal(counts, sizes):  # one pass over every example (FLORES): no draw, no copy
        return grouped
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).tolist()
    picked = []
    for d, (size, count) in enumerate(zip(sizes.tolist(), counts.tolist())):
        if size == 0:
            continue
        members = grouped[starts[d] : starts[d + 1]]
        repeats, rest = divmod(count, size)
        if repeats:
            picked.append(members.repeat(repeats))
        if rest:
            picked.append(members[torch.randperm(size, generator=generator)[:rest]])
    return torch.cat(picked)


def _cut_points(sorted_cost: torch.Tensor, max_tokens: int, limit: int) -> torch.Tensor:
    """First positions of the greedy token-budget batches over length-sorted examples.

    The greedy rule (add the next example while ``max(len) * n <= max_tokens`` and ``n <= limit``)
    with non-decreasing costs: the batch starting at ``s`` holds ``j`` iff ``j - s + 1 <=
    cap[j] = min(max_tokens // cost[j], limit)``, i.e. ``s >= first[j] = j + 1 - cap[j]``.
    ``first`` is strictly increasing (``cap`` never grows), so a batch's end is one
    ``searchsorted`` of its start in ``first``. Inside a run of equal ``cap = k`` every batch that
    ends in the run holds exactly k examples, so those starts are one ``arange``: the loop runs
    once per run of equal cost (a few hundred), not once per batch or example.

    Args:
        sorted_cost: (N,) int64, non-decreasing, each ``<= max_tokens``.
        max_tokens, limit: the budget and the most sentences a batch.

    Returns:
        (num_batches,) int64 start positions, from 0.
    """
    n = sorted_cost.numel()
    cap = torch.clamp((max_tokens // sorted_cost), max=limit)
    first = (torch.arange(1, n + 1, dtype=torch.int64) - cap).numpy()
    caps, lengths = torch.unique_consecutive(cap, return_counts=True)
    run_ends = lengths.cumsum(0).tolist()
    pieces, position, run = [], 0, 0
    while position < n:
        while run_ends[run] <= position:
            run += 1
        k, end = int(caps[run]), run_ends[run]
        whole = (end - position) // k  # batches that start here and end inside this run
        if whole:
            pieces.append(torch.arange(position, position + whole * k, k, dtype=torch.int64))
            position += whole * k
        if position < end:  # the batch that crosses into the next run(s)
            pieces.append(torch.tensor([position], dtype=torch.int64))
            position = int(first.searchsorted(position, side="right"))
    return torch.cat(pieces)


class Batches(Sequence):
    """One epoch's batches as one index tensor plus offsets and an order.

    Batch ``b`` is ``indices[offsets[k]:offsets[k+1]]`` with ``k = order[b]``: the examples stay in
    their length-sorted order and only the batch order is shuffled (no copy of the epoch). A
    sequence of ``list[int]`` (what :func:`collate` and the engine take; ``batches[a:b]`` is a list
    of lists); equal to another :class:`Batches` or to a list of lists with the same batches.

    Attributes:
        indices: (total,) int64 example indices, length-sorted.
        offsets: (num_batches + 1,) int64 batch bounds in ``indices``, from 0 to ``total``.
        order: (num_batches,) int64, the epoch's batch order (a permutation).
    """

    def __init__(self, indices: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor | None = None):
        self.indices = indices.to(torch.int64)
        self.offsets = offsets.to(torch.int64)
        self.order = torch.arange(self.offsets.numel() - 1) if order is None else order.to(torch.int64)
        self._bounds = self.offsets.tolist()
        self._order = self.order.tolist()

    def __len__(self) -> int:
        return len(self._order)

    def _batch(self, b: int) -> list[int]:
        k = self._order[b]
        return self.indices[self._bounds[k] : self._bounds[k + 1]].tolist()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._batch(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        return self._batch(index)

    def __iter__(self):
        for b in range(len(self)):
            yield self._batch(b)

    def __eq__(self, other) -> bool:
        if isinstance(other, Batches):
            return torch.equal(self.sizes, other.sizes) and torch.equal(self.flat(), other.flat())
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(list(a) == b for a, b in zip(other, self))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"Batches({len(self)} batches, {self.indices.numel()} examples)"

    @property
    def sizes(self) -> torch.Tensor:
        """(num_batches,) int64 examples per batch, in batch order."""
        return (self.offsets[1:] - self.offsets[:-1])[self.order]

    def flat(self) -> torch.Tensor:
        """(total,) int64 example indices in batch order (batch 0's, then batch 1's, ...)."""
        sizes = self.sizes
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
        shift = (self.offsets[:-1][self.order] - starts).repeat_interleave(sizes)
        return self.indices[torch.arange(self.indices.numel()) + shift]

    def tolist(self) -> list[list[int]]:
        """The batches as plain lists (JSON-ready)."""
        return list(self)


def collate(corpus: EncodedCorpus, indices: Sequence[int], *, pad_token_id: int,
            languages: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pad one batch of examples into model inputs, right-padded.

    Args:
        corpus: the :class:`EncodedCorpus`.
        indices: B example indices (one entry of :func:`make_batches`).
        pad_token_id: the tokenizer's ``pad_token_id``.
        languages: the model's language codes in id order (``LSLoConfig.languages``); every
            language of the batch must be among them.

    Returns:
        ``input_ids`` (B, S) int64, ``attention_mask`` (B, S) int64, ``labels`` (B, T) int64 with
        -100 on padding (the model derives ``decoder_input_ids = [eos, labels[:-1]]``),
        ``src_lang_ids`` (B,) int64 and ``tgt_lang_ids`` (B,) int64: positions in ``languages``,
        for ``lslo.route(src=..., tgt=...)``.
    """
    indices = torch.as_tensor(list(indices), dtype=torch.int64)
    if indices.numel() == 0:
        raise ValueError("collate: empty batch")
    if indices.min() < 0 or indices.max() >= len(corpus):
        raise ValueError(f"collate: indices must be in [0, {len(corpus)}), got {indices.min()}..{indices.max()}")
    _check_int("pad_token_id", pad_token_id, 0)
    lang_map = corpus._language_map(languages)

    def pad(segments: torch.Tensor, value: int) -> torch.Tensor:
        starts = corpus.segment_offsets[segments.long()]
        lengths = corpus.segment_offsets[segments.long() + 1] - starts
        out = torch.full((len(segments), int(lengths.max())), value, dtype=torch.int64)
        for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
            out[row, :length] = corpus.tokens[start : start + length]
        return out

    input_ids = pad(corpus.src_segment[indices], pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    src_lengths = corpus.src_lengths[indices].long()
    attention_mask[torch.arange(input_ids.shape[1])[None, :] < src_lengths[:, None]] = 1
    direction = corpus.direction[indices].long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad(corpus.tgt_segment[indices], -100),
        "src_lang_ids": lang_map[corpus._direction_src[direction]],
        "tgt_lang_ids": lang_map[corpus._direction_tgt[direction]],
    }


# ------------------------------------------------------------------------- static batch shapes
class ShapeBuckets(NamedTuple):
    """Static batch shapes on request (``lslo train --pad-to-multiple`` / ``--length-buckets``).

    A batch's padded length is its longest example (either side) rounded up to the first of
    ``lengths`` that holds it, or, past them or without them, to a multiple of ``pad_to_multiple``;
    both sides are padded to that length and every batch of one length holds the same number of
    sentences (all but the last of each length), so a run sees a small fixed set of
    (sentences, length) shapes: what ``torch.compile`` and CUDA graphs need to reuse their work.

    Attributes:
        pad_to_multiple: round lengths up to a multiple of this (1 = no rounding).
        lengths: increasing bucket lengths (may be empty).
    """

    pad_to_multiple: int = 1
    lengths: tuple[int, ...] = ()

    @classmethod
    def parse(cls, pad_to_multiple: int | None = None, length_buckets: str | Sequence[int] | None = None):
        """The buckets of the two flags, or None when neither is given.

        Args:
            pad_to_multiple: ``--pad-to-multiple``, an int >= 1.
            length_buckets: ``--length-buckets``, e.g. ``"16,32,64,128"`` or a sequence of ints.
        """
        if pad_to_multiple is None and length_buckets is None:
            return None
        multiple = 1 if pad_to_multiple is None else pad_to_multiple
        _check_int("pad_to_multiple", multiple, 1)
        if isinstance(length_buckets, str):
            try:
                lengths = tuple(int(v) for v in length_buckets.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"length_buckets must be comma-separated ints, got {length_buckets!r}") from None
        else:
            lengths = tuple(length_buckets or ())
        for value in lengths:
            _check_int("length_buckets entry", value, 1)
        if list(lengths) != sorted(set(lengths)):
            raise ValueError(f"length_buckets must be strictly increasing, got {list(lengths)}")
        return cls(multiple, lengths)

    def max_shapes(self, max_length: int | None) -> int | None:
        """How many (sentences, length) shapes batches of examples up to ``max_length`` tokens can
        take at most (two per padded length: the full batch and one remainder); without
        ``max_length``, those of the buckets alone (None without buckets)."""
        if max_length is None:
            return 2 * len(self.lengths) if self.lengths else None
        past = max_length - (self.lengths[-1] if self.lengths else 0)  # lengths past the last bucket
        return 2 * (len(self.lengths) + max(0, -(-past // self.pad_to_multiple)))

    def padded_length(self, length: int) -> int:
        """The padded length of a batch whose longest example has ``length`` tokens."""
        for bucket in self.lengths:
            if length <= bucket:
                return bucket
        return -(-length // self.pad_to_multiple) * self.pad_to_multiple


def bucketed_batches(selected: torch.Tensor, cost: torch.Tensor, buckets: ShapeBuckets, *, max_tokens: int,
                     max_sentences: int | None = None) -> list[list[int]]:
    """Cut examples sorted by length into batches of static shapes (see :class:`ShapeBuckets`).

    Args:
        selected: (N,) int64 example indices, sorted by ``cost`` (increasing).
        cost: (N,) int64 longer side of each selected example, in the same order.
        buckets: the shapes.
        max_tokens: budget: ``padded length * sentences <= max_tokens`` for every batch.
        max_sentences: at most this many sentences a batch.

    Returns:
        Batches of example indices (in ``selected``'s order); each batch's examples share one padded length.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    current_length = 0
    for index, length in zip(selected.tolist(), cost.tolist()):
        padded = buckets.padded_length(length)
        if padded > max_tokens:
            raise ValueError(f"example {index} ({length} tokens) pads to {padded} tokens, over max_tokens={max_tokens}; "
                             "raise max_tokens or change the length buckets")
        per_batch = max_tokens // padded if max_sentences is None else min(max_sentences, max_tokens // padded)
        if current and (padded != current_length or len(current) >= per_batch):
            batches.append(current)
            current = []
        current.append(index)
        current_length = padded
    if current:
        batches.append(current)
    return batches


def pad_to_bucket(batch: Mapping[str, torch.Tensor], buckets: ShapeBuckets, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A :func:`collate` batch with both sides padded to its bucket's length.

    Args:
        batch: ``input_ids`` (B, S), ``attention_mask`` (B, S), ``labels`` (B, T) (-100 on padding), ...
        buckets: the shapes.
        pad_token_id: the tokenizer's pad id (for ``input_ids``).

    Returns:
        The same entries, ``input_ids``/``attention_mask``/``labels`` (B, P) with
        ``P = buckets.padded_length(max(S, T))``; the other entries unchanged.
    """
    length = buckets.padded_length(max(batch["input_ids"].shape[1], batch["labels"].shape[1]))
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    out = dict(batch)
    for name, fill in fills.items():
        value = batch[name]
        out[name] = torch.nn.functional.pad(value, (0, length - value.shape[1]), value=fill)
    return out
