"""Shipping a model: ONNX (checked against PyTorch with onnxruntime), TorchScript, and
`torch.export`'s .pt2 (TorchScript's successor; PyTorch now deprecates TorchScript); and, through
`library_export`, a timm state dict or a transformers folder.

Exported models take images already pre-processed as in training: RGB, resized to the model's
resolution, scaled to [-1, 1], NCHW float32; the batch dimension is dynamic. The class names
and resolution travel beside the model in `<out>.json`.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from . import rundir
from .atomic import write_atomically, write_bytes, write_json
from .errors import BigTransferError
from .inference import load_model

FORMATS = ("onnx", "torchscript", "pt2", "timm", "transformers")


def export(spec: str, out: Path, fmt: str = "onnx", *, resolution: int | None = None, check: bool = True,
           atol: float = 1e-3, overwrite: bool = False) -> dict:
    """Write the model in `fmt` to `out` and, if `check`, compare it with PyTorch (or timm / transformers)."""
    if fmt not in FORMATS:
        raise BigTransferError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt in ("timm", "transformers"):
        from .library_export import export_timm, export_transformers

        writer = export_timm if fmt == "timm" else export_transformers
        return writer(spec, out, resolution=resolution, overwrite=overwrite, check=check)
    for target in (Path(out), Path(f"{out}.json")) + ((Path(f"{out}.data"),) if fmt == "onnx" else ()):
        rundir.check_new_file(target, overwrite=overwrite)
    loaded = load_model(spec, torch.device("cpu"), resolution)
    model = loaded.model.eval()
    out = Path(out)
    example = torch.rand(2, 3, loaded.resolution, loaded.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    probe = torch.rand(3, 3, loaded.resolution, loaded.resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = model(probe).numpy()
    if fmt == "onnx":
        _export_onnx(model, example, out)
        got = _run_onnx(out, probe.numpy()) if check else None
    elif fmt == "pt2":
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()  # serialised in memory, then written whole: a full disk cannot leave half a file
        torch.export.save(program, buffer)
        write_bytes(out, buffer.getbuffer(), what="pt2 export")
        got = torch.export.load(str(out)).module()(probe).detach().numpy() if check else None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices are not the user's concern here
            scripted = torch.jit.trace(model, example, check_trace=False)
            buffer = io.BytesIO()  # in memory first: TorchScript's own file writer aborts the process on a full disk
            torch.jit.save(scripted, buffer)
            write_bytes(out, buffer.getbuffer(), what="TorchScript export")
            got = torch.jit.load(str(out))(probe).detach().numpy() if check else None
    report = {"format": fmt, "path": str(out), "input": ["batch", 3, loaded.resolution, loaded.resolution],
              "value_range": [-1.0, 1.0], "class_names": loaded.class_names, "source": str(loaded.source)}
    if got is not None:
        diff = float(np.abs(got - expected).max())
        report["max_abs_diff_vs_pytorch"] = diff
        if diff > atol * max(1.0, float(np.abs(expected).max())):
            raise BigTransferError(f"{out}: exported model disagrees with PyTorch (max abs diff {diff:.3g})")
    write_json(out.with_suffix(out.suffix + ".json"), report, what="export report")
    return report


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


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise BigTransferError("ONNX export needs the export extras: pip install 'bigtransfer[export]'") from None
    model = onnx_safe_copy(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = logging.getLogger("onnxscript")  # its optimizer's notes are not the user's concern either
    level = quiet.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), input_names=["images"],
                                        output_names=["logits"], dynamo=True, external_data=False, verbose=False)
        finally:
            quiet.setLevel(level)
    write_onnx(program.model_proto, out)


ONNX_INLINE_LIMIT = 1536 << 20  # bytes of weights: above, they go to OUT.data (one protobuf holds 2 GB at most)


def write_onnx(proto, out: Path, inline_limit: int | None = None) -> None:
    """An ONNX model into `out`, atomically; weights above `inline_limit` (ONNX_INLINE_LIMIT)
    bytes go to `out`.data, written (atomically) before the model that names it."""
    weights = [t for t in proto.graph.initializer if t.HasField("raw_data")]
    if sum(len(t.raw_data) for t in weights) > (ONNX_INLINE_LIMIT if inline_limit is None else inline_limit):
        # small tensors (shapes, scalars) stay inline, as ONNX's own saver keeps them: graph checks read them
        weights = [t for t in weights if len(t.raw_data) >= 1024]
        _externalise(weights, out)
    write_bytes(out, proto.SerializeToString(), what="ONNX export")


def _externalise(weights: list, out: Path) -> None:
    """Move the tensors' bytes into `out`.data, each tensor naming its place there (ONNX's external data)."""
    from onnx import TensorProto

    data = out.with_name(out.name + ".data")

    def write(fh) -> None:
        offset = 0
        for tensor in weights:
            raw = tensor.raw_data
            fh.write(raw)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(raw)

    write_atomically(data, write, what="ONNX weights")


def _run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise BigTransferError("checking ONNX needs onnxruntime: pip install 'bigtransfer[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.astype(np.float32)})[0]
