"""Determinism (graphc issue 8, part 4): the same model, passes and target give byte-identical
artifacts, and identical outputs across runs and thread counts.

Covered: a conv net, a transformer block, an int8 model and weight-sharing decode layers.
What makes artifacts reproducible: fixed zip dates and modes, no wall-clock timings in the
saved meta (graphc/compiled.py), tensor-cache keys of decoded weights made from the
weights' digest (backends/tvm/lower_codebook.py cache_key, see docs/debugging.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graphc
from tests.models.zoo import build

CORES = os.cpu_count() or 1
ROOT = Path(__file__).resolve().parent.parent


def _int8():
    model, inputs = build("mlp")
    return model, inputs, "quantize(bits=8, per_channel=true)"


CASES = {
    "conv": lambda: (*build("conv_bn_residual"), "fold-batchnorm"),
    "transformer": lambda: (*build("encoder_block"), "constant-folding"),
    "int8": _int8,
}


def _compile_and_save(case: str, path: Path):
    torch.manual_seed(0)
    model, inputs, passes = CASES[case]()
    cm = graphc.compile(model, inputs, target="cpu", passes=passes)
    cm.save(path)
    return cm, inputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_artifact_bytes_and_outputs(case, tmp_path):
    cm1, inputs = _compile_and_save(case, tmp_path / "a.graphc")
    cm2, _ = _compile_and_save(case, tmp_path / "b.graphc")
    a, b = (tmp_path / "a.graphc").read_bytes(), (tmp_path / "b.graphc").read_bytes()
    assert a == b, f"{case}: two compiles gave different artifacts"
    outs = {}
    for n in (1, CORES, 1, None):  # thread counts, and repeated runs
        for cm in (cm1, cm2):
            cm.num_threads = n
            out = cm(*inputs)
            outs.setdefault(n, []).append(out.numpy())
    ref = outs[1][0]
    assert np.abs(ref).max() > 0  # a real output
    for n, got in outs.items():
        for o in got:
            np.testing.assert_array_equal(o, ref, err_msg=f"{case}: num_threads={n}")
    loaded = graphc.load(tmp_path / "a.graphc")
    np.testing.assert_array_equal(loaded(*inputs).numpy(), ref)


_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from tests.test_determinism import _compile_and_save
_compile_and_save(sys.argv[1], __import__("pathlib").Path(sys.argv[3]))
"""


@pytest.mark.parametrize("case", ["conv"])
def test_same_artifact_from_another_process(case, tmp_path):
    # another process, another thread count: the bytes still match
    _compile_and_save(case, tmp_path / "here.graphc")
    env = {**os.environ, "TVM_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, case, str(ROOT),
                           str(tmp_path / "there.graphc")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "here.graphc").read_bytes() == (tmp_path / "there.graphc").read_bytes()


def test_weight_sharing_decode_artifact_is_reproducible(tmp_path):
    """Decode-once layers name their cached weight from the weights' digest, the node and
    the cached layout (lower_codebook.cache_key, decode_chain), so two compiles give the
    same lib.so (its init function, decode_once.py, holds the names)."""
    model, inputs = build("mlp")
    g = graphc.trace(model, inputs)
    for name in ("a", "b"):
        graphc.compile(g, target="cpu", passes="share-weights(bits=4, lowering=decode, "
                       "min_size=0)").save(tmp_path / f"{name}.graphc")
    assert (tmp_path / "a.graphc").read_bytes() == (tmp_path / "b.graphc").read_bytes()
