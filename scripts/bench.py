#!/usr/bin/env python
"""Thin entry point: `python scripts/bench.py ...` is `python -m kfac2l.bench ...`."""

import sys

from kfac2l.bench import main

if __name__ == "__main__":
    sys.exit(main())
