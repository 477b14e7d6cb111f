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


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class CifarResNet18(nn.Module):
    """ResNet18's layout (four stages of two basic blocks, strides 1, 2, 2, 2) with lemniscate's
    CIFAR stem (a 3x3 stride-1 first conv, no max-pool), at base width `width`: 64 is ResNet18
    itself (0.56 G multiply-adds per 32x32 image); the default 16 needs 1/16 of that, which a CPU
    trains on all of CIFAR-10 in minutes per epoch."""

    def __init__(self, in_channels: int = 3, width: int = 16):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c_in = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            c_out = width << stage
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = c_in

    def forward(self, x):
        return self.body(x)


# The small nets (written here, sized by --width), and their default --width.
SMALL_NETS = {"small-cnn": (SmallCNN, 64), "cnn4": (CNN4, 32), "cifar-resnet18": (CifarResNet18, 16)}


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
    default 64), "cnn4" (width, width, 2 x width, 4 x width; default 32), "cifar-resnet18"
    (ResNet18 with the CIFAR stem at base width `width`; default 16), or the name of any
    torchvision classifier (resnet18, resnet50, ...)."""
    if arch in SMALL_NETS:
        cls, default_width = SMALL_NETS[arch]
        backbone = cls(in_channels, default_width if width is None else width)
        return Encoder(backbone, backbone.out_features, low_dim, arch)
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown --arch {arch!r}: use small-cnn, cnn4, cifar-resnet18 or a torchvision classifier such as "
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
