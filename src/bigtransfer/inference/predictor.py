"""Using a trained model: evaluate on labelled data, predict labels for images, embed images.

A model is named by a run directory (its final.safetensors), a `.safetensors` file, a released
name or an authors' `.npz`. Class names and input resolution come from the file's metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.transforms import eval_transform
from ..errors import BigTransferError
from ..models import checkpoint, zoo
from ..models.factory import create_model, resolve_weights
from . import backends

DEFAULT_RESOLUTION = 224


@dataclass
class LoadedModel:
    model: torch.nn.Module
    class_names: list[str]
    resolution: int
    source: Path


def load_model(spec: str | Path, device: torch.device, resolution: int | None = None) -> LoadedModel:
    path = resolve_weights(spec)
    summary = checkpoint.summarize(path)
    if summary.num_classes is None:
        raise BigTransferError(f"{path}: the file has no head, so it cannot classify; use `bigtransfer embed`")
    meta = checkpoint.read_metadata(path)
    names = meta.get("class_names") or [str(i) for i in range(summary.num_classes)]
    model = create_model(summary.arch.name, weights=path).to(device).eval()
    return LoadedModel(model, names, resolution or meta.get("resolution") or DEFAULT_RESOLUTION, path)


@dataclass
class Predictor:
    """A trained model ready to answer: how to prepare an image, and its forward passes.

    The one path for everything that only runs a model forward (predict, embed, evaluate, serve):
    `backend` (torch or onnxruntime) and `precision` (fp32 or bf16) say how it runs, `choice` why."""

    model: torch.nn.Module  # standardized kernels folded in: for running forward only
    class_names: list[str] | None  # None: the file has no head (features only)
    resolution: int
    source: Path
    device: torch.device
    multi_label: bool  # a sigmoid head: each class's probability on its own
    fingerprint: str | None  # the training run's fingerprint, when the file records one
    backend: str = "torch"
    precision: str = "fp32"
    choice: str = ""  # why this backend and precision (what `auto` decided, or that they were asked for)
    runner: Callable[[torch.Tensor, str], torch.Tensor] | None = None  # (images, "logits"|"features") -> fp32

    def __post_init__(self):
        if self.runner is None:
            self.runner = backends.TorchForward(self.model, self.device, self.precision)

    @property
    def name(self) -> str:
        return self.source.parent.name if self.source.name == "final.safetensors" else self.source.name

    @property
    def num_features(self) -> int:
        return self.model.num_features

    def transform(self):
        """Image (PIL or array) -> the model's input tensor [3, R, R] in [-1, 1]."""
        return eval_transform(self.resolution)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes], fp32 on the CPU or the model's device."""
        return self.runner(images, "logits")

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes, or per-class sigmoids for a multi-label head."""
        logits = self.logits(images)
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logits [N, 2048 * width]."""
        return self.runner(images, "features")

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[dict]]:
        """Each row's `k` most likely classes by name, most likely first."""
        if self.class_names is None:
            raise BigTransferError(f"{self.source}: the file has no head, so it cannot classify")
        k = max(1, min(k, len(self.class_names)))
        p, c = probabilities.topk(k, dim=1)
        return [[{"label": self.class_names[j], "probability": round(float(q), 6)} for q, j in zip(ps, cs)]
                for ps, cs in zip(p.tolist(), c.tolist())]

    def describe(self) -> str:
        """'backend onnxruntime, fp32 (why)': one line for the CLI to print."""
        return f"backend {self.backend}, {self.precision} ({self.choice})"


def load_predictor(spec: str | Path, *, device: str = "auto", resolution: int | None = None,
                   need_head: bool = True, backend: str = "auto", precision: str = "auto") -> Predictor:
    """The model that `spec` names (run directory, weights file, released name) ready to run forward.

    `backend`: torch, onnxruntime (CPU, fp32) or auto; `precision`: fp32, bf16 or auto (bf16 where
    the device computes it natively and the model is heavy enough). See backends.choose."""
    from ..train.memory import forward_flops_per_image

    path = resolve_weights(spec)
    summary = checkpoint.summarize(path)
    if need_head and summary.num_classes is None:
        raise BigTransferError(f"{path}: the file has no head, so it cannot classify; use `bigtransfer embed`")
    if resolution is not None and resolution < 1:
        raise BigTransferError(f"--resolution must be at least 1, got {resolution}")
    meta = checkpoint.read_metadata(path)
    dev = resolve_device(device)
    size = resolution or meta.get("resolution") or DEFAULT_RESOLUTION
    config = summary.model_config(summary.num_classes or 1)
    choice = backends.choose(backend, precision, dev, forward_flops_per_image(config, size))
    model = create_model(summary.arch.name, weights=path, num_classes=summary.num_classes or 1)
    runner = None
    if choice.backend == "onnxruntime":
        try:
            runner = backends.OnnxForward(backends.cached_onnx(model, path, size), size)
        except BigTransferError as err:
            if backend != "auto":
                raise
            choice = backends.Choice("torch", choice.precision, f"ONNX Runtime was the choice, but {err}")
    if runner is not None:
        model = backends.prepare_torch(model, "fp32")
    else:
        model = backends.prepare_torch(model.to(dev), choice.precision)
    names = None
    if summary.num_classes is not None:
        names = meta.get("class_names") or [str(i) for i in range(summary.num_classes)]
    provenance = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    return Predictor(model, names, size, path, dev, _multi_label(spec, summary.num_classes, provenance),
                     provenance.get("fingerprint"), choice.backend, choice.precision, choice.reason, runner)


def _multi_label(spec: str | Path, num_classes: int | None, provenance: dict) -> bool:
    """Was the head trained with a sigmoid? Our pre-training records it; the authors' BiT-M
    upstream files (the 21k head) were trained with one; everything else is softmax."""
    if provenance.get("loss") in ("sigmoid", "softmax"):
        return provenance["loss"] == "sigmoid"
    entry = zoo.lookup(str(spec))
    return entry is not None and entry.group == "upstream" and num_classes == zoo.IMAGENET21K_CLASSES


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; anything else is taken as a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- evaluate
