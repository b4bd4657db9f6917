"""timm and Hugging Face transformers BiT state dicts: a `.safetensors` file, or a checkpoint folder
with its config.json. The architecture comes from the tensors, the settings from the config, and
every tensor's name, shape and type is checked before anything is read; the names are `interop`'s,
the config's checks `foreign_config`'s."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import BigTransferError
from ...safe_text import load_json, quoted
from .. import foreign_config, interop
from ..resnetv2 import FOREIGN_WS_EPS, ArchSpec, ResNetV2
from .ours import valid_field
from .safetensors_file import FLOAT_DTYPES, Header, read_safetensors
from .sniff import folder_files
from .summary import (
    MAX_UNITS,
    MAX_WIDTH,
    FileSummary,
    check_same_architecture,
    model_shapes,
    summary_shapes,
)

BIGTRANSFER_KEY = "bigtransfer"  # our class names, resolution and provenance in an exported file's metadata


def summarize(path: Path, header: Header) -> FileSummary:
    """Summary of a timm or transformers BiT state dict (`path`, whose weights `header` describes)."""
    return _summary_and_layout(path, header)[0]


def load_state_dict(path: Path, header: Header, model: ResNetV2, load_head: bool) -> dict[str, torch.Tensor]:
    """A state dict for `model` from a timm or transformers file of its architecture: checked, then read."""
    summary, layout = _summary_and_layout(path, header)
    check_same_architecture(summary, model, path)
    expected = model_shapes(model, load_head)
    table = interop.name_table(expected, layout)
    tensors = read_safetensors(header.path, [theirs for theirs, _ in table.values()])
    return {ours: interop.to_ours(tensors.pop(theirs), expected[ours]) for ours, (theirs, _) in table.items()}


def _summary_and_layout(path: Path, header: Header) -> tuple[FileSummary, interop.Layout]:
    """Architecture from the tensors, settings from the config.json, every tensor's name, shape and type checked."""
    weights, shapes = header.path, header.shapes
    layout = interop.detect(shapes)
    if layout is None:
        first = next(iter(shapes), None)
        raise BigTransferError(
            f"{weights}: a .safetensors file without bigtransfer metadata that is not a timm or transformers BiT "
            f"state dict either (first tensor {quoted(first)}); save models with bigtransfer.save_checkpoint so the "
            f"architecture is recorded")
    reason = interop.not_bit_reason(layout, set(shapes))
    if reason:
        raise BigTransferError(f"{weights}: {reason}; bigtransfer reads only BiT")
    arch = _arch(weights, layout, shapes)
    head = shapes.get(layout.head_bias_key)
    num_classes = head[0] if head is not None and len(head) == 1 else None
    config_path = _config_beside(path, weights)
    config = foreign_config.read_json(config_path) if config_path else None
    found = foreign_config.library_of(config) if config is not None else None
    if config is not None and found is None and not path.is_dir():  # some other program's config.json
        config = config_path = None
    if config is not None and found != layout.library:
        raise BigTransferError(f"{config_path}: a {found or 'unrecognised'} config beside a {layout.describe()}")
    details = _exported_details(header.metadata, num_classes, weights)
    groups = 32  # timm's BiT models all have 32 groups; transformers' config says
    if layout.library == interop.TRANSFORMERS and config is not None:
        checked = foreign_config.check_transformers(config, arch, num_classes, config_path)
        groups = checked["groups"]
    elif config is not None:
        checked = foreign_config.check_timm(config, arch, num_classes, config_path)
    else:
        checked = {}
    details.update({k: v for k, v in checked.items() if k != "groups" and v is not None})
    details["config"] = str(config_path) if config_path else None
    summary = FileSummary(arch, num_classes, "gn_ws", groups, header.metadata, FOREIGN_WS_EPS, layout.library, details)
    _check_tensors(header, layout, summary)
    return summary, layout


def _config_beside(path: Path, weights: Path) -> Path | None:
    """The config.json that belongs to a checkpoint: a folder's, or the one beside a model.safetensors."""
    if path.is_dir():
        return folder_files(path)[1]
    beside = weights.with_name(foreign_config.CONFIG_NAME)
    return beside if weights.name == foreign_config.WEIGHTS_NAME and beside.is_file() else None


def _arch(weights: Path, layout: interop.Layout, shapes: dict[str, tuple[int, ...]]) -> ArchSpec:
    """Units counted per stage, width from the root conv; bounded like any file's declarations."""
    root = shapes.get(layout.root_key)
    if root is None or len(root) != 4 or root[1:] != (3, 7, 7) or not 0 < root[0] <= 64 * MAX_WIDTH:
        raise BigTransferError(f"{weights}: tensor {quoted(layout.root_key)} has shape {quoted(root)}, expected a Cx3x7x7 kernel")
    units = interop.count_units(layout, shapes)
    if sorted(units) != [0, 1, 2, 3]:
        raise BigTransferError(f"{weights}: units in stages {sorted(units)}; BiT has four stages, 0 to 3")
    if max(units.values()) > MAX_UNITS:
        raise BigTransferError(f"{weights}: a stage has {max(units.values())} units, more than any BiT model")
    return ArchSpec(tuple(units[s] for s in range(4)), root[0] / 64)  # type: ignore[arg-type]


def _exported_details(metadata: dict[str, str], num_classes: int | None, weights: Path) -> dict:
    """What bigtransfer recorded when it exported the file (class names, resolution, provenance), checked."""
    if BIGTRANSFER_KEY not in metadata:
        return {}
    try:
        block = load_json(metadata[BIGTRANSFER_KEY])
    except ValueError as err:
        raise BigTransferError(f"{weights}: damaged bigtransfer metadata ({BIGTRANSFER_KEY} is not JSON: {err})") \
            from None
    if not isinstance(block, dict):
        raise BigTransferError(f"{weights}: damaged bigtransfer metadata ({BIGTRANSFER_KEY} is not a JSON object)")
    details = {}
    for key in ("class_names", "resolution", "provenance"):
        value = block.get(key)
        if value is None:
            continue
        if not valid_field(key, value, num_classes):
            raise BigTransferError(f"{weights}: damaged bigtransfer metadata ({key}: {quoted(value)})")
        details[key] = value
    return details


def _check_tensors(header: Header, layout: interop.Layout, summary: FileSummary) -> None:
    """Every tensor a model of `summary` needs, with its shape and a float type, and nothing else."""
    weights, shapes, dtypes = header.path, header.shapes, header.dtypes
    table = interop.name_table(summary_shapes(summary), layout)
    for theirs, shape in table.values():
        if theirs not in shapes:
            raise BigTransferError(f"{weights}: missing tensor {quoted(theirs)} (a {summary.arch.name} BiT has it)")
        if shapes[theirs] != shape:
            raise BigTransferError(f"{weights}: tensor {quoted(theirs)} has shape {quoted(shapes[theirs])}, expected {shape} "
                                   f"for {summary.arch.name}")
        if dtypes[theirs] not in FLOAT_DTYPES:
            raise BigTransferError(f"{weights}: tensor {quoted(theirs)} holds {dtypes[theirs]}, not floating-point numbers")
    known = {theirs for theirs, _ in table.values()}
    unexpected = [name for name in shapes if name not in known]
    if unexpected:
        raise BigTransferError(f"{weights}: unexpected tensor {quoted(unexpected[0])} (not part of a "
                               f"{summary.describe()} BiT model)")
