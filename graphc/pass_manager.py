"""Pass registry, pipeline strings, and the pipeline runner that records what each pass did.

A pass is a function `(graph, *, option=default, ...) -> Graph` registered by name. Its
keyword-only parameters are its options, parsed from pipeline strings the same way in
Python and on the command line: "fold-batchnorm, quantize(bits=8, per_channel=true)".
"""

from __future__ import annotations

import ast
import inspect
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

from graphc.errors import PassError
from graphc.ir import Graph


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable
    options: dict[str, tuple[type, object]]  # option -> (type, default)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def signature(self) -> str:
        opts = ", ".join(f"{k}: {_type_name(t)} = {d!r}" for k, (t, d) in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str):
    """Decorator: register `fn(graph, *, opt: type = default, ...)` as the pass `name`."""

    def deco(fn: Callable) -> Callable:
        if name in PASSES and PASSES[name].fn is not fn:
            raise PassError(f"a pass named '{name}' is already registered ({PASSES[name].fn})")
        PASSES[name] = PassInfo(name, fn, _options_of(name, fn))
        fn.pass_name = name
        return fn

    return deco


def _options_of(name: str, fn: Callable) -> dict[str, tuple[type, object]]:
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                             params[0].POSITIONAL_OR_KEYWORD):
        raise PassError(f"pass '{name}': first parameter must be the graph")
    opts = {}
    for p in params[1:]:
        if p.kind != p.KEYWORD_ONLY or p.default is p.empty:
            raise PassError(f"pass '{name}': option '{p.name}' must be keyword-only with a "
                            "default (def pass_(graph, *, opt: int = 1))")
        opts[p.name] = (hints.get(p.name, type(p.default)), p.default)
    return opts


# ---- pipeline strings ---------------------------------------------------------------------
def parse_pipeline(text: str) -> list[tuple[str, dict]]:
    """'a, b(k=1, s="x")' -> [('a', {}), ('b', {'k': 1, 's': 'x'})] with typed options."""
    steps = []
    for item in _split_top(text, ","):
        item = item.strip()
        if not item:
            continue
        name, _, rest = item.partition("(")
        name = name.strip()
        if rest and not rest.rstrip().endswith(")"):
            raise PassError(f"pipeline '{text}': unbalanced parentheses in '{item}'")
        raw = {}
        for kv in _split_top(rest.rstrip()[:-1], ",") if rest else []:
            key, eq, value = kv.partition("=")
            if not eq:
                raise PassError(f"pipeline '{text}': option '{kv.strip()}' of '{name}' "
                                "needs the form key=value")
            raw[key.strip()] = _literal(value.strip())
        steps.append((name, raw))
    return steps


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def _literal(value: str):
    if value.startswith("[") and value.endswith("]"):  # [a, 'b', 3]: bare words are strings
        return [_literal(v.strip()) for v in _split_top(value[1:-1], ",") if v.strip()]
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a bare word is a string


def resolve(passes) -> list[tuple[PassInfo, dict]]:
    """Pipeline string, or list of names / 'name(k=v)' strings / (name, kwargs) / functions."""
    if isinstance(passes, str):
        passes = [passes]
    steps = []
    for p in passes or []:
        if isinstance(p, str):
            steps += [(_lookup(n), _coerce(_lookup(n), kw)) for n, kw in parse_pipeline(p)]
        elif isinstance(p, tuple):
            steps.append((_lookup(p[0]), _coerce(_lookup(p[0]), dict(p[1]))))
        elif callable(p) and getattr(p, "pass_name", None):
            steps.append((_lookup(p.pass_name), {}))
        else:
            raise PassError(f"cannot use {p!r} as a pass: give a registered name or a "
                            "function decorated with @graphc.register_pass")
    return steps


def _lookup(name: str) -> PassInfo:
    if name not in PASSES:
        raise PassError(f"unknown pass '{name}'; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def _coerce(info: PassInfo, raw: dict) -> dict:
    out = {}
    for key, value in raw.items():
        if key not in info.options:
            valid = ", ".join(f"{k}: {_type_name(t)}" for k, (t, _) in info.options.items())
            raise PassError(f"pass '{info.name}' has no option '{key}'; its options: "
                            f"{valid or '(none)'}")
        out[key] = _coerce_value(info.name, key, info.options[key][0], value)
    return out


def _coerce_value(pass_name: str, key: str, typ, value):
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        if value not in typing.get_args(typ):
            raise PassError(f"pass '{pass_name}': option {key}={value!r} must be one of "
                            f"{list(typing.get_args(typ))}")
        return value
    if origin in (list, tuple) and isinstance(value, str):
        value = [value]  # one bare item: ops=linear
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return origin(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    wrong_type = isinstance(typ, type) and not isinstance(value, typ)
    if wrong_type or (typ in (int, float) and isinstance(value, bool)):
        raise PassError(f"pass '{pass_name}': option {key}={value!r} must be "
                        f"{_type_name(typ)}")
    return value


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


# ---- running ---------------------------------------------------------------------------
def run_one(info: PassInfo, g: Graph, kwargs: dict) -> tuple[Graph, float]:
    """Run one pass; errors come back as PassError naming the pass."""
    t0 = time.perf_counter()
    try:
        out = info.fn(g, **kwargs)
    except PassError:
        raise
    except Exception as e:
        raise PassError(f"pass '{info.name}' failed: {type(e).__name__}: {e}") from e
    if not isinstance(out, Graph):
        raise PassError(f"pass '{info.name}' returned {type(out).__name__}, not a Graph")
    return out, time.perf_counter() - t0
