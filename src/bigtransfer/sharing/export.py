"""Shipping a model: ONNX (checked against PyTorch with onnxruntime; optionally int8), a Triton
model repository, TorchScript, and `torch.export`'s .pt2 (TorchScript's successor; PyTorch now
deprecates TorchScript); and, through `library_export`, a timm state dict or a transformers folder.

Exported models take images already pre-processed as in training: RGB, resized to the model's
resolution, scaled to [-1, 1], NCHW float32; the batch dimension is dynamic. The class names
and resolution travel beside the model in `<out>.json` (and, for ONNX, in its metadata_props).
The ONNX graph holds plain convolutions: the standardized kernels are folded in (backends.py).
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..atomic import write_bytes, write_json, write_text
from ..errors import BigTransferError
from ..inference import backends
from ..inference.backends import ConcatZeroPad, onnx_safe_copy  # noqa: F401  (where they were first defined)
from ..inference.predictor import LoadedModel, load_model
from ..safe_text import markdown_code, markdown_text
from . import triton
from .quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MAX_DROP, QuantizationReport

FORMATS = ("onnx", "torchscript", "pt2", "timm", "transformers", "triton")
QUANTIZATIONS = ("int8",)
MAX_LISTED_CLASSES = 100


def export(spec: str, out: Path, fmt: str = "onnx", *, resolution: int | None = None, check: bool = True,
           atol: float = 1e-3, overwrite: bool = False, quantize: str | None = None, calibration: str | None = None,
           data: str | None = None, max_drop: float = DEFAULT_MAX_DROP,
           calibration_images: int = DEFAULT_CALIBRATION_IMAGES, name: str | None = None,
           max_batch: int = triton.DEFAULT_MAX_BATCH, progress: bool = False) -> dict:
    """Write the model in `fmt` to `out` and, if `check`, compare it with PyTorch (or timm / transformers).

    `quantize="int8"` (onnx, triton): static int8 calibrated on `calibration`'s images; its top-1 change
    against fp32 on the run's test split (or `data`'s) goes into the file's metadata and the model
    card, and an export losing more than `max_drop` points is refused, writing nothing."""
    _check_options(fmt, quantize, calibration, data, max_drop, calibration_images, max_batch, name)
    if fmt in ("timm", "transformers"):
        from .library_export import export_timm, export_transformers

        writer = export_timm if fmt == "timm" else export_transformers
        return writer(spec, out, resolution=resolution, overwrite=overwrite, check=check)
    out = Path(out)
    if fmt == "triton":
        return _export_triton(spec, out, resolution=resolution, check=check, atol=atol, overwrite=overwrite,
                              quantize=quantize, calibration=calibration, data=data, max_drop=max_drop,
                              calibration_images=calibration_images, name=name, max_batch=max_batch,
                              progress=progress)
    targets = [out, Path(f"{out}.json")] + ([Path(f"{out}.md")] if fmt == "onnx" else [])
    for target in targets:
        rundir.check_new_file(target, overwrite=overwrite)
    loaded = load_model(spec, torch.device("cpu"), resolution)
    if fmt == "onnx":
        return _export_onnx_file(loaded, out, check=check, atol=atol, quantize=quantize, calibration=calibration,
                                 data=data, max_drop=max_drop, calibration_images=calibration_images,
                                 progress=progress)
    return _export_torch(loaded, out, fmt, check=check, atol=atol)


def _check_options(fmt, quantize, calibration, data, max_drop, calibration_images, max_batch, name) -> None:
    """Everything that needs no model or data: a mistyped flag fails in a second."""
    if fmt not in FORMATS:
        raise BigTransferError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise BigTransferError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
        if fmt not in ("onnx", "triton"):
            raise BigTransferError(f"--quantize int8 writes ONNX: use --format onnx or triton, not {fmt}")
        if calibration is None:
            raise BigTransferError("--quantize int8 needs --calibration DATA: images like the ones the model will "
                                   "see (a folder, image files, or a --data source)")
        if max_drop < 0:
            raise BigTransferError(f"--max-drop must be at least 0 (top-1 points), got {max_drop}")
        if calibration_images < 1:
            raise BigTransferError(f"--calibration-images must be at least 1, got {calibration_images}")
    elif calibration is not None or data is not None:
        raise BigTransferError("--calibration and --data go with --quantize int8")
    if fmt == "triton":
        if max_batch < 1:
            raise BigTransferError(f"--max-batch must be at least 1, got {max_batch}")
        if name is not None:
            triton.model_name(name)
    elif name is not None:
        raise BigTransferError("--name goes with --format triton")


# --------------------------------------------------------------------------- ONNX (and int8)
def _export_onnx_file(loaded: LoadedModel, out: Path, **options) -> dict:
    proto, report, quantization = _build_onnx(loaded, **options)
    report["path"] = str(out)
    backends.save_onnx(proto, out)
    write_text(Path(f"{out}.md"), _card(loaded, report, quantization, markdown_code(out.name)), what="model card")
    write_json(Path(f"{out}.json"), report, what="export report")
    return report


def _build_onnx(loaded: LoadedModel, *, check: bool, atol: float, quantize: str | None, calibration: str | None,
                data: str | None, max_drop: float, calibration_images: int, progress: bool):
    """(the ONNX model in memory: fp32, or int8 measured against fp32; its report; the int8 figures).

    Files ONNX Runtime needs on disk (the check, quantization) live in a private temporary folder;
    only the finished model reaches the user's disk, through the one atomic write."""
    from .quantize import calibration_images as calibration_loaders
    from .quantize import held_out_images

    held_out = None
    if quantize:  # find the data before the slow part, so a mistake costs seconds
        held_out = held_out_images(loaded.source, data, loaded.class_names)
        loaders, calibration_name = calibration_loaders(calibration, calibration_images)
        if not loaders:
            raise BigTransferError(f"--calibration {calibration}: no images")
    proto = backends.onnx_model(loaded.model, loaded.resolution)
    report = {"format": "onnx", "input": ["batch", 3, loaded.resolution, loaded.resolution],
              "value_range": [-1.0, 1.0], "outputs": list(backends.OUTPUTS), "class_names": loaded.class_names,
              "source": str(loaded.source), "precision": quantize or "fp32"}
    quantization = None
    if check or quantize:
        with tempfile.TemporaryDirectory(prefix="bigtransfer-export-") as folder:
            work = Path(folder)
            fp32 = work / "fp32.onnx"
            backends.save_onnx(proto, fp32)
            if check:
                report["max_abs_diff_vs_pytorch"] = _check_onnx(loaded, fp32, atol)
            if quantize:
                quantization = _quantize(loaded, fp32, work / "int8.onnx", loaders, calibration_name, held_out,
                                         max_drop, work, progress)
                report["quantization"] = asdict(quantization)
                proto = _load_onnx(work / "int8.onnx")
    _set_metadata(proto, loaded, quantization)
    return proto, report, quantization


def _load_onnx(path: Path):
    import onnx

    return onnx.load(str(path))


def _check_onnx(loaded: LoadedModel, path: Path, atol: float) -> float:
    """Max |logit difference| between the ONNX model (onnxruntime, all graph optimisations) and PyTorch."""
    probe = torch.rand(3, 3, loaded.resolution, loaded.resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = loaded.model.eval()(probe).numpy()
    got = backends.OnnxForward(path, loaded.resolution, keep_session=False)(probe, "logits").numpy()
    diff = float(np.abs(got - expected).max())
    if diff > atol * max(1.0, float(np.abs(expected).max())):
        raise BigTransferError(f"{path.name}: exported model disagrees with PyTorch (max abs diff {diff:.3g})")
    return diff


def _quantize(loaded: LoadedModel, fp32: Path, int8: Path, loaders, calibration_name: str, held_out, max_drop: float,
              work: Path, progress: bool) -> QuantizationReport:
    from .quantize import quantize_int8, top1_of

    quantize_int8(fp32, int8, loaders, loaded.resolution, work)
    images, described = held_out
    top1_fp32 = top1_of(fp32, images, loaded.resolution, progress=progress)
    top1_int8 = top1_of(int8, images, loaded.resolution, progress=progress)
    change = 100 * (top1_int8 - top1_fp32)
    if -change > max_drop:
        raise BigTransferError(
            f"--quantize int8 loses {-change:.2f} points of top-1 on {len(images)} images of {described} "
            f"(fp32 {top1_fp32:.2%}, int8 {top1_int8:.2%}), more than --max-drop {max_drop:g}; nothing written "
            "(calibrate on more or more typical images, or raise --max-drop)")
    return QuantizationReport(top1_fp32, top1_int8, change, described, len(images), calibration_name, len(loaders))


def _set_metadata(proto, loaded: LoadedModel, quantization: QuantizationReport | None) -> None:
    """Class names, resolution and (int8) the measured top-1 change into the model's metadata_props."""
    import onnx

    props = {"bigtransfer.class_names": json.dumps(loaded.class_names),
             "bigtransfer.resolution": str(loaded.resolution), "bigtransfer.value_range": "[-1.0, 1.0]",
             "bigtransfer.source": loaded.source.name, **(quantization.metadata() if quantization else {})}
    onnx.helper.set_model_props(proto, props)


def _card(loaded: LoadedModel, report: dict, quantization: QuantizationReport | None, what: str) -> str:
    """A short model card (Markdown) for an ONNX export: what it is, its input and outputs, what it costs."""
    names = loaded.class_names
    shown = ", ".join(markdown_code(n) for n in names[:MAX_LISTED_CLASSES]) + (
        f", ... ({len(names) - MAX_LISTED_CLASSES} more)" if len(names) > MAX_LISTED_CLASSES else "")
    arch = loaded.model.config.arch.name
    r = loaded.resolution
    title = loaded.source.parent.name if loaded.source.name == "final.safetensors" else loaded.source.name
    lines = [f"# {markdown_text(title)}",
             "", (f"{what}: a BiT ResNet-v2 {arch} exported by bigtransfer from {markdown_code(loaded.source)} "
                 f"({report['precision']}, ONNX, Weight Standardization folded into the convolutions)."), "",
             "## Input and outputs", "",
             (f"- `images`: float32 [batch, 3, {r}, {r}], RGB resized to {r}x{r} and scaled to [-1, 1] "
             "(`x / 127.5 - 1`)"),
             (f"- `logits`: float32 [batch, {len(names)}]; `features`: float32 [batch, {loaded.model.num_features}] "
             "(the pre-logits)"), ""]
    if "max_abs_diff_vs_pytorch" in report:
        lines += [(f"The fp32 graph was checked with ONNX Runtime against PyTorch: max |logit difference| "
                  f"{report['max_abs_diff_vs_pytorch']:.2e}."), ""]
    if quantization is not None:
        lines += quantization.card_lines() + [""]
    lines += ["## Classes", "", f"{len(names)} classes, in the head's order: {shown}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Triton
def _export_triton(spec: str, out: Path, *, resolution, check, atol, overwrite, quantize, calibration, data,
                   max_drop, calibration_images, name, max_batch, progress) -> dict:
    """DIR/<name>/{config.pbtxt, labels.txt, README.md, 1/model.onnx}: a Triton model repository."""
    earlier = rundir.check_claim(out, "export-triton")
    loaded = load_model(spec, torch.device("cpu"), resolution)
    source_name = loaded.source.parent.name if loaded.source.name == "final.safetensors" else loaded.source.name
    name = triton.model_name(name) if name else triton.default_name(source_name)
    folder = out / name
    if earlier and folder.exists() and not overwrite:
        raise BigTransferError(f"--out {out}: already holds the model {name!r}; pass --overwrite to replace it, or "
                               "--name to add another")
    with rundir.owned(out, "export-triton"):
        proto, report, quantization = _build_onnx(loaded, check=check, atol=atol, quantize=quantize,
                                                  calibration=calibration, data=data, max_drop=max_drop,
                                                  calibration_images=calibration_images, progress=progress)
        config = triton.config_pbtxt(name, resolution=loaded.resolution, num_classes=len(loaded.class_names),
                                     num_features=loaded.model.num_features, max_batch=max_batch)
        report.update({"format": "triton", "path": str(folder), "model_name": name, "max_batch": max_batch})
        backends.save_onnx(proto, folder / "1" / "model.onnx")
        write_text(folder / "config.pbtxt", config, what="Triton config")
        write_text(folder / "labels.txt", "\n".join(loaded.class_names) + "\n", what="labels")
        write_text(folder / "README.md", _card(loaded, report, quantization, f"Triton model {markdown_code(name)}"),
                   what="model card")
    return report


# --------------------------------------------------------------------------- TorchScript, torch.export
def _export_torch(loaded: LoadedModel, out: Path, fmt: str, *, check: bool, atol: float) -> dict:
    model = loaded.model.eval()
    example = torch.rand(2, 3, loaded.resolution, loaded.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    probe = torch.rand(3, 3, loaded.resolution, loaded.resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = model(probe).numpy()
    buffer = io.BytesIO()  # serialised in memory, then written whole: TorchScript's own file writer aborts
    if fmt == "pt2":       # the process on a full disk, and neither may leave half a file
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, buffer)
        write_bytes(out, buffer.getbuffer(), what="pt2 export")
        got = torch.export.load(str(out)).module()(probe).detach().numpy() if check else None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices are not the user's concern here
            scripted = torch.jit.trace(model, example, check_trace=False)
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
    write_json(Path(f"{out}.json"), report, what="export report")
    return report
