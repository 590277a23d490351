#!/usr/bin/env python
"""Thin entry point: `python scripts/report.py ...` is `python -m kfac2l.report ...`."""

import sys

from kfac2l.report import main

if __name__ == "__main__":
    sys.exit(main())
