"""The blocked-halo XLA path (`xla_tiled`): shared backend base, tile-boundary cases, and the
per-platform choice of `implementation="xla"` / None surviving export for other platforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from na_base import TOLERANCES, NABackendTests, assert_close, make_inputs

import natjax
from natjax.ops.na import ffi, xla_tiled
from natjax.ops.na.reference import na_reference
from natjax.ops.na.spec import make_params


class TestXLATiled(NABackendTests):
    implementation = "xla_tiled"
    property_seeds = tuple(range(12))


# spatial, kernel, dilation, causal, tiles: sizes that are not multiples of the tile, tiles
# straddling unequal dilation groups and the shifted border windows, causal axes, tiles of 1.
BOUNDARY = [
    ((13,), 5, 1, False, (4,)),
    ((17,), 3, 4, True, (3,)),
    ((10,), 3, 3, False, (3,)),  # a shorter group's last tile is padding only
    ((11, 9), (5, 3), (2, 3), (False, True), (3, 2)),
    ((7, 7), 7, 1, False, (8, 8)),  # the window covers the map
    ((5, 9, 8), (3, 3, 5), (1, 2, 1), (True, False, False), (2, 1, 3)),
]


@pytest.mark.parametrize("spatial,kernel,dilation,causal,tiles", BOUNDARY)
def test_tile_boundaries(spatial, kernel, dilation, causal, tiles):
    per_axis = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * len(spatial)  # noqa: E731
    kernel, dilation, causal = per_axis(kernel), per_axis(dilation), per_axis(causal)
    case = dict(spatial=spatial, kernel_size=kernel, dilation=dilation, is_causal=causal,
                rpb=True, batch=2, heads=2, head_dim=8, seed=len(spatial))  # fmt: skip
    q, k, v, rpb, d_out = make_inputs(case)
    params = make_params(len(spatial), spatial, 8, kernel, dilation, causal, None)

    def loss(fn):
        def f(q, k, v, rpb):
            out, lse = fn(q, k, v, rpb, params)
            return jnp.sum(out * d_out) + jnp.sum(jnp.cos(lse)), (out, lse)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, rpb)

    tiled = lambda *a: xla_tiled.na_xla_tiled(*a, tiles=tiles)
    (_, got), g_got = loss(tiled)
    (_, want), g_want = loss(na_reference)
    rtol, atol = TOLERANCES[jnp.float32]
    for a, b, name in zip(
        (*got, *g_got), (*want, *g_want), ("out", "lse", "dq", "dk", "dv", "drpb"), strict=True
    ):
        assert_close(a, b, rtol, atol, f"{name} {spatial} tiles={tiles}")


def test_choose_tiles_prefers_square_tiles_at_nat_stage1():
    params = make_params(2, (56, 56), 32, 7, 1, False, None)
    tiles = xla_tiled.choose_tiles((56, 56), params, 32, 2)
    assert len(tiles) == 2 and 4 <= tiles[0] <= 16 and 4 <= tiles[1] <= 16, tiles


def test_no_float32_copies_of_bf16_inputs():
    """Attention matmul operands stay in the input dtype (float32 only as accumulation; the small
    per-class bias-gradient sum is float32); the only widened bf16 `[..., head_dim]` values are
    the two factors of the fused `delta = sum(d_out * out)` of the backward."""
    x = jnp.zeros((2, 12, 12, 2, 16), jnp.bfloat16)
    rpb = jnp.zeros((2, 5, 5), jnp.bfloat16)
    lse = jnp.zeros((2, 12, 12, 2), jnp.float32)
    params = make_params(2, (12, 12), 16, 3, 1, False, None)
    static = (params, xla_tiled.choose_tiles((12, 12), params, 16, 2))
    fwd = jax.make_jaxpr(lambda *a: xla_tiled._forward(static, *a))(x, x, x, rpb)
    bwd = jax.make_jaxpr(lambda r, c: xla_tiled._backward(static, r, c))(
        (x, x, x, rpb, x, lse), (x, lse)
    )
    for jaxpr, n_casts in ((fwd, 0), (bwd, 2)):
        dots, casts = [], []
        for eqn in jaxpr.jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.ndim >= 5:
                dots.append([v.aval.dtype for v in eqn.invars])
            if eqn.primitive.name == "convert_element_type":
                (v,) = eqn.invars
                if v.aval.dtype == jnp.bfloat16 and v.aval.shape[-1:] == (16,):
                    casts.append(v.aval.shape)
        assert dots and all(d == [jnp.bfloat16, jnp.bfloat16] for d in dots), dots
        assert len(casts) == n_casts, casts


def _lowered(fn, platform, *args):
    # None on CPU may run natjax-ffi's kernels, custom calls jax.export refuses by default.
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
              *ffi.export_disabled_checks()]  # fmt: skip
    exp = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(*args)
    return exp.mlir_module()


@pytest.mark.parametrize("impl", ["xla", None])
def test_export_for_cuda_has_no_cpu_path(impl):
    """Exported from this CPU host for CUDA/TPU, `xla` and None contain the accelerator program
    (no batch or offset `while` loop of the CPU band path); for CPU they keep the band path."""
    x = jax.ShapeDtypeStruct((8, 16, 16, 2, 16), jnp.bfloat16)
    rpb = jax.ShapeDtypeStruct((2, 9, 9), jnp.bfloat16)

    def loss(q, k, v, rpb):
        out = natjax.na2d(q, k, v, 5, dilation=(1, 2), rpb=rpb, implementation=impl)
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.grad(loss, (0, 1, 2, 3))
    for platform in ("cuda", "tpu"):
        text = _lowered(grad, platform, x, x, x, rpb)
        assert "stablehlo.while" not in text, f"{impl} {platform}: CPU loop in the program"
        assert "stablehlo.gather" in text or "triton" in text, f"{impl} {platform}: no tiles"
    cpu = _lowered(grad, "cpu", x, x, x, rpb)
    if impl == "xla":
        assert "stablehlo.while" in cpu, "CPU lost the band path"
    # The tiled branch (halo gathers) is not lowered for CPU (the band path has no gathers).
    assert "stablehlo.gather" not in cpu, "the accelerator branch was lowered for CPU"


def test_xla_runs_band_on_cpu_and_matches_tiled():
    case = dict(spatial=(9, 11), kernel_size=(3, 5), dilation=(2, 1), is_causal=(False, True),
                rpb=True, batch=2, heads=2, head_dim=8, seed=1)  # fmt: skip
    q, k, v, rpb, _ = make_inputs(case)
    kw = dict(dilation=(2, 1), is_causal=(False, True), rpb=rpb)
    a = natjax.na2d(q, k, v, (3, 5), **kw, implementation="xla")
    b = natjax.na2d(q, k, v, (3, 5), **kw, implementation="xla_tiled")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
