"""Predictive distributions p(y | z) of eq. (2.11) and the sampled negative log-likelihood.

The Fisher is F = (1/B) sum_b grad l_b grad l_b^T with l_b = -log p(y_b | f(x_b)) the negative
log-likelihood of sample b, *summed over its outputs* (all pixels of an auto-encoder output), and
y_b drawn from the model (2.15). A training loss averaged over the d outputs (the paper's
pixel-mean binary cross-entropy and squared error) has gradient (1/d) * (1/B) sum_b grad l_b: its
natural-gradient step is the step for the summed loss divided by d, which a learning-rate grid
absorbs. We keep F unscaled (the paper's definition) and document it rather than rescale it.

  categorical  z = logits, y ~ Categorical(softmax(z)),  l = cross-entropy
  bernoulli    z = logits (sigmoid output), y ~ Bernoulli(sigmoid(z)),  l = sum of BCE
  gaussian     z = mean, y ~ N(z, I),  l = 0.5 ||y - z||^2 (2.12a)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


def sample_targets(output: torch.Tensor, likelihood: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution at ``output`` (no gradient)."""
    z = output.detach()
    if likelihood == "categorical":
        probs = torch.softmax(z.float(), dim=1)
        if probs.dim() > 2:  # (B, C, ...) -> sample per location
            flat = probs.movedim(1, -1).reshape(-1, probs.shape[1])
            draws = torch.multinomial(flat, 1, generator=generator).reshape(probs.movedim(1, -1).shape[:-1])
            return draws
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.sigmoid(z), generator=generator)
    if likelihood == "gaussian":
        return z + torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    raise ValueError(f"likelihood={likelihood!r} is not valid; choose one of {LIKELIHOODS}")


def summed_nll(output: torch.Tensor, targets: torch.Tensor, likelihood: str) -> torch.Tensor:
    """sum_b l_b: the negative log-likelihood summed over samples and outputs (constants dropped)."""
    if likelihood == "categorical":
        return F.cross_entropy(output, targets, reduction="sum")
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, targets.to(output.dtype), reduction="sum")
    if likelihood == "gaussian":
        return 0.5 * (output - targets).pow(2).sum()
    raise ValueError(f"likelihood={likelihood!r} is not valid; choose one of {LIKELIHOODS}")
