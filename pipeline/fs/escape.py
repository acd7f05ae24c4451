"""Untrusted text made inert, one function per medium we write to: Markdown, HTML, CSV cells,
the terminal, and matplotlib's text.

Class names, file names, LABELS cells and notices read back from features/ and models/ are text
that someone else chose. Every writer of report.md, batch_summary.md, report.html, our CSVs, the
lines printed for the user and the figures' labels passes such text through the function of its
medium here, so no name can open a link, a tag, a formula, a terminal escape sequence or a
mathtext expression. Imports only pipeline.messages (terminal_text lives there, for warn).
"""
import csv
import html
import re
from contextlib import contextmanager

from ..messages import terminal_text  # noqa: F401 - the terminal's, defined beside warn

# --- Markdown ---------------------------------------------------------------------------------

# Markdown's and HTML's active characters, each escaped with a backslash (CommonMark shows any
# backslash-escaped punctuation as itself): no tag, link, picture, code span, emphasis, table
# cell, strike-through or math ($, rendered by GitHub) can open
_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|&!#$~"})


def markdown_text(text):
    """Untrusted text as inert Markdown on one line, also inside a table cell or a heading."""
    return _one_line(text).translate(_MARKDOWN)


def markdown_code(text):
    """Untrusted text as one code span: a fence of more backticks than the text holds in a row,
    so no backtick inside can end it (Markdown shows a code span's text as is)."""
    text = _one_line(text)
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def _one_line(text):
    return "".join(" " if not c.isprintable() else c for c in str(text))


# --- HTML -------------------------------------------------------------------------------------

def html_text(text):
    """Text as HTML character data or a quoted attribute value: & < > " ' become entities."""
    return html.escape(str(text), quote=True)


# --- CSV cells opened in spreadsheets ---------------------------------------------------------

# A cell starting with one of these is a formula to a spreadsheet (=HYPERLINK(...), +cmd|...,
# -2+3, @SUM(...)), or becomes one once the spreadsheet drops a leading tab or carriage return.
# A leading ' is escaped too, so that the escape can be undone exactly (`csv_cell_read`).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value):
    """`value` for a cell of a CSV written for people: a string starting with = + - @ (or a tab,
    a carriage return or ') gets a leading ', which a spreadsheet shows instead of running the
    formula. Numbers and other values are left as they are."""
    if isinstance(value, str) and value[:1] in _FORMULA_STARTS:
        return "'" + value
    return value


def csv_row(values):
    """Every string of a row (a list, or a dict's values for csv.DictWriter) through csv_cell."""
    if isinstance(values, dict):
        return {key: csv_cell(value) for key, value in values.items()}
    return [csv_cell(value) for value in values]


class _SpreadsheetSafe:
    """A csv.writer or csv.DictWriter whose every row goes through `csv_row`."""

    def __init__(self, writer):
        self._writer = writer

    def writeheader(self):
        self._writer.writeheader()

    def writerow(self, row):
        self._writer.writerow(csv_row(row))

    def writerows(self, rows):
        for row in rows:
            self.writerow(row)


def csv_writer(f, fieldnames=None):
    """A writer of CSV rows people open in spreadsheets: csv.writer(f), or csv.DictWriter(f,
    fieldnames) when fieldnames are given, with every string cell through `csv_cell`."""
    return _SpreadsheetSafe(csv.writer(f) if fieldnames is None else
                            csv.DictWriter(f, fieldnames=fieldnames))


def csv_cell_read(text):
    """A cell of a CSV we wrote, as the text before `csv_cell`: the one undo of its prefix."""
    if text[:1] == "'" and text[1:2] in _FORMULA_STARTS:
        return text[1:]
    return text


def csv_dicts(f):
    """The rows of a CSV file we wrote (csv.DictReader of the open file `f`), each cell as the
    text before `csv_cell`. Cells a short row lacks are None, as DictReader gives them."""
    for row in csv.DictReader(f):
        yield {key: value if not isinstance(value, str) else csv_cell_read(value)
               for key, value in row.items()}


# --- The terminal -----------------------------------------------------------------------------
# terminal_text, imported above: it lives in pipeline.messages, because warn prints through it


# --- matplotlib's text ------------------------------------------------------------------------

# With these, matplotlib draws every string as it is: $...$ is no mathtext expression (a class
# named $\foo$ ended the drawing in a parse error) and no string goes to TeX
PLAIN_PLOT_TEXT = {"text.usetex": False, "text.parse_math": False}


@contextmanager
def plain_plot_text():
    """Within it, text that matplotlib creates and draws is shown literally. Both the figure's
    building and its saving must be inside: tick labels are made when the figure is drawn."""
    import matplotlib
    with matplotlib.rc_context(PLAIN_PLOT_TEXT):
        yield
