"""Dense reference neighborhood attention: the executable specification.

Attention over *all* tokens with a boolean neighborhood mask and a dense bias built from the
per-axis window rules in `spec.axis_windows`. It materialises `[batch, heads, N, N]` logits, so it
is only for tests and tiny inputs; gradients come from plain JAX autodiff.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from natjax.ops.na.spec import NAParams, axis_windows


def _axis_dense(length: int, kernel_size: int, dilation: int, causal: bool, stride: int = 1):
    """Returns `[L, L]` (allowed, rpb_index) matrices for one axis."""
    win = axis_windows(length, kernel_size, dilation, causal, stride)
    allowed = np.zeros((length, length), bool)
    rel = np.zeros((length, length), np.int32)
    rows = np.repeat(np.arange(length)[:, None], kernel_size, axis=1)
    allowed[rows[win.valid], win.key[win.valid]] = True
    rel[rows[win.valid], win.key[win.valid]] = win.rpb_index[win.valid]
    return allowed, rel


def dense_mask_and_bias_index(spatial: tuple[int, ...], params: NAParams):
    """Builds the dense `[N, N]` mask and bias index.

    Returns:
      (mask `[N, N]` bool, `[N, N]` int index into `rpb.reshape(heads, -1)`).
    """
    ndim = len(spatial)
    per_axis = [
        _axis_dense(n, k, d, c, s)
        for n, k, d, c, s in zip(
            spatial,
            params.kernel_size,
            params.dilation,
            params.is_causal,
            params.stride,
            strict=True,
        )  # fmt: skip
    ]
    mask = np.ones((1,) * (2 * ndim), bool)
    index = []
    for ax, (allowed, rel) in enumerate(per_axis):
        shape = [1] * (2 * ndim)
        shape[ax] = spatial[ax]
        shape[ndim + ax] = spatial[ax]
        mask = mask & allowed.reshape(shape)
        index.append(rel.reshape(shape))
    n = math.prod(spatial)
    flat = np.ravel_multi_index(np.broadcast_arrays(*index), params.rpb_shape_tail)
    return np.broadcast_to(mask, spatial + spatial).reshape(n, n), flat.reshape(n, n)


def na_reference(q, k, v, rpb, params: NAParams):
    """Dense masked attention with NATTEN semantics.

    Args:
      q: `[batch, *spatial, heads, head_dim]`.
      k: `[batch, *spatial, kv_heads, head_dim]`, `heads % kv_heads == 0` (GQA/MQA: query head
        `h` reads kv head `h // (heads // kv_heads)`).
      v: `[batch, *spatial, kv_heads, value_dim]`.
      rpb: `[heads, *(2 * kernel_size - 1)]` or None.
      params: validated window arguments.

    Returns:
      (out `[batch, *spatial, heads, value_dim]` in q's dtype,
       lse `[batch, *spatial, heads]` float32, or float64 for float64 inputs).
    """
    batch, *spatial, heads, head_dim = q.shape
    kv_heads, value_dim = k.shape[-2], v.shape[-1]
    group = heads // kv_heads
    spatial = tuple(spatial)
    n = math.prod(spatial)
    compute = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    mask, index = dense_mask_and_bias_index(spatial, params)
    # Query heads split as [kv_heads, group]: each kv head is read by its group, never repeated.
    if group == 1:  # no reshape of the (possibly sharded) heads axis: explicit meshes refuse it
        qf = q.reshape(batch, n, heads, head_dim)[:, :, :, None].astype(compute)
    else:
        qf = q.reshape(batch, n, kv_heads, group, head_dim).astype(compute)
    kf = k.reshape(batch, n, kv_heads, head_dim).astype(compute)
    vf = v.reshape(batch, n, kv_heads, value_dim).astype(compute)
    logits = jnp.einsum("bqcjd,bkcd->bcjqk", qf * params.scale, kf)
    if rpb is not None:
        # Flat index into [heads, prod(2K-1)]: no reshape of a (possibly head-sharded) [h, N, N].
        bias = rpb.astype(compute).reshape(heads, -1)[:, index]
        logits = logits + bias.reshape(kv_heads, group, n, n)[None]
    logits = jnp.where(mask[None, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, c, j, q]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bcjqk,bkcd->bqcjd", probs, vf)
    out = out[:, :, :, 0] if group == 1 else out.reshape(batch, n, heads, value_dim)
    out = out.reshape(batch, *spatial, heads, value_dim).astype(q.dtype)
    lse = jnp.moveaxis(lse.reshape(batch, heads, n), 1, -1).reshape(batch, *spatial, heads)
    return out, lse
