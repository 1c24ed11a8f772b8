"""Argument checking of the public NA functions, and the window rules themselves."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from na_base import random_case

import natjax
from natjax.ops.na.spec import axis_windows

Q2 = jnp.zeros((1, 8, 8, 2, 4), jnp.float32)
Z = jnp.zeros


def call(q=Q2, k=None, v=None, kernel_size=3, **kw):
    k = q if k is None else k
    v = q if v is None else v
    return natjax.na2d(q, k, v, kernel_size, **kw)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=0), r"kernel_size.*>= 1.*axis 0: 0"),
        (dict(kernel_size=(3, 3, 3)), r"kernel_size.*one entry per spatial axis \(2\)"),
        (dict(kernel_size=3.0), r"kernel_size"),
        (dict(kernel_size=True), r"kernel_size"),
        (dict(kernel_size=9), r"axis 0 has kernel_size=9, dilation=1 \(product 9\) but size 8"),
        (dict(kernel_size=3, dilation=3), r"product 9\) but size 8"),
        (dict(dilation=0), r"dilation.*>= 1"),
        (dict(is_causal=(True,)), r"is_causal.*one entry per spatial axis"),
        (dict(is_causal="yes"), r"is_causal"),
        (
            dict(rpb=jnp.zeros((2, 3, 3))),
            r"rpb.*= \(2, 5, 5\), got \(2, 3, 3\)",
        ),
        (dict(rpb=jnp.zeros((2, 5, 5), jnp.int32)), r"rpb.*float"),
        (dict(implementation="cuda"), r"unknown `implementation` 'cuda'.*'xla'"),
        (dict(q=jnp.zeros((1, 8, 2, 4))), r"query.*rank 5.*\(1, 8, 2, 4\)"),
        (dict(q=jnp.zeros((1, 8, 8, 2, 4), jnp.int32)), r"query.*float.*int32"),
        (dict(k=jnp.zeros((1, 8, 7, 2, 4))), r"same batch and spatial shape"),
        (dict(k=jnp.zeros((1, 8, 8, 2, 5))), r"`key` must have the head_dim of `query` \(4\)"),
        (dict(v=jnp.zeros((1, 8, 8, 1, 4))), r"same number of heads, got 2 and 1"),
        (dict(stride=4), r"stride.*<= kernel_size.*axis 0: stride 4, kernel 3"),
        (dict(stride=0), r"stride.*>= 1"),
        (dict(stride=(1, 2, 1)), r"stride.*one entry per spatial axis \(2\)"),
        (dict(stride=1.5), r"stride"),
        (
            dict(q=jnp.zeros((1, 8, 8, 3, 4)), k=Q2, v=Q2),
            r"multiple of the key/value heads.*heads=3 and kv_heads=2",
        ),
        (dict(additional_keys=jnp.zeros((1, 2, 2, 4))), r"given together.*only `additional_keys`"),
        (
            dict(additional_values=jnp.zeros((1, 2, 2, 4))),
            r"given together.*only `additional_values`",
        ),
        (
            dict(additional_keys=Z((1, 2, 1, 4)), additional_values=Z((1, 2, 1, 4))),
            r"additional_keys.*\[1, n_extra, 2, 4\], got \(1, 2, 1, 4\)",
        ),
        (
            dict(additional_keys=Z((1, 2, 2, 4)), additional_values=Z((1, 3, 2, 4))),
            r"same number of tokens, got 2 and 3",
        ),
        (
            dict(additional_keys=jnp.zeros((1, 2, 2)), additional_values=jnp.zeros((1, 2, 2, 4))),
            r"additional_keys.*rank 4",
        ),
        (
            dict(
                additional_keys=jnp.zeros((1, 2, 2, 4), jnp.float16),
                additional_values=jnp.zeros((1, 2, 2, 4)),
            ),
            r"additional_keys.*dtype of `query` \(float32\), got float16",
        ),
        (
            dict(additional_keys=Z((1, 0, 2, 4)), additional_values=Z((1, 0, 2, 4))),
            r"additional_keys.*empty axes",
        ),
        (dict(v=jnp.zeros((1, 8, 8, 2, 4), jnp.bfloat16)), r"same dtype"),
        (dict(q=jnp.zeros((0, 8, 8, 2, 4))), r"empty axes"),
        (dict(scale="big"), r"scale"),
        (dict(scale=float("nan")), r"scale.*finite"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        call(**kwargs)


def test_dilation_is_keyword_only():
    """`stride` precedes `dilation` (NATTEN 0.21's order): both are keyword-only, so an old
    positional `dilation` fails loudly instead of silently becoming a stride."""
    with pytest.raises(TypeError):
        natjax.na2d(Q2, Q2, Q2, 3, 2)


def test_non_array_input():
    with pytest.raises(ValueError, match="query.*must be an array"):
        natjax.na1d([[1.0]], Q2, Q2, 3)


def test_pallas_by_name_reports_why_it_cannot_run():
    q = jnp.zeros((1, 8, 8, 1, 256), jnp.float32)  # head_dim 256 is beyond the kernel's 128
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot run.*head_dim 256"):
        natjax.na2d(q, q, q, 3, implementation="pallas")


def test_gpu_default_falls_back_to_xla_once_with_a_warning(monkeypatch, fresh_traces):
    from natjax.ops.na import platform

    # The CUDA branch is traced on every host; it warns only where programs run on a GPU.
    monkeypatch.setattr(platform.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(platform, "_warned", set())
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 1, 256)), jnp.float32)
    with pytest.warns(UserWarning, match=r"falling back to the 'xla'.*head_dim 256"):
        first = natjax.na2d(q, q, q, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = natjax.na2d(q, q, q, 3)  # warned once only
    # This host runs the CPU branch of the same program.
    want = natjax.na2d(q, q, q, 3, implementation="xla")
    np.testing.assert_allclose(np.asarray(first), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(second), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_numpy_scalars_are_accepted_per_axis():
    q = jnp.zeros((1, 8, 8, 1, 4), jnp.float32)
    out = natjax.na2d(q, q, q, (np.int64(3), 3), is_causal=(np.True_, False))
    assert out.shape == q.shape


def test_window_rules_match_natten_examples():
    # Non-causal, no dilation: windows shift inwards at the borders.
    w = axis_windows(7, 3, 1, False)
    np.testing.assert_array_equal(w.key[:, 0], [0, 0, 1, 2, 3, 4, 4])
    np.testing.assert_array_equal(w.rpb_index[0], [2, 3, 4])  # query 0 sees keys 0,1,2
    # Dilation 2 on length 7: groups {0,2,4,6} and {1,3,5}, each with its own borders.
    w = axis_windows(7, 3, 2, False)
    np.testing.assert_array_equal(w.key[5], [1, 3, 5])
    np.testing.assert_array_equal(w.key[6], [2, 4, 6])
    # Causal: the K most recent positions up to the query, fewer at the start.
    w = axis_windows(5, 3, 1, True)
    np.testing.assert_array_equal(w.valid[0], [False, False, True])
    np.testing.assert_array_equal(w.key[4], [2, 3, 4])
    np.testing.assert_array_equal(w.rpb_index[4], [0, 1, 2])


def test_random_cases_cover_the_space():
    cases = [random_case(s) for s in range(24)]
    assert {len(c["spatial"]) for c in cases} == {1, 2, 3}
    assert any(any(c["is_causal"]) for c in cases)
    assert any(max(c["dilation"]) > 1 for c in cases)
    assert any(1 in c["kernel_size"] for c in cases)
    assert any(c["rpb"] for c in cases) and not all(c["rpb"] for c in cases)
    # Dilation groups of unequal length (size not a multiple of the dilation).
    assert any(
        n % d for c in cases for n, d in zip(c["spatial"], c["dilation"], strict=True) if d > 1
    )


def test_kernel_size_one_is_identity_on_values():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 6, 3, 4)), jnp.float32) for _ in range(3))
    out = natjax.na2d(q, k, v, (1, 1), implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(v), rtol=1e-6)


def test_rpb_with_causal_is_supported():
    """NATTEN refuses rpb with causal axes; natjax defines it by the same index formula."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 9, 1, 4)), jnp.float32)
    rpb = jnp.asarray(rng.standard_normal((1, 5)), jnp.float32)
    out, lse = natjax.na1d(q, q, q, 3, is_causal=True, rpb=rpb, return_lse=True, scale=1.0)
    # Query 0 sees only itself at offset 2 (bias index (0 - 0) + 3 - 1 = 2).
    np.testing.assert_allclose(float(lse[0, 0, 0]), float(q[0, 0, 0] @ q[0, 0, 0] + rpb[0, 2]),
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(q[0, 0]), rtol=1e-6)
