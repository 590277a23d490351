"""Learning-rate schedules of a run (``experiment.scheduler``; none by default).

  plateau  torch's ReduceLROnPlateau on an epoch metric (``monitor``: test_loss or train_loss),
           stepped once per epoch after the evaluation: the schedule of Tselepidis, Kohler &
           Orvieto's train_toy.py (factor 0.1, patience 10, min_lr 1e-7, on the test loss).

The base optimiser's learning rate is what changes; the KL clip reads it every step
(``kfac2l.optim.Optimizer.step``), as their code's clip reads its param group's lr.
"""

from __future__ import annotations

import torch

SCHEDULERS = ("plateau",)
MONITORS = ("test_loss", "train_loss")
DEFAULTS = {"name": "plateau", "monitor": "test_loss", "factor": 0.1, "patience": 10, "min_lr": 1e-7}


def scheduler_problem(spec: dict | None) -> str | None:
    """One line saying what is wrong with ``spec`` and the valid values, or None (also for no spec)."""
    if spec is None:
        return None
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        return f"experiment.scheduler has unknown key(s) {unknown}; valid: {', '.join(DEFAULTS)}"
    spec = {**DEFAULTS, **spec}
    if spec["name"] not in SCHEDULERS:
        return f"experiment.scheduler.name={spec['name']!r}; valid: {', '.join(SCHEDULERS)} (or scheduler: null)"
    if spec["monitor"] not in MONITORS:
        return f"experiment.scheduler.monitor={spec['monitor']!r}; valid: {', '.join(MONITORS)}"
    factor, patience, min_lr = spec["factor"], spec["patience"], spec["min_lr"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        return f"experiment.scheduler.factor={factor!r}; valid: a number in (0, 1)"
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        return f"experiment.scheduler.patience={patience!r}; valid: an integer >= 0"
    if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or min_lr < 0:
        return f"experiment.scheduler.min_lr={min_lr!r}; valid: a number >= 0"
    return None


class EpochScheduler:
    """A schedule stepped once per epoch on one of the epoch's metrics."""

    def __init__(self, spec: dict, optimizer: torch.optim.Optimizer):
        spec = {**DEFAULTS, **spec}
        self.monitor = spec["monitor"]
        self.torch = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=float(spec["factor"]), patience=int(spec["patience"]),
            min_lr=float(spec["min_lr"]))

    def step(self, metrics: dict) -> None:
        """After an epoch: ``metrics`` holds test_loss and train_loss (floats)."""
        self.torch.step(metrics[self.monitor])

    def state_dict(self) -> dict:
        return self.torch.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.torch.load_state_dict(state)


def make_scheduler(spec: dict | None, optimizer: torch.optim.Optimizer) -> EpochScheduler | None:
    """The schedule of ``spec`` (validated by ``scheduler_problem``) on ``optimizer``, or None."""
    if spec is None:
        return None
    problem = scheduler_problem(spec)
    if problem:
        raise ValueError(problem)
    return EpochScheduler(spec, optimizer)
