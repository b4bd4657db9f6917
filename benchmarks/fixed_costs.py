"""The fixed costs of a short fine-tune, and the whole job against a plain timm + torchvision script.

The job: R50x1, an image folder of 4000 training and 1000 test images (scikit-learn's
real handwritten digits, upscaled to 28x28 grey PNGs with a random shift each, written once),
30 steps of 32 at 80/64 px, then top-1 on the 1000 test images. Whole processes, alternating
with the plain script (benchmarks/plain_finetune.py) round by round; then each fixed cost of
ours on its own. `--before SRC` measures another checkout's `src/` the same way, in the same
run, for before/after figures.

    python benchmarks/fixed_costs.py                      # this checkout
    python benchmarks/fixed_costs.py --before /tmp/old/src --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
STEPS, BATCH, RESIZE, CROP = 30, 32, 80, 64


def make_data(root: Path, train_per_class: int = 400, test_per_class: int = 100) -> Path:
    """root/train/<digit>/*.png and root/test/<digit>/*.png, 28x28 grey (once; kept for later runs)."""
    if (root / "done").is_file():
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    by_class = {c: np.flatnonzero(digits.target == c) for c in range(10)}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c, members in by_class.items():
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (digits.images[rng.choice(members)] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels).resize((24, 24), Image.BILINEAR)
                canvas = Image.new("L", (28, 28))
                canvas.paste(image, tuple(int(v) for v in rng.integers(0, 5, 2)))
                canvas.save(folder / f"{i:04d}.png")
    (root / "done").write_text("")
    return root


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return seconds, result.stdout


def env_for(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "BIGTRANSFER_HOME": tempfile.mkdtemp()}


def ours_cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bigtransfer", "finetune", "--data", str(data), "--model", "R50x1",
            "--batch", str(BATCH), "--steps", str(STEPS), "--resolution", f"{RESIZE}/{CROP}", "--base-lr", "0.003",
            "--log-every", "1", "--quiet", "--out", str(out)]


def end_to_end(data: Path, trees: dict[str, Path], rounds: int) -> dict:
    """Median whole-process seconds of each tree's `finetune` and of the plain script, alternating."""
    plain = [sys.executable, str(HERE / "plain_finetune.py"), str(data), str(STEPS), str(BATCH), str(RESIZE),
             str(CROP)]
    times: dict[str, list[float]] = {name: [] for name in [*trees, "plain"]}
    runs: dict[str, list[Path]] = {name: [] for name in trees}
    for r in range(rounds):
        for name, src in trees.items():
            out = Path(tempfile.mkdtemp()) / "run"
            times[name].append(timed(ours_cmd(data, out), env_for(src))[0])
            runs[name].append(out)
        times["plain"].append(timed(plain, env_for(SRC))[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    return {"seconds": times, "runs": {k: [str(p) for p in v] for k, v in runs.items()}}


# `bigtransfer finetune ...` with one addition: the moment the data scan ends, on stderr.
SCAN_CLOCK = """
import json, sys, time
try:
    import bigtransfer.recipes.finetune as finetune
except ImportError:  # --before: a tree from before the package was reorganised
    import bigtransfer.finetune as finetune
scan = finetune.prepare_data
def timed(*args, **kwargs):
    splits = scan(*args, **kwargs)
    print(json.dumps({"scan_done": time.time()}), file=sys.stderr, flush=True)
    return splits
finetune.prepare_data = timed
from bigtransfer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def phases(data: Path, src: Path) -> dict:
    """One more run of the job, timed inside: from the end of the data scan to the start of the
    first step (model, plan, run folder, loader) and to its end; from the last step to summary.json
    (the model written, the test images evaluated); and the bytes left in the run folder."""
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-c", SCAN_CLOCK, *ours_cmd(data, out)[3:]]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_for(src), check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    scan_done = next(json.loads(line)["scan_done"] for line in result.stderr.splitlines() if "scan_done" in line)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    first = train[0]  # its rate covers the first window: loader start-up and the step itself
    first_window = BATCH / first["images_per_s"]
    return {"scan_to_first_step_start_s": first["time"] - first_window - scan_done,
            "scan_to_first_step_end_s": first["time"] - scan_done,
            "last_step_to_summary_s": (out / "summary.json").stat().st_mtime - train[-1]["time"],
            "bytes_in_run_folder": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


def fixed_costs(data: Path, src: Path) -> dict:
    """--help, the import, the data scan and the final evaluation, each on its own."""
    env = env_for(src)
    help_s = statistics.median(timed([sys.executable, "-m", "bigtransfer", "--help"], env)[0] for _ in range(5))
    probe = ("import time, json, torch; t0 = time.perf_counter(); "
             "from bigtransfer.data.sources import load_source; t1 = time.perf_counter(); "
             f"splits = load_source({str(data)!r}, progress=False); t2 = time.perf_counter(); "
             "from bigtransfer.data.dataset import TransformedImages; "
             "from bigtransfer.data.transforms import eval_transform; "
             "from bigtransfer.train.loop import evaluate_model; import bigtransfer; "
             "torch.manual_seed(0); m = bigtransfer.create_model('R50x1', num_classes=10); "
             f"d = TransformedImages(splits.test, eval_transform({CROP})); "
             f"t3 = time.perf_counter(); evaluate_model(m, d, batch={2 * BATCH}); t4 = time.perf_counter(); "
             "print(json.dumps({'scan_s': t2 - t1, 'eval_images_per_s': len(d) / (t4 - t3)}))")
    _, out = timed([sys.executable, "-c", probe], env)
    return {"help_s": help_s, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bigtransfer-digits28")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None, help="another checkout's src/ to compare with")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "fixed_costs.json")
    args = parser.parse_args()
    data = make_data(args.data)
    trees = {"ours": SRC, **({"before": args.before} if args.before else {})}
    result = {"job": {"steps": STEPS, "batch": BATCH, "resolution": f"{RESIZE}/{CROP}", "model": "R50x1",
                      "train_images": 4000, "test_images": 1000},
              "end_to_end": end_to_end(data, trees, args.rounds)}
    seconds = result["end_to_end"]["seconds"]
    result["median_s"] = {k: statistics.median(v) for k, v in seconds.items()}
    result["speed_vs_plain"] = {k: [p / o for p, o in zip(seconds["plain"], seconds[k])] for k in trees}
    result["phases"] = {k: [phases(data, src) for _ in range(args.rounds)] for k, src in trees.items()}
    result["fixed_costs"] = {k: fixed_costs(data, src) for k, src in trees.items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name in trees:
        ph = result["phases"][name]
        fc = result["fixed_costs"][name]
        print(f"{name}: median {result['median_s'][name]:.1f}s vs plain {result['median_s']['plain']:.1f}s "
              f"(plain/ours per round {', '.join(f'{r:.2f}' for r in result['speed_vs_plain'][name])}); "
              f"--help {fc['help_s']:.2f}s, scan {fc['scan_s']:.2f}s, scan -> step 1 starts "
              f"{statistics.median(p['scan_to_first_step_start_s'] for p in ph):.2f}s (ends "
              f"{statistics.median(p['scan_to_first_step_end_s'] for p in ph):.2f}s), "
              f"last step -> summary {statistics.median(p['last_step_to_summary_s'] for p in ph):.1f}s, "
              f"run folder {ph[0]['bytes_in_run_folder'] / 2**20:.0f} MiB, "
              f"eval {fc['eval_images_per_s']:.0f} img/s")


if __name__ == "__main__":
    main()
