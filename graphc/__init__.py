"""graphc: a compression compiler for neural networks.

    cm = graphc.compile(model, (x,), target="cpu", passes="fold-batchnorm", dump_ir="ir/")
    y = cm(x); cm.save("model.graphc"); cm = graphc.load("model.graphc")
"""

import warnings

# torch 2.13's own pytree code trips its LeafSpec deprecation on every export; users can do
# nothing about it, so graphc keeps it out of their output.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                        category=FutureWarning)

from graphc import ops, passes, qat  # noqa: F401  (registers the graphc:: ops and passes)
from graphc.api import compile, lower, trace
from graphc.calibrate import calibrate
from graphc.distill import distill
from graphc.errors import (
    ArtifactError,
    BackendError,
    FrontendError,
    GraphcError,
    InputError,
    PassError,
    UnsupportedOpError,
    VerifyError,
)
from graphc.ir import Graph
from graphc.pass_manager import PASSES, parse_pipeline, register_pass
from graphc.passes.quant_policy import QuantPolicy, QuantScheme
from graphc.passes.quantize import quantize
from graphc.pipeline import run_pipeline
from graphc.prune_iter import prune_iteratively
from graphc.spec import TensorSpec
from graphc.verify import verify


def load(path):
    """Read a CompiledModel written by CompiledModel.save()."""
    from graphc.compiled import load_compiled

    return load_compiled(path)


__all__ = [
    "PASSES",
    "ArtifactError",
    "BackendError",
    "FrontendError",
    "Graph",
    "GraphcError",
    "InputError",
    "PassError",
    "QuantPolicy",
    "QuantScheme",
    "TensorSpec",
    "UnsupportedOpError",
    "VerifyError",
    "calibrate",
    "compile",
    "distill",
    "load",
    "lower",
    "parse_pipeline",
    "prune_iteratively",
    "qat",
    "quantize",
    "register_pass",
    "run_pipeline",
    "trace",
    "verify",
]
__version__ = "0.1.0"
