"""The native FFI backend (`natjax-ffi`): the shared backend test base, plus its own contract.

Covers what the shared base cannot reach through the public API: grouped-query attention and a
value head_dim different from the query's (native in the kernel), tilings that cut the map at
every kind of boundary, the window-table derivation, the handlers' own validation of what
reaches them (an FFI error, never a crash), determinism, and the error when natjax-ffi is absent.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from na_base import NABackendTests, assert_close

import natjax
from natjax.ops.na import ffi, platform
from natjax.ops.na.reference import dense_mask_and_bias_index
from natjax.ops.na.spec import NACall, axis_windows, make_params

pytestmark = pytest.mark.skipif(
    not ffi.available(), reason="natjax-ffi is not installed (`make install` builds it)"
)


class TestFFI(NABackendTests):
    implementation = "ffi"
    # Half the default random sweep keeps this file within its CI budget; the tiling, GQA and
    # one-pass tests below add targeted cases.
    property_seeds = tuple(range(12))
    dtype_seeds = (3,)


def _dense(q, k, v, rpb, params):
    """Dense masked attention with GQA (kv head = h // (H // G)) and any value dim."""
    b, *spatial, h, d = q.shape
    n, g = int(np.prod(spatial)), k.shape[-2]
    mask, index = dense_mask_and_bias_index(tuple(spatial), params)
    rep = lambda x: jnp.repeat(x.reshape(b, n, g, x.shape[-1]), h // g, axis=2)  # noqa: E731
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.reshape(b, n, h, d) * params.scale, rep(k))
    if rpb is not None:
        logits = logits + rpb.reshape(h, -1)[:, index][None]
    logits = jnp.where(mask[None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(logits - lse[..., None]), rep(v))
    return out.reshape(b, *spatial, h, v.shape[-1]), jnp.moveaxis(lse, 1, -1).reshape(q.shape[:-1])


def _value_and_grads(fn, q, k, v, rpb, d_out):
    def loss(q, k, v, rpb):
        out, lse = fn(q, k, v, rpb)
        return jnp.sum(out * d_out) + jnp.sum(jnp.sin(lse)), (out, lse)

    argnums = (0, 1, 2, 3) if rpb is not None else (0, 1, 2)
    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, rpb)
    return (out, lse, *grads)


_NAMES = ("out", "lse", "dq", "dk", "dv", "drpb")


@pytest.mark.parametrize(
    "spatial,kernel,dilation,causal,heads,kv_heads,dim,value_dim",
    [
        ((9, 10), (3, 5), (2, 1), (False, True), 4, 2, 8, 12),  # GQA, Dv > D
        ((17,), (5,), (3,), (False,), 6, 1, 12, 4),  # MQA, Dv < D
        ((5, 6, 7), (3, 3, 5), (1, 2, 1), (True, False, False), 3, 3, 5, 9),  # Dv != D only
    ],
)
def test_gqa_and_value_dim(spatial, kernel, dilation, causal, heads, kv_heads, dim, value_dim):
    rng = np.random.default_rng(len(spatial) + heads)
    params = make_params(len(spatial), spatial, dim, kernel, dilation, causal, None)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, d_out = f32(2, *spatial, heads, dim), f32(2, *spatial, heads, value_dim)
    k, v = f32(2, *spatial, kv_heads, dim), f32(2, *spatial, kv_heads, value_dim)
    rpb = f32(heads, *params.rpb_shape_tail)
    got = _value_and_grads(lambda *a: ffi.na_ffi(*a, params), q, k, v, rpb, d_out)
    want = _value_and_grads(lambda *a: _dense(*a, params), q, k, v, rpb, d_out)
    assert got[0].shape == (2, *spatial, heads, value_dim)
    for name, g, w in zip(_NAMES, got, want, strict=True):
        assert_close(g, w, 2e-5, 2e-5, name)


@pytest.mark.parametrize(
    "spatial,kernel,dilation,causal,tile",
    [
        ((11, 13), (3, 5), (1, 1), (False, False), (1, 1, 4)),  # tiles cut both axes
        ((13, 10), (5, 3), (2, 3), (False, True), (1, 2, 1)),  # unequal dilation groups
        ((7, 9), (7, 9), (1, 1), (False, False), (1, 3, 2)),  # window = whole map
        ((37,), (7,), (5,), (True,), (1, 1, 3)),
        ((5, 6, 7), (3, 5, 3), (1, 1, 2), (False, True, False), (2, 1, 3)),
        ((9, 11), (3, 5), (1, 1), (True, False), (1, 9, 11)),  # one tile: one-pass backward
    ],
)
def test_any_tiling_matches_reference(spatial, kernel, dilation, causal, tile):
    """Results do not depend on the tiling (tiles smaller than windows, ragged last tiles)."""
    rng = np.random.default_rng(sum(spatial))
    shape = (1, *spatial, 2, 8)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    params = make_params(len(spatial), spatial, 8, kernel, dilation, causal, None)
    rpb = jnp.asarray(rng.standard_normal((2, *params.rpb_shape_tail)), jnp.float32)
    geo = ffi.make_geometry(q.shape, k.shape, v.shape, q.dtype, params, True)
    geo = dataclasses.replace(geo, tile=tile)
    want = _value_and_grads(lambda *a: _dense(*a, params), q, k, v, rpb, d_out)
    got = _value_and_grads(lambda *a: ffi._na(geo, *a)[:2], q, k, v, rpb, d_out)
    for name, g, w in zip(_NAMES, got, want, strict=True):
        assert_close(g, w, 2e-5, 2e-5, f"{name} tile={tile}")


def _assert_ffi_matches_dense(q, k, v, rpb, params):
    """na_ffi's out and lse against dense float32 attention, at q's dtype's tolerance."""
    out, lse = ffi.na_ffi(q, k, v, rpb, params)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want_out, want_lse = _dense(f32(q), f32(k), f32(v), rpb, params)
    tol = 2e-5 if q.dtype == jnp.float32 else 2e-2
    assert_close(out, want_out.astype(q.dtype), tol, tol, "out")
    assert_close(lse, want_lse, tol, tol, "lse")


@pytest.mark.parametrize(
    "spatial,kernel,dilation,causal,dim,dtype",
    [
        ((40, 40), 35, 1, False, 4, jnp.float32),  # a window alone beyond the block's slots
        ((7, 11), (3, 5), (1, 2), (True, False), 8, jnp.float32),  # ragged blocks, causal
        ((5, 6, 7), (3, 3, 5), 1, (False, False, True), 16, jnp.bfloat16),
        ((14, 14), 7, 1, False, 32, jnp.float16),  # NAT stage-3 shape, 2x2 blocks
    ],
)
def test_blocked_forward_matches_dense(spatial, kernel, dilation, causal, dim, dtype):
    """The register-blocked float32 forward (small halos: block_fwd.h), with its fallbacks."""
    rng = np.random.default_rng(dim)
    nd = len(spatial)
    params = make_params(nd, spatial, dim, kernel, dilation, causal, None)
    q, k, v = (jnp.asarray(rng.standard_normal((2, *spatial, 3, dim)), dtype) for _ in range(3))
    rpb = jnp.asarray(rng.standard_normal((3, *params.rpb_shape_tail)), jnp.float32)
    _assert_ffi_matches_dense(q, k, v, rpb, params)


@pytest.mark.parametrize(
    "spatial,kernel,dilation,heads,kv_heads,dim,value_dim,dtype,bias",
    [
        ((7, 7), 7, 1, 16, 16, 32, 32, jnp.float32, True),  # NAT stage 4: 49 = 6 x 8 + 1 queries
        ((14, 14), 7, 2, 4, 2, 32, 16, jnp.float32, False),  # 7x7 dilation groups, GQA, Dv < D
        ((8, 8), 8, 1, 2, 2, 16, 40, jnp.bfloat16, True),  # even kernel over the map, Dv > D
        ((9,), 9, 1, 3, 1, 8, 8, jnp.float16, True),  # 1-D, MQA
        ((3, 4, 5), (3, 4, 5), 1, 2, 2, 8, 24, jnp.float32, True),
    ],
)
def test_shared_window_forward_matches_dense(spatial, kernel, dilation, heads, kv_heads, dim,
                                             value_dim, dtype, bias):  # fmt: skip
    """Tiles whose queries all see one window (shared_fwd.h): every block size, bias or not."""
    rng = np.random.default_rng(sum(spatial) + dim)
    nd = len(spatial)
    params = make_params(nd, spatial, dim, kernel, dilation, False, None)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    q, k = f(2, *spatial, heads, dim), f(2, *spatial, kv_heads, dim)
    v = f(2, *spatial, kv_heads, value_dim)
    rpb = (jnp.asarray(rng.standard_normal((heads, *params.rpb_shape_tail)), jnp.float32)
           if bias else None)  # fmt: skip
    _assert_ffi_matches_dense(q, k, v, rpb, params)


@pytest.mark.parametrize(
    "spatial,kernel,dilation,batch,heads,kv_heads,dim,value_dim,dtype,bias",
    [
        ((7, 7), 7, 1, 4, 4, 4, 32, 32, jnp.float32, True),  # NAT stage 4: 6 x 8 + 1 queries
        ((14, 14), 7, 2, 8, 4, 2, 16, 24, jnp.float32, False),  # 7x7 dilation groups, GQA
        ((8, 8), 8, 1, 8, 2, 2, 8, 40, jnp.bfloat16, True),  # even kernel over the map, Dv > D
        ((9,), 9, 1, 16, 3, 1, 8, 8, jnp.float16, True),  # 1-D, MQA
        ((3, 4, 5), (3, 4, 5), 1, 8, 2, 2, 8, 24, jnp.float32, True),
    ],
)
def test_shared_window_backward_matches_dense(spatial, kernel, dilation, batch, heads, kv_heads,
                                              dim, value_dim, dtype, bias):  # fmt: skip
    """The one-pass backward's shared-window tiles (shared_bwd.h; batch x kv heads >= 16 picks
    the one-pass backward): gradients and the d_lse path, every block height, bias or not."""
    rng = np.random.default_rng(sum(spatial) + dim + 1)
    params = make_params(len(spatial), spatial, dim, kernel, dilation, False, None)
    assert batch * kv_heads >= 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    q, k = f(batch, *spatial, heads, dim), f(batch, *spatial, kv_heads, dim)
    v, d_out = f(batch, *spatial, kv_heads, value_dim), f(batch, *spatial, heads, value_dim)
    rpb = (jnp.asarray(rng.standard_normal((heads, *params.rpb_shape_tail)), jnp.float32)
           if bias else None)  # fmt: skip
    got = _value_and_grads(lambda *a: ffi.na_ffi(*a, params), q, k, v, rpb, d_out)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    want = _value_and_grads(lambda *a: _dense(*a, params), *map(f32, (q, k, v, rpb, d_out)))
    rtol, atol = {jnp.float32: (2e-5, 2e-5), jnp.float16: (5e-3, 5e-3)}.get(dtype, (3e-2, 3e-2))
    for name, g, w in zip(_NAMES, got, want, strict=False):
        assert_close(g, w, rtol, atol, name)


@pytest.mark.parametrize(
    "spatial,kernel,dilation,causal,stride,heads,kv_heads",
    [
        ((13,), 5, 1, False, 2, 2, 2),
        ((17,), 5, 2, True, 3, 4, 2),  # strided causal windows stop at the query
        ((9, 11), (4, 3), (1, 2), (False, True), (2, 3), 2, 1),  # even kernel, MQA
        ((7, 8), 6, 1, False, 1, 2, 2),  # even kernel alone
        ((5, 6, 7), (3, 4, 3), 1, (True, False, False), (2, 1, 3), 2, 2),
    ],
)
def test_stride_and_even_kernels(spatial, kernel, dilation, causal, stride, heads, kv_heads):
    """NATTEN >= 0.20 strided windows and even kernels: only the tables change (spec.py)."""
    rng = np.random.default_rng(sum(spatial))
    nd = len(spatial)
    params = make_params(nd, spatial, 8, kernel, dilation, causal, None, stride)
    assert ffi.unsupported_reason(NACall.for_query((2, *spatial, heads, 8), jnp.float32, params,
                                                   True)) is None  # fmt: skip
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, d_out = f32(2, *spatial, heads, 8), f32(2, *spatial, heads, 8)
    k, v = f32(2, *spatial, kv_heads, 8), f32(2, *spatial, kv_heads, 8)
    rpb = f32(heads, *params.rpb_shape_tail)
    got = _value_and_grads(lambda *a: ffi.na_ffi(*a, params), q, k, v, rpb, d_out)
    want = _value_and_grads(lambda *a: _dense(*a, params), q, k, v, rpb, d_out)
    for name, g, w in zip(_NAMES, got, want, strict=True):
        assert_close(g, w, 2e-5, 2e-5, f"{name} stride={stride}")


def test_one_pass_backward_with_gqa():
    """batch x kv_heads >= 16 selects the one-pass backward (dk/dv scattered per slice)."""
    spatial, kernel, dilation, causal = (7, 9), (3, 5), (2, 1), (False, True)
    rng = np.random.default_rng(3)
    params = make_params(2, spatial, 8, kernel, dilation, causal, None)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, d_out = f32(4, *spatial, 8, 8), f32(4, *spatial, 8, 16)
    k, v = f32(4, *spatial, 4, 8), f32(4, *spatial, 4, 16)
    rpb = f32(8, *params.rpb_shape_tail)
    got = _value_and_grads(lambda *a: ffi.na_ffi(*a, params), q, k, v, rpb, d_out)
    want = _value_and_grads(lambda *a: _dense(*a, params), q, k, v, rpb, d_out)
    for name, g, w in zip(_NAMES, got, want, strict=True):
        assert_close(g, w, 2e-5, 2e-5, name)


def _poison(rng, x, frac=0.03):
    """`x` with a fraction of its entries set to NaN, +inf or -inf."""
    x = np.array(x)
    hit = rng.random(x.shape) < frac
    x[hit] = rng.choice(np.array([np.nan, np.inf, -np.inf]), size=int(hit.sum()))
    return x


@pytest.mark.parametrize(
    "spatial,kernel,dilation,causal,batch,heads,kv_heads,dtype",
    [
        ((14, 14), 7, 1, False, 2, 2, 2, "float32"),  # blocked forward, dq + dk/dv passes
        ((7, 8), 3, (2, 1), (False, True), 8, 4, 2, "float32"),  # one-pass backward, GQA
        ((37,), 7, 5, True, 1, 2, 1, "float16"),  # per-query forward, MQA
        ((5, 6, 7), 3, 1, False, 2, 2, 2, "bfloat16"),
        ((9, 10), 3, 1, False, 2, 2, 2, "float64"),  # the generic (non-AVX) kernels
    ],
)
def test_kernels_read_nonfinite_inputs_as_zero(spatial, kernel, dilation, causal, batch, heads,
                                               kv_heads, dtype):  # fmt: skip
    """The kernels take every NaN/inf entry of q, k, v as 0 (what nonfinite.py would otherwise
    substitute in a copy): outputs and gradients bit-identical to the call on substituted
    inputs, in every kernel path and dtype."""
    rng = np.random.default_rng(sum(spatial) + heads)
    with jax.enable_x64(dtype == "float64"):
        params = make_params(len(spatial), spatial, 8, kernel, dilation, causal, None)
        dt = jnp.dtype(dtype)
        acc = jnp.float64 if dtype == "float64" else jnp.float32
        q = _poison(rng, rng.standard_normal((batch, *spatial, heads, 8)))
        k = _poison(rng, rng.standard_normal((batch, *spatial, kv_heads, 8)))
        v = _poison(rng, rng.standard_normal((batch, *spatial, kv_heads, 8)))
        raw = [jnp.asarray(x, dt) for x in (q, k, v)]
        zeroed = [jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)) for x in raw]
        assert not all(bool(jnp.all(jnp.isfinite(x))) for x in raw)
        rpb = jnp.asarray(rng.standard_normal((heads, *params.rpb_shape_tail)), acc)
        d_out = jnp.asarray(rng.standard_normal((batch, *spatial, heads, 8)), dt)
        fn = lambda *a: ffi.na_ffi(*a, params)  # noqa: E731
        got = _value_and_grads(fn, *raw, rpb, d_out)
        want = _value_and_grads(fn, *zeroed, rpb, d_out)
        for name, g, w in zip(_NAMES, got, want, strict=True):
            assert g.dtype == w.dtype, name
            assert np.array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64)), name
            assert np.isfinite(np.asarray(g, np.float64)).all(), name


@pytest.mark.parametrize("in_kernel", [True, False], ids=["in-kernel", "older-library"])
def test_confinement_passes_raw_inputs_to_ffi(monkeypatch, request, in_kernel):
    """na2d(implementation="ffi") gives the ffi backend the raw inputs (no substituted copy in
    the program) and the same bits as the wrapper-substituted path, forward and backward; a
    library without the in-kernel substitution (natjax-ffi < 0.2) gets a substituted copy."""
    from natjax.ops.na.nonfinite import confine_nonfinite, reads_nonfinite_as_zero

    if not in_kernel:
        monkeypatch.setattr(ffi, "_kernels_read_nonfinite_as_zero", lambda: False)
        request.getfixturevalue("fresh_traces")

    rng = np.random.default_rng(5)
    spatial, heads = (9, 11), 2
    params = make_params(2, spatial, 8, 5, 1, False, None)
    q, k, v = (jnp.asarray(_poison(rng, rng.standard_normal((2, *spatial, heads, 8))),
                           jnp.float32) for _ in range(3))  # fmt: skip
    rpb = jnp.asarray(rng.standard_normal((heads, *params.rpb_shape_tail)), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seen = []

    def spy(q, k, v, rpb, params):
        seen.append(bool(jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(k))))
        return ffi.na_ffi(q, k, v, rpb, params)

    confine_nonfinite(spy, q, k, v, rpb, params)  # unmarked: gets the substituted inputs
    confine_nonfinite(reads_nonfinite_as_zero(spy), q, k, v, rpb, params)
    assert seen == [True, False]
    unmarked = lambda *a: confine_nonfinite(lambda *b: ffi.na_ffi(*b), *a, params)  # noqa: E731
    marked = lambda q, k, v, rpb: natjax.na2d(  # noqa: E731
        q, k, v, 5, rpb=rpb, return_lse=True, implementation="ffi"
    )
    got = _value_and_grads(marked, q, k, v, rpb, d_out)
    want = _value_and_grads(unmarked, q, k, v, rpb, d_out)
    for name, g, w in zip(_NAMES, got, want, strict=True):
        assert np.array_equal(np.asarray(g), np.asarray(w), equal_nan=True), name
    assert not np.isfinite(np.asarray(got[0])).all()  # the fix-up still applies


def test_library_reads_nonfinite_as_zero_since_0_2():
    """natjax-ffi 0.2 and later export the in-kernel substitution that na_ffi relies on."""
    import natjax_ffi

    major, minor = (int(x) for x in natjax_ffi.__version__.split(".")[:2])
    assert ffi._kernels_read_nonfinite_as_zero() == ((major, minor) >= (0, 2))


def test_axis_tables_match_brute_force():
    for length, kernel, dilation, causal in [(13, 5, 2, False), (10, 3, 3, True), (7, 7, 1, False)]:
        win = axis_windows(length, kernel, dilation, causal)
        t = ffi._axis_tables(win.key, win.valid, win.rpb_index, dilation)
        for i in range(length):
            keys = t.win_start[i] + dilation * np.arange(t.win_count[i])
            assert set(keys) == set(win.key[i][win.valid[i]])
            bias = dict(zip(win.key[i][win.valid[i]], win.rpb_index[i][win.valid[i]], strict=True))
            assert [bias[j] for j in keys] == list(t.rpb_start[i] + np.arange(t.win_count[i]))
        for j in range(length):
            queries = t.inv_start[j] + dilation * np.arange(t.inv_count[j])
            want = [i for i in range(length) if j in set(win.key[i][win.valid[i]])]
            assert list(queries) == want


def test_axis_tables_reject_rules_they_cannot_express():
    key = np.array([[0, 2], [0, 1]])
    valid = np.ones_like(key, bool)
    with pytest.raises(ffi._NotRunLike, match="evenly spaced"):
        ffi._axis_tables(key, valid, np.array([[0, 1], [0, 1]]), 1)
    with pytest.raises(ffi._NotRunLike, match="bias"):
        ffi._axis_tables(np.array([[0, 1], [0, 1]]), valid, np.array([[0, 2], [0, 1]]), 1)


def _raw_forward(geo, q, rpb, **overrides):
    attrs = dict(ffi._attributes(geo, False), **overrides)
    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32),
        jax.ShapeDtypeStruct((q.shape[0], q.shape[2]), jnp.int32),
    )
    if "reports_nonfinite" not in ffi._features():  # natjax-ffi < 0.3: no `seen` result
        out_types = out_types[:2]
    return jax.ffi.ffi_call("natjax_na_fwd", out_types)(q, q, q, rpb, **attrs)


def test_handlers_reject_bad_buffers_and_tables():
    """What reaches the C++ side is checked there too: an FFI error, never a crash."""
    params = make_params(2, (6, 5), 4, 3, 1, False, None)
    q = jnp.ones((1, 30, 2, 4), jnp.float32)
    rpb = jnp.zeros((2, 25), jnp.float32)
    geo = ffi.make_geometry((1, 6, 5, 2, 4), q.shape, q.shape, q.dtype, params, True)
    np.testing.assert_allclose(_raw_forward(geo, q, rpb)[0], 1.0, rtol=1e-6)
    bad_start = ffi._attributes(geo, False)["win_start"].copy()
    bad_start[3] = 40
    bad_tiles = ffi._attributes(geo, False)["tile_count"].copy()
    bad_tiles[-1] = 99
    cases = [
        (dict(win_start=bad_start), "win_start/win_count out of range"),
        (dict(tile_count=bad_tiles), "tile"),
        (dict(lengths=np.asarray([1, 6, 6], np.int64)), "positions"),
        (dict(win_count=np.zeros(3, np.int64)), "sum\\(lengths\\)"),
    ]
    for overrides, message in cases:
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(_raw_forward(geo, q, rpb, **overrides))
    with pytest.raises(Exception, match="rpb has shape"):
        jax.block_until_ready(_raw_forward(geo, q, jnp.zeros((2, 24), jnp.float32)))
    if "reports_nonfinite" not in ffi._features():
        return  # the checks below are of natjax-ffi >= 0.3's handler (three results)
    with pytest.raises(Exception, match="share one dtype"):
        out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                     jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32),
                     jax.ShapeDtypeStruct((1, 2), jnp.int32))  # fmt: skip
        call = jax.ffi.ffi_call("natjax_na_fwd", out_types)
        jax.block_until_ready(call(q, q.astype(jnp.float16), q, rpb, **ffi._attributes(geo, False)))
    with pytest.raises(Exception, match="seen has shape"):
        out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                     jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32),
                     jax.ShapeDtypeStruct((2, 1), jnp.int32))  # fmt: skip
        call = jax.ffi.ffi_call("natjax_na_fwd", out_types)
        jax.block_until_ready(call(q, q, q, rpb, **ffi._attributes(geo, False)))


# One case per forward path of the library: strips (2-D float32 and float16, 1-D), the
# shared-window kernel (7x7 map, kernel 7), per-query (1-D rows shorter than a strip: dilation
# groups of 6 queries; float64), and GQA.
_REPORT_CASES = [
    ((10, 12), 5, 1, "float32", 2, 2),
    ((10, 12), 3, 2, "float16", 2, 1),
    ((7, 7), 7, 1, "float32", 2, 2),
    ((64,), 7, 1, "float32", 2, 2),  # tiles of 16 queries (16 units)
    ((24,), 3, 4, "float32", 2, 2),
    ((6, 7), 3, 1, "float64", 2, 2),
    ((4, 5, 6), 3, 1, "float32", 4, 2),
]


@pytest.mark.parametrize("spatial,kernel,dilation,dtype,heads,kv_heads", _REPORT_CASES)
def test_kernels_report_nonfinite_reads(spatial, kernel, dilation, dtype, heads, kv_heads):
    """`na_ffi_reporting`'s flag (the confinement's predicate): False for finite inputs, True
    for one NaN or inf anywhere in q, k or v (every key is in some neighborhood here)."""
    if "reports_nonfinite" not in ffi._features():
        pytest.skip("library without the reports_nonfinite feature (natjax-ffi < 0.3)")
    rng = np.random.default_rng(7)
    params = make_params(len(spatial), spatial, 8, kernel, dilation, False, None)
    shapes = {"q": (2, *spatial, heads, 8), "k": (2, *spatial, kv_heads, 8),
              "v": (2, *spatial, kv_heads, 8)}  # fmt: skip
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    run = jax.jit(lambda q, k, v: ffi.na_ffi_reporting(q, k, v, None, params)[2])
    assert not bool(run(*(jnp.asarray(base[n]) for n in "qkv")))
    for trial, (name, bad) in enumerate(
        [("q", np.nan), ("k", np.inf), ("v", -np.inf), ("k", np.nan), ("v", np.nan)]
    ):
        arrays = {n: a.copy() for n, a in base.items()}
        flat = arrays[name].reshape(-1)
        flat[rng.integers(flat.size)] = bad
        got = run(*(jnp.asarray(arrays[n]) for n in "qkv"))
        assert bool(got), f"trial {trial}: a {bad} in {name} was not reported"


def test_backward_is_deterministic():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 12, 12, 2, 16)), jnp.float32) for _ in range(3))
    rpb = jnp.asarray(rng.standard_normal((2, 9, 9)), jnp.float32)
    loss = lambda q, k, v, rpb: jnp.sum(natjax.na2d(q, k, v, 5, rpb=rpb, implementation="ffi") ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    first = [np.asarray(g) for g in grad(q, k, v, rpb)]
    for _ in range(3):
        for a, b in zip(first, grad(q, k, v, rpb), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_unsupported_reason_and_build_info():
    params = make_params(2, (8, 8), 16, 3, 1, False, None)
    call = NACall.for_query
    assert ffi.unsupported_reason(call((1, 8, 8, 2, 16), jnp.float32, params, True)) is None
    assert "int32" in ffi.unsupported_reason(call((1, 8, 8, 2, 16), jnp.int32, params, False))
    assert "-O3" in ffi.build_info()


@pytest.mark.parametrize(
    "spatial,kernel,dilation,with_ffi,without_ffi",
    # "shared": ffi when the library has the shared-window path, else the without_ffi choice.
    [((14, 14), 7, 1, "ffi", "reference"), ((7, 7), 7, 1, "shared", "reference"),
     ((8, 8), 7, 1, "ffi", "reference"), ((28, 28), 7, 1, "ffi", "xla"),
     ((200,), 3, 1, "ffi", "xla"), ((9,), 5, 1, "ffi", "reference"),
     ((9,), 9, 1, "shared", "reference"), ((56, 56), 7, 8, "shared", "xla"),
     ((7, 8), 7, 1, "reference", "reference")],  # 88% of the map, not all of it: dense
)  # fmt: skip
@pytest.mark.parametrize("installed", [True, False])
def test_default_implementation_on_cpu(monkeypatch, request, spatial, kernel, dilation, with_ffi,
                                       without_ffi, installed):  # fmt: skip
    """None on CPU: the native kernels where measured faster (platform.cpu_choice: windows up
    to 80% of their group, and whole-group windows of the shared-window path), else dense for
    small maps and xla otherwise, also when natjax-ffi is missing; the CPU program of None
    calls the kernels exactly when chosen, and every choice gives the same result."""
    if not installed:
        monkeypatch.setattr(ffi, "unsupported_reason", lambda *a: "not installed")
        request.getfixturevalue("fresh_traces")  # the choice is made when a call is traced
    if with_ffi == "shared":
        with_ffi = "ffi" if "shared_window_forward" in ffi._features() else without_ffi
    want = with_ffi if installed else without_ffi
    shape = (1, *spatial, 2, 8)
    q = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    params = make_params(len(spatial), spatial, 8, kernel, dilation, False, None)
    assert platform.cpu_choice(NACall.for_query(q.shape, q.dtype, params, False)) == want
    fn = getattr(natjax, f"na{len(spatial)}d")
    default = jax.jit(lambda q: fn(q, q, q, kernel, dilation=dilation))
    assert (ffi.FFI_TARGETS[0] in default.lower(q).as_text()) == (want == "ffi")
    ref = fn(q, q, q, kernel, dilation=dilation, implementation="xla")
    assert_close(default(q), ref, 1e-5, 1e-5, f"None ({want})")


def test_shared_window_path_rule(monkeypatch):
    """takes_shared_window_path: whole-group windows only, no causal axis, no float64, keys
    within the L1 budget, and only with a library that has the path."""
    call = lambda spatial, k, d=1, causal=False, dim=32, dtype=jnp.float32: NACall.for_query(  # noqa: E731
        (1, *spatial, 2, dim), dtype,
        make_params(len(spatial), spatial, dim, k, d, causal, None), False,
    )  # fmt: skip
    assert ffi.takes_shared_window_path(call((7, 7), 7)) == (
        "shared_window_forward" in ffi._features()
    )
    monkeypatch.setattr(ffi, "_features", lambda: frozenset({"shared_window_forward"}))
    assert ffi.takes_shared_window_path(call((7, 7), 7))
    assert ffi.takes_shared_window_path(call((56, 56), 7, 8, dtype=jnp.bfloat16))
    assert not ffi.takes_shared_window_path(call((7, 8), 7))  # not the whole map
    assert not ffi.takes_shared_window_path(call((7, 7), 7, causal=True))
    assert not ffi.takes_shared_window_path(call((7, 7), 7, dtype=jnp.float64))
    assert ffi.takes_shared_window_path(call((16, 16), 16))  # 256 keys x 32 x 4 B = 32 KiB
    assert not ffi.takes_shared_window_path(call((16, 17), (16, 17)))  # 272 keys: over
    monkeypatch.setattr(ffi, "_features", lambda: frozenset())
    assert not ffi.takes_shared_window_path(call((7, 7), 7))


def test_export_for_cpu_and_cuda():
    """Exported for CUDA, None contains no FFI call (only the lowering platform's branch is
    lowered); for CPU jax.export refuses the kernels' custom calls unless their checks are
    disabled (`ffi.export_disabled_checks`), and the exported program then runs here."""
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 16, 2, 8)), jnp.float32) for _ in range(3))
    rpb = jnp.asarray(rng.standard_normal((2, 9, 9)), jnp.float32)

    def grads(q, k, v, rpb):
        loss = lambda *a: jnp.sum(jnp.sin(natjax.na2d(*a[:3], 5, rpb=a[3])))  # noqa: E731
        return jax.grad(loss, (0, 1, 2, 3))(q, k, v, rpb)

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    cuda = export.export(jax.jit(grads), platforms=("cuda",), disabled_checks=[triton])
    text = cuda(q, k, v, rpb).mlir_module()
    assert not any(target in text for target in ffi.FFI_TARGETS)
    with pytest.raises(ValueError, match="natjax_na_fwd"):
        export.export(jax.jit(grads), platforms=("cpu",))(q, k, v, rpb)
    exp = export.export(
        jax.jit(grads), platforms=("cpu",), disabled_checks=ffi.export_disabled_checks()
    )(q, k, v, rpb)
    text = exp.mlir_module()
    assert all(target in text for target in ffi.FFI_TARGETS)
    want = jax.jit(grads)(q, k, v, rpb)  # (serialize() would need the flatbuffers package)
    for got, w, name in zip(exp.call(q, k, v, rpb), want, "qkvb", strict=True):
        assert_close(got, w, 1e-6, 1e-6, f"d{name} after export")


_MISSING_SCRIPT = """
import sys
sys.modules["natjax_ffi"] = None  # as if natjax-ffi were not installed
import jax.numpy as jnp, natjax
q = jnp.zeros((1, 8, 8, 2, 4))
try:
    natjax.na2d(q, q, q, 3, implementation="ffi")
except ValueError as err:
    print("ERROR:", err)
print("XLA_OK", float(natjax.na2d(q, q, q, 3, implementation="xla").sum()))
x = jnp.zeros((1, 40, 40, 2, 4))  # None must fall back without a warning or an error
print("NONE_OK", float(natjax.na2d(x, x, x, 3).sum()))
"""


def test_missing_library_gives_install_hint():
    res = subprocess.run(
        [sys.executable, "-c", _MISSING_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert "implementation='ffi' cannot run this call" in res.stdout, res.stderr
    assert "pip install ./ffi" in res.stdout
    assert "XLA_OK 0.0" in res.stdout
    assert "NONE_OK 0.0" in res.stdout and "falling back" not in res.stderr
