"""Shared parts of the ONNX op table: the node record, an op's definition, helpers.

An op is implemented once, with torch, as ``impl(node, *args)``; args follow the
node's inputs (None where an optional input is absent):

- inputs listed in ``OpDef.static`` arrive as numpy arrays. They are values the
  op needs as python ints (a Reshape's shape, a Slice's starts), so they must be
  known at load time; the loader raises a FrontendError naming the node if not.
- inputs listed in ``OpDef.scalars`` arrive as python numbers when they are known
  one-element values (``x * 0.5``), so the exported graph holds a scalar instead
  of a constant tensor; otherwise they arrive as tensors like the rest.
- an impl returns one value or a tuple (one per output). A numpy array it returns
  is static: Shape returns one, so shape arithmetic after it folds at load time.

The loader runs a node eagerly at load time when all its inputs are static; that
is how shape-derived subgraphs become python ints before torch.export sees them.
The table itself is assembled by ``op_table()`` from the ``onnx_ops_*`` families.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes  # a dependency of onnx; numpy has no bfloat16 of its own
import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from graphc.errors import FrontendError, UnsupportedOpError

TORCH_DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8, TensorProto.BOOL: torch.bool,
}


@dataclass
class Node:
    """One ONNX node, with its attributes decoded to python values."""

    index: int
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    # Filled when the loader plans the graph: static input values by position, and
    # the arguments fixed at load time (static arrays, python scalars).
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    bound: dict[int, Any] = field(default_factory=dict)

    @property
    def op(self) -> str:
        """The op's key in op_table(): op_type, prefixed by its domain outside the default."""
        default = self.domain in ("", "ai.onnx")
        return self.op_type if default else f"{self.domain}.{self.op_type}"

    def __str__(self) -> str:
        name = f"'{self.name}'" if self.name else "(unnamed)"
        return f"{self.op} node {name} (node #{self.index}, opset {self.opset})"

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def unsupported(self, what: str, value: Any) -> UnsupportedOpError:
        """The error for an attribute or input value this frontend does not implement."""
        return UnsupportedOpError(
            f"{self}: {what}={value!r} is not supported by graphc's ONNX frontend"
        )


@dataclass(frozen=True)
class OpDef:
    """How the loader calls an op's impl (see the module docstring)."""

    impl: Callable[..., Any]
    static: tuple[int, ...] = ()
    scalars: tuple[int, ...] = ()
    fold_only: bool = False  # output shape depends on data: only foldable at load time
    stats: tuple[int, ...] = ()  # inputs that are statistics, not weights: buffers, never trained


def decode_attrs(proto: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in proto.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        out[a.name] = v  # subgraphs (If/Loop bodies) stay protos; no impl accepts them
    return out


def torch_dtype(elem_type: int, where: str) -> torch.dtype:
    if elem_type not in TORCH_DTYPES:
        name = TensorProto.DataType.Name(elem_type)
        raise FrontendError(f"{where}: ONNX element type {name} is not supported")
    return TORCH_DTYPES[elem_type]


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A fresh tensor holding a copy of a numpy array (bfloat16 included)."""
    a = np.array(a)  # copy: torch.from_numpy shares memory and wants a writable array
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def ints(a: np.ndarray | None) -> list[int] | None:
    """A static 1-D (or scalar) value as python ints."""
    return None if a is None else [int(v) for v in np.asarray(a).reshape(-1)]


def axis_of(node: Node, axis: int, rank: int) -> int:
    """Normalize a possibly negative axis, naming the node if it is out of range."""
    if not -rank <= axis < rank:
        raise FrontendError(f"{node}: axis {axis} is out of range for a rank-{rank} tensor")
    return axis % rank


def torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-dimension (begin, end) pads of the last dims -> F.pad order (last dim first)."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


@functools.cache
def op_table() -> dict[str, OpDef]:
    """All ops, by Node.op: op_type for the default ONNX domain, "domain.op_type" else."""
    # Imported here: the families import this module's helpers.
    from graphc.frontends import (
        onnx_ops_attention,
        onnx_ops_conv,
        onnx_ops_elem,
        onnx_ops_loss,
        onnx_ops_math,
        onnx_ops_nn,
        onnx_ops_quant,
        onnx_ops_rnn,
        onnx_ops_shape,
        onnx_ops_signal,
        onnx_ops_spatial,
    )

    families = (onnx_ops_math, onnx_ops_elem, onnx_ops_shape, onnx_ops_nn, onnx_ops_conv,
                onnx_ops_quant, onnx_ops_loss, onnx_ops_attention, onnx_ops_spatial,
                onnx_ops_rnn, onnx_ops_signal)
    return {k: v for fam in families for k, v in fam.OPS.items()}
