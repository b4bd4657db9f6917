"""int8 post-training static quantization of an exported ONNX model, and what it costs.

ONNX Runtime's recipe: the fp32 graph pre-processed (shape inference, basic graph optimisation),
then quantized statically in the QDQ format (int8 kernels per output channel, uint8 activations),
calibrated on the user's own images. The top-1 of the int8 graph is then measured against the
fp32 graph's on labelled images (the run's own test split unless `--data` names others); an
export that loses more than `max_drop` points is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.images import IMAGE_ERRORS, load_rgb
from ..data.imageset import ImageSet
from ..data.sources import load_source
from ..data.transforms import eval_transform
from ..errors import BigTransferError
from ..safe_text import markdown_code, markdown_text

DEFAULT_MAX_DROP = 1.0  # top-1 points
DEFAULT_CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 16
EVAL_BATCH = 32
# The convolutions carry nearly all the arithmetic; quantizing GroupNorm's scale-and-shift (Mul,
# Add) and the residual Add as well only adds quantize/dequantize pairs around float work.
QUANTIZED_OPS = ["Conv"]


@dataclass
class QuantizationReport:
    """What the int8 export was measured to cost, as written into the model's metadata and card."""

    top1_fp32: float
    top1_int8: float
    top1_change_points: float  # int8 minus fp32, in points (negative: int8 lost)
    evaluated_on: str  # the data and split, e.g. "digits (the run's test split)"
    evaluated_images: int
    calibration: str
    calibration_images: int
    method: str = "onnxruntime static QDQ: Conv kernels int8 per channel, activations uint8, MinMax calibration"

    def metadata(self) -> dict[str, str]:
        """ONNX metadata_props: every field under `bigtransfer.quantization.`."""
        return {f"bigtransfer.quantization.{k}": (f"{v:.6g}" if isinstance(v, float) else str(v))
                for k, v in asdict(self).items()}

    def card_lines(self) -> list[str]:
        return ["## int8 quantization", "",
                f"- method: {self.method}",
                f"- calibrated on {self.calibration_images} images of {markdown_code(self.calibration)}",
                (f"- top-1 on {self.evaluated_images} images of {markdown_text(self.evaluated_on)}: "
                 f"fp32 {self.top1_fp32:.2%}, "
                f"int8 {self.top1_int8:.2%} (change {self.top1_change_points:+.2f} points)")]


# --------------------------------------------------------------------------- images
def calibration_images(spec: str, limit: int) -> tuple[list[Callable[[], object]], str]:
    """Up to `limit` images, evenly spread over what `spec` names: image files or folders (searched
    recursively), or any data source `--data` accepts (its training split). Returns loaders and a
    description."""
    from ..data.sources import collect_images

    path = Path(spec).expanduser()
    if path.is_dir() or path.is_file() and path.suffix.lower() != ".csv":
        files = collect_images([spec])
        chosen = _evenly(len(files), limit)
        return [lambda f=files[i]: load_rgb(f) for i in chosen], spec
    images = load_source(spec, progress=False, require_test=False).train
    chosen = _evenly(len(images), limit)
    return [lambda i=i: images.load(i) for i in chosen], f"{spec} (training split)"


def _evenly(n: int, limit: int) -> list[int]:
    if n == 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(n, limit)).round().astype(int).tolist()))


def _decoded_batches(loaders: list[Callable[[], object]], resolution: int, batch: int):
    """Pre-processed [B, 3, R, R] float32 arrays; unreadable images are skipped."""
    transform = eval_transform(resolution)
    pending = []
    for load in loaders:
        try:
            pending.append(transform(load()).numpy())
        except IMAGE_ERRORS:
            continue
        if len(pending) == batch:
            yield np.stack(pending)
            pending = []
    if pending:
        yield np.stack(pending)


def held_out_images(weights: Path, data: str | None, class_names: list[str]) -> tuple[ImageSet, str]:
    """The labelled images top-1 is measured on: `data`'s test split, or the run's own test split
    (from the run directory's config.json), labels re-indexed into the model's class order."""
    from ..inference.evaluation import _align_labels

    if data is None:
        config_path = weights.parent / "config.json"
        if weights.name != "final.safetensors" or not config_path.is_file():
            raise BigTransferError(f"--quantize int8: {weights} is not a run's model, so there is no test split to "
                                   "measure the int8 top-1 on; name labelled images with --data")
        config = json.loads(config_path.read_text())
        data = config.get("data")
        if not isinstance(data, str):
            raise BigTransferError(f"{config_path}: records no data source; name labelled images with --data")
        options = config.get("options") if isinstance(config.get("options"), dict) else {}
        splits = load_source(data, val_fraction=options.get("val_fraction"), seed=config.get("split_seed", 0),
                             progress=False)
        described = f"{data} (the run's test split)"
    else:
        splits = load_source(data, progress=False)
        described = f"{data} (test split)"
    if splits.test is None:
        raise BigTransferError(f"--data {data}: no test split to measure the int8 top-1 on")
    return _align_labels(splits.test, class_names, data), described


# --------------------------------------------------------------------------- quantize and measure
def quantize_int8(fp32: Path, out: Path, calibration: list[Callable[[], object]], resolution: int,
                  work: Path) -> None:
    """ONNX Runtime static QDQ quantization of `fp32` into `out`, calibrated on `calibration`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = _decoded_batches(calibration, resolution, CALIBRATION_BATCH)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    prepared = work / "prepared.onnx"
    with _quiet_onnxruntime():
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def top1_of(model: Path, images: ImageSet, resolution: int, *, progress: bool = False) -> float:
    """Top-1 of an ONNX model (first output: logits) over labelled images; unreadable ones count as misses."""
    from tqdm.auto import tqdm

    from ..inference.backends import new_session

    session = new_session(model)
    transform = eval_transform(resolution)
    hits = 0
    order = range(0, len(images), EVAL_BATCH)
    for start in tqdm(order, desc=f"top-1 of {model.name}", unit="batch", disable=not progress):
        rows, labels = [], []
        for i in range(start, min(start + EVAL_BATCH, len(images))):
            try:
                rows.append(transform(images.load(i)).numpy())
                labels.append(int(images.labels[i]))
            except IMAGE_ERRORS:
                continue
        if rows:
            logits = session.run(["logits"], {"images": np.stack(rows)})[0]
            hits += int((logits.argmax(1) == np.array(labels)).sum())
    return hits / max(len(images), 1)


def _quiet_onnxruntime():
    """The quantization tools log every skipped node at INFO/WARNING: keep the CLI's output to our lines."""
    import contextlib

    @contextlib.contextmanager
    def quiet():
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            root.setLevel(level)

    return quiet()
