"""Reading weight files: a single safetensors or torch file, or a sharded safetensors index.

The index is downloaded data like the weights: its shard names may not lead outside the
checkpoint folder, and it must agree with the shards. `check_float_weights` refuses integer or
bool tensors before they would be cast silently into float parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from natjax.convert import torch_zip
from natjax.models.json_file import read_json_object

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _read_index(path: Path) -> dict[str, Any]:
    """A sharded index's JSON object; one ValueError naming the file for anything malformed."""
    try:
        return read_json_object(path)  # bounded size and nesting
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def read_weights(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read a weights file into numpy arrays (safetensors, or torch zip via the safe reader).

    Args:
      path: `.safetensors`, `.bin`, `.pth` or `.pt` file (the format is detected from the
        content, the suffix only decides the error message).
      max_bytes: cap on the tensor bytes read (default $NATJAX_MAX_CHECKPOINT_BYTES, else
        16 GiB; see `torch_zip.read_torch_zip`).

    Returns:
      name -> array; for torch checkpoints wrapping the weights (e.g. `{"model": ...}`) the
      wrapped state dict, the key used is logged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    limit = torch_zip.resolve_max_bytes(max_bytes)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or path.suffix in (".bin", ".pth", ".pt") or not head:
        return torch_zip.load_torch_state_dict(path, max_bytes=limit)
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"{path}: {size} bytes, more than max_bytes={limit}; raise the limit with "
            f"max_bytes= or ${torch_zip.MAX_BYTES_ENV} if the file is trusted"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors or torch.save file ({err}); supported weight "
            f"files: {', '.join(WEIGHT_SUFFIXES)}"
        ) from None


def _shard_path(index: Path, name: object) -> Path:
    """The file a sharded index's `weight_map` names, refused unless it is inside the folder.

    The index is downloaded data: a name like `../../.ssh/id_rsa` or `/etc/passwd` must not make
    us read (and report on) files elsewhere. Symlinks may point into the Hugging Face hub cache's
    `blobs/` folder (`<repo>/snapshots/<revision>/<shard> -> ../../blobs/<hash>`), nowhere else.
    """
    folder = index.parent
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if (
        pure is None
        or not name
        or "\0" in name
        or "\\" in name
        or pure.is_absolute()
        or PureWindowsPath(name).drive
        or ".." in pure.parts
    ):
        raise ValueError(
            f"{index}: weight_map names shard {name!r:.200}; expected a file name inside "
            f"{folder} (no absolute paths, no '..')"
        )
    path = folder / pure
    real, real_folder = path.resolve(), folder.resolve()
    allowed = [real_folder]
    if real_folder.parent.name == "snapshots":  # Hugging Face hub cache layout
        allowed.append(real_folder.parent.parent / "blobs")
    if not any(real.is_relative_to(root) for root in allowed):
        raise ValueError(
            f"{index}: shard {name!r} is a link to {real}, outside the checkpoint folder "
            f"{folder}: refusing to read it"
        )
    return path


def read_sharded(index: Path, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The weights of a sharded safetensors checkpoint.

    Args:
      index: its `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`).
      max_bytes: cap on the shards' total size (see `read_weights`).

    Returns:
      name -> array, from every shard.

    Raises:
      FileNotFoundError: a shard is missing.
      ValueError: the index is malformed, names files outside its folder, or disagrees with
        the shards.
    """
    weight_map = _read_index(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
    odd = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if odd:
        raise ValueError(f"{index}: weight_map entries {odd[:5]} do not name a shard file")
    shards = {name: _shard_path(index, name) for name in set(weight_map.values())}
    for name, path in shards.items():
        if not path.is_file():
            raise FileNotFoundError(f"{index}: shard {name!r} not found at {path}")
    limit = torch_zip.resolve_max_bytes(max_bytes)
    total = sum(path.stat().st_size for path in shards.values())
    if total > limit:
        raise ValueError(
            f"{index}: its {len(shards)} shards hold {total} bytes, more than max_bytes={limit}; "
            f"raise the limit with ${torch_zip.MAX_BYTES_ENV} if the files are trusted"
        )
    state: dict[str, np.ndarray] = {}
    for name in sorted(shards):
        part = read_weights(shards[name], max_bytes=limit)
        absent = [k for k, v in weight_map.items() if v == name and k not in part]
        if absent:
            raise ValueError(
                f"{index}: weight_map places {absent[:5]} ({len(absent)} in all) in {name!r}, "
                "which does not hold them: the checkpoint is incomplete or corrupt"
            )
        twice = sorted(part.keys() & state.keys())
        if twice:
            raise ValueError(f"{index}: tensors {twice[:5]} appear in more than one shard")
        state.update(part)
    return state


def _dtype_family(dtype) -> str:
    for family in (jnp.floating, jnp.complexfloating, jnp.integer, jnp.bool_):
        if jnp.issubdtype(dtype, family):
            return family.__name__
    return str(dtype)


def check_float_weights(
    state: Mapping[str, np.ndarray], what: str, reference: Mapping[str, Any] | None = None
) -> None:
    """Refuse weights whose dtype family differs from the model's (every NAT parameter is float).

    An int64 or bool array would otherwise be cast silently into a float parameter.

    Args:
      state: name -> array, as loaded.
      what: what is being loaded (for the message).
      reference: name -> the model's value (anything with `.dtype`); None: all must be float.

    Raises:
      ValueError: listing the first offending names with their dtypes.
    """
    bad = []
    for name, value in state.items():
        want = "floating" if reference is None else _dtype_family(reference[name].dtype)
        got = _dtype_family(value.dtype)
        if got != want:
            bad.append(f"{name} ({value.dtype}, model wants {want})")
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} weights have the wrong dtype: {bad[:5]}; NAT parameters are "
            "floating point (float32/float16/bfloat16/float64): is this a NAT checkpoint?"
        )
