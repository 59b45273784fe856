"""Benchmarks (docs/benchmarks.md): ``python -m bench.run`` runs the rows of bench/rows.py and prints the table."""
