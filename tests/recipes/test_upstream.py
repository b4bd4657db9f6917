"""The upstream recipe (plans for BiT-S/M and BiT-L), the sigmoid loss and precision@1."""

import math

import pytest
import torch

from bigtransfer import BigTransferError
from bigtransfer.metrics import MultiLabelMeter
from bigtransfer.recipes import upstream
from bigtransfer.train.losses import sigmoid_cross_entropy

ILSVRC = 1_281_167
STEPS_PER_EPOCH = math.ceil(ILSVRC / 4096)  # 313


def test_bit_s_full_scale_plan():
    p = upstream.upstream_plan(ILSVRC, 1000, recipe="bit-s")
    assert (p.batch, p.momentum, p.weight_decay, p.resolution) == (4096, 0.9, 1e-4, 224)
    assert p.steps_per_epoch == STEPS_PER_EPOCH and p.steps == 90 * STEPS_PER_EPOCH
    assert p.schedule.warmup_steps == 5000 and p.loss == "softmax" and p.head_bias_init == 0.0
    lr = 0.03 * 4096 / 256  # 0.48
    decay = [e * STEPS_PER_EPOCH for e in (30, 60, 80)]
    assert p.schedule.decay_steps == tuple(decay)
    s = p.schedule
    assert s.at(0) == 0.0 and s.at(2500) == pytest.approx(lr / 2) and s.at(5000) == pytest.approx(lr)
    assert s.at(decay[0]) == pytest.approx(lr) and s.at(decay[0] + 1) == pytest.approx(lr / 10)
    assert s.at(decay[1] + 1) == pytest.approx(lr / 100) and s.at(decay[2] + 1) == pytest.approx(lr / 1000)
    assert s.at(p.steps - 1) == pytest.approx(lr / 1000)


def test_bit_l_schedule_decays_at_10_23_30_37_of_40():
    p = upstream.upstream_plan(ILSVRC, 1000, recipe="bit-l")
    assert p.epochs == 40 and p.steps == 40 * STEPS_PER_EPOCH
    decays = [e * STEPS_PER_EPOCH for e in (10, 23, 30, 37)]
    assert p.schedule.decay_steps == tuple(decays)
    lr = 0.48
    for k, step in enumerate(decays):
        assert p.schedule.at(step) == pytest.approx(lr / 10**k)
        assert p.schedule.at(step + 1) == pytest.approx(lr / 10 ** (k + 1))
    assert p.schedule.at(p.steps - 1) == pytest.approx(lr / 10**4)


def test_scaled_down_run_keeps_fractions_and_shrinks_warmup():
    p = upstream.upstream_plan(20_000, 100, batch=128, epochs=3)
    assert p.steps_per_epoch == 157 and p.steps == 471
    assert p.decay_epochs == pytest.approx((1.0, 2.0, 8 / 3))
    assert p.schedule.decay_steps == (157, 314, 419)
    assert p.schedule.warmup_steps == round(5000 * 471 / upstream.FULL_SCALE_STEPS)  # 84
    assert p.schedule.base_lr == pytest.approx(0.03 * 128 / 256)
    assert p.overrides == {"batch": 128, "epochs": 3}
    assert p.schedule.at(p.schedule.warmup_steps) == pytest.approx(0.015)
    assert p.schedule.at(470) == pytest.approx(0.015 / 1000)


def test_warmup_never_outlasts_the_first_decay():
    p = upstream.upstream_plan(1_000, 10, batch=100, epochs=9, warmup_steps=500)
    assert p.schedule.warmup_steps == p.schedule.decay_steps[0] == 30


def test_multilabel_plan_uses_sigmoid_and_minus_ten_bias():
    p = upstream.upstream_plan(14_197_122, 21843, multilabel=True)
    assert p.loss == "sigmoid" and p.head_bias_init == -10.0
    assert "sigmoid cross-entropy, head bias -10" in upstream.describe(p)


@pytest.mark.parametrize("kwargs, message", [
    ({"recipe": "bit-x"}, "--recipe"), ({"batch": 0}, "--batch"), ({"epochs": 0}, "--epochs"),
])
def test_bad_recipe_overrides(kwargs, message):
    with pytest.raises(BigTransferError, match=message):
        upstream.upstream_plan(1000, 10, **kwargs)


def test_sigmoid_cross_entropy_matches_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 4.0, 1.0]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.uint8)

    def softplus(v):
        return math.log1p(math.exp(v))

    # BCE(x, 1) = log(1 + e^-x), BCE(x, 0) = log(1 + e^x); summed over classes, mean over images
    first = softplus(-2.0) + softplus(-1.0) + softplus(-0.0)
    second = softplus(-3.0) + softplus(-4.0) + softplus(1.0)
    assert sigmoid_cross_entropy(logits, targets).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_minus_ten_bias_makes_the_initial_loss_small_per_absent_class():
    logits = torch.full((4, 1000), -10.0)
    targets = torch.zeros(4, 1000)
    targets[:, 0] = 1
    loss = sigmoid_cross_entropy(logits, targets).item()
    assert loss == pytest.approx(999 * math.log1p(math.exp(-10)) + math.log1p(math.exp(10)), rel=1e-4)  # fp32 sum


def test_precision_at_one():
    meter = MultiLabelMeter(3)
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 9.0], [1.0, 2.0, 0.0]])
    targets = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1]])
    meter.update(logits, targets)
    assert meter.result()["precision_at_1"] == pytest.approx(2 / 3)


def test_the_loss_is_the_recipes_whatever_the_data_layout():
    """ImageNet-21k in one-folder-per-class layout is single-label on disk, and BiT-M still trains it
    with a sigmoid: the loss comes from the recipe (or --loss), not from how labels are stored."""
    bit_m = upstream.upstream_plan(1000, 10)  # single-label data, the default bit-m recipe
    assert bit_m.loss == "sigmoid" and bit_m.head_bias_init == -10.0
    assert "sigmoid cross-entropy, head bias -10 (one-hot targets)" in upstream.describe(bit_m)
    bit_s = upstream.upstream_plan(1000, 10, recipe="bit-s")
    assert bit_s.loss == "softmax" and bit_s.head_bias_init == 0.0
    assert upstream.upstream_plan(1000, 10, recipe="bit-l").loss == "sigmoid"
    chosen = upstream.upstream_plan(1000, 10, recipe="bit-m", loss="softmax")
    assert chosen.loss == "softmax" and chosen.overrides["loss"] == "softmax"
    with pytest.raises(BigTransferError, match="--loss softmax needs one label per image"):
        upstream.upstream_plan(1000, 10, multilabel=True, loss="softmax")
    with pytest.raises(BigTransferError, match="--loss"):
        upstream.upstream_plan(1000, 10, loss="hinge")


def test_sigmoid_loss_takes_class_indices_as_one_hot():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    as_indices = sigmoid_cross_entropy(logits, torch.tensor([0, 1]))
    as_one_hot = sigmoid_cross_entropy(logits, torch.tensor([[1, 0, 0], [0, 1, 0]]))
    assert as_indices.item() == pytest.approx(as_one_hot.item())


def test_weight_decay_applies_to_kernels_only():
    """The recipe decays convolution and head kernels; GroupNorm scales/shifts and the head bias
    (whose -10 start a decay would pull back towards 0) are left alone."""
    from bigtransfer import create_model
    from bigtransfer.train.loop import decay_groups

    model = create_model("R[1,1,1,1]x0.5", num_classes=7)
    plan = upstream.upstream_plan(1000, 7)
    assert plan.decayed == "kernels" and "on convolution and head kernels only" in upstream.describe(plan)
    decayed, kept = decay_groups(model, plan.weight_decay, plan.decayed)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    kept_names = {names[id(p)] for p in kept["params"]}
    assert decayed["weight_decay"] == 1e-4 and kept["weight_decay"] == 0.0
    assert decayed_names == {n for n in names.values() if n.endswith(("conv.weight", "conv1.weight",
                                                                      "conv2.weight", "conv3.weight",
                                                                      "downsample.weight", "head.weight"))}
    assert "head.bias" in kept_names and "norm.weight" in kept_names and "stages.0.0.norm1.bias" in kept_names
    assert decayed_names | kept_names == set(names.values()) and not decayed_names & kept_names
    (everything,) = decay_groups(model, 1e-4, upstream.upstream_plan(1000, 7, decayed="all").decayed)
    assert len(everything["params"]) == len(names)


def test_flips_can_be_switched_off_for_classes_a_mirror_changes():
    from bigtransfer.data.transforms import upstream_transform

    plan = upstream.upstream_plan(20_000, 100, batch=128, epochs=3)
    assert plan.flip and "flip" not in plan.to_dict()  # the recipe's: earlier runs keep their fingerprints
    off = upstream.upstream_plan(20_000, 100, batch=128, epochs=3, flip=False)
    assert not off.flip and off.to_dict()["flip"] is False and off.overrides["flip"] is False
    assert "no flip" in upstream.describe(off) and "horizontal flip" in upstream.describe(plan)
    chiral = torch.zeros(3, 16, 16, dtype=torch.uint8)
    chiral[:, :, :4] = 255  # ink on the left only: a flip would move it right
    for transform, flips in ((upstream_transform(16, 1.0, flip=False), False), (upstream_transform(16, 1.0), True)):
        torch.manual_seed(0)
        views = [transform(chiral) for _ in range(40)]
        ink_left = [bool(v[:, :, :8].mean() > v[:, :, 8:].mean()) for v in views]
        assert all(ink_left) != flips
