"""Cost of the NaN/inf confinement on the ffi backend: wrapper copy vs in-kernel substitution.

    python experiments/bench_ffi_nonfinite.py                 # NAT-Tiny stage 1, batch 8
    python experiments/bench_ffi_nonfinite.py --repeats 15 --case 2d-28x28-h4

One run times, interleaved (each round runs every variant once), on finite float32 inputs:
  * `kernel`: the bare kernels (`ffi.na_ffi`), no confinement at all: the floor;
  * `copy`: the confinement as it was before the kernels read NaN/inf as 0, the wrapper
    passing the backend a zero-substituted copy of q, k, v (`confine_nonfinite` with an
    unmarked backend);
  * `checked`: raw inputs to the kernels, which read non-finite entries as 0, and the
    wrapper's own finiteness pass over q, k, v as the fix-up's predicate (natjax-ffi 0.2);
  * `in-kernel`: `na2d(implementation="ffi")` as it is now: raw inputs, and the kernels also
    report whether they read a non-finite entry (natjax-ffi >= 0.3), so the wrapper makes no
    pass over q, k, v of its own; `out` and `lse` pass the fix-up's `lax.cond` untouched.
Forward and forward+backward (gradients of q, k, v and rpb). Prints medians, the ratios to
`kernel`, and the machine load (`uptime`) before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ffi import CASES, _interleaved_medians, _uptime  # noqa: E402

import natjax  # noqa: E402
from natjax.ops.na import ffi  # noqa: E402
from natjax.ops.na.nonfinite import confine_nonfinite, reads_nonfinite_as_zero  # noqa: E402
from natjax.ops.na.spec import make_params  # noqa: E402


def _variants(ndim: int, kernel: int, dilation: int, params) -> dict:
    op = getattr(natjax, f"na{ndim}d")

    def kernel_only(q, k, v, rpb):
        return ffi.na_ffi(q, k, v, rpb, params)[0]

    def copy(q, k, v, rpb):
        # An unmarked backend: the wrapper substitutes a copy of q, k, v (the old ffi path).
        return confine_nonfinite(lambda *a: ffi.na_ffi(*a), q, k, v, rpb, params)[0]

    def checked(q, k, v, rpb):
        # Marked as reading NaN/inf as 0 but not reporting it: the wrapper checks q, k, v.
        backend = reads_nonfinite_as_zero(lambda *a: ffi.na_ffi(*a))
        return confine_nonfinite(backend, q, k, v, rpb, params)[0]

    def in_kernel(q, k, v, rpb):
        return op(q, k, v, kernel, dilation=dilation, rpb=rpb, implementation="ffi")

    return {"kernel": kernel_only, "copy": copy, "checked": checked, "in-kernel": in_kernel}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="2d-56x56-h2", choices=[c[0] for c in CASES])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if not ffi.available():
        raise SystemExit(ffi.build_info())
    name, spatial, heads, dim, kernel, dilation = next(c for c in CASES if c[0] == args.case)
    print(f"before: {_uptime()}", flush=True)
    params = make_params(len(spatial), spatial, dim, kernel, dilation, False, None)
    rng = np.random.default_rng(0)
    shape = (args.batch, *spatial, heads, dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    rpb = jnp.asarray(rng.standard_normal((heads, *params.rpb_shape_tail)), jnp.float32)
    fns = _variants(len(spatial), kernel, dilation, params)
    fwd = {n: jax.jit(f) for n, f in fns.items()}
    grad = {
        n: jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a)), argnums=(0, 1, 2, 3)))
        for n, f in fns.items()
    }
    for what, group in (("fwd", fwd), ("fwd+bwd", grad)):
        med = _interleaved_medians(group, (q, k, v, rpb), args.repeats)
        base = med["kernel"]
        cells = [f"{n} {t * 1e3:8.2f} ms (x{t / base:.2f})" for n, t in med.items()]
        print(f"{name} batch {args.batch} {what:>7}: " + " | ".join(cells), flush=True)
    print(f"after: {_uptime()}", flush=True)


if __name__ == "__main__":
    main()
