"""Benchmark prefill/decode speed, memory and KV bytes per token; the same as `dsv4 bench` (see common/bench/cli.py).

    python scripts/bench.py --contexts 1k,4k,16k,32k --compare nano --threads 1
"""

from __future__ import annotations

import sys

from dsv4.common.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/bench.py"))
