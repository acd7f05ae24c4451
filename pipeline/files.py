"""Writing a file whole or not at all, and a full disk as one line instead of a traceback.

Every file of the feature cache is written through `atomic_write`: the bytes go to a temporary
file in the same folder, are fsynced, and the temporary file is renamed over the final name. A
reader therefore sees the old file or the new one, never half of one. The HDF5 files are built in
memory first (cache.py), so the disk is only ever written by plain Python I/O here, where a full
disk is an ordinary OSError: HDF5 writing straight into a file that cannot grow ended in a
segmentation fault.
"""
import errno
import os
from contextlib import contextmanager

from .config import UserError

# "The disk is full" in its three forms: no space, over quota, over the file-size limit
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
TEMP_SUFFIX = ".tmp"


class NoSpace(UserError):
    """The disk (or quota) is full. Raised only after the temporary file has been removed."""


def temporary_name(path):
    """A fresh temporary name next to `path`: `.<name>.<8 hex>.tmp`, hidden and never a name
    the user chose, so that a leftover can be recognised (`original_name`) and removed."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.urandom(4).hex()}{TEMP_SUFFIX}")


def original_name(name):
    """The name a temporary file made by `temporary_name` stands for, or None for any other."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    base, _, tag = name[1:-len(TEMP_SUFFIX)].rpartition(".")
    if base and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag):
        return base
    return None


def atomic_write(path, content):
    """Replace `path` by `content`: bytes (or a memoryview), or a function that writes into the
    open binary file it is given. On a full disk the temporary file is removed and NoSpace is
    raised with the fix; `path` is then exactly as it was."""
    with replacing(path, "x+b") as f:  # "+": HDF5 reads back what it wrote
        if callable(content):
            content(f)
        else:
            f.write(content)


@contextmanager
def replacing(path, mode="x", **open_args):
    """An open temporary file that replaces `path` when the block ends without an error, for
    writers that stream (CSV rows, JSON, a figure). On any error it is removed and `path` is
    left as it was; a full disk becomes NoSpace."""
    with replacing_path(path) as temp:
        # "x": never clobbers anything, even on a name clash
        with open(temp, mode.replace("w", "x") if "x" not in mode else mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def replacing_path(path):
    """A temporary path, with `path`'s own extension (Keras insists on .keras), that replaces
    `path` when the block ends without an error: for libraries that write to a path."""
    folder = os.path.dirname(path)
    temp = temporary_name(path) + (".keras" if path.endswith(".keras") else "")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException as error:
        _remove(temp)
        if is_full(error):
            raise NoSpace(f"no space left on the disk writing {path}: free some space, then run "
                          "the same command again; everything finished so far is kept") from None
        raise
    _fsync_folder(folder or ".")  # the rename itself survives a power cut


def is_full(error):
    """Whether an exception is the disk being full, also when a library wrapped the OSError."""
    for _ in range(8):  # the chain is short; the bound only guards against a cycle
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
