"""The shared tile tables (`natjax.ops.na.tiles`) reproduce the spec's neighborhoods exactly."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from natjax.ops.na import tiles
from natjax.ops.na.reference import dense_mask_and_bias_index
from natjax.ops.na.spec import make_params


def _dense_from_tiles(t: tiles.Tiling):
    """Rebuilds the `[N, N]` mask and bias index from the tile tables only."""
    n = math.prod(t.spatial)
    query = np.asarray(t.to_tiles(jnp.arange(n).reshape((1, *t.spatial)))[0])  # [G, nT, Tq]
    mask = np.zeros((n, n), bool)
    index = np.full((n, n), -1)
    seen = np.zeros(n, int)
    for g in range(t.groups):
        for tile in range(t.tiles):
            c = t.tile_class[g, tile]
            for r in range(t.tile_volume):
                if not t.query_valid[c, r]:
                    assert not t.mask[c, r].any(), "padded query with keys"
                    continue
                i = query[g, tile, r]
                seen[i] += 1
                keys = t.halo_index[g, tile]
                m = t.mask[c, r]
                assert len(set(keys[m])) == m.sum(), "a key twice in one halo"
                mask[i, keys[m]] = True
                index[i, keys[m]] = t.rpb_index[c, r, m]
    assert (seen == 1).all(), "every query in exactly one tile"
    return mask, index


CASES = [
    # spatial, kernel, dilation, causal, tiles
    ((56, 56), 7, 1, False, (8, 8)),  # NAT stage 1
    ((13,), 5, 1, False, (4,)),  # size not a multiple of the tile
    ((17,), 3, 4, False, (3,)),  # unequal dilation groups (17 = 4 * 4 + 1), tile straddling
    ((23,), 5, 2, True, (4,)),  # causal with dilation
    ((9, 10), (3, 5), (3, 2), (False, True), (2, 3)),
    ((7, 7), 7, 1, False, (8, 8)),  # window spans the map, tile clipped
    ((6, 9, 10), (3, 3, 5), (2, 1, 2), (True, False, False), (2, 4, 3)),
    ((9,), 1, 3, False, (2,)),  # kernel 1
    ((10,), 3, 3, False, (3,)),  # a shorter group whose last tile is padding only
]


@pytest.mark.parametrize("spatial,kernel,dilation,causal,tile", CASES)
def test_tables_reproduce_spec(spatial, kernel, dilation, causal, tile):
    params = make_params(len(spatial), spatial, 8, kernel, dilation, causal, None)
    t = tiles.tiling(spatial, params, tile)
    mask, index = _dense_from_tiles(t)
    want_mask, want_index = dense_mask_and_bias_index(spatial, params)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(np.where(want_mask, index, 0), np.where(want_mask, want_index, 0))
    assert t.halo_index.min() >= 0 and t.halo_index.max() < math.prod(spatial)
    assert (t.rpb_index >= 0).all() and (t.rpb_index < math.prod(params.rpb_shape_tail)).all()


def test_interior_tiles_share_one_class():
    """NAT stage 1 (56, kernel 7, tile 8): first, interior and last tile per axis -> 3 x 3."""
    a = tiles.axis_tiling(56, 7, 1, False, 8)
    assert a.n_classes == 3 and a.halo == 14
    assert list(a.tile_class[0]) == [0, 1, 1, 1, 1, 1, 2]
    params = make_params(2, (56, 56), 32, 7, 1, False, None)
    assert tiles.tiling((56, 56), params, (8, 8)).n_classes == 9


def test_halo_starts_are_clamped_static_slices():
    a = tiles.axis_tiling(30, 7, 2, False, 4)  # groups of 15 rows, tiles of 4 -> last tile short
    assert a.rows == 15 and a.n_tiles == 4 and a.halo == 10
    assert (a.halo_start >= 0).all() and (a.halo_start + a.halo <= a.rows).all()


def test_to_from_tiles_roundtrip():
    params = make_params(2, (9, 10), 4, 3, (2, 3), False, None)
    t = tiles.tiling((9, 10), params, (2, 3))
    x = jnp.arange(2 * 9 * 10 * 3, dtype=jnp.float32).reshape(2, 9, 10, 3)
    y = t.to_tiles(x)
    assert y.shape == (2, t.groups, t.tiles, t.tile_volume, 3)
    np.testing.assert_array_equal(np.asarray(t.from_tiles(y)), np.asarray(x))


def test_bad_tiles():
    params = make_params(1, (9,), 4, 3, 1, False, None)
    with pytest.raises(ValueError, match="tiles"):
        tiles.tiling((9,), params, (0,))
    with pytest.raises(ValueError, match="tiles"):
        tiles.tiling((9,), params, (2, 2))
