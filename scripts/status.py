#!/usr/bin/env python
"""Thin entry point: `python scripts/status.py ...` is `python -m kfac2l.status ...`."""

import sys

from kfac2l.status import main

if __name__ == "__main__":
    sys.exit(main())
