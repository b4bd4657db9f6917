"""Pre-train the demo's upstream model with some of its settings changed, to compare upstream
variants by what their features give at 1 shot (issue 18). The demo's own test split is never
read: score the result with benchmarks/demo_oneshot.py, which fine-tunes on draws from the
digits' training part and evaluates on a validation split carved from it.

    python benchmarks/demo_upstream.py /tmp/up/lr02 pretrain_base_lr=0.2
    python benchmarks/demo_oneshot.py --pretrained /tmp/up/lr02 --out /tmp/up/lr02-ft --shots 1 \\
        --seeds 0,1,2,3,4 --variant "demo:batch=16,steps=160,base_lr=0.003" --threads 1

Each KEY=VALUE overrides a DemoConfig field (pretrain_epochs, pretrain_base_lr, min_crop_area,
upstream_data, arch, pretrain_seed, ...); with none, this is the demo's own pre-training.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bigtransfer.demo import DemoConfig
from bigtransfer.pretrain import PretrainOptions, run_pretrain


def configured(overrides: list[str]) -> DemoConfig:
    config = DemoConfig()
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(DemoConfig)} or not value:
            sys.exit(f"demo_upstream: expected KEY=VALUE over DemoConfig's fields, got {item!r}")
        changes[key] = type(getattr(config, key))(value)
    return dataclasses.replace(config, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the pretrain run directory to write")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE over DemoConfig")
    args = parser.parse_args()
    c = configured(args.overrides)
    start = time.perf_counter()
    run_pretrain(PretrainOptions(
        data=c.upstream_data, model=c.arch, out=args.out, recipe=c.recipe, seed=c.pretrain_seed, flip=c.pretrain_flip,
        resolution=c.upstream_resolution, batch=c.pretrain_batch, epochs=c.pretrain_epochs, base_lr=c.pretrain_base_lr,
        min_crop_area=c.min_crop_area, probe_data="digits", probe_resolution=c.finetune_resolution[1], workers=1,
        precision="fp32", progress=False, log_every=50))
    print(f"pre-trained {args.out} in {time.perf_counter() - start:.0f} s ({', '.join(args.overrides) or 'the demo'})")


if __name__ == "__main__":
    main()
