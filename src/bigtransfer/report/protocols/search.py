"""The hyper-parameter search's report (paper Supp. A): every trial, and BiT-HyperRule against the
best setting the search found."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..folder import read_json, read_protocol, tolerant, write_results
from ..pages import escape, figure_html, percent, table_html

PROTOCOL = "search"
FINAL_FILE = "final.json"  # the search's final comparison, written once it has run


def load_final(out: Path) -> dict | None:
    """A search's final comparison (final.json), if it has run."""
    path = Path(out) / FINAL_FILE
    return read_json(path) if path.is_file() else None


@tolerant
def collect_search(out: Path, study=None) -> dict:
    """Every trial of the study (state, validation top-1, settings) and the final comparison."""
    import optuna

    out = Path(out)
    protocol = read_protocol(out)
    if study is None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = protocol.get("storage") or f"sqlite:///{(out / 'study.sqlite3').resolve()}"
        study = optuna.load_study(study_name=protocol["study_name"], storage=url)
    trials = [{"number": t.number, "state": t.state.name, "val_top1": t.value, **t.params,
               "run": t.user_attrs.get("run"), "worker": t.user_attrs.get("worker")} for t in study.trials]
    return {"protocol": protocol, "trials": trials, "final": load_final(out),
            "complete": sum(t["state"] == "COMPLETE" for t in trials)}


def search_figure(results: dict):
    """Validation top-1 of every completed trial, and the best so far (how fast the search saturates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in results["trials"] if t["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    if done:
        xs = list(range(1, len(done) + 1))
        ax.scatter(xs, [t["val_top1"] for t in done], color="tab:blue", alpha=0.5, s=18, label="trial")
        ax.step(xs, np.maximum.accumulate([t["val_top1"] for t in done]), where="post", color="tab:blue",
                label="best so far")
    final = results.get("final")
    if final and final.get("hyperrule/val") is not None:
        ax.axhline(final["hyperrule/val"], color="tab:gray", linestyle="--", label="BiT-HyperRule")
    ax.set_xlabel("completed trials")
    ax.set_ylabel("validation top-1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Random search vs BiT-HyperRule")
    fig.tight_layout()
    return fig


@tolerant
def write_search_report(out: Path, results: dict) -> Path:
    """results.json, results.csv (one row per trial) and report.html of a search."""
    names = list(results["protocol"]["space"])
    sections = [("Trials", figure_html(search_figure(results), "search progress")
                 + f"<p class='note'>{escape(results['complete'])} completed trials; space: "
                 + html.escape(", ".join(f"{n} {results['protocol']['space'][n]}" for n in names)) + "</p>")]
    final = results.get("final")
    if final:
        rows = [["BiT-HyperRule", percent(final.get("hyperrule/val")), percent(final.get("hyperrule/test"))],
                [f"random search (best of {results['complete']})", percent(final.get("best_val_top1")),
                 percent(final.get("searched/test"))]]
        best = table_html(["setting", "value"], [[k, f"{v:.4g}" if isinstance(v, float) else v]
                                                 for k, v in final["best_params"].items()])
        sections.insert(0, ("HyperRule vs search",
                            table_html(["", "validation top-1", "test top-1 (retrained on train+val)"], rows)
                            + f"<h3>Best trial ({escape(final['best_trial'])})</h3>" + best))
    params = ["base_lr", "steps", "dropout", "l2_to_init", "mixup", "resolution"]
    return write_results(out, results, ["trial", "state", "val_top1", *params],
                         [[t["number"], t["state"], t["val_top1"], *(t.get(p) for p in params)]
                          for t in results["trials"]], "Hyper-parameter search (Supp. A)", sections)


def rebuild(out: Path) -> Path:
    """The search's results files and report from its study and final comparison."""
    return write_search_report(out, collect_search(out))
