"""Tiny Hugging Face objects built offline, shared by the tests, the benchmarks and the demo: no download.

- :func:`make_tokenizer`: a real ``M2M100Tokenizer`` over a sentencepiece model trained in a
  folder on generated text or on the text you give it (so it tokenizes, pads and carries the 100
  M2M-100 language tokens).
- :func:`tiny_config` / :func:`tiny_model`: an ``M2M100ForConditionalGeneration`` small enough to
  run beam search in milliseconds, with a vocabulary that covers the tokenizer.
- :func:`m2m124_config`: the M2M-124 615M shape (build it under ``torch.device("meta")``).
- :func:`make_sentences`: deterministic pseudo-sentences of varied length.
- :func:`encode_pairs`: a padded mixed-direction training batch.
- :func:`randomize_adapters`: non-zero LSLo factors, so that routing changes the output.
- :func:`one_thread`: tiny models run faster on one intra-op thread.

This module imports only torch at import time (transformers and sentencepiece when called).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

import torch

from .layer import LSLoLinear

__all__ = [
    "RUN_LANGS", "RUN_STEMS", "encode_pairs", "m2m124_config", "make_sentences", "make_tokenizer", "one_thread",
    "randomize_adapters", "tiny_config", "tiny_model", "tiny_run_setup", "write_flores",
]

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ba", "de", "fo", "gu", "ha", "je", "pi", "zu"]


@contextlib.contextmanager
def one_thread():
    """Run tiny-model code on one intra-op thread, then restore the thread count.

    Ops on a d_model-32 model are tiny: a second thread only adds synchronisation, which on a busy
    machine makes them much slower (measured: benchmarks/README.md, "Measurements behind comments").
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_sentences(count: int, seed: int = 0, min_words: int = 2, max_words: int = 12) -> list[str]:
    """``count`` pseudo-sentences of ``min_words``..``max_words`` words built from a few syllables."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(min_words, max_words))]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def make_tokenizer(directory: str | os.PathLike, vocab_size: int = 160, texts: Iterable[str] | None = None, *,
                   model_type: str = "bpe", extra_language_codes: Iterable[str] = ()):
    """Train a sentencepiece model in ``directory`` and wrap it in an ``M2M100Tokenizer``.

    The vocabulary file follows the released checkpoints: ``<s> <pad> </s> <unk>`` at ids 0-3, then
    the sentencepiece pieces; the tokenizer appends the 100 language tokens ``__xx__`` after them.

    Args:
        directory: where the sentencepiece model (``spm.model``) and ``vocab.json`` are written.
        vocab_size: sentencepiece pieces (the tokenizer has 4 + this - 3 ids before its language tokens).
        texts: training sentences (any iterable of str, read once); default 2,000 :func:`make_sentences`.
        model_type: sentencepiece model type ("bpe" as M2M-100, or "unigram").
        extra_language_codes: codes whose ``__xx__`` token goes into the vocabulary, outside the
            tokenizer's table of 100 (as M2M-124's 24 extra languages are for a stock tokenizer).

    Returns:
        the ``M2M100Tokenizer`` (``language_codes="m2m100"``); ``save_pretrained`` makes it loadable
        with ``M2M100Tokenizer.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    import sentencepiece
    from transformers import M2M100Tokenizer

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"vocab_size must be an int >= 8, got {vocab_size!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of sentences, not one string")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "spm")
    sentences = iter(make_sentences(2000, seed=1234)) if texts is None else (t for t in texts if t.strip())
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece_id in range(processor.get_piece_size()):
        vocab.setdefault(processor.id_to_piece(piece_id), len(vocab))
    for code in extra_language_codes:
        vocab.setdefault(f"__{code}__", len(vocab))
    vocab_file = os.path.join(directory, "vocab.json")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    return M2M100Tokenizer(vocab_file, prefix + ".model", language_codes="m2m100")


def tiny_config(vocab_size: int, **overrides):
    """An ``M2M100Config`` of d_model 32, 2 + 2 layers, no dropout or layer drop (deterministic)."""
    from transformers import M2M100Config

    kwargs = {
        "vocab_size": vocab_size, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
        "max_position_embeddings": 128, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "decoder_start_token_id": 2,
    }
    kwargs.update(overrides)
    return M2M100Config(**kwargs)


def m2m124_config(vocab_size: int = 128112):
    """The shape of M2M-124 615M (flores101_mm100_615M): d_model 1024, 12 + 12 layers, FFN 4096.

    LSLo counts don't depend on the vocabulary. With M2M-100's 128,112 tokens the base has 484M
    parameters; the paper's 615M total comes from M2M-124's 256k vocabulary (vocab_size=256206).
    """
    from transformers import M2M100Config

    return M2M100Config(
        vocab_size=vocab_size, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, encoder_attention_heads=16, decoder_attention_heads=16,
        dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    )


def tiny_model(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float64, weight_std: float = 0.5, **overrides):
    """A random ``M2M100ForConditionalGeneration`` whose vocabulary covers ``tokenizer`` (eval mode).

    Matrices are drawn N(0, weight_std^2): with HF's default 0.02 a random model emits one token
    forever, whatever the input, and a test of routing would prove nothing.
    float64 by default: comparisons of generated tokens across batch layouts must not hinge on
    float32 rounding that a different padding length can flip.
    """
    from transformers import M2M100ForConditionalGeneration

    # As the released checkpoints: pieces, then the language tokens, then the "madeup words".
    # (len(tokenizer) and get_vocab() leave the language tokens out.)
    overrides.setdefault("vocab_size", max(tokenizer.lang_code_to_id.values()) + 1 + tokenizer.num_madeup_words)
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(tiny_config(**overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, weight_std)
    return model.to(dtype).eval()


@torch.no_grad()
def randomize_adapters(model, seed: int = 0, std: float = 0.5) -> None:
    """Random LSLo factors: A ~ N(0, 1/in), B ~ N(0, std^2), so that each language's update
    s B A x is of the order of a base output (weight_std sqrt(in) |x|): routing then matters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LSLoLinear):
            a = torch.randn(module.lora_A.shape, generator=generator, dtype=torch.float64)
            b = torch.randn(module.lora_B.shape, generator=generator, dtype=torch.float64)
            module.lora_A.copy_(a / module.lora_A.shape[1] ** 0.5)
            module.lora_B.copy_(b * std)


def _encode_each(tokenizer, texts, langs) -> list[list[int]]:
    previous = tokenizer.src_lang
    try:
        out = []
        for text, lang in zip(texts, langs):
            tokenizer.src_lang = lang  # M2M-100 format on both sides: [lang token] text [eos]
            out.append(tokenizer(text)["input_ids"])
        return out
    finally:
        tokenizer.src_lang = previous


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


def encode_pairs(tokenizer, sources, targets, src_langs, tgt_langs) -> dict[str, torch.Tensor]:
    """A training batch of a mixed-direction set of pairs, right-padded.

    Returns:
        input_ids (B, S), attention_mask (B, S), labels (B, T) with -100 on padding; the model
        derives decoder_input_ids (B, T) = [eos, labels[:-1]] from the labels.
    """
    src_rows = _encode_each(tokenizer, sources, src_langs)
    tgt_rows = _encode_each(tokenizer, targets, tgt_langs)
    input_ids = _pad(src_rows, tokenizer.pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
        "labels": _pad(tgt_rows, -100),
    }


# ------------------------------------------------------------------ tiny training set-up
RUN_LANGS = ("en", "fr", "oc", "wo")  # groups H, H, V, V
RUN_STEMS = {"en": "eng", "fr": "fra", "oc": "oci", "wo": "wol"}


def write_flores(root: Path, dev_lines: int = 12, devtest_lines: int = 6) -> Path:
    """A FLORES-layout folder of :data:`RUN_LANGS`: line i of every language is one (artificial) meaning."""
    for split, n, seed in (("dev", dev_lines, 1), ("devtest", devtest_lines, 2)):
        (root / split).mkdir(parents=True, exist_ok=True)
        base = make_sentences(n, seed=seed, max_words=6)
        for k, (code, stem) in enumerate(RUN_STEMS.items()):
            # Each "language" rewrites the shared sentence its own way (reversed words, a marker).
            lines = [" ".join(w[::-1] if k % 2 else w for w in s.split()) + f" {code}" * k for s in base]
            (root / split / f"{stem}.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def tiny_run_setup(root: Path, dev_lines: int = 12, devtest_lines: int = 6) -> dict:
    """A tiny fp32 model folder (model + tokenizer, as ``lslo train --model`` takes) and a FLORES folder
    (:func:`write_flores`), the set-up the engine tests and ``benchmarks.bench_train_step`` share.

    Returns:
        ``{"model": folder, "flores": folder, "root": root}`` (paths as str, root as Path).
    """
    tokenizer = make_tokenizer(root / "spm")
    model = tiny_model(tokenizer, dtype=torch.float32, weight_std=0.1)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_flores(root / "flores", dev_lines, devtest_lines)
    return {"model": str(root / "model"), "flores": str(root / "flores"), "root": root}
