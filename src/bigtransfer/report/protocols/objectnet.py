"""The ObjectNet evaluation's report: overall and per-class top-1 and top-5 from objectnet.json."""

from __future__ import annotations

from pathlib import Path

from ...atomic import write_text
from ..folder import read_json, tolerant
from ..pages import escape, figure_html, page, percent, table_html

PROTOCOL = "objectnet"
RESULT_FILE = "objectnet.json"  # the evaluation's result, which the report is drawn from


def objectnet_figure(result: dict):
    """Per-class top-1 (bars) and top-5 (ticks), worst classes first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(result["per_class_accuracy"], key=result["per_class_accuracy"].get)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.18 * len(classes) + 2), 4.0))
    xs = range(len(classes))
    ax.bar(xs, [result["per_class_accuracy"][c] for c in classes], color="tab:blue", label="top-1")
    ax.scatter(xs, [result["per_class_top5"][c] for c in classes], marker="_", s=80, color="tab:orange",
               label="top-5")
    ax.set_xticks(list(xs), classes, rotation=90, fontsize=7 if len(classes) > 30 else 9)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(f"ObjectNet per class: top-1 {result['top1']:.1%}, top-5 {result['top5']:.1%}")
    fig.tight_layout()
    return fig


@tolerant
def write_objectnet_report(out: Path, result: dict) -> Path:
    """report.html of an ObjectNet evaluation (its result files are written by the evaluation)."""
    settings = result["settings"]
    rows = [[c, percent(result["per_class_accuracy"][c]), percent(result["per_class_top5"][c]), n]
            for c, n in result["per_class_images"].items()]
    summary = table_html(["", "top-1", "top-5", "images"],
                         [["all classes", percent(result["top1"]), percent(result["top5"]), result["images"]]])
    note = (f"<p class='note'>model {escape(settings['model'])}; resize {escape(settings['resize'])}, centre crop "
            f"{escape(settings['crop'])}; {escape(settings['cropped_images'])} images cropped to boxes; logits "
            + ("restricted to the mapped ILSVRC classes" if settings["restrict"] else "over all classes")
            + f" ({escape(settings['mapped_ilsvrc_classes'])} mapped onto "
              f"{escape(settings['objectnet_classes'])}).</p>")
    path = Path(out) / "report.html"
    write_text(path, page("ObjectNet evaluation", [
        ("Summary", summary + note), ("Per class", figure_html(objectnet_figure(result), "ObjectNet per class")
                                      + table_html(["class", "top-1", "top-5", "images"], rows))]))
    return path


def rebuild(out: Path) -> Path:
    """The report again from the evaluation's objectnet.json."""
    return write_objectnet_report(out, read_json(Path(out) / RESULT_FILE))
