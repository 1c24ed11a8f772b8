#!/usr/bin/env python3
"""Compile gate: the Pallas kernels must compile clean for an H100, checked without a GPU.

For every case of `gate_cases.CASES` the gate asks the project's dispatch whether
`implementation="pallas"` accepts the call, then builds `jax.grad` of a loss over the public
`natjax.na*d(..., implementation="pallas", return_lse=True)` (forward, dq and dk/dv kernels) and
compiles it with XLA for an H100 target without a device:

1. `JAX_PLATFORMS=cpu` keeps the CUDA PJRT plugin (`jax-cuda13-plugin`, same version as jax)
   unstarted; `jax.experimental.topologies` makes a compile-only CUDA topology from
   `gate_ptx.TARGET_PROTO`. Inputs carry a sharding on that topology, so the program lowers for
   `cuda`: the kernels' `lax.platform_dependent` picks the compiled Triton kernels, not interpret
   mode. `lower().compile()` is XLA's ahead-of-time compilation (Triton -> LLVM -> PTX -> ptxas
   `-arch=sm_90a`, run by XLA itself).
2. XLA dumps the PTX and the launches (`xla_dump_to`); the gate runs `ptxas -v` on each kernel.
3. It fails the case on a compile error, a spill, dynamic shared memory above a block's 227 KiB,
   fewer than two resident blocks per SM (`MIN_BLOCKS_PER_SM`), or a missing kernel. It also
   reports each inner loop's non-matmul ops per score from the Triton IR after the
   canonicalize/CSE/LICM passes Triton starts with (`gate_ptx.loop_ops_per_score`).

Cases the dispatch refuses are listed and skipped: `unsupported_reason` must refuse exactly the
cases marked `accepted=False` in the table (a CPU test checks that), and
`--ignore-refusals` compiles them anyway (calling the backend directly) to re-derive the limits.

Usage (a venv with jax, jaxlib, jax-cuda13-plugin/-pjrt of the same version, nvidia-cuda-nvcc,
nvidia-nvvm; `make compile-gate` builds one as `.venv-gate`):

    python experiments/compile_gate.py            # every case (about 8 min on 2 cores)
    python experiments/compile_gate.py --quick    # the `quick` cases (about 2 min)
    python experiments/compile_gate.py --cases nat_s1,hdit --keep /tmp/gate --json out.json

Exit status: 0 clean; 1 a failing case; 2 a setup problem (packages, ptxas, topology).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

os.environ["JAX_PLATFORMS"] = "cpu"  # the CUDA plugin compiles; it is never started
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gate_cases  # noqa: E402
import gate_loads  # noqa: E402
import gate_ptx  # noqa: E402

KERNELS = ("na_pallas_fwd", "na_pallas_dq", "na_pallas_dkv")
# Issue 9: every kernel keeps at least two blocks resident per SM (one block's loads overlap the
# other's math; with one, the SM idles at every barrier and memory wait).
MIN_BLOCKS_PER_SM = 2


def _setup():
    """(sharding on a compile-only H100 topology, ptxas path, ptxas version) or exits 2."""
    try:
        import jax
        from jax.experimental import topologies
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P
    except ImportError as e:
        sys.exit(f"compile_gate: jax is not installed: {e}")
    try:
        import jax_plugins.xla_cuda13  # noqa: F401
    except ImportError:
        print(
            "compile_gate: no jax-cuda13-plugin (pip install jax-cuda13-plugin==<jax version> "
            "jax-cuda13-pjrt==<jax version>, without [with-cuda]; or `make compile-gate`)",
            file=sys.stderr,
        )
        sys.exit(2)
    ptxas = gate_ptx.find_ptxas()
    if not ptxas:
        print("compile_gate: no ptxas (pip install nvidia-cuda-nvcc)", file=sys.stderr)
        sys.exit(2)
    jax.devices()  # registers the CUDA plugin (not started: JAX_PLATFORMS=cpu)
    try:
        topo = topologies.get_topology_desc(
            "", "cuda", target_config=gate_ptx.TARGET_PROTO, topology="1x1x1"
        )
    except Exception as e:
        print(f"compile_gate: no compile-only CUDA topology: {e}", file=sys.stderr)
        sys.exit(2)
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    import subprocess

    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    return NamedSharding(mesh, P()), ptxas, version.strip().splitlines()[-1]


def lower_case(case: gate_cases.GateCase, sharding, ignore_refusals: bool):
    """Lowers `jax.grad` of the case's loss for the CUDA topology."""
    import jax
    import jax.numpy as jnp

    api = gate_cases.import_ops()
    dtype = jnp.dtype(case.dtype)
    x = jax.ShapeDtypeStruct(case.shape, dtype, sharding=sharding)
    kx, vx = (jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in case.kv_shapes)
    params = case.params(api)
    rpb = None
    if case.rpb:
        rpb = jax.ShapeDtypeStruct((case.heads, *params.rpb_shape_tail), dtype, sharding=sharding)
    fn = {1: api.na1d, 2: api.na2d, 3: api.na3d}[case.ndim]

    def attention(q, k, v, rpb):
        if ignore_refusals:  # the backend itself, past its unsupported_reason
            from natjax.ops.na import pallas_triton

            return pallas_triton.na_pallas(q, k, v, rpb, params, check=False)
        return fn(q, k, v, case.kernel, stride=case.stride, dilation=case.dilation,
                  is_causal=case.causal, rpb=rpb, return_lse=True,
                  implementation="pallas")  # fmt: skip

    def loss(q, k, v, rpb):
        out, lse = attention(q, k, v, rpb)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    argnums = (0, 1, 2, 3) if case.rpb else (0, 1, 2)
    return jax.jit(jax.grad(loss, argnums=argnums)).trace(x, kx, vx, rpb).lower()


def _kernels_in_dump(dump: str, ptxas: str) -> dict[str, dict]:
    found = {}
    for name in sorted(os.listdir(dump)):
        if not name.endswith(".ptx"):
            continue
        path = os.path.join(dump, name)
        with open(path) as f:
            ptx = f.read()
        entries = set(re.findall(r"\.entry\s+(na_pallas_\w+)\(", ptx))
        if entries:
            loads = gate_loads.loop_loads(ptx)
            for fn, st in gate_ptx.ptxas_report(ptxas, path).items():
                if fn in entries:
                    found[fn] = {**st, "loop_loads": loads.get(fn)}
    for fn, la in gate_ptx.launches(dump).items():
        if fn in found:
            found[fn].update(la)
    for st in found.values():
        st["blocks_per_sm"] = gate_ptx.blocks_per_sm(
            st.get("regs"), st.get("threads"), st.get("smem")
        )
    return found


def problems_of(kernels: dict[str, dict]) -> list[str]:
    """The gate's failure conditions for one case's kernels."""
    bad = []
    for fn in KERNELS:
        if fn not in kernels:
            bad.append(f"{fn} missing from the compiled program")
    for fn, st in kernels.items():
        short = fn.replace("na_pallas_", "")
        if st["spill_stores"] or st["spill_loads"]:
            bad.append(f"{short} spills {st['spill_stores']}/{st['spill_loads']} B")
        if (st.get("smem") or 0) > gate_ptx.BLOCK_SMEM:
            bad.append(f"{short} needs {st['smem']} B shared memory > {gate_ptx.BLOCK_SMEM}")
        loads = st.get("loop_loads")
        if loads is not None and (problem := gate_loads.check_async(fn, loads)):
            bad.append(problem)
        blocks = st.get("blocks_per_sm")
        if blocks is None:
            bad.append(f"{short}: no register/launch record to count resident blocks")
        elif blocks < MIN_BLOCKS_PER_SM:
            bad.append(
                f"{short} fits {blocks} resident block(s) per SM < {MIN_BLOCKS_PER_SM} "
                f"({st.get('regs')} registers x {st.get('threads')} threads, "
                f"{st.get('smem')} B shared memory)"
            )
    return bad


def run_case(case, sharding, ptxas, keep: str, ignore_refusals: bool) -> dict:
    """Lowers, compiles and checks one case; returns its record."""
    rec = dict(case=case.name, refused=None, problems=[], kernels={}, loops={})
    t0 = time.time()
    reason = gate_cases.refusal(case)
    if reason is not None and not ignore_refusals:
        rec["refused"] = reason
        return rec
    try:
        lowered = lower_case(case, sharding, ignore_refusals)
    except Exception as e:
        rec["problems"].append(f"lowering failed: {type(e).__name__}: {str(e)[:2000]}")
        return rec
    calls = gate_ptx.triton_calls(lowered)
    for c in calls:
        try:
            text = gate_ptx.ttir_text(c["ir"])
        except Exception as e:  # statistics only
            rec["loops"][c["name"]] = f"TTIR not printable: {e}"
            continue
        rec["loops"][c["name"]] = gate_ptx.loop_ops_per_score(text)
        rec.setdefault("launch", {})[c["name"]] = dict(
            num_warps=c["num_warps"], num_stages=c["num_stages"]
        )
        if keep:
            os.makedirs(os.path.join(keep, case.name), exist_ok=True)
            with open(os.path.join(keep, case.name, c["name"] + ".ttir"), "w") as f:
                f.write(text)
    if not calls:
        rec["problems"].append(
            "no Triton kernel in the lowered program (interpret mode, or a jax that compiles "
            "Pallas at lowering time: this gate reads XLA's `__gpu$xla.gpu.triton` calls)"
        )
        return rec
    dump = os.path.join(keep, case.name) if keep else tempfile.mkdtemp(prefix="gate_")
    os.makedirs(dump, exist_ok=True)
    try:
        lowered.compile(compiler_options={"xla_dump_to": dump})
        rec["kernels"] = _kernels_in_dump(dump, ptxas)
        rec["problems"] += problems_of(rec["kernels"])
    except Exception as e:
        rec["problems"].append(f"compile failed: {type(e).__name__}: {str(e)[:2000]}")
    finally:
        if not keep:
            shutil.rmtree(dump, ignore_errors=True)
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


def _row(case: str, fn: str, st: dict, rec: dict) -> str:
    launch = rec.get("launch", {}).get(fn, {})
    loops = rec["loops"].get(fn) or [{}]
    loop = loops[0] if isinstance(loops, list) else {}
    ops = f"{loop.get('score_ops', '?')}/{loop.get('ops_per_score', '?')}"
    ld = st.get("loop_loads") or {}
    loads = f"{ld.get('async_bytes', '?')}/{ld.get('sync_bytes', '?')}"
    return (
        f"{case:<22} {fn.replace('na_pallas_', ''):<4} {launch.get('num_warps', '?'):>2} "
        f"{st.get('regs', '?'):>4} {st['spill_stores']:>5}/{st['spill_loads']:<5} "
        f"{st.get('smem', '?'):>7} {st.get('blocks_per_sm', '?'):>4} {ops:>12} {loads:>9}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(gate_cases.QUICK)}")
    ap.add_argument("--cases", default="", help="comma-separated case names")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", default="", help="keep XLA dumps, PTX and TTIR under this folder")
    ap.add_argument("--json", default="", help="write the records as JSON")
    ap.add_argument(
        "--ignore-refusals",
        action="store_true",
        help="compile cases the dispatch refuses too (to re-derive the limits; not a gate)",
    )
    args = ap.parse_args(argv)
    cases = gate_cases.CASES
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.cases:
        want = [w.strip() for w in args.cases.split(",") if w.strip()]
        unknown = [w for w in want if w not in gate_cases.BY_NAME]
        if unknown:
            print(f"compile_gate: unknown cases {unknown} (see --list)", file=sys.stderr)
            return 2
        cases = [gate_cases.BY_NAME[w] for w in want]
    if args.list:
        for c in cases:
            print(f"{c.name:<22} {c.shape} K={c.kernel} d={c.dilation} causal={c.causal} "
                  f"{c.dtype} rpb={c.rpb} accepted={c.accepted} {c.note}")  # fmt: skip
        return 0
    sharding, ptxas, version = _setup()
    import jax

    print(f"jax {jax.__version__}; target H100 (sm_90a, deviceless); {version}")
    print(f"{len(cases)} cases, forward + backward each\n")
    head = f"{'case':<22} kern nw regs spill st/ld    smem b/SM  ops/score* async/ld**"
    print(head + "\n" + "-" * len(head))
    records, failed, t0 = [], 0, time.time()
    for case in cases:
        rec = run_case(case, sharding, ptxas, args.keep, args.ignore_refusals)
        records.append(rec)
        if rec["refused"]:
            print(f"{case.name:<22} refused by the dispatch: {rec['refused']}")
            continue
        for fn in KERNELS:
            if fn in rec["kernels"]:
                print(_row(case.name, fn, rec["kernels"][fn], rec))
        if rec["problems"]:
            failed += 1
            for p in rec["problems"]:
                print(f"{'':<4}FAIL {case.name}: {p.splitlines()[0][:300]}")
        sys.stdout.flush()
    print(
        "* inner-loop non-matmul ops per score, Triton IR after canonicalize/CSE/LICM: on the "
        "score block / all but the tile loads (gate_ptx.loop_ops_per_score)\n"
        "** bytes one thread loads per loop iteration by cp.async / by synchronous ld.global, "
        f"from the PTX (gate_loads.loop_loads; fwd and dq must be >= "
        f"{gate_loads.MIN_ASYNC_FRACTION:.0%} async)"
    )
    refused = sum(1 for r in records if r["refused"])
    print(
        f"\n{len(cases)} cases: {len(cases) - refused - failed} clean, {failed} failing, "
        f"{refused} refused by the dispatch; {time.time() - t0:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
