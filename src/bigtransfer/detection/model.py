"""RetinaNet with a BiT ResNet-v2 (GroupNorm + Weight Standardization) backbone and an FPN.

torchvision supplies RetinaNet (heads, anchors, focal loss with alpha 0.25 and gamma 2, box
coding, NMS) and the feature pyramid; this module supplies only the BiT body as the feature
extractor. C3, C4 and C5 are the outputs of stages 2, 3 and 4 (strides 8, 16, 32); C5 goes
through the body's final GroupNorm + ReLU, as the classifier sees it (ResNet-v2 stages end in
a pre-activation sum). The pyramid adds P6 and P7, as RetinaNet does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from ..models.factory import create_model, model_source
from ..models.resnetv2 import ResNetV2

FPN_CHANNELS = 256


class BiTPyramid(nn.Module):
    """BiT body -> {C3, C4, C5} -> FPN -> P3..P7 (what torchvision's RetinaNet calls a backbone)."""

    def __init__(self, body: ResNetV2, channels: int = FPN_CHANNELS):
        super().__init__()
        self.root, self.stages, self.norm = body.root, body.stages, body.norm
        widths = [stage[-1].conv3.out_channels for stage in body.stages]  # 256w, 512w, 1024w, 2048w
        self.fpn = FeaturePyramidNetwork(widths[1:], channels, extra_blocks=LastLevelP6P7(channels, channels))
        self.out_channels = channels
        self.body_config = {"arch": body.config.arch.name, "norm": body.config.norm, "groups": body.config.groups}

    def forward(self, x: torch.Tensor) -> OrderedDict:
        x = self.stages[0](self.root(x))
        c3 = self.stages[1](x)
        c4 = self.stages[2](c3)
        c5 = torch.relu(self.norm(self.stages[3](c4)))
        return self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)]))


def build_retinanet(model: str, num_classes: int, *, min_size: int = 1024, max_size: int = 1024,
                    score_thresh: float = 0.05, norm: str = "gn_ws", groups: int = 32,
                    fpn_channels: int = FPN_CHANNELS) -> RetinaNet:
    """RetinaNet for `num_classes` objects on the body of `model` (a released name, a run, a weights
    file with its pre-trained weights, or an architecture name for a randomly initialised body,
    with `norm`/`groups`). `fpn_channels`: 256 as in RetinaNet; fewer for quick experiments."""
    name, weights = model_source(model, None)
    body = create_model(name, weights=weights) if weights else create_model(name, norm=norm, groups=groups)
    # BiT models take pixels in [-1, 1]: torchvision's transform scales [0, 1] inputs with these.
    return RetinaNet(BiTPyramid(body, fpn_channels), num_classes, min_size=min_size, max_size=max_size,
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], score_thresh=score_thresh)
