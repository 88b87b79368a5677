"""graphc's built-in passes; importing this package registers them.

One technique per module. Each pass is a function Graph -> Graph registered by name.
"""

from graphc.passes import cleanup, fold_batchnorm, quantize  # noqa: F401  (registers them)
