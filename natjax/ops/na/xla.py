"""Portable neighborhood attention in plain XLA, with a hand-written custom VJP.

Layout and plan (all index structure is static numpy, computed at trace time):

1. Inputs `[B, *S, h, D]` are moved to `[B, G, g, *S, D]`, query heads split as `G` kv heads
   times `g` query heads per kv head (GQA/MQA; `g = 1` for multi-head attention); keys and values
   are `[B, G, 1, *S, D]` and every product broadcasts them over the group, never repeating them.
   Their gradients are summed over the group.
2. Dilation is removed exactly: along an axis with dilation `d`, positions with equal `i % d` form
   an independent sub-map (NATTEN's dilation groups), so the axis is reshaped to `[rows, d]`, the
   group axis folded into the batch, and each group runs with dilation 1. Groups of unequal length
   (`L % d != 0`) form two classes that run as separate calls (`_DilationSplit`).
3. With dilation 1, every axis but the last is handled by a loop (`fori_loop`) over kernel
   offsets: the shifted keys for offset `a` are `k[window_start(i) + a]`, a few slices and
   broadcasts (`OuterShift`), never a gather. A rolled loop reuses one iteration's temporaries.
4. The last axis is blocked into tiles of `T` queries whose keys lie in a `T + K - 1` halo; one
   batched matmul per tile gives `[T, T + K - 1]` scores, and a pad/reshape "skew" extracts the
   `[T, K]` band (`LastAxisBand`). Border queries, whose windows NATTEN shifts inwards, are
   recomputed exactly with a small dense product.
5. Logits `[B, h, *S, kernel_volume]` are the largest array; nothing `N x N` and no per-query copies
   of keys or values are ever built. The bias `rpb[h, (key-query)/d + K - 1]` is a product of
   per-axis one-hot matrices, so both it and its gradient are small matmuls, not gathers/scatters.

The backward pass is written out (flash-attention style, recomputing probabilities from the saved
log-sum-exp). It uses the same offsets in reverse: the "inverse neighborhood" of each key is the
transpose of the static slices (pads and adds) and of the band matmul, never a scatter-add.
Residuals are only `q, k, v, rpb, out, lse`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from natjax.ops.na.spec import NACall, NAParams, axis_windows
from natjax.ops.na.vjp import na_custom_vjp
from natjax.ops.na.xla_blocks import LastAxisBand, OuterShift

# --------------------------------------------------------------------------------------------
# Dilation groups.
# --------------------------------------------------------------------------------------------


_SPATIAL0 = 3  # first spatial axis of the [B, G, g, *S, D] layout


def _sum_over(n: int, term):
    """`sum(term(i) for i in range(n))` as a loop whose carry starts from `term(0)`, so it has
    the terms' shape, dtype and sharding type (an unsharded zero carry is refused by explicit
    meshes: "carry input and carry output must have equal types")."""
    return jax.lax.fori_loop(1, n, lambda i, acc: acc + term(i), term(0))


class _DilationSplit:
    """Splits spatial axes into dilation groups folded into the batch, and merges them back.

    Arrays have layout `[batch, kv_heads, group, *spatial, *trailing]`. After `split`, every piece
    has dilation 1 on every axis; pieces are ordered so that `merge` can rebuild the original.
    """

    def __init__(self, spatial: tuple[int, ...], dilation: tuple[int, ...]):
        self.spatial = spatial
        self.dilation = dilation

    def _classes(self, axis: int):
        """(rows, group slice) per class of equal-length groups along `axis`."""
        length, d = self.spatial[axis], self.dilation[axis]
        m, r = divmod(length, d)
        if r == 0:
            return [(m, slice(0, d))]
        return [(m + 1, slice(0, r)), (m, slice(r, d))]

    def split(self, x: jax.Array) -> list[jax.Array]:
        pieces = [x]
        for axis, d in enumerate(self.dilation):
            if d == 1:
                continue
            pieces = [p for parent in pieces for p in self._split_axis(parent, axis)]
        return pieces

    def _split_axis(self, x, axis):
        ax = _SPATIAL0 + axis
        length, d = self.spatial[axis], self.dilation[axis]
        rows = -(-length // d)
        pad = [(0, 0)] * x.ndim
        pad[ax] = (0, rows * d - length)
        x = jnp.pad(x, pad).reshape(x.shape[:ax] + (rows, d) + x.shape[ax + 1 :])
        out = []
        for n_rows, groups in self._classes(axis):
            p = jax.lax.slice_in_dim(x, 0, n_rows, axis=ax)
            p = jax.lax.slice_in_dim(p, groups.start, groups.stop, axis=ax + 1)
            p = jnp.moveaxis(p, ax + 1, 0)  # [g, B, ...]
            out.append(p.reshape((-1,) + p.shape[2:]))
        return out

    def merge(self, pieces: list[jax.Array]) -> jax.Array:
        for axis in reversed(range(len(self.dilation))):
            if self.dilation[axis] == 1:
                continue
            n = len(self._classes(axis))
            pieces = [self._merge_axis(pieces[i : i + n], axis) for i in range(0, len(pieces), n)]
        (x,) = pieces
        return x

    def _merge_axis(self, pieces, axis):
        ax = _SPATIAL0 + axis
        length, d = self.spatial[axis], self.dilation[axis]
        rows = -(-length // d)
        parts = []
        for p, (n_rows, groups) in zip(pieces, self._classes(axis), strict=True):
            g = groups.stop - groups.start
            p = p.reshape((g, p.shape[0] // g) + p.shape[1:])
            p = jnp.moveaxis(p, 0, ax + 1)  # [B, ..., n_rows, g, ...]
            pad = [(0, 0)] * p.ndim
            pad[ax] = (0, rows - n_rows)
            parts.append(jnp.pad(p, pad))
        x = jnp.concatenate(parts, axis=ax + 1)
        x = x.reshape(x.shape[:ax] + (rows * d,) + x.shape[ax + 2 :])
        return jax.lax.slice_in_dim(x, 0, length, axis=ax)


# --------------------------------------------------------------------------------------------
# Dilation-1 core on [B, h, *S, D].
# --------------------------------------------------------------------------------------------


class _Core:
    """Static structure of neighborhood attention with dilation 1 on a `[B, G, g, *S, D]` map
    (keys and values `[B, G, 1, *S, D]`)."""

    def __init__(self, spatial: tuple[int, ...], kernel_size, is_causal):
        self.spatial = spatial
        self.kernel_size = kernel_size
        ndim = len(spatial)
        wins = [
            axis_windows(n, k, 1, c)
            for n, k, c in zip(spatial, kernel_size, is_causal, strict=True)
        ]
        # Outer axes: shifted copies per kernel offset, looped over in row-major KV order.
        self.outer = [
            OuterShift(_SPATIAL0 + ax, n, k, c)
            for ax, (n, k, c) in enumerate(
                zip(spatial[:-1], kernel_size[:-1], is_causal[:-1], strict=True)
            )
        ]
        self.n_outer = math.prod(kernel_size[:-1])
        # Windows spanning every axis (e.g. NAT's last stage, 7x7 with kernel 7): every query sees
        # every key and offset o is key position o, so the products are plain matmuls.
        self.full_window = not any(is_causal) and tuple(kernel_size) == tuple(spatial)
        self.band = LastAxisBand(
            spatial[-1], kernel_size[-1], is_causal[-1], math.prod(kernel_size)
        )
        # Validity mask [*S, KV] (only causal axes can invalidate offsets).
        if any(is_causal):
            valid = np.ones((1,) * (2 * ndim), bool)
            for ax, w in enumerate(wins):
                shape = [1] * (2 * ndim)
                shape[ax] = spatial[ax]
                shape[ndim + ax] = kernel_size[ax]
                valid = valid & w.valid.reshape(shape)
            shape = spatial + (math.prod(kernel_size),)
            self.mask = np.broadcast_to(valid, spatial + tuple(kernel_size)).reshape(shape)
        else:
            self.mask = None
        # One-hot bias selectors E_ax[i, a, u] = [rpb_index(i, a) == u] (separable bias).
        self.onehots = [
            (w.rpb_index[:, :, None] == np.arange(2 * k - 1)).astype(np.float32)
            for w, k in zip(wins, kernel_size, strict=True)
        ]
        letters = "uvw"[:ndim]
        pos = "xyz"[:ndim]
        offs = "abc"[:ndim]
        factors = ",".join(f"{pos[i]}{offs[i]}{letters[i]}" for i in range(ndim))
        self._bias_eq = f"h{letters},{factors}->h{pos}{offs}"
        self._dbias_eq = f"h{pos}{offs},{factors}->h{letters}"

    # -- helpers over the offset loop ------------------------------------------------------

    def _prepare(self, x):
        for shift in self.outer:
            x = shift.prepare(x)
        return x

    def _shift(self, xp, i):
        """`xp` (prepared) shifted along every outer axis for flat outer offset `i` (traced)."""
        for shift in reversed(self.outer):
            xp = shift(xp, i % shift.K)
            i = i // shift.K
        return xp

    def _unshift(self, ct, i):
        """Transpose of `_shift(_prepare(.), i)`: the inverse neighborhood, pads and adds."""
        fn = lambda x: self._shift(self._prepare(x), i)
        primal = jax.ShapeDtypeStruct(ct.shape, ct.dtype, sharding=jax.typeof(ct).sharding)
        (x,) = jax.linear_transpose(fn, primal)(ct)
        return x

    def _per_outer(self, p):
        """`[..., KV]` -> `[..., n_outer, K_last]`."""
        return p.reshape(p.shape[:-1] + (self.n_outer, self.kernel_size[-1]))

    def _flat(self, x):
        return x.reshape(x.shape[:_SPATIAL0] + (-1, x.shape[-1]))

    @staticmethod
    def _group_sum(y):
        """Sum over the query heads sharing a kv head: query-shaped -> key-shaped."""
        return jnp.sum(y, axis=_SPATIAL0 - 1, keepdims=True)

    def qk(self, a, b):
        """scores[..., i, o] = a[i] . b[key(i, o)], `[B, G, g, *S, KV]`."""
        if self.full_window:
            s = jnp.einsum("...nd,...md->...nm", self._flat(a), self._flat(b))
            return s.reshape(a.shape[:-1] + (-1,))
        if not self.outer:
            return self.band.qk(a, b)
        bp = self._prepare(b)

        def step(carry, i):
            return carry, self.band.qk(a, self._shift(bp, i))

        _, scores = jax.lax.scan(step, None, jnp.arange(self.n_outer))  # [n_outer, ..., K_last]
        return jnp.moveaxis(scores, 0, -2).reshape(a.shape[:-1] + (-1,))

    def av(self, p, v):
        """out[i] = sum_o p[i, o] v[key(i, o)]."""
        shape = p.shape[:-1] + v.shape[-1:]
        if self.full_window:
            return jnp.einsum("...nm,...md->...nd", self._flat(p), self._flat(v)).reshape(shape)
        if not self.outer:
            return self.band.av(p, v)
        p, vp = self._per_outer(p), self._prepare(v)

        def term(i):
            p_i = jax.lax.dynamic_index_in_dim(p, i, axis=-2, keepdims=False)
            return self.band.av(p_i, self._shift(vp, i))

        return _sum_over(self.n_outer, term)

    def av_t(self, p, a):
        """out[j] = sum over (i, o) with key(i, o) = j of p[i, o] a[i] (inverse neighborhood),
        summed over the query heads of each kv head: key-shaped `[B, G, 1, *S, F]`."""
        if self.full_window:
            y = jnp.einsum("...nm,...nd->...md", self._flat(p), self._flat(a)).reshape(a.shape)
            return self._group_sum(y)
        if not self.outer:
            return self._group_sum(self.band.av_t(p, a))
        p = self._per_outer(p)

        def term(i):
            p_i = jax.lax.dynamic_index_in_dim(p, i, axis=-2, keepdims=False)
            return self._unshift(self._group_sum(self.band.av_t(p_i, a)), i)

        return _sum_over(self.n_outer, term)

    def bias(self, rpb):
        """`[h, *S, KV]` bias from `rpb[h, *(2K-1)]` (a product of one-hot matrices)."""
        b = jnp.einsum(self._bias_eq, rpb, *[e.astype(rpb.dtype) for e in self.onehots])
        return b.reshape(b.shape[: 1 + len(self.spatial)] + (-1,))

    def dbias(self, ds_sum, dtype):
        """Gradient of `bias` for a `[h, *S, KV]` cotangent."""
        ds = ds_sum.reshape(ds_sum.shape[:-1] + tuple(self.kernel_size))
        return jnp.einsum(self._dbias_eq, ds, *[e.astype(dtype) for e in self.onehots])

    def logits(self, q_scaled, k, rpb):
        s = self.qk(q_scaled, k)
        if rpb is not None:
            s = s + self.bias(rpb).reshape(s.shape[1:])[None]  # [h, ...] -> [G, g, ...]
        if self.mask is not None:
            s = jnp.where(self.mask, s, -jnp.inf)
        return s

    def forward(self, q, k, v, rpb, scale):
        s = self.logits(q * scale, k, rpb)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        out = self.av(e, v) / denom  # divides N x D values instead of N x KV
        lse = (m + jnp.log(denom))[..., 0]
        return out, lse

    def backward(self, q, k, v, rpb, out, lse, d_out, d_lse, scale):
        p = jnp.exp(self.logits(q * scale, k, rpb) - lse[..., None])
        dp = self.qk(d_out, v)
        delta = jnp.sum(d_out * out, axis=-1)
        ds = p * (dp - (delta - d_lse)[..., None])
        dq = self.av(ds, k) * scale
        dk = self.av_t(ds, q * scale)
        dv = self.av_t(p, d_out)
        if rpb is None:
            drpb = None
        else:  # [G, g, *S, KV] -> [h, *S, KV]
            ds_sum = jnp.sum(ds, axis=0)
            drpb = self.dbias(ds_sum.reshape((-1,) + ds_sum.shape[2:]), ds.dtype)
        return dq, dk, dv, drpb


# --------------------------------------------------------------------------------------------
# Full op: layout, dilation groups, custom VJP.
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _to_bh(x, kv_heads: int):
    """`[B, *S, h, F]` -> `[B, G, h // G, *S, F]` with `G = kv_heads`."""
    x = x.reshape(x.shape[:-2] + (kv_heads, x.shape[-2] // kv_heads, x.shape[-1]))
    return jnp.moveaxis(x, (-3, -2), (1, 2))


def _from_bh(x):
    """Inverse of `_to_bh`: `[B, G, g, *S, F]` -> `[B, *S, G * g, F]`."""
    x = jnp.moveaxis(x, (1, 2), (-3, -2))
    return x.reshape(x.shape[:-3] + (-1, x.shape[-1]))


def _rows_to_bh(x, kv_heads: int):
    """Per-query statistics `[B, *S, h]` -> `[B, G, g, *S]`."""
    x = x.reshape(x.shape[:-1] + (kv_heads, -1))
    return jnp.moveaxis(x, (-2, -1), (1, 2))


def _rows_from_bh(x):
    x = jnp.moveaxis(x, (1, 2), (-2, -1))
    return x.reshape(x.shape[:-2] + (-1,))


@functools.lru_cache(maxsize=256)
def _core(spatial: tuple[int, ...], kernel_size, is_causal) -> _Core:
    """Static structure per (dilation-free) piece shape; cached across traces."""
    return _Core(spatial, kernel_size, is_causal)


def _piece_core(piece, params: NAParams) -> _Core:
    return _core(tuple(piece.shape[_SPATIAL0:-1]), params.kernel_size, params.is_causal)


# Cache blocking on CPU: when a call's working set (logits + q/k/v/out) exceeds
# CPU_BLOCK_ABOVE_BYTES, the batch is processed in chunks of about CPU_CHUNK_BYTES so that each
# step's intermediates stay in the L2/L3 caches. Smaller calls run in one pass (loop overhead
# would dominate). Measured on a 2-core EPYC (experiments/bench_na.py): ~3x faster forward at
# NAT-Tiny stage 1 (batch 8, 56x56, 2 heads); unchunked is faster at 14x14 and below.
CPU_CHUNK_BYTES = 4 << 20
CPU_BLOCK_ABOVE_BYTES = 32 << 20


def _cpu_chunk(batch: int, per_item_bytes: int) -> int | None:
    """Batch items per loop step on a single-device CPU, or None for one fused pass.

    Multi-device programs are partitioned by GSPMD, which would have to gather a batch axis
    that a loop scans; so only single-device programs loop. This band path only runs on CPU
    (`platform.py` lowers the tiled path for accelerators), so the platform is not queried here.
    """
    if jax.device_count() > 1:
        return None
    if batch * per_item_bytes <= CPU_BLOCK_ABOVE_BYTES:
        return None
    chunk = max(1, CPU_CHUNK_BYTES // max(per_item_bytes, 1))
    return None if chunk >= batch else chunk


def _map_batch(fn, arrays, chunk: int | None, pad_values=None):
    """`fn(*arrays) -> (per_item_outputs, summed)` run over batch chunks with a `lax.scan`.

    `per_item_outputs` (a tuple of arrays with the batch leading) are concatenated back;
    `summed` (an array or None) is accumulated over chunks. The last chunk is padded with
    `pad_values` (one per array, default 0), e.g. an infinite lse so padded items have zero
    probabilities and contribute nothing (not NaN) to `summed`.
    """
    if chunk is None:
        return fn(*arrays)
    batch = arrays[0].shape[0]
    n = -(-batch // chunk)
    pad = n * chunk - batch
    pad_values = pad_values or (0,) * len(arrays)
    xs = [
        jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=c).reshape(
            (n, chunk) + x.shape[1:]
        )
        for x, c in zip(arrays, pad_values, strict=True)
    ]
    _, summed_shape = jax.eval_shape(fn, *[x[0] for x in xs])
    init = None if summed_shape is None else jnp.zeros(summed_shape.shape, summed_shape.dtype)

    def body(acc, chunk_arrays):
        outs, summed = fn(*chunk_arrays)
        return (None if acc is None else acc + summed), outs

    total, outs = jax.lax.scan(body, init, xs)
    outs = tuple(o.reshape((n * chunk,) + o.shape[2:])[:batch] for o in outs)
    return outs, total


def _piece_chunk(piece, params: NAParams) -> int | None:
    _, kv_heads, group, *spatial, head_dim = piece.shape
    per_item = kv_heads * group * math.prod(spatial) * (params.kernel_volume + 4 * head_dim) * 4
    return _cpu_chunk(piece.shape[0], per_item)


def _forward(params: NAParams, q, k, v, rpb):
    spatial = tuple(q.shape[1:-2])
    ct = _compute_dtype(q.dtype)
    split = _DilationSplit(spatial, params.dilation)
    rpb_c = None if rpb is None else rpb.astype(ct)
    kvh = k.shape[-2]
    qs, ks, vs = (split.split(_to_bh(x, kvh).astype(ct)) for x in (q, k, v))
    outs, lses = [], []
    for qp, kp, vp in zip(qs, ks, vs, strict=True):
        core = _piece_core(qp, params)
        fwd = lambda q_, k_, v_, core=core: (core.forward(q_, k_, v_, rpb_c, params.scale), None)
        (o, lse), _ = _map_batch(fwd, (qp, kp, vp), _piece_chunk(qp, params))
        outs.append(o)
        lses.append(lse)
    out = _from_bh(split.merge(outs)).astype(q.dtype)
    lse = _rows_from_bh(split.merge(lses))
    return out, lse


def _backward(params: NAParams, res, cts):
    q, k, v, rpb, out, lse = res
    d_out, d_lse = cts
    spatial = tuple(q.shape[1:-2])
    ct = _compute_dtype(q.dtype)
    split = _DilationSplit(spatial, params.dilation)
    rpb_c = None if rpb is None else rpb.astype(ct)
    kvh = k.shape[-2]
    pieces = [split.split(_to_bh(x, kvh).astype(ct)) for x in (q, k, v, out, d_out)] + [
        split.split(_rows_to_bh(x.astype(ct), kvh)) for x in (lse, d_lse)
    ]
    grads = [[], [], []]
    drpb = None
    for piece in zip(*pieces, strict=True):
        core = _piece_core(piece[0], params)

        def bwd(q_, k_, v_, o_, do_, l_, dl_, core=core):
            dq, dk, dv, dr = core.backward(q_, k_, v_, rpb_c, o_, l_, do_, dl_, params.scale)
            return (dq, dk, dv), dr

        # Padded items get lse = +inf: zero probabilities, no NaN in the summed bias gradient.
        pads = (0, 0, 0, 0, 0, jnp.inf, 0)
        (dq, dk, dv), dr = _map_batch(bwd, piece, _piece_chunk(piece[0], params), pads)
        for acc, g in zip(grads, (dq, dk, dv), strict=True):
            acc.append(g)
        if dr is not None:
            drpb = dr if drpb is None else drpb + dr
    dq, dk, dv = (_from_bh(split.merge(g)).astype(q.dtype) for g in grads)  # dk, dv: [B, *S, G, D]
    if rpb is not None:
        drpb = drpb.astype(rpb.dtype)
    return dq, dk, dv, drpb


_na = na_custom_vjp(_forward, _backward)


def supports(call: NACall) -> bool:
    """Whether the band formulation runs this call (else `platform` uses the tiled path).

    The band assumes windows that slide by one position per query. With a stride, the queries of
    a stride group share one window: blocks of queries with a common key halo, which is exactly
    the blocked-halo formulation (`xla_tiled`), so strided calls go there.
    """
    return not call.params.has_stride


def na_xla(q, k, v, rpb, params: NAParams):
    """Neighborhood attention via XLA ops with a custom VJP.

    Args:
      q, k, v: `[batch, *spatial, heads, head_dim]`.
      rpb: `[heads, *(2K-1)]` or None.
      params: validated window arguments.

    Returns:
      (out in q's dtype, lse `[batch, *spatial, heads]` float32 (float64 for float64 inputs)).
    """
    return _na(params, q, k, v, rpb)
