"""Bad option values for every registered pass, each with the error it must give.

BAD_OPTIONS[pass] lists (options, regex): running the pass with `options` must raise a
graphc error whose message matches `regex`, a pattern that names the pass and the option.
Every registered pass needs an entry (tests/badinput/test_pass_options.py fails otherwise):
a pass without options gets an unknown option, which the pipeline must refuse by name.
"""

from __future__ import annotations


def _unknown(name: str) -> list[tuple[dict, str]]:
    return [({"no_such_option": 1}, rf"pass '{name}' has no option 'no_such_option'")]


def _p(name: str, option: str) -> str:
    """A message naming the pass and the option (in either order)."""
    return rf"(?s)(?=.*{name})(?=.*\b{option}\b)"


BAD_OPTIONS: dict[str, list[tuple[dict, str]]] = {
    "dead-code-elimination": _unknown("dead-code-elimination"),
    "common-subexpression-elimination": _unknown("common-subexpression-elimination"),
    "fold-batchnorm": _unknown("fold-batchnorm"),
    "fold-fake-quant": _unknown("fold-fake-quant"),
    "fold-pad": _unknown("fold-pad"),
    "fold-prune-masks": _unknown("fold-prune-masks"),
    # (a negative max_growth_bytes is meaningful: fold only what shrinks the weights)
    "constant-folding": [({"max_growth_bytes": "big"}, _p("constant-folding", "max_growth_bytes")),
                         ({"max_growth_bytes": 1.5}, _p("constant-folding", "max_growth_bytes"))],
    "dedupe-weights": [({"equal_values": "yes"}, _p("dedupe-weights", "equal_values"))],
    "factorize": [
        ({"rank": 0}, _p("factorize", "rank")),
        ({"rank": -3}, _p("factorize", "rank")),
        ({"energy": 1.5}, _p("factorize", "energy")),
        ({"energy": 0.0}, _p("factorize", "energy")),
        ({"ratio": 0.0}, _p("factorize", "ratio")),
        ({"ratio": 2.0}, _p("factorize", "ratio")),
        ({"max_error": -0.1}, _p("factorize", "max_error")),
        ({"multiple": 0}, _p("factorize", "multiple")),
        ({"method": "qr"}, _p("factorize", "method")),
        ({"ops": ["pool"]}, _p("factorize", "ops")),
    ],
    "quantize": [
        ({"bits": 1}, _p("quantize", "bits")),
        ({"bits": 33}, _p("quantize", "bits")),
        ({"act_bits": 0}, _p("quantize", "act_bits")),
        ({"activations": "sometimes"}, _p("quantize", "activations")),
        ({"observer": "magic"}, _p("quantize", "observer")),
        ({"weight_observer": "magic"}, _p("quantize", "weight_observer")),
        ({"ops": ["pool"]}, _p("quantize", "ops")),
        ({"max_error": -1.0}, _p("quantize", "max_error")),
    ],
    "share-weights": [
        ({"bits": 0}, _p("share-weights", "bits")),
        ({"bits": 9}, _p("share-weights", "bits")),
        ({"min_size": -1}, _p("share-weights", "min_size")),
        ({"rows_per_codebook": -2}, _p("share-weights", "rows_per_codebook")),
        ({"ops": ["pool"]}, _p("share-weights", "ops")),
        ({"lowering": "fast"}, _p("share-weights", "lowering")),
        ({"assign": "random"}, _p("share-weights", "assign")),
        ({"target": "tpu"}, _p("share-weights", "target")),
    ],
    "prune": [
        ({"sparsity": 1.5}, _p("prune", "sparsity")),
        ({"sparsity": -0.1}, _p("prune", "sparsity")),
        ({"sparsity": 0.5, "criterion": "magic"}, _p("prune", "criterion")),
        ({"sparsity": 0.5, "scope": "model"}, _p("prune", "scope")),
        ({"sparsity": 0.5, "structure": "3:2"}, _p("prune", "structure")),
        ({"sparsity": 0.5, "structure": "diagonal"}, _p("prune", "structure")),
        ({"sparsity": 0.5, "normalize": "z"}, _p("prune", "normalize")),
    ],
    "prune-channels": [
        ({"sparsity": 1.0}, _p("prune-channels", "sparsity")),
        ({"sparsity": -0.5}, _p("prune-channels", "sparsity")),
        ({"criterion": "magic"}, _p("prune-channels", "criterion")),
        ({"unit": "row"}, _p("prune-channels", "unit")),
        ({"round_to": 0}, _p("prune-channels", "round_to")),
    ],
    "sparsify": [
        ({"min_sparsity": 1.5}, _p("sparsify", "min_sparsity")),
        ({"min_sparsity": -0.5}, _p("sparsify", "min_sparsity")),
        ({"block": [0, 4]}, _p("sparsify", "block")),
        ({"block": [1, 2, 3]}, _p("sparsify", "block")),
        ({"mode": "fast"}, _p("sparsify", "mode")),
        ({"ops": ["pool"]}, _p("sparsify", "ops")),
        # target is read only where mode=auto times a layer: PREPARE makes sparse layers
        ({"target": "tpu"}, _p("sparsify", "target")),
    ],
}

# Pipelines run before the pass, so that the option is really used (sparsify only looks at
# weights that are sparse already).
PREPARE: dict[str, str] = {"sparsify": "prune(sparsity=0.7), fold-prune-masks"}
