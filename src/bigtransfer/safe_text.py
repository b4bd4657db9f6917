"""User text made safe for whoever reads it next: a terminal line, a spreadsheet, Markdown.

Class names, file names and the values of files a user hands in travel into our messages, CSV
files and model cards, and from there into other tools. Each rendering is decided here, once:

- `line` / `quoted` / `path_text`: one printable line of bounded length. Control characters
  (a newline would split a one-line message or a one-path-per-line list) and bytes that are not
  UTF-8 (a file name Python holds as surrogates, which no UTF-8 stream can write) become
  backslash escapes; `path_text` also escapes backslashes, so the rendering is unambiguous.
- `spreadsheet_writer`: CSV whose text cells cannot start a formula (`=cmd|...` is a live
  formula in a spreadsheet): such a cell is written with a leading `'`, as spreadsheet-safe
  writers do; `spreadsheet_value` reads it back.
- `markdown_text` / `markdown_code` / `markdown_fence`: a name shown in Markdown as text, never as
  a heading, a link or raw HTML; `plot_text`: a name on a plot, never mathtext.
- `load_json`: JSON from a user's file, where nesting a million levels deep is a ValueError like
  any other malformed JSON, not a RecursionError.
"""

from __future__ import annotations

import csv
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Any

QUOTE_LIMIT = 80  # characters of a user's value quoted in a message
LINE_LIMIT = 2000  # characters of one error or warning line
PATH_LIMIT = 4096  # characters of one rendered path (PATH_MAX on Linux)

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by Python as a lone surrogate
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _printable(text: str, *, escape_backslash: bool = False) -> str:
    if text.isprintable() and not (escape_backslash and "\\" in text):
        return text
    return "".join(
        "\\\\" if char == "\\" and escape_backslash else char if char.isprintable() else _escape_char(char)
        for char in text)


def _capped(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def line(text: str, limit: int = LINE_LIMIT) -> str:
    """`text` as one printable line of at most about `limit` characters (the CLI's errors and warnings)."""
    return _printable(_capped(str(text), limit))


def quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """A value a user supplied, quoted for a message: repr-like, one line, at most about `limit` characters."""
    if isinstance(value, str):
        shown = repr(value[:limit]) + (f"... ({len(value):,} characters)" if len(value) > limit else "")
    else:
        shown = _SHORT_REPR.repr(value)  # bounded in depth and length: a huge or deep structure is cheap
    return line(shown, limit + 40)


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, QUOTE_LIMIT, QUOTE_LIMIT, QUOTE_LIMIT
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    return short


_SHORT_REPR = _short_repr()


def path_text(path: str | os.PathLike) -> str:
    """A path as one printable, unambiguous line: control characters, bytes that are not UTF-8 and
    (on POSIX) backslashes as backslash escapes; any other path is unchanged."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return _capped(_printable(text, escape_backslash=os.sep != "\\"), PATH_LIMIT)


_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[nrt\\])")


def path_from_text(text: str) -> str:
    """The path that `path_text` rendered as `text` (a byte that was not UTF-8 comes back as its surrogate)."""
    def original(match: re.Match) -> str:
        code = match.group(1)
        if code[0] in "xuU":
            value = int(code[1:], 16)
            return chr(0xDC00 + value) if code[0] == "x" and value >= 0x80 else chr(value)
        return {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[code]

    return _UNESCAPE.sub(original, text)


def plot_text(text: Any, limit: int = 40) -> str:
    """`text` as a matplotlib label: one printable line, and a `$` escaped so that it is never
    parsed as mathtext (`$\\frac{$` as a class name would end the plot with a parse error)."""
    return line(str(text), limit).replace("$", r"\$")


# --------------------------------------------------------------------------- spreadsheets
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: text that would start a formula gets a leading `'`.

    Numbers (and text that is a plain number, such as a class named '-1') are left as they are;
    bytes that are not UTF-8 (a folder name used as a class name) become backslash escapes."""
    if not isinstance(value, str):
        return value
    if not _is_utf8(value):
        value = "".join(_escape_char(c) if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def spreadsheet_value(text: str) -> str:
    """A cell of a CSV we wrote, as it was before `spreadsheet_cell` guarded it."""
    if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(text[1:]):
        return text[1:]
    return text


class _SpreadsheetWriter:
    """csv.writer whose every cell goes through `spreadsheet_cell`."""

    def __init__(self, fh, **options):
        self._writer = csv.writer(fh, **options)

    def writerow(self, row) -> None:
        self._writer.writerow([spreadsheet_cell(cell) for cell in row])

    def writerows(self, rows) -> None:
        for row in rows:
            self.writerow(row)


def spreadsheet_writer(fh, **options) -> _SpreadsheetWriter:
    """A `csv.writer` for the CSV files we write: no text cell can start a spreadsheet formula."""
    return _SpreadsheetWriter(fh, **options)


# --------------------------------------------------------------------------- Markdown
# Characters with a meaning anywhere in a line (emphasis, code, links, images, HTML, entities, table
# cells, autolinks), and those with one at its start (headings, lists, setext underlines).
_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>&|~!{}:])")
_MARKDOWN_START = re.compile(r"^(\s*)([#+\-=]|\d+[.)](?=\s|$))")


def markdown_text(text: Any, limit: int = LINE_LIMIT) -> str:
    """`text` as literal Markdown text on one line: no heading, list, link, emphasis, table cell
    break or HTML can come out of it (CommonMark lets ASCII punctuation be backslash-escaped)."""
    escaped = _MARKDOWN_INLINE.sub(r"\\\1", line(str(text), limit))
    return _MARKDOWN_START.sub(lambda m: m.group(1) + m.group(2)[:-1] + "\\" + m.group(2)[-1], escaped)


def markdown_code(text: Any, limit: int = LINE_LIMIT) -> str:
    """`text` as one inline code span: HTML in it stays text, and a backtick in it cannot close it."""
    body = line(str(text), limit)
    fence = "`" * (max((len(run) for run in re.findall("`+", body)), default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") or body.strip() == "" else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def markdown_fence(text: str, info: str = "") -> str:
    """`text` as a fenced code block whose fence no line of `text` can close."""
    longest = max((len(run) for run in re.findall("`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


# --------------------------------------------------------------------------- JSON
class JSONTooDeep(ValueError):
    """JSON nested deeper than Python's parser can follow."""


def load_json(text: str | bytes, **options) -> Any:
    """`json.loads` of a user's file: too deep a nesting is a ValueError (as malformed JSON is)."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise JSONTooDeep("JSON nested too deeply (thousands of levels)") from None


def read_json(path: Path) -> Any:
    """`load_json` of a file's text."""
    return load_json(Path(path).read_text(encoding="utf-8"))
