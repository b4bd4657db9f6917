"""The `config.json` that travels with timm and transformers checkpoints: read, check, write.

A transformers BiT is only BiT when its config says so: the padding and layer settings that
decide what the model computes live there, not in the tensors. A timm hub folder's config names
the model and its labels. Both are read under a size limit, and every value we use is checked
before it is trusted; anything that would make the library compute a different function from
BiT's ResNet-v2 is refused with the setting that decides it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BigTransferError
from ..safe_text import load_json, quoted
from .resnetv2 import RELEASED_ARCHS, ArchSpec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
MAX_CONFIG_BYTES = 64 << 20  # an id2label of 21,843 ImageNet-21k names is about 1.5 MB
MAX_LABEL_CHARS = 1000


def read_json(path: Path, what: str = "config") -> dict:
    """A JSON object from `path`, refused when it is larger than any real config."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise BigTransferError(f"{path}: {size} bytes, larger than any {what} file can be")
        data = load_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BigTransferError(f"{path}: not a readable JSON {what} ({err})") from None
    if not isinstance(data, dict):
        raise BigTransferError(f"{path}: not a JSON object")
    return data


def library_of(config: dict) -> str | None:
    """'transformers' or 'timm' for a config either library wrote, else None."""
    if config.get("model_type") is not None:
        return "transformers"
    if isinstance(config.get("architecture"), str):
        return "timm"
    return None


# --------------------------------------------------------------------------- transformers
# Settings whose transformers defaults are BiT's: any other value computes another function.
_BIT_SETTINGS = {
    "layer_type": ("preactivation", "post-activation 'bottleneck' units are the ViT-hybrid backbone, not BiT"),
    "global_padding": (None, "TF-style 'SAME'/'VALID' padding shifts every strided conv against BiT's"),
    "embedding_dynamic_padding": (False, "the stem's max-pool would pad again, changing every feature map size"),
    "hidden_act": ("relu", "BiT uses ReLU"),
    "num_channels": (3, "BiT takes RGB images"),
}


def _make_div(value: float, divisor: int = 8) -> int:
    """transformers' channel rounding (the `make_div` its BiT applies to hidden_sizes * width_factor)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def check_transformers(config: dict, arch: ArchSpec, num_classes: int | None, path: Path) -> dict:
    """Check a transformers config describes BiT and agrees with the tensors; returns what we use:
    `groups` and, when the labels are real names, `class_names`."""
    def refuse(reason: str) -> BigTransferError:
        return BigTransferError(f"{path}: {reason}")

    if config.get("model_type") != "bit":
        raise refuse(f"model_type is {quoted(config.get('model_type'))}, not 'bit'")
    for key, (bit_value, why) in _BIT_SETTINGS.items():
        value = config.get(key, bit_value)
        if isinstance(value, str):
            value = value.lower()
        if value != bit_value:
            raise refuse(f"{key}={quoted(value)} computes a different function from BiT ({why}); "
                         f"bigtransfer reads only {key}={quoted(bit_value)}")
    output_stride = config.get("output_stride", 32)
    if not isinstance(output_stride, int) or output_stride < 32:
        raise refuse(f"output_stride={quoted(output_stride)} dilates the last stages; BiT has output stride 32")
    width_factor = config.get("width_factor", 1)
    if not isinstance(width_factor, (int, float)) or not 0 < width_factor <= 64:
        raise refuse(f"damaged config (width_factor {quoted(width_factor)})")
    try:
        depths = [int(d) for d in config.get("depths", [3, 4, 6, 3])]
        embedding = int(config.get("embedding_size", 64))
        hidden = [_make_div(int(h) * width_factor) for h in config.get("hidden_sizes", [256, 512, 1024, 2048])]
        groups = int(config.get("num_groups", 32))
    except (TypeError, ValueError) as err:
        raise refuse(f"damaged config ({err})") from None
    stage_outs = [4 * arch.root_channels * 2**i for i in range(4)]
    if tuple(depths) != arch.units or embedding != arch.root_channels or hidden != stage_outs:
        raise refuse(f"the config describes depths {depths}, embedding_size {embedding}, stage widths {hidden}, "
                     f"but the tensors are {arch.name} (depths {list(arch.units)}, embedding_size "
                     f"{arch.root_channels}, stage widths {stage_outs})")
    if not 1 <= groups <= arch.root_channels:
        raise refuse(f"num_groups={groups} cannot divide the {arch.root_channels} stem channels")
    return {"groups": groups, "class_names": _label_names(config.get("id2label"), num_classes, path)}


def _label_names(id2label, num_classes: int | None, path: Path) -> list[str] | None:
    """Class names from an id2label map, or None when absent or transformers' placeholders (LABEL_i)."""
    if id2label is None or num_classes is None:
        return None
    if not isinstance(id2label, dict) or len(id2label) != num_classes:
        count = len(id2label) if isinstance(id2label, dict) else "no"
        raise BigTransferError(f"{path}: id2label has {count} entries, the head has {num_classes} classes")
    try:
        names = [id2label[str(i)] for i in range(num_classes)]
    except KeyError as err:
        raise BigTransferError(f"{path}: id2label has no entry {err}") from None
    if not all(isinstance(n, str) and len(n) <= MAX_LABEL_CHARS for n in names):
        raise BigTransferError(f"{path}: id2label holds something other than short strings")
    if names == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return names


def transformers_config(arch: ArchSpec, num_classes: int, class_names: list[str] | None, groups: int = 32,
                        extra: dict | None = None) -> dict:
    """A transformers BitConfig (as JSON data) for our model: BiT's settings, our sizes and labels.

    Widths go into embedding_size and hidden_sizes with width_factor 1: transformers multiplies
    only the stage widths by width_factor, not the stem or the final norm's."""
    names = class_names or [f"LABEL_{i}" for i in range(num_classes)]
    return {
        "architectures": ["BitForImageClassification"],
        "model_type": "bit",
        "num_channels": 3,
        "embedding_size": arch.root_channels,
        "hidden_sizes": [4 * arch.root_channels * 2**i for i in range(4)],
        "depths": list(arch.units),
        "layer_type": "preactivation",
        "hidden_act": "relu",
        "global_padding": None,
        "embedding_dynamic_padding": False,
        "num_groups": groups,
        "output_stride": 32,
        "width_factor": 1,
        "drop_path_rate": 0.0,
        "dtype": "float32",
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        **(extra or {}),
    }


def transformers_preprocessor(resolution: int) -> dict:
    """BitImageProcessor settings that reproduce our evaluation input: resize to a square, [-1, 1]."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"height": resolution, "width": resolution},
        "resample": 2,  # bilinear, as our eval transform
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


# --------------------------------------------------------------------------- timm
def timm_model_name(arch: ArchSpec) -> str | None:
    """timm's registered name for a released architecture (`R50x1` -> `resnetv2_50x1_bit`), else None."""
    if arch.name not in RELEASED_ARCHS:
        return None
    return f"resnetv2_{arch.name[1:]}_bit"


def check_timm(config: dict, arch: ArchSpec, num_classes: int | None, path: Path) -> dict:
    """Check a timm hub config names the BiT model the tensors hold; returns `class_names`, `resolution`."""
    name = config.get("architecture")
    expected = timm_model_name(arch)
    if not isinstance(name, str) or not name.endswith("_bit"):
        raise BigTransferError(f"{path}: timm architecture {quoted(name)} is not one of timm's BiT models (resnetv2_*_bit)")
    if expected is not None and name != expected:
        raise BigTransferError(f"{path}: the config names {name}, but the tensors are {arch.name} ({expected})")
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    declared = config.get("num_classes", pretrained.get("num_classes"))
    if num_classes is not None and declared is not None and declared != num_classes:
        raise BigTransferError(f"{path}: the config says {quoted(declared)} classes, the head has {num_classes}")
    labels = config.get("label_names", pretrained.get("label_names"))
    if isinstance(labels, list):  # timm keeps a list, or a dict {index: name} where indices have gaps
        labels = {str(i): n for i, n in enumerate(labels)}
    elif isinstance(labels, dict):
        labels = {str(k): v for k, v in labels.items()}
    names = _label_names(labels, num_classes, path) if labels is not None else None
    size = pretrained.get("input_size")
    resolution = size[-1] if isinstance(size, list) and len(size) == 3 and isinstance(size[-1], int) else None
    return {"class_names": names, "resolution": resolution}


def timm_config(arch: ArchSpec, num_classes: int, class_names: list[str] | None, resolution: int) -> dict:
    """A timm hub config.json for our model: `timm.create_model('local-dir:FOLDER')` builds and loads it."""
    name = timm_model_name(arch)
    if name is None:
        raise BigTransferError(f"timm registers BiT only as {', '.join(RELEASED_ARCHS)}; {arch.name} has no timm name")
    config = {
        "architecture": name,
        "num_classes": num_classes,
        "num_features": arch.feature_dim,
        "global_pool": "avg",
        "pretrained_cfg": {
            "tag": "bigtransfer",
            "custom_load": False,
            "input_size": [3, resolution, resolution],
            "fixed_input_size": False,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "stem.conv",
            "classifier": "head.fc",
        },
    }
    if class_names is not None:
        config["label_names"] = list(class_names)
    return config
