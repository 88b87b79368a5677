"""Quantization-aware training: fine-tune a fake-quantized Graph with a plain torch loop.

    q = graphc.quantize(g, calibration=batches, bits=4)
    q = graphc.qat.train(q, [(x, y), ...], epochs=3, lr=3e-4)

Gradients reach the weights through the fake-quant ops' straight-through estimator and
the scales through their LSQ gradient. Scales get a smaller learning rate (`scale_lr`,
default lr / 100): a step of `lr` would move an int8 scale (~1e-3) by its own size.
The loop is short enough to write yourself: optimize `g.gm.parameters()` and call
`g.gm(*inputs)`; `train` only adds the two parameter groups and the copy below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from graphc.errors import GraphcError
from graphc.ir import Graph
from graphc.ops_quant import FAKE_QUANT_OPS


def own_parameters(graph: Graph) -> Graph:
    """A copy of graph whose parameters are its own: graph.copy() shares weight tensors,
    and training the copy would otherwise change the graph it came from."""
    g = graph.copy()
    for name, p in list(g.gm.named_parameters()):
        g.gm.register_parameter(name, torch.nn.Parameter(p.detach().clone()))
    return g


def scale_names(g: Graph) -> set[str]:
    """Attribute names of the scales that fake-quant ops read (arg 1)."""
    return {str(n.args[1].target) for n in g.gm.graph.nodes
            if n.op == "call_function" and n.target in FAKE_QUANT_OPS and len(n.args) > 3}


def param_groups(g: Graph, lr: float, scale_lr: float | None = None,
                 names: set[str] | None = None) -> list[dict]:
    """Adam groups: [weights at lr, fake-quant scales at scale_lr (default lr / 100)];
    only the parameters in `names` when given (graphc.distill trains a subset)."""
    scales = scale_names(g)
    params = {n: p for n, p in g.gm.named_parameters() if names is None or n in names}
    return [{"params": [p for n, p in params.items() if n not in scales], "lr": lr},
            {"params": [p for n, p in params.items() if n in scales],
             "lr": lr / 100 if scale_lr is None else scale_lr}]


def train(graph: Graph, data: Iterable, loss_fn: Callable | None = None, *, epochs: int = 1,
          lr: float = 3e-4, scale_lr: float | None = None) -> Graph:
    """Train a copy of graph on `data` with Adam; returns the trained copy.

    data: re-iterable (a list or DataLoader) of (inputs, target), inputs a tensor or a
    tuple of tensors. loss_fn(output, target) -> scalar; default cross-entropy. The
    output is a tensor when the graph has one output, else a tuple. graph.meta["qat"] records
    the mean loss of every epoch. QAT fine-tunes a trained model: the default lr is well
    below a from-scratch one (3e-3 made an int4 MLP worse, 3e-4 cut its error 3x).
    """
    if epochs < 1 or lr <= 0:
        raise GraphcError(f"qat.train: epochs={epochs} must be >= 1 and lr={lr} > 0")
    g = own_parameters(graph)
    loss_fn = loss_fn or F.cross_entropy
    groups = param_groups(g, lr, scale_lr)
    opt = torch.optim.Adam([grp for grp in groups if grp["params"]])
    losses = []
    g.gm.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for inputs, target in data:
            inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            out = g.gm(*inputs)
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
            loss = loss_fn(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # a step must not make a scale 0 or negative (x / scale)
                for p in groups[1]["params"]:
                    p.clamp_(min=1e-8)
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
    g.gm.eval()
    g.meta["qat"] = {"epochs": epochs, "lr": lr, "epoch_losses": losses}
    return g
