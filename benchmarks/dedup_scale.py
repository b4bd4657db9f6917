"""`bigtransfer dedup` on an upstream of 100,000 images on this CPU: time per 1,000 upstream images
and peak memory, with and without a model, with the exact index and with HNSW.

The upstream folder: 100,000 procedural glyphs (bigtransfer.data.procedural, 100 classes, 32 px
grey PNG files, seeded) plus 100 web copies of test images (each test image rescaled, shifted,
brightened, JPEG-70 re-encoded or converted, 20 of each). The downstream folder: 500 of
scikit-learn's digits at 28 px. Each configuration runs `bigtransfer dedup` in a fresh process
(so its peak resident memory is its own), 1 torch thread, no loader workers, the self-test on.

    python benchmarks/dedup_scale.py --model runs/dedup-real/models/pretrained
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

RESULTS = Path(__file__).parent / "results"
COPY_EDITS = ("rescale", "shift", "brightness", "jpeg", "grey_rgb")


def write_upstream(root: Path, count: int) -> float:
    """count glyphs as PNG files under root/upstream/<class>/ (skipped if already there); seconds taken."""
    from bigtransfer.data.procedural import glyphs

    marker = root / f"upstream-{count}.done"
    if marker.exists():
        return float(marker.read_text())
    start = time.perf_counter()
    chunk = 10_000
    for part in range(0, count, chunk):
        n = min(chunk, count - part)
        images = glyphs(100, max(1, n // 100), 0, 32, seed=1000 + part // chunk, progress=False).train
        for i in range(len(images)):
            folder = root / "upstream" / images.classes[images.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.pixels[images.rows[i], :, :, 0]).save(folder / f"g{part + i:06d}.png")
    seconds = time.perf_counter() - start
    marker.write_text(f"{seconds:.1f}")
    return seconds


def write_test_and_copies(root: Path) -> set[tuple[str, str]]:
    """500 digits at 28 px as the test folder; 100 edited copies of them in the upstream folder."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(5)
    chosen = rng.choice(len(bunch.images), 500, replace=False)
    truth = set()
    for n, k in enumerate(chosen.tolist()):
        image = Image.fromarray(np.round(bunch.images[k] * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR)
        path = root / "test" / str(bunch.target[k]) / f"t{k:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        if n < 100:
            edit = COPY_EDITS[n % len(COPY_EDITS)]
            copy, suffix = image, ".png"
            if edit == "rescale":
                copy = image.resize((31, 31), Image.LANCZOS).resize((28, 28), Image.BICUBIC)
            elif edit == "shift":
                copy = image.transform((28, 28), Image.AFFINE, (1, 0, -1, 0, 1, 0), fillcolor=0)
            elif edit == "brightness":
                copy = ImageEnhance.Brightness(image).enhance(1.1)
            elif edit == "jpeg":
                suffix = ".jpg"
            else:
                copy = image.convert("RGB")
            target = root / "upstream" / "copies" / f"web{k:04d}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            copy.save(target, **({"quality": 70} if suffix == ".jpg" else {}))
            truth.add((str(path), str(target)))
    return truth


def run(root: Path, name: str, model: str, index: str) -> dict:
    """One `bigtransfer dedup` in a fresh process; its summary and wall time."""
    out = root / "out" / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "bigtransfer", "dedup", "--upstream", str(root / "upstream"),
               "--downstream", str(root / "test"), "--model", model, "--resolution", "32", "--index", index,
               "--out", str(out), "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - start
    return {"wall_seconds": round(wall, 1), **json.loads((out / "summary.json").read_text()), "out": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/dedup-real/models/pretrained", help="the embedding model")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("runs/dedup-scale"))
    args = parser.parse_args()
    from bigtransfer.dedup import planted_precision_recall

    root = args.work.resolve()
    generate = write_upstream(root, args.count)
    truth = write_test_and_copies(root)
    rows = []
    for name, model, index in (("pixels-exact", "none", "exact"), ("model-exact", args.model, "exact"),
                               ("pixels-hnsw", "none", "approximate")):
        result = run(root, name, model, index)
        scores = planted_precision_recall(Path(result["out"]) / "pairs.csv", truth)
        n = result["upstream_images"]
        per_k = {k: round(1000 * v / n, 2) for k, v in result["seconds"].items()}
        rows.append({"configuration": name, "model": model, "index": index, "upstream_images": n,
                     "wall_seconds": result["wall_seconds"], "seconds_per_1k_upstream": per_k,
                     "peak_memory_mib": result["peak_memory_mib"], "planted": scores,
                     "pixel_index_recall_vs_exact": result["index"]["pixel_recall_vs_exact"],
                     "self_test_overall": result["self_test"]["overall"]})
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": " ".join(["python", *sys.argv]), "generate_seconds": generate, "runs": rows,
              "cpu_threads": 1, "machine_cores": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dedup_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (f"`bigtransfer dedup` with {rows[0]['upstream_images']:,} upstream images ({args.count:,} procedural "
             "glyphs, 32 px PNG, + 100 web copies) and 500 test digits (28 px), 1 torch thread, self-test on "
             "(100 test images x 8 edits)")
    lines = [title, "", f"`{report['command']}`", "",
             ("| configuration | wall time | seconds per 1k upstream images: total (list+check files / "
             "decode+embed+index / search / verify) | peak memory | planted copies found (precision) |"),
             "|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds_per_1k_upstream"]
        lines.append(f"| {r['configuration']} | {r['wall_seconds']:.0f} s | {s['total']:.2f} ({s['load']:.2f} / "
                     f"{s['upstream']:.2f} / {s['search']:.2f} / {s['verify']:.2f}) | {r['peak_memory_mib']:.0f} MiB | "
                     f"{r['planted']['true_positives']}/100 ({r['planted']['precision']:.2f}) |")
    (RESULTS / "dedup_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
