"""How a trained model runs forward fast: the backends, and the choice between them.

- torch: Weight Standardization folded into plain convolutions once (`fold_standardization`), CPU
  inference in channels_last (`ResNetV2.forward_features`), bf16 autocast where chosen (the folded
  kernels are then stored in bf16, so autocast casts none of them per call).
- onnxruntime (CPU, fp32): the same folded model exported to ONNX once per weights file and input
  size, kept in the cache (`<cache>/onnx/`, keyed by the weights' SHA-256), and run by one ONNX
  Runtime session per file for the whole process.

`choose` resolves `auto` (backend and precision) and says why; the figures behind it are in
benchmarks/results/inference_cpu.md (`python benchmarks/inference_throughput.py`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import machine
from ..atomic import write_atomically, write_bytes
from ..errors import BigTransferError
from ..models.resnetv2 import ResNetV2, fold_standardization

BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16")
OUTPUTS = ("logits", "features")  # the exported graph's outputs, in this order
INPUT_NAME = "images"
# Below this many FLOPs per image (2 per multiply-add; R50x1 at 128 px is 2.7e9, the test models
# 1.6e7), a forward pass takes milliseconds in torch, and the one-time ONNX export (12 s for R50x1
# and 12-66 s even for the smallest model on a busy 2-core CPU: torch.export's tracing) costs more
# than ONNX Runtime could ever save: `auto` stays on torch.
ONNX_MIN_FLOPS = 1e9
GRAPH_VERSION = 1  # bump when the exported graph changes, so cached files from older code are not used
MAX_PROTOBUF_BYTES = 1_800_000_000  # ONNX files hold at most 2 GiB inline; larger weights go beside them

# What `auto` picks for fp32 on a CPU, by instruction set, with the measurement behind it
# (images/s relative to timm's eager resnetv2_50x1_bit, R50x1, same process, interleaved rounds).
MEASURED_FP32 = {
    "avx2": ("onnxruntime", ("measured on a 2-core AMD EPYC (AVX2), 1 thread: ONNX Runtime 1.25-3.04x timm, torch "
                             "1.17-1.59x; benchmarks/results/inference_cpu.md")),
    "avx512": ("onnxruntime", ("reported for a 2-core AMD EPYC with AVX512-BF16 (not re-measured here): ONNX Runtime "
                               "1.52-2.32x timm at batch 1 and at 128 px, torch 1.29x at 224 px batch 16")),
}


@dataclass(frozen=True)
class Choice:
    """The backend and precision a Predictor runs with, and why (printed by the CLI)."""

    backend: str
    precision: str
    reason: str


def isa_class() -> str:
    """The CPU's instruction-set class that decides its fastest kernels: amx, avx512, avx2 or other."""
    flags = machine.cpu()["flags"] or []
    if "amx_tile" in flags or "amx_bf16" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def onnx_available() -> str | None:
    """None when ONNX export and ONNX Runtime can be used here, else what is missing."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'bigtransfer[export]')"
    return None


def choose(backend: str, precision: str, device: torch.device, flops_per_image: float) -> Choice:
    """Resolve `auto` in `backend` / `precision` for this device and model; refuse what cannot run."""
    from ..train.loop import resolve_precision

    if backend not in BACKENDS:
        raise BigTransferError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise BigTransferError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    resolved = resolve_precision(precision, device, flops_per_image)
    if backend == "torch":
        return Choice("torch", resolved, "--backend torch, " + (f"--precision {precision}" if precision != "auto"
                                                                 else f"{resolved} for this device and model"))
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise BigTransferError(f"--backend onnxruntime runs on the CPU; got --device {device}: use --device cpu")
        if precision == "bf16":
            raise BigTransferError("--precision bf16 runs on --backend torch (ONNX Runtime's CPU kernels have no bf16 "
                                   "convolutions)")
        missing = onnx_available()
        if missing:
            raise BigTransferError(f"--backend onnxruntime: {missing}")
        return Choice("onnxruntime", "fp32", "--backend onnxruntime")
    return _choose_auto(resolved, precision == "auto", device, flops_per_image)


def _choose_auto(precision: str, precision_was_auto: bool, device: torch.device, flops_per_image: float) -> Choice:
    if device.type != "cpu":
        return Choice("torch", precision, f"{device.type}: torch")
    if precision == "bf16":
        why = "this CPU computes bf16 natively" if precision_was_auto else "--precision bf16"
        return Choice("torch", precision, f"{why}: torch with bf16 autocast (ONNX Runtime's CPU kernels have no bf16 "
                                          "convolutions)")
    if flops_per_image < ONNX_MIN_FLOPS:
        return Choice("torch", precision, f"a light model ({flops_per_image / 1e9:.2g} GFLOP per image): a one-time "
                                          "ONNX export would cost more than it saves")
    isa = isa_class()
    measured = MEASURED_FP32.get(isa)
    if measured is None:
        return Choice("torch", precision, f"no measurement for {isa} CPUs: torch")
    if measured[0] == "onnxruntime":
        missing = onnx_available()
        if missing:
            return Choice("torch", precision, f"ONNX Runtime is faster on {isa} CPUs, but {missing}")
    return Choice(measured[0], precision, f"fastest fp32 backend on {isa} CPUs ({measured[1]})")


# --------------------------------------------------------------------------- torch
class TorchForward:
    """The folded model in torch: logits or pre-logits of a batch, in fp32 or under bf16 autocast."""

    def __init__(self, model: ResNetV2, device: torch.device, precision: str):
        self.model, self.device, self.precision = model, device, precision

    def __call__(self, images: torch.Tensor, output: str) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            features = self.model.forward_features(images.to(self.device))
            out = features if output == "features" else self.model.forward_head(features)
        return out.float()


def prepare_torch(model: ResNetV2, precision: str) -> ResNetV2:
    """`model` (in place) ready to only run forward: kernels standardized once, bf16 where asked."""
    fold_standardization(model.eval())
    if precision == "bf16":
        # Stored as autocast would cast them on every call (the same rounding), so no call casts them.
        for module in model.modules():
            if type(module) is torch.nn.Conv2d and module is not model.head:
                module.weight.data = module.weight.data.to(torch.bfloat16)
    return model


# --------------------------------------------------------------------------- ONNX
class ConcatZeroPad(torch.nn.Module):
    """Zero padding of H and W built from Concat instead of Pad.

    BiT's root zero-pads before an unpadded max-pool. onnxruntime's graph optimizer (its Pad
    fusion, from PR #18136) and onnx-optimizer's fuse_pad_into_pool fold a zero Pad into the
    MaxPool's own padding, which acts like -inf: the exported model then computes a different
    function. Nothing folds a Concat, so the exported graph stays correct under any optimizer.
    """

    def __init__(self, amount: int):
        super().__init__()
        self.amount = amount

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        side = x.new_zeros(n, c, h, self.amount)
        x = torch.cat([side, x, side], dim=3)
        cap = x.new_zeros(n, c, self.amount, w + 2 * self.amount)
        return torch.cat([cap, x, cap], dim=2)


def onnx_safe_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose root padding survives ONNX graph optimizers (see ConcatZeroPad)."""
    model = copy.deepcopy(model)
    model.root.pad = ConcatZeroPad(int(model.root.pad.padding[0]))
    return model


class _LogitsAndFeatures(torch.nn.Module):
    def __init__(self, model: ResNetV2):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(images)
        return self.model.forward_head(features), features


def onnx_model(model: ResNetV2, resolution: int):
    """`model` as an in-memory ONNX graph of plain convolutions (the standardized kernels folded in):
    input `images` [batch, 3, R, R] in [-1, 1], outputs `logits` and `features`.

    `model` is folded in place (fp32, eval mode): hand over a model that will only run forward, so
    that the largest ones are never held twice."""
    missing = onnx_available()
    if missing:
        raise BigTransferError(f"ONNX export: {missing}")
    folded = fold_standardization(model.eval().float())
    pad = folded.root.pad
    folded.root.pad = ConcatZeroPad(int(pad.padding[0]))
    example = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_LogitsAndFeatures(folded), (example,), dynamic_shapes=({0: batch},),
                                        input_names=[INPUT_NAME], output_names=list(OUTPUTS), dynamo=True,
                                        external_data=False, verbose=False)
            return program.model_proto
    finally:
        folded.root.pad = pad


def save_onnx(proto, out: Path, inline_limit: int | None = None, what: str = "ONNX export") -> None:
    """An ONNX model into `out`, atomically. Weights beyond `inline_limit` (MAX_PROTOBUF_BYTES) bytes
    go to `out`.data, written (atomically) before the model that names it: one protobuf holds 2 GiB.
    `proto` is left as it was (it may be saved again elsewhere).

    The weights are never held twice: R152x4's 3.7 GB are streamed tensor by tensor into the data
    file, and the model file is a copy of `proto` made one tensor at a time without their bytes."""
    out = Path(out)
    initializers = proto.graph.initializer
    sizes = {i: t.ByteSize() for i, t in enumerate(initializers) if t.HasField("raw_data")}  # raw_data would copy
    if sum(sizes.values()) <= (MAX_PROTOBUF_BYTES if inline_limit is None else inline_limit):
        write_bytes(out, proto.SerializeToString(), what=what)
        return
    # small tensors (shapes, scalars) stay inline, as ONNX's own saver keeps them: graph checks read them
    moved = {i for i, size in sizes.items() if size >= 1024}
    data = out.with_name(out.name + ".data")
    write_atomically(data, lambda fh: [fh.write(initializers[i].raw_data) for i in sorted(moved)],
                     what="ONNX weights")
    write_bytes(out, _naming_external_data(proto, moved, data.name).SerializeToString(), what=what)


def _naming_external_data(proto, moved: set[int], location: str):
    """A copy of `proto` whose initializers at the indices in `moved` point at consecutive ranges of the
    file `location` (ONNX external data, in initializer order) instead of carrying their bytes."""
    from onnx import ModelProto, TensorProto

    light = ModelProto()
    _copy_fields(proto, light, skip={"graph"})
    _copy_fields(proto.graph, light.graph, skip={"initializer"})
    offset = 0
    for index, tensor in enumerate(proto.graph.initializer):
        entry = light.graph.initializer.add()
        if index not in moved:
            entry.CopyFrom(tensor)
            continue
        # field by field without the bytes: a copied-then-cleared field would stay in protobuf's arena
        _copy_fields(tensor, entry, skip={"raw_data"})
        length = len(tensor.raw_data)  # a transient Python copy, freed at once
        entry.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            field = entry.external_data.add()
            field.key, field.value = key, value
        offset += length
    return light


def _copy_fields(source, target, skip: set[str]) -> None:
    """Every field set in the protobuf message `source` into `target`, except those named in `skip`."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        # protobuf 6 has `is_repeated` and deprecates `label`; older ones have only `label`
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def write_onnx(model: ResNetV2, resolution: int, out: Path) -> None:
    """`model` (folded in place, see `onnx_model`) as an ONNX file at `out`, atomically."""
    save_onnx(onnx_model(model, resolution), out)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress to stdout; a CLI's output (predict --json) must stay clean."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def weights_digest(path: Path) -> str:
    """SHA-256 of a weights file, or of a checkpoint folder's files (names and contents)."""
    from ..models.zoo import sha256_of

    path = Path(path)
    if path.is_file():
        return sha256_of(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_of(file)}\n".encode())
    return digest.hexdigest()


def cached_onnx(model: ResNetV2, weights: Path, resolution: int) -> Path:
    """The ONNX file of these weights at this input size, exported on first use into the cache.

    Written whole (weights, if apart, before the model that names them): a reader sees the whole
    model or none, and two processes exporting at once both end with the same file."""
    from ..models.zoo import cache_dir

    key = f"{weights_digest(weights)[:32]}-{resolution}px-g{GRAPH_VERSION}"
    final = cache_dir() / "onnx" / key / "model.onnx"
    for folder in (final.parent.parent.parent, final.parent.parent, final.parent):
        if folder.is_symlink():
            raise BigTransferError(f"{folder}: is a symbolic link; the ONNX cache is only written into real folders")
    if not final.is_file():
        write_onnx(model, resolution, final)
    return final


_SESSIONS: dict[tuple[str, int], object] = {}
_SESSIONS_LOCK = threading.Lock()


def new_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with every graph optimisation, on `threads` (default: torch's) threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings are about its own graph rewrites
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_session(path: Path, threads: int | None = None):
    """One ONNX Runtime session per model file and thread count for the whole process (a session
    runs from several threads at once)."""
    threads = threads or torch.get_num_threads()
    key = (str(Path(path).resolve()), threads)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = _SESSIONS[key] = new_session(path, threads)
    return session


class OnnxForward:
    """An ONNX Runtime session of the folded graph: logits or pre-logits of a batch (fp32, CPU).
    `keep_session=False`: a session of its own, for a file that is about to move."""

    def __init__(self, path: Path, resolution: int, keep_session: bool = True):
        self.path, self.resolution = path, resolution
        self.session = onnx_session(path) if keep_session else new_session(path)

    def __call__(self, images: torch.Tensor, output: str) -> torch.Tensor:
        expected = (3, self.resolution, self.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise BigTransferError(f"images must be [N, 3, {self.resolution}, {self.resolution}] for this model, got "
                                   f"{list(images.shape)}")
        pixels = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([output], {INPUT_NAME: pixels})[0])
