"""Import: a torch.export ExportedProgram (core ATen) -> a Relax IRModule.

TVM's PyTorch importer converts the ATen ops. Ops it has no rule for (graphc:: custom ops,
or an ATen op to be lowered differently) get a rule from the LOWERINGS table:

    @register_lowering("graphc::int8_linear")
    def _(node: torch.fx.Node, importer) -> relax.Expr:
        x, w = (importer.env[a] for a in node.args[:2])   # Relax values of the fx args
        return importer.block_builder.emit(relax.op.matmul(x, w))

A rule has TVM's custom-convert signature `(node, importer) -> relax.Expr`; `importer.env`
maps fx nodes to Relax values and `importer.block_builder` emits new bindings;
`importer.target` is the tvm.target.Target being compiled for (None outside a build), for
rules whose best form depends on the instructions the target has.

TVM keys its converters by `node.target.__name__` ("scale_add.default"), which drops the
namespace, so graphc::relu would collide with aten::relu. We therefore dispatch on the full
name ("graphc.relu.default") ourselves and hand TVM one dispatcher per short name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import tvm
from torch import fx
from tvm import relax
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from graphc.errors import BackendError, GraphcError, UnsupportedOpError

Lowering = Callable[[fx.Node, ExportedProgramImporter], relax.Expr]

# "namespace.op.overload" -> rule. Filled by register_lowering; read at every import.
LOWERINGS: dict[str, Lowering] = {}

HINT = "register one with graphc.backends.tvm.register_lowering"


def op_key(op) -> str:
    """'graphc::foo', 'graphc::foo.out', 'graphc.foo.default' or torch.ops.graphc.foo[.default]
    -> 'graphc.foo.default', the name LOWERINGS is keyed by."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        op = op.default
    if isinstance(op, torch._ops.OpOverload):
        return str(op)
    if isinstance(op, str) and op:
        ns, sep, rest = op.partition("::")
        if sep:
            name, _, overload = rest.partition(".")
            return f"{ns}.{name}.{overload or 'default'}"
        if op.count(".") in (1, 2):
            return op if op.count(".") == 2 else op + ".default"
    raise BackendError(f"tvm backend: cannot name an op by {op!r}; use 'namespace::op' "
                       "or 'namespace::op.overload' or torch.ops.namespace.op")


def register_lowering(op) -> Callable[[Lowering], Lowering]:
    """Decorator: lower `op` (e.g. "graphc::int8_linear") with fn(node, importer) -> relax.Expr."""
    key = op_key(op)

    def register(fn: Lowering) -> Lowering:
        LOWERINGS[key] = fn
        return fn

    return register


def target_key(target) -> str:
    """The LOWERINGS key of an fx call_function target (an OpOverload or a Python function)."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


class _Importer(ExportedProgramImporter):
    """TVM's importer with graphc's rules in front, remembering the node being converted."""

    def __init__(self, rules: dict[str, Lowering], target: tvm.target.Target | None = None):
        super().__init__()
        self.builtin = self.convert_map
        self.rules = rules
        self.target = target
        self.memo: dict = {}  # values rules derive once and share between nodes (lower_quant)
        self.ep: torch.export.ExportedProgram | None = None  # what is being imported
        self.node: fx.Node | None = None
        short_names = set(self.builtin) | {key.split(".", 1)[1] for key in rules}
        self.convert_map = {name: self._convert for name in short_names}

    def _convert(self, node: fx.Node) -> relax.Expr:
        self.node = node
        rule = self.rules.get(target_key(node.target))
        if rule is not None:
            return rule(node, self)
        return self.builtin[node.target.__name__](node)

    @staticmethod
    def _convert_pytorch_tensor_to_tvm(tensor: torch.Tensor):
        # TVM wraps weights with DLPack, sharing memory with the torch model: an in-place update
        # of the model afterwards (training, another pass) would silently change the compiled
        # model. Copy once here.
        return ExportedProgramImporter._convert_pytorch_tensor_to_tvm(tensor.detach().clone())

    def lowerable(self, node: fx.Node) -> bool:
        if target_key(node.target) in self.rules:
            return True
        # TVM's builtins are keyed by short name and meant for ATen: a foreign op must have a
        # rule even when an ATen op of the same short name exists.
        foreign = isinstance(node.target, torch._ops.OpOverload) and node.target.namespace != "aten"
        return not foreign and getattr(node.target, "__name__", None) in self.builtin


def import_program(ep: torch.export.ExportedProgram,
                   target: tvm.target.Target | None = None) -> tvm.IRModule:
    """Convert a core-ATen ExportedProgram to a Relax module whose `main` takes the user inputs
    (weights become constants) and returns a tuple of the user outputs."""
    importer = _Importer(dict(LOWERINGS), target)
    importer.ep = ep
    for node in ep.graph.nodes:
        if node.op == "call_function" and not importer.lowerable(node):
            raise UnsupportedOpError(f"tvm backend: no lowering for {target_key(node.target)} "
                                     f"at node %{node.name}; {HINT}")
    try:
        # The ExportedProgram is already decomposed to core ATen, so we call the importer class
        # (what from_exported_program does after its own run_decompositions()). Positional
        # flags: keep_params_as_input, unwrap_unit_return_tuple, no_bind_return_tuple.
        return importer.from_exported_program(ep, False, False, False, None)
    except GraphcError:
        raise
    except Exception as e:  # TVM's converters raise assorted types (AssertionError, TVMError)
        node = importer.node
        where = f" at node %{node.name} ({target_key(node.target)})" if node is not None else ""
        raise BackendError(f"tvm backend: import failed{where}: {type(e).__name__}: {e}") from e
