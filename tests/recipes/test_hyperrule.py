"""BiT-HyperRule: tiers, resolution, MixUp, and the learning rate at every point that matters."""

import pytest

from bigtransfer import BigTransferError
from bigtransfer.recipes import hyperrule
from bigtransfer.train.schedule import LRSchedule


@pytest.mark.parametrize("size, tier, steps, mixup", [
    (1, "small", 500, 0.0),
    (19_999, "small", 500, 0.0),
    (20_000, "medium", 10_000, 0.1),
    (499_999, "medium", 10_000, 0.1),
    (500_000, "large", 20_000, 0.1),
    (1_281_167, "large", 20_000, 0.1),
])
def test_tier_boundaries(size, tier, steps, mixup):
    assert hyperrule.tier(size) == tier
    assert hyperrule.schedule(size).total_steps == steps
    assert hyperrule.mixup_alpha(size) == mixup


@pytest.mark.parametrize("area, arch, expected", [
    (32 * 32, "R50x1", (160, 128)),
    (96 * 96 - 1, "R50x1", (160, 128)),
    (96 * 96, "R50x1", (448, 384)),
    (224 * 224, "R101x3", (448, 384)),
    (96 * 96, "R152x4", (512, 480)),
    (50 * 50, "R152x4", (160, 128)),
])
def test_resolution_from_image_area(area, arch, expected):
    assert hyperrule.resolution(area, arch) == expected


@pytest.mark.parametrize("tier_size, boundaries", [
    (1_000, (100, 200, 300, 400, 500)),
    (50_000, (500, 3000, 6000, 9000, 10000)),
    (1_000_000, (500, 6000, 12000, 18000, 20000)),
])
def test_release_boundaries(tier_size, boundaries):
    assert hyperrule.schedule(tier_size).boundaries == boundaries


def test_small_task_lr_at_every_landmark():
    s = hyperrule.schedule(1_000)
    lr = 0.003
    expected = {
        0: 0.0,  # warm-up starts from zero
        50: lr * 0.5,  # mid warm-up
        99: lr * 0.99,
        100: lr,  # warm-up end
        200: lr,  # at a boundary the old rate still holds (release semantics) ...
        201: lr / 10,  # ... and the decay applies from the next step
        300: lr / 10,
        301: lr / 100,
        400: lr / 100,
        401: lr / 1000,
        499: lr / 1000,  # the last step
    }
    for step, value in expected.items():
        assert s.at(step) == pytest.approx(value, rel=1e-12), step


def test_medium_and_large_lr_landmarks():
    medium = hyperrule.schedule(100_000)
    assert medium.at(250) == pytest.approx(0.0015)
    assert medium.at(3000) == pytest.approx(0.003) and medium.at(3001) == pytest.approx(0.0003)
    assert medium.at(9001) == pytest.approx(0.000003) and medium.at(9999) == pytest.approx(0.000003)
    large = hyperrule.schedule(600_000)
    assert large.at(6001) == pytest.approx(0.0003) and large.at(18001) == pytest.approx(0.000003)


def test_steps_override_scales_boundaries():
    s = hyperrule.schedule(1_000, steps=1000)
    assert s.boundaries == (200, 400, 600, 800, 1000)
    s = hyperrule.schedule(100_000, steps=100)
    assert s.boundaries == (5, 30, 60, 90, 100)


def test_paper_schedule_decays_at_30_60_90_percent_without_warmup():
    s = hyperrule.schedule(1_000, variant="paper")
    assert s.boundaries == (0, 150, 300, 450, 500)
    assert s.at(0) == pytest.approx(0.003)
    assert s.at(151) == pytest.approx(0.0003) and s.at(451) == pytest.approx(0.000003)


def test_plan_defaults_and_recorded_overrides():
    p = hyperrule.plan(1_000, 32 * 32, 10, "R50x1")
    assert (p.batch, p.schedule.base_lr, p.momentum, p.weight_decay) == (512, 0.003, 0.9, 0.0)
    assert (p.resize, p.crop, p.steps, p.mixup_alpha, p.flip, p.random_crop) == (160, 128, 500, 0.0, True, True)
    assert p.overrides == {}
    q = hyperrule.plan(1_000, 32 * 32, 10, "R50x1", batch=128, base_lr=0.001, steps=200,
                       resolution_override=(64, 48), mixup=0.2, flip=False, random_crop=False)
    assert (q.batch, q.schedule.base_lr, q.steps, q.resize, q.crop, q.mixup_alpha) == (128, 0.001, 200, 64, 48, 0.2)
    assert q.overrides == {"batch": 128, "base_lr": 0.001, "steps": 200, "resolution": (64, 48), "mixup": 0.2,
                           "flip": False, "random_crop": False}
    assert hyperrule.Plan.from_dict(q.to_dict()) == q


def test_describe_mentions_the_decisions():
    text = hyperrule.describe(hyperrule.plan(25_000, 300 * 300, 37, "R152x4", mixup=None))
    for fragment in ("25000 training examples", "medium task", "resize 512x512", "random crop 480x480",
                     "10000 steps", "alpha 0.1", "zero-initialised"):
        assert fragment in text


@pytest.mark.parametrize("kwargs, message", [
    ({"batch": 0}, "--batch"), ({"steps": 0}, "--steps"), ({"mixup": -1.0}, "--mixup"),
    ({"resolution_override": (32, 64)}, "--resolution"), ({"schedule_variant": "cosine"}, "unknown schedule"),
])
def test_bad_overrides(kwargs, message):
    with pytest.raises(BigTransferError, match=message):
        hyperrule.plan(1_000, 64, 10, **kwargs)


def test_single_class_is_refused():
    with pytest.raises(BigTransferError, match="at least 2 classes"):
        hyperrule.plan(100, 64, 1)


def test_schedule_rejects_decreasing_boundaries():
    with pytest.raises(ValueError):
        LRSchedule(base_lr=0.1, warmup_steps=10, decay_steps=(5,), total_steps=20)


def test_describe_names_the_release_resolution_for_large_images():
    """The paper's 448/384 is the default; the plan says how to get the release's 512/480, which
    --resolution 512/480 then reproduces (and only the resolution changes)."""
    paper = hyperrule.plan(5_000, 300 * 300, 37, "R50x1")
    assert (paper.resize, paper.crop) == (448, 384)
    assert "--resolution 512/480" in hyperrule.describe(paper)
    release = hyperrule.plan(5_000, 300 * 300, 37, "R50x1", resolution_override=(512, 480))
    assert (release.resize, release.crop) == (512, 480) and release.schedule == paper.schedule
    assert "--resolution 512/480" not in hyperrule.describe(release)
    small = hyperrule.plan(5_000, 32 * 32, 10, "R50x1")
    assert "512/480" not in hyperrule.describe(small)
