"""Model registry: the eight architectures of the paper, and the toy network of Tselepidis et al., by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kfac2l.models.autoencoders import ENCODERS, autoencoder
from kfac2l.models.convnets import cuda_convnet, resnet
from kfac2l.models.linear import deep_linear_a, deep_linear_b, tko_mlp


@dataclass(frozen=True)
class ModelSpec:
    """builder(**options) -> nn.Module; input_shape per sample; outputs: 'reconstruction' or classes."""

    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_outputs: int
    task: str  # "autoencoder" or "classification"


MODELS: dict[str, ModelSpec] = {
    "curves_ae": ModelSpec(lambda: autoencoder(ENCODERS["curves"]), (784,), 784, "autoencoder"),
    "mnist_ae": ModelSpec(lambda: autoencoder(ENCODERS["mnist"]), (784,), 784, "autoencoder"),
    "faces_ae": ModelSpec(lambda: autoencoder(ENCODERS["faces"]), (625,), 625, "autoencoder"),
    "cuda_convnet": ModelSpec(lambda num_classes=10: cuda_convnet(num_classes), (3, 32, 32), 10, "classification"),
    "resnet18": ModelSpec(lambda num_classes=100, stem="imagenet": resnet(18, num_classes, stem), (3, 32, 32), 100,
                          "classification"),
    "resnet34": ModelSpec(lambda num_classes=10, stem="imagenet": resnet(34, num_classes, stem), (3, 32, 32), 10,
                          "classification"),
    "deep_linear_a": ModelSpec(lambda: deep_linear_a(), (784,), 10, "classification"),
    "deep_linear_b": ModelSpec(lambda: deep_linear_b(), (784,), 10, "classification"),
    "tko_mlp": ModelSpec(lambda depth=62: tko_mlp(depth), (10,), 1, "classification"),
}


def init_weights(model: nn.Module, bias: float = 0.01, generator: torch.Generator | None = None) -> None:
    """Xavier-uniform weights and constant biases for every Linear/Conv2d layer (docs/protocol.md),
    drawn in sequence from one generator, so same-shaped layers do *not* start identical."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)


def init_identical(model: nn.Module, seed: int, bias: float = 0.01) -> None:
    """Xavier-uniform weights, each layer drawn from a generator reseeded with ``seed``: layers of
    the same shape start identical (63 of the 64 layers of deep linear A are then one matrix).
    This is what the authors' public code did (natural-gradients@97105b6 apps/mlp_cnn/initializations.py:7-12;
    with seed 0 the weights equal theirs, docs/protocol.md): an ablation, never a default."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight, generator=torch.Generator().manual_seed(seed))
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)


def init_kaiming(model: nn.Module) -> None:
    """Kaiming-uniform weights (fan-in, ReLU gain: U(-sqrt(6 / fan_in), sqrt(6 / fan_in))) and
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) biases for every Linear/Conv2d layer, drawn in module order
    from the global generator: the initialisation of Tselepidis, Kohler & Orvieto's SimpleMLP."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                bound = 1.0 / m.weight[0].numel() ** 0.5
                nn.init.uniform_(m.bias, -bound, bound)


INITS = ("xavier", "default", "identical", "kaiming")


def _construct(name: str, options: dict) -> nn.Module:
    try:
        return MODELS[name].builder(**options)
    except TypeError as err:
        raise ValueError(f"bad option(s) {sorted(options)} for model {name!r}: {err}") from None


def build_model(name: str, init: str = "xavier", seed: int | None = None, **options) -> nn.Module:
    """Build the named model. init: 'xavier' (protocol, one generator for all layers), 'default'
    (PyTorch's), 'identical' (the authors' code: same-shaped layers start identical) or 'kaiming'
    (Tselepidis et al.'s code: the global generator seeded with ``seed``, the model constructed,
    then ``init_kaiming``; their very draws, the global generator's state restored afterwards)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not valid; choose one of {INITS}")
    if init == "kaiming":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed if seed is not None else 0)
            model = _construct(name, options)
            init_kaiming(model)
        return model
    model = _construct(name, options)
    if init == "xavier":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init_weights(model, generator=gen)
    elif init == "identical":
        init_identical(model, seed if seed is not None else 0)
    return model


__all__ = ["INITS", "MODELS", "ModelSpec", "build_model", "init_identical", "init_kaiming", "init_weights"]
