"""A trained model over image files: top-k labels (`predict`) and pre-logit features (`embed`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import rundir
from ..atomic import csv_writer, write_together
from ..data.images import IMAGE_ERRORS, load_rgb
from ..data.sources import collect_images
from ..safe_text import path_text
from .predictor import Predictor, load_predictor


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
