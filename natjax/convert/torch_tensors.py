"""numpy stand-ins for the torch objects a `torch.save` pickle names, and one load's budget.

`torch_zip`'s unpickler resolves the allow-listed globals to these: storage types and dtypes
are frozen records, the rebuild functions become `Factory` objects bound to the current
`Load`, which reads each storage once (from `zip_records.StoredZip`) and returns every tensor
as a read-only numpy view of its storage's bytes. None of them accepts the pickle BUILD opcode.
"""

from __future__ import annotations

import collections
import math
import operator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from natjax.convert import pickle_scan
from natjax.convert.zip_records import StoredZip

MAX_BYTES_ENV = "NATJAX_MAX_CHECKPOINT_BYTES"
# Tensors may view their storages this many times over (tied weights share one storage): the
# views cost nothing here, but a caller copying each tensor pays for every view.
VIEW_FACTOR = 4
_SLACK = 2**20

# PyTorch storage class name -> numpy dtype. These are the names `torch.save` writes in the
# storage persistent id (`torch.<Name>Storage`), see torch/storage.py `_pickle_storage_type`.
STORAGE_DTYPES: dict[str, np.dtype] = {
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
TORCH_DTYPES: dict[str, np.dtype] = {
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


class _NoBuild:
    """Refuses the pickle BUILD opcode, which would otherwise overwrite the object's state.

    Without this a file could rewrite the module-level allow-list stand-ins (e.g. the dtype of
    `torch.FloatStorage`) and so corrupt every later load in the process. `pickle_scan` already
    refuses BUILD on these; this is the second lock.
    """

    __slots__ = ()

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


class _Storage(_NoBuild):
    """A storage resolved from the archive: its raw bytes, read once and shared by its tensors."""

    __slots__ = ("key", "raw", "dtype")

    def __init__(self, key: str, raw: np.ndarray, dtype: np.dtype) -> None:
        self.key, self.raw, self.dtype = key, raw, dtype


def _ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list):
        raise ValueError(f"tensor {what} is a {type(value).__name__}, expected a tuple of ints")
    try:
        return tuple(operator.index(v) for v in value)
    except TypeError:
        raise ValueError(f"tensor {what} {value!r} holds non-integers") from None


class Load:
    """The state of one `read_torch_zip` call: its archive, storages and tensor-byte budget."""

    def __init__(self, archive: StoredZip, prefix: str, byteorder: str, max_bytes: int) -> None:
        self.archive = archive
        self.prefix = prefix
        self.order = "<" if byteorder == "little" else ">"
        self.storages: dict[str, _Storage] = {}
        self.tensor_bytes = 0
        self.max_bytes = max_bytes
        self.budget = min(max_bytes, VIEW_FACTOR * archive.file_size + _SLACK)

    def storage(self, pid: object) -> _Storage:
        """`persistent_load`: the storage `('storage', type, key, location, numel)` names."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"persistent id names {storage_type!r:.100}, not a storage type")
        if not isinstance(key, str | int) or isinstance(key, bool):
            raise ValueError(f"storage key {key!r:.100} is not a string")
        try:
            numel = operator.index(numel)
        except TypeError:
            raise ValueError(f"storage size {numel!r:.100} is not an integer") from None
        key = str(key)
        dtype = storage_type.dtype.newbyteorder(self.order)
        cached = self.storages.get(key)
        if cached is not None:
            if cached.dtype != dtype or cached.raw.size != numel * dtype.itemsize:
                raise ValueError(f"storage '{key}' is named twice with different types or sizes")
            return cached
        record = f"{self.prefix}data/{key}"
        info = self.archive.record(record)
        if info is None:
            raise ValueError(f"storage record '{record}' is missing")
        # Size checked before reading: the record must hold exactly what the pickle declares.
        if numel < 0 or info.size != numel * dtype.itemsize:
            raise ValueError(
                f"storage record '{record}' holds {info.size} bytes, expected "
                f"{numel} x {dtype.itemsize} ({storage_type.name}): "
                "the file is truncated or corrupt"
            )
        storage = _Storage(key, self.archive.read(record), dtype)
        self.storages[key] = storage
        return storage

    def tensor(
        self, storage: object, offset: object, size: object, stride: object, dtype=None
    ) -> np.ndarray:
        """A read-only view of `storage` with torch's `set_(storage, offset, size, stride)`.

        Views, not copies: tensors of one storage share its bytes (as in torch), so a file of N
        tensors viewing one storage costs one storage, not N. Only big-endian files are copied
        (into native order).
        """
        if not isinstance(storage, _Storage):
            raise ValueError(
                f"tensor storage is {type(storage).__name__}, expected a storage record"
            )
        flat_dtype = storage.dtype if dtype is None else dtype.newbyteorder(self.order)
        if storage.raw.size % flat_dtype.itemsize:
            raise ValueError(
                f"storage of {storage.raw.size} bytes is not a whole number of {flat_dtype}"
            )
        flat = storage.raw.view(flat_dtype)
        size, stride = _ints(size, "size"), _ints(stride, "stride")
        try:
            offset = operator.index(offset)
        except TypeError:
            raise ValueError(f"tensor offset {offset!r:.100} is not an integer") from None
        if (
            len(size) != len(stride)
            or len(size) > 64
            or any(n < 0 for n in size)
            or any(st < 0 for st in stride)
            or offset < 0
        ):
            raise ValueError(
                f"invalid tensor geometry: offset={offset} size={size} stride={stride}"
            )
        # A dimension of size 0 or 1 never steps: its stride is arbitrary in torch (and may be
        # huge); zero it so that numpy's byte strides cannot overflow.
        stride = tuple(st if n > 1 else 0 for n, st in zip(size, stride, strict=True))
        numel = math.prod(size)
        self.tensor_bytes += numel * flat.itemsize
        if self.tensor_bytes > self.budget:
            limit = (
                f"max_bytes={self.max_bytes} (raise it with max_bytes= or ${MAX_BYTES_ENV})"
                if self.budget == self.max_bytes
                else f"{VIEW_FACTOR} x the file size of {self.archive.file_size} bytes"
            )
            raise ValueError(
                f"the tensors view {self.tensor_bytes} bytes of storage in all, more than "
                f"{limit}: many tensors over one storage (an amplification attack?)"
            )
        native = flat_dtype.newbyteorder("=")
        if numel == 0:
            empty = np.zeros(size, native)
            empty.flags.writeable = False
            return empty
        last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if last >= flat.size:
            raise ValueError(
                f"tensor (offset={offset}, size={size}, stride={stride}) reads past its storage "
                f"of {flat.size} elements: the file is corrupt"
            )
        view = np.ndarray(
            size,
            dtype=flat.dtype,
            buffer=flat,
            offset=offset * flat.itemsize,
            strides=tuple(st * flat.itemsize for st in stride),
        )
        if not flat.dtype.isnative:
            view = view.astype(native)
            view.flags.writeable = False
        return view


def _rebuild_tensor_v2(
    load: Load,
    storage,
    storage_offset,
    size,
    stride,
    requires_grad=False,
    backward_hooks=None,
    metadata=None,
):
    """numpy stand-in for `torch._utils._rebuild_tensor_v2`."""
    del requires_grad, backward_hooks, metadata  # autograd state has no numpy meaning
    return load.tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    load: Load,
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
        raise ValueError(f"_rebuild_tensor_v3 got dtype {dtype!r:.100}, expected a torch dtype")
    return load.tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(load: Load, data, requires_grad=False, backward_hooks=None, state=None):
    """numpy stand-in for `torch._utils._rebuild_parameter[_with_state]`: the data itself."""
    del load, requires_grad, backward_hooks, state
    if not isinstance(data, np.ndarray):
        raise ValueError(f"parameter data is {type(data).__name__}, expected a tensor")
    return data


def _ordered_dict(load: Load, *args):
    del load
    return collections.OrderedDict(*args)


# Allow-listed callables: (module, name) -> (stand-in, what `pickle_scan` treats it as).
FUNCTIONS = {
    ("collections", "OrderedDict"): (_ordered_dict, pickle_scan.DICT_FACTORY),
    ("torch._utils", "_rebuild_tensor_v2"): (_rebuild_tensor_v2, pickle_scan.TENSOR_FACTORY),
    ("torch._utils", "_rebuild_tensor_v3"): (_rebuild_tensor_v3, pickle_scan.TENSOR_FACTORY),
    ("torch._utils", "_rebuild_parameter"): (_rebuild_parameter, pickle_scan.TENSOR_FACTORY),
    ("torch._utils", "_rebuild_parameter_with_state"): (
        _rebuild_parameter,
        pickle_scan.TENSOR_FACTORY,
    ),
    ("torch._utils", "_rebuild_parameter_v2"): (_rebuild_parameter, pickle_scan.TENSOR_FACTORY),
}


def _constants() -> dict[tuple[str, str], _NoBuild]:
    allowed: dict[tuple[str, str], _NoBuild] = {}
    for name, dtype in STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    allowed[("torch.storage", "UntypedStorage")] = allowed[("torch", "UntypedStorage")]
    for name, dtype in TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(name, dtype)
    return allowed


CONSTANTS = _constants()
SCAN_KINDS = {key: kind for key, (_, kind) in FUNCTIONS.items()} | {
    key: pickle_scan.CONSTANT for key in CONSTANTS
}


class Factory(_NoBuild):
    """An allow-listed function bound to one load; BUILD on it is refused (no `__dict__`)."""

    __slots__ = ("_fn", "_load")

    def __init__(self, fn, load: Load) -> None:
        self._fn, self._load = fn, load

    def __call__(self, *args):
        return self._fn(self._load, *args)
