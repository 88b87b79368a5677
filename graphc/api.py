"""graphc.trace and graphc.compile: the whole compiler, top to bottom, in one screen."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from graphc.dump import Dumper
from graphc.errors import FrontendError, GraphcError
from graphc.frontends.torch import from_module
from graphc.ir import Graph
from graphc.pipeline import run_pipeline

ModelLike = "torch.nn.Module | Graph | str | os.PathLike | bytes | onnx.ModelProto"


def trace(model, inputs=None, *, name: str | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Model (nn.Module, ONNX path/bytes/ModelProto, or Graph) -> graphc Graph."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, torch.nn.Module):
        if inputs is None:
            raise FrontendError("trace: a PyTorch model needs example inputs: "
                                "graphc.trace(model, (x,))")
        if input_shapes:  # silently ignored, it would compile other shapes than asked
            raise FrontendError("trace: input_shapes is for ONNX inputs with dynamic dims; a "
                                "PyTorch model takes its shapes from the example inputs")
        return from_module(model, inputs, name=name)
    if not isinstance(model, (str, os.PathLike, bytes)) and type(model).__name__ != "ModelProto":
        raise FrontendError(f"trace: cannot trace a {type(model).__name__}; give a "
                            "torch.nn.Module, an ONNX file (path, bytes or ModelProto) or a "
                            "graphc.Graph")
    return _trace_onnx(model, inputs, name, input_shapes)


def _trace_onnx(model, inputs, name, input_shapes) -> Graph:
    from graphc.frontends.onnx import load_onnx

    module = load_onnx(model, input_shapes=input_shapes)
    if name is None:
        name = Path(model).stem if isinstance(model, (str, os.PathLike)) else "onnx_model"
    inputs = module.example_inputs() if inputs is None else inputs
    return from_module(module, inputs, name=name, input_names=module.input_names,
                       output_names=module.output_names)


# Graph.meta entries that passes write as their report (JSON-serializable): they travel
# into CompiledModel.meta, and so into saved artifacts.
PASS_REPORTS = ("factorize", "quantize", "share-weights", "dedupe-weights", "prune",
                "prune-unstructured", "sparsify")


def compile(model, inputs=None, *, target="cpu", passes=(), dump_ir=None,
            verify: bool = False, verbose: bool = False, name: str | None = None,
            input_shapes: dict[str, tuple[int, ...]] | None = None, tune: int = 0,
            tuning_db: str | os.PathLike | None = None, num_threads: int | None = None):
    """Trace, run the compression passes, lower for `target`; returns a CompiledModel.

    passes: a pipeline string ("fold-batchnorm, constant-folding") or a list of them.
    dump_ir: a directory for numbered IR dumps of every stage. verify: check the IR and
    pass contracts after every pass. verbose: print the per-pass table.
    tune: MetaSchedule trial budget (0: no search; records already in the tuning database
    are applied either way). tuning_db: the database folder (default $GRAPHC_TUNING_DB or
    ~/.cache/graphc/tuning). num_threads: threads for the kernels (default: all cores).
    """
    dumper = Dumper(dump_ir) if dump_ir else None
    g = trace(model, inputs, name=name, input_shapes=input_shapes)     # frontend
    g, records = run_pipeline(g, passes, check=verify, dump=dumper)     # compression passes
    cm = lower(g, target=target, dump=dumper, tune=tune, tuning_db=tuning_db)  # backend
    if num_threads is not None:
        cm.num_threads = num_threads
    cm.meta["passes"] = [r.row() for r in records]
    cm.meta["name"] = g.name
    cm.meta.update({k: g.meta[k] for k in PASS_REPORTS if k in g.meta})
    if verbose:
        print(cm.report())
    return cm


def lower(g: Graph, *, target="cpu", dump: Dumper | None = None, tune: int = 0,
          tuning_db: str | os.PathLike | None = None):
    """Graph -> CompiledModel through the backend that `target` names; tune/tuning_db: see
    compile()."""
    ep = torch.export.export(g.gm, g.example_inputs, strict=False)
    dump_fn = (lambda stage, text: dump.text(stage, text, ext="py")) if dump else None
    kwargs = {"input_specs": g.inputs, "output_specs": g.outputs,
              "single_output": g.single_output}
    if target == "torch":
        from graphc.backends.torch_backend import build as build_torch

        if tune:
            raise GraphcError("tune: the torch backend has nothing to tune; use a TVM target")
        return build_torch(ep, **kwargs)
    from graphc.backends.tvm import build as build_tvm
    from graphc.backends.tvm.tuning import TuningOptions

    tuning = TuningOptions(trials=_trials(tune), db=tuning_db)
    return build_tvm(ep, target=target, dump=dump_fn, tuning=tuning, **kwargs)


def _trials(tune) -> int:
    if isinstance(tune, bool) or not isinstance(tune, int) or tune < 0:
        raise GraphcError(f"tune must be a trial count >= 0 (0: no search), got {tune!r}")
    return tune
