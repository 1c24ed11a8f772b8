"""Read PyTorch `torch.save` zip checkpoints without PyTorch, in bounded time and memory.

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
`collections.OrderedDict`) to small numpy stand-ins (`torch_tensors`); nothing is ever imported
from the file, and every other global is refused with a `ValueError` naming it. PyTorch itself
is never imported.

Hostile files: before anything is built, `zip_records.StoredZip` checks the whole zip directory
(stored, unencrypted, in-bounds, disjoint records) and `pickle_scan.scan_pickle` the whole
opcode stream (declared lengths, memo indices, nesting depth, estimated heap, hash-flooding
keys, BUILD targets). Storages are read once and tensors are views of them; storage bytes and
viewed bytes are capped by `max_bytes` (default 16 GiB, or $NATJAX_MAX_CHECKPOINT_BYTES) and the
views by `VIEW_FACTOR` x the file size. Every malformed file gives one `ValueError` naming it.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from natjax.convert import pickle_scan
from natjax.convert.torch_save import save_torch_state_dict
from natjax.convert.torch_tensors import (
    CONSTANTS,
    FUNCTIONS,
    MAX_BYTES_ENV,
    SCAN_KINDS,
    VIEW_FACTOR,
    Factory,
    Load,
)
from natjax.convert.zip_records import StoredZip

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_BYTES_ENV",
    "MAX_PICKLE_BYTES",
    "STATE_DICT_KEYS",
    "VIEW_FACTOR",
    "load_torch_state_dict",
    "read_torch_zip",
    "resolve_max_bytes",
    "save_torch_state_dict",
    "select_state_dict",
]

logger = logging.getLogger(__name__)

# Keys under which training scripts (timm, the SHI-Labs classification code, DeiT...) nest the
# weights, in order of preference. Plain weights come before EMA weights.
STATE_DICT_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "net")


# Far above any NAT/DiNAT checkpoint (the largest, ~200M parameters with Adam moments in float32,
# is ~2.5 GB) and far below what would exhaust a workstation; raise it with `max_bytes=` or the
# environment variable for bigger files.
DEFAULT_MAX_BYTES = 16 * 2**30
# torch pickles ~130 bytes per tensor, so 4 MiB is ~30,000 tensors (NAT/DiNAT checkpoints have a
# few hundred, x3 with optimizer state). The pre-scan is pure Python (about a microsecond per
# opcode), so this also bounds the time a hostile pickle costs (`SCAN_WORST_CASES` in
# experiments/reader_hostile_memory.py). Module constant: raise it here if you must.
MAX_PICKLE_BYTES = 4 * 2**20
# Heap the unpickler may build, under the cost model of `pickle_scan` (which never frees, as the
# memo keeps every object alive): the golden torch pickles need 14-17 bytes per pickle byte
# (printed by experiments/reader_hostile_memory.py).
_HEAP_PER_PICKLE_BYTE = 32
_HEAP_FLOOR = 8 * 2**20


def resolve_max_bytes(max_bytes: int | None = None) -> int:
    """The cap on a checkpoint's tensor data: `max_bytes`, else $NATJAX_MAX_CHECKPOINT_BYTES,
    else `DEFAULT_MAX_BYTES` (16 GiB).

    Raises:
      ValueError: the argument or the environment variable is not a positive integer.
    """
    where = "max_bytes"
    if max_bytes is None:
        env = os.environ.get(MAX_BYTES_ENV)
        if env is None:
            return DEFAULT_MAX_BYTES
        where = f"${MAX_BYTES_ENV}"
        try:
            max_bytes = int(env.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"{where}={env!r}; expected a positive integer (bytes)") from None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"{where}={max_bytes!r}; expected a positive integer (bytes)")
    return max_bytes


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and reads storages from the zip."""

    def __init__(self, file, load: Load):
        super().__init__(file)
        self._load = load
        self._factories = {key: Factory(fn, load) for key, (fn, _) in FUNCTIONS.items()}

    def find_class(self, module: str, name: str):
        # Every GLOBAL/STACK_GLOBAL/INST/OBJ opcode goes through here: this is the only way a
        # pickle can reach a callable, so refusing here refuses code execution. (The pre-scan
        # already refused the same names; this is the second lock.)
        found = self._factories.get((module, name)) or CONSTANTS.get((module, name))
        if found is None:
            raise ValueError(pickle_scan.refusal(module, name))
        return found

    def persistent_load(self, pid):
        return self._load.storage(pid)


def _open(path: Path) -> StoredZip:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty, not a torch.save checkpoint")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x80\x02":
            raise ValueError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; "
                "re-save it with a recent PyTorch (torch.save(obj, f)) or as safetensors"
            )
        raise ValueError(f"{path}: not a zip archive, so not a torch.save checkpoint (truncated?)")
    return StoredZip(path)


def _pickle_record(archive: StoredZip) -> str:
    pickles = [n for n in archive.names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
        raise ValueError(
            f"expected one '<archive>/data.pkl' record in the zip, found {len(pickles)}: "
            "not a torch.save checkpoint"
        )
    return pickles[0]


def _read(archive: StoredZip, max_bytes: int) -> object:
    """Checks (directory, then opcode stream) first, then the unpickling itself."""
    name = _pickle_record(archive)
    prefix = name[: -len("data.pkl")]
    byteorder = "little"
    record = archive.record(f"{prefix}byteorder")
    if record is not None:
        if record.size > 16:
            raise ValueError(f"byteorder record of {record.size} bytes (expected 'little'/'big')")
        raw = archive.read(record.name).tobytes()
        byteorder = raw.decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"unknown byteorder record {byteorder!r}")
    storage_bytes = sum(
        archive.record(n).size for n in archive.names if n.startswith(f"{prefix}data/")
    )
    if storage_bytes > max_bytes:
        raise ValueError(
            f"its storages hold {storage_bytes} bytes, more than max_bytes={max_bytes}; raise "
            f"the limit with max_bytes= or ${MAX_BYTES_ENV} if the file is trusted"
        )
    size = archive.record(name).size
    if size > MAX_PICKLE_BYTES:
        raise ValueError(
            f"'{name}' is {size} bytes, more than {MAX_PICKLE_BYTES} (torch pickles take "
            "~130 bytes per tensor): not a plain state dict; re-save only the weights"
        )
    payload = archive.read(name).tobytes()
    summary = pickle_scan.scan_pickle(
        payload, SCAN_KINDS, max_heap_bytes=_HEAP_FLOOR + _HEAP_PER_PICKLE_BYTE * size
    )
    logger.debug("%s: pickle pre-scan %s", archive.path, summary)
    load = Load(archive, prefix, byteorder, max_bytes)
    return _RestrictedUnpickler(io.BytesIO(payload), load).load()


# Everything malformed input can raise from the unpickler or a stand-in. MemoryError is absent on
# purpose: the pre-scan bounds memory, so one escaping is a bug to see, not a file to blame.
_CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
    struct.error,
    NotImplementedError,
    SystemError,
)


def read_torch_zip(path: str | os.PathLike, *, max_bytes: int | None = None) -> object:
    """Unpickle a `torch.save` zip archive with every tensor as a numpy array.

    Nothing is built before the whole zip directory and pickle opcode stream have been checked
    (see `zip_records` and `pickle_scan`): time and memory are bounded by the file size, and
    tensor data by `max_bytes`.

    Args:
      path: the `.bin` / `.pth` / `.pt` file.
      max_bytes: cap on the storage bytes read and on the bytes the tensors view; default
        $NATJAX_MAX_CHECKPOINT_BYTES, else 16 GiB.

    Returns:
      The saved object (usually a dict), tensors replaced by read-only numpy arrays that view
      their storage's bytes (tensors sharing a storage share memory, as in torch; call `.copy()`
      to edit one). bfloat16 is `ml_dtypes.bfloat16`.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: one, naming the file and the problem, for anything that is not a valid
        torch.save checkpoint: empty, truncated, damaged or compressed zip, a malformed or
        over-large pickle, or a global not on the allow-list (which would mean running code
        from the file).
    """
    path = Path(path)
    limit = resolve_max_bytes(max_bytes)
    try:
        with _open(path) as archive:
            return _read(archive, limit)
    except UnicodeDecodeError as err:  # a ValueError, but its text names neither file nor cause
        raise ValueError(
            f"{path}: corrupt checkpoint pickle (a string is not UTF-8: {err})"
        ) from None
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {err}") from None
    except _CORRUPT as err:
        problem = f"{type(err).__name__}: {err}"
        raise ValueError(f"{path}: corrupt checkpoint pickle ({problem})") from None


def _preview(keys, n: int = 10) -> list[str]:
    """Up to `n` keys as short strings, sorted (keys of any type, however long)."""
    out = []
    for key in list(keys)[: 10 * n]:
        try:
            text = key if isinstance(key, str) else repr(key)
        except ValueError:  # e.g. an int too long to print
            text = f"<{type(key).__name__}>"
        out.append(text[:80])
    return sorted(out)[:n]


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
            raise ValueError(f"state dict key {key!r} not in checkpoint keys {_preview(obj)}")
        chosen, used = obj[key], key
    elif obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        chosen, used = obj, None
    else:
        used = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if used is None:
            raise ValueError(
                f"no state dict in checkpoint: top-level keys are {_preview(obj)}; "
                f"expected tensors or one of {STATE_DICT_KEYS}"
            )
        chosen = obj[used]
    if not isinstance(chosen, Mapping) or not chosen:
        raise ValueError(f"checkpoint entry {used!r} is not a non-empty dict of tensors")
    bad = [k for k, v in chosen.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"state dict {used!r} has non-tensor entries: {_preview(bad, 5)}")
    state = {str(k): v for k, v in chosen.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, used


def load_torch_state_dict(
    path: str | os.PathLike, key: str | None = None, *, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Read the weights of a `torch.save` checkpoint as numpy arrays, without PyTorch.

    Args:
      path: the `.bin` / `.pth` file.
      key: see `select_state_dict`; the key used is logged at INFO level.
      max_bytes: see `read_torch_zip`.

    Returns:
      dict of parameter name -> read-only numpy array, in file order.
    """
    state, used = select_state_dict(read_torch_zip(path, max_bytes=max_bytes), key)
    if used is not None:
        logger.info("%s: using the state dict under key %r", path, used)
    return state
