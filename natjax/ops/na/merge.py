"""Exact combination of partial attentions by their log-sum-exp (`natjax.merge_attentions`).

Attention over the union of disjoint key sets is one softmax; computed per key set it gives
partial outputs `out_i` (each normalised over its own keys) and log-sum-exps `lse_i`. With
`lse = log(sum_i exp(lse_i))`, the joint output is `sum_i exp(lse_i - lse) * out_i` exactly, and
`lse` is the joint log-sum-exp. This is how the public API adds the additional key/value tokens
to a neighborhood attention (as NATTEN 0.21's `neighborhood_attention_generic` does), and the
building block for users who compute further parts (cross-attention, cached tokens) themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _stat_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def merge_attentions(outs: Sequence[jax.Array], lses: Sequence[jax.Array]):
    """Combines partial attentions over disjoint key sets into the attention over their union.

    Args:
      outs: partial outputs, each `[..., heads, value_dim]`, all of one shape and dtype.
      lses: their log-sum-exps (natural log), each `[..., heads]` (`outs[i].shape[:-1]`); a
        part that attends no key has `-inf`.

    Returns:
      (out in the dtype of `outs`, lse float32, float64 for float64 parts): exact and
      differentiable in every part's `out` and `lse`.

    Raises:
      ValueError: for empty or unequal-length lists, or mismatched shapes/dtypes.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(
            "merge_attentions: `outs` and `lses` must be non-empty lists of equal length, got "
            f"{len(outs)} outputs and {len(lses)} log-sum-exps."
        )
    shape, dtype = tuple(outs[0].shape), outs[0].dtype
    for i, (o, s) in enumerate(zip(outs, lses, strict=True)):
        if tuple(o.shape) != shape or o.dtype != dtype:
            raise ValueError(
                f"merge_attentions: every output must have shape {shape} and dtype {dtype} "
                f"(those of outs[0]), got outs[{i}] with {tuple(o.shape)} and {o.dtype}."
            )
        if tuple(s.shape) != shape[:-1]:
            raise ValueError(
                f"merge_attentions: lses[{i}] must have shape {shape[:-1]} (outs[{i}].shape[:-1]), "
                f"got {tuple(s.shape)}."
            )
    acc = _stat_dtype(jnp.result_type(*[s.dtype for s in lses], dtype))
    stacked = jnp.stack([s.astype(acc) for s in lses])  # [P, ..., heads]
    # A finite shift keeps parts without keys (-inf) from producing inf - inf = NaN.
    m = jax.lax.stop_gradient(jnp.max(stacked, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    weights = jnp.exp(stacked - m)
    total = jnp.sum(weights, axis=0)
    lse = m + jnp.log(total)
    safe = jnp.where(total > 0, total, 1.0)
    out = sum(w[..., None] * o.astype(acc) for w, o in zip(weights, outs, strict=True))
    out = out / safe[..., None]
    return out.astype(dtype), lse
