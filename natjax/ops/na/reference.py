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

from natjax.ops.na.partition import explicit_batch_head_map
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
    spatial = tuple(spatial)
    n = math.prod(spatial)
    # On an explicit-axes mesh, splitting a head-sharded axis into [kv_heads, group] is refused:
    # the dense computation then runs per (batch, head) shard (partition.py, as the kernels do).
    rows = lambda x: x.reshape(x.shape[0], n, *x.shape[-2:])  # noqa: E731
    args = [rows(q), rows(k), rows(v)] + ([] if rpb is None else [rpb.reshape(heads, -1)])
    kinds = ("x", "kv", "kvv", "rpb")[: len(args)]

    def dense(q, k, v, rpb=None):
        return _dense_rows(q, k, v, rpb, spatial, params)

    out, lse = explicit_batch_head_map(dense, kinds, ("xv", "row"), *args)
    out = out.reshape(batch, *spatial, heads, v.shape[-1])
    return out, lse.reshape(batch, *spatial, heads)


def _dense_rows(q, k, v, rpb, spatial: tuple[int, ...], params: NAParams):
    """`na_reference` on rows: q `[B, N, h, D]`, k/v `[B, N, hk, D|Dv]`, rpb `[h, R]` or None;
    returns out `[B, N, h, Dv]` and lse `[B, N, h]`."""
    batch, n, heads, head_dim = q.shape
    kv_heads, value_dim = k.shape[-2], v.shape[-1]
    group = heads // kv_heads
    compute = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    mask, index = dense_mask_and_bias_index(spatial, params)
    # Query heads split as [kv_heads, group]: each kv head is read by its group, never repeated.
    if group == 1:  # a plain head axis, no split
        qf = q.reshape(batch, n, heads, head_dim)[:, :, :, None].astype(compute)
    else:
        qf = q.reshape(batch, n, kv_heads, group, head_dim).astype(compute)
    kf = k.reshape(batch, n, kv_heads, head_dim).astype(compute)
    vf = v.reshape(batch, n, kv_heads, value_dim).astype(compute)
    logits = jnp.einsum("bqcjd,bkcd->bcjqk", qf * params.scale, kf)
    if rpb is not None:
        bias = rpb.astype(compute)[:, index]  # flat index into [heads, prod(2K-1)]
        logits = logits + bias.reshape(kv_heads, group, n, n)[None]
    logits = jnp.where(mask[None, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, c, j, q]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bcjqk,bkcd->bqcjd", probs, vf)
    out = out[:, :, :, 0] if group == 1 else out.reshape(batch, n, heads, value_dim)
    return out.astype(q.dtype), jnp.moveaxis(lse.reshape(batch, heads, n), 1, -1)
