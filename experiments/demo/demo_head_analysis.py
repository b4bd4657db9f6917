"""What the demo's 1-shot fine-tuning does to the zero head, on frozen pre-trained features.

Fine-tuning the demo's model at 1 shot barely moves the body (it changes by <1%), so its result is
mostly the head it learns. This script takes the demo's pre-trained model, extracts pre-logits of
a few-shot pool and a validation split, both carved from the digits' *training* part (the demo's
test split is never read), and compares, per K-per-class draw:

  ridge      the pre-training monitor's probe: closed-form ridge on L2-normalised, centred features
  ridge-raw  the same ridge on the raw features
  ridge-aug  the ridge fitted on augmented views (the fine-tuning crops) instead of test views
  prototype  nearest class mean, raw dot product (what a few gradient steps from zero approximate)
  sgd RULE   a softmax head trained from zero by SGD+momentum with a fine-tuning rule's schedule,
             batch sampled with replacement from the augmented views (exactly the head's updates
             in head-only fine-tuning)

    python experiments/demo/demo_head_analysis.py --pretrained runs/demo/pretrain --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_oneshot import DEMO_RULE, validation_splits

from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.fewshot import sample_per_class
from bigtransfer.data.transforms import eval_transform, train_transform
from bigtransfer.models import create_model
from bigtransfer.models.factory import model_source
from bigtransfer.recipes import hyperrule
from bigtransfer.train.fewshot_probe import _normalise, ridge_classifier
from bigtransfer.train.linear_probe import extract_features

VIEWS = 8  # augmented crops per pool image


class Views(torch.utils.data.Dataset):
    """Every pool image VIEWS times, each with its own fixed random crop."""

    def __init__(self, images):
        self.data = TransformedImages(images, train_transform(*DEMO_RULE["resolution"], flip=False))

    def __len__(self):
        return len(self.data) * VIEWS

    def __getitem__(self, i):
        return self.data[(i // VIEWS, i)]  # the crop is a function of i


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def sgd_head(views: torch.Tensor, labels: torch.Tensor, schedule, batch: int, seed: int,
             momentum: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """A zero softmax head on frozen features [N, V, D], SGD+momentum as torch.optim.SGD does it."""
    n, v, d = views.shape
    w = torch.zeros(10, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w, b], lr=0.0, momentum=momentum)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(schedule.total_steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.at(step)
        pick = rng.integers(0, n, batch) if n < batch else rng.permutation(n)[:batch]
        x = views[torch.from_numpy(pick), torch.from_numpy(rng.integers(0, v, batch))]
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, labels[torch.from_numpy(pick)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return w.detach(), b.detach(), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, required=True)
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rule", action="append", default=[],
                        help="NAME:steps=S,lr=L,batch=B for an extra SGD head (default: the demo's)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-draw results here")
    parser.add_argument("--cache", type=Path, default=None, help="features .npz: written once, then read")
    args = parser.parse_args()
    splits = validation_splits()
    if args.cache and args.cache.is_file():
        with np.load(args.cache) as cached:
            pool_x, pool_y, val_x, val_y, aug_x = (torch.from_numpy(cached[k]) for k in
                                                   ("pool_x", "pool_y", "val_x", "val_y", "aug_x"))
    else:
        name, weights = model_source(str(args.pretrained), None)
        model = create_model(name, num_classes=10, weights=weights)
        cpu = torch.device("cpu")
        pool_x, pool_y = extract_features(model, TransformedImages(splits.train, eval_transform(32)), cpu)
        val_x, val_y = extract_features(model, TransformedImages(splits.test, eval_transform(32)), cpu)
        aug_x, _ = extract_features(model, Views(splits.train), cpu)
        aug_x = aug_x.double().reshape(len(pool_y), VIEWS, -1)
        if args.cache:
            np.savez(args.cache, pool_x=pool_x.numpy(), pool_y=pool_y.numpy(), val_x=val_x.numpy(),
                     val_y=val_y.numpy(), aug_x=aug_x.numpy())
    print(f"pre-logits: {pool_x.shape[1]} dims; norm median {float(pool_x.norm(dim=1).median()):.1f}; "
          f"norm of the mean {float(pool_x.mean(0).norm()):.1f}; centred norm median "
          f"{float((pool_x - pool_x.mean(0)).norm(dim=1).median()):.1f}", flush=True)
    rules = {"demo": {"steps": DEMO_RULE["steps"], "lr": DEMO_RULE["base_lr"], "batch": DEMO_RULE["batch"]}}
    for text in args.rule:
        rule_name, _, spec = text.partition(":")
        rules[rule_name] = {k: float(v) if k == "lr" else int(v)
                            for k, v in (item.split("=") for item in spec.split(","))}
    rows = []
    val_raw, val_n = val_x.double(), _normalise(val_x)
    for k in [int(s) for s in args.shots.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            idx = torch.from_numpy(sample_per_class(pool_y.numpy(), k, seed))
            y = pool_y[idx]
            row = {"shots": k, "seed": seed}
            w, b = ridge_classifier(_normalise(pool_x[idx]), y, 10)
            row["ridge"] = accuracy(val_n @ w + b, val_y)
            w, b = ridge_classifier(pool_x[idx], y, 10)
            row["ridge-raw"] = accuracy(val_raw @ w + b, val_y)
            flat = aug_x[idx].reshape(-1, aug_x.shape[-1])
            w, b = ridge_classifier(_normalise(flat), y.repeat_interleave(VIEWS), 10)
            row["ridge-aug"] = accuracy(val_n @ w + b, val_y)
            means = torch.stack([pool_x[idx][y == c].double().mean(0) for c in range(10)])
            row["prototype"] = accuracy(val_raw @ means.T, val_y)
            for rule_name, rule in rules.items():
                schedule = hyperrule.schedule(len(idx), steps=rule["steps"], base_lr=rule["lr"])
                w, b, losses = sgd_head(aug_x[idx], y, schedule, rule["batch"], seed)
                row[f"sgd {rule_name}"] = accuracy(val_raw @ w.T + b, val_y)
                row[f"sgd {rule_name} loss@"] = {s: round(losses[s - 1], 4) for s in (4, 8, 12, 20, len(losses))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    methods = [m for m in rows[0] if m not in ("shots", "seed") and not m.endswith("loss@")]
    print("\nvalidation top-1, median (min-max) over draws")
    for k in sorted({r["shots"] for r in rows}):
        mine = [r for r in rows if r["shots"] == k]
        for m in methods:
            accs = [r[m] for r in mine]
            print(f"k={k:<3} {m:<22} {statistics.median(accs):6.1%} ({min(accs):.1%}-{max(accs):.1%})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
