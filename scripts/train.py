#!/usr/bin/env python
"""Thin entry point: `python scripts/train.py ...` is `python -m kfac2l.train ...` (Hydra)."""

from kfac2l.train import cli

if __name__ == "__main__":
    cli()
