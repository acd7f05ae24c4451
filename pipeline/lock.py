"""One writer per dataset and stage: a second `make extract` (or `make finetune`) of the same NAME
stops at once with one line, instead of two runs overwriting each other's files."""
import fcntl
import os
from contextlib import contextmanager

from .config import UserError


@contextmanager
def exclusive(folder, stage):
    """Hold `folder`'s lock for `stage` (extract: features/<NAME>, finetune: models/<NAME>).
    The OS drops the lock when its holder dies, even by kill -9, so a killed run never leaves
    a stale lock behind."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".{stage}.lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise UserError(f"another {stage} (pid {holder}) is writing {folder}: wait for it "
                            "to finish, then run this again") from None
        lock.seek(0), lock.truncate(), lock.write(str(os.getpid())), lock.flush()
        yield
