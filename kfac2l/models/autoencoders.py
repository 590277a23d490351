"""The deep auto-encoders of the paper (section 4.1): CURVES, MNIST and FACES.

Encoder widths as in docs/protocol.md, decoder mirrored, ReLU after every layer including the code
layer; the output layer is linear and returns *logits* for the Bernoulli (sigmoid) outputs of
CURVES and MNIST (the sigmoid lives in the loss, ``binary_cross_entropy_with_logits``) and the
mean of the Gaussian output of FACES.
"""

from __future__ import annotations

from torch import nn

ENCODERS = {
    "curves": [784, 400, 200, 100, 50, 25, 6],
    "mnist": [784, 1000, 500, 250, 30],
    "faces": [625, 2000, 1000, 500, 30],
}


def autoencoder(widths: list[int]) -> nn.Sequential:
    """Encoder ``widths`` then its mirror; ReLU after every layer but the output."""
    sizes = list(widths) + list(reversed(widths))[1:]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
