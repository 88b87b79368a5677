"""graphc's built-in passes; importing this package registers them.

One technique per module. Each pass is a function Graph -> Graph registered by name.
"""

from graphc.passes import (  # noqa: F401  (registers them)
    cleanup,
    dedupe_weights,
    factorize,
    fold_batchnorm,
    fold_fake_quant,
    fold_pad,
    prune,
    prune_masks,
    prune_structured,
    quantize,
    share_weights,
    sparsify,
)
