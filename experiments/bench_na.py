"""Benchmark of neighborhood attention: every implementation against dense masked attention.

    python experiments/bench_na.py                        # NAT-Tiny stages + 1-D + 3-D, batch 8
    python experiments/bench_na.py --batch 128 --dtype bfloat16 --implementations pallas,xla,dense
    python experiments/bench_na.py --quick                # small shapes (what `natjax demo` runs)
    python experiments/bench_na.py --cases 3d-video-8x16x16-s244,2d-28x28-h8-gqa2 --batch 2

Times the forward and forward+backward (gradients of q, k, v and rpb) as medians over
`--repeats` runs after a warm-up (compilation excluded), for each implementation ("auto" is
`implementation=None`, the dispatcher's choice) and for
`jax.nn.dot_product_attention` with an explicit neighborhood mask and the same bias as a dense
`[heads, N, N]` array (the "dense" baseline; its rpb gradient is not computed, which flatters it).
Reports the compiled program's temporary + output memory (XLA's memory analysis, any platform) and,
on GPUs, the device's peak memory and the fraction of the memory roofline: the bytes a perfect
kernel must move (forward: read q, k, v, write out and lse; backward: read q, k, v, out, d_out,
lse, write dq, dk, dv) over the device-to-device copy bandwidth measured in the same run.
Prints a table, writes `results/bench_na.json` and `results/bench_na.png` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import natjax
from natjax.ops.na.reference import dense_mask_and_bias_index
from natjax.ops.na.spec import make_params

# (name, spatial, heads, head_dim, kernel[, extras]): NAT-Tiny's four stages at 224x224, 1-D,
# 3-D, a strided 3-D video-style case (Cosmos-like: even kernels, stride, 8 frames) and a GQA case
# (8 query heads over 2 key/value heads). `extras` holds `stride` and `kv_heads`.
CASES = [
    ("2d-56x56-h2", (56, 56), 2, 32, 7),
    ("2d-28x28-h4", (28, 28), 4, 32, 7),
    ("2d-14x14-h8", (14, 14), 8, 32, 7),
    ("2d-7x7-h16", (7, 7), 16, 32, 7),
    ("1d-2048-h4", (2048,), 4, 32, 7),
    ("3d-12x12x12-h2", (12, 12, 12), 2, 32, 5),
    ("3d-video-8x16x16-s244", (8, 16, 16), 2, 32, (4, 8, 8), dict(stride=(2, 4, 4))),
    ("2d-28x28-h8-gqa2", (28, 28), 8, 32, 7, dict(kv_heads=2)),
]
QUICK = [
    ("2d-28x28-h2", (28, 28), 2, 32, 7),
    ("1d-512-h2", (512,), 2, 32, 7),
    ("3d-8x8x8-h2", (8, 8, 8), 2, 16, 3),
]


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up: compile and run once
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _compiled_bytes(fn, args) -> int | None:
    try:
        m = fn.lower(*args).compile().memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements the analysis
        return None


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured now."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    ms = _median_ms(copy, (x,), 20)
    return 2 * nbytes / (ms * 1e-3)


def _functions(impl: str, spatial, kernel, stride, mask, bias_index):
    ndim = len(spatial)
    op = getattr(natjax, f"na{ndim}d")
    if impl == "dense":
        n = math.prod(spatial)

        def fwd(q, k, v, rpb):
            b, *_, h, d = q.shape
            bias = rpb.reshape(h, -1)[:, bias_index][None]
            # GQA: k and v have fewer heads than q (dot_product_attention takes that).
            flat = lambda x: x.reshape(b, n, x.shape[-2], d)  # noqa: E731
            out = jax.nn.dot_product_attention(
                flat(q), flat(k), flat(v),
                bias=jax.lax.stop_gradient(bias).astype(q.dtype), mask=mask[None, None],
            )  # fmt: skip
            return out.reshape(q.shape)
    else:

        def fwd(q, k, v, rpb):
            impl_ = None if impl == "auto" else impl
            return op(q, k, v, kernel, stride=stride, rpb=rpb, implementation=impl_)

    def loss(q, k, v, rpb):
        return jnp.sum(fwd(q, k, v, rpb).astype(jnp.float32))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def run(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    bandwidth = _copy_bandwidth() if on_gpu else None
    cases = QUICK if args.quick else CASES
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases.split(",")]
    rows = []
    rng = np.random.default_rng(0)
    for name, spatial, heads, head_dim, kernel, *extras in cases:
        extras = extras[0] if extras else {}
        stride, kv_heads = extras.get("stride", 1), extras.get("kv_heads", heads)
        shape = (args.batch, *spatial, heads, head_dim)
        kv_shape = (args.batch, *spatial, kv_heads, head_dim)
        q = jnp.asarray(rng.standard_normal(shape), dtype)
        k, v = (jnp.asarray(rng.standard_normal(kv_shape), dtype) for _ in range(2))
        params = make_params(len(spatial), spatial, head_dim, kernel, 1, False, None, stride)
        rpb = jnp.asarray(rng.standard_normal((heads, *params.rpb_shape_tail)), dtype)
        mask, bias_index = dense_mask_and_bias_index(spatial, params)
        item = q.dtype.itemsize
        numel = math.prod(shape)
        kv_numel = math.prod(kv_shape)
        lse_bytes = numel // head_dim * 4
        # Forward: read q, k, v, write out + lse. Backward: read q, k, v, out, d_out + lse,
        # write dq, dk, dv. (k, v and their gradients are kv-head sized.)
        ideal = {
            "fwd": (2 * numel + 2 * kv_numel) * item + lse_bytes,
            "fwd+bwd": (6 * numel + 6 * kv_numel) * item + 2 * lse_bytes,
        }
        for impl in args.implementations.split(","):
            row = dict(case=name, impl=impl, batch=args.batch, dtype=args.dtype)
            try:
                fwd, grad = _functions(impl, spatial, kernel, stride, jnp.asarray(mask), bias_index)
                for what, fn in (("fwd", fwd), ("fwd+bwd", grad)):
                    row[f"{what}_ms"] = _median_ms(fn, (q, k, v, rpb), args.repeats)
                    row[f"{what}_mem_mb"] = (_compiled_bytes(fn, (q, k, v, rpb)) or 0) / 2**20
                    if bandwidth:
                        # The backward alone is fwd+bwd minus fwd; report both against ideals.
                        ms = row[f"{what}_ms"]
                        row[f"{what}_roofline"] = ideal[what] / bandwidth / (ms * 1e-3)
                row["device_peak_mb"] = (_device_peak_bytes() or 0) / 2**20 or None
            except Exception as err:  # noqa: BLE001 - report and keep benchmarking the rest
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            rows.append(row)
            print(_format_row(row), flush=True)
    if bandwidth:
        print(f"measured device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    return rows


def _format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:>16} {r['impl']:>9}  error: {r['error']}"
    s = f"{r['case']:>16} {r['impl']:>9}  fwd {r['fwd_ms']:9.2f} ms"
    s += f"  fwd+bwd {r['fwd+bwd_ms']:9.2f} ms"
    s += f"  mem {r['fwd+bwd_mem_mb']:8.1f} MiB"
    if "fwd_roofline" in r:
        s += f"  roofline fwd {r['fwd_roofline']:.0%} fwd+bwd {r['fwd+bwd_roofline']:.0%}"
    return s


def summarize(rows: list[dict], baseline: str = "dense") -> None:
    """Prints speed-ups of every implementation over the baseline measured in the same run."""
    base = {r["case"]: r for r in rows if r["impl"] == baseline and "error" not in r}
    print(f"\nspeed-up over '{baseline}' (same run):")
    for r in rows:
        b = base.get(r["case"])
        if r["impl"] == baseline or b is None or "error" in r:
            continue
        print(
            f"{r['case']:>16} {r['impl']:>9}  fwd x{b['fwd_ms'] / r['fwd_ms']:.1f}"
            f"  fwd+bwd x{b['fwd+bwd_ms'] / r['fwd+bwd_ms']:.1f}"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(impls)
    for ax, what in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for i, impl in enumerate(impls):
            vals = [
                next((r.get(f"{what}_ms", np.nan) for r in rows
                      if r["case"] == c and r["impl"] == impl), np.nan)
                for c in cases
            ]  # fmt: skip
            ax.bar(np.arange(len(cases)) + i * width, vals, width, label=impl)
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, cases, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{what} ({jax.default_backend()}, batch {rows[0]['batch']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    default_impls = "pallas,xla,dense" if jax.default_backend() == "gpu" else "auto,xla,dense"
    p.add_argument("--implementations", default=default_impls)
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke runs")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    rows = run(args)
    summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_na.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "bench_na.png")
    print(f"wrote {args.out / 'bench_na.json'} and {args.out / 'bench_na.png'}")


if __name__ == "__main__":
    main()
