"""Shared test base for every neighborhood-attention backend.

A backend's test module subclasses `NABackendTests` and sets `implementation`; it then runs the
same golden (NATTEN 0.17.5), property (vs the dense reference), dtype, transformation and sharding
tests as every other backend. Expensive backends (Pallas in interpret mode) shrink the random
sweep with `property_seeds` and may opt out of float64 with `supports_float64 = False`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import natjax

DATA = Path(__file__).parent / "data" / "na"
GOLDEN = json.loads((DATA / "manifest.json").read_text())
# NATTEN 0.17.5 extra-KV ops and NATTEN 0.21.6 stride/even/GQA masks (see its PROVENANCE.md).
FEATURE_DATA = Path(__file__).parent / "data" / "na_features"
FEATURES = json.loads((FEATURE_DATA / "manifest.json").read_text())
_FEATURE_GRADS = ("dq", "dk", "dv", "drpb", "dak", "dav")
FUNCS = {1: natjax.na1d, 2: natjax.na2d, 3: natjax.na3d}

# (rtol, atol) per input dtype for outputs and gradients. Low-precision inputs are compared with
# the float32 reference on the *same rounded inputs*, so the error is the output rounding plus
# low-precision matmul operands where a backend uses them.
TOLERANCES = {
    jnp.float32: (2e-5, 2e-5),
    jnp.float16: (5e-3, 5e-3),
    jnp.bfloat16: (3e-2, 3e-2),
}


def random_case(seed: int, max_size: int = 9) -> dict:
    """A random but valid call: rank, sizes, kernels, dilations, causal axes, rpb, dims."""
    rng = np.random.default_rng(seed)
    ndim = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    kernel, dilation, spatial = [], [], []
    for _ in range(ndim):
        k = int(rng.choice([1, 3, 5, 7] if ndim < 3 else [1, 3, 5]))
        d = int(rng.choice([1, 1, 2, 3]))
        lo = k * d
        hi = max(lo, max_size if ndim < 3 else 7) + (8 if ndim == 1 else 0)
        spatial.append(int(rng.integers(lo, hi + 1)))
        kernel.append(k)
        dilation.append(d)
    return dict(
        spatial=tuple(spatial),
        kernel_size=tuple(kernel),
        dilation=tuple(dilation),
        is_causal=tuple(bool(c) for c in rng.random(ndim) < 0.3),
        rpb=bool(rng.random() < 0.6),
        batch=int(rng.integers(1, 3)),
        heads=int(rng.integers(1, 4)),
        head_dim=int(rng.choice([4, 8, 16])),
        seed=seed,
    )


def make_inputs(case: dict, dtype=jnp.float32):
    rng = np.random.default_rng(case.get("seed", 0) + 1000)
    shape = (case["batch"], *case["spatial"], case["heads"], case["head_dim"])
    q, k, v, d_out = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    rpb = None
    if case["rpb"]:
        tail = tuple(2 * kk - 1 for kk in case["kernel_size"])
        rpb = rng.standard_normal((case["heads"], *tail)).astype(np.float32)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), cast(rpb), cast(d_out)


def loss_and_grads(impl, case, q, k, v, rpb, d_out, scale=None):
    """(out, lse, grads of sum(out * d_out) w.r.t. q, k, v[, rpb]) for one implementation."""
    fn = FUNCS[len(case["spatial"])]

    def loss(q, k, v, rpb):
        out, lse = fn(q, k, v, case["kernel_size"], dilation=case["dilation"],
                      is_causal=case["is_causal"], rpb=rpb, scale=scale, return_lse=True,
                      implementation=impl)  # fmt: skip
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), (out, lse)

    argnums = (0, 1, 2, 3) if rpb is not None else (0, 1, 2)
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
    (_, (out, lse)), grads = grad_fn(q, k, v, rpb)
    return out, lse, grads


def random_feature_case(seed: int) -> dict:
    """A random valid call combining the NATTEN 0.21 features: stride, even kernels, GQA/MQA,
    a value head_dim of its own and extra tokens, with dilation, causal axes and rpb."""
    rng = np.random.default_rng(10_000 + seed)
    ndim = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
    kernel, stride, dilation, spatial = [], [], [], []
    for _ in range(ndim):
        k = int(rng.integers(2, 7 if ndim < 3 else 4))
        d = int(rng.choice([1, 1, 2]))
        kernel.append(k)
        stride.append(int(rng.integers(1, k + 1)))
        dilation.append(d)
        spatial.append(int(rng.integers(k * d, k * d + (9 if ndim == 1 else 4))))
    kv_heads = int(rng.choice([1, 2]))
    head_dim = int(rng.choice([4, 8]))
    return dict(
        spatial=tuple(spatial),
        kernel_size=tuple(kernel),
        stride=tuple(stride),
        dilation=tuple(dilation),
        is_causal=tuple(bool(c) for c in rng.random(ndim) < 0.3),
        rpb=bool(rng.random() < 0.5),
        batch=int(rng.integers(1, 3)),
        heads=kv_heads * int(rng.choice([1, 2, 3])),
        kv_heads=kv_heads,
        head_dim=head_dim,
        value_dim=int(rng.choice([head_dim, 4, 12])),
        n_extra=int(rng.choice([0, 0, 1, 3])),
        scale=None,
        seed=seed,
    )


def make_feature_inputs(case: dict, dtype=jnp.float32) -> dict:
    """Inputs of a `random_feature_case`, by the golden files' names."""
    rng = np.random.default_rng(case["seed"] + 20_000)
    b, sp, h, kvh = case["batch"], case["spatial"], case["heads"], case["kv_heads"]
    d, dv, e = case["head_dim"], case["value_dim"], case["n_extra"]
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    x = dict(q=normal(b, *sp, h, d), k=normal(b, *sp, kvh, d), v=normal(b, *sp, kvh, dv))
    x["d_out"] = normal(b, *sp, h, dv)
    if case["rpb"]:
        x["rpb"] = normal(h, *(2 * k - 1 for k in case["kernel_size"]))
    if e:
        x["ak"], x["av"] = normal(b, e, kvh, d), normal(b, e, kvh, dv)
    return x


def feature_call(impl, case: dict, x: dict):
    """(out, lse, {grad name: gradient of sum(out * d_out)}) for a features case."""
    fn = FUNCS[len(case["spatial"])]
    names = [n for n in ("q", "k", "v", "rpb", "ak", "av") if n in x]

    def loss(*args):
        a = dict(zip(names, args, strict=True))
        out, lse = fn(a["q"], a["k"], a["v"], case["kernel_size"], stride=case["stride"],
                      dilation=case["dilation"], is_causal=case["is_causal"], rpb=a.get("rpb"),
                      scale=case["scale"], additional_keys=a.get("ak"),
                      additional_values=a.get("av"), return_lse=True,
                      implementation=impl)  # fmt: skip
        d_out = x["d_out"].astype(jnp.float32)
        return jnp.sum(out.astype(jnp.float32) * d_out), (out, lse)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    (_, (out, lse)), grads = grad_fn(*[x[n] for n in names])
    return out, lse, {"d" + n: g for n, g in zip(names, grads, strict=True)}


def feature_refusal(impl, case: dict, x: dict) -> str | None:
    """The backend's `unsupported_reason` for a features case (None: it runs it)."""
    from natjax.ops.na import api
    from natjax.ops.na.spec import NACall, make_params

    params = make_params(len(case["spatial"]), tuple(case["spatial"]), case["head_dim"],
                         case["kernel_size"], case["dilation"], case["is_causal"],
                         case["scale"], case["stride"])  # fmt: skip
    call = NACall.of(x["q"], x["k"], x["v"], x.get("rpb"), params, case["n_extra"])
    return api.unsupported_reason(impl, call)


def assert_close(actual, expected, rtol, atol, what):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def run_on_8_devices(*checks: tuple[str, str]) -> None:
    """Runs the `(script, marker)` checks in one subprocess with 8 simulated CPU devices (the
    suite's XLA flags kept, conftest.py; one process start and jax import for all of them), each
    script in a namespace of its own and each run even if an earlier one failed, and asserts that
    every script printed its marker, showing the output otherwise."""
    driver = "import traceback\n" + "".join(
        f"try:\n    exec({script!r}, {{'__name__': '__main__'}})\n"
        "except Exception:\n    traceback.print_exc()\n"
        for script, _ in checks
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    res = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, env=env, timeout=900
    )
    missing = [marker for _, marker in checks if marker not in res.stdout]
    assert not missing, f"{missing} not printed\n" + res.stdout + res.stderr


class NABackendTests:
    """Tests every backend must pass. Subclasses set `implementation`."""

    implementation: str = ""
    # Random cases beside the golden ones (which pin NATTEN's semantics case by case): enough to
    # mix ranks, borders, dilation groups and causal axes; each seed costs a fwd+bwd compile.
    property_seeds: tuple[int, ...] = tuple(range(12))
    feature_seeds: tuple[int, ...] = tuple(range(6))
    dtype_seeds: tuple[int, ...] = (3, 7)
    supports_float64: bool = True
    test_sharding: bool = True

    # -- NATTEN golden cases --------------------------------------------------------------

    @pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
    def test_golden_natten(self, case):
        z = np.load(DATA / case["file"])
        rpb = z["rpb"] if case["rpb"] else None
        out, lse, grads = loss_and_grads(
            self.implementation, case, z["q"], z["k"], z["v"], rpb, z["d_out"], case["scale"]
        )
        # Float32 precision against float64 NATTEN results.
        tol = dict(rtol=1e-5, atol=2e-6)
        assert_close(out, z["out"], what="out", **tol)
        assert_close(lse, z["lse"], what="lse", **tol)
        for g, name in zip(grads, ("dq", "dk", "dv", "drpb"), strict=False):
            assert_close(g, z[name], what=name, **tol)

    @pytest.mark.parametrize("case", FEATURES, ids=[c["name"] for c in FEATURES])
    def test_golden_features(self, case):
        """NATTEN's extra-KV ops and NATTEN 0.21's stride/even/GQA masks: out, lse and every
        gradient (extra tokens' included), or a clean refusal where the backend has one."""
        z = np.load(FEATURE_DATA / case["file"])
        case = dict(case, spatial=tuple(case["spatial"]))
        x = {n: jnp.asarray(z[n]) for n in ("q", "k", "v", "rpb", "ak", "av", "d_out") if n in z}
        reason = feature_refusal(self.implementation, case, x)
        if reason is not None:
            with pytest.raises(ValueError, match=r"implementation=.* cannot run this call"):
                feature_call(self.implementation, case, x)
            return
        out, lse, grads = feature_call(self.implementation, case, x)
        # Float32 results against float64 NATTEN-defined results.
        tol = dict(rtol=1e-5, atol=4e-6)
        assert_close(out, z["out"], what="out", **tol)
        assert_close(lse, z["lse"], what="lse", **tol)
        assert set(grads) == {n for n in _FEATURE_GRADS if n in z}
        for name, g in grads.items():
            assert_close(g, z[name], what=name, **tol)

    def test_features_match_reference(self, feature_seed):
        """Random combinations of stride, even kernels, GQA, value_dim, extra tokens, dilation,
        causal axes and rpb against the dense reference (or a clean refusal)."""
        case = random_feature_case(feature_seed)
        x = make_feature_inputs(case)
        if feature_refusal(self.implementation, case, x) is not None:
            with pytest.raises(ValueError, match="cannot run this call"):
                feature_call(self.implementation, case, x)
            return
        got = feature_call(self.implementation, case, x)
        want = feature_call("reference", case, x)
        rtol, atol = TOLERANCES[jnp.float32]
        assert_close(got[0], want[0], rtol, atol, f"out {case}")
        assert_close(got[1], want[1], rtol, atol, f"lse {case}")
        assert set(got[2]) == set(want[2])
        for name, g in got[2].items():
            assert_close(g, want[2][name], rtol, atol, f"{name} {case}")

    # -- properties against the dense reference ---------------------------------------------

    def test_matches_reference(self, seed):  # `seed` from conftest: the class's property_seeds
        case = random_case(seed)
        inputs = make_inputs(case)
        got = loss_and_grads(self.implementation, case, *inputs)
        want = loss_and_grads("reference", case, *inputs)
        rtol, atol = TOLERANCES[jnp.float32]
        assert_close(got[0], want[0], rtol, atol, f"out {case}")
        assert_close(got[1], want[1], rtol, atol, f"lse {case}")
        for g, w, name in zip(got[2], want[2], ("dq", "dk", "dv", "drpb"), strict=False):
            assert_close(g, w, rtol, atol, f"{name} {case}")

    @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=str)
    def test_dtypes(self, dtype):
        rtol, atol = TOLERANCES[dtype]
        for seed in self.dtype_seeds:
            case = random_case(seed)
            inputs = make_inputs(case, dtype)
            out, lse, grads = loss_and_grads(self.implementation, case, *inputs)
            assert out.dtype == dtype and lse.dtype == jnp.float32
            assert all(g.dtype == dtype for g in grads)
            f32 = [None if x is None else x.astype(jnp.float32) for x in inputs]
            want = loss_and_grads("reference", case, *f32)
            assert_close(out, want[0], rtol, atol, f"out {dtype} {case}")
            assert_close(lse, want[1], rtol, atol, f"lse {dtype} {case}")
            for g, w, name in zip(grads, want[2], ("dq", "dk", "dv", "drpb"), strict=False):
                # Gradients are sums over many terms: scale the tolerance with their magnitude.
                scale = float(jnp.max(jnp.abs(w))) + 1.0
                assert_close(g, w, rtol, atol * scale, f"{name} {dtype} {case}")

    def test_check_grads_float64(self):
        if not self.supports_float64:
            pytest.skip("backend does not take float64")
        from jax.test_util import check_grads

        case = dict(spatial=(6, 5), kernel_size=(3, 3), dilation=(2, 1), is_causal=(False, True),
                    rpb=True, batch=1, heads=2, head_dim=3, seed=11)  # fmt: skip
        with jax.enable_x64(True):
            q, k, v, rpb, _ = make_inputs(case, jnp.float64)
            f = lambda q, k, v, rpb: natjax.na2d(
                q, k, v, (3, 3), dilation=(2, 1), is_causal=(False, True), rpb=rpb,
                implementation=self.implementation)  # fmt: skip
            check_grads(f, (q, k, v, rpb), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)

    def test_lse_cotangent(self):
        """Differentiating through the returned log-sum-exp matches the reference."""
        case = dict(spatial=(7, 6), kernel_size=(3, 5), dilation=(2, 1), is_causal=(True, False),
                    rpb=True, batch=2, heads=2, head_dim=8, seed=5)  # fmt: skip
        q, k, v, rpb, d_out = make_inputs(case)

        def grads(impl):
            def loss(q, k, v, rpb):
                out, lse = natjax.na2d(q, k, v, (3, 5), dilation=(2, 1), is_causal=(True, False),
                                       rpb=rpb, return_lse=True, implementation=impl)  # fmt: skip
                return jnp.sum(out * d_out) + jnp.sum(jnp.sin(lse))

            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, rpb)

        for g, w in zip(grads(self.implementation), grads("reference"), strict=True):
            assert_close(g, w, 2e-5, 2e-5, "lse cotangent")

    # -- transformations ---------------------------------------------------------------------

    def test_jit_vmap_checkpoint(self):
        case = dict(spatial=(6, 7), kernel_size=(3, 3), dilation=(1, 2), is_causal=(False, False),
                    rpb=True, batch=2, heads=2, head_dim=8, seed=2)  # fmt: skip
        q, k, v, rpb, _ = make_inputs(case)
        f = lambda q, k, v: natjax.na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb,
                                        implementation=self.implementation)  # fmt: skip
        want = natjax.na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb, implementation="reference")
        assert_close(jax.jit(f)(q, k, v), want, 2e-5, 2e-5, "jit")
        # vmap over a leading axis (an extra batch of the whole call).
        stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]
        got = jax.vmap(f)(*stacked)
        assert_close(got[0], want, 2e-5, 2e-5, "vmap[0]")
        assert_close(got[1], f(q[::-1], k[::-1], v[::-1]), 2e-5, 2e-5, "vmap[1]")
        # checkpoint (remat) gives the same gradient.
        loss = lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
        g1 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        g2 = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
        for a, b in zip(g1, g2, strict=True):
            assert_close(a, b, 1e-6, 1e-6, "checkpoint")

    def test_vmap_of_grad_matches_loop(self):
        case = dict(spatial=(9,), kernel_size=(5,), dilation=(1,), is_causal=(True,), rpb=True,
                    batch=1, heads=2, head_dim=4, seed=4)  # fmt: skip
        q, k, v, rpb, _ = make_inputs(case)
        loss = lambda q, rpb: jnp.sum(
            natjax.na1d(q, k, v, 5, is_causal=True, rpb=rpb, implementation=self.implementation)
            ** 2
        )
        qs = jnp.stack([q, 2 * q, -q])
        got = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(qs, rpb)
        for i in range(3):
            want = jax.grad(loss, argnums=(0, 1))(qs[i], rpb)
            assert_close(got[0][i], want[0], 1e-5, 1e-5, "vmap grad q")
            assert_close(got[1][i], want[1], 1e-5, 1e-5, "vmap grad rpb")

    # -- sharding ----------------------------------------------------------------------------

    # Further (script, marker) checks a backend runs in the same 8-device subprocess.
    extra_sharding_checks: tuple[tuple[str, str], ...] = ()

    def test_sharding_on_8_devices(self):
        """The backend's 8-device checks in one subprocess (one process start and jax import):
        batch x heads sharding, GQA/MQA with heads sharded, and the backend's own
        `extra_sharding_checks`."""
        if not self.test_sharding:
            pytest.skip("not a production backend")
        run_on_8_devices(
            (self._sharded_batch_and_heads_script(), "SHARDING_OK"),
            (self._gqa_sharded_heads_script(), "GQA_SHARDING_OK"),
            *self.extra_sharding_checks,
        )

    def _sharded_batch_and_heads_script(self) -> str:
        """On 8 simulated devices, batch x heads sharded inputs give identically sharded,
        equal outputs and gradients, with no all-gather in the compiled program."""
        return textwrap.dedent(
            f"""
            import jax, jax.numpy as jnp, numpy as np, natjax
            from jax.sharding import NamedSharding, PartitionSpec as P
            import contextlib
            from jax.sharding import AxisType
            rng = np.random.default_rng(0)
            shape = (8, 10, 9, 4, 8)
            q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
            rpb = jnp.asarray(rng.standard_normal((4, 5, 5)), jnp.float32)
            impl = {self.implementation!r}
            def f(q, k, v, rpb):
                return natjax.na2d(q, k, v, 3, dilation=(1, 2), is_causal=(True, False), rpb=rpb,
                                   implementation=impl)
            def loss(q, k, v, rpb):
                return jnp.sum(f(q, k, v, rpb) ** 2)
            want = f(q, k, v, rpb)
            g0 = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, rpb)
            # Both mesh kinds: explicit axes (jax.make_mesh's default) and auto (GSPMD).
            for kind in (AxisType.Explicit, AxisType.Auto):
                mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
                xs = NamedSharding(mesh, P("data", None, None, "model", None))
                rs = NamedSharding(mesh, P("model"))
                args = [jax.device_put(x, s) for x, s in zip((q, k, v, rpb), (xs, xs, xs, rs))]
                fwd = jax.jit(f, in_shardings=(xs, xs, xs, rs), out_shardings=xs)
                bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)),
                              in_shardings=(xs, xs, xs, rs), out_shardings=(xs, xs, xs, rs))
                for name, fn in (("fwd", fwd), ("bwd", bwd)):
                    hlo = fn.lower(*args).compile().as_text()
                    assert "all-gather" not in hlo, f"{{kind}} {{name}} has an all-gather"
                    assert "all-to-all" not in hlo, f"{{kind}} {{name}} has an all-to-all"
                # Explicit meshes are also used as the ambient mesh (jax.set_mesh).
                ctx = jax.set_mesh(mesh) if kind == AxisType.Explicit else contextlib.nullcontext()
                with ctx:
                    out = fwd(*args)
                    grads = bwd(*args)
                assert out.sharding.is_equivalent_to(xs, out.ndim), out.sharding
                np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
                for a, b in zip(grads, g0):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
            print("SHARDING_OK")
            """
        )

    def _gqa_sharded_heads_script(self) -> str:
        """GQA and MQA on 8 simulated devices with heads sharded, both mesh kinds: kv heads that
        divide the head shards stay sharded (no all-gather in the backward); MQA (one kv head
        over two head shards) runs with heads unsplit; values, gradients and the gradients'
        shardings (those of their primals) as unsharded."""
        return textwrap.dedent(
            f"""
            import contextlib
            import jax, jax.numpy as jnp, numpy as np, natjax
            from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
            rng = np.random.default_rng(0)
            impl = {self.implementation!r}
            for kv_heads in (2, 1):
                q = jnp.asarray(rng.standard_normal((4, 6, 7, 4, 8)), jnp.float32)
                k = jnp.asarray(rng.standard_normal((4, 6, 7, kv_heads, 8)), jnp.float32)
                v = jnp.asarray(rng.standard_normal((4, 6, 7, kv_heads, 12)), jnp.float32)
                rpb = jnp.asarray(rng.standard_normal((4, 5, 5)), jnp.float32)
                def f(q, k, v, rpb):
                    return natjax.na2d(q, k, v, 3, stride=(1, 2), rpb=rpb, implementation=impl)
                def loss(q, k, v, rpb):
                    return jnp.sum(f(q, k, v, rpb) ** 2)
                want = f(q, k, v, rpb)
                g0 = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, rpb)
                for kind in (AxisType.Explicit, AxisType.Auto):
                    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
                    xs = NamedSharding(mesh, P("data", None, None, "model", None))
                    ks = xs if kv_heads == 2 else NamedSharding(mesh, P("data"))
                    rs = NamedSharding(mesh, P("model"))
                    shard = (xs, ks, ks, rs)
                    args = [jax.device_put(x, s) for x, s in zip((q, k, v, rpb), shard)]
                    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), in_shardings=shard,
                                  out_shardings=shard)
                    if kv_heads == 2:
                        hlo = bwd.lower(*args).compile().as_text()
                        assert "all-gather" not in hlo, f"{{kind}} has an all-gather"
                    explicit = kind == AxisType.Explicit
                    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
                        out = jax.jit(f, in_shardings=shard)(*args)
                        grads = bwd(*args)
                    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5,
                                               atol=1e-5)
                    for a, b, s in zip(grads, g0, shard):
                        assert a.sharding.is_equivalent_to(s, a.ndim), (kv_heads, kind, a.sharding)
                        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                   atol=1e-4)
            print("GQA_SHARDING_OK")
            """
        )
