"""End to end: training-step throughput of a whole M2M-124 615M-shaped model (random weights).

lslo (``lslo.apply_lslo`` with the paper's lang30 config: every q/k/v of self- and
cross-attention and fc1/fc2 adapted, H;M;L;V ranks 2;2;8;8, the learned src/tgt index plan)
against the naive per-language loop on the very same layers. PEFT's mixed-adapter batch refuses
training mode, so it gets a ``skipped`` row with PEFT's own message. Beam-5 decoding throughput
comes from ``benchmarks/bench_translate.py`` (``run(quick)``) when that file exists.

One step: forward with the loss, backward, AdamW on the adapter factors. Tokens/s counts source
plus target tokens. Everything missing (``lslo.apply_lslo``, transformers) gives a ``skipped`` row,
never an error.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import time
from collections.abc import Callable

import torch
from torch import nn

import lslo_kernels

from . import providers as P

__all__ = ["M2M124_615M", "NaiveLoopLinear", "run_e2e"]

# facebook/flores101_mm100_615M: 12 + 12 layers, d_model 1024, FFN 4096, 16 heads; its shared
# 256k SentencePiece vocabulary is what brings the count to ~615M parameters.
M2M124_615M = {
    "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096, "encoder_attention_heads": 16, "decoder_attention_heads": 16,
    "vocab_size": 256206, "max_position_embeddings": 1024, "dropout": 0.0, "attention_dropout": 0.0,
    "activation_dropout": 0.0,
}


class NaiveLoopLinear(nn.Module):
    """The naive provider as a layer: same factors as an ``LSLoLinear``, ids from ``lslo.route``."""

    def __init__(self, lslo_layer: nn.Module, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.ranks = list(lslo_layer.ranks)
        self.index = lslo_layer.index
        self.lora_A = nn.Parameter(lslo_layer.lora_A.detach().clone())
        self.lora_B = nn.Parameter(lslo_layer.lora_B.detach().clone())
        self.register_buffer("prune_mask", lslo_layer.prune_mask.clone())
        self.register_buffer("scales", lslo_layer.scales.clone().float())

    def forward(self, x):
        import lslo
        from lslo.context import expand_lang_ids

        ids = lslo.current_route().get_ids(self.index)
        lead = x.shape[:-1]
        lang = expand_lang_ids(ids.to(x.device), tuple(lead), "lang")
        y = P.naive_loop(x.reshape(-1, x.shape[-1]), self.base_layer, self.lora_A, self.lora_B,
                         self.prune_mask, self.scales, self.ranks, lang)
        return y.reshape(*lead, -1)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _time_steps(step: Callable[[], None], warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def run_e2e(*, quick: bool = False, model_overrides: dict | None = None, batch: int = 8, src_len: int = 32,
            tgt_len: int = 32, warmup: int = 1, reps: int = 3, seed: int = 0, beam5: bool = True,
            log=print) -> list[dict]:
    """Rows (``op`` ``e2e_train`` / ``e2e_beam5``) for the suite's CSV; skips are rows too.

    Args:
        quick: passed to ``bench_translate.run``.
        model_overrides: M2M100Config fields replacing :data:`M2M124_615M` (tests use a toy).
        batch, src_len, tgt_len: sentences per step and their lengths in tokens.
        beam5: also call ``bench_translate.run`` (beam-5 decoding), when that file exists.
    """
    rows: list[dict] = []
    case = f"B={batch} S={src_len} T={tgt_len}"

    def skip(op, provider, why):
        log(f"  {op} {provider}: skipped: {why}")
        rows.append({"op": op, "provider": provider, "mode": "fwd+bwd" if op == "e2e_train" else "fwd",
                     "metric": "skipped", "case": case, "note": why})

    try:
        from transformers import M2M100Config, M2M100ForConditionalGeneration

        import lslo
    except Exception as exc:  # noqa: BLE001
        skip("e2e_train", "lslo", f"cannot import lslo/transformers: {exc}")
        return rows + (_beam5(quick, log) if beam5 else [])
    if not hasattr(lslo, "apply_lslo") or not hasattr(lslo, "LSLoConfig"):
        skip("e2e_train", "lslo", "lslo.apply_lslo does not exist yet")
        return rows + (_beam5(quick, log) if beam5 else [])

    fields = {**M2M124_615M, **(model_overrides or {})}
    torch.manual_seed(seed)
    config = lslo.LSLoConfig(languages="lang30")
    num_languages = config.num_languages
    gen = torch.Generator().manual_seed(seed)
    vocab = fields["vocab_size"]
    input_ids = torch.randint(4, vocab, (batch, src_len), generator=gen)
    labels = torch.randint(4, vocab, (batch, tgt_len), generator=gen)
    src = torch.randint(0, num_languages, (batch,), generator=gen)
    tgt = torch.randint(0, num_languages, (batch,), generator=gen)
    tokens = batch * (src_len + tgt_len)
    row_common = {"case": case, "tokens": tokens, "languages": num_languages, "ranks": "lang30",
                  "in_features": fields["d_model"], "out_features": fields["d_model"]}

    def measure(provider: str, model: nn.Module, note: str = ""):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with lslo.route(src=src, tgt=tgt):
                loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            opt.step()

        times = _time_steps(step, warmup, reps)
        rates = sorted(tokens / t for t in times)
        q = torch.quantile(torch.tensor(rates, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
        log(f"  e2e_train {provider}: {float(q[1]):.1f} tokens/s ({len(params)} trainable tensors)")
        rows.append({"op": "e2e_train", "provider": provider, "mode": "fwd+bwd", "metric": "tokens_per_s",
                     "unit": "tokens/s", "p20": float(q[0]), "p50": float(q[1]), "p80": float(q[2]),
                     "reps": reps, "note": f"{sum(p.numel() for p in params)} trainable parameters{note}",
                     **row_common})

    try:
        base_model = M2M100ForConditionalGeneration(M2M100Config(**fields)).eval()
        # eval(): dropout off (it is 0 anyway) so both variants do the same work; grads still flow.
        model = copy.deepcopy(base_model)
        lslo.apply_lslo(model, config)
        layers = lslo.lslo_modules(model)
        backends = sorted({lslo_kernels.resolve_backend(m.backend, m.lora_A.device) for m in layers.values()})
        measure("lslo", model, f"; {len(layers)} LSLo layers, backend {'/'.join(backends)}")
        naive = base_model
        for p in naive.parameters():
            p.requires_grad_(False)
        for name, layer in layers.items():
            _set_module(naive, name, NaiveLoopLinear(layer, naive.get_submodule(name)))
        del model, layers
        measure("naive", naive)
        del naive, base_model
    except Exception as exc:  # noqa: BLE001 - an API still moving must not sink the suite
        skip("e2e_train", "lslo", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    skip("e2e_train", "peft", P._peft_training_reason() or "PEFT training with mixed batches not wired up here")
    return rows + (_beam5(quick, log) if beam5 else [])


def _beam5(quick: bool, log) -> list[dict]:
    """Rows from benchmarks/bench_translate.py's ``run(quick)``, if the file exists."""
    try:
        module = importlib.import_module("benchmarks.bench_translate")
    except ModuleNotFoundError:
        return [{"op": "e2e_beam5", "provider": "-", "mode": "fwd", "metric": "skipped",
                 "note": "benchmarks/bench_translate.py not there yet"}]
    try:
        accepts_log = "log" in inspect.signature(module.run).parameters
        result = module.run(quick, log=log) if accepts_log else module.run(quick)
    except Exception as exc:  # noqa: BLE001
        return [{"op": "e2e_beam5", "provider": "-", "mode": "fwd", "metric": "skipped",
                 "note": f"bench_translate.run failed: {type(exc).__name__}: {exc}"}]
    rows = []
    for item in result if isinstance(result, (list, tuple)) else []:
        if isinstance(item, dict) and "provider" in item and "metric" in item:
            rows.append({"op": "e2e_beam5", "mode": "fwd", **item})
    if not rows:
        log(f"  bench_translate.run returned {type(result).__name__}; nothing to add to the CSV")
    return rows
