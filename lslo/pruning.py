"""Unstructured L1 pruning of the LSLo B matrices: the Gradual Pruning Schedule (paper Eq. 4), language
and layer pools, and the Intrinsic-Subspace score of Eq. 6.

The masks live in each :class:`~lslo.LSLoLinear`'s ``prune_mask`` buffer (True = entry kept) and are
consumed by the grouped kernels directly; no ``torch.nn.utils.prune`` hooks run at training time.
Which entries a pool prunes is the choice ``torch.nn.utils.prune.global_unstructured(...,
pruning_method=L1Unstructured, amount=ratio)`` makes on the same pool of ``B * mask`` values: the
``round(ratio * n)`` smallest magnitudes of the pool, already-pruned entries (exactly zero) first.
The ratio is therefore the sparsity of the whole pool after the call, not a fraction of what is
left, which is what the schedule's P_e means.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layer import LSLoLinear
from .model import _require_config, lslo_modules

__all__ = ["PoolEntry", "gradual_pruning_ratio", "pool_entries", "prune", "pruning_summary", "subspace_scores"]

_POOLS = ("language", "layer")
_LAYER_PATTERN = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def gradual_pruning_ratio(epoch: int, target: float, *, start: int = 2, duration: int = 8) -> float:
    """Pruning ratio of ``epoch`` under the Gradual Pruning Schedule (Eq. 4; Zhu and Gupta, 2017).

    Epochs count from 1. ``0`` for ``epoch <= start``; ``P - P * (1 - (epoch - start) / duration) ** 3``
    for ``start < epoch <= start + duration``; ``P`` afterwards. The paper uses start E=2, duration k=8
    over T=15 epochs.

    Args:
        epoch: the epoch about to be trained (>= 1).
        target: the final ratio P, in [0, 1).
        start: E, the last epoch without pruning (>= 0).
        duration: k, the number of epochs over which the ratio rises to P (>= 1).
    """
    for name, value in (("epoch", epoch), ("start", start), ("duration", duration)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if epoch < 1:
        raise ValueError(f"epoch counts from 1, got {epoch}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if duration < 1:
        raise ValueError(f"duration must be >= 1, got {duration}")
    target = _check_ratio(target, "target")
    if epoch <= start:
        return 0.0
    if epoch <= start + duration:
        return target - target * (1.0 - (epoch - start) / duration) ** 3
    return target


def _check_ratio(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


@dataclass(frozen=True)
class PoolEntry:
    """One language's block of one module's B: ``module.lora_B[:, col0:col1]``.

    ``side`` is ``"encoder"``/``"decoder"`` and ``layer`` the layer index (``None`` for modules
    outside ``{encoder,decoder}.layers.N``); ``module_type`` is the path inside the layer
    (``"self_attn.q_proj"``, ``"fc1"``).
    """

    name: str
    module: LSLoLinear
    language: str
    col0: int
    col1: int
    side: str | None
    layer: int | None
    module_type: str

    def values(self) -> torch.Tensor:
        """|B_l * M_l|, flattened: (lora_out_features * r_l,) float32."""
        block = self.module.lora_B[:, self.col0 : self.col1].detach()
        mask = self.module.prune_mask[:, self.col0 : self.col1]
        return (block * mask).abs().float().reshape(-1)

    def mask(self) -> torch.Tensor:
        return self.module.prune_mask[:, self.col0 : self.col1]


def pool_entries(model: nn.Module) -> list[PoolEntry]:
    """Every (module, language) block of every LSLo B matrix of ``model``, in module then language order."""
    config = _require_config(model, "pruning")
    entries = []
    for name, module in lslo_modules(model).items():
        match = _LAYER_PATTERN.search(name)
        side, layer, module_type = (match.group(1), int(match.group(2)), match.group(3)) if match else (None, None, name)
        col = 0
        for code, rank in zip(config.languages, module.ranks):
            entries.append(PoolEntry(name, module, code, col, col + rank, side, layer, module_type))
            col += rank
    return entries


def _amounts(model: nn.Module, amount) -> dict[str, float]:
    config = _require_config(model, "prune")
    if isinstance(amount, Mapping):
        ratios = {}
        for code, ratio in amount.items():
            config.lang_id(code)  # unknown code -> ValueError listing the known ones
            ratios[code] = _check_ratio(ratio, f"amount[{code!r}]")
        return ratios
    ratio = _check_ratio(amount, "amount")
    return dict.fromkeys(config.languages, ratio)


@torch.no_grad()
def prune(model: nn.Module, amount: float | Mapping[str, float], *, pool: str = "language",
          optimizer: torch.optim.Optimizer | None = None) -> dict[str, dict[str, int]]:
    """Global unstructured L1 pruning of the LSLo B matrices, written into the kernels' masks.

    Args:
        model: a model with LSLo (:func:`lslo.apply_lslo`).
        amount: one ratio in [0, 1) for every language, or ``{language code: ratio}``; languages
            not named are neither pruned nor part of any pool.
        pool: ``"language"``: one pool per language over all of its B entries in every layer and
            module (the paper's GPS, Section 3.2). ``"layer"``: one pool per encoder layer and one
            per decoder layer, across the named languages and all modules (layer-wise cross-language
            pruning for Intrinsic Subspace Estimation, Section 4.2); all named ratios must then be
            equal, since a pool has one ratio.
        optimizer: if given, its per-parameter state (Adam's moments, ...) is zeroed at the newly
            pruned entries, so that momentum gathered before pruning cannot move them off zero.

    The pruned entries of a pool are the ``round(ratio * n)`` smallest ``|B * mask|`` (already
    pruned entries first), as ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``
    chooses them; masks only grow, and pruned entries of B are set to exactly zero.

    Returns:
        ``{pool name: {"numel": n, "pruned": pruned after the call}}``; pool names are language
        codes or ``"encoder.3"`` style layer names.
    """
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
    ratios = _amounts(model, amount)
    entries = [e for e in pool_entries(model) if e.language in ratios]
    pools: dict[str, list[PoolEntry]] = {}
    if pool == "language":
        for entry in entries:
            pools.setdefault(entry.language, []).append(entry)
        pool_ratio = {code: ratios[code] for code in pools}
    else:
        if len(set(ratios.values())) > 1:
            raise ValueError(f"pool='layer' prunes each layer's pool at one ratio; got different ratios {ratios}")
        for entry in entries:
            if entry.side is None:
                raise ValueError(f"pool='layer' needs modules inside encoder/decoder layers; {entry.name} is not")
            pools.setdefault(f"{entry.side}.{entry.layer}", []).append(entry)
        pool_ratio = dict.fromkeys(pools, next(iter(ratios.values()), 0.0))

    summary = {}
    for pool_name, members in pools.items():
        values = torch.cat([m.values().to("cpu") for m in members])
        kept_before = torch.cat([m.mask().reshape(-1).to("cpu") for m in members])
        n = values.numel()
        # torch.nn.utils.prune._compute_nparams_toprune: round(amount * n).
        k = round(pool_ratio[pool_name] * n)
        keep = kept_before.clone()
        if k > 0:
            # Already pruned entries rank below every kept one, so a new mask always contains the old
            # (torch picks them first too, as their value is 0; the -1 only settles ties with kept zeros).
            scores = torch.where(kept_before, values, torch.full_like(values, -1.0))
            drop = torch.topk(scores, k, largest=False, sorted=False).indices
            keep[drop] = False
        offset = 0
        for member in members:
            size = member.mask().numel()
            block_keep = keep[offset : offset + size].reshape(member.mask().shape).to(member.mask().device)
            newly_pruned = member.mask() & ~block_keep
            member.module.prune_mask[:, member.col0 : member.col1] = block_keep
            member.module.lora_B[:, member.col0 : member.col1].mul_(block_keep)
            if optimizer is not None and bool(newly_pruned.any()):
                _zero_optimizer_state(optimizer, member.module.lora_B, member.col0, member.col1, newly_pruned)
            offset += size
        summary[pool_name] = {"numel": n, "pruned": int(n - int(keep.sum()))}
    return summary


def _zero_optimizer_state(optimizer, parameter, col0: int, col1: int, pruned: torch.Tensor) -> None:
    state = optimizer.state.get(parameter)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            value[:, col0:col1].masked_fill_(pruned, 0)


def subspace_scores(model: nn.Module, target: float) -> list[dict]:
    """Eq. 6 per language x module x layer: ``Score(B) = #pruned(B) - target * #B``.

    A negative score means the pool pruned fewer of that B's entries than the target ratio: the
    language needs more space there; positive, less. Within one pool the scores sum to
    ``#pruned(pool) - target * #pool``, zero when the pool was pruned exactly to ``target``.

    Args:
        model: a model with LSLo whose masks were set by :func:`prune` (pool ``"layer"`` for
            Intrinsic Subspace Estimation, ``"language"`` for language-specific pruning).
        target: P_ISE (or P_LSP), the ratio the pools were pruned to.

    Returns:
        One dict per block: language, side, layer, module, numel, pruned, score.
    """
    target = _check_ratio(target, "target")
    rows = []
    for entry in pool_entries(model):
        mask = entry.mask()
        numel = mask.numel()
        pruned = int(numel - int(mask.sum()))
        rows.append({
            "language": entry.language, "side": entry.side, "layer": entry.layer, "module": entry.module_type,
            "numel": numel, "pruned": pruned, "score": pruned - target * numel,
        })
    return rows


def pruning_summary(model: nn.Module) -> dict[str, float]:
    """Fraction of each language's B entries that are pruned, over all modules: ``{code: ratio}``."""
    counts: dict[str, list[int]] = {}
    for entry in pool_entries(model):
        mask = entry.mask()
        total = counts.setdefault(entry.language, [0, 0])
        total[0] += mask.numel() - int(mask.sum())
        total[1] += mask.numel()
    return {code: (pruned / n if n else 0.0) for code, (pruned, n) in counts.items()}

