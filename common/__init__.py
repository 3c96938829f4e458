"""dsv4.common: the hardware-neutral layer, one package per concern, dependencies pointing one way
(held by the import-linter contract in pyproject.toml):

    model  <-  checkpoint  <-  runtime  <-  {parity, planner, bench, serve}  <-  cli

model/       the V4 graph and what it is made of: config, the ops seam, the reference ops (the oracle), rope,
             numeric formats, KV cache, the parallel layout a rank holds
checkpoint/  the official tensor layout and TP split rules, reading, writing and filling a model, the tokenizer
runtime/     backend selection, process groups, the batching engine and captured decode step, generation,
             the model loading commands share
parity/      cross-backend and cross-machine numerical checks (metrics, golden files, bisect, report)
planner/     capacity planning (closed-form, no torch)
bench/       speed and memory benchmarks
serve/       the OpenAI-compatible HTTP server
cli.py       the `dsv4` command: argument wiring only
"""
