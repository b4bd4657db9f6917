"""The few-shot sweep's report: every run a point, min <- median -> max per examples-per-class."""

from __future__ import annotations

from pathlib import Path

from ..folder import read_json, read_protocol, spread, tolerant, write_results
from ..pages import escape, figure_html, percent, table_html

PROTOCOL = "fewshot"


def shot_order(shots) -> list:
    """Examples per class in increasing order, "full" (the whole training set) last."""
    return sorted(shots, key=lambda k: float("inf") if k == "full" else int(k))


@tolerant
def collect_fewshot(out: Path) -> dict:
    """Every finished run of a few-shot sweep, and min/median/max per K for each method."""
    out = Path(out)
    protocol = read_protocol(out)
    runs = []
    for k in protocol["shots"]:
        for seed in range(protocol["repeats"]):
            summary_path = out / f"{k}shot" / f"seed{seed}" / "summary.json"
            if summary_path.is_file():
                final = read_json(summary_path)["final"]
                runs.append({"method": "finetune", "shots": k, "seed": seed, "top1": final["top1"],
                             "top5": final.get("top5"), "run": str(summary_path.parent)})
    probe_path = out / "linear_probe.json"
    if probe_path.is_file():
        for record in read_json(probe_path).values():
            if record["shots"] in protocol["shots"]:
                runs.append({"method": "linear_probe", **record, "run": str(probe_path)})
    summary: dict = {}
    for method in ("finetune", "linear_probe"):
        for k in shot_order(protocol["shots"]):
            accs = [r["top1"] for r in runs if r["method"] == method and r["shots"] == k]
            if accs:
                summary.setdefault(method, {})[str(k)] = spread(accs)
    expected = len(protocol["shots"]) * protocol["repeats"]
    finished = sum(r["method"] == "finetune" for r in runs)
    return {"protocol": protocol, "summary": summary, "runs": runs, "finished": finished, "expected": expected}


def fewshot_table(results: dict) -> tuple[list[str], list[list]]:
    """The report's (and the CLI's) table: one row per K, fine-tuning and linear-probe spreads."""
    header = ["examples/class", "fine-tune: min <- median -> max", "runs", "linear probe: min <- median -> max"]
    rows = []
    for k in shot_order(results["protocol"]["shots"]):
        cells = [str(k)]
        for method in ("finetune", "linear_probe"):
            s = results["summary"].get(method, {}).get(str(k))
            cells.append(f"{percent(s['min'])} <- {percent(s['median'])} -> {percent(s['max'])}" if s else "")
            if method == "finetune":
                cells.append(str(s["runs"]) if s else "0")
        rows.append(cells)
    return header, rows


def fewshot_figure(results: dict, title: str = ""):
    """Accuracy vs examples per class: every run a point, the median a line (paper Fig. 2 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = shot_order(results["protocol"]["shots"])
    numeric = [int(k) for k in shots if k != "full"]
    full_x = max(numeric, default=1) * 2  # "full" drawn to the right of the largest K
    xs = {k: (full_x if k == "full" else int(k)) for k in shots}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"finetune": ("tab:blue", "BiT-HyperRule fine-tuning"), "linear_probe": ("tab:gray", "linear probe")}
    for method, (colour, label) in styles.items():
        points = [(xs[r["shots"]], r["top1"]) for r in results["runs"] if r["method"] == method]
        if not points:
            continue
        ax.scatter(*zip(*points), color=colour, alpha=0.35, s=16)
        medians = results["summary"].get(method, {})
        line = [(xs[k], medians[str(k)]["median"]) for k in shots if str(k) in medians]
        ax.plot(*zip(*line), "-o", color=colour, label=label, markersize=4)
    ax.set_xscale("log")
    ax.set_xticks([xs[k] for k in shots], [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "Few-shot transfer (every run a dot, medians as lines)")
    fig.tight_layout()
    return fig


@tolerant
def write_fewshot_report(out: Path, results: dict) -> Path:
    """results.json, results.csv (one row per run) and report.html of a few-shot sweep."""
    ft = results["protocol"]["finetune"]
    header, rows = fewshot_table(results)
    note = (f"<p class='note'>model {escape(ft['model'])}, data {escape(ft['data'])}; "
            f"{escape(results['finished'])} of {escape(results['expected'])} fine-tuning runs finished. "
            "The linear probe is a logistic regression on the frozen pre-logits of the same draws.</p>")
    fig = fewshot_figure(results, f"{ft['model']} on {Path(str(ft['data'])).name}")
    sections = [("Accuracy vs examples per class", figure_html(fig, "few-shot accuracy") + note),
                ("Test top-1 over random draws", table_html(header, rows))]
    return write_results(out, results, ["method", "examples_per_class", "seed", "top1", "top5"],
                         [[r["method"], r["shots"], r["seed"], r["top1"], r.get("top5")] for r in results["runs"]],
                         "Few-shot transfer", sections)


def rebuild(out: Path) -> Path:
    """The sweep's results files and report from the runs finished so far."""
    return write_fewshot_report(out, collect_fewshot(out))
