"""Logit differences between bigtransfer and timm / transformers for every released architecture.

Reading: the library's own randomly initialised model (its init for the kernels; every norm scale
and shift and the head perturbed with a seeded generator, so nothing is the identity) is saved in
its format (a timm state dict; a transformers save_pretrained folder) and loaded with
`bigtransfer.create_model(arch, weights=...)`. Both run the same input in fp32.

Writing: our randomly initialised model (weight-standardisation eps 1e-10) handed to the library
as `bigtransfer export` does it, kernels scaled by sqrt(1e-8 / 1e-10) = 10, and, to show what that
scaling is for, unscaled.

The figure is max |ours - theirs| / max |theirs| over the logits of 2 images, in fp32 and again
with both models converted to fp64: fp64 separates what the mapping does (nothing, if it is right)
from fp32 rounding, which on these deep random networks is itself of order 1e-5 to 1e-4 (the last
column: each library's fp32 model against its own fp64, and ours also without the channels_last
layout its CPU inference switches to). One architecture
per child process (R152x4 has 936M parameters: 3.7 GB per fp32 copy, 7.5 GB in fp64); models are
converted in place and freed before the next is built.

    python benchmarks/interop_logits.py                     # all six architectures, both libraries
    python benchmarks/interop_logits.py --archs R50x1,R101x1 --size 64
Needs timm and transformers (`pip install -e '.[interop]'`). Writes benchmarks/results/interop_logits.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
ARCHS = {"R50x1": ((3, 4, 6, 3), 1), "R50x3": ((3, 4, 6, 3), 3), "R101x1": ((3, 4, 23, 3), 1),
         "R101x3": ((3, 4, 23, 3), 3), "R152x2": ((3, 8, 36, 3), 2), "R152x4": ((3, 8, 36, 3), 4)}
CLASSES = 10


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "head" in name or "classifier" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    diff = float((ours - theirs).abs().max())
    return {"max_abs_diff": diff, "relative_diff": diff / float(theirs.abs().max())}


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def hf_config(units, width):
    import transformers

    c0 = int(64 * width)
    return transformers.BitConfig(num_labels=CLASSES, depths=list(units), embedding_size=c0,
                                  hidden_sizes=[4 * c0 * 2**i for i in range(4)])


def read(arch: str, library: str, x: torch.Tensor, tmp: Path) -> dict:
    """The library's own model, saved in its format, loaded by bigtransfer."""
    import timm
    import transformers
    from safetensors.torch import save_file

    import bigtransfer

    torch.manual_seed(0)
    if library == "timm":
        theirs = perturb(timm.create_model(f"resnetv2_{arch[1:]}_bit", pretrained=False, num_classes=CLASSES))
        path = tmp / "timm.safetensors"
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    else:
        theirs = perturb(transformers.BitForImageClassification(hf_config(*ARCHS[arch])))
        path = tmp / "hf"
        theirs.save_pretrained(path)
    want32 = logits(theirs, x)
    theirs.double()
    want64 = logits(theirs, x.double())
    del theirs
    gc.collect()
    ours = bigtransfer.create_model(arch, weights=path).eval()
    got32 = logits(ours, x)
    ours.double()
    return {"fp32": relative(got32, want32), "fp64": relative(logits(ours, x.double()), want64),
            "theirs_fp32_vs_fp64": relative(want32.double(), want64)}  # the library's own fp32 rounding


def write(arch: str, x: torch.Tensor) -> dict:
    """Our model (eps 1e-10) inside timm's and transformers' modules, which share its tensors (one copy of
    the weights): unscaled, then with the kernels scaled in place as the export scales them."""
    import transformers
    from timm.layers import StdConv2d as TimmStdConv
    from timm.models.resnetv2 import ResNetV2 as TimmResNetV2

    import bigtransfer
    from bigtransfer.models import interop
    from bigtransfer.models.resnetv2 import FOREIGN_WS_EPS, StdConv2d

    torch.manual_seed(0)
    ours = perturb(bigtransfer.create_model(arch, num_classes=CLASSES, zero_head=False))
    units, width = ARCHS[arch]
    scale = (FOREIGN_WS_EPS / ours.config.ws_eps) ** 0.5
    result = {"kernel_scale": scale}
    with torch.no_grad():  # our forward without its CPU channels_last switch: what that layout's kernels round
        wants = {"fp32_contiguous": ours.forward_head(F.relu(ours.norm(ours.stages(ours.root(x)))).mean(dim=(2, 3)))}
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        ours.to(dtype)
        xd = x.to(dtype)
        kernels = [m.weight for m in ours.modules() if isinstance(m, StdConv2d)]
        want = wants[name] = logits(ours, xd)
        state = ours.state_dict()
        with torch.device("meta"):
            timm_model = TimmResNetV2(layers=list(units), width_factor=width, stem_type="fixed",
                                      num_classes=CLASSES, conv_layer=partial(TimmStdConv, eps=FOREIGN_WS_EPS))
            hf_model = transformers.BitForImageClassification(hf_config(units, width))
        timm_model.load_state_dict(interop.from_ours(state, interop.Layout(interop.TIMM)), assign=True)
        hf_model.load_state_dict(interop.from_ours(state, interop.Layout(interop.TRANSFORMERS, "bit.")), assign=True)
        timm_model.eval(), hf_model.eval()
        result[f"timm_unscaled_{name}"] = relative(want, logits(timm_model, xd))
        result[f"transformers_unscaled_{name}"] = relative(want, logits(hf_model, xd))
        with torch.no_grad():
            for kernel in kernels:  # the libraries' modules hold these same tensors
                kernel.mul_(scale)
        result[f"timm_{name}"] = relative(want, logits(timm_model, xd))
        result[f"transformers_{name}"] = relative(want, logits(hf_model, xd))
        with torch.no_grad():
            for kernel in kernels:
                kernel.div_(scale)
        del timm_model, hf_model, state
        gc.collect()
    result["ours_fp32_vs_fp64"] = relative(wants["fp32"].double(), wants["fp64"])  # fp32's own rounding
    result["ours_fp32_contiguous_vs_fp64"] = relative(wants["fp32_contiguous"].double(), wants["fp64"])
    return result


def measure(arch: str, size: int) -> dict:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    record = {"arch": arch}
    with tempfile.TemporaryDirectory() as tmp:
        for library in ("timm", "transformers"):
            started = time.perf_counter()
            record[f"read_{library}"] = read(arch, library, x, Path(tmp))
            gc.collect()
            print(f"  {arch} read {library}: {json.dumps(record[f'read_{library}'])} "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    record["write"] = write(arch, x)
    print(f"  {arch} write: {json.dumps(record['write'])} ({time.perf_counter() - started:.0f}s)", file=sys.stderr,
          flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated (default: all six)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.size)))
        return
    import timm
    import transformers

    rows = []
    for arch in args.archs.split(","):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", arch, "--size", str(args.size)],
                             capture_output=False, stdout=subprocess.PIPE, text=True, check=True)
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - started})
    report = {"command": " ".join(["python", "benchmarks/interop_logits.py", *sys.argv[1:]]),
              "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
              "machine": platform.processor() or platform.machine(), "input": [2, 3, args.size, args.size],
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "interop_logits.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Logits: bigtransfer vs timm {timm.__version__} and transformers {transformers.__version__}", "",
             f"`{report['command']}` (torch {torch.__version__}, input {report['input']}, random weights)", "",
             "max |ours - theirs| / max |theirs| over the logits, fp32 (fp64 in brackets)", "",
             ("| architecture | read timm | read transformers | export to timm | export to transformers "
              "| export to timm, kernels unscaled | export to transformers, kernels unscaled "
              "| fp32 vs fp64: ours, ours without channels_last, timm's, transformers' |"),
             "|---|---|---|---|---|---|---|---|"]

    def cell(pair: dict) -> str:
        return f"{pair['fp32']['relative_diff']:.1e} ({pair['fp64']['relative_diff']:.0e})"

    for r in rows:
        w = r["write"]
        exports = [{"fp32": w[f"{k}_fp32"], "fp64": w[f"{k}_fp64"]}
                   for k in ("timm", "transformers", "timm_unscaled", "transformers_unscaled")]
        lines.append(f"| {r['arch']} | {cell(r['read_timm'])} | {cell(r['read_transformers'])} | "
                     + " | ".join(cell(e) for e in exports)
                     + f" | {w['ours_fp32_vs_fp64']['relative_diff']:.1e}, "
                       f"{w['ours_fp32_contiguous_vs_fp64']['relative_diff']:.1e}, "
                       f"{r['read_timm']['theirs_fp32_vs_fp64']['relative_diff']:.1e}, "
                       f"{r['read_transformers']['theirs_fp32_vs_fp64']['relative_diff']:.1e} |")
    (RESULTS / "interop_logits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
