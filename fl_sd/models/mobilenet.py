"""CIFAR MobileNet-v1 with auxiliary heads after blocks 3, 6 and 9 (SPEC section 2.1)."""
from __future__ import annotations

from torch import Tensor, nn

from .base import AuxHead, MultiHeadNet, batch_norm
from .registry import register_model

#: (out_channels, stride) of the 13 depthwise-separable blocks.
CFG = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]
AUX_AFTER = (3, 6, 9)


class Block(nn.Module):
    """Depthwise 3x3 conv -> BN -> ReLU, then pointwise 1x1 conv -> BN -> ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.bn1 = norm(in_planes)
        self.conv2 = nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False)
        self.bn2 = norm(out_planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


@register_model("mobilenet", default_loss={"aux_weight": 10.0, "kd_weight": 1.0},
                description="CIFAR MobileNet-v1, 13 blocks, aux heads after blocks 3/6/9 (MHMD's CIFAR-100 model)")
class MobileNetCifar(MultiHeadNet):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, track_running_stats: bool = True,
                 final_bias: bool = False, aux_after: tuple[int, ...] = AUX_AFTER, scale_aux: bool = True):
        super().__init__(num_classes, scale_aux)
        norm = batch_norm(track_running_stats)
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False)
        self.bn1 = norm(32)
        self.relu = nn.ReLU(inplace=True)
        blocks, channels, in_planes = [], {}, 32
        for i, spec in enumerate(CFG):
            out_planes, stride = spec if isinstance(spec, tuple) else (spec, 1)
            blocks.append(Block(in_planes, out_planes, stride, norm))
            channels[i] = in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        bad = [i for i in aux_after if not 0 <= i < len(CFG) - 1]
        if bad:
            raise ValueError(f"aux_after indices {bad} out of range 0..{len(CFG) - 2}")
        self.aux_after = tuple(aux_after)
        self.classifier = nn.Linear(1024, num_classes, bias=final_bias)
        self.aux_heads = nn.ModuleList(AuxHead(channels[i], num_classes) for i in self.aux_after)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.relu(self.bn1(self.conv1(x)))
        aux = []
        for i, block in enumerate(self.layers):
            x = block(x)
            if i in self.aux_after:
                aux.append(x)
        return x.mean(dim=(2, 3)), aux
