"""Checkpoint formats: configs, weights files and layouts; save natjax and Hugging Face checkpoints.

`natjax.convert.loading.from_pretrained` reads them (plus hub ids); the formats are:

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

import natjax.models as models
from natjax.convert import torch_zip
from natjax.convert.hf import model_kind, nnx_to_hf
from natjax.convert.hf_config import from_hf_config, kind_from_hf_config, to_hf_config
from natjax.convert.original import check_state_dict, hf_to_original, is_original_layout
from natjax.convert.weights import check_float_weights
from natjax.models.json_file import read_json_object
from natjax.models.preprocessing import PREPROCESSOR_NAME, PreprocessConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
NATJAX_WEIGHTS_NAME = "natjax_model.safetensors"
HF_SAFETENSORS_NAME = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TORCH_NAME = "pytorch_model.bin"
ORIGINAL_NAME = "original.pth"
FORMAT_MARKER = "natjax"
FORMAT_VERSION = 1
# safetensors header metadata of natjax checkpoints.
_META = {"format": "np", "producer": "natjax"}

# Architecture names ("classification", "backbone", "model"): the model layer's class table.
ARCHITECTURES = models.MODEL_CLASSES
EXPORT_FORMATS = ("hf", "original")


# ------------------------------------------------------------------------------------- configs
def _architecture_from_hf(config_dict: Mapping[str, Any]) -> str | None:
    """The architecture a HF config.json's `architectures` names, None when it names none."""
    return kind_from_hf_config(config_dict) if config_dict.get("architectures") else None


def _read_json(path: Path) -> dict[str, Any]:
    """`read_json_object` (bounded size and nesting), its errors prefixed with the path."""
    try:
        return read_json_object(path)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _config_from_dict(data: Mapping[str, Any], where: str):
    """(NatConfig, architecture or None) from a natjax or Hugging Face config dict."""
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
                f"{where}: architecture={arch!r}; expected one of {sorted(ARCHITECTURES)}"
            )
        try:
            return models.NatConfig(**data["config"]), arch
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: invalid natjax config ({err})") from None
    return from_hf_config(data), _architecture_from_hf(data)


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
def detect_layout(keys) -> str:
    """ "natjax" ('/'-joined nnx paths), "original" (SHI-Labs) or "hf" (Hugging Face)."""
    keys = list(keys)
    if keys and all("/" in k for k in keys):
        return "natjax"
    if is_original_layout(keys):
        return "original"
    return "hf"


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


def instantiate_architecture(
    config, architecture: str = "classification", *, abstract: bool = False, **model_kwargs
) -> nnx.Module:
    """An instance of the natjax model class named by `architecture`, built for `config`.

    Args:
      config: the `NatConfig`.
      architecture: "classification", "backbone" or "model".
      abstract: build it with `nnx.eval_shape` (parameters are shapes only, nothing is
        initialised; they must all be filled before use); ignored when `rngs` is given.
      **model_kwargs: constructor keywords (`rngs` defaults to `nnx.Rngs(0)`).

    Returns:
      The (possibly abstract) `NatForImageClassification`, `NatBackbone` or `NatModel`.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[architecture]
    if abstract and "rngs" not in model_kwargs:
        # The Rngs must be created inside the traced function (nnx trace-level rule).
        return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **model_kwargs))
    model_kwargs.setdefault("rngs", nnx.Rngs(0))
    return cls(config, **model_kwargs)


def model_architecture(model: nnx.Module) -> str:
    """ "classification", "backbone" or "model" for a natjax model instance."""
    return model_kind(model)


# ---------------------------------------------------------------------------------- public API
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
    _save_preprocessing(model, directory)
    return directory


def _save_preprocessing(model: nnx.Module, directory: Path) -> None:
    """`preprocessor_config.json` from the model's eval transform (timm's default if unset), so
    the folder carries its input settings to `natjax predict` and transformers alike."""
    settings = getattr(model, "preprocessing", None) or PreprocessConfig.timm()
    text = json.dumps(settings.to_hf(), indent=2) + "\n"
    (directory / PREPROCESSOR_NAME).write_text(text, encoding="utf-8")


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
    hf_config = to_hf_config(model.config, arch)
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    state = {k: np.ascontiguousarray(v) for k, v in nnx_to_hf(model).items()}
    _save_preprocessing(model, directory)
    if format == "hf":
        # transformers refuses safetensors files without format metadata.
        save_file(state, str(directory / HF_SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch_zip.save_torch_state_dict(hf_to_original(state), directory / ORIGINAL_NAME)
    return directory
