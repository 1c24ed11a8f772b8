"""The run folder: created with a one-line error when impossible, and locked for one run."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def prepare_workdir(workdir: Path) -> None:
    """Creates the run folder, with a one-line error when that is impossible.

    Raises:
      ValueError: naming `run.workdir` when it (or a parent) is a file or cannot be created.
    """
    for parent in (workdir, *workdir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"run.workdir={str(workdir)!r}: {parent} is a file, not a folder.")
            break
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"run.workdir={str(workdir)!r}: cannot create it ({err.strerror or err})."
        ) from None


class WorkdirLock:
    """An exclusive `flock` on WORKDIR/.lock for the run's lifetime (released at exit, even on
    SIGKILL, by the kernel), so a second run in the same workdir stops instead of interleaving
    metrics and checkpoints with the first."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / ".lock"
        self._file = open(self.path, "a+")  # noqa: SIM115 (closed in release())
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown"
            self._file.close()
            raise ValueError(
                f"run.workdir={str(workdir)!r} is in use by another natjax train (pid {owner}); "
                "wait for it to finish or use another --workdir."
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        self._file.close()


@contextlib.contextmanager
def locked_workdir(workdir: Path, is_main: bool) -> Iterator[None]:
    """Process 0 creates and locks `workdir` for the body (other processes only share it)."""
    if not is_main:
        yield
        return
    prepare_workdir(workdir)
    lock = WorkdirLock(workdir)
    try:
        yield
    finally:
        lock.release()
