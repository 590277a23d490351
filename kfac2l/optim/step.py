"""One training step with the paper's curvature schedule (shared by the runner and the bench).

When the optimiser needs curvature this step, the Fisher statistics come from a second
forward/backward on ``fisher_fraction * B`` samples drawn with replacement from the mini-batch
(or, with ``resample=False``, on the mini-batch itself, as Tselepidis et al.'s code), with
targets sampled from the model (docs/protocol.md); it leaves the BatchNorm running statistics
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
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None  # outputs -> labels (accuracy)
    outputs: int | None = None  # network outputs per sample the task fixes (None: one per class)


def _bce_mean(out, target):
    return F.binary_cross_entropy_with_logits(out, target.flatten(1))


def _mse_mean(out, target):
    return F.mse_loss(out, target.flatten(1))


def _argmax(out):
    return out.argmax(1)


def _positive(out):
    """1[sigmoid(logit) > 0.5] as a float label (Tselepidis et al.'s train_toy.py:90)."""
    return (torch.sigmoid(out) > 0.5).to(out.dtype)


TASKS = {
    "classification": Task("classification", "categorical", F.cross_entropy, False, _argmax),
    # one logit per sample, float 0/1 targets of shape (B, 1): BCE with logits, Bernoulli Fisher targets
    "binary_classification": Task("binary_classification", "bernoulli", F.binary_cross_entropy_with_logits, False,
                                  _positive, outputs=1),
    "bernoulli_autoencoder": Task("bernoulli_autoencoder", "bernoulli", _bce_mean, True),
    "gaussian_autoencoder": Task("gaussian_autoencoder", "gaussian", _mse_mean, True),
}


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype for ``training_step``, GradScaler for ``Optimizer.grad_scaler``) of the
    runner's ``precision`` key: float32 (neither), bfloat16 (autocast; its range is float32's, so
    no loss scaling), float16 (autocast and a GradScaler; CUDA only). docs/mixed_precision.md."""
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not valid; choose one of {tuple(PRECISIONS)}")
    if name == "float16" and device.type != "cuda":
        raise ValueError(f"precision='float16' needs a CUDA device, not {str(device)!r}; valid here: float32, bfloat16")
    return PRECISIONS[name], torch.amp.GradScaler(device.type) if name == "float16" else None


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
    autocast: torch.dtype | None = None,
    resample: bool = True,
    reference_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fisher pass if due, then the loss, backward, preconditioning and the base step.

    ``generator`` draws the Fisher batch indices and the sampled targets (the global generator
    when None); the runner reseeds it every iteration so that the Fisher batch of an iteration
    does not depend on how many Fisher passes came before (diagnostics, which take one every
    step, then leave the trajectory unchanged, and a resumed run draws the same batches).
    ``autocast``: run both forward passes under ``torch.autocast`` in this dtype (bfloat16, or
    float16 with ``optimizer.grad_scaler`` set; docs/mixed_precision.md); the loss is taken in
    float32 and the curvature is formed in the parameters' dtype.
    ``resample=False``: the Fisher pass runs on the mini-batch itself (``fisher_fraction`` unused;
    the statistics of the training batch, as Tselepidis et al.'s train_toy.py:64-84).
    With ``optimizer.reference_fisher_batch`` set, a third forward/backward, on that many rows drawn
    with replacement from the mini-batch by ``reference_generator`` (indices and sampled targets; the
    global generator when None), gives the exact reference its own Fisher batch
    (``update_reference``); the Fisher batch and the step do not depend on it.
    Returns the mini-batch loss as a 0-dim tensor (not synchronised)."""
    target = x if task.autoencoder else y
    forward = autocast_forward(model, x.device.type, autocast)
    if optimizer.needs_curvature():
        with batchnorm_statistics_kept(model):
            optimizer.update_curvature(forward(fisher_inputs(x, fisher_fraction, generator, resample)), task.likelihood,
                                       generator=generator)
            if optimizer.reference_fisher_batch is not None:
                rows = sample_rows(x, optimizer.reference_fisher_batch, reference_generator)
                optimizer.update_reference(forward(rows), task.likelihood, generator=reference_generator)
    optimizer.zero_grad()
    loss = task.loss(forward(x), target)
    scaler = optimizer.grad_scaler
    (loss if scaler is None else scaler.scale(loss)).backward()
    optimizer.step()
    return loss.detach()


def fisher_inputs(x: torch.Tensor, fisher_fraction: float, generator: torch.Generator | None,
                  resample: bool = True) -> torch.Tensor:
    """The inputs of the Fisher batch: ``fisher_fraction * B`` rows drawn with replacement from the
    mini-batch x (by ``generator``), or x itself with ``resample=False``."""
    if not resample:
        return x
    return sample_rows(x, max(1, int(round(fisher_fraction * x.shape[0]))), generator)


def sample_rows(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """``size`` rows of x drawn uniformly with replacement by ``generator``."""
    return x[torch.randint(0, x.shape[0], (size,), device=x.device, generator=generator)]


def autocast_forward(model: nn.Module, device_type: str, autocast: torch.dtype | None):
    """model(x), or model(x) under ``torch.autocast(device_type, autocast)`` returned in float32."""
    if autocast is None:
        return model

    def forward(x):
        with torch.autocast(device_type, dtype=autocast):
            out = model(x)
        return out.float()

    return forward
