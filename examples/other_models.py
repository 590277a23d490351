"""Two-level KFAC on models the paper never used, in a few lines each.

    python examples/other_models.py [--steps 20] [--batch 32] [--image-size 32]

1. torchvision's ResNet18 (in-place ReLU, residual additions, BatchNorm) on CIFAR-shaped inputs,
   RESIDU coarse space; its widest stage is left out with ``exclude`` (4609-wide factors are slow
   to decompose on a laptop CPU) and keeps its plain gradient, like the BatchNorm layers.
2. A small sequence model whose Linear layers act on (batch, positions, features) inputs: each
   position is a location sharing the weight (the "expand" setting), KRY-RESIDU coarse space.

Random data: the point is the API, not the accuracy. Prints the loss before and after.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torchvision
from torch import nn

import kfac2l
from kfac2l.optim.preconditioner import UnpreconditionedWarning
from kfac2l.optim.step import get_task, training_step


class SequenceClassifier(nn.Module):
    """Embedding -> Linear/GELU/Linear applied at every position -> mean over positions -> head."""

    def __init__(self, vocab: int = 50, width: int = 32, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        h = self.embed(tokens)          # (B, S, D): the Linear layers below see 3-D inputs
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def train(model, name, x, y, steps, **options):
    """A few training steps with the paper's schedule (B/4 Fisher batch); (first, last) loss."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpreconditionedWarning)  # BatchNorm, Embedding: plain gradient
        opt = kfac2l.make_optimizer(name, model, lr=0.05, damping=1e-2, kl_clip=1e-2, cov_interval=5,
                                    inv_interval=5, **options)
    task = get_task("classification")
    losses = [float(training_step(model, opt, task, x, y)) for _ in range(steps)]
    return losses[0], losses[-1], opt


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {}

    resnet = torchvision.models.resnet18(num_classes=10)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch,))
    first, last, opt = train(resnet, "residu", images, labels, args.steps, exclude=["layer4.*"])
    results["resnet18"] = (first, last)
    print(f"ResNet18 (in-place ReLU), RESIDU: loss {first:.3f} -> {last:.3f}; "
          f"{len(opt.preconditioner.layers)} layers preconditioned, "
          f"{len(opt.preconditioner.skipped_modules)} modules with a plain gradient")

    model = SequenceClassifier()
    tokens = torch.randint(0, 50, (args.batch, 12))
    classes = tokens[:, 0] % 4  # learnable: the class is the first token mod 4
    first, last, opt = train(model, "kry-residu", tokens, classes, args.steps)
    results["sequence"] = (first, last)
    print(f"Sequence model (Linear on 3-D inputs), KRY-RESIDU: loss {first:.3f} -> {last:.3f}")
    return results


if __name__ == "__main__":
    main()
