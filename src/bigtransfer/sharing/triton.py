"""A Triton Inference Server model repository for an exported ONNX model.

    DIR/<name>/config.pbtxt      the model configuration (Triton's model_config.proto, text format)
    DIR/<name>/labels.txt        class names, one per line, in the head's order (Triton's classification)
    DIR/<name>/README.md         the model card
    DIR/<name>/1/model.onnx      version 1: the ONNX model (ONNX Runtime backend)

Triton batches requests itself (`dynamic_batching`); the batch dimension is not part of `dims`.
"""

from __future__ import annotations

import re

from ..errors import BigTransferError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DEFAULT_MAX_BATCH = 32
QUEUE_DELAY_US = 2000  # how long Triton waits to fill a batch


def model_name(name: str) -> str:
    """A Triton model name (a folder name in the repository): checked, not guessed at."""
    if not NAME_RE.match(name) or name in (".", ".."):
        raise BigTransferError(f"--name {name!r}: a Triton model name is letters, digits, '_', '-' and '.', "
                               "starting with a letter or digit (at most 128 characters)")
    return name


def default_name(source_name: str) -> str:
    """A valid model name made from a run's or file's name: other characters become '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", source_name.removesuffix(".safetensors").removesuffix(".npz"))
    cleaned = cleaned.lstrip("._-")[:128]
    return cleaned or "bit"


def config_pbtxt(name: str, *, resolution: int, num_classes: int, num_features: int, max_batch: int) -> str:
    """config.pbtxt for the ONNX model: input `images` [3, R, R] fp32, outputs `logits` and `features`."""
    if max_batch < 1:
        raise BigTransferError(f"--max-batch must be at least 1, got {max_batch}")
    return f"""name: "{name}"
backend: "onnxruntime"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "images"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, {resolution}, {resolution} ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "labels.txt"
  }},
  {{
    name: "features"
    data_type: TYPE_FP32
    dims: [ {num_features} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
"""
