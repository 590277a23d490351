"""The deep linear networks of the paper (section 4.3): no activations, BatchNorm between layers."""

from __future__ import annotations

from torch import nn


def deep_linear_a(in_features: int = 784, width: int = 10, hidden: int = 62, num_classes: int = 10) -> nn.Sequential:
    """Linear(784->10)+BN, then 62 x [Linear(10->10)+BN], then Linear(10->10): 64 linear layers."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width), nn.BatchNorm1d(width)]
    for _ in range(hidden):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width)]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


DEEP_LINEAR_B = [784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10]


def deep_linear_b(widths: list[int] | None = None) -> nn.Sequential:
    """784-1000-900-...-20-10 with BN after each hidden layer, no activations."""
    widths = widths or DEEP_LINEAR_B
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(nn.BatchNorm1d(d_out))
    return nn.Sequential(*layers)


def tko_mlp(depth: int = 62, features: int = 10, width: int = 10, outputs: int = 1) -> nn.Sequential:
    """The student network of Tselepidis, Kohler & Orvieto's toy problem (their SimpleMLP with
    bias=False, batch_norm=True, no activation): Linear(features->width)+BN, ``depth`` x
    [Linear(width->width)+BN], Linear(width->outputs), all without bias: depth + 2 linear layers
    (their --depth; the paper's 64 layers are depth 62). depth = 0 is their single-layer network
    Linear(features->outputs), without BatchNorm."""
    if int(depth) != depth or depth < 0:
        raise ValueError(f"depth={depth!r}; valid: an integer >= 0")
    if depth == 0:
        return nn.Sequential(nn.Linear(features, outputs, bias=False))
    layers: list[nn.Module] = [nn.Linear(features, width, bias=False), nn.BatchNorm1d(width)]
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width)]
    layers.append(nn.Linear(width, outputs, bias=False))
    return nn.Sequential(*layers)
