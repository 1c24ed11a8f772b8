"""Benchmark of the native FFI kernels (natjax-ffi) against the xla and dense paths, on CPU.

    python experiments/bench_ffi.py                  # everything below, batch 8, float32
    python experiments/bench_ffi.py --repeats 5 --skip-model
    python experiments/bench_ffi.py --cases 2d-56x56-h2 --impls ffi,xla

One run measures, side by side:
  * the machine: its load (`uptime`) before and after, and its FMA rate, as the median GFLOP/s
    of a float32 matmul (`--matmul` square, XLA's multi-threaded Eigen kernel);
  * neighborhood attention, forward and forward+backward (gradients of q, k, v and rpb), for
    `ffi`, `xla` and `reference` (the dense masked path; only up to 1024 positions, where it
    is still within ~10x of xla), on NAT-Tiny's four stage shapes, a
    DiNAT-like dilated map, 1-D and 3-D cases and small maps (the dispatch question). Repeats are
    interleaved across implementations (each round times every implementation once), so a
    change of machine load hits them alike, and fast cases get more rounds (`--min-seconds`);
    `ffi` is also timed alone, back to back (its pool's threads then stay awake: on a VM whose
    idle cores take milliseconds to wake, ffi/bench/wake_latency.cc, a call after another
    implementation's can run mostly on its calling thread); medians are reported, with the ratios
    xla / ffi and best(xla, dense) / ffi, and ffi's achieved GFLOP/s: useful arithmetic over
    the neighborhoods (forward `2*(D + Dv)` flops per query-key pair, backward
    `6*D + 4*Dv`: recompute q.k, dO.v, and dq, dk, dv) against the matmul rate;
  * NAT-Mini inference end to end (batch 8, 224x224), `attention_implementation` "ffi", "xla"
    and None ("auto").
Writes `results/bench_ffi.json` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import natjax
from natjax.ops.na import ffi
from natjax.ops.na.spec import make_params

# (name, spatial, heads, head_dim, kernel, dilation)
CASES = [
    ("2d-56x56-h2", (56, 56), 2, 32, 7, 1),  # NAT-Tiny stage 1
    ("2d-28x28-h4", (28, 28), 4, 32, 7, 1),  # stage 2
    ("2d-14x14-h8", (14, 14), 8, 32, 7, 1),  # stage 3
    ("2d-7x7-h16", (7, 7), 16, 32, 7, 1),  # stage 4
    ("2d-56x56-h2-d8", (56, 56), 2, 32, 7, 8),  # DiNAT-like dilation
    ("1d-2048-h4", (2048,), 4, 32, 7, 1),
    ("3d-12x12x12-h2", (12, 12, 12), 2, 32, 5, 1),
    ("2d-8x8-h4", (8, 8), 4, 32, 7, 1),  # small maps: where dense is chosen today
    ("2d-16x16-h4", (16, 16), 4, 32, 7, 1),
    ("1d-64-h4", (64,), 4, 32, 7, 1),
    ("3d-6x6x6-h2", (6, 6, 6), 2, 32, 3, 1),
]
IMPLS = ("ffi", "xla", "reference")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def _time_once(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _interleaved_medians(
    fns: dict, args, repeats: int, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median seconds per function; each round runs every function once (after a warm-up), in
    an order rotated by one per round: a function that runs right after another's allocations
    (fresh pages) or after an idle gap (cold caches) is not always the same one. At least
    `repeats` rounds, more (up to 1000) until the rounds take `min_seconds`: sub-millisecond
    calls on 2 threads have a bimodal spread (thread wake-ups), which a few rounds do not
    sample."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    names = list(fns)
    per_round = max(sum(_time_once(fn, args) for fn in fns.values()), 1e-6)
    rounds = max(repeats, min(1000, math.ceil(min_seconds / per_round)))
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_time_once(fns[name], args))
    return {name: float(np.median(t)) for name, t in times.items()}


def matmul_gflops(n: int, repeats: int) -> float:
    """The machine's float32 FMA rate as XLA's matmul achieves it (GFLOP/s, median)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    seconds = _interleaved_medians({"mm": jax.jit(jnp.dot)}, (a, b), repeats)["mm"]
    return 2 * n**3 / seconds / 1e9


def _pairs(spatial, kernel, dilation) -> int:
    """Query-key pairs per (batch, head): the sum of every query's neighborhood size."""
    total = 1
    for n in spatial:
        total *= int(ffi._axis(n, kernel, dilation, False).win_count.sum())
    return total


def _functions(impl: str, ndim: int, kernel: int, dilation: int):
    op = getattr(natjax, f"na{ndim}d")

    def fwd(q, k, v, rpb):
        return op(q, k, v, kernel, dilation=dilation, rpb=rpb, implementation=impl)

    def loss(q, k, v, rpb):
        return jnp.sum(fwd(q, k, v, rpb))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def bench_na(args, peak: float) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    cases = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    for name, spatial, heads, dim, kernel, dilation in cases:
        shape = (args.batch, *spatial, heads, dim)
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
        rpb_shape = (heads, *[2 * kernel - 1] * len(spatial))
        rpb = jnp.asarray(rng.standard_normal(rpb_shape), jnp.float32)
        make_params(len(spatial), spatial, dim, kernel, dilation, False, None)  # validates
        impls = [i for i in args.impls.split(",") if i != "reference" or math.prod(spatial) <= 1024]
        fns = {i: _functions(i, len(spatial), kernel, dilation) for i in impls}
        row = dict(case=name, batch=args.batch)
        for what, idx in (("fwd", 0), ("fwd+bwd", 1)):
            med = _interleaved_medians({i: f[idx] for i, f in fns.items()}, (q, k, v, rpb),
                                       args.repeats, args.min_seconds)  # fmt: skip
            for impl, sec in med.items():
                row[f"{impl}_{what}_ms"] = sec * 1e3
            if "ffi" in fns:  # back to back: the pool's threads stay awake between calls
                alone = _interleaved_medians({"ffi": fns["ffi"][idx]}, (q, k, v, rpb),
                                             args.repeats, args.min_seconds)  # fmt: skip
                row[f"ffi_{what}_alone_ms"] = alone["ffi"] * 1e3
        pairs = args.batch * heads * _pairs(spatial, kernel, dilation)
        flops = {"fwd": pairs * 4 * dim, "fwd+bwd": pairs * 14 * dim}
        for what in ("fwd", "fwd+bwd"):
            if f"ffi_{what}_ms" in row:
                row[f"ffi_{what}_gflops"] = flops[what] / (row[f"ffi_{what}_ms"] * 1e-3) / 1e9
                row[f"ffi_{what}_peak_frac"] = row[f"ffi_{what}_gflops"] / peak
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _format(r: dict) -> str:
    out = [f"{r['case']:>16}"]
    for what in ("fwd", "fwd+bwd"):
        times = {i: r[f"{i}_{what}_ms"] for i in IMPLS if f"{i}_{what}_ms" in r}
        out.append(f"{what}: " + " ".join(f"{i} {t:8.2f}" for i, t in times.items()) + " ms")
        if f"ffi_{what}_alone_ms" in r:
            out[-1] += f" (ffi alone {r[f'ffi_{what}_alone_ms']:.2f})"
        if "ffi" in times:
            others = [t for i, t in times.items() if i != "ffi"]
            if "xla" in times:
                out.append(f"xla/ffi x{times['xla'] / times['ffi']:.1f}")
            if others:
                out.append(f"best/ffi x{min(others) / times['ffi']:.2f}")
            out.append(
                f"{r[f'ffi_{what}_gflops']:.1f} GFLOP/s ({r[f'ffi_{what}_peak_frac']:.0%} of mm)"
            )
    return " | ".join(out)


def bench_model(args) -> dict:
    """NAT-Mini inference end to end with every attention call on `ffi`, on `xla`, and on
    None ("auto": what `implementation=None` picks per call, `platform.cpu_choice`)."""
    from flax import nnx

    config = natjax.get_config("nat_mini")
    images = jax.random.normal(jax.random.key(1), (args.batch, 224, 224, 3), jnp.float32)
    fns = {}
    for name, impl in (("ffi", "ffi"), ("xla", "xla"), ("auto", None)):
        model = natjax.NatForImageClassification(
            config, rngs=nnx.Rngs(0), attention_implementation=impl
        )

        @nnx.jit
        def infer(model, images):
            return model(images).logits

        fns[name] = (infer, model)
    outs = {i: f(m, images) for i, (f, m) in fns.items()}
    diff = float(jnp.max(jnp.abs(outs["ffi"] - outs["xla"])))
    times = {i: [] for i in fns}
    for _ in range(args.model_repeats):
        for i, (f, m) in fns.items():
            times[i].append(_time_once(f, (m, images)))
    med = {i: float(np.median(t)) * 1e3 for i, t in times.items()}
    row = dict(model="nat_mini", batch=args.batch, ffi_ms=med["ffi"], xla_ms=med["xla"],
               auto_ms=med["auto"], speedup=med["xla"] / med["ffi"],
               auto_speedup=med["xla"] / med["auto"], max_logit_diff=diff)  # fmt: skip
    print(
        f"NAT-Mini inference batch {args.batch} 224x224: ffi {med['ffi']:.0f} ms, "
        f"xla {med['xla']:.0f} ms, auto {med['auto']:.0f} ms; xla/ffi x{row['speedup']:.2f}, "
        f"xla/auto x{row['auto_speedup']:.2f} (max |logit diff| ffi vs xla {diff:.1e})",
        flush=True,
    )
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="more rounds (up to 1000) for cases whose rounds take less than this in total",
    )
    parser.add_argument("--model-repeats", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=1024)
    parser.add_argument("--cases", default="", help="comma-separated case names (default all)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("experiments"))
    args = parser.parse_args(argv)
    if not ffi.available():
        raise SystemExit(ffi.build_info())
    info = dict(
        command=" ".join(["python experiments/bench_ffi.py", *(argv or sys.argv[1:])]),
        jax=jax.__version__,
        cpus=os.cpu_count(),
        build=ffi.build_info(),
        uptime_before=_uptime(),
    )
    print(json.dumps(info, indent=1), flush=True)
    peak = matmul_gflops(args.matmul, args.repeats)
    print(f"matmul {args.matmul}^3 float32: {peak:.1f} GFLOP/s (median)", flush=True)
    rows = bench_na(args, peak)
    model = None if args.skip_model else bench_model(args)
    info["uptime_after"] = _uptime()
    print(info["uptime_after"])
    out = args.out / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ffi.json").write_text(
        json.dumps(dict(info, matmul_gflops=peak, na=rows, model=model), indent=1)
    )


if __name__ == "__main__":
    main()
