"""Writing a file whole or not at all, and a full disk as one line instead of a traceback.

Every file of the feature cache is written through `atomic_write`: the bytes go to a temporary
file in the same folder, are fsynced, and the temporary file is renamed over the final name. A
reader therefore sees the old file or the new one, never half of one. The HDF5 files are built in
memory first (cache/), so the disk is only ever written by plain Python I/O here, where a full
disk is an ordinary OSError: HDF5 writing straight into a file that cannot grow ended in a
segmentation fault.
"""
import errno
import os
import stat
from contextlib import contextmanager

from ..config import UserError

# "The disk is full" in its three forms, each in its own words and with its own fix: a limit
# set by `ulimit -f` is no lack of space, and freeing space would not help
FULL = {errno.ENOSPC: ("no space left on the disk", "free some space"),
        errno.EDQUOT: ("over the disk quota", "free some space or ask for a larger quota"),
        errno.EFBIG: ("over the file-size limit (`ulimit -f`)",
                      "raise it (`ulimit -f unlimited`)")}
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


def temporary_of(name):
    """The name that a temporary file of `temporary_name`, or of `replacing_path` (which adds
    .keras), stands for; None for any other name."""
    return original_name(name[:-len(".keras")] if name.endswith(TEMP_SUFFIX + ".keras")
                         else name)


def entries(folder):
    """The entries directly in `folder` (os.DirEntry, links not followed); [] when it is gone."""
    try:
        with os.scandir(folder) as found:
            return list(found)
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_temporaries(folder, names=None, keep=(), subfolders=False):
    """Delete the temporary files a killed writer left in `folder` (and in its subfolders, at
    any depth, with subfolders=True; a link to a folder is not entered): only our names
    (`temporary_of`), of `names` when given and never of `keep`, and only regular files (a
    link is left, never followed). Call it only while no writer of those names can be running
    (lock.exclusive)."""
    for entry in entries(folder):
        original = temporary_of(entry.name)
        if (original and (names is None or original in names) and original not in keep
                and entry.is_file(follow_symlinks=False)):
            remove_file(entry.path)
        elif subfolders and entry.is_dir(follow_symlinks=False):
            remove_temporaries(entry.path, names, keep, subfolders)


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
        remove_file(temp)
        if is_full(error):
            raise no_space(error, path) from None
        raise
    _fsync_folder(folder or ".")  # the rename itself survives a power cut


@contextmanager
def replacing_together(paths):
    """{path: temporary path} for several files that replace `paths` as one commit: the block
    writes every temporary whole (as `replacing_path`'s, with a .keras name where Keras needs
    one); only when it ends without an error are they renamed over `paths`, in their order, so
    the last should be the one that names the others by their hashes (head_metrics.json), the
    commit point readers trust. On any error every temporary is removed and every one of
    `paths` is as it was: a full disk is NoSpace, raised before anything is replaced."""
    paths = list(paths)
    temporaries = {path: temporary_name(path) + (".keras" if path.endswith(".keras") else "")
                   for path in paths}
    try:
        yield temporaries
        for path in paths:  # on the disk before any is renamed: no rename meets a half file
            _fsync_file(temporaries[path])
    except BaseException as error:
        for temporary in temporaries.values():
            remove_file(temporary)
        if is_full(error):
            raise no_space(error, ", ".join(paths)) from None
        raise
    for path in paths:  # renames write no data: a full disk cannot stop them halfway
        os.replace(temporaries[path], path)
    for folder in sorted({os.path.dirname(path) or "." for path in paths}):
        _fsync_folder(folder)


def no_space(error, writing):
    """The NoSpace for `error` (is_full) met writing `writing`, in the words of its cause."""
    words, fix = FULL[full_errno(error)]
    refusal = NoSpace(f"{words} writing {writing}: {fix}, then run the same command again; "
                      "everything finished so far is kept")
    refusal.words = words  # for a caller that goes on without the file and says why
    return refusal


def no_link(path):
    """Make `path` safe for a library that opens it by name to write (Keras's CSVLogger and
    ModelCheckpoint): whatever is there and is not a plain file of its own (a link, a hard link
    to another file, a FIFO, a socket, a device) is removed, never followed, so what it points
    at is untouched and the library creates a new file, as `replacing` renames over a link. A
    folder there is refused in one line. Returns `path`."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path} is a folder where a file is written: remove it, then run the "
                        "same command again")
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.remove(path)  # the name only: a link's target, a hard link's other names are kept
    return path


def no_link_folder(path):
    """Make `path` a plain folder of plain files for a library that writes into it by name
    (Keras's BackupAndRestore): a link (or any other non-folder) at `path` is removed, not
    followed, and so is every link or non-regular file inside it, at any depth; plain files
    and folders are kept (a backup to resume from). Returns `path`."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(info.st_mode):
        os.remove(path)
        return path
    for folder, subfolders, names in os.walk(path):  # os.walk enters no linked folder
        for name in names:
            no_link(os.path.join(folder, name))
        for name in subfolders:  # where os.walk lists the links to folders
            if os.path.islink(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    return path


def open_regular(path, mode="r", fix="remove it, then run the same command again", **open_args):
    """`path` open for reading, refused in one line (ending in `fix`) unless it is a regular
    file: a FIFO planted in models/<NAME> would block the reader forever, a device (a link to
    /dev/zero) would feed it without end. Opened without blocking, then checked, so no race."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise UserError(f"{path} is not a regular file ({file_kind(kind)}): {fix}")
        return os.fdopen(fd, mode, **open_args)
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode):
    """What a non-regular entry is, for reasons like "not a regular file (FIFO)"."""
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((kind for test, kind in kinds if test(mode)), "special file")


def is_full(error):
    """Whether an exception is the disk being full, also when a library wrapped the OSError."""
    return full_errno(error) is not None


def full_errno(error):
    """The errno of FULL behind an exception (ENOSPC, EDQUOT, EFBIG), or None."""
    for _ in range(8):  # the chain is short; the bound only guards against a cycle
        if error is None:
            return None
        if isinstance(error, OSError) and error.errno in FULL:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def remove_file(path):
    """Remove the name `path` (a link itself, never its target); nothing when it is gone."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
