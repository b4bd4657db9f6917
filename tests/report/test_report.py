"""The report registry: each protocol's report is one module, found by the name in protocol.json."""

import importlib
import json
import sys

import pytest

from bigtransfer.cli import main
from bigtransfer.errors import BigTransferError
from bigtransfer.report import protocols
from bigtransfer.report.protocols import rebuild, registered

# A protocol nobody wrote yet, built only from the package's building blocks.
TOY_PROTOCOL = '''
from pathlib import Path

from bigtransfer.atomic import write_text
from bigtransfer.report.folder import read_protocol
from bigtransfer.report.pages import page, table_html

PROTOCOL = "toy"


def rebuild(out):
    path = Path(out) / "report.html"
    write_text(path, page("Toy", [("Asked", table_html(["k"], [[read_protocol(out)["k"]]]))]))
    return path
'''


@pytest.fixture
def drop_module(tmp_path, monkeypatch):
    """Write a module into bigtransfer.report.protocols without touching the source tree: a second
    folder on the package's search path, forgotten again (with what was imported from it) after the test."""
    folder = tmp_path / "dropped"
    folder.mkdir()
    monkeypatch.setattr(protocols, "__path__", [*protocols.__path__, str(folder)])
    names = []

    def drop(name: str, source: str) -> None:
        (folder / f"{name}.py").write_text(source)
        names.append(f"{protocols.__name__}.{name}")
        importlib.invalidate_caches()

    yield drop
    for name in names:
        sys.modules.pop(name, None)


def protocol_folder(path, settings: dict):
    path.mkdir()
    (path / "protocol.json").write_text(json.dumps(settings))
    return path


def test_each_protocol_of_the_package_has_its_report_module():
    assert {name: module.__name__.rpartition(".")[2] for name, module in registered().items()} == {
        "fewshot": "fewshot", "vtab": "vtab", "ablation": "ablation", "objectnet": "objectnet",
        "search": "search", "distill": "distill"}


def test_a_protocol_module_dropped_into_the_package_is_rebuilt_by_the_report_verb(tmp_path, drop_module, capsys):
    drop_module("toy", TOY_PROTOCOL)
    drop_module("_shared_plots", "COLOURS = ('tab:blue',)\n")  # a helper: no PROTOCOL, not a protocol
    out = protocol_folder(tmp_path / "toy-run", {"protocol": "toy", "k": "<b>"})
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: {out / 'report.html'}\n"
    text = (out / "report.html").read_text()
    assert "<title>Toy</title>" in text and "<td>&lt;b&gt;</td>" in text
    assert set(registered()) == {"fewshot", "vtab", "ablation", "objectnet", "search", "distill", "toy"}


def test_a_module_that_does_not_say_which_protocol_it_reports_is_refused(drop_module):
    drop_module("half_written", "def rebuild(out):\n    return out\n")
    with pytest.raises(TypeError, match=r"report\.protocols\.half_written must declare PROTOCOL"):
        registered()


def test_two_modules_for_one_protocol_are_refused(drop_module):
    drop_module("fewshot_again", TOY_PROTOCOL.replace('PROTOCOL = "toy"', 'PROTOCOL = "fewshot"'))
    with pytest.raises(TypeError, match="both declare PROTOCOL 'fewshot'"):
        registered()


def test_a_folder_of_an_unknown_protocol_is_one_clear_error(tmp_path, capsys):
    out = protocol_folder(tmp_path / "other", {"protocol": "not-a-protocol"})
    assert main(["report", str(out)]) == 2
    assert "unknown protocol 'not-a-protocol' in protocol.json" in capsys.readouterr().err
    with pytest.raises(BigTransferError, match="unknown protocol"):
        rebuild(out)
