"""Detection with a BiT backbone (paper section 3.7): RetinaNet training and COCO evaluation."""

from __future__ import annotations

from pathlib import Path

from .common import (
    parse_floats,
    verb,
)


def _add_detect_train(sub) -> None:
    p = verb(sub, "detect-train", "Train RetinaNet with a BiT backbone on COCO-format data (paper section 3.7).",
              "  bigtransfer detect-train --data coco/train.json --val-data coco/val.json --model BiT-M-R101x3 \\\n"
              "      --batch 16 --out runs/det      # the paper's plan, lr scaled to the batch: 0.08 x 16/256\n"
              "  bigtransfer detect-train --data shapes/annotations.json --model R50x1 --resolution 256 \\\n"
              "      --epochs 12 --decay-epochs 8,11 --grad-clip 1 --out runs/shapes\n"
              "Images are looked up next to the json (or under --images). Re-running resumes.\n")
    p.add_argument("--data", required=True, help="COCO json of the training images")
    p.add_argument("--val-data", default=None, help="COCO json of the validation images (COCO AP at the end)")
    p.add_argument("--images", default=None, help="folder of the training images (default: the json's folder)")
    p.add_argument("--val-images", default=None)
    p.add_argument("--model", default="BiT-M-R101x3", help="backbone: released name, run, weights file or architecture")
    p.add_argument("--out", type=Path, required=True)
    g = p.add_argument_group("plan (default: the paper's)")
    g.add_argument("--resolution", type=int, default=1024, help="input size (default 1024)")
    g.add_argument("--batch", type=int, default=256, help="batch (default 256)")
    g.add_argument("--base-lr", type=float, default=None, help="lr (default 0.08 x batch/256)")
    g.add_argument("--epochs", type=float, default=30.0)
    g.add_argument("--decay-epochs", type=parse_floats, default=(16.0, 22.0), help="lr /10 at these epochs (16,22)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (not in the paper)")
    g.add_argument("--fpn-channels", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_detect_train)


def _run_detect_train(args) -> int:
    from ..detection.train import DetectOptions, run_detect_train

    summary = run_detect_train(DetectOptions(
        data=args.data, val_data=args.val_data, images=args.images, val_images=args.val_images, model=args.model,
        out=args.out, resolution=args.resolution, batch=args.batch, base_lr=args.base_lr, epochs=args.epochs,
        decay_epochs=args.decay_epochs, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
        fpn_channels=args.fpn_channels, seed=args.seed, workers=args.workers, device=args.device,
        progress=not args.quiet))
    final = summary["final"]
    print(f"trained {summary['steps']} steps; model: {summary['model']}"
          + (f"; validation AP {final['AP']:.3f}, AP50 {final['AP50']:.3f}" if final else ""))
    return 0


def _add_detect_eval(sub) -> None:
    p = verb(sub, "detect-eval", "COCO AP of a trained detection run on COCO-format data (pycocotools).",
              "  bigtransfer detect-eval --model runs/det --data coco/val.json --out runs/det/eval\n")
    p.add_argument("--model", required=True, help="a detect-train run directory")
    p.add_argument("--data", required=True, help="COCO json")
    p.add_argument("--images", default=None, help="folder of the images (default: the json's folder)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write detections.json and metrics.json here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_detect_eval)


def _run_detect_eval(args) -> int:
    from ..detection.train import run_detect_eval

    metrics = run_detect_eval(args.model, args.data, args.images, device=args.device, batch=args.batch, out=args.out,
                              progress=not args.quiet)
    print(coco_line(metrics))
    return 0


def coco_line(metrics: dict[str, float]) -> str:
    """COCO's metrics on one line; its -1 (no ground-truth object of that size) said in words."""
    def value(name: str, v: float) -> str:
        if v == -1:
            size = name.rsplit("_", 1)[-1] if "_" in name else ""
            return f"n/a (no {size} objects)" if size else "n/a"
        return f"{v:.3f}"

    return "  ".join(f"{k} {value(k, v)}" for k, v in metrics.items())


VERBS = (_add_detect_train, _add_detect_eval,)
