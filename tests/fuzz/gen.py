"""Hypothesis strategies for random but valid Programs (tests/fuzz/ops.py) over graphc's ops.

Sizes come from SIZES: 1, primes and non-multiples of the vector widths next to 8 and 16,
so broadcasts, remainders of vectorized loops and degenerate dims all get exercised. The
generator draws one op at a time: an operand (recent values first, so graphs get deep,
any earlier value for residual and concat structure), then a kind that applies to it,
then its attributes; the result's shape comes from running the op on meta tensors.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from tests.fuzz.ops import Program, input_dtype, run_meta

SIZES = (1, 2, 3, 5, 7, 8, 13, 16, 17)
MAX_NUMEL = 40_000       # keeps one example's compile + run well under a second of kernels
INT_BOUND = 1 << 20      # integer magnitudes stay far from int32 overflow (UB in TVM's code)


class Val:
    def __init__(self, shape, dtype, bound=0, index=False):
        self.shape, self.dtype, self.bound = tuple(shape), dtype, bound
        self.index = index  # embedding indices: only embeddings read them

    @property
    def rank(self):
        return len(self.shape)

    @property
    def is_float(self):
        return self.dtype.is_floating_point


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- one drawer per op kind: (draw, vals, j) -> (inputs, attrs) or None ----------------------
def _conv2d(draw, vals, j):
    c = vals[j].shape[1]
    if draw(st.booleans()) and c > 1:  # depthwise (a channel multiplier of 1 or 2)
        groups, co = c, c * draw(st.sampled_from([1, 2]))
    else:
        groups = draw(st.sampled_from(_divisors(c)))
        co = groups * draw(st.sampled_from([1, 2, 3, 5]))
    kh = draw(st.sampled_from([1, 3, 2, 5]))
    a = {"co": co, "groups": groups, "k": (kh, draw(st.sampled_from([kh, 1, 3]))),
         "stride": draw(st.sampled_from([1, 2, 3, (1, 2)])),
         "padding": draw(st.sampled_from([0, 1, 2, (1, 0)])),
         "dilation": draw(st.sampled_from([1, 2])), "bias": draw(st.booleans())}
    pre = draw(st.sampled_from([None, (1, 1, 1, 1), (0, 1, 0, 1), (2, 2, 0, 0)]))
    if pre:
        a["pre_pad"] = pre
        a["pad_value"] = draw(st.sampled_from([0.0, 0.0, 1.5]))
    return (j,), a


def _linear(draw, vals, j, ops=None):
    a = {"out": draw(st.sampled_from(SIZES)), "bias": draw(st.booleans())}
    # an earlier linear over the same features: tie its weight (one Parameter) or copy it
    prev = [i for i, (k, ins, pa) in enumerate(ops) if k == "linear" and "tie" not in pa
            and "copy" not in pa and vals[ins[0]].shape[-1] == vals[j].shape[-1]]
    if prev and draw(st.booleans()):
        i = draw(st.sampled_from(prev))
        a[draw(st.sampled_from(["tie", "copy"]))] = i
        a["out"], a["bias"] = ops[i][2]["out"], ops[i][2]["bias"]
    return (j,), a


def _matmul(draw, vals, j):
    x = vals[j]
    partners = [i for i, v in enumerate(vals) if v.is_float and v.rank == x.rank
                and v.shape[:-2] == x.shape[:-2] and v.shape[-2] == x.shape[-1]]
    form = draw(st.sampled_from(["xW", "xxT", "xTx"] + (["xy"] if partners else [])))
    if form == "xy":
        return (j, draw(st.sampled_from(partners))), {"form": form}
    return (j,), {"form": form, **({"n": draw(st.sampled_from(SIZES))} if form == "xW" else {})}


def _binary(draw, vals, j):
    x = vals[j]
    a = {"fn": draw(st.sampled_from(["add", "mul", "sub", "maximum", "minimum"])),
         "other": draw(st.sampled_from(["value", "param", "scalar"])),
         "swap": draw(st.booleans())}
    if a["other"] == "value":
        partners = [i for i, v in enumerate(vals) if v.is_float and _broadcasts(v.shape, x.shape)]
        return (j, draw(st.sampled_from(partners))), a
    if a["other"] == "scalar":
        a["scalar"] = draw(st.sampled_from([0.5, -1.5, 2.0, 0.0]))
        return (j,), a
    keep = draw(st.lists(st.booleans(), min_size=x.rank, max_size=x.rank))
    shape = [d if k else 1 for d, k in zip(x.shape, keep)]
    a["pshape"] = tuple(shape[draw(st.integers(0, x.rank)):])  # drop leading dims too
    return (j,), a


def _broadcasts(a, b):
    """True when a broadcasts against b to b's shape."""
    try:
        return tuple(torch.broadcast_shapes(a, b)) == tuple(b)
    except RuntimeError:
        return False


def _int_binary(draw, vals, j):
    x = vals[j]
    fn = draw(st.sampled_from(["add", "sub", "mul", "floordiv", "remainder", "maximum",
                               "minimum"]))
    partners = [i for i, v in enumerate(vals) if not v.is_float and v.dtype != torch.bool
                and _broadcasts(v.shape, x.shape)]
    if fn in ("add", "sub", "mul") and draw(st.booleans()):
        i = draw(st.sampled_from(partners))
        bound = x.bound * vals[i].bound if fn == "mul" else x.bound + vals[i].bound
        return ((j, i), {"fn": fn, "other": "value"}) if bound <= INT_BOUND else None
    s = draw(st.sampled_from([3, -2, 5, 2, -3]))
    return (j,), {"fn": fn, "other": "scalar", "scalar": s}


def _int_bound(fn, a, x, other):
    if fn == "mul":
        return x.bound * (other.bound if other else abs(a["scalar"]))
    if fn in ("add", "sub"):
        return x.bound + (other.bound if other else abs(a["scalar"]))
    if fn == "remainder":
        return abs(a["scalar"])
    return max(x.bound, abs(a.get("scalar", 0)))


def _pool(draw, vals, j):
    k = draw(st.sampled_from([2, 3, 1]))
    a = {"fn": draw(st.sampled_from(["max", "avg"])), "k": k,
         "stride": draw(st.sampled_from([None, 1, 2, 3])),
         "padding": draw(st.integers(0, k // 2)), "ceil": draw(st.booleans()),
         "count_pad": draw(st.booleans())}
    if a["fn"] == "max":
        a["dilation"] = draw(st.sampled_from([1, 2]))
    return (j,), a


def _adaptive(draw, vals, j):
    h, w = vals[j].shape[2:]
    size = (draw(st.sampled_from([1, 2, 3, 5, h])), draw(st.sampled_from([1, 2, 3, 5, w])))
    return (j,), {"fn": draw(st.sampled_from(["avg", "max"])),
                  "size": tuple(min(s, d) for s, d in zip(size, (h, w)))}


def _reduce(draw, vals, j):
    r = vals[j].rank
    dims = draw(st.lists(st.integers(0, r - 1), min_size=1, max_size=r, unique=True))
    neg = draw(st.booleans())
    return (j,), {"fn": draw(st.sampled_from(["mean", "sum"])),
                  "dims": tuple(d - r if neg else d for d in dims),
                  "keepdim": draw(st.booleans())}


def _layout(draw, vals, j):
    shape, r = vals[j].shape, vals[j].rank
    fn = draw(st.sampled_from(["flatten", "transpose", "permute", "reshape", "unsqueeze"]))
    if fn == "flatten" and r >= 2:
        s = draw(st.integers(0, r - 2))
        return (j,), {"fn": fn, "dims": (s, draw(st.integers(s + 1, r - 1)))}
    if fn in ("transpose", "flatten") and r >= 2:
        d = draw(st.lists(st.integers(0, r - 1), min_size=2, max_size=2, unique=True))
        return (j,), {"fn": "transpose", "dims": tuple(d)}
    if fn == "permute" and r >= 2:
        return (j,), {"fn": fn, "dims": tuple(draw(st.permutations(range(r))))}
    if fn == "reshape" and r >= 1:
        d = draw(st.integers(0, r - 1))
        new = list(shape)
        splits = [f for f in _divisors(shape[d]) if 1 < f < shape[d]]
        if splits:  # split one dim in two
            f = draw(st.sampled_from(splits))
            new[d:d + 1] = [f, shape[d] // f]
        elif d + 1 < r:  # merge it with the next
            new[d:d + 2] = [shape[d] * shape[d + 1]]
        if draw(st.booleans()):
            new[draw(st.integers(0, len(new) - 1))] = -1
        return (j,), {"fn": fn, "shape": tuple(new)}
    if r < 5:
        return (j,), {"fn": "unsqueeze", "dim": draw(st.integers(-r - 1, r))}
    return None


def _slice(draw, vals, j):
    shape = vals[j].shape
    d = draw(st.integers(0, len(shape) - 1))
    n = shape[d]
    if draw(st.booleans()) and len(shape) >= 2:
        return (j,), {"fn": "select", "dim": d, "start": draw(st.integers(-n, n - 1))}
    start = draw(st.integers(0, n - 1))
    stop = draw(st.integers(start + 1, n + 2))  # past the end is clipped
    return (j,), {"fn": "slice", "dim": d, "start": start, "stop": stop,
                  "step": draw(st.sampled_from([1, 2, 3]))}


def _concat(draw, vals, j):
    x = vals[j]
    d = draw(st.integers(0, x.rank - 1))
    partners = [i for i, v in enumerate(vals) if v.dtype == x.dtype and v.rank == x.rank
                and all(a == b for k, (a, b) in enumerate(zip(v.shape, x.shape)) if k != d)]
    if x.is_float and draw(st.booleans()):
        return (j,), {"dim": d}  # cat([x, relu(x)])
    return (j, draw(st.sampled_from(partners))), {"dim": d}


def _embedding(draw, vals, j):
    return (j,), {"num": draw(st.sampled_from([3, 5, 7, 13, 17])),
                  "dim": draw(st.sampled_from(SIZES))}


# kind -> (applies to a value, drawer). The order is the shrink order: simple kinds first.
KINDS = {
    "unary": (lambda v: v.is_float, lambda d, vals, j: (
        (j,), {"fn": d(st.sampled_from(sorted(_UNARY)))})),
    "binary": (lambda v: v.is_float, _binary),
    "linear": (lambda v: v.is_float and v.rank >= 1, _linear),
    "conv2d": (lambda v: v.is_float and v.rank == 4, _conv2d),
    "batchnorm": (lambda v: v.is_float and v.rank >= 2, lambda d, vals, j: (
        (j,), {"eps": d(st.sampled_from([1e-5, 1e-3]))})),
    "pool": (lambda v: v.is_float and v.rank == 4, _pool),
    "adaptive": (lambda v: v.is_float and v.rank == 4, _adaptive),
    "softmax": (lambda v: v.is_float and v.rank >= 1, lambda d, vals, j: (
        (j,), {"dim": d(st.integers(-vals[j].rank, vals[j].rank - 1)), "log": d(st.booleans())})),
    "layernorm": (lambda v: v.is_float and v.rank >= 1, lambda d, vals, j: (
        (j,), {"shape": vals[j].shape[-d(st.integers(1, min(2, vals[j].rank))):],
               "affine": d(st.booleans())})),
    "reduce": (lambda v: v.is_float and v.rank >= 1, _reduce),
    "layout": (lambda v: v.rank >= 1, _layout),
    "slice": (lambda v: v.rank >= 1, _slice),
    "concat": (lambda v: v.rank >= 1, _concat),
    "matmul": (lambda v: v.is_float and v.rank >= 2, _matmul),
    "pad": (lambda v: v.is_float and v.rank in (3, 4), lambda d, vals, j: (
        (j,), {"pad": d(st.sampled_from([(1, 1), (0, 2, 1, 0), (1, 1, 1, 1), (2, 0)])),
               "value": d(st.sampled_from([0.0, -1.0]))})),
    "int_binary": (lambda v: v.dtype in (torch.int32, torch.int64), _int_binary),
    "int_unary": (lambda v: v.dtype in (torch.int32, torch.int64), lambda d, vals, j: (
        (j,), {"fn": d(st.sampled_from(["abs", "neg"]))})),
    "int_sum": (lambda v: v.dtype in (torch.int32, torch.int64) and v.rank >= 1,
                lambda d, vals, j: ((j,), {"dim": d(st.integers(0, vals[j].rank - 1))})),
    "int_to_float": (lambda v: v.dtype in (torch.int32, torch.int64), lambda d, vals, j: (
        (j,), {})),
}
# how much more often than the others a kind is picked: the ops with the most lowering and
# pass logic (windows, groups, layouts) deserve most of the examples
WEIGHTS = {"conv2d": 4, "pool": 2, "adaptive": 2, "linear": 2, "matmul": 2, "concat": 2,
           "binary": 2, "int_binary": 2}
_UNARY = ("relu", "gelu", "gelu_tanh", "sigmoid", "tanh", "silu", "neg", "abs", "hardtanh",
          "relu6")


class _Pick:
    """random.Random's choice / randrange / randint / random through hypothesis integers:
    near uniform and shrinkable (st.randoms() picks the first items of a list far more
    often: in 100 programs it never chose conv2d out of 15 kinds)."""

    def __init__(self, draw):
        self.draw = draw

    def randrange(self, n: int) -> int:
        return self.draw(st.integers(0, n - 1))

    def randint(self, a: int, b: int) -> int:
        return self.draw(st.integers(a, b))

    def choice(self, seq):
        return seq[self.randrange(len(seq))]

    def random(self) -> float:
        return self.randrange(1000) / 1000


def _float_shape(draw):
    rank = draw(st.sampled_from([4, 2, 3, 4]))
    batch = draw(st.sampled_from([1, 2, 3]))
    return (batch, *(draw(st.sampled_from(SIZES)) for _ in range(rank - 1)))


@st.composite
def programs(draw, max_ops: int = 6, kinds: tuple | None = None) -> Program:
    """A random valid Program of 1..max_ops ops (kinds: restrict to these op kinds)."""
    inputs = [("f32", _float_shape(draw))]
    if draw(st.booleans()):
        inputs.append((draw(st.sampled_from(["i32", "i64"])),
                       tuple(draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3)))))
    if draw(st.integers(0, 2)) == 0:
        inputs.append(("idx", (draw(st.sampled_from([1, 2])), draw(st.sampled_from(SIZES)))))
    int_high = 8
    vals = [Val(s, input_dtype(d), int_high, index=d == "idx") for d, s in inputs]
    ops = []
    rnd = _Pick(draw)
    for _ in range(rnd.randint(2, max_ops)):
        op = _repeat(rnd, vals, ops) if ops and rnd.random() < 0.12 else None
        op = op or _draw_op(draw, rnd, vals, ops, kinds)
        if op is not None:
            ops.append(op)
    if not ops:
        ops.append(("unary", (0,), {"fn": "relu"}))
        vals.append(vals[0])
    first = len(inputs)
    outs = [len(vals) - 1]
    ints = [i for i in range(first, len(vals)) if not vals[i].is_float]
    if ints and draw(st.booleans()):
        outs.append(ints[-1])
    if draw(st.booleans()):
        outs.append(draw(st.integers(first, len(vals) - 1)))
    return Program(tuple(inputs), tuple(ops), tuple(dict.fromkeys(outs)),
                   seed=draw(st.integers(0, 255)), int_high=int_high)


_PARAM_KINDS = ("conv2d", "linear", "batchnorm", "matmul", "binary", "layernorm", "embedding")


def _repeat(rnd, vals, ops):
    """An earlier op again on the same inputs: tied or copied parameters, or none (so
    common-subexpression-elimination and dedupe-weights have work)."""
    i = rnd.randrange(len(ops))
    kind, ins, attrs = ops[i]
    attrs = dict(attrs)
    root = attrs.pop("tie", attrs.pop("copy", i))
    if kind in _PARAM_KINDS:
        attrs[rnd.choice(["tie", "copy"])] = root
    vals.append(vals[len(vals) - len(ops) + i])
    return kind, ins, attrs


def _draw_op(draw, rnd, vals, ops, kinds):
    # the latest value most of the time (deep chains), any value otherwise (residuals, reuse);
    # the first op reads the float input most of the time
    n_inputs = len(vals) - len(ops)
    if not ops:
        j = 0 if rnd.random() < 0.7 else rnd.randrange(n_inputs)
    else:
        j = len(vals) - 1 if rnd.random() < 0.6 else rnd.randrange(len(vals))
    x = vals[j]
    names = [k for k, (applies, _) in KINDS.items() if applies(x) and (not kinds or k in kinds)]
    if x.index:
        names = ["embedding"]
    if not names:
        return None
    kind = rnd.choice([k for k in names for _ in range(WEIGHTS.get(k, 1))])
    producer = ops[j - n_inputs][0] if j >= n_inputs else None
    if producer in ("conv2d", "linear") and "batchnorm" in names and rnd.random() < 0.5:
        kind = "batchnorm"  # what fold-batchnorm looks for
    drawer = KINDS[kind][1] if kind != "embedding" else _embedding
    got = drawer(draw, vals, j, ops) if kind == "linear" else drawer(draw, vals, j)
    if got is None:
        return None
    ins, attrs = got
    try:
        out = run_meta(kind, attrs, [torch.empty(vals[i].shape, dtype=vals[i].dtype,
                                                 device="meta") for i in ins])
    except (RuntimeError, ValueError, IndexError):
        return None  # an invalid configuration by PyTorch's own rules (pool/conv windows)
    if out.numel() == 0 or out.numel() > MAX_NUMEL:
        return None
    bound = 0
    if not out.dtype.is_floating_point:
        other = vals[ins[1]] if len(ins) > 1 else None
        bound = (_int_bound(attrs["fn"], attrs, x, other) if kind == "int_binary"
                 else x.bound * (x.shape[attrs["dim"]] if kind == "int_sum" else 1))
        if bound > INT_BOUND:
            return None
    vals.append(Val(out.shape, out.dtype, bound))
    return kind, ins, attrs


def describe(prog: Program) -> str:
    """The program as Python source (for failure messages and regression tests)."""
    ops = ",\n         ".join(repr(op) for op in prog.ops)
    return (f"Program(inputs={prog.inputs!r},\n    ops=({ops},),\n    outputs={prog.outputs!r}, "
            f"seed={prog.seed}, int_high={prog.int_high})")
