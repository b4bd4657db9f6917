"""One report module per protocol, found through the protocol a folder's protocol.json names.

A module in this package declares `PROTOCOL` (the name its verb writes into protocol.json through
`folder.claim_out`) and `rebuild(out)` (collect what has finished in OUT, write results.json,
results.csv and report.html, return the page's path). `rebuild` below discovers the modules, so a
new protocol is a new file here and an edit nowhere else. Modules whose names start with `_` are
helpers, not protocols.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

from ...errors import BigTransferError
from ..folder import PROTOCOL_FILE, read_protocol


def registered() -> dict[str, ModuleType]:
    """{protocol name: its report module}, for every protocol module in this package."""
    modules: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "PROTOCOL", None)
        if not isinstance(name, str) or not callable(getattr(module, "rebuild", None)):
            raise TypeError(f"{module.__name__} must declare PROTOCOL (its protocol's name) and rebuild(out)")
        if name in modules:
            raise TypeError(f"{modules[name].__name__} and {module.__name__} both declare PROTOCOL {name!r}")
        modules[name] = module
    return modules


def rebuild(out: Path) -> Path:
    """Rebuild a protocol directory's results files and report.html from its finished runs."""
    kind = read_protocol(out).get("protocol")
    module = registered().get(kind)
    if module is None:
        raise BigTransferError(f"{out}: unknown protocol {kind!r} in {PROTOCOL_FILE}")
    return module.rebuild(out)
