"""ONNX (de)quantization ops: QuantizeLinear, DequantizeLinear and graphc.FakeQuant.

Also here: the ops of quantized formats graphc refuses (QOperator, dynamic quantization).

Most QuantizeLinear / DequantizeLinear nodes never reach these impls: the QDQ import
(onnx_qdq.py) rewrites Q -> DQ pairs and dequantized weights into ``graphc.FakeQuant``
nodes before the graph is planned. What is left runs here as real integer ops:

- a DequantizeLinear of a computed integer tensor that no QuantizeLinear produced
  (a uint8 image input), and a QuantizeLinear whose output is a graph output;
- a Q -> DQ pair whose scales or zero points differ (a requantization): a real
  quantize (round half to even, saturate) followed by a real dequantize.

``graphc.FakeQuant`` (domain "graphc", made only by the import) calls graphc's own
``graphc::fake_quant_per_tensor`` / ``fake_quant_per_channel`` ops, the ones the
``quantize`` pass inserts, so an imported QDQ model and a model quantized by graphc
reach fold-fake-quant as the same IR. Its attributes: ``axis`` (absent: per tensor),
``qmin`` / ``qmax`` (the integer type's range, from ``GRIDS``). ``graphc.FakeQuantMatMul``
is a MatMul of a per-tensor fake-quantized input and a 2-D weight, with the fake-quant
on the rows aten.mm reads.
"""

from __future__ import annotations

import numpy as np
import torch

from graphc.errors import UnsupportedOpError
from graphc.frontends.onnx_ops import Node, OpDef, axis_of
from graphc.ops_quant import fake_quant_per_channel, fake_quant_per_tensor

# The integer grid [qmin, qmax] of each quantized element type, by numpy dtype name
# (int4 / uint4 are ml_dtypes types, as onnx.numpy_helper returns them). int32 is no
# grid: ONNX uses it for biases, which the import folds to float.
GRIDS = {
    "int8": (-128, 127), "uint8": (0, 255),
    "int16": (-32768, 32767), "uint16": (0, 65535),
    "int4": (-8, 7), "uint4": (0, 15),
}
# Integer types the real (torch) QuantizeLinear can produce.
_REAL_QUANT_TYPES = (torch.uint8, torch.int8, torch.int16)

REQUANTIZE = ("re-quantize the float model with onnxruntime.quantization.quantize_static("
              "..., quant_format=QuantFormat.QDQ)")
_HINTS = {"QOperator": REQUANTIZE,
          "dynamic-quantization": f"{REQUANTIZE}, or import the float model and run graphc's "
                                  "quantize pass with activations='dynamic'"}
# Ops of formats that compute on integer tensors between layers; graphc's IR is float
# with fake-quant ops, so these have no import. Value: the format, for the message.
_INTEGER_OPS = {
    **dict.fromkeys(["QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"],
                    "QOperator"),
    **dict.fromkeys(["com.microsoft.QGemm", "com.microsoft.QAttention",
                     "com.microsoft.QEmbedLayerNormalization"], "QOperator"),
    **dict.fromkeys(["DynamicQuantizeLinear", "com.microsoft.DynamicQuantizeMatMul",
                     "com.microsoft.MatMulIntegerToFloat"], "dynamic-quantization"),
}


def _integer_format(node: Node) -> str | None:
    if node.op.startswith("com.microsoft.QLinear"):  # QLinearAdd, QLinearConcat, ...
        return "QOperator"
    return _INTEGER_OPS.get(node.op)


def reject_integer_ops(nodes: list[Node]) -> None:
    """An UnsupportedOpError naming the first op of a QOperator / dynamic-quantization model."""
    for node in nodes:
        fmt = _integer_format(node)
        if fmt:
            raise UnsupportedOpError(
                f"{node} is a {fmt}-format quantized op, which computes on integer tensors; "
                f"graphc imports quantized ONNX in the QDQ format: {_HINTS[fmt]}")


def grid(node: Node, dtype) -> tuple[int, int]:
    """The [qmin, qmax] of a quantized type, or a clear error (float8, float4, int32...)."""
    name = np.dtype(dtype).name
    if name not in GRIDS:
        kind = "float8/float4 quantization" if name.startswith("float") else "quantized type"
        raise node.unsupported(kind, name)
    return GRIDS[name]


def check_block_size(node: Node) -> None:
    """Blocked quantization (opset 21 block_size: one scale per block) has no graphc op."""
    if node.attr("block_size", 0):
        raise node.unsupported("block_size", node.attr("block_size"))


def _along_axis(node: Node, v: torch.Tensor, rank: int) -> torch.Tensor:
    """A quantization scale/zero point: a scalar (per tensor) or 1-D along `axis`."""
    check_block_size(node)
    if v.numel() == 1:
        return v.reshape(())
    shape = [1] * rank
    shape[axis_of(node, node.attr("axis", 1), rank)] = -1
    return v.reshape(shape)


def _dequantize(node: Node, x: torch.Tensor, scale: torch.Tensor, zero=None):
    scale = _along_axis(node, scale, x.ndim)
    if zero is not None:  # (x - zero) in int32 is exact for every 8/16-bit type
        x = x.to(torch.int32) - _along_axis(node, zero, x.ndim).to(torch.int32)
    return x.to(scale.dtype) * scale


def _quantize(node: Node, x: torch.Tensor, scale: torch.Tensor, zero=None):
    dtype = zero.dtype if zero is not None else torch.uint8
    if dtype not in _REAL_QUANT_TYPES or node.attr("output_dtype", 0):
        raise node.unsupported("quantized type", dtype)
    y = torch.round(x / _along_axis(node, scale, x.ndim))  # half to even, as ONNX says
    if zero is not None:
        y = y + _along_axis(node, zero, x.ndim).to(y.dtype)
    info = torch.iinfo(dtype)
    return torch.clamp(y, info.min, info.max).to(dtype)


def _fake_quant(node: Node, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    qmin, qmax, axis = node.attr("qmin"), node.attr("qmax"), node.attr("axis")
    if axis is None:
        return fake_quant_per_tensor(x, scale, zero_point, qmin, qmax)
    # normalized here, where the rank is known: an activation's rank is not at import time
    return fake_quant_per_channel(x, scale, zero_point, axis_of(node, axis, x.ndim), qmin, qmax)


def _fake_quant_matmul(node: Node, x: torch.Tensor, scale: torch.Tensor,
                       zero_point: torch.Tensor, w: torch.Tensor):
    """x @ w with x fake-quantized as the 2-D operand of aten.mm, where the quantize pass
    puts it: torch.matmul would flatten a fake-quantized x, leaving a view in between.
    Per tensor, the fake-quant commutes with the flattening, so the result is the same."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.mm(fake_quant_per_tensor(rows, scale, zero_point, node.attr("qmin"),
                                       node.attr("qmax")), w)
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], w.shape[-1])


OPS: dict[str, OpDef] = {
    "QuantizeLinear": OpDef(_quantize),
    "DequantizeLinear": OpDef(_dequantize),
    # onnxruntime's contrib versions (use_qdq_contrib_ops, 16-bit types): same semantics
    "com.microsoft.QuantizeLinear": OpDef(_quantize),
    "com.microsoft.DequantizeLinear": OpDef(_dequantize),
    "graphc.FakeQuant": OpDef(_fake_quant),
    "graphc.FakeQuantMatMul": OpDef(_fake_quant_matmul),
}
