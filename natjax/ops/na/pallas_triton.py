"""Fused neighborhood attention in Pallas with the Triton lowering (GPU; interpret mode on CPU).

Formulation (shared by 1-D, 2-D and 3-D: every call is padded to three spatial axes, the missing
leading axes having size 1 and kernel 1):

* Inputs stay in the caller's `[B, *S, h, D]` layout, viewed as `[B, N, h, D]` (a free reshape);
  each program reads its rows through computed flat indices (Triton pointer tensors), so there is
  no transpose in HBM. The head dim is zero-padded to a power of two >= 16 when needed.
* Dilation is exact: positions with equal `i % d` form a sub-map (NATTEN's dilation groups), and
  tiles are boxes in *group* coordinates. Windows follow `spec.axis_windows` (shifted at borders,
  causal = the `K` most recent), evaluated in-kernel from the program id.
* Forward / dq kernels: grid `(B, h, groups x tiles)`. A tile's windows lie inside a halo
  `[start(first), start(last) + K)` per axis (NATTEN windows are monotone in the query). The
  kernel loops over the halo's rows (outer axes); each row is a power-of-two run of keys along
  the last axis, scored with one matmul against the whole query tile, masked exactly (window,
  group length, causal), biased with `rpb[(key - query) / d + K - 1]` loaded in-kernel, and folded
  in with an online softmax in float32. `out` and `lse` are written once; attention weights never
  reach HBM.
* dk/dv kernel: grid over key tiles; it loops over the key tile's *inverse neighborhood* (the
  queries whose windows can contain the tile, a contiguous range per axis, computed in-kernel)
  in rows and power-of-two chunks, with the same exact mask.
* d_rpb: the dq kernel reduces `ds` into bias bins per program (a one-hot matmul per key row) and
  writes `[B, h, programs, bins]` partials, summed afterwards by XLA: no atomics, deterministic.

Backward math (FlashAttention-2 style, from the saved `lse`): `p = exp(s - lse)`,
`ds = p * (dO.V - delta + dlse)` with `delta = sum(dO * O)`; `dq = scale ds K`,
`dk = scale ds^T Q`, `dv = p^T dO`. One `jax.custom_vjp` with residuals `q, k, v, rpb, out, lse`.

Sharding: the public entry point is wrapped in `custom_partitioning`, so under `jax.jit` with
batch/head-sharded inputs every device runs the kernels on its own shard (no all-gather).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from natjax.ops.na.pallas_partition import batch_head_parallel
from natjax.ops.na.pallas_tuning import NATileConfig, default_config, next_pow2
from natjax.ops.na.spec import NAParams

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite mask value: no inf - inf NaNs
_MAX_KERNEL = 13
_MAX_HEAD_DIM = 128
_SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


# --------------------------------------------------------------------------------------------
# Static geometry.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Axis:
    """One spatial axis: size, window arguments and tile extent (in group coordinates)."""

    length: int
    kernel: int
    dilation: int
    causal: bool
    tile: int

    @property
    def rows(self) -> int:  # longest dilation group
        return -(-self.length // self.dilation)

    @property
    def n_tiles(self) -> int:
        return -(-self.rows // self.tile)

    @property
    def programs(self) -> int:
        return self.dilation * self.n_tiles


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Everything the kernels need to know statically (hashable: part of the jit cache key)."""

    axes: tuple[_Axis, _Axis, _Axis]  # (z, y, x); x is the vector axis
    head_dim: int  # padded, a power of two
    scale: float
    has_rpb: bool
    num_warps: int
    num_stages: int
    force_interpret: bool | None = None  # None: interpret exactly when not running on a GPU

    @property
    def n(self) -> int:
        return math.prod(a.length for a in self.axes)

    @property
    def programs(self) -> int:
        return math.prod(a.programs for a in self.axes)

    @property
    def tile_volume(self) -> int:
        return math.prod(a.tile for a in self.axes)

    @property
    def halo_x(self) -> int:
        """Keys per halo row: covers `tile + K - 1` (a tile's windows along x)."""
        ax = self.axes[2]
        return max(16, next_pow2(ax.tile + ax.kernel - 1))

    @property
    def rpb_outer(self) -> int:  # bias bins of the outer axes, flattened
        return (2 * self.axes[0].kernel - 1) * (2 * self.axes[1].kernel - 1)

    @property
    def rpb_len(self) -> int:
        return self.rpb_outer * (2 * self.axes[2].kernel - 1)

    @property
    def drpb_shape(self) -> tuple[int, int]:
        """Per-program d_rpb partial, `[outer bins, x bins]` padded for Triton's dot."""
        return (
            max(16, next_pow2(self.rpb_outer)),
            max(16, next_pow2(2 * self.axes[2].kernel - 1)),
        )

    @property
    def interpret(self) -> bool:
        if self.force_interpret is not None:
            return self.force_interpret
        return jax.default_backend() != "gpu"


def _geometry(
    spatial, params: NAParams, head_dim: int, has_rpb: bool, config, interpret=None
) -> _Geometry:
    pad = 3 - len(spatial)
    block = (1,) * pad + tuple(config.block_q)
    axes = [_Axis(1, 1, 1, False, 1) for _ in range(pad)]
    for i, n in enumerate(spatial):
        axes.append(
            _Axis(n, params.kernel_size[i], params.dilation[i], params.is_causal[i], block[pad + i])
        )
    return _Geometry(
        axes=tuple(axes),
        head_dim=max(16, next_pow2(head_dim)),
        scale=float(params.scale),
        has_rpb=has_rpb,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        force_interpret=interpret,
    )


# --------------------------------------------------------------------------------------------
# In-kernel index arithmetic (int32, non-negative operands only: lax.div/rem truncate).
# --------------------------------------------------------------------------------------------


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _div(x, c):
    return lax.div(x, jnp.full_like(x, c) if jnp.ndim(x) else _i32(c))


def _rem(x, c):
    return lax.rem(x, jnp.full_like(x, c) if jnp.ndim(x) else _i32(c))


def _decode_program(geo: _Geometry, pid):
    """Program id -> (group, tile index) per axis; x varies fastest."""
    groups, tiles = [None] * 3, [None] * 3
    rest = pid
    for i in (2, 1, 0):
        ax = geo.axes[i]
        local = _rem(rest, ax.programs)
        rest = _div(rest, ax.programs)
        groups[i] = _div(local, ax.n_tiles)
        tiles[i] = _rem(local, ax.n_tiles)
    return groups, tiles


def _group_len(ax: _Axis, g):
    """Length of dilation group `g`: ceil((L - g) / d)."""
    return _div(ax.length - g + (ax.dilation - 1), ax.dilation)


def _win_start(ax: _Axis, p, glen):
    """NATTEN 0.17 window start in group coordinates (may be < 0 on causal axes)."""
    if ax.causal:
        return p - (ax.kernel - 1)
    return jnp.minimum(jnp.maximum(p - ax.kernel // 2, 0), glen - ax.kernel)


def _in_window(ax: _Axis, start, kp):
    return (kp >= start) & (kp < start + ax.kernel) & (kp >= 0)


def _tile_coords(geo: _Geometry):
    """Offsets of the flattened tile's elements per axis, `[tile_volume]` each."""
    tz, ty, tx = (a.tile for a in geo.axes)
    t = jnp.arange(geo.tile_volume, dtype=jnp.int32)
    return [_div(t, ty * tx), _rem(_div(t, tx), ty), _rem(t, tx)]


def _flat(geo: _Geometry, groups, pos):
    """Flat spatial index of group positions `pos` (absolute = group + d * pos)."""
    (lz, ly, lx) = (a.length for a in geo.axes)
    absz, absy, absx = (g + a.dilation * p for a, g, p in zip(geo.axes, groups, pos, strict=True))
    return (absz * ly + absy) * lx + absx


def _rows(ref, idx, geo: _Geometry):
    """Gathers rows `idx` (`[n]` int32, in range) of a `[N, D]` ref -> `[n, D]`."""
    cols = jnp.arange(geo.head_dim, dtype=jnp.int32)
    return ref[idx[:, None], cols[None, :]]


def _store_index(idx, valid, geo: _Geometry):
    """Masked-off lanes point one past the block: Triton never touches them (masked), and the
    interpret-mode scatter drops them instead of racing with a real row at a clamped index."""
    return jnp.where(valid, idx, geo.n)


def _store_rows(ref, idx, val, valid, geo: _Geometry):
    cols = jnp.arange(geo.head_dim, dtype=jnp.int32)
    mask = valid[:, None] & (cols[None, :] >= 0)
    rows = _store_index(idx, valid, geo)
    plgpu.store(ref.at[rows[:, None], cols[None, :]], val.astype(ref.dtype), mask=mask)


def _dot(a, b, *, trans_b=False, trans_a=False):
    """Float32-accumulating matmul; IEEE float32 when both operands are float32 (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _query_tile(geo: _Geometry):
    """Per-program query tile: groups, group lengths, positions, validity, flat indices."""
    groups, tiles = _decode_program(geo, pl.program_id(2))
    glen = [_group_len(a, g) for a, g in zip(geo.axes, groups, strict=True)]
    coords = _tile_coords(geo)
    pos = [t * a.tile + c for a, t, c in zip(geo.axes, tiles, coords, strict=True)]
    valid = (pos[0] < glen[0]) & (pos[1] < glen[1]) & (pos[2] < glen[2])
    flat = jnp.where(valid, _flat(geo, groups, pos), 0)
    return groups, tiles, glen, pos, valid, flat


def _halo(geo: _Geometry, tiles, glen):
    """Per axis: first key row of the tile's halo and the number of rows it spans."""
    starts, counts = [], []
    for ax, t, gl in zip(geo.axes, tiles, glen, strict=True):
        first = t * ax.tile
        last = jnp.minimum(first + ax.tile - 1, gl - 1)
        lo = jnp.maximum(_win_start(ax, first, gl), 0)
        hi = jnp.minimum(_win_start(ax, last, gl) + ax.kernel, gl)
        starts.append(lo)
        counts.append(jnp.maximum(hi - lo, 1))
    return starts, counts


def _scores(geo, q, k, qpos, kpos, qvalid, kvalid, wstart, rpb_ref):
    """Masked, biased logits `[nq, nk]` (float32) and the mask.

    `qpos`/`wstart` entries are `[nq, 1]` (or scalars), `kpos` entries `[1, nk]` (or scalars).
    """
    s = _dot(q, k, trans_b=True) * geo.scale
    mask = qvalid & kvalid
    for ax, st, kp in zip(geo.axes, wstart, kpos, strict=True):
        mask = mask & _in_window(ax, st, kp)
    mask = jnp.broadcast_to(mask, s.shape)
    if rpb_ref is not None:
        (az, ay, ax_) = geo.axes
        rel = [kp - qp + a.kernel - 1 for a, kp, qp in zip(geo.axes, kpos, qpos, strict=True)]
        idx = (rel[0] * (2 * ay.kernel - 1) + rel[1]) * (2 * ax_.kernel - 1) + rel[2]
        idx = jnp.where(mask, jnp.broadcast_to(idx, s.shape), 0)
        s = s + rpb_ref[idx].astype(jnp.float32)
    return jnp.where(mask, s, _NEG), mask


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, geo: _Geometry):
    rpb_ref = refs[0] if geo.has_rpb else None
    o_ref, lse_ref = refs[-2:]
    groups, tiles, glen, qpos, qvalid, qflat = _query_tile(geo)
    q = _rows(q_ref, qflat, geo)
    wstart = [_win_start(a, p, g)[:, None] for a, p, g in zip(geo.axes, qpos, glen, strict=True)]
    qpos2 = [p[:, None] for p in qpos]
    hs, hn = _halo(geo, tiles, glen)
    kx = hs[2] + jnp.arange(geo.halo_x, dtype=jnp.int32)
    kx_valid = kx < glen[2]

    def body(r, carry):
        acc, m, denom = carry
        kz = hs[0] + _div(r, hn[1])
        ky = hs[1] + _rem(r, hn[1])
        kflat = jnp.where(kx_valid, _flat(geo, groups, [kz, ky, kx]), 0)
        k = _rows(k_ref, kflat, geo)
        v = _rows(v_ref, kflat, geo)
        s, _ = _scores(
            geo, q, k, qpos2, [kz, ky, kx[None, :]], qvalid[:, None], kx_valid[None, :],
            wstart, rpb_ref,
        )  # fmt: skip
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        denom = alpha * denom + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    nq = geo.tile_volume
    init = (
        jnp.zeros((nq, geo.head_dim), jnp.float32),
        jnp.full((nq,), -jnp.inf, jnp.float32),
        jnp.zeros((nq,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, hn[0] * hn[1], body, init)
    _store_rows(o_ref, qflat, acc / denom[:, None], qvalid, geo)
    plgpu.store(lse_ref.at[_store_index(qflat, qvalid, geo)], m + jnp.log(denom), mask=qvalid)


def _dq_kernel(q_ref, k_ref, v_ref, *refs, geo: _Geometry):
    if geo.has_rpb:
        rpb_ref, do_ref, lse_ref, di_ref, dq_ref, drpb_ref = refs
    else:
        (do_ref, lse_ref, di_ref, dq_ref), rpb_ref, drpb_ref = refs, None, None
    groups, tiles, glen, qpos, qvalid, qflat = _query_tile(geo)
    q = _rows(q_ref, qflat, geo)
    do = _rows(do_ref, qflat, geo)
    lse = lse_ref[qflat]
    di = di_ref[qflat]
    wstart = [_win_start(a, p, g)[:, None] for a, p, g in zip(geo.axes, qpos, glen, strict=True)]
    qpos2 = [p[:, None] for p in qpos]
    hs, hn = _halo(geo, tiles, glen)
    kx = hs[2] + jnp.arange(geo.halo_x, dtype=jnp.int32)
    kx_valid = kx < glen[2]
    (az, ay, ax_) = geo.axes
    r_outer, r_x = geo.drpb_shape

    def body(r, carry):
        dq, drpb = carry
        kz = hs[0] + _div(r, hn[1])
        ky = hs[1] + _rem(r, hn[1])
        kflat = jnp.where(kx_valid, _flat(geo, groups, [kz, ky, kx]), 0)
        k = _rows(k_ref, kflat, geo)
        v = _rows(v_ref, kflat, geo)
        s, mask = _scores(
            geo, q, k, qpos2, [kz, ky, kx[None, :]], qvalid[:, None], kx_valid[None, :],
            wstart, rpb_ref,
        )  # fmt: skip
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - di[:, None])
        dq = dq + _dot(ds.astype(k.dtype), k)
        if drpb_ref is not None:
            # Bin ds by bias index: x bins with a one-hot reduction over the row's keys, then
            # the (z, y) bin of each query with a one-hot matmul. Masked entries have ds == 0.
            rel_x = kx[None, :] - qpos2[2] + ax_.kernel - 1  # [nq, halo_x]
            bins_x = jnp.arange(r_x, dtype=jnp.int32)
            onehot_x = rel_x[:, :, None] == bins_x[None, None, :]
            per_q = jnp.sum(jnp.where(onehot_x, ds[:, :, None], 0.0), axis=1)  # [nq, r_x]
            rel_o = (kz - qpos[0] + az.kernel - 1) * (2 * ay.kernel - 1) + (
                ky - qpos[1] + ay.kernel - 1
            )
            bins_o = jnp.arange(r_outer, dtype=jnp.int32)
            onehot_o = (bins_o[:, None] == rel_o[None, :]).astype(jnp.float32)  # [r_outer, nq]
            drpb = drpb + _dot(onehot_o, per_q)
        return dq, drpb

    nq = geo.tile_volume
    init = (jnp.zeros((nq, geo.head_dim), jnp.float32), jnp.zeros(geo.drpb_shape, jnp.float32))
    dq, drpb = lax.fori_loop(0, hn[0] * hn[1], body, init)
    _store_rows(dq_ref, qflat, dq * geo.scale, qvalid, geo)
    if drpb_ref is not None:
        drpb_ref[...] = drpb


def _inverse_range(ax: _Axis, k0, k1, glen):
    """Queries (group coordinates) whose windows can contain keys `k0..k1`: `[lo, hi]`.

    Non-causal: `start(p) = clamp(p - K//2, 0, G - K)` is monotone, so the attending queries are
    contiguous; the first is 0 near the start (shifted windows) and the last is G - 1 near the end.
    Causal: queries `k .. k + K - 1`.
    """
    if ax.causal:
        return k0, jnp.minimum(k1 + ax.kernel - 1, glen - 1)
    lo = jnp.where(k0 < ax.kernel, 0, k0 - ax.kernel // 2)
    hi = jnp.where(k1 >= glen - ax.kernel, glen - 1, k1 + ax.kernel // 2)
    return lo, hi


def _dkv_kernel(q_ref, k_ref, v_ref, *refs, geo: _Geometry):
    if geo.has_rpb:
        rpb_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref = refs
    else:
        (do_ref, lse_ref, di_ref, dk_ref, dv_ref), rpb_ref = refs, None
    groups, tiles, glen, kpos, kvalid, kflat = _query_tile(geo)  # the tile holds keys here
    k = _rows(k_ref, kflat, geo)
    v = _rows(v_ref, kflat, geo)
    kpos2 = [p[None, :] for p in kpos]
    los, counts = [], []
    for ax, t, gl in zip(geo.axes, tiles, glen, strict=True):
        k0 = t * ax.tile
        k1 = jnp.minimum(k0 + ax.tile - 1, gl - 1)
        lo, hi = _inverse_range(ax, k0, k1, gl)
        los.append(lo)
        counts.append(hi - lo + 1)
    chunk = geo.halo_x
    n_chunks = _div(counts[2] + (chunk - 1), chunk)
    ax_x = geo.axes[2]

    def body(r, carry):
        dk, dv = carry
        c = _rem(r, n_chunks)
        rr = _div(r, n_chunks)
        qz = los[0] + _div(rr, counts[1])
        qy = los[1] + _rem(rr, counts[1])
        qx = los[2] + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        qvalid = qx < los[2] + counts[2]
        qflat = jnp.where(qvalid, _flat(geo, groups, [qz, qy, qx]), 0)
        q = _rows(q_ref, qflat, geo)
        do = _rows(do_ref, qflat, geo)
        lse = lse_ref[qflat]
        di = di_ref[qflat]
        wstart = [
            _win_start(geo.axes[0], qz, glen[0]),
            _win_start(geo.axes[1], qy, glen[1]),
            _win_start(ax_x, qx, glen[2])[:, None],
        ]
        s, mask = _scores(
            geo, q, k, [qz, qy, qx[:, None]], kpos2, qvalid[:, None], kvalid[None, :],
            wstart, rpb_ref,
        )  # fmt: skip
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [chunk, nk]
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - di[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    nk = geo.tile_volume
    zeros = jnp.zeros((nk, geo.head_dim), jnp.float32)
    total = counts[0] * counts[1] * n_chunks
    dk, dv = lax.fori_loop(0, total, body, (zeros, zeros))
    _store_rows(dk_ref, kflat, dk * geo.scale, kvalid, geo)
    _store_rows(dv_ref, kflat, dv, kvalid, geo)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers on the [B, N, h, Dp] layout.
# --------------------------------------------------------------------------------------------


def _x_spec(geo):
    return pl.BlockSpec((None, geo.n, None, geo.head_dim), lambda b, h, p: (b, 0, h, 0))


def _row_spec(geo):
    return pl.BlockSpec((None, geo.n, None), lambda b, h, p: (b, 0, h))


def _rpb_spec(geo):
    return pl.BlockSpec((None, geo.rpb_len), lambda b, h, p: (h, 0))


def _call(kernel, geo, name, in_specs, out_specs, out_shape, grid):
    return pl.pallas_call(
        functools.partial(kernel, geo=geo),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=geo.num_warps, num_stages=geo.num_stages),
        interpret=geo.interpret,
        name=name,
    )


def _forward_call(geo: _Geometry, q, k, v, rpb):
    b, n, h, dp = q.shape
    specs = [_x_spec(geo)] * 3 + ([_rpb_spec(geo)] if geo.has_rpb else [])
    args = (q, k, v) + ((rpb,) if geo.has_rpb else ())
    out, lse = _call(
        _fwd_kernel, geo, "na_pallas_fwd", specs, [_x_spec(geo), _row_spec(geo)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, h), jnp.float32)],
        (b, h, geo.programs),
    )(*args)  # fmt: skip
    return out, lse


def _backward_call(geo: _Geometry, q, k, v, rpb, do, lse, di):
    b, n, h, dp = q.shape
    base = [_x_spec(geo)] * 3 + ([_rpb_spec(geo)] if geo.has_rpb else [])
    specs = base + [_x_spec(geo), _row_spec(geo), _row_spec(geo)]
    args = (q, k, v) + ((rpb,) if geo.has_rpb else ()) + (do, lse, di)
    grid = (b, h, geo.programs)
    dq_specs = [_x_spec(geo)]
    dq_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if geo.has_rpb:
        dq_specs.append(
            pl.BlockSpec((None, None, None, *geo.drpb_shape), lambda b, h, p: (b, h, p, 0, 0))
        )
        dq_shapes.append(jax.ShapeDtypeStruct((b, h, geo.programs, *geo.drpb_shape), jnp.float32))
    dq_out = _call(_dq_kernel, geo, "na_pallas_dq", specs, dq_specs, dq_shapes, grid)(*args)
    dk, dv = _call(
        _dkv_kernel, geo, "na_pallas_dkv", specs, [_x_spec(geo)] * 2,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], grid,
    )(*args)  # fmt: skip
    dq = dq_out[0]
    drpb = None
    if geo.has_rpb:
        drpb = jnp.sum(dq_out[1], axis=2)  # [B, h, r_outer, r_x]: summed over programs
    return dq, dk, dv, drpb


# --------------------------------------------------------------------------------------------
# Layout + custom VJP.
# --------------------------------------------------------------------------------------------


def _to_rows(x, geo: _Geometry):
    """`[B, *S, h, D]` -> `[B, N, h, Dp]` (free reshape; zero-pad D only if needed)."""
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    x = x.reshape(b, geo.n, h, d)
    if d != geo.head_dim:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, geo.head_dim - d)))
    return x


def _from_rows(x, like):
    return x[..., : like.shape[-1]].reshape(like.shape)


def _rpb_rows(rpb, geo: _Geometry):
    return rpb.reshape(rpb.shape[0], geo.rpb_len)


def _drpb_unpack(drpb, rpb, geo: _Geometry):
    """`[h, r_outer_pad, r_x_pad]` bins -> `rpb`'s shape."""
    kz, ky, kx = (a.kernel for a in geo.axes)
    d = drpb[:, : geo.rpb_outer, : 2 * kx - 1]
    return d.reshape(rpb.shape).astype(rpb.dtype)


def _rows_forward(geo: _Geometry, q, k, v, rpb):
    return _forward_call(geo, q, k, v, rpb if geo.has_rpb else None)


def _rows_backward(geo: _Geometry, q, k, v, rpb, do, lse, di):
    dq, dk, dv, drpb = _backward_call(geo, q, k, v, rpb if geo.has_rpb else None, do, lse, di)
    if drpb is None:  # keep one result structure; a [B, h, 1, 1] zero is free
        drpb = jnp.zeros((q.shape[0], q.shape[2], 1, 1), jnp.float32)
    return dq, dk, dv, drpb


def _rpb_operand(rpb, geo: _Geometry, heads: int):
    """The bias as `[h, R]`; a `[h, 1]` placeholder without one (keeps the op signature fixed)."""
    if rpb is None:
        return jnp.zeros((heads, 1), jnp.float32)
    return _rpb_rows(rpb, geo)


def _na_forward(geo: _Geometry, q, k, v, rpb):
    op = batch_head_parallel(_rows_forward, geo, ("x", "x", "x", "rpb"), ("x", "row"))
    out, lse = op(
        _to_rows(q, geo), _to_rows(k, geo), _to_rows(v, geo),
        _rpb_operand(rpb, geo, q.shape[-2]),
    )  # fmt: skip
    return _from_rows(out, q), lse.reshape(q.shape[:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _na(geo, q, k, v, rpb):
    return _na_forward(geo, q, k, v, rpb)


def _na_fwd(geo, q, k, v, rpb):
    out, lse = _na_forward(geo, q, k, v, rpb)
    return (out, lse), (q, k, v, rpb, out, lse)


def _na_bwd(geo, res, cts):
    q, k, v, rpb, out, lse = res
    d_out, d_lse = cts
    d_out = d_out.astype(q.dtype)
    # delta_i = sum_d dO * O; the lse cotangent enters as ds = p * (dp - delta + dlse).
    di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    di = di - d_lse.astype(jnp.float32)
    b, h = q.shape[0], q.shape[-2]
    op = batch_head_parallel(
        _rows_backward, geo, ("x", "x", "x", "rpb", "x", "row", "row"), ("x", "x", "x", "drpb")
    )
    dq, dk, dv, drpb = op(
        _to_rows(q, geo), _to_rows(k, geo), _to_rows(v, geo), _rpb_operand(rpb, geo, h),
        _to_rows(d_out, geo), lse.reshape(b, geo.n, h), di.reshape(b, geo.n, h),
    )  # fmt: skip
    dq, dk, dv = (_from_rows(g, x) for g, x in ((dq, q), (dk, k), (dv, v)))
    # Sum the per-batch partials (an all-reduce when the batch is sharded).
    drpb = None if rpb is None else _drpb_unpack(jnp.sum(drpb, axis=0), rpb, geo)
    return dq, dk, dv, drpb


_na.defvjp(_na_fwd, _na_bwd)


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------


def unsupported_reason(shape, dtype, params: NAParams, has_rpb: bool) -> str | None:
    """Why the Pallas kernel cannot run a call, or None when it can.

    Args:
      shape: query shape `[batch, *spatial, heads, head_dim]`.
      dtype: input dtype.
      params: validated window arguments.
      has_rpb: whether a relative positional bias is given.

    Returns:
      A human-readable reason, or None.
    """
    del has_rpb  # bias on or off are both supported
    if jnp.dtype(dtype).name not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} is not supported (float16, bfloat16, float32)"
    if not 1 <= params.ndim <= 3:
        return f"{params.ndim} spatial axes are not supported (1, 2 or 3)"
    head_dim = shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported"
    if max(params.kernel_size) > _MAX_KERNEL:
        return f"kernel_size {params.kernel_size} has an entry > {_MAX_KERNEL}"
    if math.prod(shape[1:-2]) >= 2**31 // 2:
        return "more than 2**30 spatial positions"
    return None


def na_pallas(q, k, v, rpb, params: NAParams, config: NATileConfig | None = None, interpret=None):
    """Fused neighborhood attention (Pallas/Triton; interpret mode off-GPU).

    Args:
      q, k, v: `[batch, *spatial, heads, head_dim]`, float16/bfloat16/float32.
      rpb: `[heads, *(2K-1)]` or None.
      params: validated window arguments.
      config: tile configuration; `default_config(...)` when None.
      interpret: force Pallas interpret mode on/off; None = interpret unless on a GPU (False
        on a CPU host is only useful to lower for CUDA, e.g. to check the Triton lowering).

    Returns:
      (out in q's dtype, lse `[batch, *spatial, heads]` float32).

    Raises:
      ValueError: if `unsupported_reason` rejects the call or the config does not match it.
    """
    reason = unsupported_reason(q.shape, q.dtype, params, rpb is not None)
    if reason is not None:
        raise ValueError(f"na_pallas: {reason}.")
    if config is None:
        config = default_config(params, q.shape[-1], q.dtype)
    if len(config.block_q) != params.ndim:
        raise ValueError(
            f"na_pallas: `config.block_q` must have {params.ndim} entries for a "
            f"{params.ndim}-D call, got {config.block_q!r}."
        )
    geo = _geometry(tuple(q.shape[1:-2]), params, q.shape[-1], rpb is not None, config, interpret)
    if rpb is not None:
        rpb = rpb.astype(jnp.float32) if rpb.dtype == jnp.float64 else rpb
    return _na(geo, q, k, v, rpb)
