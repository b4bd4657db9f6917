"""Randomly initialised BiT models built by timm's and transformers' own code (nothing downloaded).

Their kernels keep the library's random init; every GroupNorm scale and shift and the head are
perturbed with a seeded generator, so no norm is the identity and a mistake in any mapping shows
in the logits.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from functools import partial

import pytest
import torch

# (units, width) of the released architectures, and one small member of the family for fast tests.
RELEASED = {"R50x1": ((3, 4, 6, 3), 1), "R50x3": ((3, 4, 6, 3), 3), "R101x1": ((3, 4, 23, 3), 1),
            "R101x3": ((3, 4, 23, 3), 3), "R152x2": ((3, 8, 36, 3), 2), "R152x4": ((3, 8, 36, 3), 4)}
LARGE = ("R50x3", "R101x1", "R101x3", "R152x2", "R152x4")  # 44M to 936M parameters: marked slow


def size_marks(arch: str) -> list:
    """The marks a test of one large released architecture carries: slow, and one_at_a_time (it
    holds several GB at once, R152x4's near 19 GB: `make test` runs these in one process, one
    after another, once the rest of the suite is done)."""
    return [pytest.mark.slow, pytest.mark.one_at_a_time] if arch in LARGE else []


def released_params():
    """pytest parameters over the released architectures, the large ones marked slow."""
    return [pytest.param(a, marks=size_marks(a)) for a in RELEASED]


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "head" in name or "classifier" in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def timm_model(units, width, num_classes: int, seed: int = 0):
    """timm's BiT: its registered model for a released architecture, else its ResNetV2 built as BiT."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'bigtransfer[interop]')")
    torch.manual_seed(seed)
    name = next((f"resnetv2_{a[1:]}_bit" for a, spec in RELEASED.items() if spec == (tuple(units), width)), None)
    if name is not None:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    else:
        from timm.layers import StdConv2d
        from timm.models.resnetv2 import ResNetV2

        model = ResNetV2(layers=list(units), width_factor=width, stem_type="fixed", num_classes=num_classes,
                         conv_layer=partial(StdConv2d, eps=1e-8))
    return perturb(model, seed)


def transformers_config(units, width, num_classes: int, **overrides):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                                              "(pip install 'bigtransfer[interop]')")
    c0 = int(64 * width)
    return transformers.BitConfig(num_labels=num_classes, depths=list(units), embedding_size=c0,
                                  hidden_sizes=[4 * c0 * 2**i for i in range(4)], **overrides)


def transformers_model(units, width, num_classes: int, seed: int = 0, headless: bool = False, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = transformers_config(units, width, num_classes, **overrides)
    cls = transformers.BitModel if headless else transformers.BitForImageClassification
    return perturb(cls(config), seed)


def images(size: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@contextmanager
def load_messages():
    """Every warning and log record (at INFO and above, transformers' and timm's included) in the block."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("timm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def key_complaints(messages: list[str]) -> list[str]:
    """The messages that talk about missing, unexpected or mismatched keys."""
    words = ("missing", "unexpected", "mismatch", "not initialized", "newly initialized", "not used")
    return [m for m in messages if any(w in m.lower() for w in words)]
