"""Results of the evaluation protocols: machine-readable files and one self-contained HTML page.

Each protocol's output directory holds `protocol.json` (what was asked) and the finished runs.
`collect_*` reads what has finished (so a report can be rebuilt at any time, also while other
processes are still working on a sweep), and `write_*_report` writes `results.json`,
`results.csv` and `report.html`, whose plots are embedded as PNG data so the page travels alone.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import statistics
from pathlib import Path

import numpy as np

from .. import rundir
from ..atomic import write_csv, write_json, write_text
from ..errors import BigTransferError
from ..safe_text import load_json

PROTOCOL_FILE = "protocol.json"


# --------------------------------------------------------------------------- page building blocks
def figure_html(fig, alt: str) -> str:
    """A matplotlib figure as an <img> with the PNG inline (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _e(value) -> str:
    """Any value as HTML text: results files can be edited by hand, so nothing goes in unescaped."""
    return html.escape(str(value))


def table_html(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:.9em}"""


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A complete HTML document: a title and (heading, HTML fragment) sections."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def spread(values: list[float]) -> dict:
    """min <- median -> max of a list of accuracies (the release's few-shot summary)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def read_json(path: Path):
    """A results file's JSON; one clear error if it was damaged or edited into something else."""
    try:
        return load_json(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BigTransferError(f"{path}: not a readable JSON file ({err})") from None


def tolerant(fn):
    """Results files can be edited by hand: a missing field or a value of the wrong type becomes one
    clear error naming the folder, not a traceback."""
    @functools.wraps(fn)
    def wrapper(out, *args, **kwargs):
        try:
            return fn(out, *args, **kwargs)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise BigTransferError(f"{out}: a results file there is damaged or was edited "
                                   f"({type(err).__name__}: {err}); re-run the command that wrote it") from None
    return wrapper


def read_protocol(out: Path) -> dict:
    path = Path(out) / PROTOCOL_FILE
    if not path.is_file():
        raise BigTransferError(f"{out}: not a protocol output directory (no {PROTOCOL_FILE})")
    protocol = read_json(path)
    if not isinstance(protocol, dict) or not isinstance(protocol.get("protocol"), str):
        raise BigTransferError(f"{path}: not a bigtransfer protocol file")
    return protocol


def claim_out(out: Path, settings: dict) -> None:
    """Create OUT with its protocol.json, or check that OUT holds the same protocol run.

    OUT must be new, empty or one of our `settings["protocol"]` folders (rundir.claim)."""
    rundir.check_claim(out, settings["protocol"])
    path = out / PROTOCOL_FILE
    if path.is_file():
        previous = read_protocol(out)
        recorded = {k: previous.get(k) for k in settings}
        if json.loads(json.dumps(recorded)) != json.loads(json.dumps(settings, default=str)):
            changed = sorted(k for k in settings if json.dumps(previous.get(k), default=str)
                             != json.dumps(settings[k], default=str))
            raise BigTransferError(f"--out {out} holds a {settings['protocol']} run with other settings "
                                   f"({', '.join(changed)}); use another --out to start a new one")
    rundir.claim(out, settings["protocol"])
    write_json(path, settings)


def _shot_order(shots) -> list:
    return sorted(shots, key=lambda k: float("inf") if k == "full" else int(k))


# --------------------------------------------------------------------------- where protocols keep results
# (layout facts the protocols and their reports share; reports read files, never protocol code)
def transfer_dir(out: Path, task: str, norm: str) -> Path:
    """The ablation's few-shot sweep of one normalisation's model on one task."""
    return Path(out) / "transfer" / Path(task).name.replace(":", "_") / norm


def load_final(out: Path) -> dict | None:
    """A search's final comparison (final.json), if it has run."""
    path = Path(out) / "final.json"
    return read_json(path) if path.is_file() else None


# --------------------------------------------------------------------------- few-shot
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
        for k in _shot_order(protocol["shots"]):
            accs = [r["top1"] for r in runs if r["method"] == method and r["shots"] == k]
            if accs:
                summary.setdefault(method, {})[str(k)] = spread(accs)
    expected = len(protocol["shots"]) * protocol["repeats"]
    finished = sum(r["method"] == "finetune" for r in runs)
    return {"protocol": protocol, "summary": summary, "runs": runs, "finished": finished, "expected": expected}


def fewshot_table(results: dict) -> tuple[list[str], list[list]]:
    header = ["examples/class", "fine-tune: min <- median -> max", "runs", "linear probe: min <- median -> max"]
    rows = []
    for k in _shot_order(results["protocol"]["shots"]):
        cells = [str(k)]
        for method in ("finetune", "linear_probe"):
            s = results["summary"].get(method, {}).get(str(k))
            cells.append(f"{_pct(s['min'])} <- {_pct(s['median'])} -> {_pct(s['max'])}" if s else "")
            if method == "finetune":
                cells.append(str(s["runs"]) if s else "0")
        rows.append(cells)
    return header, rows


def fewshot_figure(results: dict, title: str = ""):
    """Accuracy vs examples per class: every run a point, the median a line (paper Fig. 2 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = _shot_order(results["protocol"]["shots"])
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
    out = Path(out)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", ["method", "examples_per_class", "seed", "top1", "top5"],
              [[r["method"], r["shots"], r["seed"], r["top1"], r.get("top5")] for r in results["runs"]])
    ft = results["protocol"]["finetune"]
    header, rows = fewshot_table(results)
    note = (f"<p class='note'>model {_e(ft['model'])}, data {_e(ft['data'])}; "
            f"{_e(results['finished'])} of {_e(results['expected'])} fine-tuning runs finished. The linear probe is a "
            "logistic regression on the frozen pre-logits of the same draws.</p>")
    fig = fewshot_figure(results, f"{ft['model']} on {Path(str(ft['data'])).name}")
    path = out / "report.html"
    write_text(path, page("Few-shot transfer", [
        ("Accuracy vs examples per class", figure_html(fig, "few-shot accuracy") + note),
        ("Test top-1 over random draws", table_html(header, rows)),
    ]))
    return path


# --------------------------------------------------------------------------- VTAB-1k
@tolerant
def collect_vtab(out: Path) -> dict:
    """Every finished VTAB-1k run; per task the mean test top-1 over runs, per group, overall."""
    from ..data.vtab_tasks import GROUP_OF, aggregate

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

    from ..data.vtab_tasks import GROUP_OF, GROUPS

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
    from ..data.vtab_tasks import GROUP_OF

    out = Path(out)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", ["task", "group", "split", "seed", "scored_on", "top1"],
              [[r["task"], r["group"], r["split"], r["seed"], r["scored_on"], r["top1"]] for r in results["runs"]])
    test = results["test"]
    splits = results.get("splits", {})
    rows = [[t, GROUP_OF[t], _pct(v), _pct(results["val200"].get(t)), _splits_text(splits.get(t))]
            for t, v in test["tasks"].items()]
    rows += [[f"{g} (mean)", g, _pct(v), "", ""] for g, v in test["groups"].items()]
    rows.append(["VTAB-1k (mean over tasks)", "all", _pct(test["mean"]), "", ""])
    note = (f"<p class='note'>model {_e(results['protocol']['finetune']['model'])}; "
            f"{_e(results['finished'])} of {_e(results['expected'])} runs finished; "
            + ("all 19 tasks." if test["complete"] else "<b>not all 19 tasks: the mean is not the VTAB score.</b>")
            + " Test top-1 after fine-tuning on train800val200 with BiT-HyperRule (mean over runs).</p>")
    sections = [("Scores", table_html(["task", "group", "test top-1", "val200 top-1", "train800/val200"], rows)
                 + note)]
    if test["tasks"]:
        sections.insert(0, ("Per task and group", figure_html(vtab_figure(results), "VTAB-1k scores")))
    path = out / "report.html"
    write_text(path, page("VTAB-1k", sections))
    return path


# --------------------------------------------------------------------------- normalisation ablation
NORM_GRID = (("BatchNorm", ("bn", "bn_ws")), ("GroupNorm", ("gn", "gn_ws")))


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
        return _pct(values.get(norm)) + spread_text

    return (["", "plain", "+ Weight Standardization"], [[name, cell(a), cell(b)] for name, (a, b) in NORM_GRID])


def ablation_figure(results: dict, task: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    styles = {"bn": ("tab:red", "--"), "bn_ws": ("tab:red", "-"), "gn": ("tab:blue", "--"), "gn_ws": ("tab:blue", "-")}
    for norm, medians in results["transfer_top1"].get(task, {}).items():
        shots = _shot_order(medians)
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
    out = Path(out)
    write_json(out / "results.json", results)
    rows = [["upstream", "", norm, "", value] for norm, value in results["upstream_top1"].items()]
    rows += [["transfer", task, norm, k, value] for task, by_norm in results["transfer_top1"].items()
             for norm, medians in by_norm.items() for k, value in medians.items()]
    write_csv(out / "results.csv", ["table", "task", "norm", "examples_per_class", "top1"], rows)
    p = results["protocol"]
    sections = [("Table 4: upstream validation top-1",
                 table_html(*norm_grid(results["upstream_top1"]))
                 + f"<p class='note'>{_e(p['arch'])} pre-trained on {_e(p['upstream'])}, "
                   f"{_e(p['upstream_epochs'])} epochs at batch {_e(p['upstream_batch'])}.</p>")]
    for task, by_norm in results["transfer_top1"].items():
        shots = _shot_order({k for medians in by_norm.values() for k in medians})
        ranges = results.get("transfer_range", {}).get(task, {})
        tables = "".join(f"<h3>{html.escape(str(k))} per class</h3>"
                         + table_html(*norm_grid({n: m.get(k) for n, m in by_norm.items()},
                                             {n: r[k] for n, r in ranges.items() if k in r})) for k in shots)
        sections.append((f"Table 5: transfer to {task} (median (min-max) test top-1 over {p['repeats']} draws)",
                         figure_html(ablation_figure(results, task), f"transfer to {task}") + tables))
    path = out / "report.html"
    write_text(path, page("Normalisation ablation (BN / GN, with and without WS)", sections))
    return path


# --------------------------------------------------------------------------- ObjectNet
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
    settings = result["settings"]
    rows = [[c, _pct(result["per_class_accuracy"][c]), _pct(result["per_class_top5"][c]), n]
            for c, n in result["per_class_images"].items()]
    summary = table_html(["", "top-1", "top-5", "images"],
                         [["all classes", _pct(result["top1"]), _pct(result["top5"]), result["images"]]])
    note = (f"<p class='note'>model {_e(settings['model'])}; resize {_e(settings['resize'])}, centre crop "
            f"{_e(settings['crop'])}; {_e(settings['cropped_images'])} images cropped to boxes; logits "
            + ("restricted to the mapped ILSVRC classes" if settings["restrict"] else "over all classes")
            + f" ({_e(settings['mapped_ilsvrc_classes'])} mapped onto {_e(settings['objectnet_classes'])}).</p>")
    path = Path(out) / "report.html"
    write_text(path, page("ObjectNet evaluation", [
        ("Summary", summary + note), ("Per class", figure_html(objectnet_figure(result), "ObjectNet per class")
                                      + table_html(["class", "top-1", "top-5", "images"], rows))]))
    return path


# --------------------------------------------------------------------------- hyper-parameter search
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
    out = Path(out)
    write_json(out / "results.json", results)
    names = list(results["protocol"]["space"])
    params = ["base_lr", "steps", "dropout", "l2_to_init", "mixup", "resolution"]
    write_csv(out / "results.csv", ["trial", "state", "val_top1", *params],
              [[t["number"], t["state"], t["val_top1"], *(t.get(p) for p in params)] for t in results["trials"]])
    sections = [("Trials", figure_html(search_figure(results), "search progress")
                 + f"<p class='note'>{_e(results['complete'])} completed trials; space: "
                 + html.escape(", ".join(f"{n} {results['protocol']['space'][n]}" for n in names)) + "</p>")]
    final = results.get("final")
    if final:
        rows = [["BiT-HyperRule", _pct(final.get("hyperrule/val")), _pct(final.get("hyperrule/test"))],
                [f"random search (best of {results['complete']})", _pct(final.get("best_val_top1")),
                 _pct(final.get("searched/test"))]]
        best = table_html(["setting", "value"], [[k, f"{v:.4g}" if isinstance(v, float) else v]
                                                 for k, v in final["best_params"].items()])
        sections.insert(0, ("HyperRule vs search",
                            table_html(["", "validation top-1", "test top-1 (retrained on train+val)"], rows)
                            + f"<h3>Best trial ({_e(final['best_trial'])})</h3>" + best))
    path = out / "report.html"
    write_text(path, page("Hyper-parameter search (Supp. A)", sections))
    return path


# --------------------------------------------------------------------------- distillation
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
    from ..train.logbook import read_metrics

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
    out = Path(out)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", ["model", "top1", "top5", "examples", "run"],
              [[r["model"], r["top1"], r["top5"], r["examples"], r["run"]] for r in results["rows"]])
    p = results["protocol"]
    table = table_html(["model", "test top-1", "test top-5", "images"],
                       [[r["model"], _pct(r["top1"]), _pct(r["top5"]), r["examples"]] for r in results["rows"]])
    note = (f"<p class='note'>teacher {_e(p['teacher'])}; student {_e(p['student'])}; data {_e(p['data'])}"
            + ("" if results.get("labelled") else " (unlabelled: no test accuracy)") + ".</p>")
    sections = [("Teacher and student", table + note)]
    if results["rows"] or results["curve"]:
        sections.append(("Accuracy", figure_html(distill_figure(results), "distillation accuracy")))
    path = out / "report.html"
    write_text(path, page("Distillation", sections))
    return path


def rebuild(out: Path) -> Path:
    """Rebuild a protocol directory's results files and report.html from its finished runs."""
    kind = read_protocol(out).get("protocol")
    if kind == "fewshot":
        return write_fewshot_report(out, collect_fewshot(out))
    if kind == "vtab":
        return write_vtab_report(out, collect_vtab(out))
    if kind == "ablation":
        return write_ablation_report(out, collect_ablation(out))
    if kind == "search":
        return write_search_report(out, collect_search(out))
    if kind == "objectnet":
        return write_objectnet_report(out, read_json(Path(out) / "objectnet.json"))
    if kind == "distill":
        return write_distill_report(out, collect_distill(out))
    raise BigTransferError(f"{out}: unknown protocol {kind!r} in {PROTOCOL_FILE}")
