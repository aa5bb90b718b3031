"""Benchmarks and cross-checks, run on demand from the repository root as `python -m bench.<group>.<script>`
(bench/README.md lists them): run as modules, they import this tree's `sweep` and each other without sys.path edits."""
