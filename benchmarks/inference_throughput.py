"""Inference throughput on this CPU: R50x1 at 224 and 128 px, batch 1 and 16, in images/s and
relative to timm's eager `resnetv2_50x1_bit` (random weights, `pretrained=False`).

Every variant runs in this one process, interleaved round by round (A B C ... A B C ...), so
machine drift and other people's jobs hit all of them alike; each figure is the median over
rounds, and each speed-up the median of the per-round ratios, with its min-max spread.

    timm            timm's eager model, NCHW fp32 (the baseline)
    ours-plain      ours standardizing every kernel on every forward pass (as before the fast path)
    ours-torch      the Predictor's torch backend: kernels folded once, channels_last
    ours-onnxruntime the Predictor's onnxruntime backend: the folded graph in ONNX Runtime
    ours-bf16       the torch backend in bf16 autocast (only where the CPU computes bf16 natively)
    ours-int8       ONNX Runtime static QDQ int8 of the folded graph (calibrated on real digits)
  with --explore, also what was tried on the way:
    ours-torch-nchw   folded kernels, NCHW input and activations
    ort-basic / ort-extended  ONNX Runtime with fewer graph optimisations
    ort-1-thread      ONNX Runtime on one intra-op thread
    ours-inductor     torch.compile (inductor, freezing: weights constant-folded), channels_last

`--accuracy-run RUN` also exports RUN (a fine-tuned run) to int8 with `bigtransfer export
--quantize int8`, calibrated on its data's training split, and records the top-1 it measures on
the run's own test split against fp32. The run recorded in results/inference_cpu.md is R50x1
trained from scratch on scikit-learn's digits at 32 px (91.3% top-1, 539 test images):

    bigtransfer finetune --data digits --model R50x1 --batch 32 --steps 200 --resolution 32/32 \
        --base-lr 0.01 --eval-every 100 --out runs/digits-r50

    python benchmarks/inference_throughput.py --rounds 9
    python benchmarks/inference_throughput.py --explore --rounds 5 --out inference_cpu_explore

Needs timm and onnxruntime (`pip install -e '.[bench,export]'`). Writes JSON + Markdown under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from bigtransfer import create_model, machine
from bigtransfer.inference import backends
from bigtransfer.models.resnetv2 import keep_standardized_kernels

RESULTS = HERE / "results"
SETTINGS = ((224, 1), (224, 16), (128, 1), (128, 16))
IMAGES_PER_MEASUREMENT = 16  # default: batch 1 runs 16 times per round, batch 16 once
GOALS = {"best_fp32": 1.5, "bf16": 2.0, "int8": 2.5}
CALIBRATION_IMAGES = 64


def ours(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("R50x1", num_classes=1000, zero_head=False).eval()


def torch_runner(model, x, memory_format=None):
    x = x if memory_format is None else x.contiguous(memory_format=memory_format)

    def run():
        with torch.inference_mode():
            return model(x)
    return run


def ort_runner(path: Path, x: torch.Tensor, threads: int | None = None, level: str = "all"):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = {"basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pixels = x.numpy()
    return lambda: session.run(["logits"], {"images": pixels})[0]


def digits_loaders(count: int):
    """Real images to calibrate int8 on: scikit-learn's handwritten digits (training split)."""
    from bigtransfer.data.sources import load_source

    train = load_source("digits", progress=False).train
    return [lambda i=i: train.load(i) for i in np.linspace(0, len(train) - 1, count).round().astype(int)]


def build_variants(size: int, batch: int, work: Path, explore: bool) -> tuple[dict, dict]:
    """{name: callable running one batch}, {name: why it was skipped}."""
    import timm

    from bigtransfer.sharing.quantize import quantize_int8
    from bigtransfer.train.loop import native_bf16

    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    variants, skipped = {}, {}
    torch.manual_seed(0)
    variants["timm"] = torch_runner(timm.create_model("resnetv2_50x1_bit", pretrained=False).eval(), x)
    plain = ours()
    keep_standardized_kernels(plain, False)
    variants["ours-plain"] = torch_runner(plain, x)
    fast = backends.prepare_torch(ours(), "fp32")
    forward = backends.TorchForward(fast, torch.device("cpu"), "fp32")
    variants["ours-torch"] = lambda: forward(x, "logits")
    onnx_path = work / f"r50x1-{size}.onnx"
    if not onnx_path.exists():
        backends.write_onnx(ours(), size, onnx_path)
    variants["ours-onnxruntime"] = ort_runner(onnx_path, x)
    if native_bf16(torch.device("cpu")):
        bf16 = backends.TorchForward(backends.prepare_torch(ours(), "bf16"), torch.device("cpu"), "bf16")
        variants["ours-bf16"] = lambda: bf16(x, "logits")
    else:
        flags = ", ".join(machine.cpu()["flags"] or []) or "unknown"
        skipped["ours-bf16"] = (f"this CPU has no native bf16 (its kernel-relevant flags: {flags}); emulated bf16 "
                                "would time the emulation, not bf16")
    int8_path = work / f"r50x1-{size}-int8.onnx"
    if not int8_path.exists():
        quantize_int8(onnx_path, int8_path, digits_loaders(CALIBRATION_IMAGES), size, work)
    variants["ours-int8"] = ort_runner(int8_path, x)
    if explore:
        variants["ours-torch-nchw"] = _nchw_runner(fast, x)
        variants["ort-basic"] = ort_runner(onnx_path, x, level="basic")
        variants["ort-extended"] = ort_runner(onnx_path, x, level="extended")
        variants["ort-1-thread"] = ort_runner(onnx_path, x, threads=1)
        variants["ours-inductor"] = _inductor_runner(x)
    check_agreement(variants, x)
    return variants, skipped


def _nchw_runner(folded, x):
    """The folded model with NCHW activations: forward_features' channels_last switch bypassed."""
    def run():
        with torch.inference_mode():
            h = folded.stages(folded.root(x))
            h = torch.relu(folded.norm(h)).mean(dim=(2, 3))
            return folded.forward_head(h)
    return run


def _inductor_runner(x):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # parameters become constants: folding and weight pre-packing at compile
    model = backends.prepare_torch(ours(), "fp32").to(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    xc = x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(xc)
    print(f"  inductor compile {time.perf_counter() - start:.0f}s", flush=True)
    return torch_runner(compiled, xc)


def check_agreement(variants: dict, x: torch.Tensor) -> None:
    """Our fp32 variants compute one function (timm's has other random weights; int8 is approximate)."""
    want = torch.as_tensor(np.asarray(variants["ours-plain"]()))
    for name, run in variants.items():
        if name in ("timm", "ours-plain", "ours-int8", "ours-bf16"):
            continue
        got = torch.as_tensor(np.asarray(run()))
        difference = float((got - want).abs().max() / want.abs().max())
        if difference > 1e-4:
            raise SystemExit(f"{name} disagrees with ours-plain: relative difference {difference:.2e}")


def measure(variants: dict, batch: int, rounds: int, warmup: int, images: int) -> dict:
    """Seconds per image of every variant, round by round, interleaved."""
    calls = max(1, images // batch)
    for _ in range(warmup):
        for run in variants.values():
            run()
    seconds = {name: [] for name in variants}
    for r in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            seconds[name].append((time.perf_counter() - start) / (calls * batch))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {1 / s[-1]:.1f}" for n, s in seconds.items()),
              flush=True)
    return seconds


def summarize(seconds: dict) -> dict:
    base = seconds["timm"]
    out = {}
    for name, times in seconds.items():
        ratios = [b / t for b, t in zip(base, times)]
        out[name] = {"images_per_s": 1 / statistics.median(times),
                     "images_per_s_range": [1 / max(times), 1 / min(times)],
                     "vs_timm": statistics.median(ratios), "vs_timm_range": [min(ratios), max(ratios)]}
    return out


def accuracy(run: Path, work: Path) -> dict:
    """Top-1 of RUN's fp32 and int8 ONNX on its own test split, through `bigtransfer export`."""
    from bigtransfer.sharing.export import export

    config = json.loads((run / "config.json").read_text())
    report = export(str(run), work / "accuracy-int8.onnx", "onnx", quantize="int8", calibration=config["data"],
                    max_drop=100.0, overwrite=True)
    return {"run": str(run), "model": config.get("model"), "data": config["data"],
            "resolution": report["input"][-1], **report["quantization"]}


def markdown(report: dict) -> str:
    cpu = machine.one_line(report["machine"])
    names = ["ours-plain", "ours-torch", "ours-onnxruntime", "ours-bf16", "ours-int8"]
    extra = sorted({n for s in report["settings"] for n in s["variants"]} - set(names) - {"timm"})
    lines = [(f"R50x1 inference, random weights, images/s and speed-up over timm's eager `resnetv2_50x1_bit` "
             f"(median of {report['rounds']} interleaved rounds; [min, max] of the per-round ratio), on {cpu}, "
             f"onnxruntime {report['onnxruntime']}, timm {report['timm']}."), "",
             f"    {report['command']}", "",
             "| px | batch | timm img/s | " + " | ".join(names + extra) + " | best fp32 | goal 1.5x |",
             "|---|---|---|" + "---|" * (len(names) + len(extra)) + "---|---|"]
    for s in report["settings"]:
        v = s["variants"]
        cells = []
        for name in names + extra:
            if name in v:
                r = v[name]
                cells.append(f"{r['images_per_s']:.1f} img/s, {r['vs_timm']:.2f}x "
                             f"[{r['vs_timm_range'][0]:.2f}, {r['vs_timm_range'][1]:.2f}]")
            else:
                cells.append("skipped" if name in s["skipped"] else "-")
        best_name, best = s["best_fp32"]
        met = "met" if best >= GOALS["best_fp32"] else f"short by {GOALS['best_fp32'] - best:.2f}x"
        lines.append(f"| {s['size']} | {s['batch']} | {v['timm']['images_per_s']:.1f} | " + " | ".join(cells)
                     + f" | {best_name} {best:.2f}x | {met} |")
    int8 = [s["variants"]["ours-int8"]["vs_timm"] for s in report["settings"] if "ours-int8" in s["variants"]]
    if int8:
        lines += ["", f"int8 against its goal of {GOALS['int8']}x timm: "
                  + ", ".join(f"{s['size']} px batch {s['batch']} {s['variants']['ours-int8']['vs_timm']:.2f}x"
                              for s in report["settings"]) + "."]
    for s in report["settings"][:1]:
        for name, why in s["skipped"].items():
            lines += ["", f"{name}: skipped: {why}."]
    if "load_average_at_start" in report:
        start, end = report["load_average_at_start"], report.get("load_average_at_end", [float("nan")])
        lines += ["", (f"The machine's 1-minute load average was {start[0]:.1f} at the start and {end[0]:.1f} at the end "
                      f"(on {report['machine']['cpu']['cores']} cores): other people's jobs ran throughout.")]
    acc = report.get("accuracy")
    if acc:
        lines += ["", (f"int8 top-1 on real held-out images: `{acc['run']}` ({acc['model']} fine-tuned on "
                      f"`{acc['data']}` at {acc['resolution']} px), {acc['evaluated_images']} images of "
                      f"{acc['evaluated_on']}: fp32 {acc['top1_fp32']:.2%}, int8 {acc['top1_int8']:.2%} "
                      f"({acc['top1_change_points']:+.2f} points; calibrated on {acc['calibration_images']} images "
                      f"of {acc['calibration']}).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=IMAGES_PER_MEASUREMENT,
                        help="images per measurement (batch 1: this many calls; default %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and ONNX Runtime intra-op threads (default: torch's, the cores)")
    parser.add_argument("--settings", default=",".join(f"{s}x{b}" for s, b in SETTINGS),
                        help="comma-separated SIZExBATCH (default: %(default)s)")
    parser.add_argument("--explore", action="store_true", help="also the variants tried on the way (slow: compiles)")
    parser.add_argument("--accuracy-run", type=Path, default=None, help="a fine-tuned run to measure int8 top-1 on")
    parser.add_argument("--out", default="inference_cpu", help="result file stem under benchmarks/results/")
    parser.add_argument("--markdown-only", action="store_true", help="re-render OUT.md from OUT.json and stop")
    args = parser.parse_args()
    if args.markdown_only:
        report = json.loads((RESULTS / f"{args.out}.json").read_text())
        (RESULTS / f"{args.out}.md").write_text(markdown(report))
        return
    import onnxruntime
    import timm

    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)  # ONNX Runtime's sessions take torch's count (ort_runner)
    report = {"command": " ".join(["python", "benchmarks/inference_throughput.py", *sys.argv[1:]]),
              "machine": machine.describe("cpu"), "onnxruntime": onnxruntime.__version__, "timm": timm.__version__,
              "rounds": args.rounds, "load_average_at_start": os.getloadavg(), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.accuracy_run:
            report["accuracy"] = accuracy(args.accuracy_run, work)
            print(f"accuracy: {report['accuracy']}", flush=True)
        for size, batch in settings:
            print(f"{size} px, batch {batch}", flush=True)
            variants, skipped = build_variants(size, batch, work, args.explore)
            result = summarize(measure(variants, batch, args.rounds, args.warmup, args.images))
            fp32 = {n: r["vs_timm"] for n, r in result.items() if n not in ("timm", "ours-int8", "ours-bf16")}
            best = max(fp32, key=fp32.get)
            report["settings"].append({"size": size, "batch": batch, "variants": result, "skipped": skipped,
                                       "best_fp32": [best, fp32[best]]})
            del variants
    report["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
