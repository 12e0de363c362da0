"""The compiled training step (``lslo train --compile``): no graph break, the eager step's numbers,
recompiles bounded by the number of batch shapes."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lslo
import lslo.train as train_module
from lslo.fast_step import compile_loss, routed_loss
from lslo.testing import tiny_config
from lslo.train import TrainArguments, train
from tests.hf_fixtures import RUN_LANGS, tiny_run_setup

pytestmark = pytest.mark.usefixtures("hf_one_thread")


def _model(backend: str):
    from transformers import M2M100ForConditionalGeneration

    torch.manual_seed(0)
    base = M2M100ForConditionalGeneration(tiny_config(40, d_model=16, encoder_ffn_dim=24, decoder_ffn_dim=24)).train()
    model = lslo.apply_lslo(base, lslo.LSLoConfig(languages=["en", "fr", "de"], ranks=[2, 1, 3], backend=backend))
    g = torch.Generator().manual_seed(1)
    for module in lslo.lslo_modules(model).values():
        with torch.no_grad():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.1)
    return model


def _batch(rows: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (rows, length), generator=g)
    labels = torch.randint(3, 40, (rows, length), generator=g)
    labels[:, -1] = -100
    dec = torch.randint(3, 40, (rows, length), generator=g)
    src = torch.randint(0, 3, (rows,), generator=g)
    tgt = torch.randint(-1, 3, (rows,), generator=g)
    return ids, torch.ones_like(ids), dec, labels, src, tgt


@pytest.mark.parametrize("backend", ["cpp"])
def test_no_graph_break(backend):
    if backend not in lslo_kernels_backends():
        pytest.skip(f"{backend} not built")
    model = _model(backend)
    explanation = torch._dynamo.explain(routed_loss)(model, *_batch(2, 5), 0.1)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes
           if node.op == "call_function"}
    assert any("grouped_lora_fwd" in op for op in ops)  # the LSLo op is one node the compiler sees


def lslo_kernels_backends():
    import lslo_kernels

    return lslo_kernels.available_backends()


def test_compiled_step_matches_eager_and_recompiles_per_shape():
    """aot_eager (the traced graphs, forward and AOTAutograd's backward, run without code generation):
    the loss and every adapter gradient as the eager step's; one compile per batch shape."""
    eager, compiled_model = _model("auto"), _model("auto")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(routed_loss, backend=counter, dynamic=False)
    shapes = [(2, 5), (3, 8), (2, 5)]
    for step, (rows, length) in enumerate(shapes):
        batch = _batch(rows, length, seed=step)
        results = []
        for model, fn in ((eager, routed_loss), (compiled_model, compiled)):
            loss, nll = fn(model, *batch, 0.1)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            results.append((loss.detach(), nll, grads))
        (loss_e, nll_e, grads_e), (loss_c, nll_c, grads_c) = results
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nll_c, nll_e, atol=1e-5, rtol=1e-5)
        assert grads_c.keys() == grads_e.keys() and grads_e
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4)
    assert counter.frame_count == len(set(shapes))  # recompiles bounded by the batch shapes


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r["type"] == "train"]


def test_train_compile_flag_matches_eager(tmp_path, monkeypatch):
    """`lslo train --compile --pad-to-multiple 8`: the same losses as the eager run with the same
    shapes, and at most one compile per (sentences, length) shape of the run."""
    setup = tiny_run_setup(tmp_path / "setup")
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(train_module, "compile_loss", functools.partial(compile_loss, backend=counter))
    common = {"model": setup["model"], "flores_dir": setup["flores"], "languages": ",".join(RUN_LANGS),
              "ranks": "2;8", "epochs": 1, "max_tokens": 160, "warmup_updates": 4, "lr": 3e-3, "progress": False,
              "log_every": 1, "cpu": True, "seed": 3, "dropout": 0.0, "attention_dropout": 0.0, "update_freq": 1,
              "pad_to_multiple": 8, "max_steps": 3}
    train(TrainArguments(**common, output_dir=str(tmp_path / "eager")))
    train(TrainArguments(**common, output_dir=str(tmp_path / "compiled"), compile=True))
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert 1 <= counter.frame_count <= 3
    with pytest.raises(ValueError, match="pad_to_multiple"):
        TrainArguments(**{**common, "pad_to_multiple": 0}, output_dir=str(tmp_path / "bad"))
