"""Cost of the NaN/inf confinement (`natjax/ops/na/nonfinite.py`) on finite inputs.

    python experiments/bench_nonfinite.py                          # xla, ffi; fwd and fwd+bwd
    python experiments/bench_nonfinite.py --impls xla,xla_tiled,reference --repeats 20

For each implementation, the public call (`na2d(..., implementation=impl)`: the backend on the
zero-substituted q, k, v, the finiteness check and the fix-up `lax.cond`) is compared with the
bare backend (`api._backend(impl)(q, k, v, rpb, params)`, no check, no cond), measured in the same
run: compile time, run time (median over `--repeats` after a warm-up, finite inputs, so the plain
branch runs) and XLA's memory analysis (temporary bytes) of the compiled program, for the forward
and for forward + backward (gradients of q, k, v and rpb). A third row times the public call on
inputs with one NaN value token (the fix-up branch). Ratios are public / bare.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import natjax
from natjax.ops.na import api
from natjax.ops.na.spec import make_params


def _compile(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _median_ms(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _temp_mib(compiled) -> float:
    stats = compiled.memory_analysis()
    return float("nan") if stats is None else stats.temp_size_in_bytes / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--impls", default="xla,ffi")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    spatial = (args.size, args.size)
    shape = (args.batch, *spatial, args.heads, args.head_dim)
    rng = np.random.default_rng(0)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    rpb = jnp.asarray(rng.standard_normal((args.heads, 2 * args.kernel - 1, 2 * args.kernel - 1)))
    rpb = rpb.astype(jnp.float32)
    v_nan = v.at[0, spatial[0] // 2, spatial[1] // 2, 0].set(jnp.nan)
    params = make_params(2, spatial, args.head_dim, args.kernel, 1, False, None)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; q/k/v {shape} float32, "
          f"kernel {args.kernel}, rpb; {args.repeats} repeats")  # fmt: skip
    print(f"{'impl':<10} {'program':<8} {'variant':<16} {'compile s':>9} {'run ms':>9} "
          f"{'temp MiB':>9} {'run ratio':>9} {'compile ratio':>13}")  # fmt: skip
    for impl in args.impls.split(","):
        bare_fn = api._backend(impl)

        def public(q, k, v, rpb, impl=impl):
            return natjax.na2d(q, k, v, args.kernel, rpb=rpb, implementation=impl)

        def bare(q, k, v, rpb, bare_fn=bare_fn):
            return bare_fn(q, k, v, rpb, params)[0]

        for program in ("fwd", "fwd+bwd"):
            if program == "fwd":
                fns = dict(bare=bare, public=public)
            else:
                fns = {
                    name: (lambda q, k, v, rpb, f=f: jax.vjp(f, q, k, v, rpb)[1](d_out))
                    for name, f in (("bare", bare), ("public", public))
                }
            base = None
            for variant, fn, vv in (
                ("bare", fns["bare"], v),
                ("public finite", fns["public"], v),
                ("public one NaN", fns["public"], v_nan),
            ):
                compiled, secs = _compile(fn, (q, k, vv, rpb))
                ms = _median_ms(compiled, (q, k, vv, rpb), args.repeats)
                if base is None:
                    base = (ms, secs)
                print(f"{impl:<10} {program:<8} {variant:<16} {secs:9.2f} {ms:9.2f} "
                      f"{_temp_mib(compiled):9.1f} {ms / base[0]:9.2f} {secs / base[1]:13.2f}",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
