"""The 4-conv CNN ("4convNet", CIFAR-10; SPEC section 2.2) with auxiliary heads after conv0, conv1, conv2.

The reference attached all three auxiliary heads to conv0 (a bug); fl-sd attaches them where the paper intends
(``head_layout: fixed``, the default). ``head_layout: historic`` reproduces the reference: all three read conv0.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import AuxHead, HeadLayout, MultiHeadNet, batch_norm, check_head_layout
from .registry import register_model


class ConvBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, norm):
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True), norm(out_ch), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


@register_model("cnn4", default_loss={"aux_weight": 0.01, "kd_weight": 1.0},
                description="4-conv CNN (64 channels), aux heads after conv0/conv1/conv2 (MHMD's CIFAR-10 model)")
class CNNCifar(MultiHeadNet):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: int = 64,
                 track_running_stats: bool = True, scale_aux: bool = True, head_layout: HeadLayout = "fixed"):
        super().__init__(num_classes, scale_aux)
        self.head_layout = check_head_layout(head_layout)
        if input_size < 16:
            raise ValueError(f"cnn4 needs input_size >= 16 (four 2x2 max-pools), got {input_size}")
        norm = batch_norm(track_running_stats)
        self.conv0 = ConvBlock(in_channels, width, norm)
        self.conv1 = ConvBlock(width, width, norm)
        self.conv2 = ConvBlock(width, width, norm)
        self.conv3 = ConvBlock(width, width, norm)
        side = input_size
        for _ in range(4):
            side //= 2
        self.classifier = nn.Linear(width * side * side, num_classes, bias=True)
        self.aux_heads = nn.ModuleList(AuxHead(width, num_classes) for _ in range(3))

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        o0 = self.conv0(x)
        o1 = self.conv1(o0)
        o2 = self.conv2(o1)
        o3 = self.conv3(o2)
        return o3.flatten(1), [o0] * 3 if self.head_layout == "historic" else [o0, o1, o2]
