"""TensorSpec: the name, shape and dtype of a graph input or output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphc.errors import InputError

# Short dtype names used in printed IR and in saved artifacts.
DTYPE_NAMES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class TensorSpec:
    """A static tensor signature: name, shape and dtype (graphc compiles for static shapes)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.name}: {dtype_name(self.dtype)}[{', '.join(map(str, self.shape))}]"

    @property
    def numpy_dtype(self) -> np.dtype:
        return torch.empty((), dtype=self.dtype).numpy().dtype

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @staticmethod
    def from_json(d: dict) -> TensorSpec:
        return TensorSpec(d["name"], tuple(d["shape"]), DTYPES_BY_NAME[d["dtype"]])

    @staticmethod
    def of(name: str, t: torch.Tensor) -> TensorSpec:
        return TensorSpec(name, tuple(t.shape), t.dtype)

    def example(self, seed: int = 0) -> torch.Tensor:
        """A deterministic example tensor of this spec (randn for floats, small ints otherwise)."""
        g = torch.Generator().manual_seed(seed)
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, generator=g).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=g).bool()
        return torch.randint(0, 8, self.shape, generator=g).to(self.dtype)


def check_inputs(specs: list[TensorSpec], values: tuple, where: str,
                 kinds: tuple[type, ...] = (torch.Tensor, np.ndarray)) -> None:
    """Raise InputError naming the input if count, kind, shape or dtype differ from the specs."""
    if len(values) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputError(f"{where}: expected {len(specs)} inputs ({names}), got {len(values)}")
    for spec, v in zip(specs, values):
        if not isinstance(v, kinds):
            raise InputError(f"{where}: input '{spec.name}' must be a "
                             f"{' or '.join(f'{k.__module__}.{k.__name__}' for k in kinds)}, "
                             f"got {type(v).__module__}.{type(v).__name__}")
        shape = tuple(v.shape)
        dtype = _dtype_of(v)
        if shape != spec.shape or dtype != spec.dtype:
            got = TensorSpec(spec.name, shape, dtype)
            raise InputError(
                f"{where}: input '{spec.name}' expects {spec}, got {got}; graphc compiles for "
                "static shapes: recompile with example inputs of the new shape"
            )


def _dtype_of(v) -> torch.dtype | np.dtype:
    if isinstance(v, torch.Tensor):
        return v.dtype
    try:
        return torch.from_numpy(np.empty(0, v.dtype)).dtype
    except TypeError:
        return v.dtype  # no torch equivalent (object, str): never matches a spec
