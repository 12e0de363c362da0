"""torch.compile(fullgraph=True) traces a model built from LSLoLinears with no graph break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lslo


class TinyBlock(nn.Module):
    def __init__(self, width=16, ranks=(2, 8, 3)):
        super().__init__()
        self.up = lslo.LSLoLinear(nn.Linear(width, 2 * width), list(ranks), index="src")
        self.down = lslo.LSLoLinear(nn.Linear(2 * width, width), list(ranks), index="tgt")
        for layer in (self.up, self.down):
            with torch.no_grad():
                layer.lora_B.normal_()

    def forward(self, x, src, tgt):
        return self.down(torch.relu(self.up(x, lang=src)), lang=tgt)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compile_fullgraph_forward_and_backward(backend):
    torch.manual_seed(0)
    model = TinyBlock()
    for layer in (model.up, model.down):
        layer.backend = backend
    x = torch.randn(4, 5, 16)
    src, tgt = torch.tensor([0, 1, 2, -1]), torch.tensor([2, 2, 0, 1])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x_eager = x.clone().requires_grad_(True)
    x_comp = x.clone().requires_grad_(True)
    y_eager = model(x_eager, src, tgt)
    y_eager.sum().backward()
    grads_eager = [p.grad.clone() for p in (model.up.lora_A, model.down.lora_B)]
    model.zero_grad()
    y_comp = compiled(x_comp, src, tgt)
    y_comp.sum().backward()
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)
    for g_eager, p in zip(grads_eager, (model.up.lora_A, model.down.lora_B)):
        torch.testing.assert_close(p.grad, g_eager)


def test_compile_inductor_forward():
    torch.manual_seed(0)
    model = TinyBlock()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 16)
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([1, 1, -1])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, src, tgt), model(x, src, tgt), atol=1e-5, rtol=1e-5)
