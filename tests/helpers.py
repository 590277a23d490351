"""Tiny float64 problems shared by the tests."""

from kfac2l.dense import Problem, tiny_cnn, tiny_inputs, tiny_mlp  # noqa: F401
