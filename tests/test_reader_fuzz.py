"""Fuzzing the `.bin`/`.pth` reader: any input gives a result or one ValueError, never a crash.

Inputs (hypothesis, derandomized so every run is the same; no example database):
- byte-level mutations (overwrite, flip, insert, delete, truncate) of the golden
  `pytorch_model.bin` / `original.pth`, aimed mostly at their pickle and zip directory;
- opcode-level mutations of a small valid checkpoint's pickle, re-zipped with its storages;
- opcode streams generated from torch's vocabulary (allow-listed and refused globals, storage
  persistent ids, containers, memo, huge declared lengths and indices, deep nesting).

Every file is read in a `ReaderWorker` child capped at its warmed-up address space + 256 MiB:
a segfault, MemoryError, timeout or any other exception fails the test with the input shrunk.
"""

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from golden import golden_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reader_isolation import ReaderWorker

from natjax.convert.torch_zip import save_torch_state_dict

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def worker():
    with ReaderWorker(extra_mib=256, timeout_s=60) as w:
        yield w


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A valid checkpoint with several dtypes, an empty tensor and a scalar: (pickle, records)."""
    state = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones((2, 2), np.float16),
        "c": np.arange(3, dtype=np.int64),
        "d": np.zeros((0, 4), np.float32),
        "e": np.float32(2.5).reshape(()),
    }
    path = tmp_path_factory.mktemp("fuzz") / "small.pth"
    save_torch_state_dict(state, path)
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        return z.read(pkl), {n: z.read(n) for n in z.namelist() if n != pkl}


def _zip(path, payload: bytes, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("small/data.pkl", payload)
        for name, data in records.items():
            z.writestr("small/" + name.split("/", 1)[1], data)


def _check(worker, path) -> None:
    got = worker.read(path)
    assert got["outcome"] in ("ok", "ValueError"), got
    if got["outcome"] == "ValueError":
        assert got["message"].startswith(str(path)), got["message"]


# ------------------------------------------------------------------- byte-level mutations
GOLDEN = [("nat_rand", "pytorch_model.bin"), ("dinat_rand", "original.pth")]
_golden_bytes: dict[int, bytes] = {}


def golden_bytes(i: int) -> bytes:
    if i not in _golden_bytes:
        _golden_bytes[i] = golden_file(*GOLDEN[i]).read_bytes()
    return _golden_bytes[i]


mutation = st.tuples(
    st.sampled_from(["set", "flip", "insert", "delete", "truncate"]),
    st.sampled_from(["pickle", "directory", "anywhere"]),
    st.floats(0, 1),
    st.binary(min_size=1, max_size=8),
)


def _position(data: bytes, region: str, where: float) -> int:
    if region == "pickle":  # data.pkl is the first record: its bytes start ~100 bytes in
        return int(100 + where * 14_000)
    if region == "directory":  # the central directory and end record: the last ~10 KB
        return len(data) - 1 - int(where * min(10_000, len(data) - 1))
    return int(where * (len(data) - 1))


@settings(FUZZ, max_examples=80)
@given(st.integers(0, len(GOLDEN) - 1), st.lists(mutation, min_size=1, max_size=4))
def test_mutated_golden_files(tmp_path_factory, worker, which, mutations):
    data = bytearray(golden_bytes(which))
    for op, region, where, chunk in mutations:
        at = min(_position(data, region, where), len(data) - 1)
        if op == "set":
            data[at : at + len(chunk)] = chunk
        elif op == "flip":
            data[at] ^= 1 << (chunk[0] % 8)
        elif op == "insert":
            data[at:at] = chunk
        elif op == "delete":
            del data[at : at + len(chunk)]
        else:
            del data[at:]
        if not data:
            data = bytearray(b"\0")
    path = tmp_path_factory.mktemp("golden") / GOLDEN[which][1]
    path.write_bytes(bytes(data))
    _check(worker, path)


def _pickle_span(data: bytes) -> tuple[int, int, int]:
    """(local header offset, payload start, payload size) of the golden file's data.pkl."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    n_name, n_extra = struct.unpack_from("<2H", data, info.header_offset + 26)
    return info.header_offset, info.header_offset + 30 + n_name + n_extra, info.file_size


@settings(FUZZ, max_examples=80)
@given(
    st.integers(0, len(GOLDEN) - 1),
    st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=4)), min_size=1, max_size=3),
)
def test_mutated_golden_pickles_with_valid_crc(tmp_path_factory, worker, which, edits):
    """Bytes of the golden data.pkl overwritten, CRC-32 fixed up: the unpickler sees them."""
    data = bytearray(golden_bytes(which))
    header, start, size = _pickle_span(bytes(data))
    for where, chunk in edits:
        at = start + int(where * (size - len(chunk)))
        data[at : at + len(chunk)] = chunk
    crc = zlib.crc32(data[start : start + size])
    struct.pack_into("<I", data, header + 14, crc)  # local header
    at = data.index(b"PK\x01\x02", start + size)  # the central directory follows the records
    while struct.unpack_from("<I", data, at + 42)[0] != header:
        at = data.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<I", data, at + 16, crc)  # central directory entry
    path = tmp_path_factory.mktemp("golden_pkl") / GOLDEN[which][1]
    path.write_bytes(bytes(data))
    _check(worker, path)


# ----------------------------------------------------------------- opcode-level mutations
@settings(FUZZ, max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1),
            st.sampled_from(["set", "insert", "delete"]),
            st.binary(min_size=1, max_size=6),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_pickles(tmp_path_factory, worker, small_checkpoint, edits):
    payload, records = small_checkpoint
    data = bytearray(payload)
    for where, op, chunk in edits:
        at = int(where * (len(data) - 1))
        if op == "set":
            data[at : at + len(chunk)] = chunk
        elif op == "insert":
            data[at:at] = chunk
        else:
            del data[at : at + len(chunk)]
    path = tmp_path_factory.mktemp("pkl") / "small.pth"
    _zip(path, bytes(data), records)
    _check(worker, path)


# ----------------------------------------------------------------- generated opcode streams
def _u4(n: int) -> bytes:
    return struct.pack("<I", n % 2**32)


def _int(n: int) -> bytes:
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def _str(s: str) -> bytes:
    return b"X" + _u4(len(s.encode())) + s.encode()


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


_GLOBALS = [
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_tensor_v3\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nUntypedStorage\n",
    b"ctorch\nfloat16\n",
    b"cbuiltins\neval\n",
    b"cnumpy\nfrombuffer\n",
]
_FIXED = [bytes([c]) for c in b"(]})NtlduaseRbQ0129\x85\x86\x87\x88\x89\x90\x91\x93\x94\x81"]
_ODICT = b"ccollections\nOrderedDict\n)R"
# The archive holds one 16-byte storage record "0" (and no other).
_STORAGES = ["FloatStorage", "HalfStorage", "LongStorage", "UntypedStorage", "BoolStorage"]


@st.composite
def tensor(draw) -> bytes:
    """A `_rebuild_tensor_v2`/`v3` call with arbitrary geometry, storage type, key and numel."""
    # Mostly a type and size that fit the 16-byte record, sometimes not.
    fits = st.sampled_from(
        [("FloatStorage", 4), ("HalfStorage", 8), ("LongStorage", 2), ("UntypedStorage", 16)]
    )
    lies = st.tuples(st.sampled_from(_STORAGES), st.sampled_from([0, 3, 2**31 - 1]))
    name, numel = draw(st.one_of(fits, fits, fits, lies))
    key = draw(st.sampled_from(["0"] * 6 + ["1", "../0"]))
    storage = b"(" + _str("storage") + b"ctorch\n" + name.encode() + b"\n"
    storage += _str(key) + _str("cpu") + _int(numel) + b"tQ"
    ndim = draw(st.integers(0, 3))
    dims = st.lists(st.integers(-1, 5), min_size=ndim, max_size=ndim + draw(st.integers(0, 1)))
    args = [
        storage,
        _int(draw(st.integers(-1, 20))),
        _tuple([_int(n) for n in draw(dims)]),
        _tuple([_int(n) for n in draw(dims)]),
        b"\x89",
        _ODICT,
    ]
    if draw(st.booleans()):
        head = b"ctorch._utils\n_rebuild_tensor_v2\n"
    else:
        head = b"ctorch._utils\n_rebuild_tensor_v3\n"
        args.append(b"ctorch\n" + draw(st.sampled_from([b"float32", b"float16", b"int64"])))
        args[-1] += b"\n"
    return head + _tuple(args) + b"R"


leaf = st.one_of(
    tensor(),
    st.integers(-(2**31), 2**31 - 1).map(_int),
    st.text(max_size=8).map(_str),
    st.sampled_from([b"N", b"\x88", b"\x89", b")"]),
)


def _container(children: list[bytes], kind: str) -> bytes:
    body = b"".join(children)
    if kind == "tuple":
        return b"(" + body + b"t"
    if kind == "list":
        return b"](" + body + b"e"
    pairs = b"".join(_str(f"k{i}") + child for i, child in enumerate(children))
    return (b"}" if kind == "dict" else _ODICT) + b"(" + pairs + b"u"


value = st.recursive(
    leaf,
    lambda inner: st.tuples(
        st.lists(inner, max_size=4), st.sampled_from(["tuple", "list", "dict", "odict"])
    ).map(lambda t: _container(*t)),
    max_leaves=12,
)

token = st.one_of(
    st.sampled_from(_FIXED),
    st.sampled_from(_GLOBALS),
    st.integers(0, 3).map(lambda n: b"q" + bytes([n])),  # BINPUT
    st.integers(0, 3).map(lambda n: b"h" + bytes([n])),  # BINGET
    st.sampled_from([2**20, 2**27, 2**32 - 1]).map(lambda n: b"r" + _u4(n)),  # LONG_BINPUT
    st.integers(0, 2**64).map(lambda n: b"\x8a\x09" + n.to_bytes(9, "little")),
    st.binary(max_size=6).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.sampled_from([b"\x8e", b"\x96", b"\x8d", b"\x95"]).flatmap(  # 8-byte declared lengths
        lambda op: st.sampled_from([0, 5, 2**31, 2**40, 2**64 - 1]).map(
            lambda n: op + struct.pack("<Q", n)
        )
    ),
    st.integers(1, 300).map(lambda n: b")" + b"\x85" * n),  # nested tuples
    st.integers(0, 6).map(lambda p: b"\x80" + bytes([p])),
    value,
)


@settings(FUZZ, max_examples=200)
@given(value, st.lists(st.tuples(st.floats(0, 1), token), max_size=3))
def test_generated_opcode_streams(tmp_path_factory, worker, body, splices):
    """A well-formed value (tensors, containers, leaves), with up to 3 tokens spliced in."""
    data = bytearray(body)
    for where, tok in splices:
        at = int(where * len(data))
        data[at:at] = tok
    path = tmp_path_factory.mktemp("gen") / "gen.pth"
    _zip(path, b"\x80\x02" + bytes(data) + b".", {"x/data/0": bytes(16)})
    _check(worker, path)
