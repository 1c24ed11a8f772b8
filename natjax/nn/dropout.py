"""Key-driven dropout and stochastic depth shared by the NA modules and the NAT/DiNAT layers.

No module holds RNG state: a PRNG key is passed at call time and `None` means deterministic, so
a model built with `nnx.eval_shape` holds nothing but parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout.

    Args:
      x: any array.
      rate: probability of zeroing an element.
      key: PRNG key; None (deterministic) or `rate == 0` returns `x` unchanged.

    Returns:
      `x` with elements zeroed with probability `rate`, the rest scaled by `1 / (1 - rate)`.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: drops the whole branch per sample (HF `drop_path`, timm semantics).

    Args:
      x: `[batch, ...]`.
      rate: probability of dropping a sample's branch.
      key: PRNG key; None (deterministic) or `rate == 0` returns `x` unchanged.

    Returns:
      `x` with whole samples zeroed, the rest scaled by `1 / (1 - rate)`.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
