#!/usr/bin/env python
"""Thin entry point: `python scripts/recheck.py ...` is `python -m kfac2l.recheck ...`."""

import sys

from kfac2l.recheck import main

if __name__ == "__main__":
    sys.exit(main())
