"""BiT models: the ResNet-v2 GN+WS family, checkpoint I/O and the released-model zoo."""

from .checkpoint import read_metadata, save_checkpoint, summarize
from .factory import create_model
from .resnetv2 import NORMS, RELEASED_ARCHS, ArchSpec, ModelConfig, ResNetV2, StdConv2d, parse_arch

__all__ = [
    "NORMS", "RELEASED_ARCHS", "ArchSpec", "ModelConfig", "ResNetV2", "StdConv2d",
    "create_model", "parse_arch", "read_metadata", "save_checkpoint", "summarize",
]
