"""Metric logging: JSON lines (`metrics.jsonl`) and TensorBoard event files (tensorboardX).

The JSONL file is the run's own record (read back by resume, plots and tests; a torn last line
from a kill mid-write is repaired). TensorBoard events go through tensorboardX's maintained
writer (part of the `natjax[train]` extra), under `workdir/tb/`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


class MetricsWriter:
    """Appends metrics to `workdir/metrics.jsonl` and `workdir/tb/events.out.tfevents.*`.

    Args:
      workdir: run folder.
      enabled: False on non-zero processes (only process 0 writes).
    """

    def __init__(self, workdir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.workdir = Path(workdir)
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Imported here: the op and model layers never need it (natjax[train] extra).
        from tensorboardX import SummaryWriter

        self._events = SummaryWriter(logdir=str(self.workdir / "tb"), flush_secs=30)
        path = self.workdir / "metrics.jsonl"
        dropped = repair_jsonl(path)
        if dropped:
            warnings.warn(
                f"natjax train: {path} ended in a torn record (a run killed mid-write); "
                f"removed its {dropped} bytes.",
                stacklevel=2,
            )
        self._jsonl = open(path, "a")  # noqa: SIM115

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        """Records `values` (e.g. {"loss": ...}) for `split` ("train"/"eval") at `step`."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            if math.isfinite(v):
                self._events.add_scalar(f"{split}/{k}", v, global_step=int(step))
        self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._events.close()
            self._jsonl.close()


def repair_jsonl(path: str | Path) -> int:
    """Truncates a torn last record (no final newline, or not JSON) off a JSON-lines file.

    Returns:
      The number of bytes removed (0 when the file is intact or absent).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    keep = len(raw)
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
    else:
        last_start = raw.rfind(b"\n", 0, max(keep - 1, 0)) + 1
        last = raw[last_start:keep].strip()
        if last and not _is_json(last):
            keep = last_start
    if keep == len(raw):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(raw) - keep


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file; a torn last line (a kill mid-write) is skipped.

    Raises:
      ValueError: a line other than the last is not JSON (the file is damaged otherwise).
    """
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record.") from None
    return out
