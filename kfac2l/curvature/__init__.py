"""The mathematics of kfac2l: layer capture, Kronecker factors, Fisher products, coarse spaces,
two-level corrections and the exact regularised natural gradient. No training loop, no files."""
