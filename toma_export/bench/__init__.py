"""Benchmarks: ToMA against the unmerged baseline and tomesd, per block and backend, as JSON."""
