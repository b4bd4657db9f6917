"""bigtransfer: Big Transfer (BiT) in PyTorch.

The heavy submodules (torch) load on first use, so `bigtransfer --help` starts instantly.
"""

from importlib import import_module

from .errors import BigTransferError
from .version import __version__

_LAZY = {
    "create_model": "bigtransfer.models",
    "ResNetV2": "bigtransfer.models",
    "save_checkpoint": "bigtransfer.models",
    "read_metadata": "bigtransfer.models",
}
_LAZY_MODULES = {
    "hyperrule": "bigtransfer.recipes.hyperrule",  # `from bigtransfer import hyperrule`: the rule as data
}
__all__ = ["BigTransferError", "ResNetV2", "__version__", "create_model", "hyperrule", "read_metadata",
           "save_checkpoint"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _LAZY_MODULES:
        return import_module(_LAZY_MODULES[name])
    raise AttributeError(f"module 'bigtransfer' has no attribute {name!r}")
