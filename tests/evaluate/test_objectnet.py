"""ObjectNet-style evaluation: mapping files, many-to-one scoring, restriction, boxes, preprocessing."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bigtransfer.data.images import load_rgb
from bigtransfer.data.sources import load_source
from bigtransfer.data.transforms import objectnet_transform
from bigtransfer.errors import BigTransferError
from bigtransfer.evaluate.objectnet import (
    BoxedImages,
    evaluate_objectnet,
    load_boxes,
    load_class_mapping,
)
from bigtransfer.models import create_model, save_checkpoint

TINY = "R[1,1,1,1]x0.5"
SMALL = {"resize": 36, "crop": 32, "progress": False}

# A head whose weights are zero, so every image gets the same logits (the biases) and the
# ranking is known: car, truck, beagle, pug, husky, tabby, mug, soccer_ball, tiger_cat, cup.
ILSVRC = ["tabby", "tiger_cat", "beagle", "pug", "husky", "mug", "cup", "soccer_ball", "car", "truck"]
BIASES = [6.0, 3.0, 9.0, 8.0, 7.0, 5.0, 2.0, 4.0, 20.0, 19.0]
COUNTS = {"cat": 2, "dog": 3, "cup": 1, "ball": 2}
MAPPING = {"cat": ["tabby", "tiger_cat"], "dog": ["beagle", "pug", "husky"], "cup": ["mug", "cup"],
           "ball": ["soccer_ball"]}
RED, GREEN = (200, 40, 40), (40, 180, 60)
PATCH = (40, 44, 56, 60)  # where the red object sits in a 64x64 green picture


def _bias_only_model(path, class_names):
    model = create_model(TINY, num_classes=len(BIASES))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(BIASES))
    return save_checkpoint(model, path, class_names=class_names, resolution=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"named": _bias_only_model(root / "named.safetensors", ILSVRC),
            "unnamed": _bias_only_model(root / "unnamed.safetensors", None)}  # names "0".."9", like an .npz


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectnet")
    rng = np.random.default_rng(0)
    for name, count in COUNTS.items():
        (root / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _json(path, mapping):
    path.write_text(json.dumps(mapping))
    return path


def _csv(path, text):
    path.write_text(text)
    return path


def _check_restricted(result):
    """Restricted to the 8 mapped classes the ranking is beagle, pug, husky, tabby, mug | ... :
    top-1 is always dog, top-5 covers dog, cat, cup but not ball."""
    assert result["images"] == 8
    assert result["top1"] == pytest.approx(3 / 8)
    assert result["top5"] == pytest.approx(6 / 8)
    assert result["per_class_accuracy"] == {"ball": 0.0, "cat": 0.0, "cup": 0.0, "dog": 1.0}
    assert result["per_class_top5"] == {"ball": 0.0, "cat": 1.0, "cup": 1.0, "dog": 1.0}
    assert result["per_class_images"] == {"ball": 2, "cat": 2, "cup": 1, "dog": 3}


def test_many_to_one_scoring(models, data, tmp_path):
    result = evaluate_objectnet(models["named"], str(data), _json(tmp_path / "m.json", MAPPING), **SMALL)
    _check_restricted(result)
    assert result["settings"]["mapped_ilsvrc_classes"] == 8 and result["settings"]["restrict"] is True


def test_without_restriction_unmapped_predictions_are_wrong(models, data, tmp_path):
    result = evaluate_objectnet(models["named"], str(data), _json(tmp_path / "m.json", MAPPING), restrict=False,
                                **SMALL)
    # car and truck (unmapped) now lead: top-1 always wrong; top-5 car, truck, beagle, pug, husky = dog only
    assert result["top1"] == 0.0
    assert result["top5"] == pytest.approx(3 / 8)
    assert result["per_class_top5"] == {"ball": 0.0, "cat": 0.0, "cup": 0.0, "dog": 1.0}


@pytest.mark.parametrize("model,name,text", [
    ("named", "names_and_indices.json",
     '{"cat": ["tabby", 1], "dog": ["beagle", "pug", 4], "cup": ["mug", "cup"], "ball": 7}'),
    ("named", "single_name.json",
     '{"cat": ["tabby", "tiger_cat"], "dog": ["beagle", "pug", "husky"], "cup": ["mug", 6], "ball": "soccer_ball"}'),
    ("named", "pairs.csv",
     ("objectnet_class,ilsvrc_class\ncat,tabby\ncat,1\ndog,beagle\ndog,pug\ndog,husky\n"
      "cup,mug\ncup,6\nball,soccer_ball\n")),
    ("unnamed", "numbers.json", '{"cat": ["0", 1], "dog": [2, "3", "4"], "cup": [5, 6], "ball": "7"}'),
    ("unnamed", "numbers.csv",
     "ilsvrc_class,objectnet_class\n0,cat\n1,cat\n2,dog\n3,dog\n4,dog\n5,cup\n6,cup\n7,ball\n"),
])
def test_mapping_files_names_and_indices(models, data, tmp_path, model, name, text):
    mapping = _csv(tmp_path / name, text)
    _check_restricted(evaluate_objectnet(models[model], str(data), mapping, **SMALL))


def test_load_class_mapping_formats(tmp_path):
    assert load_class_mapping(_json(tmp_path / "a.json", {"cup": "mug", "dog": [2, "pug"]})) == {
        "cup": ["mug"], "dog": [2, "pug"]}
    text = 'objectnet_class,ilsvrc_class\ncup,mug\n\n"chair","folding chair, camp chair"\ncup,7\n'
    assert load_class_mapping(_csv(tmp_path / "a.csv", text)) == {
        "cup": ["mug", "7"], "chair": ["folding chair, camp chair"]}


@pytest.mark.parametrize("name,text,message", [
    ("bad.json", '{"cat": ["tabby",\n  ]', r"bad\.json line 2: not valid JSON"),
    ("list.json", '["tabby"]', r"list\.json: expected an object"),
    ("empty.json", "{}", r"empty\.json: the mapping is empty"),
    ("none.json", '{"cat": []}', r"none\.json: key 'cat' maps to no ILSVRC class"),
    ("float.json", '{"cat": [1.5]}', r"float\.json: key 'cat': 1\.5 is neither"),
    ("bool.json", '{"cat": true}', r"bool\.json: key 'cat': True is neither"),
    ("twice.json", '{"cat": "tabby", "cat": "pug"}', r"twice\.json: key 'cat' appears twice"),
    ("header.csv", "objectnet,imagenet\ncat,tabby\n", r"header\.csv: the header must name columns"),
    ("cell.csv", "objectnet_class,ilsvrc_class\ncat,tabby\ndog,\n", r"cell\.csv line 3: empty"),
    ("map.txt", "cat tabby\n", r"map\.txt: expected a \.json or \.csv"),
])
def test_malformed_mapping_files(tmp_path, name, text, message):
    with pytest.raises(BigTransferError, match=message):
        load_class_mapping(_csv(tmp_path / name, text))


def test_missing_mapping_file(tmp_path):
    with pytest.raises(BigTransferError, match=r"nowhere\.json: cannot read"):
        load_class_mapping(tmp_path / "nowhere.json")


def test_unmapped_data_class_is_an_error(models, data, tmp_path):
    mapping = _json(tmp_path / "m.json", {k: v for k, v in MAPPING.items() if k != "ball"})
    with pytest.raises(BigTransferError, match=r"class 'ball' is not in --mapping .*m\.json \(1 of 4 data classes"):
        evaluate_objectnet(models["named"], str(data), mapping, **SMALL)


def test_skip_unmapped_drops_those_images(models, data, tmp_path):
    mapping = _json(tmp_path / "m.json", {k: v for k, v in MAPPING.items() if k != "ball"})
    with pytest.warns(UserWarning, match=r"dropped 2 image\(s\) of 1 class\(es\).*'ball'"):
        result = evaluate_objectnet(models["named"], str(data), mapping, skip_unmapped=True, **SMALL)
    assert result["images"] == 6 and result["settings"]["skipped_images"] == 2
    assert result["top1"] == pytest.approx(3 / 6) and result["top5"] == 1.0  # soccer_ball is no candidate now
    assert set(result["per_class_accuracy"]) == {"cat", "dog", "cup"}


def test_unknown_ilsvrc_name(models, data, tmp_path):
    mapping = _json(tmp_path / "m.json", {**MAPPING, "cat": ["tabby", "lion"]})
    with pytest.raises(BigTransferError, match=r"m\.json: ILSVRC class 'lion' \(for 'cat'\) is not one of the model's"):
        evaluate_objectnet(models["named"], str(data), mapping, **SMALL)
    with pytest.raises(BigTransferError, match=r"has no class names; use indices 0\.\.9"):
        evaluate_objectnet(models["unnamed"], str(data), mapping, **SMALL)


@pytest.mark.parametrize("entry", [10, -1, "12"])
def test_index_outside_the_head(models, data, tmp_path, entry):
    mapping = _json(tmp_path / "m.json", {**MAPPING, "ball": [entry]})
    with pytest.raises(BigTransferError, match=rf"ILSVRC index {entry!r} \(for 'ball'\) is outside .*\(0\.\.9\)"):
        evaluate_objectnet(models["named"], str(data), mapping, **SMALL)


def test_reports_written(models, data, tmp_path):
    out = tmp_path / "report"
    result = evaluate_objectnet(models["named"], str(data), _json(tmp_path / "m.json", MAPPING), out=out, **SMALL)
    saved = json.loads((out / "objectnet.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["top1"] == pytest.approx(3 / 8) and saved["images"] == 8
    assert saved["settings"]["resize"] == 36 and saved["settings"]["crop"] == 32
    rows = list(csv.DictReader((out / "per_class_accuracy.csv").read_text().splitlines()))
    assert [r["class"] for r in rows] == ["ball", "cat", "cup", "dog"]
    assert [(float(r["top1"]), float(r["top5"]), int(r["images"])) for r in rows] == [
        (0.0, 0.0, 2), (0.0, 1.0, 2), (0.0, 1.0, 1), (1.0, 1.0, 3)]
    html = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and "37.5%" in html
    (out / "report.html").unlink()
    from bigtransfer.report.protocols import rebuild

    assert rebuild(out).read_text() == html


def test_crop_larger_than_resize(models, data, tmp_path):
    with pytest.raises(BigTransferError, match=r"--crop \(40\) must be .* at most --resize \(36\)"):
        evaluate_objectnet(models["named"], str(data), _json(tmp_path / "m.json", MAPPING), resize=36, crop=40)


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("width,height", [(30, 90), (90, 30)])
def test_transform_resizes_the_shorter_side(width, height):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = objectnet_transform(resize=20, crop=16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    scale = 20 / min(width, height)  # aspect kept: 30x90 -> 20x60
    by_hand = TF.center_crop(TF.resize(TF.to_image(image), [round(height * scale), round(width * scale)],
                                       antialias=True), [16, 16])
    by_hand = v2.Normalize([0.5] * 3, [0.5] * 3)(TF.to_dtype(by_hand, torch.float32, scale=True))
    assert torch.allclose(out, by_hand, atol=1e-6)
    squashed = TF.center_crop(TF.resize(TF.to_image(image), [20, 20], antialias=True), [16, 16])
    squashed = v2.Normalize([0.5] * 3, [0.5] * 3)(TF.to_dtype(squashed, torch.float32, scale=True))
    assert not torch.allclose(out, squashed, atol=0.1)


def test_default_transform_is_512_then_480():
    out = objectnet_transform()(Image.new("RGB", (640, 520), (255, 0, 0)))
    assert out.shape == (3, 480, 480)
    assert torch.allclose(out[0], torch.ones(480, 480)) and torch.allclose(out[1], -torch.ones(480, 480))


# --------------------------------------------------------------------------- bounding boxes
def _noise(rng, colour, size=64, patch=None):
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    if patch is not None:
        x0, y0, x1, y1 = patch
        pixels[y0:y1, x0:x1] = np.clip(np.array(RED) + rng.integers(-30, 30, (y1 - y0, x1 - x0, 3)), 0, 255)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def boxed(tmp_path_factory):
    """apple/: green pictures with a small red object; leaf/: plain green. The model tells red from
    green (a nearest-centroid head on its random features), so only the boxes make apples red."""
    root = tmp_path_factory.mktemp("boxed")
    rng = np.random.default_rng(0)
    for name in ("apple", "leaf"):
        (root / "data" / name).mkdir(parents=True)
        for i in range(2):
            _noise(rng, GREEN, patch=PATCH if name == "apple" else None).save(root / "data" / name / f"{i}.png")
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=2).eval()
    transform = objectnet_transform(SMALL["resize"], SMALL["crop"])
    with torch.no_grad():
        red, green = (model.forward_features(transform(_noise(rng, c))[None])[0] for c in (RED, GREEN))
        # logit(red) - logit(green) = (red - green) . (features - midpoint)
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[0, :, 0, 0] = red - green
        model.head.bias[0] = -(red - green) @ (red + green) / 2
    weights = save_checkpoint(model, root / "colours.safetensors", class_names=["red_thing", "green_thing"])
    mapping = _json(root / "mapping.json", {"apple": "red_thing", "leaf": ["green_thing"]})
    return root, weights, mapping


def test_boxes_change_what_is_evaluated(boxed):
    root, weights, mapping = boxed
    whole = evaluate_objectnet(weights, str(root / "data"), mapping, **SMALL)
    assert whole["per_class_accuracy"] == {"apple": 0.0, "leaf": 1.0}  # the red object is too small
    boxes = _csv(root / "boxes.csv", "path,x0,y0,x1,y1\n"
                                     f"apple/0.png,{','.join(map(str, PATCH))}\n"
                                     f"{root / 'data' / 'apple' / '1.png'},40.2,43.8,56,60\n"
                                     "apple/gone.png,0,0,5,5\n")
    with pytest.warns(UserWarning, match=r"1 box row\(s\) name no image of the data \(first: 'apple/gone.png'\)"):
        cropped = evaluate_objectnet(weights, str(root / "data"), mapping, boxes=boxes, **SMALL)
    assert cropped["per_class_accuracy"] == {"apple": 1.0, "leaf": 1.0}
    assert cropped["settings"]["cropped_images"] == 2


def test_boxed_images_are_cropped_before_the_transform(boxed):
    root, _, _ = boxed
    images = load_source(str(root / "data"), require_test=False, progress=False).train
    boxes = load_boxes(_csv(root / "some.csv", "path,x0,y0,x1,y1\napple/1.png,3,5,40,21\n"), images, root / "data")
    assert boxes == [None, (3, 5, 40, 21), None, None]
    transform = objectnet_transform(20, 16)
    dataset = BoxedImages(images, transform, boxes)
    pixels, label = dataset[1]
    assert label == 0 and pixels.shape == (3, 16, 16)
    assert torch.equal(pixels, transform(load_rgb(images.paths[1]).crop((3, 5, 40, 21))))
    assert torch.equal(dataset[2][0], transform(load_rgb(images.paths[2])))


@pytest.mark.parametrize("rows,message", [
    ("apple/0.png,20,10,20,30\n", r"line 2: empty box \(20,10\)-\(20,30\)"),
    ("apple/0.png,10,30,20,10\n", r"line 2: empty box"),
    ("apple/0.png,40,44,70,60\n", r"line 2: box \(40,44\)-\(70,60\) lies outside the 64x64 image"),
    ("apple/0.png,-1,0,10,10\n", r"line 2: box .* lies outside"),
    ("leaf/1.png,0,0,10,10\napple/0.png,0,0,x,10\n", r"line 3: box coordinates must be numbers"),
    ("apple/0.png,0,0,10,nan\n", r"line 2: box coordinates must be finite"),
    ("apple/0.png,0,0,10,10\napple/0.png,0,0,20,20\n", r"line 3: a second box for 'apple/0.png'"),
    (",0,0,10,10\n", r"line 2: empty path"),
])
def test_invalid_boxes(boxed, rows, message):
    root, weights, mapping = boxed
    boxes = _csv(root / "bad_boxes.csv", "path,x0,y0,x1,y1\n" + rows)
    with pytest.raises(BigTransferError, match=r"bad_boxes\.csv " + message):
        evaluate_objectnet(weights, str(root / "data"), mapping, boxes=boxes, **SMALL)


def test_boxes_header_checked(boxed):
    root, weights, mapping = boxed
    boxes = _csv(root / "header.csv", "file,left,top,right,bottom\napple/0.png,0,0,5,5\n")
    with pytest.raises(BigTransferError, match=r"header\.csv: the header must name columns path,x0,y0,x1,y1"):
        evaluate_objectnet(weights, str(root / "data"), mapping, boxes=boxes, **SMALL)
