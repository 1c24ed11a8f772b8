"""The stored records of a `torch.save` zip archive, validated before anything is read.

PyTorch writes every record of its archive uncompressed ("stored", method 0; see
`caffe2/serialize/inline_container.cc`, which calls miniz with compression level 0), so a
checkpoint never needs an inflater. Accepting deflate would let a kilobyte file expand into
gigabytes, so `StoredZip` refuses, up front and for every record in the central directory:
compressed or encrypted records, records that extend past the end of the file, overlap another
record or disagree with their local header, and duplicate names. What is left can be read with
one `readinto` per record: the total bytes read are at most the file size, and nothing is
decompressed. Every problem is one `ValueError` that names the file.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Local file header: signature, version, flags, method, time, date, crc, sizes, name/extra length.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
# General-purpose flag bits (APPNOTE 4.4.4): 0 = encrypted, 6 = strong encryption,
# 13 = central directory encrypted/masked.
_ENCRYPTION_FLAGS = 0x0001 | 0x0040 | 0x2000
# More records than this is no torch checkpoint (one record per storage; the largest models have
# tens of thousands), and each record costs a few hundred bytes of `ZipInfo` to index.
MAX_RECORDS = 1 << 20
# What `zipfile` raises on a damaged directory (it has no single exception type).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    OverflowError,
    NotImplementedError,
    RuntimeError,
    KeyError,
    IndexError,
    TypeError,
)


@dataclass(frozen=True)
class Record:
    """One stored record: where its bytes start in the file, how many, and their CRC-32."""

    name: str
    offset: int
    size: int
    crc: int


class StoredZip:
    """A zip archive whose records are all stored, in bounds and disjoint (checked on open).

    Args:
      path: the archive.

    Raises:
      FileNotFoundError: `path` is not a file.
      ValueError: the file is not a zip archive, or its directory fails any check above.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {self.path}")
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close()/__exit__)
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            self._records = self._scan_directory()
        except BaseException:
            self._file.close()
            raise

    def _error(self, problem: str) -> ValueError:
        return ValueError(f"{self.path}: {problem}")

    def _scan_directory(self) -> dict[str, Record]:
        try:
            with zipfile.ZipFile(self._file) as archive:
                infos = archive.infolist()
        except _ZIP_ERRORS as err:
            raise self._error(
                f"not a readable zip archive ({type(err).__name__}: {err}), so not a "
                "torch.save checkpoint (truncated or damaged?)"
            ) from None
        if len(infos) > MAX_RECORDS:
            raise self._error(f"zip directory lists {len(infos)} records (at most {MAX_RECORDS})")
        records: dict[str, Record] = {}
        spans: list[tuple[int, int, str]] = []
        for info in infos:
            name = info.filename
            if name in records:
                raise self._error(f"zip record '{name}' appears twice")
            if info.flag_bits & _ENCRYPTION_FLAGS:
                raise self._error(f"zip record '{name}' is encrypted; torch.save never encrypts")
            if info.compress_type != zipfile.ZIP_STORED:
                raise self._error(
                    f"zip record '{name}' is compressed (method {info.compress_type}); "
                    "torch.save writes stored (uncompressed) records, and inflating untrusted "
                    "data is refused: re-save the checkpoint with torch.save"
                )
            if info.compress_size != info.file_size:
                raise self._error(
                    f"zip record '{name}' is stored but its sizes differ "
                    f"({info.compress_size} != {info.file_size}): the directory is corrupt"
                )
            offset = self._data_offset(info)
            end = offset + info.file_size
            if end > self.file_size:
                raise self._error(
                    f"zip record '{name}' ({info.file_size} bytes at {offset}) runs past the end "
                    f"of the file ({self.file_size} bytes): the file is truncated or corrupt"
                )
            records[name] = Record(name, offset, info.file_size, info.CRC)
            spans.append((info.header_offset, end, name))
        spans.sort()
        for (_, end, name), (start, _, other) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise self._error(f"zip records '{name}' and '{other}' overlap: corrupt file")
        return records

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where `info`'s bytes start, from its local header (whose extra field may differ)."""
        name = info.filename
        if not 0 <= info.header_offset <= self.file_size - _LOCAL_HEADER.size:
            raise self._error(
                f"zip record '{name}' has its local header at {info.header_offset}, past the end "
                f"of the file ({self.file_size} bytes): the file is truncated or corrupt"
            )
        self._file.seek(info.header_offset)
        header = self._file.read(_LOCAL_HEADER.size)
        fields = _LOCAL_HEADER.unpack(header)
        n_name, n_extra = fields[-2:]
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        try:
            want = info.orig_filename.encode(encoding)
        except UnicodeEncodeError:
            want = None
        if fields[0] != _LOCAL_SIGNATURE or self._file.read(n_name) != want:
            raise self._error(
                f"zip record '{name}': no matching local header at offset {info.header_offset} "
                "(bad central directory): the file is corrupt"
            )
        return info.header_offset + _LOCAL_HEADER.size + n_name + n_extra

    # ------------------------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        """Record names, in directory order."""
        return list(self._records)

    def record(self, name: str) -> Record | None:
        """The record called `name`, None if the archive has none."""
        return self._records.get(name)

    def read(self, name: str) -> np.ndarray:
        """The bytes of record `name` as a read-only uint8 array (CRC-32 checked).

        Raises:
          ValueError: no such record, the file changed size under us, or the CRC differs.
        """
        record = self._records.get(name)
        if record is None:
            raise self._error(f"zip record '{name}' is missing")
        buffer = np.empty(record.size, np.uint8)
        view = memoryview(buffer)
        self._file.seek(record.offset)
        done = 0
        try:
            while done < record.size:
                n = self._file.readinto(view[done:])
                if not n:
                    break
                done += n
        except OSError as err:
            raise self._error(f"cannot read zip record '{name}' ({err})") from None
        if done != record.size:
            raise self._error(f"zip record '{name}' is truncated ({done} of {record.size} bytes)")
        if zlib.crc32(buffer) != record.crc:
            raise self._error(
                f"zip record '{name}' fails its CRC-32 check: the file is corrupt "
                "(a damaged download?)"
            )
        buffer.flags.writeable = False
        return buffer

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> StoredZip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
