"""Model outputs: frozen dataclasses (JAX pytrees) with Hugging Face field names.

Differences from Hugging Face, all deliberate: `hidden_states` are channels-last `[B, h, w, C]`
exactly as HF returns them, `reshaped_hidden_states` are `[B, C, h, w]` like HF; attention maps
are not returned (the fused op never materialises them); the classifier output also carries the
base model's `last_hidden_state` and `pooler_output`.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class NatModelOutput:
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
class NatImageClassifierOutput:
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
class BackboneOutput:
    """Output of `NatBackbone`.

    Attributes:
      feature_maps: one `[B, C, h, w]` map per `config.out_features`: that stage's output before
        downsampling through its own LayerNorm (`hidden_states_norms.<stage>`).
      hidden_states: with `output_hidden_states`, the embedding output then every stage's output
        before downsampling, `[B, h, w, C]`; else None.
    """

    feature_maps: tuple[jax.Array, ...]
    hidden_states: tuple[jax.Array, ...] | None = None
