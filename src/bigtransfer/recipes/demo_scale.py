"""BiT at the demo's scale: the upstream recipe and BiT-HyperRule shrunk to minutes on a CPU.

Plain data, shared by the offline demo (`bigtransfer demo`) and the normalisation ablation, which
runs at the same scale: procedural glyphs upstream, scikit-learn's digits downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL = "full"


@dataclass(frozen=True)
class DemoConfig:
    upstream_data: str = "glyphs:deform=3"  # 100 classes x 200 images, 32 px, shapes jittered per example
    recipe: str = "bit-s"  # single-label upstream data, like ILSVRC-2012: softmax cross-entropy
    arch: str = "R14x0.5"  # units [1,1,1,1]: the smallest member that keeps GroupNorm(32)
    upstream_resolution: int = 32
    pretrain_epochs: float = 3.0
    pretrain_batch: int = 128
    pretrain_base_lr: float = 0.1  # at batch 256 (the recipe's 0.03 is tuned for 90 epochs)
    min_crop_area: float = 0.35  # glyphs are small: an 8% crop would cut most of the class away
    pretrain_seed: int = 0  # init, data order and augmentation of pre-training
    pretrain_flip: bool = False  # many glyph classes are asymmetric strokes: a mirror is another class
    shots: tuple = (1, 5, 10, FULL)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # draws per shot count, as in the paper (5)
    finetune_batch: int = 16
    finetune_steps: int = 160
    finetune_lr: float = 0.003  # the HyperRule's own
    finetune_resolution: tuple[int, int] = (36, 32)
    workers: int = 0  # loader processes per run: the digits are tiny, and each run has one core
    jobs: int = 0  # runs at once; 0: one per usable CPU core (one on a GPU)
    precision: str = "auto"  # auto | fp32 | bf16, as for every training verb
    device: str = "auto"


DEMO_SCALE = DemoConfig()  # the demo's own settings
