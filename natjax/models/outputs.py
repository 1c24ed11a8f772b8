"""Model outputs: frozen dataclasses (JAX pytrees) with Hugging Face field names.

They behave like transformers' `ModelOutput`: attribute access (`out.logits`), key access
(`out["logits"]`), integer indexing and `to_tuple()` over the fields that are not None (so
`out[0]` is the logits of a classifier), `keys()`, `values()`, `items()`.

Differences from Hugging Face, all deliberate: `hidden_states` are channels-last `[B, h, w, C]`
exactly as HF returns them, `reshaped_hidden_states` are `[B, C, h, w]` like HF; attention maps
are not returned (the fused op never materialises them); the classifier output also carries the
base model's `last_hidden_state` and `pooler_output`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct


class ModelOutputMixin:
    """transformers `ModelOutput` access on a dataclass: fields that are None are skipped."""

    def keys(self) -> tuple[str, ...]:
        """Names of the fields that are not None, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def values(self) -> tuple[Any, ...]:
        """Values of the fields that are not None."""
        return tuple(getattr(self, k) for k in self.keys())

    def items(self) -> tuple[tuple[str, Any], ...]:
        """(name, value) of the fields that are not None."""
        return tuple((k, getattr(self, k)) for k in self.keys())

    def to_tuple(self) -> tuple[Any, ...]:
        """The values that are not None, as transformers' `ModelOutput.to_tuple()`."""
        return self.values()

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no (non-None) field {key!r}; "
                               f"fields: {self.keys()}")  # fmt: skip
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self):
        # As transformers: iterating yields the keys (like a dict).
        return iter(self.keys())


@struct.dataclass
class NatModelOutput(ModelOutputMixin):
    """Output of `NatModel`.

    Attributes:
      last_hidden_state: final normalised tokens `[B, h, w, C]`.
      pooler_output: their mean over `h, w`, `[B, C]`.
      hidden_states: with `output_hidden_states`, the embedding output then each stage's output
        after its downsampler, `[B, h, w, C]` each; else None.
      reshaped_hidden_states: the same as `[B, C, h, w]`; else None.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    reshaped_hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class NatImageClassifierOutput(ModelOutputMixin):
    """Output of `NatForImageClassification`.

    Attributes:
      logits: `[B, num_labels]` (the pooled features when `num_labels == 0`).
      last_hidden_state, pooler_output, hidden_states, reshaped_hidden_states: as in
        `NatModelOutput`.
    """

    logits: jax.Array
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    reshaped_hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class BackboneOutput(ModelOutputMixin):
    """Output of `NatBackbone`.

    Attributes:
      feature_maps: one `[B, C, h, w]` map per `config.out_features`: that stage's output before
        downsampling through its own LayerNorm (`hidden_states_norms.<stage>`).
      hidden_states: with `output_hidden_states`, the embedding output then every stage's output
        before downsampling, `[B, h, w, C]`; else None.
    """

    feature_maps: tuple[jax.Array, ...]
    hidden_states: tuple[jax.Array, ...] | None = None
