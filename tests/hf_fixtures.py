"""The tiny Hugging Face builders now live in :mod:`lslo.testing` (shared with the benchmarks and
the demo); this module re-exports them so that ``from tests.hf_fixtures import ...`` keeps working,
and adds the tiny training set-up (a saved model folder and a FLORES-layout corpus) that the engine
and analysis tests share."""

from pathlib import Path

from lslo.testing import (
    encode_pairs,
    m2m124_config,
    make_sentences,
    make_tokenizer,
    one_thread,
    randomize_adapters,
    tiny_config,
    tiny_model,
)

__all__ = [
    "RUN_LANGS", "RUN_STEMS", "encode_pairs", "m2m124_config", "make_sentences", "make_tokenizer", "one_thread",
    "randomize_adapters", "tiny_config", "tiny_model", "tiny_run_setup", "write_flores",
]

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
    """A tiny fp32 model folder (model + tokenizer, as ``lslo train --model`` takes) and a FLORES folder.

    Returns:
        ``{"model": folder, "flores": folder, "root": root}`` (paths as str, root as Path).
    """
    import torch

    tokenizer = make_tokenizer(root / "spm")
    model = tiny_model(tokenizer, dtype=torch.float32, weight_std=0.1)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_flores(root / "flores", dev_lines, devtest_lines)
    return {"model": str(root / "model"), "flores": str(root / "flores"), "root": root}
