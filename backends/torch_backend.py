"""The torch backend: runs the graph in PyTorch eager mode (target="torch").

It is the numerical reference the other backends are checked against, and a way to run a
compressed graph (with its graphc:: custom ops) without compiling it. Saving uses
torch.export.save, so it works when the graph is an ExportedProgram.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

from graphc.compiled import ArtifactError, CompiledModel
from graphc.errors import BackendError, GraphcError
from graphc.spec import TensorSpec

PROGRAM_FILE = "program.pt2"


class TorchRunner:
    """Runner protocol (graphc.compiled.Runner) over a torch callable."""

    def __init__(self, module, program: torch.export.ExportedProgram | None = None):
        self.module = module
        self.program = program  # kept only to be able to save

    def convert(self, inputs):
        return [torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
                for x in inputs]

    def run(self, native_inputs):
        with torch.no_grad():
            return self.module(*native_inputs)

    def outputs(self, native_outputs):
        # The module may return a tensor, a tuple or a nested structure: flatten it.
        return [t for t in pytree.tree_leaves(native_outputs) if isinstance(t, torch.Tensor)]

    def save(self, directory: Path) -> None:
        if self.program is None:
            raise GraphcError("the torch backend can only save models built from an "
                              "ExportedProgram; use target='cpu' for a deployable artifact")
        torch.export.save(self.program, directory / PROGRAM_FILE)


def build(gm_or_ep, *, input_specs: list[TensorSpec], output_specs: list[TensorSpec],
          single_output: bool, target="torch", dump=None) -> CompiledModel:
    """Wrap an ExportedProgram (or any torch module) as a CompiledModel that runs in PyTorch."""
    if isinstance(gm_or_ep, torch.export.ExportedProgram):
        runner = TorchRunner(gm_or_ep.module(), gm_or_ep)
    elif callable(gm_or_ep):
        runner = TorchRunner(gm_or_ep)
    else:
        raise BackendError(f"torch backend: expected an ExportedProgram or a torch module, "
                           f"got {type(gm_or_ep).__name__}")
    if dump is not None:
        graph = getattr(gm_or_ep, "graph", None)
        dump("torch", str(graph) if graph is not None else repr(gm_or_ep))
    return CompiledModel(runner, input_specs=input_specs, output_specs=output_specs,
                         single_output=single_output, target="torch (PyTorch eager, this host)",
                         backend="torch")


def load_runner(directory: Path) -> TorchRunner:
    """Rebuild a TorchRunner from the files TorchRunner.save wrote (used by graphc.load)."""
    try:
        program = torch.export.load(directory / PROGRAM_FILE)
    except Exception as e:  # torch raises many types for a bad archive or a missing custom op
        raise ArtifactError(f"torch backend: cannot load the saved program ({e}); if it uses "
                            "graphc:: custom ops, import the module that defines them first") from e
    return TorchRunner(program.module(), program)
