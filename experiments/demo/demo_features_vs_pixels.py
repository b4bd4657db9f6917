"""What bounds the demo's 1-shot transfer: its features, or how fine-tuning uses them?

On the validation split carved from the digits' training part (the demo's test split is not
read; `experiments/demo/demo_oneshot.py` uses the same split), for K examples per class and 5 draws,
three classifiers on two representations: the demo's frozen pre-trained features (the
pre-logits, as the ridge probe of pre-training reads them) and the raw 8x8 pixels. A fine-tuned
model that ends at its features' ridge level is limited by the features; features no better
than pixels at 1 shot are what more upstream pre-training would have to improve.

    python experiments/demo/demo_features_vs_pixels.py --pretrained runs/demo/pretrain

Prints a Markdown table: median (min-max) over the draws.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_oneshot import validation_splits

from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.fewshot import sample_per_class
from bigtransfer.data.transforms import eval_transform
from bigtransfer.models import create_model
from bigtransfer.models.factory import model_source
from bigtransfer.train.fewshot_probe import _normalise, ridge_classifier
from bigtransfer.train.linear_probe import extract_features


def pixels(images) -> torch.Tensor:
    return torch.tensor(np.stack([np.asarray(images.load(i))[..., 0].ravel() for i in range(len(images))]),
                        dtype=torch.float64)


def features(pretrained, splits, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-logits of a pre-trained run's model for the pool and the validation set."""
    name, weights = model_source(pretrained, None)
    model = create_model(name, num_classes=10, weights=weights)
    transform = eval_transform(resolution)
    cpu = torch.device("cpu")
    return (extract_features(model, TransformedImages(splits.train, transform), cpu)[0],
            extract_features(model, TransformedImages(splits.test, transform), cpu)[0])


def draws(labels: torch.Tensor, k: int, seeds) -> list[torch.Tensor]:
    """The few-shot draws' indices into `labels`: k examples per class, one draw per seed."""
    return [torch.as_tensor(sample_per_class(labels.numpy(), k, int(seed))) for seed in seeds]


def ridge_guesses(train_x, train_y, test_x) -> torch.Tensor:
    """The ridge probe's class for every test example (features normalised as the probe does)."""
    w, bias = ridge_classifier(_normalise(train_x), train_y, 10)
    return (_normalise(test_x) @ w + bias).argmax(1)


def classifiers(train_x, train_y, test_x, test_y) -> dict[str, float]:
    """Test accuracy of ridge regression, 1-nearest-neighbour and nearest centroid (cosine)."""
    a, b = _normalise(train_x), _normalise(test_x)
    centre = a.mean(0)
    centroids = torch.stack([(a[train_y == c] - centre).mean(0) for c in range(10)])
    guesses = {"ridge": ridge_guesses(train_x, train_y, test_x), "1-NN": train_y[(b @ a.T).argmax(1)],
               "nearest centroid": ((b - centre) @ centroids.T).argmax(1)}
    return {name: (guess == test_y).double().mean().item() for name, guess in guesses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="the demo's pretrain run directory")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--resolution", type=int, default=32, help="the demo's fine-tuning crop")
    args = parser.parse_args()
    splits = validation_splits()
    representations = {
        "pre-trained features": features(args.pretrained, splits, args.resolution),
        "raw pixels": (pixels(splits.train), pixels(splits.test)),
    }
    train_y, test_y = torch.as_tensor(splits.train.labels), torch.as_tensor(splits.test.labels)
    print("| examples/class | representation | ridge | 1-NN | nearest centroid |\n|---|---|---|---|---|")
    for k in map(int, args.shots.split(",")):
        indices = draws(train_y, k, args.seeds.split(","))
        for label, (train_x, test_x) in representations.items():
            scores = [classifiers(train_x[idx], train_y[idx], test_x, test_y) for idx in indices]
            cells = []
            for method in ("ridge", "1-NN", "nearest centroid"):
                values = [s[method] for s in scores]
                cells.append(f"{statistics.median(values):.1%} ({min(values):.1%}-{max(values):.1%})")
            print(f"| {k} | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
