"""Encoders for the driver: a torchvision classifier (resnet18, resnet50, or any by name) whose
classification layer becomes the low-dim linear head, L2-normalised, as in the paper."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """A small conv net for tiny images (8x8 digits, 28x28 Fashion-MNIST): fast on a CPU."""

    def __init__(self, in_channels: int = 1, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_features = 2 * width

    def forward(self, x):
        return self.body(x)


class CNN4(nn.Module):
    """Four 3x3 conv layers with a 2x2 max-pool after the second and the third (28 -> 14 -> 7 for
    Fashion-MNIST), then a global average pool: the last layer sees ~20 pixels, most of a 28x28
    image. SmallCNN's last layer sees ~10 pixels and its features are an average of local
    patches, which loses the garment's silhouette (at random initialisation, and after a few
    epochs of NPID, it scores below raw pixels in kNN); cnn4 costs about as much per image at
    width 32 (15 M multiply-adds)."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_features = 4 * width

    def forward(self, x):
        return self.body(x)


# The small nets for tiny images, and their default --width.
SMALL_NETS = {"small-cnn": (SmallCNN, 64), "cnn4": (CNN4, 32)}


class Encoder(nn.Module):
    """backbone (pooled features) -> linear head (low_dim) -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, feature_dim: int, low_dim: int, arch: str):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, low_dim)
        self.arch = arch

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


def build_encoder(arch: str, low_dim: int = 128, in_channels: int = 3, cifar_stem: bool = False,
                  width: Optional[int] = None) -> Encoder:
    """arch: "small-cnn" (`width` channels in its first two layers, 2 x width in the third;
    default 64), "cnn4" (width, width, 2 x width, 4 x width; default 32), or the name of any
    torchvision classifier (resnet18, resnet50, ...)."""
    if arch in SMALL_NETS:
        cls, default_width = SMALL_NETS[arch]
        backbone = cls(in_channels, default_width if width is None else width)
        return Encoder(backbone, backbone.out_features, low_dim, arch)
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown --arch {arch!r}: use small-cnn, cnn4 or a torchvision classifier such as "
                         "resnet18, resnet50")
    model = torchvision.models.get_model(arch, weights=None)
    if cifar_stem or in_channels != 3:
        conv = getattr(model, "conv1", None)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"--cifar-stem and non-RGB inputs need a ResNet-style conv1; {arch} has none")
        if cifar_stem:  # lemniscate's CIFAR ResNet: 3x3 stride-1 first conv, no max-pool
            model.conv1 = nn.Conv2d(in_channels, conv.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        else:
            model.conv1 = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    head_name, feature_dim = _replace_classifier(model)
    encoder = Encoder(model, feature_dim, low_dim, arch)
    encoder.head_name = head_name
    return encoder


def _replace_classifier(model: nn.Module):
    """Swap the final Linear for Identity (the Encoder owns the head); returns its name, in-dim."""
    for name in ("fc", "classifier", "head", "heads"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            setattr(model, name, nn.Identity())
            return name, module.in_features
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
            last = module[-1]
            module[-1] = nn.Identity()
            return f"{name}.{len(module) - 1}", last.in_features
    raise ValueError(f"cannot find the classification layer of {type(model).__name__}")


def export_state_dict(encoder: Encoder) -> dict:
    """A plain state_dict for the torchvision architecture with num_classes = low_dim: the
    backbone's weights plus the head as its classification layer (load with
    torchvision.models.get_model(arch, num_classes=low_dim) after the same stem changes)."""
    state = {k: v.detach().cpu().clone() for k, v in encoder.backbone.state_dict().items()}
    head_name = getattr(encoder, "head_name", "head")
    for key, value in encoder.head.state_dict().items():
        state[f"{head_name}.{key}"] = value.detach().cpu().clone()
    return state
