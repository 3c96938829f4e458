"""The V4 model: config (ModelArgs), the ops seam every backend implements (ops.py), the pure-torch reference ops
(reference.py, the oracle), rope, the FP8/FP4 numerics the graph simulates (quant.py), the graph itself
(transformer.py), its KV cache (cache.py) and the parallel layout a rank holds (parallel.py).

Imports nothing else of dsv4: backends (dsv4.ascend, dsv4.cuda) build on this package alone."""
