"""A graph-safe training step: routing and the op read no device value on the host (CUDA paths).

On the CPU the host-read check is simulated: ``HOST_CHECKED_DEVICES`` emptied makes CPU ids take
the CUDA path, and a torch-function plus a dispatch mode record every read of a tensor's value
into Python (``tolist``, ``item``, ``bool``/``int``/``float``, ``_local_scalar_dense``). On CUDA
the same step runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lslo
import lslo_kernels
from lslo import LSLoLinear
from lslo.shared_inputs import group_shared_inputs
from lslo_kernels import routing as routing_module


class _HostReads(TorchFunctionMode):
    """Records Python-level reads of tensor values."""

    NAMES = frozenset({"tolist", "item", "__bool__", "__int__", "__index__", "__float__", "numpy", "cpu"})

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class _ScalarReads(TorchDispatchMode):
    """Records reads of a tensor's value by the dispatcher (what ``.item()`` becomes)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_local_scalar_dense"):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _reads(fn) -> list[str]:
    with _HostReads() as by_function, _ScalarReads() as by_dispatch:
        fn()
    return by_function.seen + by_dispatch.seen


@pytest.fixture
def device_path(monkeypatch):
    """CPU ids take the path of CUDA ids (no host range check)."""
    monkeypatch.setattr(routing_module, "HOST_CHECKED_DEVICES", frozenset())
    monkeypatch.setattr(lslo.context, "HOST_CHECKED_DEVICES", frozenset())


def test_host_path_is_seen_by_the_detector():
    """The detector sees the CPU path's range check (so its silence below means something)."""
    ids = torch.tensor([0, 2, -1, 1])
    assert _reads(lambda: lslo_kernels.route_tokens(ids, (4,), 3))


def test_routing_makes_no_host_read(device_path):
    ids = torch.tensor([[0, 2, -1], [1, 1, 0]])
    assert _reads(lambda: lslo_kernels.route_tokens(ids, (2, 3), 3)) == []
    assert _reads(lambda: lslo_kernels.route_tokens(torch.tensor([2, 0]), (2, 5), 3)) == []  # per sentence

    def in_context():
        with lslo.route(src=ids, tgt=ids, num_languages=3) as ctx:
            ctx.routing_for("src", (2, 3), 3, torch.device("cpu"), True)

    assert _reads(in_context) == []
    # The ids are still checked, by a device assert (on the CPU it raises at once).
    with pytest.raises(RuntimeError, match="language id outside"):
        lslo_kernels.route_tokens(torch.tensor([0, 3]), (2,), 3)


def _layers(backend: str, device, grouped: bool):
    torch.manual_seed(0)
    layers = [LSLoLinear(nn.Linear(8, 6), [2, 1, 3], backend=backend).to(device) for _ in range(3)]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.normal_()
    if grouped:
        group_shared_inputs([layers], always=True)
    return layers


def _train_step(layers, device):
    x = torch.randn(2, 5, 8, device=device, requires_grad=True)
    ids = torch.tensor([0, 2], device=device)
    with lslo.route(src=ids, tgt=ids):
        loss = sum(layer(x).square().sum() for layer in layers)
        loss.backward()
    return x.grad


@pytest.mark.parametrize("grouped", [False, True])
def test_cpp_training_step_makes_no_host_read(device_path, grouped):
    if "cpp" not in lslo_kernels.available_backends():
        pytest.skip("cpp not built")
    layers = _layers("cpp", "cpu", grouped)
    assert _reads(lambda: _train_step(layers, "cpu")) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grouped", [False, True])
def test_cuda_training_step_does_not_synchronise(grouped):
    layers = _layers("triton", "cuda", grouped)
    _train_step(layers, "cuda")  # compile the kernels first (their first launch may synchronise)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(layers, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
