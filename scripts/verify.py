#!/usr/bin/env python
"""Thin entry point: `python scripts/verify.py ...` is `python -m kfac2l.verify ...`."""

import sys

from kfac2l.verify import main

if __name__ == "__main__":
    sys.exit(main())
