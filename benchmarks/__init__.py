"""Side-by-side benchmarks (not tests): see README.md and run.py."""
