"""Test helpers that write BiT checkpoints the way the authors' release lays them out.

Written from PAPER-FACTS.md, independently of bigtransfer's own name mapping, so that a
mistake in the loader's mapping shows up as a failing test instead of being mirrored here.
"""

from __future__ import annotations

import numpy as np

UNITS = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def authors_arrays(units, width, num_classes=None, seed=0, conv_suffix="", zeros=False):
    """Random float32 arrays named as in the authors' `.npz`: HWIO kernels under `resnet/`
    (`zeros`: all zero instead, which deflates to almost nothing: a released-size file to serve fast)."""
    rng = np.random.default_rng(seed)

    def normal(shape):
        return np.zeros(shape, np.float32) if zeros else rng.standard_normal(shape, dtype=np.float32)

    return _authors_layout(units, width, num_classes, conv_suffix, normal)


# A prime count of standard-normal values: slices of it at shifting offsets fill a released-size
# file with a copy instead of a random draw per value (seconds less for R152x4's 936M values),
# and no tensor dimension divides it, so a transposed or misplaced tensor still shows.
_POOL_SPAN = 1_000_003


def _normal_pool(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(size + _POOL_SPAN, dtype=np.float32)


def pooled_authors_arrays(units, width, num_classes=None, seed=0):
    """`authors_arrays`' names, shapes and scales, each tensor a read-only view into one seeded pool of
    normal values (a different offset per tensor): as good as random for loading checks, and a
    released-size set costs the pool's memory, not the file's."""
    largest = max(9 * (64 * width * 8) ** 2, 4 * 64 * width * 8 * (num_classes or 1))
    pool = _normal_pool(int(largest), seed)
    pool.setflags(write=False)
    counter = iter(range(1, 1 << 30))

    def normal(shape):
        size = int(np.prod(shape))
        start = (next(counter) * 7919) % _POOL_SPAN
        return pool[start:start + size].reshape(shape)

    return _authors_layout(units, width, num_classes, "", normal)


def _authors_layout(units, width, num_classes, conv_suffix, normal):
    """The authors' tensor names and shapes for (units, width), values drawn with `normal(shape)`."""

    def kernel(h, w, cin, cout):
        return normal((h, w, cin, cout))

    def norm(prefix, channels):
        return {
            f"{prefix}/group_norm/gamma": 1 + 0.1 * normal(channels),
            f"{prefix}/group_norm/beta": 0.1 * normal(channels),
        }

    conv = f"standardized_conv2d{conv_suffix}"
    c0 = int(64 * width)
    arrays = {f"resnet/root_block/{conv}/kernel": kernel(7, 7, 3, c0)}
    cin = c0
    for b, n in enumerate(units, start=1):
        mid = c0 * 2 ** (b - 1)
        out = 4 * mid
        for u in range(1, n + 1):
            p = f"resnet/block{b}/unit{u:02d}"
            unit_in = cin if u == 1 else out
            arrays.update(norm(f"{p}/a", unit_in))
            arrays[f"{p}/a/{conv}/kernel"] = kernel(1, 1, unit_in, mid)
            arrays.update(norm(f"{p}/b", mid))
            arrays[f"{p}/b/{conv}/kernel"] = kernel(3, 3, mid, mid)
            arrays.update(norm(f"{p}/c", mid))
            arrays[f"{p}/c/{conv}/kernel"] = kernel(1, 1, mid, out)
            if u == 1:
                arrays[f"{p}/a/proj/{conv}/kernel"] = kernel(1, 1, unit_in, out)
        cin = out
    arrays.update(norm("resnet", cin))
    if num_classes:
        arrays["resnet/head/conv2d/kernel"] = 0.01 * kernel(1, 1, cin, num_classes)
        arrays["resnet/head/conv2d/bias"] = 0.1 * normal(num_classes)
    return arrays


def to_big_vision(arrays):
    """The same tensors under big_vision's names (GroupNorm params as [1, 1, 1, C], dense head)."""
    out = {}
    for key, value in arrays.items():
        parts = key.split("/")[1:]  # drop 'resnet'
        if parts[0] == "root_block":
            out["root_block/conv_root/kernel"] = value
        elif parts[0] == "group_norm":
            out[f"norm-pre-head/{'scale' if parts[1] == 'gamma' else 'bias'}"] = value.reshape(1, 1, 1, -1)
        elif parts[0] == "head":
            out["head/kernel" if parts[2] == "kernel" else "head/bias"] = value[0, 0] if value.ndim == 4 else value
        else:
            block, unit, letter = parts[:3]
            i = "abc".index(letter) + 1
            if parts[3] == "proj":
                out[f"{block}/{unit}/conv_proj/kernel"] = value
            elif parts[3] == "group_norm":
                out[f"{block}/{unit}/gn{i}/{'scale' if parts[4] == 'gamma' else 'bias'}"] = value.reshape(1, 1, 1, -1)
            else:
                out[f"{block}/{unit}/conv{i}/kernel"] = value
    return out


def reference_logits(arrays, units, x, groups=32):
    """BiT forward pass written straight from the paper's description, on the TF arrays."""
    import torch
    import torch.nn.functional as F

    def w(key):
        k = torch.from_numpy(arrays[key]).permute(3, 2, 0, 1).double()
        m = k.mean(dim=(1, 2, 3), keepdim=True)
        v = ((k - m) ** 2).mean(dim=(1, 2, 3), keepdim=True)
        return (k - m) / torch.sqrt(v + 1e-10)

    def gn(h, prefix):
        g = torch.from_numpy(arrays[f"{prefix}/group_norm/gamma"]).double()
        b = torch.from_numpy(arrays[f"{prefix}/group_norm/beta"]).double()
        return F.relu(F.group_norm(h, groups, g, b, eps=1e-5))

    conv = "standardized_conv2d"
    h = F.conv2d(x.double(), w(f"resnet/root_block/{conv}/kernel"), stride=2, padding=3)
    h = F.max_pool2d(F.pad(h, (1, 1, 1, 1), value=0.0), 3, stride=2)
    for b, n in enumerate(units, start=1):
        for u in range(1, n + 1):
            p = f"resnet/block{b}/unit{u:02d}"
            stride = 2 if (u == 1 and b > 1) else 1
            a = gn(h, f"{p}/a")
            shortcut = F.conv2d(a, w(f"{p}/a/proj/{conv}/kernel"), stride=stride) if u == 1 else h
            y = F.conv2d(a, w(f"{p}/a/{conv}/kernel"))
            y = F.conv2d(gn(y, f"{p}/b"), w(f"{p}/b/{conv}/kernel"), stride=stride, padding=1)
            y = F.conv2d(gn(y, f"{p}/c"), w(f"{p}/c/{conv}/kernel"))
            h = y + shortcut
    pre = gn(h, "resnet").mean(dim=(2, 3))
    kernel = torch.from_numpy(arrays["resnet/head/conv2d/kernel"][0, 0]).double()
    return pre @ kernel + torch.from_numpy(arrays["resnet/head/conv2d/bias"]).double()
