"""NaN/inf confinement in every backend (issue 10, section 4): NATTEN semantics.

One non-finite token may only reach the queries whose neighborhood holds it. Each geometry packs
many cases into the batch (one poisoned token per batch element: border, interior, last and
other-dilation-group positions; NaN, +inf, -inf and a mixed token in the value, NaN/+inf/-inf in
the key, NaN in the query), so one compiled call per backend and geometry checks them all. The
expected result is built from the dense neighborhood mask of the spec (`spec.axis_windows` via
`reference.dense_mask_and_bias_index`), never from the code under test.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from na_base import FUNCS, TOLERANCES, assert_close

from natjax.ops.na import ffi
from natjax.ops.na.nonfinite import in_neighborhood
from natjax.ops.na.reference import dense_mask_and_bias_index
from natjax.ops.na.spec import make_params

BACKENDS = [
    "reference",
    "xla",
    "xla_tiled",
    "pallas",  # interpret mode on CPU
    pytest.param("ffi", marks=pytest.mark.skipif(not ffi.available(), reason="no natjax-ffi")),
    # implementation=None: on CPU the ffi kernels where installed (they read NaN/inf as 0
    # themselves), else the branches substituted by platform.na_default.
    pytest.param(None, id="None"),
]
# spatial, kernel, dilation, causal
GEOMETRIES = {
    "1d": ((13,), (5,), (2,), (True,)),
    "2d": ((7, 8), (3, 3), (2, 1), (False, True)),
    "3d": ((4, 6, 5), (3, 3, 3), (1, 2, 1), (True, False, False)),
}
GRAD_GEOMETRY = "2d"  # the geometry whose gradients are checked too
HEADS, DIM = 2, 4
POISON_HEAD = 1
# (tensor, fill per channel). Channel 0 of q is > 0 and channel 1 < 0 everywhere, so an infinite
# key token gives every logit it enters +inf + -inf = NaN (a NaN row in NATTEN), never -inf.
KINDS = [
    ("v", (np.nan,) * DIM),
    ("v", (np.inf,) * DIM),
    ("v", (-np.inf,) * DIM),
    ("v", (np.nan, np.inf, -np.inf, 1.0)),
    ("k", (np.nan,) * DIM),
    ("k", (np.inf,) * DIM),
    ("k", (-np.inf,) * DIM),
    ("q", (np.nan,) * DIM),
]


def _positions(spatial, dilation):
    """Flat token indices: first (border), interior, last, and one in another dilation group."""
    mid = tuple(n // 2 for n in spatial)
    other = tuple(
        min(d + 1, n - 1) if d > 1 else n - 2 for n, d in zip(spatial, dilation, strict=True)
    )
    picks = [(0,) * len(spatial), mid, tuple(n - 1 for n in spatial), other]
    return sorted({int(np.ravel_multi_index(p, spatial)) for p in picks})


def _build(geometry):
    """Inputs with one poisoned token per batch element, and the NATTEN-expected result."""
    spatial, kernel, dilation, causal = GEOMETRIES[geometry]
    n = math.prod(spatial)
    cases = [(pos, kind) for pos in _positions(spatial, dilation) for kind in KINDS]
    rng = np.random.default_rng(len(spatial))
    shape = (len(cases), n, HEADS, DIM)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    q[..., 0], q[..., 1] = np.abs(q[..., 0]) + 0.5, -np.abs(q[..., 1]) - 0.5
    raw = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
    params = make_params(len(spatial), spatial, DIM, kernel, dilation, causal, None)
    mask, _ = dense_mask_and_bias_index(spatial, params)  # [query, key]
    # Expected non-finite pattern: NaN = nan, +1 = +inf, -1 = -inf, 0 = finite (the clean run).
    want_out = np.zeros(shape, np.float32)
    want_lse = np.zeros(shape[:-1], np.float32)
    for b, (pos, (name, fill)) in enumerate(cases):
        raw[name][b, pos, POISON_HEAD] = fill
        if name == "v":
            rows = mask[:, pos]
            want_out[b, rows, POISON_HEAD] = np.nan_to_num(
                np.sign(np.asarray(fill)), nan=np.nan, posinf=1.0, neginf=-1.0
            )
            want_out[b, rows, POISON_HEAD] = np.where(
                np.isfinite(fill), 0.0, want_out[b, rows, POISON_HEAD]
            )
        else:
            rows = mask[:, pos] if name == "k" else np.arange(n) == pos
            want_out[b, rows, POISON_HEAD] = np.nan
            want_lse[b, rows, POISON_HEAD] = np.nan
    unflat = lambda x: x.reshape(len(cases), *spatial, *x.shape[2:])  # noqa: E731
    clean = {key: unflat(np.where(np.isfinite(x), x, 0.0)) for key, x in raw.items()}
    return (
        {key: unflat(x) for key, x in raw.items()},
        clean,
        unflat(want_out),
        unflat(want_lse),
        cases,
    )


def _call(impl, geometry, q, k, v, rpb=None):
    spatial, kernel, dilation, causal = GEOMETRIES[geometry]
    fn = FUNCS[len(spatial)]
    return fn(q, k, v, kernel, dilation=dilation, is_causal=causal, rpb=rpb, return_lse=True,
              implementation=impl)  # fmt: skip


def _check(got, clean, pattern, what, tol=2e-5):
    """Non-finite exactly where `pattern` says (NaN / +1 / -1), the clean result elsewhere."""
    got = np.asarray(got, np.float32)
    nan, pos, neg = np.isnan(pattern), pattern == 1, pattern == -1
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN at {np.argwhere(np.isnan(got) != nan)}"
    assert np.array_equal(np.isposinf(got), pos), f"{what}: +inf pattern differs"
    assert np.array_equal(np.isneginf(got), neg), f"{what}: -inf pattern differs"
    fine = pattern == 0
    assert_close(got[fine], np.asarray(clean, np.float32)[fine], tol, tol, what)


@functools.cache
def _reference(geometry):
    """The reference on the zero-substituted inputs: out, lse and gradients (cached)."""
    _, clean, *_ = _build(geometry)
    return _value_and_grads("reference", geometry, clean)


def _value_and_grads(impl, geometry, inputs):
    """(out, lse[, dq, dk, dv, drpb]) of sum(out * d_out) + sum(lse * d_lse), rpb included.

    Gradients only for `GRAD_GEOMETRY` (each compile of a Pallas backward in interpret mode
    costs seconds). The lse enters linearly so that its cotangent stays finite where it is NaN.
    """
    spatial, kernel, *_ = GEOMETRIES[geometry]
    rng = np.random.default_rng(7)
    shape = inputs["q"].shape
    rpb = jnp.asarray(rng.standard_normal((HEADS, *(2 * kk - 1 for kk in kernel))), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    d_lse = jnp.asarray(rng.standard_normal(shape[:-1]), jnp.float32)
    args = (inputs["q"], inputs["k"], inputs["v"], rpb)
    if geometry != GRAD_GEOMETRY:
        out, lse = jax.jit(lambda *a: _call(impl, geometry, *a))(*args)
        return np.asarray(out, np.float32), np.asarray(lse, np.float32)

    def loss(q, k, v, rpb):
        out, lse = _call(impl, geometry, q, k, v, rpb)
        return jnp.sum(out * d_out) + jnp.sum(lse * d_lse), (out, lse)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, (out, lse)), grads = grad(*args)
    return tuple(np.asarray(x, np.float32) for x in (out, lse, *grads))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("impl", BACKENDS)
def test_nonfinite_token_confined_to_its_neighborhood(impl, geometry):
    """Forward: non-finite exactly where NATTEN is, the clean result elsewhere. Backward (in
    `GRAD_GEOMETRY`): every gradient finite and equal to the zero-substituted call's (the
    documented rule of nonfinite.py; `dv` is then NATTEN's)."""
    raw, _, want_out, want_lse, cases = _build(geometry)
    out, lse, *grads = _value_and_grads(impl, geometry, raw)
    ref_out, ref_lse, *ref_grads = _reference(geometry)
    for b, (pos, (name, fill)) in enumerate(cases):
        what = f"{impl} {geometry} token {pos} {name}={fill}"
        _check(out[b], ref_out[b], want_out[b], f"out {what}")
        _check(lse[b], ref_lse[b], want_lse[b], f"lse {what}")
    assert len(grads) == len(ref_grads) == (4 if geometry == GRAD_GEOMETRY else 0)
    for g, w, name in zip(grads, ref_grads, ("dq", "dk", "dv", "drpb")[: len(grads)], strict=True):
        assert np.isfinite(g).all(), f"{impl} {geometry}: {name} has non-finite entries"
        scale = float(np.max(np.abs(w))) + 1.0
        assert_close(g, w, 2e-5, 2e-5 * scale, f"{impl} {geometry} {name}")


def test_vmap_and_finite_fast_path():
    """Under vmap the cond becomes a select: the finite member equals the unwrapped call, the
    poisoned one is confined as without vmap."""
    raw, clean, want_out, _, _ = _build("1d")
    f = jax.jit(lambda q, k, v: _call("reference", "1d", q, k, v)[0])
    stacked = [jnp.stack([clean[x], raw[x]]) for x in ("q", "k", "v")]
    got = np.asarray(jax.jit(jax.vmap(f))(*stacked))
    assert_close(got[0], f(clean["q"], clean["k"], clean["v"]), 2e-5, 2e-5, "vmap finite")
    _check(got[1], f(clean["q"], clean["k"], clean["v"]), want_out, "vmap poisoned")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
def test_low_precision_inputs(dtype):
    """bfloat16/float16: the same pattern (inf and NaN exist in both), clean outputs within the
    dtype's tolerance of the float32 reference on the same rounded inputs."""
    raw, clean, want_out, want_lse, _ = _build("2d")
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    out, lse = jax.jit(lambda q, k, v: _call("xla", "2d", q, k, v))(*map(cast, raw.values()))
    assert out.dtype == dtype and lse.dtype == jnp.float32
    rounded = [cast(clean[x]).astype(jnp.float32) for x in ("q", "k", "v")]
    ref_out, ref_lse = jax.jit(lambda q, k, v: _call("reference", "2d", q, k, v))(*rounded)
    tol = TOLERANCES[dtype][0]
    _check(out, ref_out, want_out, f"out {dtype}", tol)
    _check(lse, ref_lse, want_lse, f"lse {dtype}", tol)


@pytest.mark.parametrize("seed", range(4))
def test_in_neighborhood_matches_dense_mask(seed):
    rng = np.random.default_rng(seed)
    ndim = 1 + seed % 3
    kernel = tuple(int(rng.choice([1, 3, 5])) for _ in range(ndim))
    dilation = tuple(int(rng.integers(1, 3)) for _ in range(ndim))
    spatial = tuple(
        int(kk * d + rng.integers(0, 4)) for kk, d in zip(kernel, dilation, strict=True)
    )
    causal = tuple(bool(c) for c in rng.random(ndim) < 0.5)
    params = make_params(ndim, spatial, 4, kernel, dilation, causal, None)
    flags = rng.random((2, *spatial, 3)) < 0.05
    flags.flat[rng.integers(flags.size)] = True  # never all False
    got = np.asarray(jax.jit(in_neighborhood, static_argnums=1)(jnp.asarray(flags), params))
    mask, _ = dense_mask_and_bias_index(spatial, params)
    n = math.prod(spatial)
    want = (mask[None, :, :, None] & flags.reshape(2, 1, n, 3)).any(axis=2)
    np.testing.assert_array_equal(got.reshape(2, n, 3), want)
