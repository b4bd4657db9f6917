"""bigtransfer: Big Transfer (BiT) in PyTorch.

The heavy submodules (torch) load on first use, so `bigtransfer --help` starts instantly.
"""

from importlib import import_module

from .errors import BigTransferError

__version__ = "0.1.0"

_LAZY = {
    "create_model": "bigtransfer.models",
    "ResNetV2": "bigtransfer.models",
    "save_checkpoint": "bigtransfer.models",
    "read_metadata": "bigtransfer.models",
}
__all__ = ["BigTransferError", "ResNetV2", "__version__", "create_model", "read_metadata", "save_checkpoint"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bigtransfer' has no attribute {name!r}")
