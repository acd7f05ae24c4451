"""One writer per folder: a second `make extract` of the same NAME, or a `make train-head` while a
`make finetune` (or evaluate, or report) writes models/<NAME>, stops at once with one line,
instead of two runs overwriting each other's files."""
import errno
import fcntl
import os
import stat
from contextlib import contextmanager

from ..config import UserError
from . import files

LOCK = ".lock"  # one per folder, whatever the stage: every writer of a folder excludes the others
# written in models/<NAME> without its lock (predict, batch): their temporaries may be in flight
UNLOCKED = ("predictions.csv", "predictions_skipped.csv", "batch_state.json")


@contextmanager
def exclusive(folder, stage):
    """Hold `folder`'s lock for `stage` (extract: features/<NAME>; train-head, finetune,
    evaluate, report: models/<NAME>). The OS drops the lock when its holder dies, even by
    kill -9, so a killed run never leaves a stale lock behind. The lock file is opened without
    following a link and must be a regular file: what lies in the folder is untrusted, and a
    link there would have its target truncated.

    Once held, the temporary files that a killed writer left in `folder` and its subfolders
    (files.temporary_name's, such as the audit's in audit/) are removed: no other writer can be
    making them now, and nothing else would ever remove them. Those of the files written
    without the lock (UNLOCKED) are kept."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    fd = _open(path)
    with os.fdopen(fd, "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read(100).split()  # "<pid> <stage>", as written below
            pid = holder[0] if holder and holder[0].isdigit() else "?"
            other = holder[1] if len(holder) > 1 and holder[1].isprintable() else "run"
            raise UserError(f"another {other} (pid {pid}) is writing {folder}: wait for it "
                            "to finish, then run this again") from None
        lock.seek(0), lock.truncate(), lock.write(f"{os.getpid()} {stage}"), lock.flush()
        files.remove_temporaries(folder, keep=UNLOCKED, subfolders=True)
        yield


def _open(path):
    try:
        # O_NONBLOCK: a FIFO planted here opens at once, to be refused below, instead of hanging
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        what = "a link" if error.errno == errno.ELOOP else "a folder"
        raise UserError(f"{path} is {what}, not a lock file: remove it, then run this "
                        "again") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a hard link: another file's name
        os.close(fd)
        what = (f"not a regular file ({files.file_kind(info.st_mode)})" if not
                stat.S_ISREG(info.st_mode) else "a hard link to another file")
        raise UserError(f"{path} is {what}, not a lock file: remove it, then run this again")
    return fd
