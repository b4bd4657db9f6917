"""Evaluate a trained model on labelled data: top-1, top-5, loss, per-class accuracy, a confusion
matrix; written as metrics.json, per_class_accuracy.csv, confusion.csv and confusion.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from .. import rundir
from ..atomic import write_csv, write_figure, write_text
from ..data.dataset import TransformedImages
from ..data.sources import ImageSet, load_source
from ..errors import BigTransferError
from ..metrics import ClassificationMeter
from ..safe_text import plot_text, quoted
from .predictor import Predictor, load_predictor


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
