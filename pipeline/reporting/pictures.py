"""Files named by their content, so that a JSON file written last is the one commit point.

evaluate, report and the audit write several files (PNGs; the audit's CSVs) and then one file
that names them (evaluation.json, report.md, audit.json). Killed in between, fixed names would
leave new files beside the old JSON, and the next reader would combine them without a word. Here
each file is written (atomically) under `<stem>-<first 16 hex of its sha256>.<png|csv>` and
recorded as {"file", "sha256"}: an old JSON still names its own files, which are still there,
and a new file no JSON names is only a leftover, removed by the next run that commits
(`remove_stale`). A reader takes a file only through `verified`: named in the JSON, a regular
file in the folder, with the recorded hash.
"""
import hashlib
import os
import re

from ..config import UserError
from ..fs import files

EXTENSIONS = ("png", "csv")
_NAME = re.compile(r"([a-z][a-z0-9_]*)-([0-9a-f]{16})\.(?:png|csv)")


def write(folder, stem, data, extension="png"):
    """Write the bytes `data` as folder/<stem>-<hash>.<extension>; returns its record. The same
    content gives the same name, so a rerun that makes the same file rewrites nothing new."""
    if extension not in EXTENSIONS:
        raise ValueError(f"extension {extension!r} is not one of {EXTENSIONS}")
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stem}-{digest[:16]}.{extension}"
    os.makedirs(folder, exist_ok=True)
    files.atomic_write(os.path.join(folder, name), data)  # renames over a link, never through
    return {"file": name, "sha256": digest}


def verified(folder, record):
    """(the file's bytes, "") when `record` (read back from an untrusted JSON) names a file
    of this module's form in `folder` whose content has the recorded hash; else (None, why)."""
    if not isinstance(record, dict):
        return None, "not recorded"
    name, digest = record.get("file"), record.get("sha256")
    found = _NAME.fullmatch(name) if isinstance(name, str) else None
    if not found or not isinstance(digest, str) or not digest.startswith(found.group(2)):
        return None, "not recorded"
    try:
        with files.open_regular(os.path.join(folder, name), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UserError):
        return None, "not a regular file"
    if hashlib.sha256(data).hexdigest() != digest:
        return None, "changed since it was recorded"
    return data, ""


def remove_stale(folder, stems, keep):
    """Delete the files of `stems` in `folder` that are not named in `keep` (the records just
    committed): only names of this module's form, only regular files, never what a link points
    at (a link there is left alone). Call it after the JSON naming `keep` is in place."""
    keep = {r["file"] for r in keep if isinstance(r, dict)}
    for entry in files.entries(folder):
        match = _NAME.fullmatch(entry.name)
        if (match and match.group(1) in stems and entry.name not in keep
                and entry.is_file(follow_symlinks=False)):
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                pass
