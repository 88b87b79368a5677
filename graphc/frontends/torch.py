"""PyTorch frontend: nn.Module -> torch.export -> core ATen -> graphc Graph.

Exported programs lift weights to placeholders; graphc turns them back into `get_attr`
nodes on one flat module, so user inputs are the only placeholders and passes can read
and replace weights in place of a signature bookkeeping exercise.
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback

import torch
from torch import fx
from torch.export.graph_signature import InputKind, OutputKind

from graphc.errors import FrontendError
from graphc.ir import Graph
from graphc.spec import TensorSpec
from graphc.verify import propagate

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHC_DIR = os.path.dirname(os.path.dirname(__file__))
_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def from_module(model: torch.nn.Module, inputs: tuple, name: str | None = None,
                input_names: list[str] | None = None,
                output_names: list[str] | None = None) -> Graph:
    """Trace `model` on `inputs` (in eval mode) into a Graph of core ATen ops."""
    inputs = _check_inputs(inputs)
    name = name or type(model).__name__
    with _eval_mode(model):
        try:
            ep = torch.export.export(model, inputs, strict=False)
        except Exception as e:  # torch.export raises many unrelated types
            raise FrontendError(_untraceable_message(name, e)) from e
    g = from_exported_program(ep.run_decompositions(), inputs, name)
    return _rename(g, input_names, output_names)


def _rename(g: Graph, input_names, output_names) -> Graph:
    """Give specs (and placeholders, where the name is free) the model's own names."""
    if input_names:
        taken = {n.name for n in g.gm.graph.nodes}
        phs = [n for n in g.gm.graph.nodes if n.op == "placeholder"]
        for node, new in zip(phs, input_names):
            ident = re.sub(r"\W", "_", new)
            if ident not in taken and ident.isidentifier():
                node.name = node.target = ident
                taken.add(ident)
        g.inputs = [TensorSpec(n, s.shape, s.dtype) for n, s in zip(input_names, g.inputs)]
        g.gm.recompile()
    if output_names:
        g.outputs = [TensorSpec(n, s.shape, s.dtype) for n, s in zip(output_names, g.outputs)]
    return g


def from_exported_program(ep: torch.export.ExportedProgram, inputs: tuple, name: str) -> Graph:
    """Turn an exported program into a Graph with weights as get_attr nodes."""
    sig = ep.graph_signature
    bad = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if bad:
        raise FrontendError(
            f"torch frontend: '{name}' mutates state during forward ({bad[0].kind.name} "
            f"of '{bad[0].target}'); graphc traces inference graphs: call model.eval() and "
            "remove in-place buffer updates")
    weights = {**ep.state_dict, **ep.constants}
    root, graph, env = torch.nn.Module(), fx.Graph(), {}
    kinds = {s.arg.name: s for s in sig.input_specs}
    input_names = []
    for node in ep.graph.nodes:
        spec = kinds.get(node.name)
        if node.op == "placeholder" and spec.kind in _WEIGHT_KINDS:
            if not node.users:
                continue  # e.g. batchnorm's num_batches_tracked
            attr = _register(root, spec.target, weights[spec.target], spec.kind)
            env[node] = graph.get_attr(attr)
            env[node].meta = dict(node.meta)
        elif node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
            input_names.append(node.name)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    gm = fx.GraphModule(root, graph, class_name=_class_name(name))
    out_vals = [n.meta.get("val") for n in _output_nodes(graph)]
    single = ep.call_spec.out_spec is not None and ep.call_spec.out_spec.is_leaf()
    g = Graph(gm, [TensorSpec.of(n, t) for n, t in zip(input_names, inputs)],
              [TensorSpec(f"out{i}", tuple(v.shape), v.dtype) for i, v in enumerate(out_vals)],
              tuple(inputs), name=name, single_output=single)
    return propagate(g)


def _register(root: torch.nn.Module, target: str, value: torch.Tensor, kind: InputKind) -> str:
    """Register a weight on the flat root under a python-identifier name; return the name."""
    attr = re.sub(r"\W", "_", target)
    while hasattr(root, attr):
        attr += "_"
    if kind == InputKind.PARAMETER:
        root.register_parameter(attr, torch.nn.Parameter(value.detach(), value.requires_grad))
    else:
        root.register_buffer(attr, value.detach())
    return attr


def _output_nodes(graph: fx.Graph) -> list[fx.Node]:
    out = graph.output_node()
    return list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]


def _check_inputs(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise FrontendError(
                f"torch frontend: input {i} is a {type(x).__name__}; graphc traces models whose "
                "inputs are tensors (bind other arguments with functools.partial or a wrapper)")
    return inputs


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _untraceable_message(name: str, e: Exception) -> str:
    where = _user_frame(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ("replace Python control flow on tensor values with torch.where or torch.cond, "
            "or compute the condition from shapes only")
    return f"torch frontend: cannot trace '{name}': {first}\n  at {where}\n  fix: {hint}"


def _user_frame(e: Exception) -> str:
    """The innermost stack frame outside torch and graphc: the user's offending line."""
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if not f.filename.startswith((_TORCH_DIR, _GRAPHC_DIR))]
    m = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)', str(e))
    if m:
        return f"{m[1]}:{m[2]} in {m[3]}: {m[4].strip()}"
    if user:
        f = user[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"
    return "(no user frame found)"


def _class_name(name: str) -> str:
    return re.sub(r"\W", "_", name) or "Model"
