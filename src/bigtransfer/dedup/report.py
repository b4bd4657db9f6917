"""What dedup writes: pairs.csv, upstream_filtered.csv and the contact sheet (PNG and HTML), with
the pairs grouped by the stage that decided them and the self-test's figures beside them."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import write_csv, write_figure, write_text
from ..data.images import IMAGE_ERRORS, load_rgb
from ..safe_text import path_text
from .candidates import source_names

STAGES = {
    "identical": "identical thumbnails (exact copies at the canonical size; no pixel check needed)",
    "aligned": "verified on aligned pixels: same framing, within a shift of a few canonical pixels",
    "rescaled": "verified on pixels after rescaling: one image is a crop of the other by a few percent",
}
PAIR_COLUMNS = ["downstream", "downstream_path", "upstream_path", "stage", "proposed_by", "residual", "used",
                "correlation", "scale", "structure", "detail_correlation", "fine_check", "cosine"]
THUMB = 96
PNG_PER_STAGE = 16  # pairs per stage on the PNG (the HTML page shows up to --sheet-pairs)


def pair_rows(found, cosines, tests, upstream) -> list[dict]:
    """One row per pair, stage by stage, the most similar first."""
    order = sorted(range(len(found.stage)), key=lambda k: (list(STAGES).index(found.stage[k]), found.verdicts.used[k]))
    rows = []
    for k in order:
        i, j, v = int(found.pairs.test[k]), int(found.pairs.upstream[k]), found.verdicts
        rows.append({"downstream": tests.spec(i), "downstream_path": path_text(tests.describe(i)),
                     "upstream_path": path_text(upstream.paths[j]), "stage": str(found.stage[k]),
                     "proposed_by": source_names(int(found.pairs.sources[k])),
                     "residual": _rounded(v.residual[k], 3), "used": _rounded(v.used[k], 3),
                     "correlation": _rounded(v.correlation[k], 4), "scale": _rounded(v.scale[k], 2),
                     "structure": _rounded(v.structure[k], 3),  # blank where not checked
                     "detail_correlation": _rounded(v.detail_correlation[k], 3),
                     "fine_check": found.fine[k],
                     "cosine": "" if cosines is None else _rounded(cosines[k], 4),
                     "_test": i, "_upstream": j})
    return rows


def _rounded(value, digits: int):
    value = float(value)
    return round(value, digits) if np.isfinite(value) else ""


def write_outputs(out: Path, *, found, cosines, tests, upstream, up_splits, up_readable, self_test, planted,
                  sheet_pairs: int) -> dict:
    """Write every output file but summary.json; returns the summary's figures about the pairs."""
    rows = pair_rows(found, cosines, tests, upstream)
    write_csv(out / "pairs.csv", PAIR_COLUMNS, [[r[c] for c in PAIR_COLUMNS] for r in rows])
    duplicates = set(found.pairs.upstream.tolist())
    kept = [j for j in range(len(upstream)) if j not in duplicates]
    write_csv(out / "upstream_filtered.csv", ["path", "label", "split"],
              [[path_text(os.path.abspath(upstream.paths[j])), upstream.classes[upstream.labels[j]], up_splits[j]]
               for j in kept])  # absolute: the file is a manifest, whose relative paths start at its own folder
    by_stage = {stage: sum(r["stage"] == stage for r in rows) for stage in STAGES}
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[r["proposed_by"]] = by_source.get(r["proposed_by"], 0) + 1
    contact_sheet(out, rows, tests, upstream, self_test, planted, sheet_pairs)
    summary = {"pairs": len(rows), "pairs_by_stage": by_stage, "pairs_by_source": by_source,
               "upstream_duplicates": len(duplicates), "upstream_kept": len(kept)}
    if self_test is not None:
        summary["self_test"] = {k: v for k, v in self_test.items() if k != "missed"}
        summary["self_test"]["missed"] = [
            {"test_image": path_text(tests.describe(m["test"])), "edit": m["edit"]} for m in self_test["missed"]]
    return summary


def _thumbnail(load) -> Image.Image:
    try:
        image = load()
    except IMAGE_ERRORS:
        image = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    image = image.copy()
    image.thumbnail((THUMB, THUMB))
    if max(image.size) < THUMB:  # small images shown large enough to see, pixels kept sharp
        scale = THUMB / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.NEAREST)
    return image


def _png64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def self_test_lines(self_test: dict | None) -> list[str]:
    """The self-test's table as text lines (for the PNG and the console)."""
    if not self_test:
        return ["self-test: off"]
    lines = [(f"self-test: {self_test['test_images']} test images copied with each edit, searched among the "
             "upstream images, then discarded")]
    for name, s in {**self_test["per_edit"], "all edits": self_test["overall"]}.items():
        recall = "-" if s["recall"] is None else f"{s['recall']:.1%}"
        lines.append(f"  {name:<11} recall {recall:>6} ({s['found']}/{s['planted']}), false pairs {s['false_pairs']}")
    return lines


def contact_sheet(out: Path, rows: list[dict], tests, upstream, self_test, planted, per_stage: int) -> None:
    """contact_sheet.png and .html: per stage, the closest calls first (the pairs worth a look),
    then the self-test's figures and the copies it missed."""
    groups = []
    for stage, meaning in STAGES.items():
        members = sorted((r for r in rows if r["stage"] == stage), key=lambda r: -(r["used"] or 0))[:per_stage]
        count = sum(r["stage"] == stage for r in rows)
        cells = [(_thumbnail(lambda i=r["_test"]: tests.load(i)), _thumbnail(lambda j=r["_upstream"]: upstream.load(j)),
                  f"{r['proposed_by']} · residual {r['residual']} · used {r['used']}",
                  f"{Path(r['downstream_path']).name} ~ {Path(r['upstream_path']).name}") for r in members]
        groups.append((f"{stage}: {count} pair(s), {meaning}", cells))
    missed = []
    if self_test and planted is not None:
        for m in self_test["missed"][:per_stage]:
            missed.append((_thumbnail(lambda i=m["test"]: tests.load(i)),
                           _thumbnail(lambda c=m["copy"]: load_rgb(planted.blobs[c])),
                           f"missed: {m['edit']}", Path(path_text(tests.describe(m["test"]))).name))
    groups.append((f"self-test copies that were not found ({len(self_test['missed']) if self_test else 0})", missed))
    _sheet_png(out / "contact_sheet.png", [(title, cells[:PNG_PER_STAGE]) for title, cells in groups],
               self_test_lines(self_test))
    _sheet_html(out / "contact_sheet.html", groups, self_test, len(rows))


def _sheet_png(path: Path, groups, header: list[str], columns: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = []  # ("title", text) or ("pairs", cells)
    for title, cells in groups:
        layout.append(("title", title))
        layout.extend(("pairs", cells[k:k + columns]) for k in range(0, len(cells), columns))
    heights = [0.35 if kind == "title" else 1.5 for kind, _ in layout]
    top = 0.125 * len(header) + 0.25  # inches of header text
    fig = plt.figure(figsize=(2 * columns * 1.3, top + sum(heights)))
    fig.text(0.01, 1 - 0.1 / fig.get_figheight(), "\n".join(header), va="top", family="monospace", fontsize=7)
    grid = fig.add_gridspec(len(layout), 2 * columns, height_ratios=heights, top=1 - top / fig.get_figheight(),
                            bottom=0.01, left=0.01, right=0.99, hspace=0.4)
    for row, (kind, content) in enumerate(layout):
        if kind == "title":
            ax = fig.add_subplot(grid[row, :])
            ax.axis("off")
            ax.text(0, 0.5, content, fontsize=8, weight="bold", va="center")
            continue
        for col, (left, right, caption, _) in enumerate(content):
            for side, image in enumerate((left, right)):
                ax = fig.add_subplot(grid[row, 2 * col + side])
                ax.imshow(image)
                ax.axis("off")
                if side == 0:
                    ax.set_title(caption, fontsize=5.5, loc="left")
    try:
        write_figure(path, fig, dpi=100, what="contact sheet")
    finally:
        plt.close(fig)


def _sheet_html(path: Path, groups, self_test, total: int) -> None:
    sections = []
    for title, cells in groups:
        items = "".join(
            f"<figure><img src='data:image/png;base64,{_png64(a)}'><img src='data:image/png;base64,{_png64(b)}'>"
            f"<figcaption>{html.escape(caption)}<br>{html.escape(names)}</figcaption></figure>"
            for a, b, caption, names in cells)
        sections.append(f"<h2>{html.escape(title)}</h2>{items or '<p>none</p>'}")
    table = "<p>Self-test off.</p>"
    if self_test:
        body = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{s['planted']}</td><td>{s['found']}</td>"
            f"<td>{'-' if s['recall'] is None else format(s['recall'], '.1%')}</td><td>{s['false_pairs']}</td></tr>"
            for name, s in {**self_test["per_edit"], "all edits": self_test["overall"]}.items())
        table = (f"<p>{self_test['test_images']} of your test images were copied with each edit, searched among "
                 "your upstream images exactly like them, and discarded afterwards: what dedup finds of them is "
                 "what it is worth on your data.</p><table><tr><th>edit</th><th>planted</th><th>found</th>"
                 f"<th>recall</th><th>false pairs</th></tr>{body}</table>")
    write_text(path, (
        "<!doctype html><html><head><meta charset='utf-8'><title>Near-duplicates</title><style>"
        "body{font-family:system-ui,sans-serif}figure{display:inline-block;margin:6px;text-align:center}"
        "img{width:96px;height:96px;object-fit:contain;border:1px solid #ccc;margin:1px;image-rendering:pixelated}"
        "figcaption{font-size:11px;color:#444}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:right}</style></head><body><h1>Near-duplicates: test image, upstream image</h1>"
        f"<p>{total} pairs, grouped by the stage that decided them; within a stage the closest calls come first "
        f"(used: the share of the allowed residual a pair used).</p><h2>Self-test</h2>{table}"
        + "".join(sections) + "</body></html>\n"))
