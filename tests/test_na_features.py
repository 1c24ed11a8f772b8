"""NATTEN 0.21's features beyond plain NA: the window rules with stride and even kernels, GQA/MQA,
additional key/value tokens and `merge_attentions`; backend-independent properties and refusals.

The per-backend golden and random tests of these features live in the shared base
(`na_base.NABackendTests.test_golden_features` / `test_features_match_reference`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from na_base import (
    TOLERANCES,
    assert_close,
    feature_call,
    feature_refusal,
    make_feature_inputs,
    random_feature_case,
)

import natjax
from natjax.ops.na.spec import NACall, axis_windows, make_params


def _rows(win):
    """Attended key sets per query, as sorted lists."""
    return [sorted(int(k) for k, ok in zip(keys, v, strict=True) if ok)
            for keys, v in zip(win.key, win.valid, strict=True)]  # fmt: skip


def test_window_rules_match_the_golden_readme_examples():
    # X=17 k=5 s=2: queries 0,1 share [0..4]; 2,3 share [1..5]; 14,15,16 see [12..16].
    rows = _rows(axis_windows(17, 5, 1, False, 2))
    assert rows[0] == rows[1] == list(range(0, 5))
    assert rows[2] == rows[3] == list(range(1, 6))
    assert rows[14] == rows[15] == rows[16] == list(range(12, 17))
    # X=11 k=6 s=4 (left 3, right 2): 0..3 see [0..5]; 4.. see [3..8]; 8..10 see [5..10].
    rows = _rows(axis_windows(11, 6, 1, False, 4))
    assert all(rows[i] == list(range(0, 6)) for i in range(4))
    assert rows[4] == list(range(3, 9))
    assert all(rows[i] == list(range(5, 11)) for i in (8, 9, 10))
    # X=11 k=3 s=3 d=2 causal: query 7 (odd sub-sequence, i'=3, leader 4) sees keys 5 and 7.
    rows = _rows(axis_windows(11, 3, 2, True, 3))
    assert rows[7] == [5, 7]
    assert rows[6] == [6] and rows[4] == [0, 2, 4] and rows[3] == [1, 3]
    # X=13 k=4 s=1: queries 0, 1 -> 0..3; i in 2..11 -> i-2..i+1; 12 -> 9..12.
    rows = _rows(axis_windows(13, 4, 1, False))
    assert rows[0] == rows[1] == [0, 1, 2, 3]
    assert all(rows[i] == list(range(i - 2, i + 2)) for i in range(2, 12))
    assert rows[12] == [9, 10, 11, 12]


@pytest.mark.parametrize("causal", [False, True])
def test_strided_bias_index_stays_in_the_table_and_reduces_to_stride_one(causal):
    for length, k, d in ((17, 5, 1), (23, 7, 3), (12, 4, 2), (9, 2, 1)):
        plain = axis_windows(length, k, d, causal)
        for s in range(1, k + 1):
            w = axis_windows(length, k, d, causal, s)
            idx = w.rpb_index[w.valid]
            assert idx.min() >= 0 and idx.max() <= 2 * k - 2, (length, k, d, s)
            # The index is (key - query) / dilation + K - 1, exactly as at stride 1.
            query = np.arange(length)[:, None]
            want = (w.key - query) // d + k - 1
            np.testing.assert_array_equal(w.rpb_index[w.valid], want[w.valid])
            # Every query sees itself (so lse is finite and a bias bin exists).
            assert all(q in row for q, row in enumerate(_rows(w)))
        stride1 = axis_windows(length, k, d, causal, 1)
        for a, b in ((plain.key, stride1.key), (plain.valid, stride1.valid)):
            np.testing.assert_array_equal(a, b)


def test_stride_one_and_defaults_agree_with_explicit_arguments():
    case = random_feature_case(3)
    x = make_feature_inputs(case)
    q, k, v = x["q"][..., :1, :], x["k"][..., :1, :], x["v"][..., :1, :]
    fn = {1: natjax.na1d, 2: natjax.na2d, 3: natjax.na3d}[q.ndim - 3]
    a = fn(q, k, v, 3 if min(q.shape[1:-2]) >= 3 else 1, implementation="xla")
    b = fn(q, k, v, 3 if min(q.shape[1:-2]) >= 3 else 1, stride=1, implementation="xla")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("impl", ["xla", "xla_tiled"])
def test_gqa_equals_repeated_heads_without_repeating(impl):
    """GQA is MHA over `repeat_interleave`d key/value heads; their gradients are group sums."""
    rng = np.random.default_rng(0)
    shape, kvh, group = (2, 9, 10), 2, 3
    q = jnp.asarray(rng.standard_normal((*shape, kvh * group, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((*shape, kvh, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((*shape, kvh, 6)), jnp.float32)
    rpb = jnp.asarray(rng.standard_normal((kvh * group, 5, 5)), jnp.float32)
    rep = lambda x: jnp.repeat(x, group, axis=-2)  # noqa: E731

    def loss(q, k, v, rpb):
        return jnp.sum(jnp.sin(natjax.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb,
                                           implementation=impl)))  # fmt: skip

    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rpb)
    want = jax.jit(jax.value_and_grad(lambda q, k, v, r: loss(q, rep(k), rep(v), r),
                                      argnums=(0, 1, 2, 3)))(q, k, v, rpb)  # fmt: skip
    assert_close(got[0], want[0], 1e-5, 1e-5, "loss")
    for a, b, name in zip(got[1], want[1], ("dq", "dk", "dv", "drpb"), strict=True):
        assert_close(a, b, 2e-5, 2e-5, name)


def _dense_joint(q, k, v, ak, av, params):
    """Dense attention over neighborhood + extra keys with one softmax (independent of
    `merge_attentions`): the definition the API must meet."""
    from natjax.ops.na.reference import dense_mask_and_bias_index

    b, *sp, h, d = q.shape
    n = int(np.prod(sp))
    mask, _ = dense_mask_and_bias_index(tuple(sp), params)
    qf, kf, vf = q.reshape(b, n, h, d), k.reshape(b, n, h, d), v.reshape(b, n, h, -1)
    keys = jnp.concatenate([kf, ak], axis=1)
    vals = jnp.concatenate([vf, av], axis=1)
    full = np.concatenate([mask, np.ones((n, ak.shape[1]), bool)], axis=1)
    s = jnp.einsum("bqhd,bkhd->bhqk", qf * params.scale, keys)
    s = jnp.where(full[None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vals)
    return out.reshape(b, *sp, h, -1), jnp.moveaxis(lse, 1, -1).reshape(b, *sp, h)


@pytest.mark.parametrize("impl", ["reference", "xla", "xla_tiled"])
def test_extra_tokens_are_one_softmax_with_the_neighborhood(impl):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 7, 6, 2, 4)), jnp.float32) for _ in range(3))
    ak, av = (jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32) for _ in range(2))
    params = make_params(2, (7, 6), 4, 3, (2, 1), (False, True), None)

    def loss(fn, *args):
        out, lse = fn(*args)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse))  # d_lse != 0

    api = lambda q, k, v, ak, av: natjax.na2d(  # noqa: E731
        q, k, v, 3, dilation=(2, 1), is_causal=(False, True), additional_keys=ak,
        additional_values=av, return_lse=True, implementation=impl)  # fmt: skip
    dense = lambda *a: _dense_joint(*a, params)  # noqa: E731
    got = jax.value_and_grad(lambda *a: loss(api, *a), argnums=tuple(range(5)))(q, k, v, ak, av)
    want = jax.value_and_grad(lambda *a: loss(dense, *a), argnums=tuple(range(5)))(q, k, v, ak, av)
    assert_close(got[0], want[0], 1e-5, 1e-5, "loss")
    for a, b, name in zip(got[1], want[1], ("dq", "dk", "dv", "dak", "dav"), strict=True):
        assert_close(a, b, 2e-5, 2e-5, name)


def test_merge_attentions_is_exact_and_differentiable():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((3, 2, 10)), jnp.float32)  # [n, h, keys]
    vals = jnp.asarray(rng.standard_normal((10, 5)), jnp.float32)

    def part(lo, hi, s):
        lse = jax.nn.logsumexp(s[..., lo:hi], axis=-1)
        out = jnp.einsum("nhk,kd->nhd", jnp.exp(s[..., lo:hi] - lse[..., None]), vals[lo:hi])
        return out, lse

    def merged(s):
        parts = [part(0, 4, s), part(4, 7, s), part(7, 10, s)]
        return natjax.merge_attentions([p[0] for p in parts], [p[1] for p in parts])

    out, lse = merged(logits)
    want_out, want_lse = part(0, 10, logits)
    assert_close(out, want_out, 1e-6, 1e-6, "out")
    assert_close(lse, want_lse, 1e-6, 1e-6, "lse")
    f = lambda fn: lambda s: jnp.sum(jnp.sin(fn(s)[0])) + jnp.sum(fn(s)[1] ** 2)  # noqa: E731
    assert_close(jax.grad(f(merged))(logits), jax.grad(f(lambda s: part(0, 10, s)))(logits),
                 1e-5, 1e-6, "grad")  # fmt: skip


def test_merge_attentions_with_an_empty_part_and_bad_inputs():
    out = jnp.ones((2, 3, 4))
    lse = jnp.zeros((2, 3))
    merged, mlse = natjax.merge_attentions([out, 5 * out], [lse, jnp.full((2, 3), -jnp.inf)])
    assert_close(merged, out, 0, 0, "empty part ignored")
    assert_close(mlse, lse, 0, 0, "lse")
    g = jax.grad(lambda o: jnp.sum(natjax.merge_attentions([o, o], [lse, -jnp.inf + lse])[0]))(out)
    assert np.isfinite(np.asarray(g)).all()
    with pytest.raises(ValueError, match="non-empty lists of equal length, got 2 outputs and 1"):
        natjax.merge_attentions([out, out], [lse])
    with pytest.raises(ValueError, match=r"outs\[1\] with \(2, 3, 5\)"):
        natjax.merge_attentions([out, jnp.ones((2, 3, 5))], [lse, lse])
    with pytest.raises(ValueError, match=r"lses\[0\] must have shape \(2, 3\)"):
        natjax.merge_attentions([out], [jnp.zeros((2,))])


def test_refusals_are_clean_value_errors():
    """Backends that cannot run a call refuse it by name; `None` still runs it. Pallas runs
    stride, even kernels, GQA/MQA and a value head_dim of its own (issue 12), but not a value
    head_dim above 128 nor a kernel above 13."""
    from natjax.ops.na import api

    params = make_params(1, (16,), 8, 4, 1, False, None, 2)
    q = jax.ShapeDtypeStruct((1, 16, 4, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
    for impl in ("xla_tiled", "pallas"):
        assert api.unsupported_reason(impl, NACall.of(q, kv, kv, None, params)) is None, impl
    wide_v = jax.ShapeDtypeStruct((1, 16, 2, 256), jnp.float32)
    reason = api.unsupported_reason("pallas", NACall.of(q, kv, wide_v, None, params))
    assert "value head_dim 256" in reason
    x = jnp.ones((1, 32, 2, 8))
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot run this call.*kernel"):
        natjax.na1d(x, x, x, 15, stride=2, implementation="pallas")
    out = natjax.na1d(x, x, x, 15, stride=2)
    assert out.shape == x.shape


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
def test_feature_combinations_in_low_precision(dtype):
    rtol, atol = TOLERANCES[dtype]
    for seed in (1, 6):
        case = random_feature_case(seed)
        x = make_feature_inputs(case, dtype)
        x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
        want = feature_call("reference", case, x32)
        for impl in ("xla", "xla_tiled"):
            assert feature_refusal(impl, case, x) is None
            out, lse, grads = feature_call(impl, case, x)
            assert out.dtype == dtype and lse.dtype == jnp.float32
            assert_close(out, want[0], rtol, atol, f"out {impl} {case}")
            assert_close(lse, want[1], rtol, atol, f"lse {impl} {case}")
            for name, g in grads.items():
                assert g.dtype == dtype, name
                scale = float(jnp.max(jnp.abs(want[2][name]))) + 1.0
                assert_close(g, want[2][name], rtol, atol * scale, f"{name} {impl} {case}")


def test_random_feature_cases_cover_the_space():
    cases = [random_feature_case(s) for s in range(8)]
    assert {len(c["spatial"]) for c in cases} >= {1, 2}
    assert any(max(c["stride"]) > 1 for c in cases)
    assert any(k % 2 == 0 for c in cases for k in c["kernel_size"])
    assert any(c["heads"] != c["kv_heads"] for c in cases)
    assert any(c["n_extra"] for c in cases) and any(c["rpb"] for c in cases)
    assert any(any(c["is_causal"]) for c in cases)
    assert any(c["value_dim"] != c["head_dim"] for c in cases)
