"""The tiled formulation of neighborhood attention shared by the accelerator backends.

Every backend that works on blocks of queries (the tiled XLA path, the Pallas kernels) uses the
static tables built here, so the window rules live once (`spec.axis_windows`, NATTEN <= 0.17) and
a backend never re-derives them.

Coordinates. Along an axis of length `L` with dilation `d`, position `i` belongs to dilation group
`g = i % d` at group row `p = i // d` (NATTEN's sub-maps: a query only sees keys of its group).
Every group is padded to `rows = ceil(L / d)` rows; the groups of length `rows - 1` (when
`L % d != 0`) differ only in their tables.

Tiles. Group rows are cut into `n_tiles = ceil(rows / tile)` query tiles of `tile` rows. All keys
of a tile's queries lie in one contiguous *key halo* of `halo` group rows starting at
`halo_start[g, t]`: window starts are non-decreasing in the query. With stride 1 they grow by at
most one per row, so `tile` queries span at most `tile - 1 + K` keys and
`halo = min(tile + K - 1, rows)`; with a stride they jump by up to the stride at stride-group
boundaries, and `halo` is the widest span any tile needs (at least the stride-1 value). The
start is clamped to `[0, rows - halo]`, so halos are static, in-bounds slices.

Tile classes. Relative to its halo, a tile's neighborhood mask and relative-position-bias index
depend only on its position class (first tiles, interior, last tiles, each dilation group
length, causal). Tables are stored once per class: interior tiles share one entry, so a tile's
bias is gathered from `rpb` once per class, not once per score.

Multi-axis calls combine the per-axis tables: the mask is the product (AND) of the per-axis masks
and the bias index the row-major flattening of the per-axis indices, so `Tiling` exposes flat
tables over `G = prod(d)` groups, `nT = prod(n_tiles)` tiles, `Tq = prod(tile)` queries per tile
and `Hk = prod(halo)` halo keys per tile (all row-major in the spatial axes).

Stable API (used by `xla_tiled` and the Pallas kernels):
  * `axis_tiling(length, kernel, dilation, causal, tile, stride=1) -> AxisTiling` (cached);
  * `tiling(spatial, params, tiles) -> Tiling` (cached), with `to_tiles` / `from_tiles` (the
    query layout `[B, G, nT, Tq, h, D]`) and the flat tables `halo_index`, `tile_class`, `mask`,
    `rpb_index`, `query_valid`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from natjax.ops.na.spec import NAParams, axis_windows


@dataclasses.dataclass(frozen=True, eq=False)
class AxisTiling:
    """Static tile tables of one spatial axis (numpy; group coordinates).

    Attributes:
      length, kernel, dilation, causal, tile: the axis and its query-tile size.
      rows: group rows after padding every group to the longest, `ceil(length / dilation)`.
      n_tiles: query tiles per group, `ceil(rows / tile)`.
      halo: key rows per tile halo, `min(tile + kernel - 1, rows)` with stride 1, the widest span
        a tile needs with a stride.
      stride: the axis's stride.
      halo_start: `[dilation, n_tiles]` int, first group row of each tile's key halo.
      tile_class: `[dilation, n_tiles]` int, index of each tile's entry in the class tables.
      mask: `[n_classes, tile, halo]` bool, query row `r` of the tile attends halo row `j`
        (False for padded queries and padded keys).
      rpb_index: `[n_classes, tile, halo]` int, `(key - query) / dilation + kernel - 1` in
        `[0, 2 * kernel - 1)`; 0 where `mask` is False.
      query_valid: `[n_classes, tile]` bool, the query row exists (is not group padding).
    """

    length: int
    kernel: int
    dilation: int
    causal: bool
    tile: int
    rows: int
    n_tiles: int
    halo: int
    halo_start: np.ndarray
    tile_class: np.ndarray
    mask: np.ndarray
    rpb_index: np.ndarray
    query_valid: np.ndarray
    stride: int = 1

    @property
    def n_classes(self) -> int:
        return self.mask.shape[0]

    def halo_rows(self) -> np.ndarray:
        """`[dilation, n_tiles, halo]` original positions of each tile's halo keys (padded rows
        clamped to the last position of their group; they are masked)."""
        g = np.arange(self.dilation)[:, None, None]
        p = self.halo_start[:, :, None] + np.arange(self.halo)[None, None, :]
        pos = p * self.dilation + g
        last = (self.length - 1 - g) // self.dilation * self.dilation + g
        return np.minimum(pos, last)


@functools.lru_cache(maxsize=512)
def axis_tiling(
    length: int, kernel: int, dilation: int, causal: bool, tile: int, stride: int = 1
) -> AxisTiling:
    """Builds the tile tables of one axis from `spec.axis_windows`.

    Args:
      length: axis size `L`.
      kernel: window size `K`, with `K * dilation <= L`.
      dilation: dilation `d >= 1`.
      causal: whether the axis is causal.
      tile: query rows per tile (`>= 1`; larger than `rows` is clipped to `rows`).
      stride: the stride `1 <= s <= K`.

    Returns:
      The axis's `AxisTiling`.

    Raises:
      ValueError: if `tile < 1`.
    """
    if tile < 1:
        raise ValueError(f"`tile` must be >= 1, got {tile}.")
    rows = -(-length // dilation)
    tile = min(tile, rows)
    n_tiles = -(-rows // tile)
    win = axis_windows(length, kernel, dilation, causal, stride)
    key_rows = win.key // dilation  # group rows of each query's keys, [L, K]
    halo = max(min(tile + kernel - 1, rows), _max_span(key_rows, win.valid, dilation, tile))
    starts = np.zeros((dilation, n_tiles), np.int64)
    classes: dict[bytes, int] = {}
    masks, indices, valids = [], [], []
    tile_class = np.zeros((dilation, n_tiles), np.int64)
    for g in range(dilation):
        queries = np.arange(g, length, dilation)  # original positions of the group, in row order
        for t in range(n_tiles):
            rows_t = np.arange(t * tile, (t + 1) * tile)
            valid = rows_t < len(queries)
            if valid[0]:
                first = queries[rows_t[0]]
                start = int(np.clip(key_rows[first][win.valid[first]].min(), 0, rows - halo))
            else:  # a tile of padding only (a shorter dilation group's last tile)
                start = rows - halo
            starts[g, t] = start
            mask = np.zeros((tile, halo), bool)
            index = np.zeros((tile, halo), np.int64)
            for r in np.nonzero(valid)[0]:
                i = queries[rows_t[r]]
                cols = key_rows[i][win.valid[i]] - start
                if cols.min() < 0 or cols.max() >= halo:  # pragma: no cover - invariant
                    raise AssertionError("a window left its tile's key halo")
                mask[r, cols] = True
                index[r, cols] = win.rpb_index[i][win.valid[i]]
            key = mask.tobytes() + index.tobytes() + valid.tobytes()
            if key not in classes:
                classes[key] = len(classes)
                masks.append(mask)
                indices.append(index)
                valids.append(valid)
            tile_class[g, t] = classes[key]
    return AxisTiling(
        length=length,
        kernel=kernel,
        dilation=dilation,
        causal=causal,
        tile=tile,
        rows=rows,
        n_tiles=n_tiles,
        halo=halo,
        halo_start=starts,
        tile_class=tile_class,
        mask=np.stack(masks),
        rpb_index=np.stack(indices),
        query_valid=np.stack(valids),
        stride=stride,
    )


@functools.lru_cache(maxsize=1024)
def axis_halo(length: int, kernel: int, dilation: int, causal: bool, tile: int, stride: int) -> int:
    """The `halo` that `axis_tiling` gives these arguments, without building the tables.

    Args:
      length, kernel, dilation, causal, tile, stride: as in `axis_tiling`.

    Returns:
      Key rows per tile halo.
    """
    rows = -(-length // dilation)
    tile = min(tile, rows)
    win = axis_windows(length, kernel, dilation, causal, stride)
    span = _max_span(win.key // dilation, win.valid, dilation, tile)
    return max(min(tile + kernel - 1, rows), span)


def _max_span(key_rows: np.ndarray, valid: np.ndarray, dilation: int, tile: int) -> int:
    """Widest range of key rows `max - min + 1` that the queries of one tile attend."""
    lo = np.where(valid, key_rows, np.iinfo(np.int64).max).min(axis=1)
    hi = np.where(valid, key_rows, -1).max(axis=1)
    span = 1
    for g in range(dilation):
        starts = np.arange(0, len(lo[g::dilation]), tile)
        tile_lo = np.minimum.reduceat(lo[g::dilation], starts)
        tile_hi = np.maximum.reduceat(hi[g::dilation], starts)
        span = max(span, int((tile_hi - tile_lo).max()) + 1)
    return span


@dataclasses.dataclass(frozen=True, eq=False)
class Tiling:
    """Tile tables of a whole call, flattened over the spatial axes (row-major).

    Attributes:
      axes: the per-axis `AxisTiling`s.
      groups: `G = prod(dilation)`; tiles: `nT = prod(n_tiles)`; tile_volume: `Tq = prod(tile)`;
        halo_volume: `Hk = prod(halo)`.
      halo_index: `[G, nT, Hk]` int32, flat spatial index (into `prod(spatial)`) of every halo key.
      tile_class: `[G, nT]` int32, combined class of each tile.
      mask: `[C, Tq, Hk]` bool, the neighborhood of each query of a tile class in its halo.
      rpb_index: `[C, Tq, Hk]` int32, flat index into `rpb.reshape(heads, -1)`; 0 where masked.
      query_valid: `[C, Tq]` bool, the query is not padding.
    """

    axes: tuple[AxisTiling, ...]
    halo_index: np.ndarray
    tile_class: np.ndarray
    mask: np.ndarray
    rpb_index: np.ndarray
    query_valid: np.ndarray

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(a.length for a in self.axes)

    @property
    def groups(self) -> int:
        return math.prod(a.dilation for a in self.axes)

    @property
    def tiles(self) -> int:
        return math.prod(a.n_tiles for a in self.axes)

    @property
    def tile_volume(self) -> int:
        return math.prod(a.tile for a in self.axes)

    @property
    def halo_volume(self) -> int:
        return math.prod(a.halo for a in self.axes)

    @property
    def n_classes(self) -> int:
        return self.mask.shape[0]

    def to_tiles(self, x: jax.Array) -> jax.Array:
        """`[B, *spatial, *rest]` -> `[B, G, nT, Tq, *rest]`: one pad and one transpose.

        Padding rows (groups shorter than `rows`, the last partial tile) are zeros.
        """
        n = len(self.axes)
        rest = x.shape[1 + n :]
        pad = [(0, 0)] + [(0, a.n_tiles * a.tile * a.dilation - a.length) for a in self.axes]
        x = jnp.pad(x, pad + [(0, 0)] * len(rest))
        # Position i = (t * tile + r) * d + g per axis.
        shape = [x.shape[0]]
        for a in self.axes:
            shape += [a.n_tiles, a.tile, a.dilation]
        x = x.reshape(shape + list(rest))
        t_ax = [1 + 3 * i for i in range(n)]
        order = [0] + [a + 2 for a in t_ax] + t_ax + [a + 1 for a in t_ax]
        order += list(range(1 + 3 * n, x.ndim))
        x = x.transpose(order)
        return x.reshape((x.shape[0], self.groups, self.tiles, self.tile_volume) + rest)

    def from_tiles(self, x: jax.Array) -> jax.Array:
        """Inverse of `to_tiles`: `[B, G, nT, Tq, *rest]` -> `[B, *spatial, *rest]`."""
        n = len(self.axes)
        rest = x.shape[4:]
        shape = [x.shape[0]]
        shape += [a.dilation for a in self.axes] + [a.n_tiles for a in self.axes]
        shape += [a.tile for a in self.axes]
        x = x.reshape(shape + list(rest))
        # Axes now: B, d_0..d_{n-1}, nT_0.., T_0..; back to B, (nT_a, T_a, d_a) per axis.
        order = [0]
        for i in range(n):
            order += [1 + n + i, 1 + 2 * n + i, 1 + i]
        order += list(range(1 + 3 * n, x.ndim))
        x = x.transpose(order)
        full = [a.n_tiles * a.tile * a.dilation for a in self.axes]
        x = x.reshape([x.shape[0]] + full + list(rest))
        return x[(slice(None),) + tuple(slice(0, a.length) for a in self.axes)]


@functools.lru_cache(maxsize=256)
def tiling(spatial: tuple[int, ...], params: NAParams, tiles: tuple[int, ...]) -> Tiling:
    """Builds (and caches) the flat tile tables of one call.

    Args:
      spatial: the spatial shape.
      params: validated window arguments (`spec.make_params`).
      tiles: query rows per tile along each axis (clipped to each axis's group rows).

    Returns:
      The call's `Tiling`.

    Raises:
      ValueError: if `tiles` does not have one entry >= 1 per spatial axis.
    """
    if len(tiles) != len(spatial) or any(int(t) < 1 for t in tiles):
        raise ValueError(f"`tiles` must be {len(spatial)} ints >= 1, got {tiles!r}.")
    axes = tuple(
        axis_tiling(n, k, d, c, int(t), s)
        for n, k, d, c, t, s in zip(
            spatial, params.kernel_size, params.dilation, params.is_causal, tiles, params.stride,
            strict=True,
        )
    )  # fmt: skip
    strides = np.cumprod((1,) + tuple(spatial[::-1]))[::-1][1:]  # row-major spatial strides
    # halo_index[g, t, j]: combine per-axis [d_a, nT_a, halo_a] positions.
    idx = np.zeros((1, 1, 1), np.int64)
    for a, stride in zip(axes, strides, strict=True):
        pos = a.halo_rows() * stride  # [d, nT, halo]
        idx = idx[:, None, :, None, :, None] + pos[None, :, None, :, None, :]
        idx = idx.reshape(idx.shape[0] * idx.shape[1], idx.shape[2] * idx.shape[3], -1)
    # Combined classes: every combination of per-axis classes, row-major.
    cls = np.zeros((1, 1), np.int64)
    for a in axes:
        cls = cls[:, None, :, None] * a.n_classes + a.tile_class[None, :, None, :]
        cls = cls.reshape(cls.shape[0] * cls.shape[1], -1)
    combos = list(itertools.product(*(range(a.n_classes) for a in axes)))
    bins = [2 * a.kernel - 1 for a in axes]
    masks, indices, valids = [], [], []
    for combo in combos:
        # Per-axis [tile, halo] -> combined [Tq, Hk].
        m = np.ones((1, 1), bool)
        r = np.zeros((1, 1), np.int64)
        for a, c, nb in zip(axes, combo, bins, strict=True):
            m = (m[:, None, :, None] & a.mask[c][None, :, None, :]).reshape(m.shape[0] * a.tile, -1)
            r = (r[:, None, :, None] * nb + a.rpb_index[c][None, :, None, :]).reshape(
                r.shape[0] * a.tile, -1
            )
        v = np.ones((1,), bool)
        for a, c in zip(axes, combo, strict=True):
            v = (v[:, None] & a.query_valid[c][None, :]).reshape(-1)
        masks.append(m)
        indices.append(np.where(m, r, 0))
        valids.append(v)
    return Tiling(
        axes=axes,
        halo_index=idx.astype(np.int32),
        tile_class=cls.astype(np.int32),
        mask=np.stack(masks),
        rpb_index=np.stack(indices).astype(np.int32),
        query_valid=np.stack(valids),
    )
