#!/usr/bin/env python
"""Thin entry point: `python scripts/select_best.py ...` is `python -m kfac2l.select ...`."""

import sys

from kfac2l.select import main

if __name__ == "__main__":
    sys.exit(main())
