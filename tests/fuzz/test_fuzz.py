"""Differential fuzzing: random graphs through graphc's passes and the TVM backend vs PyTorch.

CI runs a small derandomized sample (the same programs every run). A long campaign:

    GRAPHC_FUZZ_EXAMPLES=2000 pytest tests/fuzz/test_fuzz.py -p no:cacheprovider

draws fresh random programs (hypothesis' database in .hypothesis/ replays any failure
first on the next run); see tests/fuzz/README.md.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

import graphc
from tests.fuzz.check import EXACT, LOSSY, PRUNING, check_exact
from tests.fuzz.gen import programs
from tests.fuzz.lossy import check_lossy

_LONG = int(os.environ.get("GRAPHC_FUZZ_EXAMPLES", "0"))
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("ci", deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("long", deadline=None, derandomize=False,
                          suppress_health_check=_SLOW_OK, max_examples=max(_LONG, 1))


def _examples(ci: int, share: float = 1.0) -> settings:
    """ci examples in CI; a share of GRAPHC_FUZZ_EXAMPLES in a long run."""
    if _LONG:
        return settings(settings.get_profile("long"), max_examples=max(1, int(_LONG * share)))
    return settings(settings.get_profile("ci"), max_examples=ci)


def test_every_registered_pass_is_classified():
    known = set(EXACT) | set(LOSSY) | set(PRUNING)
    missing = sorted(set(graphc.PASSES) - known)
    assert not missing, (f"passes {missing} are not in tests/fuzz/check.py's EXACT, LOSSY or "
                         "PRUNING: say how the fuzzer checks them")


@pytest.mark.slow
@_examples(ci=30)
@given(programs())
def test_exact_passes_and_tvm_match_pytorch(prog):
    check_exact(prog)


@pytest.mark.slow
@_examples(ci=6, share=0.25)
@given(programs(kinds=("linear", "conv2d", "matmul", "unary", "binary", "batchnorm",
                       "embedding", "layout", "reduce", "pool", "concat")))
def test_lossy_passes_keep_their_bounds_and_tvm_matches(prog):
    check_lossy(prog)
