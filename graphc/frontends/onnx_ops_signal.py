"""ONNX signal and geometry ops: DFT (as matmuls), window functions, AffineGrid, Col2Im, BitCast.

DFT is written as two matmuls with cos/sin matrices made at load time (the length
is static), so it needs no complex numbers and every backend lowers it. Complex
values are ONNX's [..., 2] (real, imaginary) pairs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from graphc.frontends.onnx_ops import Node, OpDef, axis_of, ints, to_numpy, torch_dtype


def _trig(n_in: int, n_out: int, length: int, dtype, device):
    n = np.arange(n_in).reshape(-1, 1)
    k = np.arange(n_out).reshape(1, -1)
    theta = 2 * np.pi * ((n * k) % length) / length  # the modulo keeps large angles exact
    as_t = lambda a: torch.from_numpy(a).to(dtype=dtype, device=device)
    return as_t(np.cos(theta)), as_t(np.sin(theta))


def _dft(node: Node, x: torch.Tensor, dft_length=None, axis=None):
    default_axis = 1 if node.opset < 20 else -2
    axis = int(axis.item()) if axis is not None else node.attr("axis", default_axis)
    axis = axis_of(node, axis, x.ndim)
    if axis == x.ndim - 1:
        raise node.unsupported("axis", axis)  # the last dim holds (real, imaginary)
    inverse, onesided = bool(node.attr("inverse", 0)), bool(node.attr("onesided", 0))
    n = x.shape[axis]
    length = int(dft_length.item()) if dft_length is not None else (
        2 * (n - 1) if inverse and onesided else n)
    xr = x[..., 0].movedim(axis, -1)
    xi = x[..., 1].movedim(axis, -1) if x.shape[-1] == 2 else None
    if inverse and onesided:  # irfft: a Hermitian spectrum's first half -> a real signal
        half = length // 2 + 1
        xr, xi = _fit(xr, half), _fit(xi, half) if xi is not None else None
        cos, sin = _trig(half, length, length, x.dtype, x.device)
        # each bin but DC (and Nyquist, for an even length) stands for itself and its mirror
        w = np.full((half, 1), 2.0)
        w[0] = w[-1] = 1.0 if length % 2 == 0 else w[-1]
        w[0] = 1.0
        weight = torch.from_numpy(w).to(dtype=x.dtype, device=x.device)
        out = xr @ (cos * weight) - (xi @ (sin * weight) if xi is not None else 0)
        return (out / length).movedim(-1, axis).unsqueeze(-1)
    xr, xi = _fit(xr, length), _fit(xi, length) if xi is not None else None
    n_out = length // 2 + 1 if onesided else length
    cos, sin = _trig(length, n_out, length, x.dtype, x.device)
    sign = 1.0 if inverse else -1.0
    real = xr @ cos - sign * (xi @ sin if xi is not None else 0)
    imag = sign * (xr @ sin) + (xi @ cos if xi is not None else 0)
    out = torch.stack([real, imag], -1)
    out = out / length if inverse else out
    return out.movedim(-2, axis)


def _fit(x: torch.Tensor, n: int) -> torch.Tensor:
    """Truncate or zero-pad the last dim to n (numpy's fft(n=...))."""
    return x[..., :n] if x.shape[-1] >= n else F.pad(x, [0, n - x.shape[-1]])


def _window(kind: str):
    def impl(node: Node, size: np.ndarray):
        size = int(np.asarray(size).reshape(-1)[0])
        span = size if node.attr("periodic", 1) else size - 1
        t = 2 * np.pi * np.arange(size) / span
        y = {"hann": lambda: np.sin(t / 2) ** 2,
             "hamming": lambda: 25 / 46 - 21 / 46 * np.cos(t),
             "blackman": lambda: 0.42 - 0.5 * np.cos(t) + 0.08 * np.cos(2 * t)}[kind]()
        dtype = torch_dtype(node.attr("output_datatype", 1), str(node))
        return to_numpy(torch.from_numpy(y).to(dtype))

    return OpDef(impl, static=(0,))


def _affine_grid(node: Node, theta: torch.Tensor, size: np.ndarray):
    return F.affine_grid(theta, ints(size), bool(node.attr("align_corners", 0)))


def _col2im(node: Node, x: torch.Tensor, image: np.ndarray, block: np.ndarray):
    image, block = ints(image), ints(block)
    nd = len(image)
    pads = node.attr("pads", [0] * 2 * nd)
    if nd != 2 or pads[:nd] != pads[nd:]:
        raise node.unsupported("spatial rank / asymmetric pads", (nd, pads))  # F.fold: 2-D
    return F.fold(x, image, block, node.attr("dilations", [1] * nd), pads[:nd],
                  node.attr("strides", [1] * nd))


def _bit_cast(node: Node, x: torch.Tensor):
    dtype = torch_dtype(node.attr("to"), str(node))
    if dtype.itemsize != x.dtype.itemsize:
        raise node.unsupported("to (a different element size)", node.attr("to"))
    return x.view(dtype)


OPS: dict[str, OpDef] = {
    "DFT": OpDef(_dft, static=(1, 2)),
    "HannWindow": _window("hann"),
    "HammingWindow": _window("hamming"),
    "BlackmanWindow": _window("blackman"),
    "AffineGrid": OpDef(_affine_grid, static=(1,)),
    "Col2Im": OpDef(_col2im, static=(1, 2)),
    "BitCast": OpDef(_bit_cast),
}
