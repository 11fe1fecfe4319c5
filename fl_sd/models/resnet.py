"""CIFAR ResNet-18 with auxiliary heads after its first three stages.

The historic reference (SPEC 2.3) attached every auxiliary head to the first block (a bug) and used a separate
scaler layer; fl-sd uses the shared auxiliary-head contract (GAP + bias-free Linear(C -> K+1)) after layer1, layer2
and layer3. The reference trained ResNet-18 with aux weight 0.01, KD weight 0.1 and the scaler off: those are its
default loss settings.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import AuxHead, MultiHeadNet, batch_norm
from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_model("resnet18", default_loss={"aux_weight": 0.01, "kd_weight": 0.1, "use_scaler": False},
                description="CIFAR ResNet-18, aux heads after layer1/layer2/layer3")
class ResNet18Cifar(MultiHeadNet):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, track_running_stats: bool = True,
                 scale_aux: bool = True):
        super().__init__(num_classes, scale_aux)
        norm = batch_norm(track_running_stats)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = norm(64)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, planes, s, norm))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(512, num_classes, bias=True)
        self.aux_heads = nn.ModuleList(AuxHead(c, num_classes) for c in (64, 128, 256))

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        o1 = self.layer1(x)
        o2 = self.layer2(o1)
        o3 = self.layer3(o2)
        o4 = self.layer4(o3)
        return o4.mean(dim=(2, 3)), [o1, o2, o3]
