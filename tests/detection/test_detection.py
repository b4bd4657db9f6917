"""Detection with a BiT backbone: weights, COCO files, augmentation, a short run that finds objects."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from bigtransfer import BigTransferError, create_model, save_checkpoint
from bigtransfer.cli import main
from bigtransfer.detection.coco import CocoTraining, read_coco, write_rectangles
from bigtransfer.detection.model import build_retinanet
from bigtransfer.detection.train import DetectOptions, plan, run_detect_eval, run_detect_train

TINY = "R[1,1,1,1]x0.5"


def test_backbone_weights_come_from_the_bit_checkpoint(tmp_path):
    torch.manual_seed(3)
    bit = create_model(TINY, num_classes=5, zero_head=False)
    save_checkpoint(bit, tmp_path / "bit.safetensors")
    detector = build_retinanet(str(tmp_path / "bit.safetensors"), 4, min_size=64, max_size=64)
    theirs = {k: v for k, v in bit.state_dict().items() if not k.startswith("head.")}
    ours = {k: v for k, v in detector.backbone.state_dict().items() if not k.startswith("fpn.")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert detector.backbone.body_config == {"arch": "R14x0.5", "norm": "gn_ws", "groups": 32}


def test_pyramid_levels_and_strides():
    detector = build_retinanet(TINY, 3, min_size=128, max_size=128, fpn_channels=32)
    levels = detector.backbone(torch.zeros(1, 3, 128, 128))
    assert [tuple(v.shape[-2:]) for v in levels.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(v.shape[1] == 32 for v in levels.values())


def test_paper_plan():
    p = plan(DetectOptions(data=""), 118_287)  # COCO-2017 train
    assert p["lr"] == pytest.approx(0.08) and p["batch"] == 256 and p["resolution"] == 1024
    assert p["steps"] == 30 * 463 and p["decay_steps"] == (16 * 463, 22 * 463)
    assert plan(DetectOptions(data="", batch=16), 118_287)["lr"] == pytest.approx(0.005)


def test_coco_reading_and_flip_augmentation(tmp_path):
    coco = read_coco(write_rectangles(tmp_path / "d", 6, size=40, seed=2))
    assert coco.num_classes == 4 and coco.category_names == ["red", "green", "blue"]
    raw = json.loads((tmp_path / "d" / "annotations.json").read_text())
    first = next(a for a in raw["annotations"] if a["image_id"] == 0)
    x, y, w, h = first["bbox"]
    assert coco.boxes[0][0].tolist() == [x, y, x + w, y + h] and coco.labels[0][0] == first["category_id"]
    plain, _ = CocoTraining(coco, train=False)[0]
    for seed in range(20):  # find a draw that flips (scale jitter pinned to 1)
        image, moved = CocoTraining(coco, train=True, jitter=(1.0, 1.0))[(0, seed)]
        if not torch.equal(image, plain):
            break
    assert torch.equal(image, plain.flip(-1))
    assert moved["boxes"][0].tolist() == [40 - (x + w), y, 40 - x, y + h]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].pop("bbox"), "annotation 0: needs image_id, category_id and bbox"),
    (lambda d: d["annotations"][0].update(category_id=99), "category_id 99 is not among the categories"),
    (lambda d: d["annotations"][0].update(image_id=99), "image_id 99 is not among the images"),
    (lambda d: d["annotations"][0].update(bbox=[30, 30, 20, 20]), "outside the 40x40 image"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 5]), "is empty"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, "x", 5]), "bbox must be"),
    (lambda d: d.pop("categories"), "expected a COCO object"),
    (lambda d: d["images"][0].pop("width"), "lacks a field"),
])
def test_malformed_annotations_are_clear_errors(tmp_path, change, message):
    path = write_rectangles(tmp_path / "d", 3, size=40)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BigTransferError, match=message):
        read_coco(path)


def test_not_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(BigTransferError, match="not valid JSON"):
        read_coco(tmp_path / "a.json")
    assert main(["detect-eval", "--model", str(tmp_path), "--data", str(tmp_path / "a.json")]) == 2
    assert "not a finished detection run" in capsys.readouterr().err


def test_a_short_run_learns_to_find_rectangles(tmp_path, capsys):
    train = write_rectangles(tmp_path / "train", 120, size=96, seed=0)
    val = write_rectangles(tmp_path / "val", 30, size=96, seed=1)
    opts = DetectOptions(data=str(train), val_data=str(val), model=TINY, out=tmp_path / "run", resolution=96,
                         batch=8, base_lr=0.01, epochs=12, decay_epochs=(8, 11), warmup_steps=30, grad_clip=1.0,
                         fpn_channels=64, progress=False, log_every=15)
    summary = run_detect_train(opts)
    assert summary["steps"] == 180
    assert summary["final"]["AP50"] > 0.1, summary  # chance is 0
    again = run_detect_train(opts)  # finished: resumes at the end, trains nothing
    assert again["final"] == summary["final"]
    assert main(["detect-eval", "--model", str(tmp_path / "run"), "--data", str(val), "--quiet",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "AP50" in capsys.readouterr().out
    from pycocotools.coco import COCO

    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    COCO(str(val)).loadRes(detections)  # well-formed COCO results
    metrics = run_detect_eval(tmp_path / "run", str(val))
    assert metrics["AP50"] == pytest.approx(summary["final"]["AP50"])
    assert np.isfinite(list(metrics.values())).all()
