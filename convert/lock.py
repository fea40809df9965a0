"""One writer per model folder.

`glm-mlx convert` holds an exclusive flock on OUT/.glm_mlx.lock for the
whole conversion: a second convert into the same folder is refused at once
instead of interleaving its files with the first's, and loading (chat,
generate, finetune) refuses a folder while the lock is held. The kernel drops
the lock when its process ends, kill -9 included, so a stale lock file
blocks nothing; it stays in the folder (removing a lock file while another
process may have it open is how two writers end up holding two locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK = ".glm_mlx.lock"


class FolderBusy(ValueError):
    """Another process is writing the folder."""


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Hold the folder's write lock for the body; FolderBusy if another process holds it."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{folder}: another process is writing it (a glm-mlx convert); "
                             "wait for it to finish, or choose another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def refuse_if_being_written(folder: str | os.PathLike) -> None:
    """FolderBusy while a conversion is writing `folder`; nothing otherwise."""
    folder = Path(folder)
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (never converted here, or a folder we cannot read: loading says so)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderBusy(f"{folder}: a glm-mlx convert is writing it right now; "
                         "wait for it to finish before loading it") from None
    finally:
        os.close(fd)
