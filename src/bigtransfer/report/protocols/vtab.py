"""VTAB-1k's report: test top-1 per task, per group and overall, and how each task's 800/200 came about."""

from __future__ import annotations

import statistics
from pathlib import Path

from ...data.vtab_tasks import GROUP_OF, GROUPS, aggregate
from ..folder import read_json, read_protocol, tolerant, write_results
from ..pages import escape, figure_html, percent, table_html

PROTOCOL = "vtab"


@tolerant
def collect_vtab(out: Path) -> dict:
    """Every finished VTAB-1k run; per task the mean test top-1 over runs, per group, overall."""
    out = Path(out)
    protocol = read_protocol(out)
    runs = []
    for task in protocol["tasks"]:
        for variant in ("train800val200", "train800"):
            for seed in range(protocol["runs"]):
                path = out / task / variant / f"seed{seed}" / "summary.json"
                if path.is_file():
                    final = read_json(path)["final"]
                    runs.append({"task": task, "group": GROUP_OF[task], "split": variant, "seed": seed,
                                 "top1": final["top1"], "scored_on": "test" if variant == "train800val200" else
                                 "val200", "run": str(path.parent)})

    def per_task(variant):
        scores = {}
        for task in protocol["tasks"]:
            accs = [r["top1"] for r in runs if r["task"] == task and r["split"] == variant]
            if accs:
                scores[task] = statistics.mean(accs)
        return scores

    splits = {task: read_json(out / task / "splits.json") for task in protocol["tasks"]
              if (out / task / "splits.json").is_file()}
    return {"protocol": protocol, "test": aggregate(per_task("train800val200")),
            "val200": per_task("train800") if protocol.get("validate") else {}, "runs": runs,
            "finished": sum(r["split"] == "train800val200" for r in runs),
            "expected": len(protocol["tasks"]) * protocol["runs"], "splits": splits}


def _splits_text(record: dict | None) -> str:
    """How a task's 800/200 came about, for the report."""
    if not record:
        return ""
    if record["source"] == "given":
        return f"given ({record['train800']}/{record['val200']})"
    return f"drawn from train, seed {record.get('split_seed')} ({record['train800']}/{record['val200']})"


def vtab_figure(results: dict):
    """Test top-1 per task, coloured by group, with each group's mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"natural": "tab:green", "specialized": "tab:purple", "structured": "tab:orange"}
    scores = results["test"]["tasks"]
    tasks = [t for tasks in GROUPS.values() for t in tasks if t in scores]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(tasks) + 2), 4.2))
    xs = range(len(tasks))
    ax.bar(xs, [scores[t] for t in tasks], color=[colours[GROUP_OF[t]] for t in tasks])
    for group, mean in results["test"]["groups"].items():
        members = [i for i, t in enumerate(tasks) if GROUP_OF[t] == group]
        ax.hlines(mean, members[0] - 0.4, members[-1] + 0.4, colors=colours[group], linestyles="dashed",
                  label=f"{group} mean {mean:.1%}")
    ax.set_xticks(list(xs), tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("VTAB-1k per task (bars) and per group (dashed)")
    fig.tight_layout()
    return fig


@tolerant
def write_vtab_report(out: Path, results: dict) -> Path:
    """results.json, results.csv (one row per run) and report.html of a VTAB-1k run."""
    test = results["test"]
    splits = results.get("splits", {})
    rows = [[t, GROUP_OF[t], percent(v), percent(results["val200"].get(t)), _splits_text(splits.get(t))]
            for t, v in test["tasks"].items()]
    rows += [[f"{g} (mean)", g, percent(v), "", ""] for g, v in test["groups"].items()]
    rows.append(["VTAB-1k (mean over tasks)", "all", percent(test["mean"]), "", ""])
    note = (f"<p class='note'>model {escape(results['protocol']['finetune']['model'])}; "
            f"{escape(results['finished'])} of {escape(results['expected'])} runs finished; "
            + ("all 19 tasks." if test["complete"] else "<b>not all 19 tasks: the mean is not the VTAB score.</b>")
            + " Test top-1 after fine-tuning on train800val200 with BiT-HyperRule (mean over runs).</p>")
    sections = [("Scores", table_html(["task", "group", "test top-1", "val200 top-1", "train800/val200"], rows)
                 + note)]
    if test["tasks"]:
        sections.insert(0, ("Per task and group", figure_html(vtab_figure(results), "VTAB-1k scores")))
    return write_results(out, results, ["task", "group", "split", "seed", "scored_on", "top1"],
                         [[r["task"], r["group"], r["split"], r["seed"], r["scored_on"], r["top1"]]
                          for r in results["runs"]], "VTAB-1k", sections)


def rebuild(out: Path) -> Path:
    """The VTAB-1k results files and report from the runs finished so far."""
    return write_vtab_report(out, collect_vtab(out))
