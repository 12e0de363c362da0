"""The tiny Hugging Face builders and the tiny training set-up (a saved model folder and a
FLORES-layout corpus) live in :mod:`lslo.testing` (shared with the benchmarks and the demo); this
module re-exports them so that ``from tests.hf_fixtures import ...`` keeps working."""

from lslo.testing import (
    RUN_LANGS,
    RUN_STEMS,
    encode_pairs,
    m2m124_config,
    make_sentences,
    make_tokenizer,
    one_thread,
    randomize_adapters,
    tiny_config,
    tiny_model,
    tiny_run_setup,
    write_flores,
)

__all__ = [
    "RUN_LANGS", "RUN_STEMS", "encode_pairs", "m2m124_config", "make_sentences", "make_tokenizer", "one_thread",
    "randomize_adapters", "tiny_config", "tiny_model", "tiny_run_setup", "write_flores",
]
