"""The bad-input corpus (graphc issue 8, part 3): malformed models, files, calls and options,
each with the error graphc must give; docs/debugging.md lists them."""
