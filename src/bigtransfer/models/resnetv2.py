"""ResNet-v2 with GroupNorm + Weight Standardization: the BiT model family.

Follows the paper (section 3.3) and the authors' release:
  root:  7x7/2 StdConv -> zero-pad 1 -> 3x3/2 max-pool (padding 0)
  unit:  pre-activation bottleneck, stride on the 3x3, projection shortcut on relu(norm1(x))
  head:  norm -> ReLU -> global average pool -> 1x1 conv (with bias)
The normalisation is a switch (`gn_ws`, `gn`, `bn_ws`, `bn`) so that the paper's ablation
(Tables 4 and 5) runs on the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BigTransferError

# Units per stage for each depth. 50/101/152 are the paper's; 14/26/38 are smaller members
# of the same family (same blocks, fewer units) for laptops, tests and the offline demo.
UNITS_BY_DEPTH: dict[int, tuple[int, int, int, int]] = {
    14: (1, 1, 1, 1),
    26: (2, 2, 2, 2),
    38: (3, 3, 3, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
RELEASED_ARCHS = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
NORMS = ("gn_ws", "gn", "bn_ws", "bn")
WS_EPS = 1e-10  # the authors' weight-standardization epsilon
# timm's BiT StdConv2d and transformers' WeightStandardizedConv2d use 1e-8: a model loaded from
# their files keeps theirs (ModelConfig.ws_eps), so that it computes what their library computes.
FOREIGN_WS_EPS = 1e-8
GN_EPS = 1e-5  # GroupNorm epsilon used by the release


@dataclass(frozen=True)
class ArchSpec:
    """A member of the family: units per stage and the width multiplier."""

    units: tuple[int, int, int, int]
    width: float

    @property
    def depth(self) -> int:
        return 3 * sum(self.units) + 2

    @property
    def root_channels(self) -> int:
        return round(64 * self.width)

    @property
    def feature_dim(self) -> int:
        """Channels of the pre-logits (2048 * width)."""
        return 4 * self.root_channels * 8

    @property
    def name(self) -> str:
        if UNITS_BY_DEPTH.get(self.depth) == self.units:
            return f"R{self.depth}x{self.width:g}"
        return f"R[{','.join(map(str, self.units))}]x{self.width:g}"


_ARCH_RE = re.compile(r"^R(?:(\d+)|\[(\d+),(\d+),(\d+),(\d+)\])x(\d+(?:\.\d+)?)$")


def parse_arch(name: str) -> ArchSpec:
    """`R50x1`, `R26x0.5` or `R[1,1,2,1]x0.5` -> ArchSpec."""
    match = _ARCH_RE.match(name.strip())
    if not match:
        raise BigTransferError(
            f"unknown architecture {name!r}: expected R<depth>x<width> (e.g. R50x1, R26x0.5) "
            f"or R[u1,u2,u3,u4]x<width>; depths: {sorted(UNITS_BY_DEPTH)}"
        )
    depth, *explicit, width_text = match.groups()
    if depth is not None:
        if int(depth) not in UNITS_BY_DEPTH:
            raise BigTransferError(
                f"unknown depth {depth} in {name!r}: choose one of {sorted(UNITS_BY_DEPTH)} "
                f"or give units explicitly, e.g. R[1,1,2,1]x0.5"
            )
        units = UNITS_BY_DEPTH[int(depth)]
    else:
        units = tuple(int(u) for u in explicit)
        if min(units) < 1:
            raise BigTransferError(f"{name!r}: every stage needs at least one unit")
    width = float(width_text)
    if width <= 0 or abs(64 * width - round(64 * width)) > 1e-9:
        raise BigTransferError(f"{name!r}: 64 * width must be a positive whole number of channels")
    return ArchSpec(units=units, width=width)  # type: ignore[arg-type]


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Per output channel: (w - mean) / sqrt(biased var + eps) over (in, kh, kw).

    layer_norm over each flattened kernel computes exactly this in one fused kernel (8x faster
    on CPU than var_mean + sub + mul), and autocast keeps it in fp32.
    """
    out_channels = weight.shape[0]
    flat = weight.reshape(out_channels, -1)
    return F.layer_norm(flat, flat.shape[1:], eps=eps).reshape_as(weight)


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is weight-standardized: on every forward pass while training (so the
    gradient flows through the standardization), once while only running forward.

    In eval mode with no gradient wanted for the kernel, the standardized kernel is a constant:
    it is computed once and kept with the key of the weight it came from (its in-place version
    counter, storage address, dtype and device). An optimizer step, `load_state_dict`, `.to()` or
    any in-place edit changes the key, and `train()` drops the kept kernel, so it is recomputed.
    Edits through `.data` bypass the version counter (as they bypass autograd's checks): call
    `train()`/`eval()` or `forget_standardized()` after one. The kept pair is one tuple, read and
    replaced whole, so threads running forward at once at worst compute it twice.
    """

    def __init__(self, *args, eps: float = WS_EPS, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.keep_standardized = True  # off under FSDP, where a whole kernel per layer would undo the sharding
        self._standardized: tuple[tuple, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def standardized_weight(self) -> torch.Tensor:
        """The standardized kernel: the kept one when it is still the current weight's."""
        if not self._may_keep():
            return standardize_weight(self.weight, self.eps)
        weight = self.weight
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, self.eps)
        kept = self._standardized
        if kept is not None and kept[0] == key:
            return kept[1]
        # A plain tensor (not an inference-mode one), so that it may also meet inputs that need a
        # gradient; computed in the weight's dtype whatever autocast says (layer_norm runs in fp32
        # under autocast anyway, so this is what the per-forward path computes).
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            standardized = standardize_weight(weight, self.eps)
        self._standardized = (key, standardized)
        return standardized

    def _may_keep(self) -> bool:
        if self.training or not self.keep_standardized:
            return False
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return False  # the gradient must flow through the standardization
        # Tracing (torch.compile, torch.export, ONNX, TorchScript) records the computation itself;
        # compilers with frozen weights fold it into a constant on their own.
        return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())

    def forget_standardized(self) -> None:
        """Drop the kept standardized kernel (after editing the weight through `.data`)."""
        self._standardized = None

    def train(self, mode: bool = True):
        self._standardized = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._standardized = None  # moved or cast: the kept kernel belongs to the old tensor
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._standardized = None
        return super()._load_from_state_dict(*args, **kwargs)


def keep_standardized_kernels(model: nn.Module, keep: bool) -> None:
    """Turn keeping standardized kernels between forward passes on or off in every StdConv2d."""
    for module in model.modules():
        if isinstance(module, StdConv2d):
            module.keep_standardized = keep
            module.forget_standardized()


def fold_standardization(model: nn.Module) -> nn.Module:
    """Replace (in place) every StdConv2d by a plain Conv2d holding its standardized kernel.

    For models that only run forward: the kernels are standardized once, the originals freed,
    and exporters (ONNX, torch.compile) see ordinary convolutions with constant weights."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, StdConv2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                  padding=child.padding, dilation=child.dilation, groups=child.groups,
                                  bias=child.bias is not None, device="meta")
                with torch.no_grad():
                    plain.weight = nn.Parameter(standardize_weight(child.weight, child.eps), requires_grad=False)
                    if child.bias is not None:
                        plain.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(module, child_name, plain)
    return model


class _Layers:
    """Builds the conv and norm layers for one of the four normalisation choices."""

    def __init__(self, norm: str, groups: int, ws_eps: float = WS_EPS):
        if norm not in NORMS:
            raise BigTransferError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
        self.norm_kind = norm
        self.groups = groups
        self.ws_eps = ws_eps

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
        if self.norm_kind.endswith("_ws"):
            return StdConv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False, eps=self.ws_eps)
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)

    def norm(self, channels: int) -> nn.Module:
        if self.norm_kind.startswith("bn"):
            return nn.BatchNorm2d(channels)
        if channels % self.groups:
            raise BigTransferError(
                f"GroupNorm with {self.groups} groups needs channel counts divisible by "
                f"{self.groups}, got {channels}: use a width whose 64*width is a multiple of "
                f"{self.groups}, or fewer groups"
            )
        return nn.GroupNorm(self.groups, channels, eps=GN_EPS)


class PreActBottleneck(nn.Module):
    """ResNet-v2 bottleneck unit: norm-ReLU before each conv, stride on the 3x3."""

    def __init__(self, layers: _Layers, cin: int, cout: int, cmid: int, stride: int):
        super().__init__()
        self.norm1 = layers.norm(cin)
        self.conv1 = layers.conv(cin, cmid, 1)
        self.norm2 = layers.norm(cmid)
        self.conv2 = layers.conv(cmid, cmid, 3, stride)
        self.norm3 = layers.norm(cmid)
        self.conv3 = layers.conv(cmid, cout, 1)
        needs_projection = stride != 1 or cin != cout
        self.downsample = layers.conv(cin, cout, 1, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.norm1(x), inplace=True)
        # The projection sees the pre-activated input; the identity sees the raw input.
        shortcut = x if self.downsample is None else self.downsample(pre)
        y = self.conv1(pre)
        y = self.conv2(F.relu(self.norm2(y), inplace=True))
        y = self.conv3(F.relu(self.norm3(y), inplace=True))
        return y + shortcut


class Root(nn.Module):
    """7x7/2 conv, then zero padding and an unpadded 3x3/2 max-pool.

    Zero padding is not the same as MaxPool2d(padding=1), which pads with -inf: the root
    has no activation before the pool, so negative values at the border differ.
    """

    def __init__(self, layers: _Layers, channels: int):
        super().__init__()
        self.conv = layers.conv(3, channels, 7, stride=2)
        self.pad = nn.ConstantPad2d(1, 0.0)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pad(self.conv(x)))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's structure (stored in checkpoints)."""

    arch: ArchSpec
    num_classes: int
    norm: str = "gn_ws"
    groups: int = 32
    ws_eps: float = WS_EPS  # the weight-standardization epsilon (see WS_EPS)


class ResNetV2(nn.Module):
    """BiT ResNet-v2. `forward` maps images in [-1, 1] to logits; `forward_features` to pre-logits."""

    def __init__(self, config: ModelConfig, zero_head: bool = True):
        super().__init__()
        if config.num_classes < 1:
            raise BigTransferError(f"num_classes must be at least 1, got {config.num_classes}")
        self.config = config
        layers = _Layers(config.norm, config.groups, config.ws_eps)
        arch = config.arch
        width = arch.root_channels
        self.root = Root(layers, width)
        stages = []
        cin = width
        for index, num_units in enumerate(arch.units):
            cmid = width * 2**index
            cout = 4 * cmid
            stride = 1 if index == 0 else 2
            units = [
                PreActBottleneck(layers, cin if u == 0 else cout, cout, cmid, stride if u == 0 else 1)
                for u in range(num_units)
            ]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.norm = layers.norm(cin)
        # Off (p=0) unless a run asks for it (hyper-parameter search, Supp. A); no parameters, so
        # checkpoints do not see it.
        self.pre_logits_dropout = nn.Dropout(0.0)
        self.head = nn.Conv2d(cin, config.num_classes, kernel_size=1, bias=True)
        self._init_weights(zero_head)

    @property
    def num_features(self) -> int:
        return self.config.arch.feature_dim

    def _init_weights(self, zero_head: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.head:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.reset_head(self.config.num_classes, zero_init=zero_head)

    def reset_head(self, num_classes: int, zero_init: bool = True) -> None:
        """Replace the head with a fresh one for `num_classes` (all zeros by default, as in BiT)."""
        if num_classes < 1:
            raise BigTransferError(f"num_classes must be at least 1, got {num_classes}")
        # Placed like the body (the old head may still be on the meta device after a partial load).
        body_weight = self.root.conv.weight
        head = nn.Conv2d(self.head.in_channels, num_classes, kernel_size=1, bias=True)
        head.to(device=body_weight.device, dtype=body_weight.dtype)
        if zero_init:
            nn.init.zeros_(head.weight)
        else:
            nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        self.head = head
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits [N, 2048*width]: body -> norm -> ReLU -> global average pool."""
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU inference runs 1.2-1.4x faster in channels_last (oneDNN convolutions and the
            # max-pool; see benchmarks/results/forward_cpu_fp32.md). Training gains nothing, and
            # the outputs are [N, C], so callers never see the layout.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stages(self.root(x))
        x = F.relu(self.norm(x), inplace=True)
        return x.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits_dropout(features)[:, :, None, None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def _body_parameters(arch: ArchSpec, norm: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = ResNetV2(ModelConfig(arch, 1, norm))
    return count_parameters(model) - count_parameters(model.head)


def parameter_count(arch: ArchSpec, num_classes: int, norm: str = "gn_ws") -> int:
    """Parameters of `arch` with a `num_classes` head, without allocating the model."""
    return _body_parameters(arch, norm) + arch.feature_dim * num_classes + num_classes
