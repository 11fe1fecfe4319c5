"""CIFAR ResNet-18 and ResNet-50 with auxiliary heads after their first three stages.

``head_layout: fixed`` (default): one auxiliary head of the shared contract (GAP + bias-free Linear(C -> K+1)) after
layer1, layer2 and layer3. ``head_layout: historic``: the reference's research code (SPEC 2.3,
``99789f2:models/ResNet.py``), with :class:`~.base.ScalerAuxHead` heads (Linear(C -> K, bias) + a separate
Linear(C -> 1, bias) scaler, temperature sigmoid(alpha) + eps):

* ResNet-18: all three heads read the first BasicBlock's output (layer1[0], 64 channels), eps = 0.1, 0.01, 0.001;
* ResNet-50: the heads read layer1, layer2, layer3 (256/512/1024 channels), eps = 0.5, and the final head has a
  scaler too (``final_scaler``, Linear(2048 -> 1, bias), eps = 0.5): with the scaler on, the final logits are divided
  by it in training as well.

Default loss settings (SPEC "Decisions"): ResNet-18 aux weight 0.01, KD weight 0.1, scaler off; ResNet-50 aux 1, KD 1,
scaler on (the reference's mode 10051; mode 10050 is the same with ``use_scaler: false``).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import AuxHead, HeadLayout, MultiHeadNet, Scaler, ScalerAuxHead, batch_norm, check_head_layout
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


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision's ResNet v1.5) -> 1x1 expanding x4, projection shortcut on change."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = norm(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), norm(out_planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(MultiHeadNet):
    """3x3 stem (no max-pool), four stages of ``block`` (64/128/256/512 planes, strides 1/2/2/2), GAP, final Linear
    with bias; auxiliary heads after layer1, layer2, layer3 (``fixed``) or as the subclass's historic layout."""

    def __init__(self, block, num_blocks: tuple[int, int, int, int], num_classes: int, in_channels: int,
                 track_running_stats: bool, scale_aux: bool, head_layout: str):
        super().__init__(num_classes, scale_aux)
        self.head_layout = check_head_layout(head_layout)
        norm = batch_norm(track_running_stats)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = norm(64)
        stages, in_planes = [], 64
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks):
            blocks = []
            for s in [stride] + [1] * (count - 1):
                blocks.append(block(in_planes, planes, s, norm))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        #: channels of layer1..layer4's outputs
        self.stage_channels = tuple(p * block.expansion for p in (64, 128, 256, 512))
        self.classifier = nn.Linear(self.stage_channels[3], num_classes, bias=True)
        if head_layout == "fixed":
            self.aux_heads = nn.ModuleList(AuxHead(c, num_classes) for c in self.stage_channels[:3])
        else:
            self.build_historic_heads(num_classes)

    def build_historic_heads(self, num_classes: int) -> None:
        raise NotImplementedError

    @property
    def reads_first_block(self) -> bool:
        """Whether the auxiliary heads read layer1's first block (the historic ResNet-18) instead of the stages."""
        return False

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.reads_first_block:  # the reference's outs[0] for every head
            first = self.layer1[0](x)
            o1 = self.layer1[1:](first)
        else:
            o1 = self.layer1(x)
        o2 = self.layer2(o1)
        o3 = self.layer3(o2)
        o4 = self.layer4(o3)
        return o4.mean(dim=(2, 3)), [first] * len(self.aux_heads) if self.reads_first_block else [o1, o2, o3]


@register_model("resnet18", default_loss={"aux_weight": 0.01, "kd_weight": 0.1, "use_scaler": False},
                description="CIFAR ResNet-18, aux heads after layer1/layer2/layer3")
class ResNet18Cifar(CifarResNet):
    #: the historic heads' temperature offsets: sigmoid(alpha) + eps
    HISTORIC_EPS = (0.1, 0.01, 0.001)

    def __init__(self, num_classes: int = 100, in_channels: int = 3, track_running_stats: bool = True,
                 scale_aux: bool = True, head_layout: HeadLayout = "fixed"):
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, track_running_stats, scale_aux,
                         head_layout)

    def build_historic_heads(self, num_classes: int) -> None:
        self.aux_heads = nn.ModuleList(ScalerAuxHead(64, num_classes, eps) for eps in self.HISTORIC_EPS)

    @property
    def reads_first_block(self) -> bool:
        return self.head_layout == "historic"


@register_model("resnet50", default_loss={"aux_weight": 1.0, "kd_weight": 1.0, "use_scaler": True},
                description="CIFAR ResNet-50 (Bottleneck [3,4,6,3]), aux heads after layer1/layer2/layer3 "
                            "(256/512/1024 channels)")
class ResNet50Cifar(CifarResNet):
    #: the historic scalers' offset (aux heads and final head): sigmoid(alpha) + 0.5
    HISTORIC_EPS = 0.5

    def __init__(self, num_classes: int = 100, in_channels: int = 3, track_running_stats: bool = True,
                 scale_aux: bool = True, head_layout: HeadLayout = "fixed"):
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, track_running_stats, scale_aux,
                         head_layout)

    def build_historic_heads(self, num_classes: int) -> None:
        self.aux_heads = nn.ModuleList(ScalerAuxHead(c, num_classes, self.HISTORIC_EPS)
                                       for c in self.stage_channels[:3])
        self.final_scaler = Scaler(self.stage_channels[3], self.HISTORIC_EPS)
