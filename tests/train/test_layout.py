"""The training loop's memory layout: NCHW for small CPU steps, channels_last otherwise."""

import pytest
import torch

from bigtransfer import create_model
from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.sources import load_source
from bigtransfer.data.transforms import train_transform
from bigtransfer.train.distributed import DistContext
from bigtransfer.train.execution import ExecutionOptions
from bigtransfer.train.layout import training_layout
from bigtransfer.train.loop import train
from bigtransfer.train.recipe import TrainingRecipe
from bigtransfer.train.schedule import LRSchedule

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, precision, micro_batch, side, expected", [
    (CPU, "fp32", 16, 32, torch.contiguous_format),  # the demo's fine-tuning step
    (CPU, "fp32", 128, 32, torch.channels_last),  # the demo's pre-training step
    (CPU, "fp32", 64, 32, torch.contiguous_format),  # exactly at the crossover: NCHW
    (CPU, "fp32", 32, 128, torch.channels_last),
    (CPU, "bf16", 128, 32, torch.contiguous_format),  # bf16 autocast on a CPU: NCHW up to 16 x 128 px
    (CPU, "bf16", 16, 128, torch.contiguous_format),
    (CPU, "bf16", 32, 128, torch.channels_last),  # measured even; the old layout
    (CPU, "fp32", 16, 0, torch.channels_last),  # side unknown: the old default
    (CUDA, "fp32", 16, 32, torch.channels_last),  # tensor cores want channels_last at any size
    (CUDA, "bf16", 256, 128, torch.channels_last),
])
def test_layout_rule(device, precision, micro_batch, side, expected):
    assert training_layout(device, precision, micro_batch, side) == expected


def _conv_layout_after_training(tmp_path, image_side: int) -> torch.memory_format:
    images = TransformedImages(load_source("digits", progress=False).train.subset(range(40)),
                               train_transform(20, 16, flip=False))
    torch.manual_seed(0)
    model = create_model("R[1,1,1,1]x0.5", num_classes=10)
    cfg = TrainingRecipe(schedule=LRSchedule(0.1, 0, (), 2), batch=20, image_side=image_side)
    execution = ExecutionOptions(precision="fp32", progress=False)
    train(model, images, None, cfg, execution, tmp_path, DistContext(0, 1, 0, CPU), fingerprint="t")
    weight = model.root.conv.weight
    assert weight.grad is None or weight.grad.shape == weight.shape
    return torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous() else torch.contiguous_format


def test_the_loop_trains_a_small_cpu_step_in_nchw_and_an_unknown_one_in_channels_last(tmp_path):
    assert _conv_layout_after_training(tmp_path / "small", image_side=16) == torch.contiguous_format
    assert _conv_layout_after_training(tmp_path / "unknown", image_side=0) == torch.channels_last
