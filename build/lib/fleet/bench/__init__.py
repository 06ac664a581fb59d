"""Benchmarks: `python -m fleet.bench NAME [args]` runs `fleet.bench.NAME.main(args)`.

Figures are printed as measured in one run, with ratios against a baseline measured in the same
run, because these machines are shared and noisy.
"""
