"""NAT / DiNAT models and their pretrained weights from Flax Linen.

The models are the NNX classes of `natjax.models` behind Flax's `nnx.bridge.ToLinen`, so Linen
code gets one implementation (the one tested against Hugging Face) instead of a second copy.
Their variables are `{"params": <the NNX parameter tree as plain dicts>}`: stage and layer
indices are int keys, names are the NNX attribute names (`nat/encoder/levels/0/layers/0/...`).

    module, variables = natjax.linen.from_pretrained("path/to/hf-folder")
    logits = jax.jit(module.apply)(variables, images).logits

`module.apply(variables, images, output_hidden_states=False, deterministic=True)`; with
`deterministic=False` pass `rngs={"dropout": key}`. The bridge rebuilds the NNX module inside
every `apply` (traced once under `jax.jit`, so jit the apply).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from natjax.convert.checkpoint import model_architecture
from natjax.convert.loading import from_pretrained as _nnx_from_pretrained
from natjax.models import MODEL_CLASSES, NatConfig


class NatLinen(nnx.bridge.ToLinen):
    """A natjax NNX model as a Linen module (`nnx_class`, `args=(config,)`, `kwargs`).

    Build it with `NatForImageClassification(config)`, `NatModel(config)`, `NatBackbone(config)`
    or `from_pretrained(...)` rather than directly.
    """

    def __call__(
        self,
        images: jax.Array,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        *,
        nnx_method: Any = None,
    ):
        """Runs the model; see `natjax.NatModel.__call__` (training mode draws "dropout")."""
        if nnx_method is not None:  # part of the Linen bridge's signature; not supported here
            raise ValueError(
                f"`nnx_method` is not supported by natjax's Linen models (only the forward is "
                f"exposed), got {nnx_method!r}."
            )
        key = None
        if not deterministic and not self.is_initializing():
            key = self.make_rng("dropout")
        return super().__call__(images, output_hidden_states, deterministic, key)


def _module(kind: str, config: NatConfig, **model_kwargs) -> NatLinen:
    if not isinstance(config, NatConfig):
        raise ValueError(f"`config` must be a NatConfig, got {type(config).__name__}.")
    return NatLinen(MODEL_CLASSES[kind], args=(config,), kwargs=model_kwargs)


def NatModel(config: NatConfig, **model_kwargs) -> NatLinen:  # noqa: N802 (a constructor)
    """Linen `NatModel`; `model_kwargs` as the NNX class (`dtype`, `attention_implementation`,
    `remat`, ...)."""
    return _module("model", config, **model_kwargs)


def NatForImageClassification(config: NatConfig, **model_kwargs) -> NatLinen:  # noqa: N802
    """Linen `NatForImageClassification`; `model_kwargs` as the NNX class."""
    return _module("classification", config, **model_kwargs)


def NatBackbone(config: NatConfig, **model_kwargs) -> NatLinen:  # noqa: N802
    """Linen `NatBackbone`; `model_kwargs` as the NNX class."""
    return _module("backbone", config, **model_kwargs)


def variables_of(model: nnx.Module) -> dict[str, Any]:
    """The Linen variables `{"params": ...}` of an NNX natjax model (plain nested dicts)."""
    return {"params": nnx.state(model, nnx.Param).to_pure_dict()}


def to_linen(model: nnx.Module, **model_kwargs) -> tuple[NatLinen, dict[str, Any]]:
    """A Linen module of the same architecture as `model` and its variables.

    Args:
      model: a natjax `NatModel`, `NatForImageClassification` or `NatBackbone`.
      **model_kwargs: constructor keywords for the Linen side (`dtype`,
        `attention_implementation`, ...).

    Returns:
      `(module, variables)`; `module.apply(variables, images)` equals `model(images)`.
    """
    kind = model_architecture(model)
    return _module(kind, model.config, **model_kwargs), variables_of(model)


def from_pretrained(source: str | os.PathLike, *args, **kwargs) -> tuple[NatLinen, dict[str, Any]]:
    """`natjax.from_pretrained` for Linen: the module and its pretrained variables.

    Args:
      source, *args, **kwargs: as `natjax.from_pretrained` (folder, weights file or hub id;
        `config=`, `architecture=`, `num_labels=`, ...). Constructor keywords (`dtype`,
        `attention_implementation`, `remat`) are given to the Linen module too.

    Returns:
      `(module, variables)`.
    """
    model = _nnx_from_pretrained(source, *args, **kwargs)
    ctor = {k: kwargs[k] for k in ("dtype", "param_dtype", "attention_implementation", "remat")
            if k in kwargs}  # fmt: skip
    return to_linen(model, **ctor)
