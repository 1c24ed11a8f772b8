"""Read (and write) PyTorch `torch.save` zip checkpoints without PyTorch.

A `torch.save` file (PyTorch >= 1.6, `.bin` / `.pth` / `.pt`) is a zip archive::

    <archive>/data.pkl      pickle of the saved object; tensors are pickled as
                            `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
                            and storages as persistent ids
                            `('storage', torch.FloatStorage, key, location, numel)`
    <archive>/data/<key>    raw bytes of each storage
    <archive>/byteorder     'little' or 'big' (absent in old files: little)

Security: unpickling runs whatever callables the pickle names, so a checkpoint from the
internet is a program. `_RestrictedUnpickler.find_class` therefore resolves only an explicit
allow-list of names (tensor/parameter rebuild functions, storage classes, dtypes and
`collections.OrderedDict`) to small numpy stand-ins defined in this module; nothing is ever
imported from the file, and every other global is refused with a `ValueError` naming it.
PyTorch itself is never imported.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

logger = logging.getLogger(__name__)

# PyTorch storage class name -> numpy dtype. These are the names `torch.save` writes in the
# storage persistent id (`torch.<Name>Storage`), see torch/storage.py `_pickle_storage_type`.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    # Untyped storages count bytes; `_rebuild_tensor_v3` then names the dtype explicitly.
    "UntypedStorage": np.dtype(np.uint8),
}

# `torch.<dtype>` attribute -> numpy dtype (used by `_rebuild_tensor_v3`).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}

# Keys under which training scripts (timm, the SHI-Labs classification code, DeiT...) nest the
# weights, in order of preference. Plain weights come before EMA weights.
STATE_DICT_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "net")


class _NoBuild:
    """Refuses the pickle BUILD opcode, which would otherwise overwrite the object's `__dict__`.

    Without this a file could rewrite the module-level allow-list stand-ins (e.g. the dtype of
    `torch.FloatStorage`) and so corrupt every later load in the process.
    """

    def __setstate__(self, state: object) -> None:
        raise ValueError(f"refusing to modify {type(self).__name__} (pickle BUILD opcode)")


@dataclass(frozen=True)
class _StorageType(_NoBuild):
    """Stand-in for a `torch.<Name>Storage` class: only carries the element dtype."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _TorchDtype(_NoBuild):
    """Stand-in for a `torch.<dtype>` object."""

    name: str
    dtype: np.dtype


@dataclass
class _Storage(_NoBuild):
    """A storage resolved from the archive: a flat numpy array of `numel` elements."""

    data: np.ndarray


def _as_strided(
    storage: _Storage, offset: int, size: tuple, stride: tuple, dtype: np.dtype | None = None
) -> np.ndarray:
    """Materialise `storage[offset:]` viewed with `size`/`stride` (in elements) as a new array.

    Mirrors `torch.Tensor.set_(storage, offset, size, stride)`; the result owns its memory,
    is C-contiguous and writable, so later edits never alias other tensors of the same storage.
    """
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor storage is {type(storage).__name__}, expected a storage record")
    flat = storage.data
    if dtype is not None and dtype != flat.dtype:
        # `_rebuild_tensor_v3`: the storage is untyped bytes, the tensor dtype comes separately.
        if flat.nbytes % dtype.itemsize:
            raise ValueError(f"storage of {flat.nbytes} bytes is not a whole number of {dtype}")
        flat = flat.view(dtype)
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or any(s < 0 for s in size) or offset < 0:
        raise ValueError(f"invalid tensor geometry: offset={offset} size={size} stride={stride}")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, dtype=flat.dtype)
    if numel > flat.size:
        # Only overlapping strides (e.g. stride 0) read more elements than the storage holds;
        # the copy below would let a tiny file allocate without bound.
        raise ValueError(
            f"tensor (size={size}, stride={stride}) has {numel} elements but its storage only "
            f"{flat.size}: overlapping views are not supported (save `tensor.clone()` instead)"
        )
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if any(st < 0 for st in stride) or last >= flat.size:
        raise ValueError(
            f"tensor (offset={offset}, size={size}, stride={stride}) reads past its storage "
            f"of {flat.size} elements: the file is corrupt"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=size,
        strides=tuple(st * flat.itemsize for st in stride),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """numpy stand-in for `torch._utils._rebuild_tensor_v2`."""
    del requires_grad, backward_hooks, metadata  # autograd state has no numpy meaning
    return _as_strided(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad,
    backward_hooks,
    dtype,
    metadata=None,
):
    """numpy stand-in for `torch._utils._rebuild_tensor_v3` (untyped storage + explicit dtype)."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _TorchDtype):
        raise ValueError(f"_rebuild_tensor_v3 got dtype {dtype!r}, expected a torch dtype")
    return _as_strided(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """numpy stand-in for `torch._utils._rebuild_parameter[_with_state]`: the data itself."""
    del requires_grad, backward_hooks, state
    if not isinstance(data, np.ndarray):
        raise ValueError(f"parameter data is {type(data).__name__}, expected a tensor")
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_v2"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    allowed[("torch.storage", "UntypedStorage")] = _StorageType(
        "UntypedStorage", _STORAGE_DTYPES["UntypedStorage"]
    )
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(name, dtype)
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and reads storages from the zip."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(file)
        self._zip = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._path = path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        # Every GLOBAL/STACK_GLOBAL/INST/OBJ/EXT opcode goes through here: this is the only way
        # a pickle can reach a callable, so refusing here refuses code execution.
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ValueError(
                f"{self._path}: refusing to load global '{module}.{name}': only PyTorch tensor "
                "storages and state dicts can be read without running code from the file"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"{self._path}: persistent id names {storage_type!r}, not a storage")
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        record = f"{self._prefix}data/{key}"
        try:
            info = self._zip.getinfo(record)
        except KeyError:
            raise ValueError(f"{self._path}: storage record '{record}' is missing") from None
        dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
        # Size checked before reading, so a lying record cannot make us inflate anything big.
        size = info.file_size
        if size == int(numel) * dtype.itemsize:
            try:
                raw = self._zip.read(info)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise ValueError(f"{self._path}: cannot read '{record}' ({err})") from None
            size = len(raw)
        if size != int(numel) * dtype.itemsize:
            raise ValueError(
                f"{self._path}: storage record '{record}' holds {size} bytes, expected "
                f"{numel} x {dtype.itemsize} ({storage_type.name}): "
                "the file is truncated or corrupt"
            )
        data = np.frombuffer(raw, dtype=dtype)
        if not dtype.isnative:
            data = data.astype(dtype.newbyteorder("="))
        storage = _Storage(data)
        self._storages[key] = storage
        return storage


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty, not a torch.save checkpoint")
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path):
        if head == b"\x80\x02":
            raise ValueError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; "
                "re-save it with a recent PyTorch (torch.save(obj, f)) or as safetensors"
            )
        raise ValueError(f"{path}: not a zip archive, so not a torch.save checkpoint (truncated?)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: unreadable zip archive ({err})") from None


def read_torch_zip(path: str | os.PathLike) -> object:
    """Unpickle a `torch.save` zip archive with every tensor as a numpy array.

    Args:
      path: the `.bin` / `.pth` / `.pt` file.

    Returns:
      The saved object (usually a dict), tensors replaced by C-contiguous numpy arrays
      (bfloat16 as `ml_dtypes.bfloat16`).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is empty, truncated, not a torch zip, or names a global that is
        not on the allow-list (which would mean running code from the file).
    """
    with _open_zip(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pickles) != 1:
            raise ValueError(
                f"{path}: expected one '<archive>/data.pkl' record in the zip, found "
                f"{len(pickles)}: not a torch.save checkpoint"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
        try:
            payload = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"{path}: cannot read {pickles[0]} ({err})") from None
        unpickler = _RestrictedUnpickler(io.BytesIO(payload), archive, prefix, byteorder, str(path))
        try:
            return unpickler.load()
        except ValueError as err:
            if str(err).startswith(str(path)):
                raise
            # Raised by a stand-in (tensor geometry, dtype...): name the file.
            raise ValueError(f"{path}: {err}") from None
        except (
            pickle.UnpicklingError,
            EOFError,
            zipfile.BadZipFile,
            TypeError,
            AttributeError,
            KeyError,
            IndexError,
            OverflowError,
            RecursionError,
        ) as err:
            raise ValueError(
                f"{path}: corrupt checkpoint pickle ({type(err).__name__}: {err})"
            ) from None


def select_state_dict(
    obj: object, key: str | None = None
) -> tuple[dict[str, np.ndarray], str | None]:
    """Find the flat `name -> array` state dict inside an unpickled checkpoint.

    Args:
      obj: what `read_torch_zip` returned.
      key: the top-level key holding the weights (e.g. "model"); None picks the object itself
        if it is already a state dict, else the first of `STATE_DICT_KEYS` present.

    Returns:
      (state dict, key used or None when `obj` itself is the state dict). A DDP `module.`
      prefix on every key is removed.

    Raises:
      ValueError: no state dict found, or it holds something other than tensors.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    if key is not None:
        if key not in obj:
            raise ValueError(f"state dict key {key!r} not in checkpoint keys {sorted(obj)[:10]}")
        chosen, used = obj[key], key
    elif obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        chosen, used = obj, None
    else:
        used = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if used is None:
            raise ValueError(
                f"no state dict in checkpoint: top-level keys are {sorted(map(str, obj))[:10]}; "
                f"expected tensors or one of {STATE_DICT_KEYS}"
            )
        chosen = obj[used]
    if not isinstance(chosen, Mapping) or not chosen:
        raise ValueError(f"checkpoint entry {used!r} is not a non-empty dict of tensors")
    bad = [k for k, v in chosen.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"state dict {used!r} has non-tensor entries: {bad[:5]}")
    state = {str(k): v for k, v in chosen.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, used


def load_torch_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """Read the weights of a `torch.save` checkpoint as numpy arrays, without PyTorch.

    Args:
      path: the `.bin` / `.pth` file.
      key: see `select_state_dict`; the key used is logged at INFO level.

    Returns:
      dict of parameter name -> numpy array, in file order.
    """
    state, used = select_state_dict(read_torch_zip(path), key)
    if used is not None:
        logger.info("%s: using the state dict under key %r", path, used)
    return state


# --------------------------------------------------------------------------------------------
# Writer: emits the same structure torch.save does (protocol-2 pickle, 64-byte aligned records),
# written opcode by opcode so that no `torch` module is needed to name the globals.
# --------------------------------------------------------------------------------------------

_NUMPY_TO_STORAGE = {
    dtype: name for name, dtype in _STORAGE_DTYPES.items() if name != "ByteStorage"
}
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
