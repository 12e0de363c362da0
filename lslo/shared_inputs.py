"""Shared-input groups of :class:`~lslo.layer.LSLoLinear` layers: q/k/v in one op call.

An attention block calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after the other on the same
tensor (cross-attention: ``k_proj(enc)``, ``v_proj(enc)``). A :class:`SharedInputGroup` joins such
layers without touching the model's forward: the first member called with an input computes every
member's output in one grouped op call (``lslo_kernels.shared.shared_input_lora``) and keeps the
others' outputs; a member then called with the SAME tensor (same object, same version counter) and
the same routing object takes its output from there. Any other call (another input, another
routing, a member changed in between so that the group does not apply) runs the member alone, so
the group never changes what a layer computes, only how many op calls compute it.

The layers keep their own parameters and buffers: state dicts, adapter files, pruning masks and
optimizer state are those of the separate layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lslo_kernels import get_backend
from lslo_kernels.shared import LoRAFactors, shared_input_lora

from .base_layer import _plain_linear
from .layer import LSLoLinear

__all__ = ["SharedInputGroup", "group_shared_inputs", "shared_groups", "ungroup_shared_inputs"]


class SharedInputGroup:
    """LSLoLinear layers a model always calls on one input tensor, in one op call per input.

    Only training calls (grad mode on, eager) are grouped: decoding keeps each layer's own no-grad
    fast path. The group is a plain object held in each member's ``_shared_group`` attribute (not a
    submodule: the state dict does not change).

    Args:
        members: two or more LSLoLinear layers with the same in_features, index, number of
            languages, backend and validation setting.
        always: group on every backend; by default only on backends that ask for it
            (``Backend.shared_inputs``; ``cpp`` does not: its per-layer ops are cheaper there).
    """

    def __init__(self, members: Sequence[LSLoLinear], *, always: bool = False):
        members = tuple(members)
        if len(members) < 2:
            raise ValueError(f"a shared-input group needs at least two layers, got {len(members)}")
        first = members[0]
        for m in members:
            if not isinstance(m, LSLoLinear):
                raise TypeError(f"shared-input group members must be LSLoLinear, got {type(m).__name__}")
            mine = (m.in_features, m.index, m.num_languages, m.backend, m.validate)
            theirs = (first.in_features, first.index, first.num_languages, first.backend, first.validate)
            if mine != theirs:
                raise ValueError(f"shared-input group members differ in (in_features, index, languages, backend, "
                                 f"validate): {mine} != {theirs}")
        self.members = members
        self.always = always
        self._position = {id(m): i for i, m in enumerate(members)}
        self._kept = None  # (x, x version, routing, {position: y}) of the last grouped call

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_kept"] = None  # outputs of a past call are not part of a copy
        state["_position"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._position = {id(m): i for i, m in enumerate(self.members)}

    def _applies(self, x: torch.Tensor, backend: str) -> bool:
        if not (self.always or get_backend(backend).shared_inputs):
            return False
        for m in self.members:
            base = m._modules["base_layer"]
            if (m.merged_language is not None or not _plain_linear(base)
                    or (m.lora_in_features, m.lora_out_features) != (m.in_features, m.out_features)):
                return False
            params = base._parameters
            if params["weight"].requires_grad or (params["bias"] is not None and params["bias"].requires_grad):
                return False  # a trained base (ft-all) takes the layers' own autograd
            if m._parameters["lora_A"].dtype != x.dtype or m._backend_for(x) != backend:
                return False
        return True

    def output(self, member: LSLoLinear, x: torch.Tensor, routing, backend: str) -> torch.Tensor | None:
        """``member``'s (T, out_features) output rows for x, from the group's one op call; None where the
        group does not apply (the member then runs alone).

        Args:
            member: the layer being called.
            x: (..., in_features) its input, already checked by the layer.
            routing: the layer's Routing of x's tokens.
            backend: the resolved backend name.
        """
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        position = self._position.get(id(member))
        kept = self._kept
        if kept is not None:
            if kept[0] is x and kept[1] == x._version and kept[2] is routing:
                y = kept[3].pop(position, None)
                if not kept[3]:
                    self._kept = None
                if y is not None:
                    return y
            else:
                self._kept = None
        if position is None or not self._applies(x, backend):
            return None
        x_rows = x.reshape(-1, member.in_features).contiguous()
        weights, biases, factors = [], [], []
        for m in self.members:
            params = m._modules["base_layer"]._parameters
            weights.append(params["weight"])
            biases.append(params["bias"])
            factors.append(LoRAFactors(*m._tensors(), m.max_rank))
        ys = shared_input_lora(x_rows, weights, biases, factors, routing, backend)
        others = {i: y for i, y in enumerate(ys) if i != position}
        self._kept = (x, x._version, routing, others)
        return ys[position]


def group_shared_inputs(groups: Sequence[Sequence[LSLoLinear]], *, always: bool = False) -> list[SharedInputGroup]:
    """Join each sequence of layers into a :class:`SharedInputGroup` (replacing earlier groups).

    Args:
        groups: per group, the LSLoLinear layers called on one input.
        always: as :class:`SharedInputGroup`'s.

    Returns:
        The groups made.
    """
    made = []
    for members in groups:
        group = SharedInputGroup(members, always=always)
        for m in group.members:
            m._shared_group = group
        made.append(group)
    return made


def shared_groups(model: torch.nn.Module) -> list[SharedInputGroup]:
    """The distinct shared-input groups of the LSLoLinear layers inside ``model``."""
    seen: dict[int, SharedInputGroup] = {}
    for module in model.modules():
        group = getattr(module, "_shared_group", None) if isinstance(module, LSLoLinear) else None
        if group is not None:
            seen.setdefault(id(group), group)
    return list(seen.values())


def ungroup_shared_inputs(model: torch.nn.Module) -> None:
    """Run every LSLoLinear inside ``model`` alone again (one op call per layer)."""
    for module in model.modules():
        if isinstance(module, LSLoLinear):
            module._shared_group = None
