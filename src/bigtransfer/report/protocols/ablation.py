"""The normalisation ablation's report: upstream top-1 per normalisation (paper Table 4) and the
few-shot transfer of each upstream model (Table 5), as BN / GN by with / without WS grids."""

from __future__ import annotations

from pathlib import Path

from ..folder import PROTOCOL_FILE, read_json, read_protocol, tolerant, write_results
from ..pages import escape, figure_html, percent, table_html
from .fewshot import collect_fewshot, shot_order

PROTOCOL = "ablation"
NORM_GRID = (("BatchNorm", ("bn", "bn_ws")), ("GroupNorm", ("gn", "gn_ws")))


def transfer_dir(out: Path, task: str, norm: str) -> Path:
    """The ablation's few-shot sweep of one normalisation's model on one task (a layout the protocol
    and its report share)."""
    return Path(out) / "transfer" / Path(task).name.replace(":", "_") / norm


@tolerant
def collect_ablation(out: Path) -> dict:
    """Upstream top-1 per normalisation (Table 4) and transfer medians per task and K (Table 5)."""
    out = Path(out)
    protocol = read_protocol(out)
    upstream, transfer, ranges = {}, {}, {}
    for norm in protocol["norms"]:
        path = out / "upstream" / norm / "summary.json"
        if path.is_file():
            upstream[norm] = read_json(path)["final"].get("top1")
        for task in protocol["downstream"]:
            sweep = transfer_dir(out, task, norm)
            if (sweep / PROTOCOL_FILE).is_file():
                medians = collect_fewshot(sweep)["summary"].get("finetune", {})
                transfer.setdefault(task, {})[norm] = {k: v["median"] for k, v in medians.items()}
                ranges.setdefault(task, {})[norm] = {k: [v["min"], v["max"]] for k, v in medians.items()}
    return {"protocol": protocol, "upstream_top1": upstream, "transfer_top1": transfer, "transfer_range": ranges}


def norm_grid(values: dict[str, float | None],
              ranges: dict[str, list[float]] | None = None) -> tuple[list[str], list[list]]:
    """A 2x2 table: BN / GN rows, without / with Weight Standardization columns (and min-max if given)."""
    def cell(norm):
        low_high = (ranges or {}).get(norm)
        spread_text = f" ({low_high[0]:.1%}-{low_high[1]:.1%})" if low_high else ""
        return percent(values.get(norm)) + spread_text

    return (["", "plain", "+ Weight Standardization"], [[name, cell(a), cell(b)] for name, (a, b) in NORM_GRID])


def ablation_figure(results: dict, task: str):
    """Median transfer top-1 per K on one task, one line per upstream normalisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    styles = {"bn": ("tab:red", "--"), "bn_ws": ("tab:red", "-"), "gn": ("tab:blue", "--"), "gn_ws": ("tab:blue", "-")}
    for norm, medians in results["transfer_top1"].get(task, {}).items():
        shots = shot_order(medians)
        colour, line = styles[norm]
        ax.plot(range(len(shots)), [medians[k] for k in shots], line, marker="o", color=colour,
                label=norm.upper().replace("_", "+"))
        ax.set_xticks(range(len(shots)), shots)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("test top-1 (median over draws)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"Transfer to {task} by upstream normalisation")
    fig.tight_layout()
    return fig


@tolerant
def write_ablation_report(out: Path, results: dict) -> Path:
    """results.json, results.csv (one row per table cell) and report.html of the ablation."""
    p = results["protocol"]
    sections = [("Table 4: upstream validation top-1",
                 table_html(*norm_grid(results["upstream_top1"]))
                 + f"<p class='note'>{escape(p['arch'])} pre-trained on {escape(p['upstream'])}, "
                   f"{escape(p['upstream_epochs'])} epochs at batch {escape(p['upstream_batch'])}.</p>")]
    for task, by_norm in results["transfer_top1"].items():
        shots = shot_order({k for medians in by_norm.values() for k in medians})
        ranges = results.get("transfer_range", {}).get(task, {})
        tables = "".join(f"<h3>{escape(k)} per class</h3>"
                         + table_html(*norm_grid({n: m.get(k) for n, m in by_norm.items()},
                                             {n: r[k] for n, r in ranges.items() if k in r})) for k in shots)
        sections.append((f"Table 5: transfer to {task} (median (min-max) test top-1 over {p['repeats']} draws)",
                         figure_html(ablation_figure(results, task), f"transfer to {task}") + tables))
    rows = [["upstream", "", norm, "", value] for norm, value in results["upstream_top1"].items()]
    rows += [["transfer", task, norm, k, value] for task, by_norm in results["transfer_top1"].items()
             for norm, medians in by_norm.items() for k, value in medians.items()]
    return write_results(out, results, ["table", "task", "norm", "examples_per_class", "top1"], rows,
                         "Normalisation ablation (BN / GN, with and without WS)", sections)


def rebuild(out: Path) -> Path:
    """The ablation's results files and report from the upstream runs and sweeps finished so far."""
    return write_ablation_report(out, collect_ablation(out))
