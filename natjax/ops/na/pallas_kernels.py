"""Pallas (Triton) kernels of neighborhood attention on the tiled formulation (`tiles.py`).

Every call is padded to three spatial axes `(z, y, x)` (missing leading axes have size 1 and
kernel 1); `x` is the vector axis. Tiles are boxes in dilation-group coordinates; each axis's
query tiles, clamped key-halo starts and per-tile-class tables come from `tiles.axis_tiling`
(`spec.axis_windows`: NATTEN 0.17 windows, NATTEN 0.21's stride and even kernels), so no window
rule is re-derived here. See `pallas_triton` for the `pallas_call`s, the layout and the custom
VJP, and `pallas_dkv` for the dk/dv kernel.

Forward and dq kernels (one program per query tile; grid `(tiles, heads, batch)`, tile fastest so
that neighbouring tiles of one image run together and share their halos in L2):

* the tile's key halo is `halo_z x halo_y` rows of `halo_x` keys (a static count); each loop step
  takes one row: its keys are one contiguous run along `x` (stride `dilation_x`), scored against
  the whole query tile with one matmul;
* mask and bias come from one small table per call, `T[class_x, o, ix, j]` (log2 units): the bias
  `rpb[o, rel_x]` where key `j` of the row is in the x-window of query column `ix` of an
  x-tile class, `-inf` (finite) elsewhere; `o` is the query's outer (z, y) bias bin for this row,
  or a sentinel row of `-inf` when the row is outside the query's (z, y) window. Per score that is
  one address add, one load and one add: no per-score index or mask arithmetic;
* softmax in base 2: `log2(e)` is folded into the scale (`exp2`), the lse is stored in natural
  units.

dk/dv kernel (`pallas_dkv`): one program per key tile and kv head, looping over the tile's
inverse neighbourhood (the queries whose windows can contain it) in chunks, with the window mask
evaluated in-kernel and the bias read from `rpb * log2(e)` at a linear index.

d_rpb: the dq kernel (tiles with Tz = 1, Ty >= 16) sums `ds` by outer-y bin with a one-hot
matmul over the tile's y rows (`E[oy, (ix, j)]`, tensor cores, float32-exact via a bf16 hi/lo
split), one partial per program and halo z-row; XLA sums the partials over the batch and maps
them to bias bins with two static one-hot matmuls (z bin per z-row and class, x bin per `(ix, j)`
and x-class): deterministic, no atomics. 1-D calls have no outer rows: `E` is the sum of `ds`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from natjax.ops.na import tiles
from natjax.ops.na.pallas_tuning import next_pow2
from natjax.ops.na.spec import NAParams

NEG = -0.7 * float(np.finfo(np.float32).max)  # finite "-inf": no inf - inf NaNs
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# --------------------------------------------------------------------------------------------
# Static geometry.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Axis:
    """One spatial axis and the kernel's tile extent along it (a power of two)."""

    length: int
    kernel: int
    dilation: int
    causal: bool
    tile: int
    stride: int = 1

    @property
    def rows(self) -> int:  # longest dilation group
        return -(-self.length // self.dilation)

    @property
    def tab(self) -> tiles.AxisTiling:
        return tiles.axis_tiling(
            self.length, self.kernel, self.dilation, self.causal, self.tile, self.stride
        )

    @property
    def tile_eff(self) -> int:  # the shared tables clip a tile to the group rows
        return self.tab.tile

    @property
    def n_tiles(self) -> int:
        return -(-self.rows // self.tile)

    @property
    def programs(self) -> int:
        return self.dilation * self.n_tiles

    @property
    def bins(self) -> int:
        return 2 * self.kernel - 1


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything one kernel needs to know statically (hashable: part of the jit cache key)."""

    axes: tuple[_Axis, _Axis, _Axis]  # (z, y, x); x is the vector axis
    head_dim: int  # query/key head_dim, padded to a power of two >= 16
    value_dim: int  # value head_dim, padded the same way
    scale: float
    has_rpb: bool
    num_warps: int
    num_stages: int
    keys_per_step: int = 64  # dk/dv kernel: queries per inner step
    force_interpret: bool | None = None  # None: decided at lowering (compiled for cuda)
    group: int = 1  # query heads per kv head (GQA/MQA); set per shard from the operand shapes

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
    def outer_rows(self) -> int:
        """Query rows of a tile in the outer axes, `Tz * Ty`."""
        return self.axes[0].tile * self.axes[1].tile

    @property
    def halo_x(self) -> int:
        """Keys per halo row, padded to a power of two >= 16 (Triton dot operands)."""
        return max(16, next_pow2(self.axes[2].tab.halo))

    @property
    def steps(self) -> int:
        """Halo rows of a query tile: one loop step each."""
        return self.axes[0].tab.halo * self.axes[1].tab.halo

    @property
    def outer_bins(self) -> int:
        """Bias bins of the outer axes (1 without a bias: the row is in the window or not)."""
        if not self.has_rpb:
            return 1
        return self.axes[0].bins * self.axes[1].bins

    @property
    def rpb_len(self) -> int:
        return self.axes[0].bins * self.axes[1].bins * self.axes[2].bins

    @property
    def drpb_rows(self) -> int:
        """Outer-y bins of one z-row's d_rpb partial (padded for the one-hot matmul)."""
        return max(16, next_pow2(self.axes[1].bins))

    @property
    def drpb_block(self) -> tuple[int, int]:
        """Per-program d_rpb partial `E`: `[halo_z * drpb_rows, Tx * halo_x]`, one block of
        rows per halo z-row; 1-D calls (no outer rows) keep `ds`'s own shape `[Tx, halo_x]`."""
        if self.outer_rows == 1:
            return (self.axes[2].tile, self.halo_x)
        return (self.axes[0].tab.halo * self.drpb_rows, self.axes[2].tile * self.halo_x)

    def check(self, kernel: str) -> None:
        """Raises ValueError for tiles a kernel cannot use."""
        tz, ty, _ = (a.tile for a in self.axes)
        if kernel == "dq" and self.has_rpb and self.outer_rows > 1 and (tz != 1 or ty < 16):
            raise ValueError(
                "the dq kernel with a bias needs Tz == 1 and Ty >= 16 (its d_rpb matmul "
                "contracts over the tile's y rows) or a 1-D call, got tile "
                f"{tuple(a.tile for a in self.axes)}."
            )


def make_geometry(
    spatial, params: NAParams, head_dim: int, has_rpb: bool, config, interpret=None,
    value_dim: int | None = None,
) -> Geometry:  # fmt: skip
    """Pads the call to (z, y, x) and fixes one kernel's tile.

    Args:
      spatial: spatial shape (1 to 3 axes).
      params: validated window arguments.
      head_dim: query head_dim before padding.
      has_rpb: whether a bias is given.
      config: the kernel's `NATileConfig`.
      interpret: force interpret mode on/off; None decides at lowering.
      value_dim: value head_dim before padding (None: `head_dim`).

    Returns:
      The kernel's `Geometry`.
    """
    pad = 3 - len(spatial)
    block = (1,) * pad + tuple(config.block_q)
    axes = [_Axis(1, 1, 1, False, 1) for _ in range(pad)]
    for i, n in enumerate(spatial):
        axes.append(
            _Axis(
                n, params.kernel_size[i], params.dilation[i], params.is_causal[i],
                block[pad + i], params.stride[i],
            )
        )  # fmt: skip
    return Geometry(
        axes=tuple(axes),
        head_dim=max(16, next_pow2(head_dim)),
        value_dim=max(16, next_pow2(head_dim if value_dim is None else value_dim)),
        scale=float(params.scale),
        has_rpb=has_rpb,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        keys_per_step=config.keys_per_step,
        force_interpret=interpret,
    )


# --------------------------------------------------------------------------------------------
# Static tables (numpy, built once per geometry).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Tables:
    """The int32 `meta` array a query-tile kernel reads, its offsets, and the x-tables.

    `meta` holds, per axis, the halo start and class of every (group, tile) (`hs`, `cls`,
    indexed `group * n_tiles + tile`) and, for the outer axes, `code[class, row, halo row]`: the
    bias index of that halo row for that query row, -1 outside its window (or padding).
    `rel_x[class_x, ix, j]` is the x bias index of halo key `j` for query column `ix`, -1 where
    masked (incl. padded columns and keys).
    """

    meta: np.ndarray
    hs: tuple[int, int, int]
    cls: tuple[int, int, int]
    code: tuple[int, int]
    rel_x: np.ndarray
    tile_class_x: np.ndarray  # [programs_x]
    table_len: int  # entries per head of the mask/bias table


def _padded(a: np.ndarray, shape, fill) -> np.ndarray:
    out = np.full(shape, fill, a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


@functools.lru_cache(maxsize=256)
def tables(geo: Geometry) -> Tables:
    """Builds the kernel tables from the shared per-axis tile tables."""
    parts, offset = [], 0
    hs, cls, code = [], [], []

    def add(x):
        nonlocal offset
        parts.append(np.asarray(x, np.int32).reshape(-1))
        offset += parts[-1].size
        return offset - parts[-1].size

    for ax in geo.axes:
        t = ax.tab
        hs.append(add(t.halo_start))
        cls.append(add(t.tile_class))
    for ax in geo.axes[:2]:
        t = ax.tab
        c = np.where(t.mask, t.rpb_index, -1)
        code.append(add(_padded(c, (t.n_classes, ax.tile, t.halo), -1)))
    tx = geo.axes[2].tab
    rel = np.where(tx.mask, tx.rpb_index, -1)
    rel_x = _padded(rel, (tx.n_classes, geo.axes[2].tile, geo.halo_x), -1)
    return Tables(
        meta=np.concatenate(parts),
        hs=tuple(hs),
        cls=tuple(cls),
        code=tuple(code),
        rel_x=rel_x,
        tile_class_x=np.asarray(tx.tile_class, np.int32).reshape(-1),
        table_len=rel_x.size * (geo.outer_bins + 1),
    )


def bias_table(geo: Geometry, rpb_rows) -> jnp.ndarray:
    """The per-call mask/bias table `T[h, class_x, o, ix, j]` (log2 units), flattened.

    Args:
      geo: the kernel geometry.
      rpb_rows: the bias as `[h, rpb_len]`, or None.

    Returns:
      `[h, n_cx * (O + 1) * Tx * halo_x]` float32 (`h = 1` without a bias); row `o = O` is the
      all-masked sentinel.
    """
    tab = tables(geo)
    n_o = geo.outer_bins
    rel = tab.rel_x  # [C, Tx, J]
    bx = geo.axes[2].bins
    idx = np.arange(n_o)[None, :, None, None] * bx + rel[:, None]  # [C, O, Tx, J]
    valid = np.broadcast_to(rel[:, None] >= 0, idx.shape)
    sentinel = np.zeros(idx.shape[:1] + (1,) + idx.shape[2:], bool)
    valid = np.concatenate([valid, sentinel], axis=1)
    idx = np.concatenate([idx, np.zeros_like(idx[:, :1])], axis=1)
    if rpb_rows is None:
        return jnp.asarray(np.where(valid, 0.0, NEG).astype(np.float32).reshape(1, -1))
    flat = jnp.asarray(np.where(valid, idx, 0).reshape(-1))
    vals = jnp.take(rpb_rows.astype(jnp.float32) * LOG2E, flat, axis=1)
    return jnp.where(jnp.asarray(valid.reshape(-1)), vals, NEG)


def drpb_from_partials(geo: Geometry, e) -> jnp.ndarray:
    """Per-program `E` partials -> the bias gradient, deterministically (static one-hot matmuls).

    `E[p, rz, oy, (ix, j)]` holds program `p`'s `ds` summed by outer-y bin for halo z-row `rz`;
    the z bin of that row (`code_z`) and the x bin of `(ix, j)` (`rel_x`) depend only on the
    program's z- and x-class, so two matmuls with static one-hot matrices map them to bins.

    Args:
      geo: the dq kernel's geometry.
      e: `[h, programs * Eo, Ex]` float32 (already summed over the batch).

    Returns:
      `[h, outer bins, x bins]` float32.
    """
    tab = tables(geo)
    h = e.shape[0]
    az, ay, ax = geo.axes
    hz = az.tab.halo
    rows = 1 if geo.outer_rows == 1 else geo.drpb_rows
    e = e.reshape(h, geo.programs, hz if geo.outer_rows > 1 else 1, rows, ax.tile * geo.halo_x)
    n_cx = tab.rel_x.shape[0]
    # W[p, rz, (oz, cx)]: program p's halo z-row rz holds z bin oz (code_z of its z-class, query
    # row 0: dq tiles have Tz == 1); x is the fastest program axis.
    p = np.arange(geo.programs)
    local_x = p % ax.programs
    local_z = (p // (ax.programs * ay.programs)) % az.programs
    cls_x = tab.tile_class_x[local_x]
    cls_z = np.asarray(az.tab.tile_class).reshape(-1)[local_z]
    code_z = np.where(az.tab.mask, az.tab.rpb_index, -1)[cls_z, 0]  # [P, hz]
    w = np.zeros((geo.programs, e.shape[2], az.bins, n_cx), np.float32)
    for rz in range(e.shape[2]):
        ok = code_z[:, rz] >= 0
        w[p[ok], rz, code_z[ok, rz], cls_x[ok]] = 1.0
    hi = lax.Precision.HIGHEST
    a = jnp.einsum("hpzyq,pzoc->hocyq", e, jnp.asarray(w), precision=hi)
    rel = tab.rel_x.reshape(n_cx, -1)
    x = (rel[:, :, None] == np.arange(ax.bins)[None, None, :]).astype(np.float32)
    d = jnp.einsum("hocyq,cqb->hoyb", a, jnp.asarray(x), precision=hi)
    d = d[:, :, : (ay.bins if geo.outer_rows > 1 else 1)]
    return d.reshape(h, -1, ax.bins)


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
    """Program id -> (group, tile, axis-local index) per axis; x varies fastest."""
    groups, tiles_, local = [None] * 3, [None] * 3, [None] * 3
    rest = pid
    for i in (2, 1, 0):
        ax = geo.axes[i]
        local[i] = _rem(rest, ax.programs)
        rest = _div(rest, ax.programs)
        groups[i] = _div(local[i], ax.n_tiles)
        tiles_[i] = _rem(local[i], ax.n_tiles)
    return groups, tiles_, local


def _group_len(ax: _Axis, g):
    """Length of dilation group `g`: ceil((L - g) / d)."""
    return _div(ax.length - g + (ax.dilation - 1), ax.dilation)


def _position(ax: _Axis, g, p):
    """Original position of group row `p` of group `g`, clamped to the group's last row (padded
    halo rows and queries read a real row; the tables mask them)."""
    last = _div(ax.length - 1 - g, ax.dilation) * ax.dilation + g
    return jnp.minimum(p * ax.dilation + g, last)


def _flat3(geo: Geometry, pz, py, px):
    (_, ly, lx) = (a.length for a in geo.axes)
    return (pz * ly + py) * lx + px


def _tile_coords(geo: Geometry):
    """Offsets of the flattened tile's elements per axis, `[tile_volume]` each."""
    tz, ty, tx = (a.tile for a in geo.axes)
    t = jnp.arange(geo.tile_volume, dtype=jnp.int32)
    return [_div(t, ty * tx), _rem(_div(t, tx), ty), _rem(t, tx)]


def _rows(ref, idx, dim: int, col0=None):
    """Gathers rows `idx` (`[n]` int32, in range) of a `[N, dim]` ref -> `[n, dim]`; with
    `col0` (`[n]`), columns `col0 + 0..dim-1` of a wider ref (a GQA group's query heads)."""
    cols = jnp.arange(dim, dtype=jnp.int32)[None, :]
    return ref[idx[:, None], cols if col0 is None else col0[:, None] + cols]


def _store_index(idx, valid, geo: Geometry):
    """Masked-off lanes point one past the block: Triton never touches them (masked), and the
    interpret-mode scatter drops them instead of racing with a real row at a clamped index."""
    return jnp.where(valid, idx, geo.n)


def _store_rows(ref, idx, val, valid, geo: Geometry):
    cols = jnp.arange(val.shape[-1], dtype=jnp.int32)
    mask = valid[:, None] & (cols[None, :] >= 0)
    rows = _store_index(idx, valid, geo)
    plgpu.store(ref.at[rows[:, None], cols[None, :]], val.astype(ref.dtype), mask=mask)


def _dot(a, b, *, trans_b=False, trans_a=False):
    """Float32-accumulating matmul; IEEE float32 when both operands are float32 (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


# --------------------------------------------------------------------------------------------
# Query-tile kernels (forward, dq): halo rows, table lookups.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _QueryTile:
    """Per-program values of a query-tile kernel (traced)."""

    groups: list
    hs: list  # halo start per axis (group rows)
    cls: list  # tile class per axis
    coords: list  # [nq] tile offsets per axis
    valid: object  # [nq] query exists
    flat: object  # [nq] flat index (0 where invalid)
    table_base: object  # offset of this head's mask/bias table in the flat `[h * T]` operand


def _query_tile(geo: Geometry, meta_ref) -> _QueryTile:
    tab = tables(geo)
    groups, tiles_, local = _decode_program(geo, pl.program_id(0))
    hs = [meta_ref[tab.hs[i] + local[i]] for i in range(3)]
    cls = [meta_ref[tab.cls[i] + local[i]] for i in range(3)]
    coords = _tile_coords(geo)
    valid, pos = None, []
    for ax, g, t, c in zip(geo.axes, groups, tiles_, coords, strict=True):
        p = t * ax.tile_eff + c
        ok = (c < ax.tile_eff) & (p < _group_len(ax, g))
        valid = ok if valid is None else valid & ok
        pos.append(_position(ax, g, p))
    flat = jnp.where(valid, _flat3(geo, *pos), 0)
    base = pl.program_id(1) * tab.table_len if geo.has_rpb else _i32(0)  # one shared table
    return _QueryTile(groups, hs, cls, coords, valid, flat, base)


def _row_codes(geo: Geometry, meta_ref, qt: _QueryTile, rz, ry, iz, iy):
    """Outer bias bin of halo row `(rz, ry)` for query rows `(iz, iy)`, and whether the row is
    in their (z, y) window. Trivial outer axes (1-D/2-D calls) cost nothing."""
    tab = tables(geo)
    ok, o = None, None
    for a, (r, i) in enumerate(((rz, iz), (ry, iy))):
        ax = geo.axes[a]
        if ax.length == 1 and ax.tile == 1:  # a padding axis (1-D/2-D calls): always in
            continue
        c = meta_ref[tab.code[a] + (qt.cls[a] * ax.tile + i) * ax.tab.halo + r]
        good = c >= 0
        ok = good if ok is None else ok & good
        if geo.has_rpb:
            term = c * (geo.axes[1].bins if a == 0 else 1)
            o = term if o is None else o + term
    return ok, o


def _step(geo: Geometry, meta_ref, t_ref, k_ref, v_ref, qt: _QueryTile, q, step, c):
    """Scores `[nq, halo_x]` (log2 units, masked and biased) and the keys/values of one halo row.

    Returns:
      `(s, k, v, (rz, ry))`.
    """
    ax_z, ax_y, ax_x = geo.axes
    rz = _div(step, ax_y.tab.halo)
    ry = _rem(step, ax_y.tab.halo)
    jj = jnp.arange(geo.halo_x, dtype=jnp.int32)
    pz = _position(ax_z, qt.groups[0], qt.hs[0] + rz)
    py = _position(ax_y, qt.groups[1], qt.hs[1] + ry)
    px = _position(ax_x, qt.groups[2], qt.hs[2] + jj)
    kflat = _flat3(geo, pz, py, px)
    k = _rows(k_ref, kflat, geo.head_dim)
    v = _rows(v_ref, kflat, geo.value_dim)
    ok, o = _row_codes(geo, meta_ref, qt, rz, ry, qt.coords[0], qt.coords[1])
    n_o = geo.outer_bins
    sel = jnp.zeros_like(qt.coords[2]) if o is None else o
    if ok is not None:
        sel = jnp.where(ok, sel, n_o)
    # The head offset joins the per-query `[nq]` row index: per score, one add and one load.
    row = ((qt.cls[2] * (n_o + 1) + sel) * ax_x.tile + qt.coords[2]) * geo.halo_x + qt.table_base
    bias = t_ref[row[:, None] + jj[None, :]]
    s = _dot(q, k, trans_b=True) * c + bias
    return s, k, v, (rz, ry)


def forward_kernel(q_ref, k_ref, v_ref, t_ref, meta_ref, o_ref, lse_ref, *, geo: Geometry):
    qt = _query_tile(geo, meta_ref)
    q = _rows(q_ref, qt.flat, geo.head_dim)
    c = geo.scale * LOG2E

    def body(step, carry):
        acc, m, denom = carry
        s, _, v, _ = _step(geo, meta_ref, t_ref, k_ref, v_ref, qt, q, step, c)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        denom = alpha * denom + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    nq = geo.tile_volume
    init = (
        jnp.zeros((nq, geo.value_dim), jnp.float32),
        jnp.full((nq,), -jnp.inf, jnp.float32),
        jnp.zeros((nq,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, geo.steps, body, init)
    _store_rows(o_ref, qt.flat, acc / denom[:, None], qt.valid, geo)
    lse = (m + jnp.log2(denom)) * LN2
    plgpu.store(lse_ref.at[_store_index(qt.flat, qt.valid, geo)], lse, mask=qt.valid)


def _split_dot(onehot, x):
    """`onehot @ x` (float32 `x`) on tensor cores with float32 accuracy: `x = hi + lo` in
    bfloat16; the one-hot is exact in bfloat16, the error is that of `lo` (~2**-16 relative)."""
    hi = x.astype(jnp.bfloat16)
    lo = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    oh = onehot.astype(jnp.bfloat16)
    return _dot(oh, hi) + _dot(oh, lo)


def dq_kernel(q_ref, k_ref, v_ref, t_ref, meta_ref, do_ref, lse_ref, di_ref, *refs,
              geo: Geometry):  # fmt: skip
    dq_ref, e_ref = refs if geo.has_rpb else (refs[0], None)
    qt = _query_tile(geo, meta_ref)
    q = _rows(q_ref, qt.flat, geo.head_dim)
    do = _rows(do_ref, qt.flat, geo.value_dim)
    lse2 = lse_ref[qt.flat] * LOG2E
    di = di_ref[qt.flat]
    c = geo.scale * LOG2E
    _, ty, tx = (a.tile for a in geo.axes)
    hz, hy = geo.axes[0].tab.halo, geo.axes[1].tab.halo
    one_row = geo.outer_rows == 1  # 1-D: no outer rows, one outer bin
    if e_ref is not None and not one_row:
        tab = tables(geo)
        iy = jnp.arange(ty, dtype=jnp.int32)  # the tile's y rows (Tz == 1)
        bins = jnp.arange(geo.drpb_rows, dtype=jnp.int32)
    precise = q.dtype == jnp.float32

    def step_grads(step, dq):
        s, k, v, (_, ry) = _step(geo, meta_ref, t_ref, k_ref, v_ref, qt, q, step, c)
        p = jnp.exp2(s - lse2[:, None])  # masked scores: exp2(-inf) = 0
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - di[:, None])
        return dq + _dot(ds.astype(k.dtype), k), ds, ry

    nq = geo.tile_volume
    dq0 = jnp.zeros((nq, geo.head_dim), jnp.float32)
    if e_ref is None:
        dq = lax.fori_loop(0, geo.steps, lambda st, dq: step_grads(st, dq)[0], dq0)
    elif one_row:

        def body(step, carry):
            dq, e = carry
            dq, ds, _ = step_grads(step, dq)
            return dq, e + ds

        dq, e = lax.fori_loop(0, geo.steps, body, (dq0, jnp.zeros(geo.drpb_block, jnp.float32)))
        e_ref[...] = e
    else:
        # ds summed by outer-y bin with a one-hot matmul over the tile's y rows (tensor cores);
        # one [drpb_rows, Tx * halo_x] partial per halo z-row, stored when the row is done.
        rows = geo.drpb_rows

        def inner(rz, ry, carry):
            dq, e = carry
            dq, ds, _ = step_grads(rz * hy + ry, dq)
            code = meta_ref[tab.code[1] + (qt.cls[1] * ty + iy) * hy + ry]  # [Ty]
            onehot = (bins[:, None] == code[None, :]) & (code[None, :] >= 0)
            ds_rows = ds.reshape(ty, tx * geo.halo_x)
            if precise:  # float32 inputs: IEEE float32 throughout
                return dq, e + _dot(onehot.astype(jnp.float32), ds_rows)
            return dq, e + _split_dot(onehot, ds_rows)

        def outer(rz, dq):
            e0 = jnp.zeros((rows, tx * geo.halo_x), jnp.float32)
            dq, e = lax.fori_loop(0, hy, lambda ry, cr: inner(rz, ry, cr), (dq, e0))
            e_ref[pl.ds(rz * rows, rows), :] = e
            return dq

        dq = lax.fori_loop(0, hz, outer, dq0)
    _store_rows(dq_ref, qt.flat, dq * geo.scale, qt.valid, geo)
