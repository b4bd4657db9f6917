"""Why is one 1-shot draw the worst for every upstream variant, and which of its images make it so?

On the validation split carved from the digits' training part (as `demo_features_vs_pixels.py`;
the demo's test split is not read), the ridge probe on a pre-trained run's frozen features, one
example per class, 5 draws: each draw's accuracy and recall per class, then the worst draw again
with one class's example at a time replaced by the best draw's example of that class. A class
whose swap lifts the draw most is one whose drawn example is atypical of its class.

    python experiments/demo/demo_worst_draw.py --pretrained runs/demo/pretrain

Prints two Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_features_vs_pixels import draws, features, ridge_guesses
from demo_oneshot import validation_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="a pretrain run directory (the demo's: runs/demo/pretrain)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="the few-shot draws")
    parser.add_argument("--resolution", type=int, default=32, help="the demo's fine-tuning crop")
    args = parser.parse_args()
    splits = validation_splits()
    train_x, test_x = features(args.pretrained, splits, args.resolution)
    train_y, test_y = torch.as_tensor(splits.train.labels), torch.as_tensor(splits.test.labels)
    seeds = [int(s) for s in args.seeds.split(",")]
    picks = dict(zip(seeds, draws(train_y, 1, seeds)))

    def scores(idx: torch.Tensor) -> tuple[float, list[float]]:
        right = ridge_guesses(train_x[idx], train_y[idx], test_x) == test_y
        return right.double().mean().item(), [right[test_y == c].double().mean().item() for c in range(10)]

    results = {seed: scores(idx) for seed, idx in picks.items()}
    print("| draw | accuracy | " + " | ".join(f"recall {c}" for c in range(10)) + " |\n" + "|---" * 12 + "|")
    for seed, (accuracy, recalls) in results.items():
        print(f"| {seed} | {accuracy:.1%} | " + " | ".join(f"{r:.0%}" for r in recalls) + " |")
    worst, best = min(results, key=lambda s: results[s][0]), max(results, key=lambda s: results[s][0])
    print(f"\n| draw {worst} with draw {best}'s example of class | accuracy |\n|---|---|")
    for c in range(10):
        idx = picks[worst].clone()
        idx[train_y[idx] == c] = picks[best][train_y[picks[best]] == c]
        print(f"| {c} | {scores(idx)[0]:.1%} (from {results[worst][0]:.1%}) |")


if __name__ == "__main__":
    main()
