"""Parity: metrics and tolerances (compare.py), model sources (sources.py), golden files (golden.py), per-op bisect
(bisect.py), reports (report.py) and the `dsv4 parity` command (cli.py)."""
