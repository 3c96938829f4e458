"""Benchmarks: runners for dsv4 and the nano-deepseek-v4 baseline (runners.py), measurement (measure.py), the report
(report.py) and `dsv4 bench` (cli.py)."""
