"""The Pallas (Triton) dk/dv kernel of neighborhood attention: key tiles, inverse neighbourhoods.

One program per key tile and kv head (grid `(tiles, kv_heads, batch)`, tile fastest). It loops
over the tile's inverse neighbourhood (the contiguous range of queries whose windows can contain
one of its keys) in chunks of `(z row, y row, x chunk)` items, and, under GQA/MQA, over the
`group` query heads that read this kv head: the items of all of them form one loop, so dk/dv are
summed over the group in registers and never exist per query head in HBM.

Windows: the inverse range of every key tile comes from `spec.axis_windows` (NATTEN 0.21's
stride and even kernels, NATTEN 0.17 otherwise) as a small static int32 table (`dkv_tables`, read
once per program); each query row's window start is spec.py's rule evaluated in-kernel
(`win_start`: a few integer ops per row, fewer registers than a per-row table gather; with
stride 1 it is NATTEN 0.17's `clamp(p - K // 2, 0, G - K)`), and a CPU test checks it against
`spec.axis_windows` (`tests/test_na_pallas.py`). Per score the window test is one subtract and
one unsigned compare per real axis (`0 <= key - start < width`), and the bias is read from
`rpb * log2(e)` at a linear index (`(key - query) + K - 1` per axis, in group rows: spec.py's
index, also with a stride) with a masked load.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from natjax.ops.na.pallas_kernels import (
    LOG2E,
    NEG,
    Geometry,
    _decode_program,
    _div,
    _dot,
    _flat3,
    _group_len,
    _rem,
    _rows,
    _store_rows,
    _tile_coords,
)
from natjax.ops.na.pallas_tuning import next_pow2
from natjax.ops.na.spec import axis_windows


@dataclasses.dataclass(frozen=True, eq=False)
class DkvTables:
    """The dk/dv kernel's int32 `meta` array and per-axis offsets into it.

    Per axis (z, y, x): `lo[g, t]` and `count[g, t]` (indexed `g * n_tiles + t`): the queries
    (group rows) whose windows can contain a key of tile `t` of group `g` (count 0 for a tile of
    padding only).
    """

    meta: np.ndarray
    lo: tuple[int, int, int]
    count: tuple[int, int, int]
    max_count: tuple[int, int, int]


def _axis_tables(ax) -> tuple[np.ndarray, ...]:
    """`(lo, count)` of one axis (`DkvTables`)."""
    win = axis_windows(ax.length, ax.kernel, ax.dilation, ax.causal, ax.stride)
    rows = win.key // ax.dilation
    start = np.where(win.valid, rows, np.iinfo(np.int64).max).min(axis=1)
    width = win.valid.sum(axis=1)
    end = start + width - 1  # windows are contiguous runs of group rows
    n_tiles = -(-ax.rows // ax.tile)
    lo = np.zeros((ax.dilation, n_tiles), np.int64)
    count = np.zeros((ax.dilation, n_tiles), np.int64)
    for g in range(ax.dilation):
        s, e = start[g :: ax.dilation], end[g :: ax.dilation]  # group g's queries, row order
        for t in range(n_tiles):
            k0, k1 = t * ax.tile, min((t + 1) * ax.tile, len(s)) - 1
            hit = np.nonzero((s <= k1) & (e >= k0))[0]
            if k1 >= k0 and hit.size:
                # Window starts and ends are non-decreasing in the query, so `hit` is one run.
                lo[g, t], count[g, t] = hit[0], hit[-1] - hit[0] + 1
    return lo, count


@functools.lru_cache(maxsize=256)
def dkv_tables(geo: Geometry) -> DkvTables:
    """Builds the dk/dv kernel's window tables from `spec.axis_windows`."""
    parts, offsets, max_count = [], {"lo": [], "count": []}, []
    size = 0
    for ax in geo.axes:
        for name, arr in zip(offsets, _axis_tables(ax), strict=True):
            offsets[name].append(size)
            parts.append(np.asarray(arr, np.int32).reshape(-1))
            size += parts[-1].size
            if name == "count":
                max_count.append(int(arr.max()))
    return DkvTables(
        meta=np.concatenate(parts),
        max_count=tuple(max_count),
        **{k: tuple(v) for k, v in offsets.items()},
    )


def win_start(ax, p, glen):
    """Window of group rows `p` (int32 `[n]`) in a group of `glen` rows, by spec.py's rules:
    `(start, width)`, the window being group rows `start .. start + width - 1` (`start` may be
    < 0 on a causal axis: rows that do not exist are never keys).

    Non-causal: the stride group's leader `lead = min((p // s) * s + s // 2, glen - 1)` and
    `start = clamp(lead - K // 2, 0, glen - K)`, width K (even K: `K // 2` keys before).
    Causal: `lead = min((p // s) * s + s - 1, glen - 1)`, keys `lead - K + 1 .. p`, so the width
    is `K - (lead - p)`: a Python int K with stride 1, else an int32 `[n]`.
    """
    s, k = ax.stride, ax.kernel
    lead = p
    if s > 1:
        lead = jnp.minimum(_div(p, s) * s + (s - 1 if ax.causal else s // 2), glen - 1)
    if ax.causal:
        return lead - (k - 1), (k if s == 1 else k - (lead - p))
    return jnp.minimum(jnp.maximum(lead - k // 2, 0), glen - k), k


def _real(ax) -> bool:
    """Whether an axis takes part in the window test (not a 1-D/2-D call's padding axis)."""
    return not (ax.length == 1 and ax.tile == 1)


def dkv_kernel(q_ref, k_ref, v_ref, *refs, geo: Geometry):
    """dk, dv of one key tile and kv head (summed over the kv head's `group` query heads).

    Refs: `q [N, group * D]`, `k [N, D]`, `v [N, Dv]`, (`rpb [h * R]` log2 units), `meta [M]`,
    `do [N, group * Dv]`, `lse, di [N, group]` (`[N]` without GQA), `dk [N, D]`, `dv [N, Dv]`.
    """
    if geo.has_rpb:
        rpb_ref, meta_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref = refs
    else:
        (meta_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref), rpb_ref = refs, None
    tab = dkv_tables(geo)
    grp = geo.group
    groups, tiles_, local = _decode_program(geo, pl.program_id(0))
    glen = [_group_len(a, g) for a, g in zip(geo.axes, groups, strict=True)]
    coords = _tile_coords(geo)
    kpos = [t * a.tile + c for a, t, c in zip(geo.axes, tiles_, coords, strict=True)]
    kvalid = (kpos[0] < glen[0]) & (kpos[1] < glen[1]) & (kpos[2] < glen[2])
    kflat = jnp.where(kvalid, _flat(geo, groups, kpos), 0)
    k = _rows(k_ref, kflat, geo.head_dim)
    v = _rows(v_ref, kflat, geo.value_dim)
    kpos2 = [p[None, :] for p in kpos]
    los = [meta_ref[tab.lo[a] + local[a]] for a in range(3)]
    counts = [meta_ref[tab.count[a] + local[a]] for a in range(3)]
    az, ay, ax_ = geo.axes
    chunk = max(16, next_pow2(max(ax_.tile + ax_.kernel - 1, tab.max_count[2])))
    n_chunks = _div(counts[2] + (chunk - 1), chunk)
    items = counts[0] * counts[1] * n_chunks  # (z row, y row, x chunk) triples per query head
    total = items * grp  # ... and per query head of the group
    max_rows = max(
        (az.tile + az.kernel - 1) * (ay.tile + ay.kernel - 1), tab.max_count[0] * tab.max_count[1]
    )
    rows = min(max(1, geo.keys_per_step // chunk), 1 << (max_rows.bit_length() - 1))
    j = jnp.arange(rows * chunk, dtype=jnp.int32)
    j_item, j_x = _div(j, chunk), _rem(j, chunk)
    c = geo.scale * LOG2E
    if rpb_ref is not None:
        # The group's first query head's bias in the flat `[h * R]` operand: its offset joins
        # the per-key term (a GQA row adds its head's offset to the per-query term).
        head0 = pl.program_id(1) * grp
        k_term = (kpos[0] * ay.bins + kpos[1]) * ax_.bins + kpos[2] + head0 * geo.rpb_len

    def body(step, carry):
        dk, dv = carry
        item = step * rows + j_item
        item_valid = item < total
        item = jnp.minimum(item, total - 1)
        if grp > 1:  # the query head of the group this row belongs to
            head = _div(item, items)
            item = item - head * items
        ch = _rem(item, n_chunks)
        rr = _div(item, n_chunks)
        qz = los[0] + _div(rr, counts[1])
        qy = los[1] + _rem(rr, counts[1])
        qx = los[2] + ch * chunk + j_x
        qvalid = item_valid & (qx < los[2] + counts[2])
        qflat = jnp.where(qvalid, _flat(geo, groups, [qz, qy, qx]), 0)
        if grp > 1:
            q = _rows(q_ref, qflat, geo.head_dim, head * geo.head_dim)
            do = _rows(do_ref, qflat, geo.value_dim, head * geo.value_dim)
            lse, di = lse_ref[qflat, head], di_ref[qflat, head]
        else:
            q = _rows(q_ref, qflat, geo.head_dim)
            do = _rows(do_ref, qflat, geo.value_dim)
            lse, di = lse_ref[qflat], di_ref[qflat]
        lse2 = jnp.where(qvalid, lse * LOG2E, -NEG)  # padded queries: p = 0
        qpos = [qz, qy, qx]
        # Window test per real axis: 0 <= key - start < width as one unsigned compare (a negative
        # offset wraps to >= 2**31). Keys past a group's end are in no window, and padded queries
        # have p = 0 (lse2 above): no validity terms.
        mask = None
        for ax, gl, p, kp in zip(geo.axes, glen, qpos, kpos2, strict=True):
            if not _real(ax):
                continue
            start, width = win_start(ax, p, gl)
            off = kp - start[:, None]
            if isinstance(width, int):
                width = np.uint32(width)
            else:  # causal with a stride: fewer than K keys before the stride leader
                width = lax.bitcast_convert_type(width, jnp.uint32)[:, None]
            ok = lax.bitcast_convert_type(off, jnp.uint32) < width
            mask = ok if mask is None else mask & ok
        if mask is None:  # a one-position map
            mask = jnp.ones((rows * chunk, geo.tile_volume), bool)
        s = _dot(q, k, trans_b=True) * c
        if rpb_ref is not None:
            # The flat bias index sum_a stride_a * (key_a - query_a + K_a - 1) is linear: one add
            # per score of a per-key and a per-query term.
            strides = (ay.bins * ax_.bins, ax_.bins, 1)
            q_term = sum(st * (a.kernel - 1 - p) for st, a, p in zip(strides, geo.axes, qpos,
                                                                     strict=True))  # fmt: skip
            if grp > 1:
                q_term = q_term + head * geo.rpb_len
            # A masked load: out-of-window scores get NEG (finite; s + NEG stays finite), so
            # neither the index nor the score needs a select.
            idx = k_term[None, :] + q_term[:, None]
            s = s + plgpu.load(rpb_ref.at[idx], mask=mask, other=NEG)
        else:
            s = jnp.where(mask, s, NEG)
        p = jnp.exp2(s - lse2[:, None])  # [chunk, nk]
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - di[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    nk = geo.tile_volume
    init = (
        jnp.zeros((nk, geo.head_dim), jnp.float32),
        jnp.zeros((nk, geo.value_dim), jnp.float32),
    )
    dk, dv = lax.fori_loop(0, _div(total + (rows - 1), rows), body, init)
    _store_rows(dk_ref, kflat, dk * geo.scale, kvalid, geo)
    _store_rows(dv_ref, kflat, dv, kvalid, geo)


def _flat(geo: Geometry, groups, pos):
    """Flat spatial index of group positions `pos` (absolute = group + d * pos)."""
    absz, absy, absx = (g + a.dilation * p for a, g, p in zip(geo.axes, groups, pos, strict=True))
    return _flat3(geo, absz, absy, absx)
