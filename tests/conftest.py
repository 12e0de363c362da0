import os

# Make the tests reproducible on the CI's 2 cores and independent of the machine's core count.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Without CUDA the Triton kernels run in Triton's CPU interpreter. Triton must be in that mode before
# anything imports it: torch._dynamo imports triton when a test module imports it (test_fast_step), and
# kernels built after that under a TRITON_INTERPRET set later (test_triton_backend) called their
# @triton.jit helpers as compiled functions ("Cannot call @triton.jit'd outside of the scope of a kernel").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="module")
def hf_one_thread():
    """Tiny-HF-model modules run on one intra-op thread (see tests.hf_fixtures.one_thread)."""
    from tests.hf_fixtures import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """An M2M100Tokenizer over a SentencePiece model trained once per session on generated text."""
    from tests.hf_fixtures import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("spm"))

