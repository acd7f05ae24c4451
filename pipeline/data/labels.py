"""Datasets labelled by a CSV: a folder of images plus LABELS=<csv> with one `filename,label` row
each.

    make extract DATA=photos LABELS=labels.csv [LABEL_COLUMNS=file,species]

Rows are matched to files by name. A file's name in the CSV is tried, in order, as:
    1. its path relative to DATA            (sub/cat1.jpg)
    2. its file name anywhere below DATA    (cat1.jpg, when only one file has that name)
    3. the same, ignoring case              (Cat1.JPG for cat1.jpg)
    4. its stem, ignoring the extension     (cat1.jpg for cat1.jpeg or cat1.png)
Steps 3 and 4 are reported as notes, since the CSV and the folder disagree, but the image is used.
A row that names no file, a file with no row, or an empty label each become a line of
features/<NAME>/skipped.csv, and their counts appear in the batch summary. Refused in one line:
a line longer than MAX_LINE characters (the CSV is read a bounded line at a time), a row naming
a path that leaves DATA (../x.jpg, or an absolute /etc/x.jpg), and images given two different
labels (all of them named).
Labels are class names as written (surrounding spaces stripped, Unicode NFC-normalised, so "café"
typed either way is one class), so "golden retriever" is a class. Splits come from content
hashes, as for DATA/<class>/ folders.
"""
import csv
import os
import posixpath
import re
import unicodedata

from ..config import UserError
from ..fs.escape import terminal_text

# The reasons written to skipped.csv; `make batch` counts rows by these prefixes.
MISSING_FILE = "CSV row names no file in DATA"
UNLABELLED = "image has no row in the labels CSV"
NOTE_EXAMPLES = 5  # how many lenient matches to print as examples
MAX_LINE = 65536  # characters in one line of the CSV: a file name and a label fit many times over
CONFLICTS_SHOWN = 5  # images with two labels named in the refusal
_DRIVE = re.compile(r"[A-Za-z]:/")  # C:/ (C:\\ once backslashes are slashes): absolute on Windows


def resolve_labels_path(data, labels_csv):
    """A relative LABELS is looked for inside DATA first, then from the working directory, so
    `make batch DATASETS="a b" LABELS=labels.csv` uses a/labels.csv and b/labels.csv."""
    candidates = [labels_csv] if os.path.isabs(labels_csv) else [os.path.join(data, labels_csv),
                                                                 labels_csv]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"LABELS file {labels_csv!r} not found (looked in {' and '.join(candidates)}): "
                    "pass LABELS=<csv with filename,label columns>")


def parse_columns(label_columns):
    """"filename,label" -> ("filename", "label")."""
    parts = [p.strip() for p in (label_columns or "").split(",")]
    if len(parts) != 2 or not all(parts):
        raise UserError(f"LABEL_COLUMNS={label_columns!r} is not two column names: use "
                        "LABEL_COLUMNS=<file-name column>,<label column>, e.g. filename,label")
    return tuple(parts)


def read_rows(csv_path, label_columns):
    """[(row number, file name, label)] from the CSV; the header names the columns."""
    file_col, label_col = parse_columns(label_columns)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            first_line = next(_bounded_lines(f, csv_path), "")
            f.seek(0)
            # the header's separator: ";" and tab are common where "," is the decimal separator
            delimiter = max(",;\t", key=first_line.count) if first_line.strip() else ","
            reader = csv.reader(_bounded_lines(f, csv_path), delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            columns = _find_columns(header, (file_col, label_col), csv_path, delimiter)
            rows = []
            for line, record in enumerate(reader, start=2):
                if not any(cell.strip() for cell in record):
                    continue  # blank line
                name, label = [record[i].strip() if i < len(record) else "" for i in columns]
                rows.append((line, name, unicodedata.normalize("NFC", label)))
    except UnicodeDecodeError as error:
        # Excel's "CSV" (not "CSV UTF-8") is Windows-1252, its "Unicode text" is UTF-16
        byte = error.object[error.start:error.start + 1].hex()
        raise UserError(f"LABELS file {csv_path} is not UTF-8 text (it has the byte 0x{byte}): "
                        "save it as UTF-8, e.g. as \"CSV UTF-8\" in Excel") from None
    except csv.Error as error:
        raise UserError(f"LABELS file {csv_path} is not a readable CSV file ({error}): save it as "
                        "CSV with filename,label columns") from None
    except OSError as error:
        raise UserError(f"LABELS file {csv_path} cannot be read ({error.strerror}): pass "
                        "LABELS=<csv with filename,label columns>") from None
    return rows


def _bounded_lines(f, csv_path):
    """The lines of `f`, each read with a bound: a 300 MB file of one line is refused after
    MAX_LINE characters instead of being read whole into memory."""
    while line := f.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE and not line.endswith("\n"):
            raise UserError(f"LABELS file {csv_path} has a line longer than {MAX_LINE} characters: "
                            "it is not a labels CSV; pass LABELS=<csv with filename,label columns>")
        yield line


def _find_columns(header, wanted, csv_path, delimiter):
    # The error names the missing column and counts the header's columns, without quoting them:
    # LABELS can point at any file the user can read (LABELS=/etc/shadow), and the message would
    # print its first line.
    folded = [h.casefold() for h in header]
    found = []
    for name in wanted:
        if name in header:
            found.append(header.index(name))
        elif name.casefold() in folded:
            found.append(folded.index(name.casefold()))
        else:
            separator = {"\t": "tab"}.get(delimiter, repr(delimiter))
            raise UserError(f"{csv_path} has no column {name!r}: its first line has "
                            f"{len(header)} column(s) separated by {separator}; pass "
                            "LABEL_COLUMNS=<file-name column>,<label column> as named in that line")
    return found


def label_files(csv_path, label_columns, candidates):
    """({path: class name} for the images in `candidates` (paths relative to DATA) that the CSV
    labels once, [(path or row, reason)] for every row or image that could not be used)."""
    finder = _Finder(candidates)
    labels_of, skipped_rows, notes = {}, [], []
    for line, name, label in read_rows(csv_path, label_columns):
        where = f"{os.path.basename(csv_path)} line {line}"
        if not name:
            skipped_rows.append((f"<{where}>", "CSV row has an empty file name"))
            continue
        leaves = _leaves(name)
        if leaves:
            raise UserError(f"{csv_path} line {line} names {name!r}, {leaves}: name each image "
                            "by its path relative to DATA (sub/cat1.jpg) or by its file name")
        path, problem, note = finder.find(name)
        if path is None:
            skipped_rows.append((name, f"{problem} ({where})"))
        elif not label:
            skipped_rows.append((path, f"CSV row has an empty label ({where})"))
        else:
            labels_of.setdefault(path, set()).add(label)
            if note:
                notes.append(f"{name} -> {path} ({note})")

    conflicting = sorted((p, sorted(ls)) for p, ls in labels_of.items() if len(ls) > 1)
    if conflicting:  # one of the two labels is wrong, and which one only the user can tell
        shown = "; ".join(f"{p} ({', '.join(ls)})" for p, ls in conflicting[:CONFLICTS_SHOWN])
        more = f" and {len(conflicting) - CONFLICTS_SHOWN} more" if len(conflicting) > \
            CONFLICTS_SHOWN else ""
        raise UserError(f"{csv_path} gives {len(conflicting)} image(s) two or more labels: "
                        f"{shown}{more}: keep one row per image")
    skipped = list(skipped_rows)
    reported = {p for p, _ in skipped_rows}  # e.g. a row with an empty label: listed once
    skipped += [(p, UNLABELLED) for p in candidates if p not in labels_of and p not in reported]
    if notes:
        print(f"labels: {len(notes)} CSV row(s) matched a file only by ignoring case or extension, "
              f"e.g. {terminal_text('; '.join(notes[:NOTE_EXAMPLES]))}")
    return {p: ls.pop() for p, ls in labels_of.items()}, skipped


def _leaves(name):
    """How a file name from the CSV leaves DATA ("" when it stays inside): absolute
    (/etc/hostname, C:\\x) or climbing with .. (../../x/hostname). Either would otherwise bind,
    by its file name, to DATA's own file of that name."""
    path = name.replace("\\", "/")
    if path.startswith("/") or _DRIVE.match(path):
        return "an absolute path"
    path = posixpath.normpath(path)
    return "a path that leaves DATA" if path == ".." or path.startswith("../") else ""


class _Finder:
    """File name in the CSV -> (path relative to DATA, problem, note); see the module docstring."""

    def __init__(self, paths):
        self.paths = set(paths)
        self.by_name, self.by_folded, self.by_stem = {}, {}, {}
        for p in paths:
            base = p.rsplit("/", 1)[-1]
            self.by_name.setdefault(base, []).append(p)
            self.by_folded.setdefault(base.casefold(), []).append(p)
            self.by_stem.setdefault(os.path.splitext(base)[0].casefold(), []).append(p)

    def find(self, name):
        rel = name.replace("\\", "/").removeprefix("./")
        if rel in self.paths:
            return rel, "", ""
        base = rel.rsplit("/", 1)[-1]
        stem = os.path.splitext(base)[0].casefold()
        for table, key, note in ((self.by_name, base, ""),
                                 (self.by_folded, base.casefold(), "case differs"),
                                 (self.by_stem, stem, "extension differs")):
            matches = table.get(key, [])
            if len(matches) == 1:
                if note and matches[0].rsplit("/", 1)[-1] == base:
                    note = ""
                return matches[0], "", note
            if len(matches) > 1:
                return None, f"CSV row matches several files ({', '.join(sorted(matches)[:3])})", ""
        return None, MISSING_FILE, ""
