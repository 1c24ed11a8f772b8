"""Write `torch.save`-format zip checkpoints without PyTorch.

Emits the same structure torch.save does (protocol-2 pickle of `_rebuild_tensor_v2` + storage
persistent ids, 64-byte aligned stored records), written opcode by opcode so that no `torch`
module is needed to name the globals. `torch_zip.read_torch_zip` reads it back bit-exactly.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from natjax.convert.torch_tensors import STORAGE_DTYPES

_NUMPY_TO_STORAGE = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "ByteStorage"}
_NUMPY_TO_STORAGE[np.dtype(np.uint8)] = "ByteStorage"


class _PickleWriter:
    """Minimal protocol-2 pickle emitter for a dict of tensors in torch's layout."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def str_(self, s: str) -> None:
        b = s.encode("utf-8")
        self.out += b"X" + len(b).to_bytes(4, "little") + b  # BINUNICODE

    def int_(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])  # BININT1
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + int(v).to_bytes(4, "little", signed=True)  # BININT
        else:
            n = (v.bit_length() + 8) // 8
            self.out += b"\x8a" + bytes([n]) + int(v).to_bytes(n, "little", signed=True)  # LONG1

    def tuple_(self, items: tuple[int, ...]) -> None:
        self.out += b"("  # MARK
        for v in items:
            self.int_(v)
        self.out += b"t"  # TUPLE

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode("ascii")  # GLOBAL


def _tensor_pickle(state: Mapping[str, np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
    w = _PickleWriter()
    w.out += b"}"  # EMPTY_DICT
    records = []
    for name, value in state.items():
        arr = np.ascontiguousarray(value)
        storage = _NUMPY_TO_STORAGE.get(arr.dtype)
        if storage is None:
            raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, which torch cannot store")
        key = str(len(records))
        records.append(arr)
        w.str_(name)
        w.global_("torch._utils", "_rebuild_tensor_v2")
        w.out += b"(("  # MARK (args) MARK (persistent id)
        w.str_("storage")
        w.global_("torch", storage)
        w.str_(key)
        w.str_("cpu")
        w.int_(arr.size)
        w.out += b"tQ"  # TUPLE, BINPERSID
        w.int_(0)  # storage offset
        w.tuple_(arr.shape)
        strides = tuple(s // arr.itemsize for s in arr.strides) if arr.size else (1,) * arr.ndim
        w.tuple_(strides)
        w.out += b"\x89"  # NEWFALSE: requires_grad
        w.global_("collections", "OrderedDict")
        w.out += b")R"  # EMPTY_TUPLE REDUCE: backward_hooks = OrderedDict()
        w.out += b"tR"  # TUPLE REDUCE: _rebuild_tensor_v2(*args)
        w.out += b"s"  # SETITEM
    w.out += b"."  # STOP
    return bytes(w.out), records


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes, align: int = 64) -> None:
    """Write a stored record whose payload starts at a multiple of `align` (as torch does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = archive.fp.tell() + 30 + len(name.encode("utf-8"))  # local header is 30 bytes
    pad = (-(start + 4)) % align  # extra field: 2-byte id + 2-byte size + padding
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    archive.writestr(info, data)


def save_torch_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write `state` as a `torch.save`-format zip that `torch.load` (and `read_torch_zip`) reads.

    Args:
      state: parameter name -> numpy array (float32/16, bfloat16, ints, bool).
      path: destination `.pth` / `.bin`; the archive folder inside is the file stem, as torch.
    """
    path = Path(path)
    payload, records = _tensor_pickle(state)
    prefix = f"{path.stem or 'archive'}/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        _write_aligned(archive, prefix + "data.pkl", payload)
        _write_aligned(archive, prefix + ".format_version", b"1")
        _write_aligned(archive, prefix + ".storage_alignment", b"64")
        _write_aligned(archive, prefix + "byteorder", b"little")
        for i, arr in enumerate(records):
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            _write_aligned(archive, f"{prefix}data/{i}", data)
        _write_aligned(archive, prefix + "version", b"3\n")
        # torch records a 40-digit id per file; derive it from the content (deterministic output).
        digest = int.from_bytes(hashlib.sha256(payload).digest(), "big") % 10**40
        _write_aligned(archive, prefix + ".data/serialization_id", f"{digest:040d}".encode())
