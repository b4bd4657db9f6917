"""Checkpoint I/O: the authors' .npz layout, big_vision's layout, .safetensors, and refusals."""

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from bit_files import UNITS, authors_arrays, pooled_authors_arrays, to_big_vision
from library_models import size_marks

from bigtransfer import BigTransferError, create_model, read_metadata, save_checkpoint
from bigtransfer.models.checkpoint import load_state_dict, summarize

TINY = "R[1,2,1,1]x0.5"
TINY_UNITS = (1, 2, 1, 1)
ARCHS = [  # (name, units, width); the big ones write multi-GB files: slow, and one at a time
    ("R50x1", UNITS[50], 1),
    ("R101x1", UNITS[101], 1),
    pytest.param("R50x3", UNITS[50], 3, marks=size_marks("R50x3")),
    pytest.param("R101x3", UNITS[101], 3, marks=size_marks("R101x3")),
    pytest.param("R152x2", UNITS[152], 2, marks=size_marks("R152x2")),
    pytest.param("R152x4", UNITS[152], 4, marks=size_marks("R152x4")),
]


def write_npz(path, arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def tiny_npz(tmp_path):
    return write_npz(tmp_path / "tiny.npz", authors_arrays(TINY_UNITS, 0.5, num_classes=6, seed=1))


def logits(model, seed=0, size=48):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name, units, width", ARCHS)
def test_random_authors_npz_loads_into_every_architecture(tmp_path, name, units, width):
    # Views into one pool of random values: a released-size file without drawing 936M values or
    # holding a second copy of them beside the loaded model.
    arrays = pooled_authors_arrays(units, width, num_classes=1000, seed=7)
    path = write_npz(tmp_path / f"{name}.npz", arrays)
    model = create_model(name, weights=path)
    params = dict(model.named_parameters())
    assert len(params) == len(arrays)  # every tensor in the file became exactly one parameter
    last_unit = f"stages.3.{units[3] - 1}"
    checks = {  # model name -> (file name, HWIO->OIHW?)
        "root.conv.weight": ("resnet/root_block/standardized_conv2d/kernel", True),
        "stages.0.0.downsample.weight": ("resnet/block1/unit01/a/proj/standardized_conv2d/kernel", True),
        "stages.1.0.conv2.weight": ("resnet/block2/unit01/b/standardized_conv2d/kernel", True),
        "stages.2.1.norm2.weight": ("resnet/block3/unit02/b/group_norm/gamma", False),
        f"{last_unit}.norm1.bias": (f"resnet/block4/unit{units[3]:02d}/a/group_norm/beta", False),
        f"{last_unit}.conv3.weight": (f"resnet/block4/unit{units[3]:02d}/c/standardized_conv2d/kernel", True),
        "norm.weight": ("resnet/group_norm/gamma", False),
        "head.bias": ("resnet/head/conv2d/bias", False),
    }
    for ours, (theirs, transpose) in checks.items():
        expected = arrays[theirs].transpose(3, 2, 0, 1) if transpose else arrays[theirs]
        np.testing.assert_array_equal(params[ours].detach().numpy(), expected)
    head = arrays["resnet/head/conv2d/kernel"][0, 0].T[:, :, None, None]
    np.testing.assert_array_equal(params["head.weight"].detach().numpy(), head)


def test_npz_without_head_needs_num_classes_and_gets_a_zero_head(tmp_path):
    path = write_npz(tmp_path / "nohead.npz", authors_arrays(TINY_UNITS, 0.5, num_classes=None))
    assert summarize(path).num_classes is None
    with pytest.raises(BigTransferError, match="no head; pass num_classes"):
        create_model(TINY, weights=path)
    model = create_model(TINY, num_classes=3, weights=path)
    assert model.head.weight.abs().sum() == 0 and model.config.num_classes == 3


def test_changing_class_count_keeps_body_and_zeroes_head(tiny_npz):
    original = create_model(TINY, weights=tiny_npz)
    adapted = create_model(TINY, num_classes=11, weights=tiny_npz)
    assert adapted.head.weight.shape[0] == 11 and adapted.head.weight.abs().sum() == 0
    torch.testing.assert_close(adapted.forward_features(torch.ones(1, 3, 32, 32)),
                               original.forward_features(torch.ones(1, 3, 32, 32)))


def test_big_vision_layout_gives_the_same_model(tmp_path):
    arrays = authors_arrays(TINY_UNITS, 0.5, num_classes=6, seed=2)
    tf_model = create_model(TINY, weights=write_npz(tmp_path / "tf.npz", arrays))
    bv_model = create_model(TINY, weights=write_npz(tmp_path / "bv.npz", to_big_vision(arrays)))
    torch.testing.assert_close(logits(tf_model), logits(bv_model), rtol=0, atol=0)
    # big_vision checkpoints may nest everything under params/
    nested = {f"params/{k}": v for k, v in to_big_vision(arrays).items()}
    nested_model = create_model(TINY, weights=write_npz(tmp_path / "nested.npz", nested))
    torch.testing.assert_close(logits(tf_model), logits(nested_model), rtol=0, atol=0)


def test_numbered_conv_scope_names_are_accepted(tmp_path):
    """Some released files name scopes `standardized_conv2d_1` etc."""
    plain = authors_arrays(TINY_UNITS, 0.5, num_classes=6, seed=5)
    quirky = authors_arrays(TINY_UNITS, 0.5, num_classes=6, seed=5, conv_suffix="_3")
    a = create_model(TINY, weights=write_npz(tmp_path / "a.npz", plain))
    b = create_model(TINY, weights=write_npz(tmp_path / "b.npz", quirky))
    torch.testing.assert_close(logits(a), logits(b), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["gn_ws", "bn_ws"])
def test_safetensors_round_trip_gives_identical_logits(tmp_path, norm):
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=4, zero_head=False, norm=norm)
    if norm.startswith("bn"):  # give the BN running statistics something to carry
        model.train()(torch.randn(8, 3, 32, 32))
    names = ["cat", "dog", "fish", "newt"]
    path = save_checkpoint(model, tmp_path / "m.safetensors", class_names=names, resolution=128,
                           provenance={"source": "unit test"})
    reloaded = create_model(TINY, weights=path)
    assert reloaded.config == model.config
    torch.testing.assert_close(logits(model), logits(reloaded), rtol=0, atol=0)
    meta = read_metadata(path)
    assert meta["class_names"] == names and meta["resolution"] == 128
    assert meta["value_range"] == [-1.0, 1.0] and meta["provenance"]["source"] == "unit test"
    assert meta["architecture"] == "R[1,2,1,1]x0.5" and meta["norm"] == norm
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file behind"


def test_npz_to_safetensors_keeps_logits(tmp_path, tiny_npz):
    model = create_model(TINY, weights=tiny_npz)
    path = save_checkpoint(model, tmp_path / "tiny.safetensors")
    torch.testing.assert_close(logits(model), logits(create_model(TINY, weights=path)), rtol=0, atol=0)


# --------------------------------------------------------------------------- clear errors
def test_wrong_architecture_names_both(tmp_path):
    path = write_npz(tmp_path / "r101.npz", pooled_authors_arrays(UNITS[101], 1, num_classes=1000))
    with pytest.raises(BigTransferError, match=r"this file is R101x1 \(1000 classes\), you asked for R50x1"):
        create_model("R50x1", weights=path)


def test_wrong_width_is_reported_as_architecture(tmp_path, tiny_npz):
    with pytest.raises(BigTransferError, match=r"this file is R\[1,2,1,1\]x0.5 .*you asked for R\[1,2,1,1\]x1$"):
        create_model("R[1,2,1,1]x1", weights=tiny_npz)


def test_missing_key_is_named(tmp_path):
    arrays = authors_arrays(TINY_UNITS, 0.5, num_classes=6)
    del arrays["resnet/block2/unit02/b/group_norm/gamma"]
    path = write_npz(tmp_path / "missing.npz", arrays)
    with pytest.raises(BigTransferError, match=r"missing tensor 'resnet/block2/unit02/b/group_norm/gamma'"):
        create_model(TINY, weights=path)


def test_wrong_shape_is_named_with_expectation(tmp_path):
    arrays = authors_arrays(TINY_UNITS, 0.5, num_classes=6)
    arrays["resnet/block3/unit01/b/standardized_conv2d/kernel"] = np.zeros((3, 3, 128, 64), np.float32)
    path = write_npz(tmp_path / "shape.npz", arrays)
    with pytest.raises(BigTransferError, match=r"'resnet/block3/unit01/b/standardized_conv2d/kernel' has shape "
                                               r"\(3, 3, 128, 64\), expected \(3, 3, 128, 128\)"):
        create_model(TINY, weights=path)


def test_nothing_is_copied_when_validation_fails(tmp_path):
    arrays = authors_arrays(TINY_UNITS, 0.5, num_classes=6)
    arrays["resnet/group_norm/beta"] = np.zeros(7, np.float32)  # last tensor in the table
    path = write_npz(tmp_path / "late.npz", arrays)
    model = create_model(TINY, num_classes=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BigTransferError, match="resnet/group_norm/beta"):
        load_state_dict(path, model, load_head=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_npz(tmp_path, tiny_npz):
    data = tiny_npz.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BigTransferError, match=r"cut.npz: truncated or corrupt \.npz"):
        create_model(TINY, weights=cut)


def test_corrupt_npz_member(tmp_path):
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("resnet/root_block/standardized_conv2d/kernel.npy", b"\x93NUMPY garbage")
    with pytest.raises(BigTransferError, match=r"bad.npz: .*corrupt \.npz"):
        create_model(TINY, weights=path)


def test_truncated_safetensors(tmp_path):
    path = save_checkpoint(create_model(TINY, num_classes=2), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(BigTransferError, match=r"m.safetensors: truncated or corrupt \.safetensors"):
        create_model(TINY, weights=path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_pickle_is_refused_without_unpickling(tmp_path, zip_format):
    path = tmp_path / "model.pt"
    torch.save(create_model(TINY, num_classes=2).state_dict(), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(BigTransferError, match=r"model.pt: this is a pickle-based PyTorch file; .*never unpickles"):
        create_model(TINY, weights=path)


def test_plain_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "weights.npz"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(BigTransferError, match="pickle"):
        create_model(TINY, weights=path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"\x01\x02", "file is truncated"),
    (b"hello, this is not a checkpoint at all", "not a .npz or .safetensors"),
])
def test_unrecognised_files(tmp_path, content, message):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(BigTransferError, match=message):
        create_model(TINY, weights=path)


def test_missing_file(tmp_path):
    with pytest.raises(BigTransferError, match="no such weights file"):
        create_model(TINY, weights=tmp_path / "nope.npz")


def test_safetensors_without_our_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(BigTransferError, match="without bigtransfer metadata"):
        create_model(TINY, weights=path)


def test_npz_into_bn_model_is_refused(tiny_npz):
    with pytest.raises(BigTransferError, match="norm=gn_ws .* you asked for norm=bn_ws"):
        model = create_model(TINY, num_classes=6, norm="bn_ws")
        load_state_dict(tiny_npz, model, load_head=True)


def test_not_a_bit_checkpoint(tmp_path):
    path = write_npz(tmp_path / "other.npz", {"w": np.zeros(3)})
    with pytest.raises(BigTransferError, match="not a BiT checkpoint"):
        summarize(path)


def test_info_metadata_is_json(tmp_path, tiny_npz):
    meta = read_metadata(tiny_npz)
    assert meta["architecture"] == "R[1,2,1,1]x0.5" and meta["num_classes"] == 6
    json.dumps(meta)


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_safetensors_whose_header_length_looks_like_pickle_or_zip(tmp_path, first_bytes):
    """A safetensors file starts with its header's length; 0x80.. or 'PK' there is still safetensors."""
    from safetensors.torch import save_file

    from bigtransfer.models.checkpoint import sniff_format

    target = int.from_bytes(first_bytes, "little") + (0x1000 if first_bytes == b"\x80" else 0)
    path = tmp_path / "w.safetensors"
    pad = 0
    while True:  # grow the metadata until the header has exactly the length we want
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        length = int.from_bytes(path.read_bytes()[:8], "little")
        if length >= target:
            break
        pad += target - length
    assert path.read_bytes()[:len(first_bytes)] == first_bytes
    assert sniff_format(path) == "safetensors"
