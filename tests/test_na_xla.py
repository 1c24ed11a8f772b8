"""The XLA backend against the shared backend test base, plus its memory contract."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from na_base import NABackendTests, loss_and_grads, make_inputs

import natjax
from natjax.ops.na import platform
from natjax.ops.na.spec import make_params


class TestXLA(NABackendTests):
    implementation = "xla"


class TestReference(NABackendTests):
    """The dense reference must itself reproduce NATTEN (it is the spec for the others)."""

    implementation = "reference"
    property_seeds = ()  # comparing the reference with itself proves nothing
    feature_seeds = ()
    dtype_seeds = (3,)
    test_sharding = True


@pytest.fixture
def band_only(monkeypatch, fresh_traces):
    """`implementation="xla"` traces both platform branches; these contracts are the CPU band
    path's (the tiled accelerator path has its own tests in test_na_xla_tiled.py)."""
    from natjax.ops.na import api

    monkeypatch.setitem(api._BACKENDS, "xla", ("natjax.ops.na.xla", "na_xla"))
    # The NaN/inf fix-up (nonfinite.py, its own tests) is a branch that runs only for non-finite
    # inputs; these contracts are the attention path's.
    monkeypatch.setattr(api, "confine_nonfinite", lambda fn, q, k, v, rpb, p: fn(q, k, v, rpb, p))


def _intermediate_sizes(fn, *args):
    """Element counts of every value produced inside `fn` (recursing into sub-jaxprs)."""
    sizes = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                sizes.append((math.prod(var.aval.shape), eqn.primitive.name, var.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return sizes


@pytest.mark.parametrize(
    "spatial,kernel,dilation,causal,bound",
    [
        ((56, 56), (7, 7), (1, 1), (False, False), 1.0),  # NAT stage 1: logits are the largest
        ((28, 30), (7, 7), (4, 3), (False, True), 1.0),  # DiNAT-style dilation, causal axis
        ((8, 9, 10), (3, 3, 3), (1, 2, 1), (False, False, True), 1.0),
        ((200,), (7,), (3,), (False,), 2.0),  # 1-D: key halos of tiles are < 2x the keys
    ],
)
def test_xla_materialises_nothing_quadratic(spatial, kernel, dilation, causal, bound, band_only):
    """Forward and backward never build `N x N` arrays or per-query key/value copies: nothing
    larger than the `[B, h, N, kernel_volume]` logits or the inputs (x `bound` for 1-D, whose
    tiles' key halos are up to twice the keys when the kernel is small)."""
    batch, heads, head_dim = 2, 2, 16
    shape = (batch, *spatial, heads, head_dim)
    q = k = v = jnp.zeros(shape, jnp.float32)
    rpb = jnp.zeros((heads, *(2 * kk - 1 for kk in kernel)), jnp.float32)
    fn = getattr(natjax, f"na{len(spatial)}d")

    def loss(q, k, v, rpb):
        return jnp.sum(fn(q, k, v, kernel, dilation=dilation, is_causal=causal, rpb=rpb,
                          implementation="xla"))  # fmt: skip

    n = math.prod(spatial)
    logits = batch * heads * n * math.prod(kernel)
    sizes = _intermediate_sizes(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, rpb)
    biggest = max(sizes)
    assert biggest[0] <= bound * max(logits, q.size), (biggest, logits, q.size)
    # In particular no per-query copies of keys (B * N * KV * h * D elements).
    assert biggest[0] < batch * n * math.prod(kernel) * heads * head_dim


def test_xla_backward_has_no_scatter_or_gather(band_only):
    """The backward uses the forward's offset pattern (slices, pads, matmuls), not scatters."""
    shape = (1, 12, 11, 2, 8)
    q = jnp.ones(shape)
    rpb = jnp.ones((2, 5, 9))

    def loss(q, rpb):
        return jnp.sum(natjax.na2d(q, q, q, (3, 5), dilation=(2, 1), is_causal=(True, False),
                                   rpb=rpb, implementation="xla") ** 2)  # fmt: skip

    names = {name for _, name, _ in _intermediate_sizes(jax.grad(loss, (0, 1)), q, rpb)}
    assert not {n for n in names if "scatter" in n or n == "gather"}, names


@pytest.mark.parametrize(
    "spatial,kernel,want",
    [((14, 14), 7, "reference"), ((7, 7), 7, "reference"), ((28, 28), 7, "xla"),
     ((200,), 3, "xla"), ((9,), 5, "reference")],
)  # fmt: skip
def test_default_implementation_on_cpu(spatial, kernel, want):
    """None picks dense attention for small maps on CPU (measured faster there), else xla;
    both give the same result."""
    shape = (1, *spatial, 2, 8)
    q = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    params = make_params(len(spatial), spatial, 8, kernel, 1, False, None)
    assert platform.cpu_prefers_dense(spatial, params) == (want == "reference")
    fn = getattr(natjax, f"na{len(spatial)}d")
    got = fn(q, q, q, kernel)
    ref = fn(q, q, q, kernel, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_cpu_batch_chunks_match_and_pad_safely(monkeypatch, fresh_traces):
    """The cache-blocked CPU loop (forced here) gives the reference's values, and its padded last
    chunk contributes nothing, even with biases large enough to overflow exp()."""
    from natjax.ops.na import xla

    monkeypatch.setattr(xla, "_cpu_chunk", lambda batch, per_item: 2 if batch > 2 else None)
    case = dict(spatial=(7, 6), kernel_size=(3, 3), dilation=(2, 1), is_causal=(False, True),
                rpb=True, batch=5, heads=2, head_dim=4, seed=9)  # fmt: skip
    q, k, v, rpb, d_out = make_inputs(case)
    for bias in (rpb, rpb + 100.0):
        got = loss_and_grads("xla", case, q, k, v, bias, d_out)
        want = loss_and_grads("reference", case, q, k, v, bias, d_out)
        for g, w in zip(got[2], want[2], strict=True):
            assert np.all(np.isfinite(np.asarray(g)))
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
