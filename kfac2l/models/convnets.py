"""Convolutional networks of the paper (section 4.2): Cuda-convnet and torchvision ResNets."""

from __future__ import annotations

from torch import nn


def cuda_convnet(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """The authors' Cuda-convnet (natural-gradients@97105b6 apps/mlp_cnn/models.py:351-374), smaller
    than Grosse & Martens (2016)'s original:
    conv3x3(3->32), ReLU, maxpool3, BN; conv3x3(32->32), ReLU, maxpool3, BN; conv2x2(32->64),
    ReLU; linear(64->10); no padding, so 32 -> 30 -> 10 -> 8 -> 2 -> 1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(3), nn.BatchNorm2d(32),
        nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(3), nn.BatchNorm2d(32),
        nn.Conv2d(32, 64, 2), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, num_classes),
    )


def resnet(depth: int, num_classes: int, stem: str = "imagenet") -> nn.Module:
    """torchvision ResNet18/34 trained from scratch. ``stem='imagenet'`` keeps the 7x7 stride-2
    convolution and max-pool (what the authors used on 32x32 images, natural-gradients@97105b6
    apps/mlp_cnn/models.py:404-416); ``'cifar'`` replaces them by
    a 3x3 stride-1 convolution and no pooling."""
    import torchvision  # here, not at module level: it costs seconds (torch._dynamo) and only ResNets need it

    builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34}
    if depth not in builders:
        raise ValueError(f"resnet depth={depth!r} is not valid; choose one of {sorted(builders)}")
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem={stem!r} is not valid; choose one of ('imagenet', 'cifar')")
    model = builders[depth](weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
