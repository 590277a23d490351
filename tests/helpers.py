"""Tiny float64 problems shared by the tests (dense references live in kfac2l.dense)."""

from __future__ import annotations

import torch
from torch import nn

import kfac2l.dense as dense
from kfac2l.curvature.likelihood import sample_targets, summed_nll


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 3)
    ).double()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, bias=False, dilation=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()


def tiny_inputs(kind: str, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 5) if kind == "mlp" else (batch, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64)


class Problem:
    """A tiny network, a Fisher batch with fixed sampled targets and a training gradient."""

    def __init__(self, kind: str = "mlp", batch: int = 6, likelihood: str = "categorical", seed: int = 0):
        self.model = tiny_mlp(seed) if kind == "mlp" else tiny_cnn(seed)
        self.x = tiny_inputs(kind, batch, seed + 1)
        self.likelihood = likelihood
        gen = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            out = self.model(self.x)
        self.targets = sample_targets(out, likelihood, gen)
        self.labels = sample_targets(out, likelihood, torch.Generator().manual_seed(seed + 3))

    def run(self, pre) -> torch.Tensor:
        """update_curvature, backward of the mean training loss, pre.step(); returns flat step."""
        self.model.zero_grad()
        out = self.model(self.x)
        pre.update_curvature(out, self.likelihood, targets=self.targets)
        loss = summed_nll(out, self.labels, self.likelihood) / self.x.shape[0]
        loss.backward()
        self.grad = dense.flat_grad(self.model).clone()
        pre.step()
        return dense.flat_grad(self.model)

    def dense(self, damping: float, mode: str = "pi"):
        """(grad, F_bullet, F_bullet KFAC, layer data) by explicit construction."""
        self.model.zero_grad()
        out = self.model(self.x)
        (summed_nll(out, self.labels, self.likelihood) / self.x.shape[0]).backward()
        grad = dense.flat_grad(self.model).clone()
        self.model.zero_grad()
        J = dense.per_sample_jacobian(self.model, self.x, self.targets, self.likelihood)
        fisher = J.T @ J / J.shape[0] + damping * torch.eye(J.shape[1], dtype=J.dtype)
        data = dense.layer_data(self.model, self.x, self.targets, self.likelihood)
        kfac = dense.block_diag_kfac(data, damping, mode)
        return grad, fisher, kfac, data
