"""Results of the evaluation protocols: machine-readable files and one self-contained HTML page.

Each protocol's output directory holds `protocol.json` (what was asked, `folder.claim_out`) and the
finished runs. A protocol's module in `protocols/` collects what has finished (so a report can be
rebuilt at any time, also while other processes are still working on a sweep) and writes
`results.json`, `results.csv` and `report.html`, built from `pages` with its plots embedded as PNG
data so the page travels alone. `protocols.rebuild(out)` finds the module by the protocol's name.
Reports take results as data: nothing here imports a protocol's code.
"""
