"""One training step with the paper's curvature schedule (shared by the runner and the bench).

When the optimiser needs curvature this step, the Fisher statistics come from a second
forward/backward on ``fisher_fraction * B`` samples drawn with replacement from the mini-batch,
with targets sampled from the model (docs/protocol.md); it leaves the BatchNorm running statistics
untouched. Nothing here synchronises with the device.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kfac2l.optim.registry import Optimizer


@dataclass(frozen=True)
class Task:
    """How a problem's loss and Fisher likelihood are defined (paper section 4, docs/protocol.md)."""

    name: str
    likelihood: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autoencoder: bool


def _bce_mean(out, target):
    return F.binary_cross_entropy_with_logits(out, target.flatten(1))


def _mse_mean(out, target):
    return F.mse_loss(out, target.flatten(1))


TASKS = {
    "classification": Task("classification", "categorical", F.cross_entropy, False),
    "bernoulli_autoencoder": Task("bernoulli_autoencoder", "bernoulli", _bce_mean, True),
    "gaussian_autoencoder": Task("gaussian_autoencoder", "gaussian", _mse_mean, True),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


@contextmanager
def batchnorm_statistics_kept(model: nn.Module):
    """Restore the BatchNorm running statistics on exit: the Fisher pass is a measurement on a
    resampled batch, not a training forward pass, so it must not move them (the model's
    evaluation-mode behaviour stays that of the training forward passes alone)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None] for m in norms]
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved):
            live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
            for b, old in zip(live, buffers):
                b.copy_(old)


def training_step(
    model: nn.Module,
    optimizer: Optimizer,
    task: Task,
    x: torch.Tensor,
    y: torch.Tensor | None,
    fisher_fraction: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fisher pass if due, then the loss, backward, preconditioning and the base step.

    ``generator`` draws the Fisher batch indices and the sampled targets (the global generator
    when None); the runner reseeds it every iteration so that the Fisher batch of an iteration
    does not depend on how many Fisher passes came before (diagnostics, which take one every
    step, then leave the trajectory unchanged, and a resumed run draws the same batches).
    Returns the mini-batch loss as a 0-dim tensor (not synchronised)."""
    target = x if task.autoencoder else y
    if optimizer.needs_curvature():
        size = max(1, int(round(fisher_fraction * x.shape[0])))
        idx = torch.randint(0, x.shape[0], (size,), device=x.device, generator=generator)
        with batchnorm_statistics_kept(model):
            optimizer.update_curvature(model(x[idx]), task.likelihood, generator=generator)
    optimizer.zero_grad()
    loss = task.loss(model(x), target)
    loss.backward()
    optimizer.step()
    return loss.detach()
