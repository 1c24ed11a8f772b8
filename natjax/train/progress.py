"""What a training run shows while it runs: phases, a progress bar, messages.

On a terminal: a tqdm bar sized to the terminal width (step, epoch, loss, accuracy, lr,
images/s and ETA); before it, a "compiling" line whose elapsed time ticks every second (a
large model can compile for minutes; the first step is the compilation). Not on a terminal
(a log file, CI): plain lines, one per `run.log_every` steps. Images/s and the ETA are measured
from the end of the first step, so they exclude compilation. Only process 0 prints.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Iterator


def format_time(seconds: float) -> str:
    """`H:MM:SS` ("?" when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress display of one run.

    Args:
      enabled: show the bar / periodic lines (messages are shown regardless).
      is_main: only process 0 prints anything.
      stream: where to write (stderr by default).
    """

    def __init__(self, enabled: bool, is_main: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.is_main = is_main
        self.enabled = enabled and is_main
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._lock = threading.Lock()
        self._timing: tuple[float, int] | None = None  # (time, step) at the end of compilation

    # ------------------------------------------------------------------------------ messages
    def message(self, text: str) -> None:
        """A line above the bar (any thread)."""
        if not self.is_main:
            return
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    # ---------------------------------------------------------------------------- compiling
    @contextlib.contextmanager
    def compiling(self, what: str) -> Iterator[None]:
        """Shows `compiling <what>` with its elapsed time while the body runs."""
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        done = threading.Event()
        if self.tty:

            def tick() -> None:
                while not done.wait(1.0):
                    with self._lock:
                        elapsed = time.perf_counter() - t0
                        self.stream.write(f"\rcompiling {what}... {elapsed:.0f} s")
                        self.stream.flush()

            thread = threading.Thread(target=tick, name="natjax-compiling", daemon=True)
            self.stream.write(f"compiling {what}...")
            self.stream.flush()
            thread.start()
        else:
            self.message(f"compiling {what}...")
        try:
            yield
        finally:
            done.set()
            elapsed = time.perf_counter() - t0
            with self._lock:
                prefix = "\r" if self.tty else ""
                self.stream.write(f"{prefix}compiled {what} in {elapsed:.1f} s\n")
                self.stream.flush()

    # ---------------------------------------------------------------------------------- bar
    def start(self, step: int, total: int) -> None:
        """Starts timing (and the bar) after the first, compiling step `step` finished."""
        self._timing = (time.perf_counter(), step)
        if not (self.enabled and self.tty):
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=step,
            file=self.stream,
            dynamic_ncols=True,  # follows the terminal width, also when resized
            unit="step",
            leave=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix}",
        )

    def rate(self, step: int, batch_size: int, total: int) -> tuple[float, float]:
        """(images/s, ETA seconds) since the end of compilation (nan before it)."""
        if self._timing is None or step <= self._timing[1]:
            return math.nan, math.nan
        t0, s0 = self._timing
        per_step = (time.perf_counter() - t0) / (step - s0)
        return batch_size / per_step, (total - step) * per_step

    def update(self, step: int, total: int, epoch: float, metrics: dict, ips: float, eta: float):
        """The bar at `step`, or one plain line when not on a terminal."""
        if not self.enabled:
            return
        stats = (
            f"loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
            f"lr {metrics['lr']:.2e} | {ips:.0f} img/s | ETA {format_time(eta)}"
        )
        if self._bar is not None:
            with self._lock:
                self._bar.set_description_str(f"ep {epoch:.1f}", refresh=False)
                self._bar.set_postfix_str(stats, refresh=False)
                self._bar.update(step - self._bar.n)
            return
        self.message(f"step {step}/{total} [{100 * step / total:3.0f}%] ep {epoch:.1f} | {stats}")

    def close(self) -> None:
        """Ends the bar (messages then go straight to the stream)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
