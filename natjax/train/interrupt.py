"""Clean stops on Ctrl-C (SIGINT) and SIGTERM at any moment of a training run.

Python runs signal handlers in the main thread between bytecodes, so a handler alone cannot
act while the main thread sits in a long native call (XLA compiling the train step can take
minutes; the default SIGINT handler then raised KeyboardInterrupt inside it, a traceback
followed by a segfault). Instead the C-level handler's wakeup fd (`signal.set_wakeup_fd`) is
read by a watcher thread, which decides at once:
  * nothing to save yet (set-up, resume, compiling the first step, after the last save): exit
    right away with status 128 + signal (130 for SIGINT, 143 for SIGTERM), no traceback;
  * inside the step loop (`deferred()`): record the signal; the loop saves a checkpoint at the
    end of the current step and returns, and the CLI exits with 128 + signal;
  * a second signal: exit right away (orbax commits checkpoints by an atomic rename, so an
    exit mid-save leaves the previous checkpoint intact).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's status for a process stopped by `signum` (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class Interrupts:
    """Context manager installing the handling described in the module docstring.

    Outside the main thread (Python only lets the main thread install handlers) it does nothing
    and signals keep their default behaviour.

    Args:
      log: where the one-line messages go (process 0's stderr).

    Attributes:
      signum: the first signal received, None until then.
    """

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.signum: int | None = None
        self._deferred = 0
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None
        self._saved: tuple | None = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        # The Python-level handler only has to exist (and not raise KeyboardInterrupt): the C
        # handler behind it writes the signal number to the wakeup fd for the watcher.
        old = {s: signal.signal(s, lambda *_: None) for s in SIGNALS}
        self._saved = (old_fd, old)
        threading.Thread(target=self._watch, name="natjax-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        old_fd, old = self._saved
        signal.set_wakeup_fd(old_fd)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(self._pipe[1])  # the watcher's read returns b"" and the thread ends

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: a (first) signal is only recorded; the caller saves and stops."""
        with self._lock:
            self._deferred += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferred -= 1

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        try:
            while data := os.read(read_fd, 64):
                for signum in data:
                    self._on_signal(signum)
        finally:
            os.close(read_fd)

    def _on_signal(self, signum: int) -> None:
        if signum not in SIGNALS:  # the wakeup fd reports every signal with a Python handler
            return
        name = signal.Signals(signum).name
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = signum
            if first and self._deferred:
                self.log(f"{name}: saving a checkpoint at the end of this step, then exiting.")
                return
        code = exit_status(self.signum)
        why = "nothing to save" if first else "second signal, not waiting for the save"
        self.log(f"{name}: exiting now ({why}; rerun the same command to resume).")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
