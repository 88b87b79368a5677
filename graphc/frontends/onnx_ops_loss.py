"""ONNX normalizations with statistics outputs, RMS and group norms, and the loss ops.

LayerNormalization's optional Mean / InvStdDev outputs and the losses are written
out with elementwise torch ops (no F.nll_loss), so every backend lowers them from
ops it already knows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphc.frontends.onnx_ops import Node, OpDef, axis_of


def _wants(node: Node, i: int) -> bool:
    return len(node.outputs) > i and bool(node.outputs[i])


def _check_stash(node: Node) -> None:
    if node.attr("stash_type", 1) != 1:  # 1: statistics in float32
        raise node.unsupported("stash_type", node.attr("stash_type"))


def _layer_norm(node: Node, x: torch.Tensor, scale: torch.Tensor, bias=None):
    _check_stash(node)
    axis = axis_of(node, node.attr("axis", -1), x.ndim)
    eps = node.attr("epsilon", 1e-5)
    if not (_wants(node, 1) or _wants(node, 2)):
        shape = x.shape[axis:]
        # ONNX lets scale/bias broadcast to the normalized shape; torch wants it exact
        scale = scale if scale.shape == shape else scale.expand(shape)
        bias = bias if bias is None or bias.shape == shape else bias.expand(shape)
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = list(range(axis, x.ndim))
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = (x - mean) * inv_std * scale
    return (y if bias is None else y + bias), mean, inv_std


def _rms_norm(node: Node, x: torch.Tensor, scale: torch.Tensor):
    _check_stash(node)
    dims = list(range(axis_of(node, node.attr("axis", -1), x.ndim), x.ndim))
    rms = torch.sqrt((x * x).mean(dims, keepdim=True) + node.attr("epsilon", 1e-5))
    return x / rms * scale


def _group_norm(node: Node, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    _check_stash(node)
    groups, c = node.attr("num_groups"), x.shape[1]
    if scale.shape[0] != c:  # opset 18: one scale per group, per channel since opset 21
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    return F.group_norm(x, groups, scale, bias, node.attr("epsilon", 1e-5))


def _nll(node: Node, logp: torch.Tensor, target: torch.Tensor, weight=None):
    """Negative log-likelihood of target classes under logp [N, C, d...] (ONNX semantics)."""
    reduction = node.attr("reduction", "mean")
    if reduction not in ("none", "sum", "mean"):
        raise node.unsupported("reduction", reduction)
    ignore = node.attr("ignore_index")
    valid = None if ignore is None else target != ignore
    safe = target if valid is None else torch.where(valid, target, 0)  # gather needs real rows
    picked = -torch.gather(logp, 1, safe.unsqueeze(1)).squeeze(1)
    w = None if weight is None else weight[safe]
    if valid is not None:
        w = valid.to(logp.dtype) if w is None else w * valid
    loss = picked if w is None else picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if w is None else loss.sum() / w.sum()


def _softmax_ce(node: Node, scores: torch.Tensor, labels: torch.Tensor, weight=None):
    logp = F.log_softmax(scores, 1)
    loss = _nll(node, logp, labels, weight)
    return (loss, logp) if _wants(node, 1) else loss


OPS: dict[str, OpDef] = {
    "LayerNormalization": OpDef(_layer_norm),
    "RMSNormalization": OpDef(_rms_norm),
    "GroupNormalization": OpDef(_group_norm),
    "NegativeLogLikelihoodLoss": OpDef(_nll),
    "SoftmaxCrossEntropyLoss": OpDef(_softmax_ce),
}
