"""The BiT architecture: sizes, shapes, weight standardization, GroupNorm, root padding."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bit_files import authors_arrays, reference_logits

from bigtransfer import BigTransferError, create_model
from bigtransfer.models.resnetv2 import (
    RELEASED_ARCHS,
    ResNetV2,
    StdConv2d,
    count_parameters,
    parameter_count,
    parse_arch,
)

# PAPER-FACTS.md: parameter counts in millions with a 1000-way (and 21843-way) head.
PAPER_PARAMS_1000 = {"R50x1": 25.5, "R50x3": 217.3, "R101x1": 44.5, "R101x3": 387.9, "R152x2": 236.3, "R152x4": 936.5}
PAPER_PARAMS_21K = {"R50x1": 68.3, "R152x4": 1107.3}
WIDTH = {"R50x1": 1, "R50x3": 3, "R101x1": 1, "R101x3": 3, "R152x2": 2, "R152x4": 4}


@functools.cache
def meta_model(name, num_classes=1000):
    with torch.device("meta"):  # shapes without memory: lets every architecture be checked quickly
        return create_model(name, num_classes=num_classes)


@pytest.mark.parametrize("arch", RELEASED_ARCHS)
def test_parameter_count_matches_paper(arch):
    model = meta_model(arch, num_classes=1000)
    assert round(count_parameters(model) / 1e6, 1) == PAPER_PARAMS_1000[arch]
    assert parameter_count(parse_arch(arch), 1000) == count_parameters(model)


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS_21K))
def test_parameter_count_with_imagenet21k_head(arch):
    model = meta_model(arch, num_classes=21843)
    assert round(count_parameters(model) / 1e6, 1) == PAPER_PARAMS_21K[arch]


@pytest.mark.parametrize("arch", RELEASED_ARCHS)
@pytest.mark.parametrize("size", [128, 224, 384, 480])
def test_output_shapes(arch, size):
    model = meta_model(arch, num_classes=1000)
    x = torch.empty(2, 3, size, size, device="meta")
    assert model(x).shape == (2, 1000)
    assert model.forward_features(x).shape == (2, 2048 * WIDTH[arch])
    # The body downsamples by 32 (root 4x, three strided stages 8x).
    body = model.stages(model.root(x))
    assert body.shape[-1] == -(-size // 32)


@functools.cache
def real_r50x1():
    """One randomly initialised R50x1 for every size below: they only run it forward."""
    torch.manual_seed(0)
    return create_model("R50x1", num_classes=7, zero_head=False).eval()


@pytest.mark.parametrize("size", [128, 224, 384, 480])
def test_real_forward_shapes_r50x1(size):
    """The meta-device shapes above are what real computation produces."""
    model = real_r50x1()
    with torch.inference_mode():
        x = torch.randn(1, 3, size, size)
        logits, features = model(x), model.forward_features(x)
    assert logits.shape == (1, 7) and features.shape == (1, 2048)
    assert torch.isfinite(logits).all()


def test_weight_standardization_is_applied():
    conv = StdConv2d(8, 16, 3, padding=1, bias=False)
    x = torch.randn(2, 8, 10, 10)
    w = conv.weight.detach()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    std = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False).sqrt()
    expected = F.conv2d(x, (w - mean) / std, padding=1)
    raw = F.conv2d(x, w, padding=1)
    out = conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, raw, atol=1e-2)


def _scale_and_shift_kernels(model):
    """w -> a*w + b per output channel: invisible through weight standardization, not otherwise."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module is not model.head:
                out_ch = module.weight.shape[0]
                a = torch.rand(out_ch, 1, 1, 1, generator=gen) * 4 + 0.5
                b = torch.randn(out_ch, 1, 1, 1, generator=gen)
                module.weight.mul_(a).add_(b)


@pytest.mark.parametrize("norm, invariant", [("gn_ws", True), ("bn_ws", True), ("gn", False)])
def test_whole_model_is_invariant_to_kernel_scale_only_with_ws(norm, invariant):
    torch.manual_seed(0)
    # train(): BN normalises with batch statistics (fresh running stats would blow up); GN is unaffected.
    model = create_model("R[1,1,1,1]x0.5", num_classes=5, zero_head=False, norm=norm).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        _scale_and_shift_kernels(model)
        after = model(x)
    assert torch.allclose(before, after, rtol=1e-3, atol=1e-4) == invariant


@pytest.mark.parametrize("arch", RELEASED_ARCHS)
def test_groupnorm_has_32_groups_everywhere(arch):
    model = meta_model(arch)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    units = sum(parse_arch(arch).units)
    assert len(norms) == 3 * units + 1  # three per unit + the pre-head norm
    assert all(m.num_groups == 32 for m in norms)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.head]
    assert convs and all(isinstance(m, StdConv2d) for m in convs)


@pytest.mark.parametrize("norm, norm_type, ws", [
    ("gn_ws", torch.nn.GroupNorm, True), ("gn", torch.nn.GroupNorm, False),
    ("bn_ws", torch.nn.BatchNorm2d, True), ("bn", torch.nn.BatchNorm2d, False),
])
def test_norm_option_selects_layers(norm, norm_type, ws):
    model = create_model("R[1,1,1,1]x0.5", num_classes=3, norm=norm)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
    assert norms and all(type(m) is norm_type for m in norms)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.head]
    assert all(isinstance(m, StdConv2d) == ws for m in convs)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # every variant trains


def test_root_pads_with_zeros_not_minus_infinity():
    """A root conv that outputs negatives everywhere: the zero padding wins the border max."""
    model = create_model("R[1,1,1,1]x0.5", num_classes=2)
    with torch.no_grad():
        # After standardization input channel 0 keeps a negative kernel, channels 1-2 a positive one.
        model.root.conv.weight.fill_(1.0)
        model.root.conv.weight[:, 0] = -1.0
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0] = 1.0
    conv_out = model.root.conv(x)
    assert (conv_out < 0).all()
    pooled = model.root(x)
    assert pooled[0, :, 0, 0].eq(0).all()  # corner window touches the zero padding
    assert (pooled[0, :, 1:, 1:] < 0).all()  # interior windows do not


def test_matches_a_reference_forward_written_from_the_paper(tmp_path):
    """Logits of a loaded model equal an independent functional implementation of BiT."""
    units = (1, 2, 1, 1)
    arrays = authors_arrays(units, 0.5, num_classes=6, seed=3)
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    model = create_model("R[1,2,1,1]x0.5", weights=path).double().eval()
    x = torch.rand(2, 3, 70, 70, dtype=torch.float64) * 2 - 1  # odd size: exercises padding
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(ours, reference_logits(arrays, units, x), rtol=1e-6, atol=1e-6)


def test_r50x1_matches_reference_forward(tmp_path):
    units = (3, 4, 6, 3)
    arrays = authors_arrays(units, 1, num_classes=10, seed=4)
    path = tmp_path / "r50.npz"
    np.savez(path, **arrays)
    model = create_model("R50x1", weights=path).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ours = model(x).double()
    torch.testing.assert_close(ours, reference_logits(arrays, units, x), rtol=1e-3, atol=1e-3)


def test_new_head_is_zero_and_replaceable():
    model = create_model("R[1,1,1,1]x0.5", num_classes=4)
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    assert model(torch.randn(2, 3, 32, 32)).abs().sum() == 0
    model.reset_head(9)
    assert model.config.num_classes == 9
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 9)


@pytest.mark.parametrize("name, units, width", [
    ("R50x1", (3, 4, 6, 3), 1.0), ("R152x4", (3, 8, 36, 3), 4.0),
    ("R26x0.5", (2, 2, 2, 2), 0.5), ("R[1,1,2,1]x1.5", (1, 1, 2, 1), 1.5),
])
def test_parse_arch(name, units, width):
    spec = parse_arch(name)
    assert (spec.units, spec.width) == (units, width)
    assert parse_arch(spec.name) == spec


@pytest.mark.parametrize("name, message", [
    ("R51x1", "unknown depth 51"), ("ResNet50", "unknown architecture"),
    ("R50x0.3", "whole number of channels"), ("R[0,1,1,1]x1", "at least one unit"),
])
def test_bad_architecture_names(name, message):
    with pytest.raises(BigTransferError, match=message):
        parse_arch(name)


def test_small_width_needs_divisible_groups():
    with pytest.raises(BigTransferError, match="divisible by 32"):
        create_model("R26x0.25")
    model = create_model("R26x0.25", groups=8)  # smaller members can use fewer groups
    assert all(m.num_groups == 8 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert isinstance(model, ResNetV2)


def test_cpu_inference_layout_switch_does_not_change_results():
    """No-grad CPU passes run in channels_last internally; they must match the training path."""
    torch.manual_seed(0)
    model = create_model("R[1,2,1,1]x0.5", num_classes=5, zero_head=False).eval()
    x = torch.rand(3, 3, 75, 75) * 2 - 1
    with torch.no_grad():
        fast = model(x)
    slow = model(x)  # grad enabled: contiguous NCHW path
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)
