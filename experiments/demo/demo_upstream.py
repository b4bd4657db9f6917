"""Pre-train the demo's upstream model with some of its settings changed, to compare upstream
variants by what their features give at 1 shot. The demo's own test split is never
read: score the result with experiments/demo/demo_oneshot.py, which fine-tunes on draws from the
digits' training part and evaluates on a validation split carved from it.

    python experiments/demo/demo_upstream.py /tmp/up/lr02 pretrain_base_lr=0.2
    python experiments/demo/demo_oneshot.py --pretrained /tmp/up/lr02 --out /tmp/up/lr02-ft --shots 1 \\
        --seeds 0,1,2,3,4 --variant "demo:batch=16,steps=160,base_lr=0.003" --threads 1

Each KEY=VALUE overrides a DemoConfig field (pretrain_epochs, pretrain_base_lr, min_crop_area,
upstream_data, arch, pretrain_seed, ...); with none, this is the demo's own pre-training.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from bigtransfer.demo.story import DemoConfig, pretrain_upstream


def configured(overrides: list[str], where: str = "demo_upstream") -> DemoConfig:
    """The demo's config with each KEY=VALUE applied; `where` names the input in the error."""
    config = DemoConfig()
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(DemoConfig)} or not value:
            sys.exit(f"{where}: expected KEY=VALUE over DemoConfig's fields, got {item!r}")
        kind = type(getattr(config, key))
        try:
            changes[key] = kind(value)
        except ValueError:
            sys.exit(f"{where}: {key} wants a {kind.__name__}, got {value!r}")
    return dataclasses.replace(config, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the pretrain run directory to write")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE over DemoConfig")
    args = parser.parse_args()
    config = configured(args.overrides)
    _, seconds = pretrain_upstream(dataclasses.replace(config, workers=1, precision="fp32"), args.out, progress=False)
    print(f"pre-trained {args.out} in {seconds:.0f} s ({', '.join(args.overrides) or 'the demo'})")


if __name__ == "__main__":
    main()
