"""Distillation's report: teacher, distilled student and (if named) a directly fine-tuned student,
and the student's test top-1 over training."""

from __future__ import annotations

from pathlib import Path

from ...train.logbook import read_metrics
from ..folder import read_json, read_protocol, tolerant, write_results
from ..pages import escape, figure_html, percent, table_html

PROTOCOL = "distill"


@tolerant
def collect_distill(out: Path) -> dict:
    """A distillation run: teacher, student and (if named) a directly fine-tuned student, and the
    student's evaluations over training."""
    out = Path(out)
    protocol = read_protocol(out)
    summary = read_json(out / "summary.json") if (out / "summary.json").is_file() else {}
    rows = []
    if summary.get("teacher"):
        rows.append({"model": "teacher", "run": protocol["teacher"], **_scores(summary["teacher"])})
    if summary.get("final"):
        rows.append({"model": "student (distilled)", "run": str(out), **_scores(summary["final"])})
    compare = protocol.get("compare")
    if compare and (Path(compare) / "summary.json").is_file():
        rows.append({"model": "student (fine-tuned directly)", "run": compare,
                     **_scores(read_json(Path(compare) / "summary.json")["final"])})
    curve = [(r["step"], r["top1"]) for r in read_metrics(out) if r["kind"] == "eval" and "top1" in r]
    return {"protocol": protocol, "rows": rows, "curve": curve, "labelled": summary.get("labelled")}


def _scores(final: dict) -> dict:
    return {"top1": final.get("top1"), "top5": final.get("top5"), "examples": final.get("examples")}


def distill_figure(results: dict):
    """Test top-1 of teacher, distilled student and directly fine-tuned student; the student over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    rows = [r for r in results["rows"] if r["top1"] is not None]
    colours = {"teacher": "tab:gray", "student (distilled)": "tab:blue", "student (fine-tuned directly)": "tab:orange"}
    bars.bar(range(len(rows)), [r["top1"] for r in rows], color=[colours.get(r["model"], "tab:green") for r in rows])
    bars.set_xticks(range(len(rows)), [r["model"].replace(" (", "\n(") for r in rows], fontsize=8)
    bars.set_ylim(0, 1)
    bars.set_ylabel("test top-1")
    bars.grid(axis="y", alpha=0.3)
    if results["curve"]:
        curve.plot(*zip(*results["curve"]), "-o", color="tab:blue", markersize=3, label="student")
    for r in rows:
        if r["model"] != "student (distilled)":
            curve.axhline(r["top1"], linestyle="--", color=colours.get(r["model"], "tab:green"), label=r["model"])
    curve.set_xlabel("step")
    curve.set_ylim(0, 1)
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8, loc="lower right")
    fig.suptitle("Distillation: teacher vs student")
    fig.tight_layout()
    return fig


@tolerant
def write_distill_report(out: Path, results: dict) -> Path:
    """results.json, results.csv (one row per model) and report.html of a distillation run."""
    p = results["protocol"]
    table = table_html(["model", "test top-1", "test top-5", "images"],
                       [[r["model"], percent(r["top1"]), percent(r["top5"]), r["examples"]] for r in results["rows"]])
    note = (f"<p class='note'>teacher {escape(p['teacher'])}; student {escape(p['student'])}; data {escape(p['data'])}"
            + ("" if results.get("labelled") else " (unlabelled: no test accuracy)") + ".</p>")
    sections = [("Teacher and student", table + note)]
    if results["rows"] or results["curve"]:
        sections.append(("Accuracy", figure_html(distill_figure(results), "distillation accuracy")))
    return write_results(out, results, ["model", "top1", "top5", "examples", "run"],
                         [[r["model"], r["top1"], r["top5"], r["examples"], r["run"]] for r in results["rows"]],
                         "Distillation", sections)


def rebuild(out: Path) -> Path:
    """The distillation's results files and report from its run folder."""
    return write_distill_report(out, collect_distill(out))
