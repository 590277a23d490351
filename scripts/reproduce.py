#!/usr/bin/env python
"""Thin entry point: `python scripts/reproduce.py ...` is `python -m kfac2l.reproduce ...`."""

import sys

from kfac2l.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
