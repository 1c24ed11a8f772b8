"""Hostile `torch.save`-style files, shared by the reader tests and
`experiments/reader_hostile_memory.py` (which measures the peak memory each one costs).

Every builder writes one small file and returns its path. Each case reproduces an attack from
issue 10 section 1; `CASES` maps its name to (builder, regex the reader's `ValueError` matches).
This module depends only on the standard library, so it also runs against older reader code.
"""

from __future__ import annotations

import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

PROTO2 = b"\x80\x02"


class Ops:
    """Hand-written pickle opcodes (protocol 2), enough to spell torch's tensor layout."""

    def __init__(self, proto: int = 2) -> None:
        self.out = bytearray(b"\x80" + bytes([proto]))

    def raw(self, b: bytes) -> Ops:
        self.out += b
        return self

    def str_(self, s: str) -> Ops:
        b = s.encode()
        return self.raw(b"X" + struct.pack("<I", len(b)) + b)  # BINUNICODE

    def int_(self, v: int) -> Ops:
        if 0 <= v < 256:
            return self.raw(b"K" + bytes([v]))  # BININT1
        if -(2**31) <= v < 2**31:
            return self.raw(b"J" + struct.pack("<i", v))  # BININT
        n = (v.bit_length() + 8) // 8
        return self.raw(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))  # LONG1

    def global_(self, module: str, name: str) -> Ops:
        return self.raw(b"c" + f"{module}\n{name}\n".encode())  # GLOBAL

    def put(self, i: int) -> Ops:
        return self.raw(b"r" + struct.pack("<I", i))  # LONG_BINPUT

    def get(self, i: int) -> Ops:
        return self.raw(b"j" + struct.pack("<I", i))  # LONG_BINGET

    def ints_tuple(self, values: tuple[int, ...]) -> Ops:
        self.raw(b"(")
        for v in values:
            self.int_(v)
        return self.raw(b"t")

    def bytes(self) -> bytes:
        return bytes(self.out) + b"."  # STOP


def write_torch_zip(
    path: Path,
    payload: bytes,
    records: dict[str, bytes] | None = None,
    *,
    compression: int = zipfile.ZIP_STORED,
    byteorder: str = "little",
) -> Path:
    """A zip laid out like `torch.save`: `archive/data.pkl`, `archive/byteorder`, storages."""
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", payload, compress_type=zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", byteorder.encode(), compress_type=zipfile.ZIP_STORED)
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def views_pickle(n_tensors: int, numel: int, key: str = "0") -> bytes:
    """A state dict of `n_tensors` float32 tensors, each viewing all of storage `key`."""
    ops = Ops().raw(b"}(")  # EMPTY_DICT MARK
    for i in range(n_tensors):
        ops.str_(f"w{i}")
        if i == 0:
            ops.global_("torch._utils", "_rebuild_tensor_v2").put(0)
            ops.raw(b"((").str_("storage").global_("torch", "FloatStorage").str_(key)
            ops.str_("cpu").int_(numel).raw(b"tQ").put(1)  # TUPLE BINPERSID
        else:
            ops.get(0).raw(b"(").get(1)
        ops.int_(0).ints_tuple((numel,)).ints_tuple((1,)).raw(b"\x89")  # offset size stride False
        if i == 0:
            ops.global_("collections", "OrderedDict").put(2)
        else:
            ops.get(2)
        ops.raw(b")RtR")  # OrderedDict() ; args TUPLE ; REDUCE
    return ops.raw(b"u").bytes()  # SETITEMS


# ------------------------------------------------------------------------------- the cases
def deep_key(path: Path, depth: int = 200_000) -> Path:
    """A dict key nested `depth` tuples deep: hashing it recursed in C until SIGSEGV."""
    payload = PROTO2 + b"}" + b")" + b"\x85" * depth + b"K\x01s."  # TUPLE1 x depth, SETITEM
    return write_torch_zip(path, payload)


def memo_put(path: Path, index: int = 2**27) -> Path:
    """LONG_BINPUT at a huge index: the unpickler sized its memo table to 2*index pointers."""
    return write_torch_zip(path, PROTO2 + b"K\x01r" + struct.pack("<I", index) + b".")


def declared_length(opcode: bytes, n: int = 2**40) -> Callable[[Path], Path]:
    """BINBYTES8 / BYTEARRAY8 / BINUNICODE8 declaring `n` bytes that the file does not hold."""

    def build(path: Path) -> Path:
        return write_torch_zip(path, b"\x80\x05" + opcode + struct.pack("<Q", n) + b"abc.")

    return build


def many_lists(path: Path, n: int = 1_500_000) -> Path:
    """One byte per empty list (MARK, EMPTY_LIST x n, LIST): ~70 bytes of heap per file byte."""
    return write_torch_zip(path, PROTO2 + b"(" + b"]" * n + b"l.")


def colliding_keys(path: Path, n: int = 20_000) -> Path:
    """A dict whose int keys all share one hash (multiples of 2**61 - 1): quadratic inserts."""
    ops = Ops().raw(b"}(")
    for i in range(1, n + 1):
        ops.int_(i * (2**61 - 1)).raw(b"N")
    return write_torch_zip(path, ops.raw(b"u").bytes())


def deflated_views(path: Path) -> Path:
    """The issue's 35 KB -> 1.1 GB file: 270 tensors viewing one deflated 4 MiB storage."""
    numel = 2**20
    return write_torch_zip(
        path,
        views_pickle(270, numel),
        {"0": bytes(4 * numel)},
        compression=zipfile.ZIP_DEFLATED,
    )


def stored_views(path: Path) -> Path:
    """400 tensors viewing one stored 1 MiB storage (400 MiB if each view is copied)."""
    numel = 2**18
    return write_torch_zip(path, views_pickle(400, numel), {"0": bytes(4 * numel)})


def deflate_bomb(path: Path) -> Path:
    """One tensor whose storage is 64 MiB of deflated zeros (a file of ~65 KB)."""
    numel = 2**24
    return write_torch_zip(
        path, views_pickle(1, numel), {"0": bytes(4 * numel)}, compression=zipfile.ZIP_DEFLATED
    )


def _patch_central(data: bytearray, name: bytes, offset: int, fmt: str, value: int) -> None:
    """Overwrite a field of `name`'s central directory entry (`offset` from its signature)."""
    eocd = data.rindex(b"PK\x05\x06")
    at = struct.unpack_from("<I", data, eocd + 16)[0]  # offset of the central directory
    while data[at : at + 4] == b"PK\x01\x02":
        n_name, n_extra, n_comment = struct.unpack_from("<3H", data, at + 28)
        if bytes(data[at + 46 : at + 46 + n_name]) == name:
            struct.pack_into(fmt, data, at + offset, value)
            return
        at += 46 + n_name + n_extra + n_comment
    raise KeyError(name)


def _patched(builder: Callable[[Path], Path], patch: Callable[[bytearray], None]):
    def build(path: Path) -> Path:
        builder(path)
        data = bytearray(path.read_bytes())
        patch(data)
        path.write_bytes(bytes(data))
        return path

    return build


def _small(path: Path) -> Path:
    return write_torch_zip(path, views_pickle(2, 4), {"0": bytes(16)})


encrypted_flag = _patched(_small, lambda d: _patch_central(d, b"archive/data.pkl", 8, "<H", 1))
unknown_method = _patched(_small, lambda d: _patch_central(d, b"archive/data/0", 10, "<H", 99))
past_the_end = _patched(
    _small,
    lambda d: (
        _patch_central(d, b"archive/data/0", 20, "<I", 2**30),
        _patch_central(d, b"archive/data/0", 24, "<I", 2**30),
    ),
)
bad_header_offset = _patched(_small, lambda d: _patch_central(d, b"archive/data.pkl", 42, "<I", 7))


def corrupt_deflate(path: Path) -> Path:
    """A deflated storage record whose deflate stream is garbage."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", views_pickle(2, 4))
        z.writestr("archive/data/0", bytes(16), compress_type=zipfile.ZIP_DEFLATED)
        info = z.getinfo("archive/data/0")
    data = bytearray(path.read_bytes())
    n_name, n_extra = struct.unpack_from("<2H", data, info.header_offset + 26)
    start = info.header_offset + 30 + n_name + n_extra
    data[start : start + 2] = b"\xff\xff"
    path.write_bytes(bytes(data))
    return path


def truncated(path: Path) -> Path:
    """A valid checkpoint cut at 70%: no end-of-central-directory record."""
    full = stored_views(path).read_bytes()
    path.write_bytes(full[: len(full) * 7 // 10])
    return path


def build_on_function(path: Path) -> Path:
    """BUILD with slot state on an allow-listed function: rewrote its __qualname__/__defaults__."""
    ops = Ops().global_("torch._utils", "_rebuild_tensor_v2")
    ops.raw(b"(N}(").str_("__qualname__").str_("pwned").str_("__defaults__")
    ops.raw(b"(").int_(7).raw(b"t").raw(b"u")  # ... SETITEMS
    ops.raw(b"tb")  # TUPLE (None, {...}) ; BUILD
    return write_torch_zip(path, ops.bytes())


def flipped_storage_byte(path: Path) -> Path:
    """One bit flipped in a storage's bytes: the record's CRC-32 no longer matches."""
    _small(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("archive/data/0")
    n_name, n_extra = struct.unpack_from("<2H", data, info.header_offset + 26)
    data[info.header_offset + 30 + n_name + n_extra] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def overlapping_records(path: Path) -> Path:
    """Two directory entries pointing at the same bytes (each record read twice)."""
    _small(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo("archive/data.pkl").header_offset
    _patch_central(data, b"archive/byteorder", 42, "<I", offset)
    path.write_bytes(bytes(data))
    return path


def duplicate_names(path: Path) -> Path:
    """Two records named `archive/data.pkl`: which one a reader uses is up to the reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", views_pickle(2, 4))
            z.writestr("archive/data/0", bytes(16))
            z.writestr("archive/data.pkl", PROTO2 + b"N.")
    return path


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "deep_key": (deep_key, r"nested more than \d+ levels deep"),
    "memo_put_2**27": (memo_put, r"memo index 134217728"),
    "memo_put_2**32-1": (lambda p: memo_put(p, 2**32 - 1), r"memo index 4294967295"),
    "binbytes8_2**40": (declared_length(b"\x8e"), r"declares 1099511627776 bytes"),
    "bytearray8_2**40": (declared_length(b"\x96"), r"declares 1099511627776 bytes"),
    "binunicode8_2**40": (declared_length(b"\x8d"), r"declares 1099511627776 bytes"),
    "many_lists_1.5M": (many_lists, r"would build more than"),
    "oversized_pickle_8MiB": (lambda p: many_lists(p, 8_000_000), r"more than 4194304"),
    "colliding_keys_20k": (colliding_keys, r"non-string dict keys"),
    "deflated_views_35KB": (deflated_views, r"compressed"),
    "stored_views_400x1MiB": (stored_views, r"tensors view \d+ bytes"),
    "deflate_bomb_64MiB": (deflate_bomb, r"compressed"),
    "encrypted_flag": (encrypted_flag, r"encrypted"),
    "unknown_method_99": (unknown_method, r"compressed \(method 99\)"),
    "record_past_the_end": (past_the_end, r"past the end of the file"),
    "bad_header_offset": (bad_header_offset, r"local header|overlap"),
    "corrupt_deflate": (corrupt_deflate, r"compressed"),
    "truncated": (truncated, r"not a zip archive"),
    "build_on_function": (build_on_function, r"BUILD"),
    "flipped_storage_byte": (flipped_storage_byte, r"CRC-32"),
    "overlapping_records": (overlapping_records, r"local header|overlap"),
    "duplicate_names": (duplicate_names, r"appears twice"),
}


# Worst cases for the pre-scan's time and memory at the 4 MiB pickle cap (measured by
# experiments/reader_hostile_memory.py, too slow for the unit tests).
_CAP = 4 * 2**20 - 16
SCAN_WORST_CASES: dict[str, Callable[[Path], Path]] = {
    # 2 million MARK/POP_MARK pairs: cheap for the heap model, the most opcodes per byte.
    "mark_pop_4MiB": lambda p: write_torch_zip(p, PROTO2 + b"(1" * (_CAP // 2) + b"N."),
    # 4 million empty lists: the heap budget refuses them part-way.
    "lists_4MiB": lambda p: write_torch_zip(p, PROTO2 + b"(" + b"]" * _CAP + b"l."),
    # 1.4 million one-character strings in one list (cached by CPython, but not by the scan).
    "strings_4MiB": lambda p: write_torch_zip(
        p, PROTO2 + b"(" + b"\x8c\x01a" * (_CAP // 3) + b"l."
    ),
    # 2 million memo lookups of one list.
    "gets_4MiB": lambda p: write_torch_zip(p, PROTO2 + b"(]q\x00" + b"h\x00" * (_CAP // 2) + b"l."),
}
