"""The compiled training step of ``lslo train --compile``: forward and loss in one traced graph.

:func:`routed_loss` is one batch's forward and label-smoothed loss inside its :func:`lslo.route`
block; traced by ``torch.compile`` it is one graph with no break (the LSLo layers reach the op
through its custom op, and ``lslo.route`` has a traceable path), and AOTAutograd compiles its
backward too, so forward, loss and backward all run compiled. :func:`compile_loss` compiles it with
static shapes (``dynamic=False``: one graph per batch shape, which the static shape buckets of
``--pad-to-multiple`` / ``--length-buckets`` keep few) and CUDA graphs on CUDA
(``mode="reduce-overhead"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .context import route

__all__ = ["compile_loss", "routed_loss", "smoothed_losses"]


def smoothed_losses(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed loss, nll): means over the target tokens that are not -100.

    Args:
        logits: (B, T, V) any float dtype (computed in float32).
        labels: (B, T) int64, -100 on padding.
        epsilon: label smoothing (torch's ``label_smoothing``).

    Returns:
        loss (differentiable) and nll (no grad), float32 scalars.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=epsilon)
    with torch.no_grad():
        nll = F.cross_entropy(logits, labels, ignore_index=-100) if epsilon else loss.detach()
    return loss, nll


def routed_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, labels: torch.Tensor, src_lang_ids: torch.Tensor,
                tgt_lang_ids: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's forward and loss inside ``lslo.route(src=src_lang_ids, tgt=tgt_lang_ids)``.

    Args:
        model: an M2M-100 model (with LSLo layers or not).
        input_ids, attention_mask: (B, S) int64. decoder_input_ids, labels: (B, T) int64.
        src_lang_ids, tgt_lang_ids: (B,) int64 language ids of the model's LSLo config.
        label_smoothing: epsilon.

    Returns:
        (loss, nll) as :func:`smoothed_losses`.
    """
    with route(src=src_lang_ids, tgt=tgt_lang_ids):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=decoder_input_ids).logits
        return smoothed_losses(logits, labels, label_smoothing)


def compile_loss(device: torch.device, *, backend: str = "inductor", fn: Callable = routed_loss,
                 max_shapes: int | None = None) -> Callable:
    """``torch.compile`` of :func:`routed_loss` for a run on ``device``.

    Args:
        device: the training device: on CUDA with ``mode="reduce-overhead"`` (CUDA graphs).
        backend: the compiler backend (``"aot_eager"`` traces without code generation, for tests).
        fn: the function to compile.
        max_shapes: batch shapes the run will see (e.g. two per length bucket): dynamo's recompile
            limit is raised to it, so that no shape falls back to eager.

    Returns:
        The compiled callable, same arguments and results as ``fn``.
    """
    if max_shapes is not None and max_shapes > torch._dynamo.config.recompile_limit:
        torch._dynamo.config.recompile_limit = max_shapes
    mode = "reduce-overhead" if torch.device(device).type == "cuda" and backend == "inductor" else None
    return torch.compile(fn, backend=backend, mode=mode, dynamic=False)
