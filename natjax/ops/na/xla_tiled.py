"""Neighborhood attention for accelerators in plain XLA: a blocked-halo computation.

The accelerator half of `implementation="xla"` (GPU, TPU; see `platform.py`), also selectable
everywhere as `implementation="xla_tiled"`. It uses the shared tiled formulation (`tiles.py`):

1. Queries are moved to the tile-major layout `[B, G, nT, Tq, h, D]` (dilation groups `G`, query
   tiles `nT` of `Tq` queries) by one pad + transpose; keys and values are gathered into each
   tile's key halo `[B, G, nT, Hk, h, D]` with one static-index gather (no per-query copies: a
   halo is shared by the `Tq` queries of its tile).
2. Scores are one batched matmul per call, `[B, G, nT, h, Tq, Hk]`, in the input dtype with
   float32 accumulation (`preferred_element_type`): no float32 copies of bf16 inputs, and the
   matmul's free dimensions are whole tiles and halos (lane-dense), not 7-wide kernel rows.
3. The mask and bias come from the per-class tables: `rpb` is gathered once per tile class
   (`[h, C, Tq, Hk]`, C = 9 at NAT stage 1), masked with `-inf`, and broadcast to tiles by class,
   a small batch-independent array XLA fuses into the score epilogue. Softmax is plain jnp
   (max, exp, sum) that XLA fuses into one or two kernels.
4. The backward (shared `vjp.py` scaffold, residuals `q, k, v, rpb, out, lse`) has the same shape:
   it recomputes the probabilities from `lse`, forms `dq` with the halo keys, and `dk`/`dv` in
   halo layout, scatter-added back to key positions (the transpose of the halo gather); the bias
   gradient is summed per tile class, then per bias bin (`segment_sum` over the class table).

Padded queries (partial tiles, shorter dilation groups) attend their whole halo, so nothing is
NaN; their rows are dropped by `Tiling.from_tiles`, and their zero cotangents contribute nothing.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from natjax.ops.na import tiles as tiles_mod
from natjax.ops.na.partition import explicit_batch_head_map, match_sharding
from natjax.ops.na.spec import NACall, NAParams
from natjax.ops.na.tiles import Tiling, tiling
from natjax.ops.na.vjp import na_custom_vjp

_TILE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)


@functools.lru_cache(maxsize=256)
def choose_tiles(
    spatial: tuple[int, ...], params: NAParams, head_dim: int, itemsize: int
) -> tuple[int, ...]:
    """Query-tile shape minimising the estimated HBM traffic per query.

    Per query, the forward writes and re-reads `Hk` float32 scores and `Hk` probabilities in the
    input dtype (about 12 bytes per score), and the halo gathers write and re-read
    `Hk / Tq` keys and values (`4 * head_dim * itemsize` bytes each). Small tiles waste scores
    (`Hk` grows like `prod(tile + K - 1)`), large tiles are cheap in halos; the optimum is
    near `tile ~ sqrt(head_dim * itemsize * K / 3)` per axis. Ties go to more queries per tile
    (bigger, more efficient matmuls).

    Args:
      spatial: spatial shape; params: window arguments; head_dim, itemsize: of the inputs.

    Returns:
      One tile size per axis (each at most the axis's dilation-group length).
    """
    rows = [-(-n // d) for n, d in zip(spatial, params.dilation, strict=True)]
    # With a stride, tiles of whole stride groups share windows: offer multiples of the stride.
    options = [
        sorted({min(c, r) for c in _TILE_CANDIDATES + tuple(s * c for c in _TILE_CANDIDATES[:5])})
        for r, s in zip(rows, params.stride, strict=True)
    ]
    axes = list(
        zip(spatial, params.kernel_size, params.dilation, params.is_causal, params.stride, rows,
            strict=True)
    )  # fmt: skip

    def axis_halo(t, n, k, d, c, s, r):
        return min(t + k - 1, r) if s == 1 else tiles_mod.axis_halo(n, k, d, c, t, s)

    best = None
    for tile in itertools.product(*options):
        halo = math.prod(axis_halo(t, *a) for t, a in zip(tile, axes, strict=True))
        tq = math.prod(tile)
        if tq < min(8, math.prod(rows)):
            continue  # matmuls with fewer than 8 rows waste the tensor cores / MXU
        cost = 12 * halo + 4 * head_dim * itemsize * halo / tq
        key = (cost, -tq)
        if best is None or key < best[0]:
            best = (key, tile)
    return best[1]


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


class _Tables:
    """Device-independent constants of one call: halo indices and per-class mask/bias index."""

    def __init__(self, t: Tiling):
        self.t = t
        # Padded queries attend their whole halo (finite softmax, no NaN); their rows are dropped.
        self.mask = t.mask | ~t.query_valid[:, :, None]  # [C, Tq, Hk]
        self.any_masked = not self.mask.all()

    def bias_mask(self, rpb, heads: int, acc):
        """Additive `[G, nT, h or 1, Tq, Hk]` bias (-inf where masked), or None if neither."""
        t = self.t
        if rpb is None and not self.any_masked:
            return None
        if rpb is None:
            per_class = jnp.where(self.mask, 0.0, -jnp.inf).astype(acc)[:, None]  # [C,1,Tq,Hk]
        else:
            flat = rpb.reshape(heads, -1).astype(acc)
            per_class = jnp.moveaxis(flat[:, t.rpb_index], 0, 1)  # [C, h, Tq, Hk]
            per_class = jnp.where(self.mask[:, None], per_class, -jnp.inf)
        return per_class[t.tile_class]  # [G, nT, h|1, Tq, Hk]


def _halo(x, t: Tiling):
    """`[B, *S, h, D]` -> `[B, G, nT, Hk, h, D]` (one static-index gather)."""
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    return x.reshape(b, -1, h, d)[:, t.halo_index]


@functools.lru_cache(maxsize=256)
def _key_slots(t: Tiling) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of the halo gather: for every key position, the halo slots that hold it.

    Returns `(tile [N, M], slot [N, M], weight [N, M])`: key `n` is halo row `slot[n, m]` of flat
    tile `tile[n, m]` (over `G * nT`) for `weight[n, m] == 1`; unused entries have weight 0.
    Slots no query of their tile attends (masked for the whole tile, e.g. clamped padding rows)
    are left out: their gradient rows are zero.
    """
    used = t.mask.any(axis=1)[t.tile_class.reshape(-1)]  # [G * nT, Hk]
    pos = t.halo_index.reshape(-1)
    slots = np.nonzero(used.reshape(-1))[0]
    n = math.prod(t.spatial)
    order = slots[np.argsort(pos[slots], kind="stable")]
    counts = np.bincount(pos[slots], minlength=n)
    width = max(int(counts.max()), 1)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    flat = np.zeros((n, width), np.int64)
    weight = np.zeros((n, width), np.float32)
    flat[pos[order], rank] = order
    weight[pos[order], rank] = 1.0
    hk = t.halo_volume
    return (flat // hk).astype(np.int32), (flat % hk).astype(np.int32), weight


def _unhalo(xh, t: Tiling, spatial, dtype):
    """Transpose of `_halo` on the matmul layout `[B, G, nT, h, Hk, D]` -> `[B, *S, h, D]`.

    A gather-sum (each key reads the few halo slots that hold it) instead of a scatter-add: XLA
    fuses it with the cast into one pass over the halo gradients, reading them in the layout the
    matmul wrote (no transpose, no float32 `[B, N, h, D]` accumulator in memory).
    """
    b, h, d = xh.shape[0], xh.shape[3], xh.shape[-1]
    tile, slot, weight = _key_slots(t)
    flat = xh.reshape(b, -1, h, t.halo_volume, d)
    rows = flat[:, tile, :, slot, :]  # [N, M, B, h, D]
    out = jnp.einsum("nmbhd,nm->bnhd", rows, weight.astype(xh.dtype))
    return out.reshape((b, *spatial, h, d)).astype(dtype)


def _split_heads(x, kv_heads: int):
    """`[..., h, D]` -> `[..., kv_heads, h // kv_heads, D]`: query head `h = c * group + j`
    reads kv head `c` (GQA/MQA), so key/value halos are shared by a group, never repeated."""
    return x.reshape(x.shape[:-2] + (kv_heads, x.shape[-2] // kv_heads, x.shape[-1]))


def _qk(qt, kh, acc):
    """`[B, G, nT, Tq, h, D] x [B, G, nT, Hk, kvh, D] -> [B, G, nT, h, Tq, Hk]`."""
    if qt.shape[-2] == kh.shape[-2]:
        # No GQA: no size-1 group axis, which makes XLA lay the scores out [Hk, Tq] (the softmax
        # over Hk then takes three passes instead of one; hbm_aot, NAT-Tiny s1 fwd 3.9 vs 3.0 GB).
        return jnp.einsum("bgtqhd,bgtkhd->bgthqk", qt, kh, preferred_element_type=acc)
    s = jnp.einsum("bgtqcjd,bgtkcd->bgtcjqk", _split_heads(qt, kh.shape[-2]), kh,
                   preferred_element_type=acc)  # fmt: skip
    return s.reshape(s.shape[:3] + (-1,) + s.shape[5:])


def _pv(p, vh, acc):
    """`[B, G, nT, h, Tq, Hk] x [B, G, nT, Hk, kvh, Dv] -> [B, G, nT, Tq, h, Dv]`."""
    kvh = vh.shape[-2]
    if p.shape[3] == kvh:  # no GQA (see `_qk`)
        return jnp.einsum("bgthqk,bgtkhd->bgtqhd", p, vh, preferred_element_type=acc)
    p = p.reshape(p.shape[:3] + (kvh, -1) + p.shape[4:])
    o = jnp.einsum("bgtcjqk,bgtkcd->bgtqcjd", p, vh, preferred_element_type=acc)
    return o.reshape(o.shape[:4] + (-1, o.shape[-1]))


def _pq(p, xt, kv_heads: int, acc):
    """`[B, G, nT, h, Tq, Hk] x [B, G, nT, Tq, h, F] -> [B, G, nT, kvh, Hk, F]` (the layout
    `_unhalo` reads), summed over the query heads of each kv head (GQA gradients)."""
    p = p.reshape(p.shape[:3] + (kv_heads, -1) + p.shape[4:])
    return jnp.einsum("bgtcjqk,bgtqcjd->bgtckd", p, _split_heads(xt, kv_heads),
                      preferred_element_type=acc)  # fmt: skip


def _scores(qt, kh, bm, scale, acc):
    """Logits `[B, G, nT, h, Tq, Hk]` (float32, float64 for float64 inputs)."""
    s = _qk(qt, kh, acc) * scale
    return s if bm is None else s + bm[None]


def _rows(x, t: Tiling):
    """`[B, *S, h]` -> `[B, G, nT, h, Tq]` (per-query statistics in score layout)."""
    return jnp.swapaxes(t.to_tiles(x), -1, -2)


def _unrows(x, t: Tiling):
    return t.from_tiles(jnp.swapaxes(x, -1, -2))


def _forward_core(params: NAParams, t: Tiling, q, k, v, rpb, training: bool = True):
    """Forward on `[B, *S, h, D]` inputs: `(out, lse [B, *S, h])`.

    Two normalisations with equal results up to rounding, chosen for what XLA fuses (measured
    by `experiments/hbm_aot.py` on the H100 target): for training (`lse` is a residual) the
    unnormalised probabilities are rounded to the input dtype, summed in float32 from that copy
    and the `[Tq, D]` result divided (the scores are read twice); for inference the normalised
    probabilities come out of one fused softmax pass over the scores.
    """
    tables = _Tables(t)
    acc = _acc_dtype(q.dtype)
    qt, kh, vh = t.to_tiles(q), _halo(k, t), _halo(v, t)
    s = _scores(qt, kh, tables.bias_mask(rpb, q.shape[-2], acc), params.scale, acc)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    if training:
        e_in = e.astype(q.dtype)
        denom = jnp.sum(e_in.astype(acc), axis=-1, keepdims=True)
        o = _pv(e_in, vh, acc)
        o = o / jnp.swapaxes(denom[..., 0], -1, -2)[..., None]
    else:
        denom = jnp.sum(e, axis=-1, keepdims=True)
        p = (e / denom).astype(q.dtype)
        o = _pv(p, vh, acc)
    lse = (m + jnp.log(denom))[..., 0]
    return t.from_tiles(o.astype(q.dtype)), _unrows(lse, t)


def _backward_core(params: NAParams, t: Tiling, q, k, v, rpb, out, lse, d_out, d_lse):
    """Backward on `[B, *S, h, D]`: `(dq, dk, dv, d_rpb partial [1, h, 1, R] or None)`."""
    tables = _Tables(t)
    acc = _acc_dtype(q.dtype)
    dt = q.dtype
    qt, kh, vh = t.to_tiles(q), _halo(k, t), _halo(v, t)
    dot = t.to_tiles(d_out.astype(dt))
    s = _scores(qt, kh, tables.bias_mask(rpb, q.shape[-2], acc), params.scale, acc)
    p = jnp.exp(s - _rows(lse.astype(acc), t)[..., None])
    if not t.query_valid.all():
        # Padded queries have lse 0 (padding), so exp could overflow: zero them (their d_out is
        # zero, so ds would be 0 * inf).
        valid = t.query_valid[t.tile_class]  # [G, nT, Tq]
        p = jnp.where(valid[None, :, :, None, :, None], p, 0.0)
    dp = _qk(dot, vh, acc)
    delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)  # fused: no stored copies
    shift = _rows(delta - d_lse.astype(acc), t)
    ds = p * (dp - shift[..., None])
    ds_in = ds.astype(dt)
    kvh = k.shape[-2]
    dq = _pv(ds_in, kh, acc)
    dkh = _pq(ds_in, qt, kvh, acc)
    dvh = _pq(p.astype(dt), dot, kvh, acc)
    spatial = t.spatial
    dq = t.from_tiles((dq * params.scale).astype(dt))
    dk = _unhalo(dkh * params.scale, t, spatial, dt)
    dv = _unhalo(dvh, t, spatial, dt)
    if rpb is None:
        return dq, dk, dv, None
    heads = q.shape[-2]
    # Summed over this call's batch (one partial; the caller sums partials, an all-reduce when
    # the batch is sharded) in the pass that forms `ds`, then over the tiles of each class (a
    # one-hot matmul over G * nT tiles), then into bias bins by the class table (masked entries
    # have ds = 0). Reducing the batch first keeps the float32 `ds` out of memory.
    per_tile = jnp.sum(ds, axis=0).reshape((t.groups * t.tiles, heads, -1))
    onehot = (t.tile_class.reshape(-1)[:, None] == np.arange(t.n_classes)).astype(acc)
    per_class = jnp.einsum("nhx,nc->cxh", per_tile, onehot)  # [C, Tq * Hk, h]
    bins = math.prod(params.rpb_shape_tail)
    drpb = jax.ops.segment_sum(
        per_class.reshape((-1, heads)), t.rpb_index.reshape(-1), num_segments=bins
    )  # [R, h]
    return dq, dk, dv, jnp.transpose(drpb)[None, :, None, :]


# Sharding: on GSPMD (auto) meshes these are plain XLA ops that the partitioner splits over batch
# and heads. On explicit meshes, whose sharding-in-types reshape rules cannot split the spatial
# axes of a sharded array, the op runs per (batch, head) shard on the row layout `[B, N, h, D]`
# through `partition.explicit_batch_head_map` (a shard_map).


def _rows_forward(static, q, k, v, rpb):
    params, tiles, spatial, has_rpb, training = static
    t = tiling(spatial, params, tiles)
    x = [_as_spatial(a, spatial) for a in (q, k, v)]
    out, lse = _forward_core(params, t, *x, rpb if has_rpb else None, training)
    return out.reshape(q.shape[:-1] + v.shape[-1:]), lse.reshape(q.shape[:-1])


def _rows_backward(static, q, k, v, rpb, out, lse, d_out, d_lse):
    params, tiles, spatial, has_rpb = static
    t = tiling(spatial, params, tiles)
    x = [_as_spatial(a, spatial) for a in (q, k, v, out, d_out)]
    rows = [a.reshape((q.shape[0], *spatial, q.shape[2])) for a in (lse, d_lse)]
    dq, dk, dv, drpb = _backward_core(
        params, t, *x[:3], rpb if has_rpb else None, x[3], rows[0], x[4], rows[1]
    )
    if drpb is None:  # one result structure; a [B, h, 1, 1] zero is free
        drpb = jnp.zeros((1, q.shape[2], 1, 1), jnp.float32)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), drpb


def _as_spatial(x, spatial):
    """Row layout `[B, N, h, D]` -> `[B, *spatial, h, D]`."""
    return x.reshape((x.shape[0], *spatial, *x.shape[2:]))


def _as_rows(x):
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def _rpb_operand(rpb, heads: int):
    return jnp.zeros((heads, 1), jnp.float32) if rpb is None else rpb.reshape(heads, -1)


def _forward(static, q, k, v, rpb, training: bool = True):
    """Custom-VJP forward (also the accelerator half of `platform.na_xla`)."""
    params, tiles = static
    spatial = tuple(q.shape[1:-2])
    op = functools.partial(_rows_forward, (params, tiles, spatial, rpb is not None, training))
    out, lse = explicit_batch_head_map(
        op, ("x", "kv", "kvv", "rpb"), ("xv", "row"),
        _as_rows(q), _as_rows(k), _as_rows(v), _rpb_operand(rpb, q.shape[-2]),
    )  # fmt: skip
    return out.reshape(q.shape[:-1] + v.shape[-1:]), lse.reshape(q.shape[:-1])


def _backward(static, res, cts):
    """Custom-VJP backward (also the accelerator half of `platform.na_xla`)."""
    params, tiles = static
    q, k, v, rpb, out, lse = res
    d_out, d_lse = cts
    spatial = tuple(q.shape[1:-2])
    b, h = q.shape[0], q.shape[-2]
    op = functools.partial(_rows_backward, (params, tiles, spatial, rpb is not None))
    kinds_in = ("x", "kv", "kvv", "rpb", "xv", "row", "xv", "row")
    dq, dk, dv, drpb = explicit_batch_head_map(
        op, kinds_in, ("x", "kv", "kvv", "drpb"),
        _as_rows(q), _as_rows(k), _as_rows(v), _rpb_operand(rpb, h), _as_rows(out),
        lse.reshape(b, -1, h), _as_rows(d_out.astype(q.dtype)),
        d_lse.reshape(b, -1, h).astype(lse.dtype),
    )  # fmt: skip
    # A cotangent has its primal's sharding (heads may have run unsplit: partition.py).
    dq, dk, dv = (match_sharding(g.reshape(x.shape), x) for g, x in ((dq, q), (dk, k), (dv, v)))
    if rpb is None:
        return dq, dk, dv, None
    return dq, dk, dv, jnp.sum(drpb[:, :, 0], axis=0).reshape(rpb.shape).astype(rpb.dtype)


# Calls that are not differentiated use the inference normalisation (see `_forward_core`).
_na = na_custom_vjp(_forward, _backward, primal=functools.partial(_forward, training=False))


def unsupported_reason(call: NACall) -> str | None:
    """None: the tiled path runs every call the public API accepts."""
    del call
    return None


def na_xla_tiled(q, k, v, rpb, params: NAParams, tiles: tuple[int, ...] | None = None):
    """Neighborhood attention as a blocked-halo XLA computation (accelerator layout).

    Args:
      q: `[batch, *spatial, heads, head_dim]`; k, v: `[batch, *spatial, kv_heads, head_dim]` and
        `[batch, *spatial, kv_heads, value_dim]` (GQA/MQA: `heads % kv_heads == 0`).
      rpb: `[heads, *(2K-1)]` or None.
      params: validated window arguments.
      tiles: query-tile shape (one size per axis); default `choose_tiles`.

    Returns:
      (out in q's dtype, lse `[batch, *spatial, heads]` float32 (float64 for float64 inputs)).
    """
    spatial = tuple(q.shape[1:-2])
    if tiles is None:
        tiles = choose_tiles(spatial, params, q.shape[-1], jnp.dtype(q.dtype).itemsize)
    return _na((params, tuple(int(x) for x in tiles)), q, k, v, rpb)
