"""Capacity planning, closed-form over ModelArgs and configs/hardware.yaml: sizes.py, hardware.py, claims.py, the plan
(plan.py) and `dsv4 plan` (cli.py)."""
