"""The tiny Hugging Face builders now live in :mod:`lslo.testing` (shared with the benchmarks and
the demo); this module re-exports them so that ``from tests.hf_fixtures import ...`` keeps working."""

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
    "encode_pairs", "m2m124_config", "make_sentences", "make_tokenizer", "one_thread", "randomize_adapters",
    "tiny_config", "tiny_model",
]
