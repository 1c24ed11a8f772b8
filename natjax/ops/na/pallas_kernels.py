"""Pallas (Triton) kernels of neighborhood attention: static geometry, index math, kernels.

Every call is padded to three spatial axes `(z, y, x)` (missing leading axes have size 1 and
kernel 1); `x` is the vector axis. Tiles are boxes in dilation-group coordinates. Windows follow
`spec.axis_windows` (NATTEN 0.17: shifted at borders, causal = the `K` most recent), evaluated
in-kernel from the program id. All Triton tensor shapes are powers of two and every `tl.dot`
operand dimension is >= 16. See `pallas_triton` for the formulation and the custom VJP.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from natjax.ops.na.pallas_tuning import next_pow2
from natjax.ops.na.spec import NAParams

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite mask value: no inf - inf NaNs

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
class Geometry:
    """Everything the kernels need to know statically (hashable: part of the jit cache key)."""

    axes: tuple[_Axis, _Axis, _Axis]  # (z, y, x); x is the vector axis
    head_dim: int  # padded, a power of two
    scale: float
    has_rpb: bool
    num_warps: int
    num_stages: int
    keys_per_step: int = 64
    force_interpret: bool | None = None  # None: decided at lowering (compiled for cuda)

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
    def rows_per_step(self) -> int:
        """Halo rows (or inverse-neighborhood chunks) handled per loop step: about
        `keys_per_step` keys per matmul, but no more rows than a tile's halo can have."""
        az, ay = self.axes[:2]
        max_rows = (az.tile + az.kernel - 1) * (ay.tile + ay.kernel - 1)
        want = max(1, self.keys_per_step // self.halo_x)
        return min(want, 1 << (max_rows.bit_length() - 1))

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


def make_geometry(
    spatial, params: NAParams, head_dim: int, has_rpb: bool, config, interpret=None
) -> Geometry:
    pad = 3 - len(spatial)
    block = (1,) * pad + tuple(config.block_q)
    axes = [_Axis(1, 1, 1, False, 1) for _ in range(pad)]
    for i, n in enumerate(spatial):
        axes.append(
            _Axis(n, params.kernel_size[i], params.dilation[i], params.is_causal[i], block[pad + i])
        )
    return Geometry(
        axes=tuple(axes),
        head_dim=max(16, next_pow2(head_dim)),
        scale=float(params.scale),
        has_rpb=has_rpb,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        keys_per_step=config.keys_per_step,
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


def _decode_program(geo: Geometry, pid):
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


def _tile_coords(geo: Geometry):
    """Offsets of the flattened tile's elements per axis, `[tile_volume]` each."""
    tz, ty, tx = (a.tile for a in geo.axes)
    t = jnp.arange(geo.tile_volume, dtype=jnp.int32)
    return [_div(t, ty * tx), _rem(_div(t, tx), ty), _rem(t, tx)]


def _flat(geo: Geometry, groups, pos):
    """Flat spatial index of group positions `pos` (absolute = group + d * pos)."""
    (lz, ly, lx) = (a.length for a in geo.axes)
    absz, absy, absx = (g + a.dilation * p for a, g, p in zip(geo.axes, groups, pos, strict=True))
    return (absz * ly + absy) * lx + absx


def _rows(ref, idx, geo: Geometry):
    """Gathers rows `idx` (`[n]` int32, in range) of a `[N, D]` ref -> `[n, D]`."""
    cols = jnp.arange(geo.head_dim, dtype=jnp.int32)
    return ref[idx[:, None], cols[None, :]]


def _store_index(idx, valid, geo: Geometry):
    """Masked-off lanes point one past the block: Triton never touches them (masked), and the
    interpret-mode scatter drops them instead of racing with a real row at a clamped index."""
    return jnp.where(valid, idx, geo.n)


def _store_rows(ref, idx, val, valid, geo: Geometry):
    cols = jnp.arange(geo.head_dim, dtype=jnp.int32)
    mask = valid[:, None] & (cols[None, :] >= 0)
    rows = _store_index(idx, valid, geo)
    plgpu.store(ref.at[rows[:, None], cols[None, :]], val.astype(ref.dtype), mask=mask)


def _dot(a, b, *, trans_b=False, trans_a=False):
    """Float32-accumulating matmul; IEEE float32 when both operands are float32 (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _query_tile(geo: Geometry):
    """Per-program query tile: groups, group lengths, positions, validity, flat indices."""
    groups, tiles = _decode_program(geo, pl.program_id(2))
    glen = [_group_len(a, g) for a, g in zip(geo.axes, groups, strict=True)]
    coords = _tile_coords(geo)
    pos = [t * a.tile + c for a, t, c in zip(geo.axes, tiles, coords, strict=True)]
    valid = (pos[0] < glen[0]) & (pos[1] < glen[1]) & (pos[2] < glen[2])
    flat = jnp.where(valid, _flat(geo, groups, pos), 0)
    return groups, tiles, glen, pos, valid, flat


def _halo(geo: Geometry, tiles, glen):
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


def _key_block(geo: Geometry, groups, glen, hs, hn, step, rows: int):
    """Keys of loop step `step`: `rows` consecutive halo rows of `halo_x` keys, flattened.

    Returns per-axis key positions (`[nk]` each), their validity and flat indices.
    """
    j = jnp.arange(rows * geo.halo_x, dtype=jnp.int32)
    n_rows = hn[0] * hn[1]
    row = step * rows + _div(j, geo.halo_x)
    kx = hs[2] + _rem(j, geo.halo_x)
    valid = (kx < glen[2]) & (row < n_rows)
    row = jnp.minimum(row, n_rows - 1)
    kz = hs[0] + _div(row, hn[1])
    ky = hs[1] + _rem(row, hn[1])
    kflat = jnp.where(valid, _flat(geo, groups, [kz, ky, kx]), 0)
    return [kz, ky, kx], valid, kflat


def _halo_stepper(geo: Geometry, groups, tiles, glen, qpos, qvalid, q, k_ref, v_ref, rpb_ref,
                  rows: int):  # fmt: skip
    """The loop over a query tile's key halo, shared by the forward and dq kernels.

    Returns `(step_scores, hs, hn)`: `step_scores(step)` loads that step's `rows` halo rows and
    gives `(scores [nq, nk], mask, k, v, kpos)`; `hs`/`hn` are the halo's start and extent.
    """
    wstart = [_win_start(a, p, g)[:, None] for a, p, g in zip(geo.axes, qpos, glen, strict=True)]
    qpos2 = [p[:, None] for p in qpos]
    hs, hn = _halo(geo, tiles, glen)

    def step_scores(step):
        kpos, kvalid, kflat = _key_block(geo, groups, glen, hs, hn, step, rows)
        k = _rows(k_ref, kflat, geo)
        v = _rows(v_ref, kflat, geo)
        s, mask = _scores(
            geo, q, k, qpos2, [p[None, :] for p in kpos], qvalid[:, None], kvalid[None, :],
            wstart, rpb_ref,
        )  # fmt: skip
        return s, mask, k, v, kpos

    return step_scores, hs, hn


def _n_steps(total, rows: int):
    return _div(total + (rows - 1), rows)


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


def forward_kernel(q_ref, k_ref, v_ref, *refs, geo: Geometry):
    rpb_ref = refs[0] if geo.has_rpb else None
    o_ref, lse_ref = refs[-2:]
    groups, tiles, glen, qpos, qvalid, qflat = _query_tile(geo)
    q = _rows(q_ref, qflat, geo)
    rows = geo.rows_per_step
    step_scores, hs, hn = _halo_stepper(
        geo, groups, tiles, glen, qpos, qvalid, q, k_ref, v_ref, rpb_ref, rows
    )

    def body(step, carry):
        acc, m, denom = carry
        s, _, _, v, _ = step_scores(step)
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
    acc, m, denom = lax.fori_loop(0, _n_steps(hn[0] * hn[1], rows), body, init)
    _store_rows(o_ref, qflat, acc / denom[:, None], qvalid, geo)
    plgpu.store(lse_ref.at[_store_index(qflat, qvalid, geo)], m + jnp.log(denom), mask=qvalid)


def dq_kernel(q_ref, k_ref, v_ref, *refs, geo: Geometry):
    if geo.has_rpb:
        rpb_ref, do_ref, lse_ref, di_ref, dq_ref, drpb_ref = refs
    else:
        (do_ref, lse_ref, di_ref, dq_ref), rpb_ref, drpb_ref = refs, None, None
    groups, tiles, glen, qpos, qvalid, qflat = _query_tile(geo)
    q = _rows(q_ref, qflat, geo)
    do = _rows(do_ref, qflat, geo)
    lse = lse_ref[qflat]
    di = di_ref[qflat]
    (az, ay, ax_) = geo.axes
    r_outer, r_x = geo.drpb_shape
    # The bias-gradient binning below needs one halo row per step (one (z, y) bin per query).
    rows = 1 if drpb_ref is not None else geo.rows_per_step
    step_scores, hs, hn = _halo_stepper(
        geo, groups, tiles, glen, qpos, qvalid, q, k_ref, v_ref, rpb_ref, rows
    )

    def body(step, carry):
        dq, drpb = carry
        s, mask, k, v, kpos = step_scores(step)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - di[:, None])
        dq = dq + _dot(ds.astype(k.dtype), k)
        if drpb_ref is not None:
            # Bin ds by bias index: x bins with a one-hot reduction over the row's keys, then
            # the (z, y) bin of each query with a one-hot matmul. Masked entries have ds == 0.
            kz = hs[0] + _div(step, hn[1])  # this step's single halo row
            ky = hs[1] + _rem(step, hn[1])
            rel_x = kpos[2][None, :] - qpos[2][:, None] + ax_.kernel - 1  # [nq, halo_x]
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
    dq, drpb = lax.fori_loop(0, _n_steps(hn[0] * hn[1], rows), body, init)
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


def dkv_kernel(q_ref, k_ref, v_ref, *refs, geo: Geometry):
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
    items = counts[0] * counts[1] * n_chunks  # (z row, y row, x chunk) triples
    rows = geo.rows_per_step
    j = jnp.arange(rows * chunk, dtype=jnp.int32)
    j_item, j_x = _div(j, chunk), _rem(j, chunk)

    def body(step, carry):
        dk, dv = carry
        item = step * rows + j_item
        item_valid = item < items
        item = jnp.minimum(item, items - 1)
        c = _rem(item, n_chunks)
        rr = _div(item, n_chunks)
        qz = los[0] + _div(rr, counts[1])
        qy = los[1] + _rem(rr, counts[1])
        qx = los[2] + c * chunk + j_x
        qvalid = item_valid & (qx < los[2] + counts[2])
        qflat = jnp.where(qvalid, _flat(geo, groups, [qz, qy, qx]), 0)
        q = _rows(q_ref, qflat, geo)
        do = _rows(do_ref, qflat, geo)
        lse = lse_ref[qflat]
        di = di_ref[qflat]
        qpos = [qz, qy, qx]
        wstart = [
            _win_start(a, p, g)[:, None] for a, p, g in zip(geo.axes, qpos, glen, strict=True)
        ]
        s, mask = _scores(
            geo, q, k, [p[:, None] for p in qpos], kpos2, qvalid[:, None], kvalid[None, :],
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
    dk, dv = lax.fori_loop(0, _n_steps(items, rows), body, (zeros, zeros))
    _store_rows(dk_ref, kflat, dk * geo.scale, kvalid, geo)
    _store_rows(dv_ref, kflat, dv, kvalid, geo)
