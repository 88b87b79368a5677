"""Shape propagation and the IR verifier, run after every pass in tests and verify=True mode.

Invariants: the fx graph lints; user inputs are the only placeholders and match the specs;
every get_attr names a tensor on the module; no node is left without users (dangling);
fake-tensor shape propagation succeeds; outputs keep the shapes and dtypes the graph had.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphc.errors import VerifyError
from graphc.ir import Graph, fetch_attr, node_spec, op_name
from graphc.spec import TensorSpec


def propagate(g: Graph) -> Graph:
    """Recompute every node's meta['val'] (a FakeTensor: shape and dtype) in place; return g."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(t) for t in g.example_inputs]
    _NamingProp(g.gm, mode).propagate_dont_convert_inputs(*fake)
    return g


class _NamingProp(FakeTensorProp):
    """FakeTensorProp whose errors name the node that failed."""

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except VerifyError:
            raise
        except Exception as e:
            raise VerifyError(f"shape propagation failed at node %{n.name} ({_desc(n)}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def verify(g: Graph, after: str = "input") -> None:
    """Raise VerifyError naming the node, op and pass `after` if g breaks an invariant."""
    where = f"after pass '{after}'"
    _check_placeholders(g, where)
    _check_nodes(g, where)
    try:
        g.gm.graph.lint()
    except Exception as e:
        raise VerifyError(f"{where}: fx lint failed: {e}") from e
    propagate(g)
    _check_outputs(g, where)


def _check_placeholders(g: Graph, where: str) -> None:
    phs = [n for n in g.gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(g.inputs):
        raise VerifyError(f"{where}: graph has {len(phs)} placeholders but {len(g.inputs)} "
                          "input specs; passes must not add or remove user inputs")


def _check_nodes(g: Graph, where: str) -> None:
    for n in g.gm.graph.nodes:
        if n.op == "get_attr":
            try:
                value = fetch_attr(g.gm, n.target)
            except AttributeError:
                raise VerifyError(f"{where}: get_attr %{n.name} names missing attribute "
                                  f"'{n.target}'") from None
            if not isinstance(value, torch.Tensor):
                raise VerifyError(f"{where}: get_attr %{n.name} is not a tensor")
        if n.op in ("call_function", "get_attr") and not n.users and not n.is_impure():
            raise VerifyError(
                f"{where}: dangling node %{n.name} ({_desc(n)}) has no users; "
                "run 'dead-code-elimination' at the end of the pass")


def _check_outputs(g: Graph, where: str) -> None:
    outs = g.gm.graph.output_node().args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if len(outs) != len(g.outputs):
        raise VerifyError(f"{where}: graph returns {len(outs)} values, specs say "
                          f"{len(g.outputs)}")
    for node, spec in zip(outs, g.outputs):
        got = node_spec(node) if isinstance(node, fx.Node) else None
        if got != (spec.shape, spec.dtype):
            have = TensorSpec(spec.name, *got) if got else "no tensor"
            raise VerifyError(f"{where}: output {spec.name} (node %{getattr(node, 'name', node)})"
                              f" changed from {spec} to {have}")


def _desc(n: fx.Node) -> str:
    return op_name(n) if n.op == "call_function" else f"get_attr {n.target}"

