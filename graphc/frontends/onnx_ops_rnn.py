"""ONNX recurrent ops (RNN, GRU, LSTM), unrolled over the static sequence length.

Gate order and equations follow the ONNX spec: LSTM gates i, o, f, c; GRU gates
z, r, h (linear_before_reset picks where the reset gate applies). Only the default
activations and full-length sequences are implemented; the rest is refused.
"""

from __future__ import annotations

import torch

from graphc.frontends.onnx_ops import Node, OpDef

_DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def _check(node: Node, x: torch.Tensor, seq_lens) -> None:
    acts = node.attr("activations")
    dirs = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    if acts is not None and [a.lower() for a in acts] != \
            [a.lower() for a in _DEFAULT_ACTS[node.op]] * dirs:
        raise node.unsupported("activations", acts)
    for key in ("clip", "activation_alpha", "activation_beta"):
        if node.attr(key) is not None:
            raise node.unsupported(key, node.attr(key))
    if node.attr("input_forget", 0):
        raise node.unsupported("input_forget", 1)
    steps = x.shape[1] if node.attr("layout", 0) else x.shape[0]
    if seq_lens is not None and (seq_lens != steps).any():
        raise node.unsupported("sequence_lens shorter than the input", seq_lens.tolist())


def _lstm_cell(xw, h, c, r, p, hidden):
    gates = xw + h @ r.t()
    i, o, f, g = gates.split(hidden, -1)
    pi, po, pf = p.split(hidden) if p is not None else (0, 0, 0)
    i, f = torch.sigmoid(i + pi * c), torch.sigmoid(f + pf * c)
    c = f * c + i * torch.tanh(g)
    o = torch.sigmoid(o + po * c)
    return o * torch.tanh(c), c


def _gru_cell(xw, h, r, rb, hidden, before_reset):
    xz, xr, xh = xw.split(hidden, -1)
    rz, rr, rh = r.split(hidden)
    bz, br, bh = rb.split(hidden)
    z = torch.sigmoid(xz + h @ rz.t() + bz)
    reset = torch.sigmoid(xr + h @ rr.t() + br)
    hh = xh + (reset * (h @ rh.t() + bh) if before_reset else (reset * h) @ rh.t() + bh)
    return (1 - z) * torch.tanh(hh) + z * h


def _recurrent(node: Node, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    _check(node, x, seq_lens)
    if node.attr("layout", 0):  # [batch, seq, ...] -> [seq, batch, ...]
        x = x.transpose(0, 1)
        h0 = None if h0 is None else h0.transpose(0, 1)
        c0 = None if c0 is None else c0.transpose(0, 1)
    hidden, dirs = r.shape[-1], w.shape[0]
    gates = w.shape[1]
    steps, batch = x.shape[0], x.shape[1]
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = node.attr("direction", "forward") == "reverse" or d == 1
        wb, rb = (b[d].split(gates) if b is not None else
                  (torch.zeros(gates, dtype=x.dtype, device=x.device),) * 2)
        xw = x @ w[d].t() + wb  # all input projections at once
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
        out = [None] * steps
        for t in (reversed(range(steps)) if reverse else range(steps)):
            if node.op == "LSTM":
                h, c = _lstm_cell(xw[t] + rb, h, c, r[d], None if p is None else p[d], hidden)
            elif node.op == "GRU":
                h = _gru_cell(xw[t], h, r[d], rb, hidden, node.attr("linear_before_reset", 0))
            else:
                h = torch.tanh(xw[t] + h @ r[d].t() + rb)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    y, y_h, y_c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
    if node.attr("layout", 0):
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    outs = (y, y_h, y_c) if node.op == "LSTM" else (y, y_h)
    n = max(i for i, name in enumerate(node.outputs) if name) + 1
    return outs[:n]


OPS: dict[str, OpDef] = {
    "RNN": OpDef(_recurrent, static=(4,)),
    "GRU": OpDef(_recurrent, static=(4,)),
    "LSTM": OpDef(_recurrent, static=(4,)),
}
