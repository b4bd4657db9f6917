"""Using a trained model: evaluate on labelled data, predict labels for images, embed images.

A model is named by a run directory (its final.safetensors), a `.safetensors` file, a released
name or an authors' `.npz`. Class names and input resolution come from the file's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import rundir, runtime
from .atomic import csv_writer, write_csv, write_figure, write_text, write_together
from .data.dataset import TransformedImages
from .data.images import IMAGE_ERRORS, load_rgb
from .data.sources import IMAGE_EXTENSIONS, ImageSet, load_source
from .data.transforms import eval_transform
from .errors import BigTransferError
from .evaluate.metrics import ClassificationMeter
from .models import checkpoint, zoo
from .models.factory import create_model, resolve_weights
from .safe_text import path_text, plot_text, quoted

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
            self.runner = runtime.TorchForward(self.model, self.device, self.precision)

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
    the device computes it natively and the model is heavy enough). See runtime.choose."""
    from .train.memory import forward_flops_per_image

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
    choice = runtime.choose(backend, precision, dev, forward_flops_per_image(config, size))
    model = create_model(summary.arch.name, weights=path, num_classes=summary.num_classes or 1)
    runner = None
    if choice.backend == "onnxruntime":
        try:
            runner = runtime.OnnxForward(runtime.cached_onnx(model, path, size), size)
        except BigTransferError as err:
            if backend != "auto":
                raise
            choice = runtime.Choice("torch", choice.precision, f"ONNX Runtime was the choice, but {err}")
    if runner is not None:
        model = runtime.prepare_torch(model, "fp32")
    else:
        model = runtime.prepare_torch(model.to(dev), choice.precision)
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
def evaluate(spec: str, data: str, *, split: str = "test", val_fraction: float | None = None, out: Path | None,
             batch: int = 64, workers: int = 0, device: str = "auto", resolution: int | None = None,
             progress: bool = True, backend: str = "auto", precision: str = "auto") -> dict:
    """Top-1, top-5, loss and per-class accuracy of a model on a labelled split; writes reports to `out`."""
    with rundir.maybe_owned(out, "evaluate"):
        return _evaluate(spec, data, split=split, val_fraction=val_fraction, out=out, batch=batch, workers=workers,
                         device=device, resolution=resolution, progress=progress, backend=backend,
                         precision=precision)


def _evaluate(spec, data, *, split, val_fraction, out, batch, workers, device, resolution, progress, backend,
              precision) -> dict:
    predictor = load_predictor(spec, device=device, resolution=resolution, backend=backend, precision=precision)
    splits = load_source(data, val_fraction=val_fraction, progress=progress)
    images = splits.test if split == "test" else splits.train
    if images is None:
        raise BigTransferError(f"--data {data}: no {split} split")
    images = _align_labels(images, predictor.class_names, data)
    meter = score(predictor, TransformedImages(images, predictor.transform()), batch=batch, workers=workers,
                  progress=progress)
    result = {**meter.result(), "model": str(predictor.source), "data": data, "split": split,
              "resolution": predictor.resolution, "backend": predictor.backend, "precision": predictor.precision,
              "backend_choice": predictor.choice,
              "per_class_accuracy": dict(zip(predictor.class_names, meter.per_class_accuracy().round(6).tolist()))}
    if out is not None:
        write_evaluation(out, result, meter, predictor.class_names)
    return result


def score(predictor: Predictor, dataset, *, batch: int = 64, workers: int = 0,
          progress: bool = False) -> ClassificationMeter:
    """Top-1/top-5/loss/confusion of the predictor over (image tensor, label) pairs."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch, num_workers=workers)
    meter = ClassificationMeter(len(predictor.class_names))
    for images, labels in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
        meter.update(predictor.logits(images).cpu(), labels)
    return meter


def _align_labels(images: ImageSet, model_classes: list[str], data: str) -> ImageSet:
    """Re-index the data's labels into the model's class order, by class name."""
    index = {name: i for i, name in enumerate(model_classes)}
    missing = [c for c in images.classes if c not in index]
    if missing:
        raise BigTransferError(f"--data {data}: class {quoted(missing[0])} is not one of the model's classes")
    mapping = np.array([index[c] for c in images.classes], dtype=np.int64)
    return images.relabeled(model_classes, mapping[images.labels])


def write_evaluation(out: Path, result: dict, meter: ClassificationMeter, class_names: list[str]) -> None:
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    confusion = meter.confusion.numpy()
    write_csv(out / "confusion.csv", ["true \\ predicted", *class_names],
              ([name, *row.tolist()] for name, row in zip(class_names, confusion)))
    write_csv(out / "per_class_accuracy.csv", ["class", "accuracy", "examples"],
              ([name, f"{acc:.6f}", int(n)]
               for name, acc, n in zip(class_names, meter.per_class_accuracy(), confusion.sum(axis=1))))
    plot_confusion(confusion, class_names, out / "confusion.png")


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    size = min(3 + 0.35 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 50:
        labels = [plot_text(name) for name in class_names]
        ax.set_xticks(range(k), labels, rotation=90)
        ax.set_yticks(range(k), labels)
        if k <= 20:
            for (i, j), n in np.ndenumerate(confusion):
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (top-1 {np.trace(confusion) / max(confusion.sum(), 1):.1%})")
    fig.tight_layout()
    try:
        write_figure(path, fig, dpi=100, what="confusion plot")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- predict / embed
def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (recursively) in the named folders, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            files.append(path)
        else:
            raise BigTransferError(f"{item}: no such image file or folder")
    if not files:
        raise BigTransferError(f"no image files found in {', '.join(inputs)}")
    return files


class _Files(Dataset):
    """Decoded image files; unreadable ones come back as None and are reported, not fatal."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return self.transform(load_rgb(self.files[i])), i
        except IMAGE_ERRORS:
            return None, i


def _collate(batch):
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


def _run_files(predictor: Predictor, files, fn, *, batch, workers, progress):
    """Apply `fn(images)` over the files in batches; returns ({index: output row}, unreadable)."""
    from tqdm.auto import tqdm

    loader = DataLoader(_Files(files, predictor.transform()), batch_size=batch, num_workers=workers,
                        collate_fn=_collate)
    rows, unreadable = {}, []
    for images, index, bad in tqdm(loader, desc="images", unit="batch", disable=not progress):
        unreadable.extend(files[i] for i in bad)
        if images is not None:
            for i, row in zip(index, fn(images).cpu()):
                rows[i] = row
    return rows, unreadable


def predict(spec: str, inputs: list[str], *, top_k: int = 5, batch: int = 32, workers: int = 0,
            device: str = "auto", resolution: int | None = None, progress: bool = True, backend: str = "auto",
            precision: str = "auto", predictor: Predictor | None = None) -> tuple[list[dict], list[Path]]:
    """Top-k class names and probabilities for every image; also returns the files that could not be read.
    (`predictor`: one already loaded, instead of loading `spec`.)"""
    predictor = predictor or load_predictor(spec, device=device, resolution=resolution, backend=backend,
                                            precision=precision)
    files = collect_images(inputs)
    rows, unreadable = _run_files(predictor, files, predictor.probabilities, batch=batch, workers=workers,
                                  progress=progress)
    order = sorted(rows)
    ranked = predictor.top_k(torch.stack([rows[i] for i in order]), top_k) if order else []
    results = [{"path": str(files[i]), "predictions": best} for i, best in zip(order, ranked)]
    return results, unreadable


def embed(spec: str, inputs: list[str], out: Path, *, batch: int = 32, workers: int = 0, device: str = "auto",
          resolution: int | None = None, progress: bool = True, overwrite: bool = False, backend: str = "auto",
          precision: str = "auto", predictor: Predictor | None = None) -> dict:
    """Pre-logit features of every image into OUT.npy, with OUT.csv mapping rows to files.
    (`predictor`: one already loaded, instead of loading `spec`.)"""
    npy, index_csv = Path(out).with_suffix(".npy"), Path(out).with_suffix(".csv")
    for target in (npy, index_csv):
        rundir.check_new_file(target, overwrite=overwrite)
    predictor = predictor or load_predictor(spec, device=device, resolution=resolution, need_head=False,
                                            backend=backend, precision=precision)
    files = collect_images(inputs)
    rows, unreadable = _run_files(predictor, files, predictor.features, batch=batch, workers=workers,
                                  progress=progress)
    order = sorted(rows)
    width = predictor.num_features
    features = np.stack([rows[i].numpy() for i in order]) if order else np.zeros((0, width), np.float32)
    index_rows = ((row, path_text(files[i])) for row, i in enumerate(order))
    write_together({npy: lambda fh: np.save(fh, features.astype(np.float32)),
                    index_csv: csv_writer(["row", "path"], index_rows)}, what="embedding (features and index)")
    return {"features": str(npy), "index": str(index_csv), "shape": list(features.shape),
            "resolution": predictor.resolution, "backend": predictor.backend, "precision": predictor.precision,
            "unreadable": [str(p) for p in unreadable]}
