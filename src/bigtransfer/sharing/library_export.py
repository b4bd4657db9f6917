"""Handing a model to timm and transformers users: a timm state dict, a transformers folder.

    timm:          one `.safetensors` that
                   timm.create_model("resnetv2_50x1_bit", pretrained=True, num_classes=K,
                                     pretrained_cfg_overlay=dict(file=PATH, num_classes=K))
                   loads (the overlay's num_classes too: without it timm drops a head whose size
                   differs from its registry's and leaves a random one).
    transformers:  a folder with config.json (id2label from our class names), model.safetensors and
                   preprocessor_config.json, for BitForImageClassification.from_pretrained(FOLDER).

Both files carry our class names, resolution and provenance in their safetensors metadata, so
bigtransfer reads them back whole. After writing, the library itself (when installed) loads the
result and must report no missing or unexpected keys and give our logits.

Their weight standardisation uses eps 1e-8; ours, like the authors', 1e-10. A model that came from
their files already has theirs and exports as it is. Any other has every standardised kernel scaled
by sqrt(1e-8 / its eps) (10 for 1e-10): standardisation ignores a kernel's scale but for eps, so
their model then computes exactly ours (see interop.eps_matched). The kernels a timm or
transformers user then fine-tunes are 10x larger than ours were, as if they had been trained with
their eps; the function is the same.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from .. import rundir
from ..atomic import write_json, write_safetensors
from ..errors import BigTransferError
from ..inference.predictor import DEFAULT_RESOLUTION
from ..models import checkpoint, create_model, interop
from ..models.factory import resolve_weights
from ..models.foreign_config import (
    CONFIG_NAME,
    PREPROCESSOR_NAME,
    WEIGHTS_NAME,
    timm_model_name,
    transformers_config,
    transformers_preprocessor,
)
from ..models.resnetv2 import FOREIGN_WS_EPS, ModelConfig, ResNetV2, StdConv2d
from ..version import __version__

TIMM_LAYOUT = interop.Layout(interop.TIMM)
TRANSFORMERS_LAYOUT = interop.Layout(interop.TRANSFORMERS, "bit.")
TRANSFORMERS_FILES = (CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME)
CHECK_TOLERANCE = 1e-4  # relative to the largest logit: what reading their files must meet too
CHECK_SIZE = 64  # input side of the check: any size BiT takes computes the same function


class Source:
    """A model to export, with what travels with it (class names, resolution, where it came from)."""

    def __init__(self, spec: str | Path, resolution: int | None = None):
        self.path = resolve_weights(spec)
        meta = checkpoint.read_metadata(self.path)
        if meta["num_classes"] is None:
            raise BigTransferError(f"{self.path}: the file has no head; timm and transformers exports are classifiers")
        self.model: ResNetV2 = create_model(meta["architecture"], weights=self.path).eval()
        if self.model.config.norm != "gn_ws":
            raise BigTransferError(f"{self.path}: a norm={self.model.config.norm} model; timm's and transformers' "
                                   f"BiT are GroupNorm + Weight Standardization (gn_ws) only")
        self.class_names: list[str] | None = meta.get("class_names")
        self.resolution: int | None = resolution or meta.get("resolution")
        self.provenance = {"source": str(self.path), "source_format": meta["format"],
                           "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "bigtransfer": __version__, "source_ws_eps": self.model.config.ws_eps,
                           "kernel_scale": (FOREIGN_WS_EPS / self.model.config.ws_eps) ** 0.5}

    def library_state(self, layout: interop.Layout) -> dict[str, torch.Tensor]:
        """The state dict under the library's names, kernels matched to its eps (see the module's notes)."""
        kernels = {f"{name}.weight" for name, m in self.model.named_modules() if isinstance(m, StdConv2d)}
        state = interop.eps_matched(self.model.state_dict(), kernels, self.model.config.ws_eps, FOREIGN_WS_EPS)
        return interop.from_ours(state, layout)

    @property
    def metadata(self) -> dict[str, str]:
        """safetensors metadata: what the libraries expect, plus our block (see checkpoint.BIGTRANSFER_KEY)."""
        block = {"class_names": self.class_names, "resolution": self.resolution, "provenance": self.provenance}
        return {"format": "pt", checkpoint.BIGTRANSFER_KEY: json.dumps(block)}


# --------------------------------------------------------------------------- writing
def write_timm_file(source: Source, path: Path) -> Path:
    """The model as a timm state dict in `path`, atomically."""
    return write_safetensors(path, source.library_state(TIMM_LAYOUT), source.metadata, what="timm weights file")


def write_transformers_folder(source: Source, folder: Path) -> list[Path]:
    """config.json, model.safetensors and preprocessor_config.json in `folder` (claimed by the caller)."""
    model = source.model
    weights = write_safetensors(folder / WEIGHTS_NAME, source.library_state(TRANSFORMERS_LAYOUT), source.metadata,
                                what="transformers weights file")
    config = transformers_config(model.config.arch, model.config.num_classes, source.class_names,
                                 model.config.groups)
    written = [weights, write_json(folder / CONFIG_NAME, config, what="transformers config")]
    resolution = source.resolution or DEFAULT_RESOLUTION
    written.append(write_json(folder / PREPROCESSOR_NAME, transformers_preprocessor(resolution),
                              what="transformers preprocessor config"))
    return written


# --------------------------------------------------------------------------- exports
def export_timm(spec: str | Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
                check: bool = True) -> dict:
    """Write `spec` as a timm BiT state dict to `out` (.safetensors); check it with timm if installed."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise BigTransferError(f"--out {out}: a timm export is one .safetensors file; name it *.safetensors")
    rundir.check_new_file(out, overwrite=overwrite)
    source = Source(spec, resolution)
    write_timm_file(source, out)
    report = _report(source, out, "timm")
    if check:
        report.update(compare_with_library(source, lambda: load_with_timm(out, source.model.config), "timm"))
    return report


def export_transformers(spec: str | Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
                        check: bool = True) -> dict:
    """Write `spec` as a transformers BitForImageClassification folder; check it with transformers."""
    out = Path(out)
    if rundir.check_claim(out, "export-transformers") and not overwrite:
        raise BigTransferError(f"--out {out}: holds an earlier export; pass --overwrite to replace it")
    source = Source(spec, resolution)
    with rundir.owned(out, "export-transformers"):
        write_transformers_folder(source, out)
    report = _report(source, out, "transformers")
    if check:
        report.update(compare_with_library(source, lambda: load_with_transformers(out), "transformers"))
    return report


def _report(source: Source, out: Path, fmt: str) -> dict:
    config = source.model.config
    return {"format": fmt, "path": str(out), "architecture": config.arch.name, "num_classes": config.num_classes,
            "class_names": source.class_names, "resolution": source.resolution, "source": str(source.path),
            "timm_name": timm_model_name(config.arch), "ws_eps": {"source": config.ws_eps, fmt: FOREIGN_WS_EPS}}


def compare_with_library(source: Source, load: Callable[[], torch.nn.Module], library: str) -> dict:
    """Load the export with the library's own code and compare logits with ours; {} if not installed."""
    try:
        with library_messages() as messages:
            theirs = load()
    except ImportError:
        return {"check": f"not checked: {library} is not installed (pip install 'bigtransfer[interop]')"}
    complaints = [m for m in messages if _about_keys(m)]
    if complaints:
        raise BigTransferError(f"{library} loaded the export with a complaint: {complaints[0][:300]}")
    x = torch.rand(2, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = source.model(x)
        out = theirs(x)
    out = getattr(out, "logits", out)
    diff = float((out - ours).abs().max())
    relative = diff / max(float(ours.abs().max()), 1e-12)
    if relative > CHECK_TOLERANCE:
        raise BigTransferError(f"{library}'s model of the export disagrees with ours (max relative logit "
                               f"difference {relative:.3g})")
    return {"check": f"loaded by {library}: no missing or unexpected keys", "max_abs_diff": diff,
            "max_relative_diff": relative}


# --------------------------------------------------------------------------- the libraries' own loading
def load_with_timm(path: Path, config: ModelConfig) -> torch.nn.Module:
    """The export as timm builds it: by its registered name with pretrained_cfg_overlay, or (for
    architectures timm does not register) its ResNetV2 class set up as its BiT models are."""
    import timm

    name = timm_model_name(config.arch)
    classes = config.num_classes
    if name is not None:
        return timm.create_model(name, pretrained=True, num_classes=classes,
                                 pretrained_cfg_overlay={"file": str(path), "num_classes": classes}).eval()
    from safetensors.torch import load_file
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2 as TimmResNetV2

    model = TimmResNetV2(layers=list(config.arch.units), width_factor=config.arch.width, stem_type="fixed",
                         conv_layer=partial(StdConv2d, eps=FOREIGN_WS_EPS), num_classes=classes)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def load_with_transformers(folder: Path) -> torch.nn.Module:
    """The export as transformers loads it; any missing, unexpected or mismatched key is an error."""
    from transformers import BitForImageClassification
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = BitForImageClassification.from_pretrained(str(folder), output_loading_info=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise BigTransferError(f"{folder}: transformers reports {problems}")
    return model.eval()


_KEY_WORDS = ("missing", "unexpected", "mismatch", "not initialized", "newly initialized", "not used")


def _about_keys(message: str) -> bool:
    return any(word in message.lower() for word in _KEY_WORDS)


@contextmanager
def library_messages():
    """Collect, instead of printing, the warnings and log records (INFO and up) of timm and
    transformers in the block: timm says it dropped a head only at INFO."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.INFO)
    loggers = [logging.getLogger(name) for name in ("timm", "transformers")]
    saved = [(lg.level, lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        for lg, (level, propagate, handlers) in zip(loggers, saved):
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate
