"""`python -m dsv4 ...` (and `torchrun -m dsv4 ...`) runs the CLI."""

from dsv4.common.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
