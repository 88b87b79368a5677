"""The fuzzer's op table and the nn.Module that interprets a generated program.

A program is plain data, so a shrunk failure can be pasted into a regression test:

    Program(inputs=(("f32", (1, 3, 7, 7)),),
            ops=(("conv2d", (0,), {"co": 5, "k": (3, 3), ...}), ("relu", (1,), {})),
            outputs=(2,), seed=0)

Value i is input i for i < len(inputs), else the result of ops[i - len(inputs)]. Each op
kind has a forward (`fwd(P, xs, attrs)`, P(name) reads one of the op's parameters) and the
shapes of its parameters (`params(attrs, shapes)`); the generator infers result shapes by
running `fwd` on meta tensors, so shapes have one source of truth: PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}


@dataclass(frozen=True)
class Program:
    inputs: tuple       # ((dtype name, shape), ...); i64 inputs of embeddings are indices
    ops: tuple          # ((kind, input value indices, attrs), ...)
    outputs: tuple      # value indices
    seed: int = 0
    int_high: int = 8   # integer inputs are drawn from [-int_high, int_high)


# ---- forwards: (P, xs, attrs) -> tensor ---------------------------------------------------
def _conv2d(P, xs, a):
    x = xs[0]
    if a.get("pre_pad"):  # explicit pad in front of the conv, for fold-pad
        x = F.pad(x, list(a["pre_pad"]), value=a.get("pad_value", 0.0))
    return F.conv2d(x, P("w"), P("b") if a["bias"] else None, a["stride"], a["padding"],
                    a["dilation"], a["groups"])


def _linear(P, xs, a):
    return F.linear(xs[0], P("w"), P("b") if a["bias"] else None)


def _batchnorm(P, xs, a):
    return F.batch_norm(xs[0], P("mean"), P("var"), P("w"), P("b"), False, 0.1, a["eps"])


def _matmul(P, xs, a):
    x = xs[0]
    return {"xxT": lambda: x @ x.transpose(-1, -2), "xTx": lambda: x.transpose(-1, -2) @ x,
            "xW": lambda: x @ P("w"), "xy": lambda: x @ xs[1]}[a["form"]]()


UNARY = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "neg": torch.neg,
         "abs": torch.abs, "hardtanh": F.hardtanh, "relu6": F.relu6}
BINARY = {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "maximum": torch.maximum,
          "minimum": torch.minimum}


def _binary(P, xs, a):
    f = BINARY[a["fn"]]
    other = {"value": lambda: xs[1], "param": lambda: P("c"),
             "scalar": lambda: a["scalar"]}[a["other"]]()
    if a["other"] == "scalar" and a["fn"] in ("maximum", "minimum"):
        other = torch.tensor(a["scalar"], dtype=xs[0].dtype)
    return f(other, xs[0]) if a.get("swap") else f(xs[0], other)


def _int_binary(P, xs, a):
    x = xs[0]
    other = xs[1] if a["other"] == "value" else a["scalar"]
    return {"add": torch.add, "sub": torch.sub, "mul": torch.mul,
            "floordiv": torch.floor_divide, "remainder": torch.remainder,
            "maximum": lambda u, v: torch.maximum(u, torch.as_tensor(v, dtype=u.dtype)),
            "minimum": lambda u, v: torch.minimum(u, torch.as_tensor(v, dtype=u.dtype)),
            }[a["fn"]](x, other)


def _pool(P, xs, a):
    x, k, s, p = xs[0], a["k"], a["stride"], a["padding"]
    if a["fn"] == "max":
        return F.max_pool2d(x, k, s, p, a.get("dilation", 1), ceil_mode=a["ceil"])
    return F.avg_pool2d(x, k, s, p, ceil_mode=a["ceil"], count_include_pad=a["count_pad"])


def _adaptive(P, xs, a):
    f = F.adaptive_avg_pool2d if a["fn"] == "avg" else F.adaptive_max_pool2d
    return f(xs[0], a["size"])


def _reduce(P, xs, a):
    f = torch.mean if a["fn"] == "mean" else torch.sum
    return f(xs[0], dim=list(a["dims"]), keepdim=a["keepdim"])


def _layout(P, xs, a):
    x = xs[0]
    return {"flatten": lambda: torch.flatten(x, *a.get("dims", (1, -1))),
            "reshape": lambda: x.reshape(a.get("shape", ())),
            "transpose": lambda: x.transpose(*a.get("dims", (0, 1))),
            "permute": lambda: x.permute(*a.get("dims", ())),
            "unsqueeze": lambda: x.unsqueeze(a.get("dim", 0)),
            }[a["fn"]]()


def _slice(P, xs, a):
    x, d = xs[0], a["dim"]
    if a["fn"] == "select":
        return x.select(d, a["start"])
    index = [slice(None)] * x.dim()
    index[d] = slice(a["start"], a["stop"], a["step"])
    return x[tuple(index)]


def _concat(P, xs, a):
    parts = [xs[0], xs[1] if len(xs) > 1 else F.relu(xs[0])]
    return torch.cat(parts, dim=a["dim"])


FORWARD = {
    "conv2d": _conv2d, "linear": _linear, "batchnorm": _batchnorm, "matmul": _matmul,
    "unary": lambda P, xs, a: UNARY[a["fn"]](xs[0]),
    "binary": _binary, "int_binary": _int_binary,
    "int_unary": lambda P, xs, a: {"abs": torch.abs, "neg": torch.neg}[a["fn"]](xs[0]),
    "int_sum": lambda P, xs, a: xs[0].sum(dim=a["dim"]),
    "int_to_float": lambda P, xs, a: xs[0].to(torch.float32),
    "pad": lambda P, xs, a: F.pad(xs[0], list(a["pad"]), value=a["value"]),
    "pool": _pool, "adaptive": _adaptive, "reduce": _reduce, "layout": _layout,
    "slice": _slice, "concat": _concat,
    "softmax": lambda P, xs, a: (F.log_softmax if a.get("log") else F.softmax)(xs[0], a["dim"]),
    "layernorm": lambda P, xs, a: F.layer_norm(
        xs[0], tuple(a["shape"]), P("w") if a["affine"] else None,
        P("b") if a["affine"] else None, a.get("eps", 1e-5)),
    "embedding": lambda P, xs, a: F.embedding(xs[0], P("w")),
}


# ---- parameter shapes: (attrs, input shapes) -> {name: (shape, kind)} -----------------------
# kind: "w" weight (scaled by 1/sqrt(fan_in); "wk": fan_in is dim 0), "b" small bias, "pos"
# positive (variances), "gamma" around 1. An op with "tie": i reads op i's parameters (the
# same tensors), one with "copy": i clones them (equal values): dedupe-weights merges both.
def _conv_params(a, shapes):
    ci = shapes[0][1]
    p = {"w": ((a["co"], ci // a["groups"], *a["k"]), "w")}
    if a["bias"]:
        p["b"] = ((a["co"],), "b")
    return p


def _linear_params(a, shapes):
    p = {"w": ((a["out"], shapes[0][-1]), "w")}
    if a["bias"]:
        p["b"] = ((a["out"],), "b")
    return p


PARAMS = {
    "conv2d": _conv_params, "linear": _linear_params,
    "batchnorm": lambda a, s: {"mean": ((s[0][1],), "b"), "var": ((s[0][1],), "pos"),
                               "w": ((s[0][1],), "gamma"), "b": ((s[0][1],), "b")},
    "matmul": lambda a, s: ({"w": ((s[0][-1], a["n"]), "wk")} if a["form"] == "xW" else {}),
    "binary": lambda a, s: ({"c": (tuple(a["pshape"]), "b")} if a["other"] == "param" else {}),
    "layernorm": lambda a, s: ({"w": (tuple(a["shape"]), "gamma"),
                                "b": (tuple(a["shape"]), "b")} if a["affine"] else {}),
    "embedding": lambda a, s: {"w": ((a["num"], a["dim"]), "gamma")},
}


def param_specs(kind: str, attrs: dict, shapes: list) -> dict:
    fn = PARAMS.get(kind)
    return fn(attrs, shapes) if fn else {}


def _init(shape, kind, gen) -> torch.Tensor:
    if kind in ("w", "wk"):  # unit-variance outputs for unit-variance inputs
        fan_in = shape[0] if kind == "wk" else math.prod(shape[1:])
        return torch.randn(shape, generator=gen) / math.sqrt(max(fan_in, 1))
    t = torch.rand(shape, generator=gen)
    return {"b": t - 0.5, "pos": 0.5 + t * 1.5, "gamma": 0.5 + t}[kind]


class FuzzModel(nn.Module):
    """Runs a Program; parameters are seeded from program.seed and the op index."""

    def __init__(self, prog: Program):
        super().__init__()
        self.prog = prog
        self.jitter = None  # a torch.Generator: perturb every float result by ~2^-24
        shapes = list(value_shapes(prog))
        for i, (kind, ins, attrs) in enumerate(prog.ops):
            gen = torch.Generator().manual_seed(prog.seed * 1000 + i)
            if "tie" in attrs:
                continue
            for name, (shape, k) in param_specs(kind, attrs, [shapes[j] for j in ins]).items():
                if "copy" in attrs:  # equal values, another tensor
                    t = getattr(self, f"op{attrs['copy']}_{name}").detach().clone()
                else:
                    t = _init(shape, k, gen)
                setattr(self, f"op{i}_{name}", nn.Parameter(t, requires_grad=False))

    def forward(self, *inputs):
        vals = list(inputs)
        for i, (kind, ins, attrs) in enumerate(self.prog.ops):
            owner = attrs.get("tie", i)

            def P(name, owner=owner):
                return getattr(self, f"op{owner}_{name}")
            v = FORWARD[kind](P, [vals[j] for j in ins], attrs)
            if self.jitter is not None and v.is_floating_point():  # one fp32 rounding error
                v = v * (1 + 2.0 ** -24 * torch.randn(v.shape, generator=self.jitter))
            vals.append(v)
        outs = tuple(vals[j] for j in self.prog.outputs)
        return outs[0] if len(outs) == 1 else outs


def make_inputs(prog: Program) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(prog.seed)
    out = []
    for dtype, shape in prog.inputs:
        if dtype == "f32":
            out.append(torch.randn(shape, generator=gen))
        elif dtype == "idx":  # embedding indices: [0, num) of the first embedding using it
            out.append(torch.randint(0, _index_range(prog, len(out)), shape, generator=gen))
        else:
            out.append(torch.randint(-prog.int_high, prog.int_high, shape, generator=gen,
                                     dtype=DTYPES[dtype]))
    return tuple(out)


def _index_range(prog: Program, value: int) -> int:
    nums = [a["num"] for kind, ins, a in prog.ops if kind == "embedding" and ins[0] == value]
    return min(nums, default=1)


def input_dtype(name: str) -> torch.dtype:
    return torch.int64 if name == "idx" else DTYPES[name]


def value_shapes(prog: Program):
    """(shape, dtype) of every value, by running the program on meta tensors."""
    vals = [torch.empty(s, dtype=input_dtype(d), device="meta") for d, s in prog.inputs]
    for kind, ins, attrs in prog.ops:
        vals.append(run_meta(kind, attrs, [vals[j] for j in ins]))
    return [tuple(v.shape) for v in vals]


def run_meta(kind: str, attrs: dict, xs: list) -> torch.Tensor:
    specs = param_specs(kind, attrs, [tuple(x.shape) for x in xs])
    params = {k: torch.empty(s, device="meta") for k, (s, _) in specs.items()}
    return FORWARD[kind](params.__getitem__, xs, attrs)
