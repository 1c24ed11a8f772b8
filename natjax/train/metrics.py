"""Metric logging: JSON lines and TensorBoard event files, without TensorFlow or protobuf.

The TensorBoard `tfevents` format is a sequence of records
  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
where data is a serialized `tensorflow.Event` protobuf. We only need scalar summaries, so the
few protobuf fields are hand-encoded (Event: wall_time=1 double, step=2 int64, file_version=3
string, summary=5; Summary.value=1; Value: tag=1 string, simple_value=2 float). This avoids a
dependency on TensorFlow (or on tensorboardX + protobuf) for ~60 lines of code.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
import warnings
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as used by TFRecord/tfevents."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    """Serialized `Event` proto with scalar summary values."""
    out = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time))
    out += _varint(2 << 3 | 0) + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(
                1,
                _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value),
            )
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, summary)
    return bytes(out)


def record(data: bytes) -> bytes:
    """One TFRecord-framed record."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def read_records(path: str | Path) -> list[bytes]:
    """Reads and CRC-checks every record of a tfevents file (for tests and tools)."""
    raw = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        header = raw[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
        data = raw[pos + 12 : pos + 12 + length]
        (dcrc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
        if hcrc != masked_crc32c(header) or dcrc != masked_crc32c(data):
            raise ValueError(f"{path}: CRC mismatch in the record at byte {pos}.")
        out.append(data)
        pos += 16 + length
    return out


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
        tb = self.workdir / "tb"
        tb.mkdir(exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{time.time_ns()}"
        self._events = open(tb / name, "ab")  # noqa: SIM115 (closed in close())
        self._events.write(record(encode_event(time.time(), 0, file_version="brain.Event:2")))
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
        scalars = {f"{split}/{k}": v for k, v in clean.items() if math.isfinite(v)}
        self._events.write(record(encode_event(time.time(), step, scalars)))
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
