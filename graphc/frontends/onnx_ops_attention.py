"""ONNX Attention (opset 23+), written out with matmul/softmax so every backend lowers it.

Follows the ONNX reference (onnx/reference/ops/op_attention.py): 3-D inputs are
split into heads, the KV cache is concatenated, masks become an additive bias
(bool masks: -inf where False), causal masks are aligned bottom-right, grouped KV
heads are repeated, and rows whose every key is masked give 0 instead of NaN.
"""

from __future__ import annotations

import math

import torch

from graphc.frontends.onnx_ops import OpDef

_NEG_INF = float("-inf")


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, s, hidden = x.shape
    return x.reshape(b, s, n, hidden // n).transpose(1, 2)


def _bias(node, q, k_len, mask, past_len, nonpad):
    """The additive [.., q, kv] bias: mask, causal frontier, KV padding."""
    q_len, dtype = q.shape[2], q.dtype
    dev = q.device
    bias = torch.zeros((q_len, k_len), dtype=dtype, device=dev)
    if mask is not None:
        if mask.shape[-1] < k_len:  # a mask shorter than the keys: the rest is masked
            pad = [0, k_len - mask.shape[-1]]
            mask = torch.nn.functional.pad(mask, pad, value=False if mask.dtype == torch.bool
                                           else _NEG_INF)
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, _NEG_INF).to(dtype)
        bias = bias + mask
    if node.attr("is_causal", 0):
        i = torch.arange(q_len, device=dev).reshape(q_len, 1)
        j = torch.arange(k_len, device=dev).reshape(1, k_len)
        if nonpad is not None and past_len == 0:
            offset = (nonpad.reshape(-1) - q_len).reshape(-1, 1, 1, 1)
            allowed = j <= i + offset
        else:
            allowed = j <= i + past_len
        bias = bias + torch.where(allowed, 0.0, _NEG_INF).to(dtype)
    left, right = node.attr("left_window_size", -1), node.attr("right_window_size", -1)
    if left >= 0 or right >= 0:  # a sliding window around each query's absolute position
        i = torch.arange(q_len, device=dev).reshape(q_len, 1)
        j = torch.arange(k_len, device=dev).reshape(1, k_len)
        offset = past_len
        if nonpad is not None and past_len == 0:
            offset = (nonpad.reshape(-1) - q_len).reshape(-1, 1, 1, 1)
        diff = i + offset - j
        allowed = torch.ones_like(diff, dtype=torch.bool)
        allowed = allowed & (diff <= left) if left >= 0 else allowed
        allowed = allowed & (-diff <= right) if right >= 0 else allowed
        bias = bias + torch.where(allowed, 0.0, _NEG_INF).to(dtype)
    if nonpad is not None:
        keep = torch.arange(k_len, device=dev) < nonpad.reshape(-1, 1)
        bias = bias + torch.where(keep, 0.0, _NEG_INF).to(dtype).reshape(-1, 1, 1, k_len)
    return bias


def _attention(node, q, k, v, mask=None, past_k=None, past_v=None, nonpad=None):
    if (past_k is None) != (past_v is None):
        raise node.unsupported("past_key without past_value", True)
    three_d = q.ndim == 3
    if three_d:
        qh, kvh = node.attr("q_num_heads"), node.attr("kv_num_heads")
        if not qh or not kvh:
            raise node.unsupported("3-D inputs without q_num_heads/kv_num_heads", None)
        q, k, v = _heads(q, qh), _heads(k, kvh), _heads(v, kvh)
    scale = node.attr("scale") or 1 / math.sqrt(q.shape[3])
    past_len = 0 if past_k is None else past_k.shape[2]
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    present_k, present_v = k, v
    bias = _bias(node, q, k.shape[2], mask, past_len, nonpad)
    if q.shape[1] != k.shape[1]:  # grouped-query attention: share each KV head
        reps = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1)
    s = math.sqrt(scale)  # the reference scales both operands, which rounds the same way
    qk = (q * s) @ (k * s).transpose(2, 3)
    softcap = node.attr("softcap", 0.0)
    if softcap > 0:
        qk = torch.tanh(qk / softcap) * softcap
    with_bias = qk + bias
    mx = with_bias.amax(-1, keepdim=True)
    e = torch.exp(with_bias - torch.where(torch.isinf(mx), 0.0, mx))
    total = e.sum(-1, keepdim=True)
    probs = e / torch.where(total == 0, 1.0, total)
    masked_row = torch.isneginf(bias.amax(-1, keepdim=True))
    probs = torch.where(masked_row, 0.0, probs)
    mode = node.attr("qk_matmul_output_mode", 0)
    qk_out = {0: qk, 1: qk, 2: with_bias, 3: probs}.get(mode)
    if qk_out is None:
        raise node.unsupported("qk_matmul_output_mode", mode)
    y = probs @ v
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    outs = (y, present_k, present_v, qk_out)
    n = max(i for i, name in enumerate(node.outputs) if name) + 1
    return outs[:n]


_RULES = {"linear": (False, False), "gated": (True, False), "delta": (False, True),
          "gated_delta": (True, True)}


def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H*D] (or [B, T, H]: one value per head) -> [B, H, T, D]."""
    b, t, hd = x.shape
    return x.reshape(b, t, heads, hd // heads).transpose(1, 2)


def _linear_attention(node, q, k, v, past=None, decay=None, beta=None):
    """Recurrent (linear) attention, unrolled over the static sequence length."""
    rule = node.attr("update_rule", "gated_delta")
    if rule not in _RULES:
        raise node.unsupported("update_rule", rule)
    gating, delta = _RULES[rule]
    qh, kvh = node.attr("q_num_heads"), node.attr("kv_num_heads")
    if not qh or not kvh or (decay is not None) != gating or (beta is not None) != delta:
        raise node.unsupported("heads / decay / beta for update_rule", rule)
    q4, k4, v4 = _per_head(q, qh), _per_head(k, kvh), _per_head(v, kvh)
    b, t, d_k, d_v = q.shape[0], q.shape[1], q4.shape[-1], v4.shape[-1]
    g4 = _per_head(decay, kvh) if gating else None  # [B, H, T, 1 or d_k]
    b4 = _per_head(beta, beta.shape[-1]) if delta else None  # [B, 1 or H, T, 1]
    state = past if past is not None else q.new_zeros(b, kvh, d_k, d_v)
    scale = node.attr("scale", 0.0) or 1 / math.sqrt(d_k)
    outs = []
    for i in range(t):
        k_t, v_t = k4[:, :, i], v4[:, :, i]
        if gating:
            state = state * torch.exp(g4[:, :, i]).unsqueeze(-1)
        if delta:
            retrieved = torch.einsum("bhdm,bhd->bhm", state, k_t)
            v_t = b4[:, :, i] * (v_t - retrieved)
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        read = state.repeat_interleave(qh // kvh, 1) if qh != kvh else state
        outs.append(scale * torch.einsum("bhd,bhdm->bhm", q4[:, :, i], read))
    y = torch.stack(outs, 2).transpose(1, 2).reshape(b, t, qh * d_v)
    return y, state


OPS: dict[str, OpDef] = {"Attention": OpDef(_attention),
                         "LinearAttention": OpDef(_linear_attention)}
