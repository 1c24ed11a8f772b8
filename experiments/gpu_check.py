#!/usr/bin/env python3
"""Prepared GPU check of the Pallas backend: tests, op benchmark, training step; one JSON.

Made to run in under 8 minutes on one H100/H200 (written without a GPU: the first GPU session
runs it and puts the numbers in docs/pallas.md):

1. `tests`: `pytest tests/test_na_pallas.py` on the GPU: the shared backend base (every NATTEN
   golden case, property tests, dtypes, transformations) with compiled Triton kernels against
   `reference`, plus the GPU-only tests; pass/fail counts and failing test ids.
2. `ops`: forward and forward+backward time (median of `--reps` after warm-up) of `pallas`,
   `xla`, `jax.nn.dot_product_attention` with the dense neighborhood mask, and the same without
   a mask (the dense speed of light), at NAT-Tiny stages 1-4 (batch 128, bf16, bias on), the
   HDiT shape (batch 16, 64x64, 4 heads, head_dim 64, kernel 7) and the 3-D video shape (batch 2,
   16x32x32, 8 heads, head_dim 128, kernel (3, 7, 7)). Per row: time, the HBM floor (forward:
   q, k, v read and out written once; forward+backward: 11 such tensors, see `floor_bytes`) over
   the time (`roofline_fraction`), and the time over the unmasked dense time (`vs_dense`).
3. `train`: a NAT-Tiny bf16 batch-128 training step at 224x224 (step only, one device batch
   reused) in images/s.

`--dry-run` runs the same code on tiny shapes on any backend (CPU: Pallas in interpret mode)
and only collects the tests, so the script can be tried without a GPU; its op benchmark runs on
CPU in `tests/test_na_pallas.py::test_gpu_check_runs_on_tiny_shapes`.

    python experiments/gpu_check.py --out experiments/results/gpu_check.json
    python experiments/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import natjax  # noqa: E402
from natjax.ops.na.reference import dense_mask_and_bias_index  # noqa: E402
from natjax.ops.na.spec import make_params  # noqa: E402

# Peak HBM bandwidth (bytes/s) by device kind (vendor data sheets).
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}

# name: (batch, spatial, heads, head_dim, kernel, dilation, rpb)
OP_CASES = {
    "nat_tiny_s1": (128, (56, 56), 2, 32, 7, 1, True),
    "nat_tiny_s2": (128, (28, 28), 4, 32, 7, 1, True),
    "nat_tiny_s3": (128, (14, 14), 8, 32, 7, 1, True),
    "nat_tiny_s4": (128, (7, 7), 16, 32, 7, 1, True),
    "hdit": (16, (64, 64), 4, 64, 7, 1, False),
    "video3d": (2, (16, 32, 32), 8, 128, (3, 7, 7), 1, False),
}
DRY_OP_CASES = {
    "nat_s1_tiny": (2, (10, 12), 2, 16, 5, 1, True),
    "video3d_tiny": (1, (4, 6, 6), 2, 16, 3, 1, False),
}
IMPLS = ("pallas", "xla", "dense_masked", "dense")


def bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in BANDWIDTH.items() if name in kind), None)


def floor_bytes(shape, itemsize: int, backward: bool) -> int:
    """HBM bytes every implementation must move: forward reads q, k, v and writes out (4
    tensors); the backward reads q, k, v, dout and writes dq, dk, dv (7 more); the lse and
    delta rows (1/head_dim of a tensor) are left out."""
    return (11 if backward else 4) * math.prod(shape) * itemsize


def _median_time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _attention(impl, case):
    batch, spatial, heads, head_dim, kernel, dilation, _ = case
    ndim = len(spatial)
    na = {1: natjax.na1d, 2: natjax.na2d, 3: natjax.na3d}[ndim]
    n = math.prod(spatial)
    if impl in ("pallas", "xla"):
        return lambda q, k, v, rpb: na(
            q, k, v, kernel, dilation=dilation, rpb=rpb, implementation=impl
        )
    mask = None
    if impl == "dense_masked":  # the spec's own [N, N] neighborhood mask
        params = make_params(ndim, spatial, head_dim, kernel, dilation, False, None)
        mask = jnp.asarray(dense_mask_and_bias_index(spatial, params)[0])[None, None]

    def dense(q, k, v, rpb):
        del rpb  # the dense baselines run without the bias (its [h, N, N] table is not NA's)
        flat = lambda x: x.reshape(batch, n, heads, x.shape[-1])
        out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask)
        return out.reshape(q.shape)

    return dense


def bench_ops(cases: dict, reps: int) -> list[dict]:
    rows, bw = [], bandwidth()
    rng = np.random.default_rng(0)
    for name, case in cases.items():
        batch, spatial, heads, head_dim, kernel, dilation, has_rpb = case
        shape = (batch, *spatial, heads, head_dim)
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
        rpb = None
        if has_rpb:
            params = make_params(len(spatial), spatial, head_dim, kernel, dilation, False, None)
            tail = params.rpb_shape_tail
            rpb = jnp.asarray(rng.standard_normal((heads, *tail)), jnp.bfloat16)
        times = {}
        for impl in IMPLS:
            attn = _attention(impl, case)
            fwd = jax.jit(attn)
            grad = jax.jit(
                jax.grad(
                    lambda q, k, v, rpb, attn=attn: jnp.sum(attn(q, k, v, rpb).astype(jnp.float32)),
                    argnums=(0, 1, 2),
                )
            )
            for mode, fn in (("fwd", fwd), ("fwd_bwd", grad)):
                try:
                    t = _median_time(fn, (q, k, v, rpb), reps)
                except Exception as e:  # e.g. out of memory for dense at the 3-D shape
                    rows.append(dict(case=name, impl=impl, mode=mode, error=str(e)[:500]))
                    continue
                times[impl, mode] = t
                floor = floor_bytes(shape, 2, mode == "fwd_bwd")
                rows.append(
                    dict(
                        case=name, impl=impl, mode=mode, time_us=round(t * 1e6, 1),
                        floor_us=round(floor / bw * 1e6, 1) if bw else None,
                        roofline_fraction=round(floor / bw / t, 4) if bw else None,
                    )
                )  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        for row in rows:
            dense = times.get(("dense", row.get("mode")))
            if row["case"] == name and "time_us" in row and dense:
                row["vs_dense"] = round(row["time_us"] / (dense * 1e6), 3)
    return rows


def run_tests(dry_run: bool, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/test_na_pallas.py", f"--junitxml={xml}"]  # fmt: skip
        if dry_run:
            cmd.append("--collect-only")
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {timeout} s")
        out = dict(returncode=res.returncode, seconds=round(time.perf_counter() - t0, 1))
        if os.path.exists(xml):
            root = ET.parse(xml).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            for key in ("tests", "failures", "errors", "skipped"):
                out[key] = int(suite.get(key, 0))
            out["failed"] = [
                f"{tc.get('classname')}::{tc.get('name')}"
                for tc in suite.iter("testcase")
                if tc.find("failure") is not None or tc.find("error") is not None
            ]
        if dry_run:  # collection only: no junit test cases, count the collected ids
            out["tests"] = sum(1 for ln in res.stdout.splitlines() if "::" in ln)
        out["tail"] = res.stdout[-1500:]
        return out


def bench_train(dry_run: bool, steps: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import SyntheticSource

    from natjax.train import config as C
    from natjax.train import data as data_lib
    from natjax.train import mesh as mesh_lib
    from natjax.train.state import Trainer

    preset, size, batch = ("nat_tiny", 224, 128) if not dry_run else ("nat_mini", 64, 2)
    overrides = (("drop_path_rate", 0.2),)
    if dry_run:
        overrides += (("depths", (1, 1, 1, 1)), ("embed_dim", 32))
    cfg = C.TrainConfig(
        model=C.ModelConfig(preset=preset, overrides=overrides, dtype="bfloat16"),
        data=C.DataConfig(dataset="synthetic", image_size=size, batch_size=batch, num_workers=0),
    )
    mesh = mesh_lib.make_mesh(cfg.mesh)
    src = SyntheticSource(batch * 2, size=(size, size))
    loader = data_lib.BatchLoader(src, cfg.data, cfg.augment, seed=0)
    trainer = Trainer(cfg, mesh, src.num_classes, loader.steps_per_epoch)
    b0 = loader.batch(0)
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.step(b0, 0))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        m = trainer.step(b0, s)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    return dict(preset=preset, image_size=size, batch=batch, dtype="bfloat16", steps=steps,
                compile_s=round(compile_s, 1), images_per_s=round(steps * batch / dt, 1),
                loss=float(m["loss"]))  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "experiments/results/gpu_check.json"))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: tests,ops,train")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    dev = jax.devices()[0]
    if dev.platform != "gpu" and not args.dry_run:
        print(f"gpu_check: no GPU ({dev.platform}); use --dry-run", file=sys.stderr)
        return 2
    result = dict(
        device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
        dry_run=args.dry_run, bandwidth_bytes_per_s=bandwidth(),
    )  # fmt: skip
    t0 = time.perf_counter()
    if "tests" not in skip:
        result["tests"] = run_tests(args.dry_run, timeout=240)
        print("tests:", {k: v for k, v in result["tests"].items() if k != "tail"}, flush=True)
    if "ops" not in skip:
        result["ops"] = bench_ops(DRY_OP_CASES if args.dry_run else OP_CASES, args.reps)
    if "train" not in skip:
        result["train"] = bench_train(args.dry_run, 1 if args.dry_run else args.train_steps)
        print("train:", result["train"], flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['seconds']} s)")
    failed = result.get("tests", {}).get("returncode", 0) not in (0, None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
