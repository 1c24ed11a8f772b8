"""Load NAT/DiNAT weights from any supported checkpoint; save natjax and Hugging Face checkpoints.

Sources `from_pretrained` understands:

* a Hugging Face folder: `config.json` + `model.safetensors` (or sharded, with
  `model.safetensors.index.json`) or `pytorch_model.bin`;
* a natjax checkpoint folder written by `save_pretrained` (`config.json` with
  `"format": "natjax"` + `natjax_model.safetensors`);
* a single weights file (`.safetensors`, `.bin`, `.pth`, `.pt`) plus `config=`: in Hugging Face,
  original SHI-Labs (`classification/nat.py`, detected by its keys) or natjax layout.

`.bin`/`.pth` files are read by `torch_zip`'s restricted unpickler: PyTorch is not needed and no
code from the file runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from natjax.convert import torch_zip
from natjax.convert.original import check_state_dict, hf_to_original, is_original_layout
from natjax.convert.original import original_to_hf as _original_to_hf

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
NATJAX_WEIGHTS_NAME = "natjax_model.safetensors"
HF_SAFETENSORS_NAME = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH_NAME = "pytorch_model.bin"
ORIGINAL_NAME = "original.pth"
FORMAT_MARKER = "natjax"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# safetensors header metadata of natjax checkpoints.
_META = {"format": "np", "producer": "natjax"}

# Architecture name -> natjax.models class name.
ARCHITECTURES = {
    "classification": "NatForImageClassification",
    "backbone": "NatBackbone",
    "model": "NatModel",
}
EXPORT_FORMATS = ("hf", "original")


# ------------------------------------------------------------------------------------- configs
def _models():
    # Imported lazily: the model package is heavy and the reader/CLI parsing should not need it.
    import natjax.models as models

    return models


def _architecture_from_hf(config_dict: Mapping[str, Any]) -> str | None:
    """The architecture a HF config.json's `architectures` names, None when it names none."""
    from natjax.convert.hf import kind_from_hf_config

    return kind_from_hf_config(config_dict) if config_dict.get("architectures") else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_from_dict(data: Mapping[str, Any], where: str):
    """(NatConfig, architecture or None) from a natjax or Hugging Face config dict."""
    models = _models()
    if data.get("format") == FORMAT_MARKER:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{where}: natjax checkpoint format_version={version!r}; this natjax reads "
                f"version {FORMAT_VERSION}"
            )
        arch = data.get("architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"{where}: architecture={arch!r}; expected one of {list(ARCHITECTURES)}"
            )
        try:
            return models.NatConfig(**data["config"]), arch
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: invalid natjax config ({err})") from None
    return models.NatConfig.from_hf_config(dict(data)), _architecture_from_hf(data)


def resolve_config(config: Any):
    """Turn `config` into `(NatConfig, architecture or None)`.

    Args:
      config: a `NatConfig`, a preset name (see `natjax.models`), or the path of a
        `config.json` (natjax or Hugging Face) or of a folder holding one.

    Returns:
      The config and the architecture the config file names ("classification", "backbone",
      "model"), or None when it names none.

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: an unknown preset or an invalid config.
    """
    models = _models()
    if isinstance(config, models.NatConfig):
        return config, None
    if not isinstance(config, str | os.PathLike):
        raise ValueError(
            f"config={config!r}; expected a NatConfig, a preset name or a config.json path"
        )
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"config folder {config} has no {CONFIG_NAME}")
    if path.is_file():
        return _config_from_dict(_read_json(path), str(path))
    if isinstance(config, os.PathLike) or path.suffix == ".json" or os.sep in str(config):
        raise FileNotFoundError(f"config file not found: {config}")
    return models.get_config(str(config)), None


def config_to_dict(config) -> dict[str, Any]:
    """JSON-ready dict of a NatConfig (tuples become lists)."""

    def plain(value):
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


# ------------------------------------------------------------------------------------ weights
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


def _read_sharded(index: Path, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The weights of a sharded safetensors checkpoint (`model.safetensors.index.json`)."""
    weight_map = _read_json(index).get("weight_map")
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


def _find_weights(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """Weights of a checkpoint folder and the file they came from."""
    for name in (NATJAX_WEIGHTS_NAME, HF_SAFETENSORS_NAME, HF_TORCH_NAME, ORIGINAL_NAME):
        if (folder / name).is_file():
            return read_weights(folder / name), name
    if (folder / HF_SAFETENSORS_INDEX).is_file():
        return _read_sharded(folder / HF_SAFETENSORS_INDEX), HF_SAFETENSORS_INDEX
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise FileNotFoundError(
        f"{folder}: no weights file; expected one of {NATJAX_WEIGHTS_NAME}, {HF_SAFETENSORS_NAME}, "
        f"{HF_SAFETENSORS_INDEX}, {HF_TORCH_NAME}, {ORIGINAL_NAME} (folder holds {found})"
    )


def detect_layout(keys) -> str:
    """ "natjax" ('/'-joined nnx paths), "original" (SHI-Labs) or "hf" (Hugging Face)."""
    keys = list(keys)
    if keys and all("/" in k for k in keys):
        return "natjax"
    if is_original_layout(keys):
        return "original"
    return "hf"


def _architecture_from_keys(keys, layout: str) -> str:
    if layout == "original":
        return "classification"
    # First path component: "classifier.weight" (HF) and "classifier/kernel" (natjax) alike.
    roots = {re.split(r"[./]", k, maxsplit=1)[0] for k in keys}
    if "hidden_states_norms" in roots:
        return "backbone"
    if "classifier" in roots:
        return "classification"
    return "model"


# --------------------------------------------------------------------------------- nnx models
def _persistent_state(model: nnx.Module):
    # RNG streams (dropout keys) are runtime state, not weights.
    return nnx.state(model, nnx.Not(nnx.RngState))


def nnx_flat_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as `'/'.join(path) -> numpy array` (the natjax checkpoint layout)."""
    return {
        "/".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(_persistent_state(model))
    }


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


def load_nnx_flat_state(model: nnx.Module, state: Mapping[str, np.ndarray], what: str) -> None:
    """Write `'/'`-joined weights (from `nnx_flat_state`) into `model`, checking keys, shapes and
    dtypes (an integer or bool file never lands in a float parameter)."""
    flat = nnx.to_flat_state(_persistent_state(model))
    reference = {"/".join(map(str, p)): v.get_value() for p, v in flat}
    check_state_dict(state, reference, what)
    check_float_weights(state, what, reference)
    updated = []
    for path, var in flat:
        value = state["/".join(map(str, path))]
        updated.append((path, var.replace(jnp.asarray(value, dtype=var.get_value().dtype))))
    nnx.update(model, nnx.from_flat_state(updated))


def build_model(
    config, architecture: str = "classification", *, abstract: bool = False, **model_kwargs
) -> nnx.Module:
    """A natjax model of `architecture` for `config`.

    Args:
      config: the `NatConfig`.
      architecture: "classification", "backbone" or "model".
      abstract: build it with `nnx.eval_shape` (parameters are shapes only, nothing is
        initialised; they must all be filled before use); ignored when `rngs` is given.
      **model_kwargs: constructor keywords (`rngs` defaults to `nnx.Rngs(0)`).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    cls = getattr(_models(), ARCHITECTURES[architecture])
    if abstract and "rngs" not in model_kwargs:
        # The Rngs must be created inside the traced function (nnx trace-level rule).
        return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **model_kwargs))
    model_kwargs.setdefault("rngs", nnx.Rngs(0))
    return cls(config, **model_kwargs)


def _check_filled(model: nnx.Module, what: str) -> None:
    abstract = [
        "/".join(map(str, path))
        for path, var in nnx.to_flat_state(nnx.state(model))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"{what}: weights left unset: {abstract[:5]} ({len(abstract)} in all)")


def model_architecture(model: nnx.Module) -> str:
    """ "classification", "backbone" or "model" for a natjax model instance."""
    from natjax.convert.hf import model_kind

    return model_kind(model)


def _hf_reference_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """HF key -> shape the model needs, without materialising (works on abstract models)."""
    from natjax.convert.hf import key_table, param_variables

    params = param_variables(model)
    shapes = {}
    for entry in key_table(model):
        # Zero-stride stand-ins: the hooks only transpose/stack, so shapes come out right.
        views = [
            np.broadcast_to(np.zeros((), np.float32), params[p].get_value().shape)
            for p in entry.nnx_paths
        ]
        shapes[entry.hf_key] = tuple(entry.hook.to_hf(*views).shape)
    return shapes


def _load_hf_state(model: nnx.Module, state: Mapping[str, np.ndarray], what: str) -> None:
    from natjax.convert.hf import hf_to_nnx, strip_base_prefix

    # A classification checkpoint's "nat."/"dinat."-prefixed body also loads as NatModel/Backbone.
    state = strip_base_prefix(model, state)
    check_state_dict(state, _hf_reference_shapes(model), what)
    check_float_weights(state, what)  # every Hugging Face NAT/DiNAT tensor is a float parameter
    hf_to_nnx(model, state)


# ---------------------------------------------------------------------------------- public API
def from_pretrained(
    path: str | os.PathLike,
    config: Any = None,
    *,
    architecture: str | None = None,
    state_dict_key: str | None = None,
    **model_kwargs,
) -> nnx.Module:
    """Load a NAT/DiNAT model from a checkpoint folder or weights file.

    Args:
      path: a Hugging Face folder, a natjax checkpoint folder, or a single weights file
        (`.safetensors`, `.bin`, `.pth`, `.pt`; HF, original SHI-Labs or natjax key layout).
      config: overrides the folder's config.json; required for a single file. A `NatConfig`,
        a preset name (`natjax.models`) or a config.json path.
      architecture: "classification", "backbone" or "model"; default: what config.json's
        `architectures` names, else inferred from the weights (classifier / backbone norms).
      state_dict_key: for torch checkpoints nesting their weights (e.g. "model", "state_dict").
      **model_kwargs: passed to the model constructor (e.g. `rngs`).

    Returns:
      The nnx model holding the checkpoint's weights.

    Raises:
      FileNotFoundError: missing path, config or weights.
      ValueError: unsupported/corrupt files, unknown presets, or weights that do not fit the
        config (missing/unexpected keys and shape mismatches are listed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    file_arch = None
    if path.is_dir():
        if config is None:
            if not (path / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (pass config=...)")
            config = path / CONFIG_NAME
        if state_dict_key is None:
            state, source = _find_weights(path)
        else:
            state = _select(path, state_dict_key)
            source = "weights"
        source = str(path / source)
    else:
        if config is None:
            raise ValueError(
                f"{path} is a single weights file: pass config= (a NatConfig, a preset name or "
                "a config.json path)"
            )
        state = _select(path, state_dict_key) if state_dict_key else read_weights(path)
        source = str(path)
    config, file_arch = resolve_config(config)
    layout = detect_layout(state)
    architecture = architecture or file_arch or _architecture_from_keys(state, layout)
    logger.info("%s: %s layout, %s, %s", source, layout, architecture, config.describe())
    model = build_model(config, architecture, abstract=True, **model_kwargs)
    what = f"loading {source} ({layout} layout) into {type(model).__name__}"
    if layout == "natjax":
        load_nnx_flat_state(model, state, what)
    else:
        if layout == "original":
            if architecture != "classification":
                raise ValueError(
                    f"{source}: original SHI-Labs checkpoints hold classification models; "
                    f"architecture={architecture!r} is not supported for them"
                )
            state = _original_to_hf(state, config.model_type)
        _load_hf_state(model, state, what)
    _check_filled(model, what)
    return model


def _select(path: Path, key: str) -> dict[str, np.ndarray]:
    """The state dict under `key` of a torch checkpoint file (or of the one in folder `path`)."""
    if path.is_dir():
        files = [path / n for n in (HF_TORCH_NAME, ORIGINAL_NAME) if (path / n).is_file()]
        if not files:
            raise FileNotFoundError(
                f"{path}: state_dict_key={key!r} needs a torch checkpoint in the folder "
                f"({HF_TORCH_NAME} or {ORIGINAL_NAME}); it has none"
            )
        path = files[0]
    return torch_zip.select_state_dict(torch_zip.read_torch_zip(path), key)[0]


def save_pretrained(model: nnx.Module, directory: str | os.PathLike) -> Path:
    """Write a natjax checkpoint: `config.json` (natjax format) + `natjax_model.safetensors`.

    Args:
      model: a natjax NatModel / NatForImageClassification / NatBackbone.
      directory: created if needed; existing files of the same names are replaced.

    Returns:
      The directory.
    """
    directory = Path(directory)
    arch = model_architecture(model)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "config": config_to_dict(model.config),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    save_file(nnx_flat_state(model), str(directory / NATJAX_WEIGHTS_NAME), metadata=_META)
    return directory


def export_pretrained(model: nnx.Module, directory: str | os.PathLike, format: str = "hf") -> Path:
    """Export a model for other frameworks.

    Args:
      model: a natjax model.
      directory: destination folder (created if needed).
      format: "hf" writes `config.json` (loadable by `transformers`) + `model.safetensors` in the
        Hugging Face key layout; "original" writes `original.pth` (a `torch.save`-format zip in
        the SHI-Labs `classification/nat.py` key layout, classification models only) and the HF
        `config.json` describing the architecture.

    Returns:
      The directory.
    """
    from natjax.convert.hf import nnx_to_hf

    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r}; expected one of {EXPORT_FORMATS}")
    arch = model_architecture(model)
    if format == "original" and arch != "classification":
        raise ValueError(
            f"format='original' needs a classification model (the SHI-Labs layout has no "
            f"{arch}); use format='hf'"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_hf_config(arch)
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    state = {k: np.ascontiguousarray(v) for k, v in nnx_to_hf(model).items()}
    if format == "hf":
        # transformers refuses safetensors files without format metadata.
        save_file(state, str(directory / HF_SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch_zip.save_torch_state_dict(hf_to_original(state), directory / ORIGINAL_NAME)
    return directory
