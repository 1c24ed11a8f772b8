"""HBM traffic of neighborhood attention compiled ahead of time for an H100 or a TPU v5e.

    make compile-gate GATE_ARGS=--quick    # once: builds .venv-gate (jax + the CUDA plugin)
    .venv-gate/bin/python experiments/hbm_aot.py                 # every case, fwd and fwd+bwd
    .venv-gate/bin/python experiments/hbm_aot.py --cases nat1,hdit --impls xla,dense
    python -m venv .venv-tpu && .venv-tpu/bin/pip install "jax[tpu]==<the installed jax>"
    .venv-tpu/bin/python experiments/hbm_aot.py --target tpu-v5e --impls xla,band,dense

TPU (no TPU needed): `libtpu` (the `jax[tpu]` extra) compiles for a deviceless topology on any
x86-64 host; it only accepts whole hosts, so the topology is one v5e host (`v5e:2x2`) and the
programs run on its first chip. TPU layouts pad minor dimensions to (8, 128) tiles, which the
byte count includes (see `_shape_bytes`).

Method (no device needed). The CUDA PJRT plugin matching the installed jax (`jax-cuda13-plugin`)
is loaded but not started (`JAX_PLATFORMS=cpu`); `jax.experimental.topologies.get_topology_desc`
makes a compile-only CUDA topology from a GPU target description (H100 SXM: sm_90, 132 SMs,
50 MiB L2); `jax.jit(...).trace(...).lower(...).compile()` on that topology is XLA's GPU
compiler, with all its fusion passes. From the optimised HLO (`compiled.as_text()`), every kernel
launch (fusion, custom call such as a cuBLAS GEMM or a Triton kernel, copy, gather, scatter, ...
in the entry computation, and inside while-loop bodies times their known trip count) contributes
the bytes of its operands plus its results: an upper bound of the HBM traffic that ignores L2 hits
and counts a fusion's whole operand even when it reads a slice. Ratios are against the floor:
forward q, k, v read once and out written once; forward + backward adds q, k, v, d_out read and
dq, dk, dv written once (11 arrays of the input's size in all).

Programs. `fwd` is `out = na(q, k, v, rpb)`; `fwd+bwd` returns `out` and the vjp of `d_out`
(gradients of q, k, v and rpb), as one training step needs. Implementations:
  * `xla`: `implementation="xla"` as a GPU sees it: lowered for CUDA, `platform_dependent` picks
    the blocked-halo tiles (`xla_tiled.py`);
  * `band`: the band formulation (`xla.py`, today's CPU path), lowered for CUDA (the baseline the
    tiled path replaces on accelerators);
  * `dense`: the dense masked reference over all tokens (`reference.py`), skipped above 8192
    tokens (its `[B, h, N, N]` logits do not fit an H100);
  * `pallas`: the Pallas/Triton kernel compiled (not interpreted), where it compiles.

Only `natjax.ops.na` is imported (the package `__init__` pulls in flax etc., which the sm90 venv
does not have). Prints one row per (case, implementation, program) and writes `--json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import types

os.environ["JAX_PLATFORMS"] = "cpu"  # the CUDA plugin is loaded for compilation only
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gate_ptx import TARGET_PROTO as H100  # noqa: E402  (one H100 target description)

# name -> (batch, spatial, heads, head_dim, kernel, dilation, rpb)
CASES = {
    "nat1": (128, (56, 56), 2, 32, 7, 1, True),
    "nat2": (128, (28, 28), 4, 32, 7, 1, True),
    "nat3": (128, (14, 14), 8, 32, 7, 1, True),
    "nat4": (128, (7, 7), 16, 32, 7, 1, True),
    "dinat1": (128, (56, 56), 2, 32, 7, 8, True),
    "hdit": (16, (64, 64), 4, 64, 7, 1, False),
    "video3d": (2, (16, 32, 32), 8, 128, (3, 7, 7), 1, True),
}
DENSE_MAX_TOKENS = 8192
# natjax.ops.na.nonfinite.CONFINED_SCOPE: the name scope of the NaN/inf branch (not imported here:
# `kernel_traffic` must also read HLO text saved elsewhere).
CONFINED_SCOPE = "natjax_nonfinite_confined"

# ---------------------------------------------------------------------------------------------
# Counting kernel bytes in optimised HLO text.
# ---------------------------------------------------------------------------------------------

_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
_TILE = re.compile(r":T\(([\d,]+)\)")
_SPACE = re.compile(r"S\((\d+)\)")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CALLS = re.compile(r"\b(?:to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"\b(?:true|false)_computation=%?([\w.\-]+)")  # a two-way cond
# Opcodes that launch nothing (metadata, aliasing, control flow handled separately).
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
}  # fmt: skip


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape in `text` (an HLO result type, possibly a tuple).

    TPU layouts (`{1,0:T(8,128)...}`) pad the minor dimensions to the memory tile, as the
    hardware stores them (a minor dim of 7 occupies 128 lanes); arrays placed in on-chip memory
    (`S(1)`, VMEM) are not HBM traffic and count 0. GPU layouts carry neither.
    """
    total = 0
    for dtype, dims, layout in _SHAPE.findall(text):
        shape = [int(d) for d in dims.split(",") if d]
        if layout:
            space = _SPACE.search(layout)
            if space and space.group(1) != "0":
                continue
            tile = _TILE.search(layout)
            if tile and shape:
                minor_to_major = [int(x) for x in layout[1:].split(":")[0].split(",") if x]
                sizes = [int(x) for x in tile.group(1).split(",")]
                for size, axis in zip(reversed(sizes), minor_to_major, strict=False):
                    shape[axis] = -(-shape[axis] // size) * size
        total += _BYTES[dtype] * math.prod(shape)
    return total


def _split_operands(rest: str, start: int) -> str:
    """The text inside the parentheses that open at `rest[start]`."""
    depth = 0
    for i in range(start, len(rest)):
        if rest[i] == "(":
            depth += 1
        elif rest[i] == ")":
            depth -= 1
            if depth == 0:
                return rest[start + 1 : i]
    return rest[start + 1 :]


def parse_hlo(text: str) -> dict[str, list[str]]:
    """Computation name -> instruction lines (the entry computation is under "ENTRY")."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            current = "ENTRY" if m.group(1) else m.group(2)
            comps[current] = []
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None and "=" in line:
            comps[current].append(line)
    return comps


def kernel_traffic(text: str) -> dict:
    """Bytes (operands + results) and launches of every kernel, loops unrolled by trip count."""
    comps = parse_hlo(text)
    stats = dict(bytes=0, kernels=0, unknown_trips=0, by_opcode={})
    confined = dict(bytes=0, kernels=0, unknown_trips=0, by_opcode={})
    # Optimised HLO prints operands by name only: resolve them to their defining result types.
    result_of: dict[str, str] = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            op = _OPCODE.search(" " + m.group(2)) if m else None
            if op:
                result_of[m.group(1)] = m.group(2)[: op.start()]

    def visit(name: str, times: int, stats: dict):
        for line in comps.get(name, []):
            m = _INSTR.match(line)
            if not m:
                continue
            rest = m.group(2)
            op = _OPCODE.search(" " + rest)
            if not op:
                continue
            opcode = op.group(1)
            if opcode in _FREE:
                continue
            if opcode == "while":
                trip = _TRIP.search(rest)
                if trip is None:
                    stats["unknown_trips"] += 1
                n = int(trip.group(1)) if trip else 1
                visit(_BODY.search(rest).group(1), times * n, stats)
                continue
            if opcode == "conditional":
                # natjax's NaN/inf confinement (nonfinite.py) is a cond whose confined branch runs
                # only for non-finite inputs: its kernels are counted apart (`confined_bytes`),
                # recognised by their name scope, so `bytes` is the traffic of finite inputs.
                branches = _BRANCHES.search(rest)
                names = branches.group(1).split(",") if branches else _TRUE_FALSE.findall(rest)
                for b in names:
                    b = b.strip().lstrip("%")
                    is_confined = any(CONFINED_SCOPE in line for line in comps.get(b, []))
                    visit(b, times, confined if is_confined else stats)
                continue
            if opcode == "call":
                visit(_CALLS.search(rest).group(1), times, stats)
                continue
            if opcode.endswith("-done") or opcode.endswith("-update"):
                continue  # the matching -start is the launch
            result = rest[: op.start()]
            operands = _split_operands(" " + rest, op.end() - 1)
            names = _OPERAND.findall(operands)
            nbytes = _shape_bytes(result) + sum(_shape_bytes(result_of.get(n, "")) for n in names)
            stats["bytes"] += times * nbytes
            stats["kernels"] += times
            entry = stats["by_opcode"].setdefault(opcode, [0, 0])
            entry[0] += times
            entry[1] += times * nbytes

    visit("ENTRY", 1, stats)
    return {**stats, "confined_bytes": confined["bytes"]}


# ---------------------------------------------------------------------------------------------
# Programs.
# ---------------------------------------------------------------------------------------------


def import_ops(project: str):
    """`natjax.ops.na` without `natjax/__init__` (no flax etc. in the compile venv)."""
    pkg = types.ModuleType("natjax")
    pkg.__path__ = [os.path.join(os.path.abspath(project), "natjax")]
    sys.modules["natjax"] = pkg
    from natjax.ops.na import api, pallas_triton, reference, spec, xla

    return api, pallas_triton, reference, spec, xla


def build(case: str, impl: str, program: str, mods, sharding, dtype):
    import jax
    import jax.numpy as jnp

    api, pallas_triton, reference, spec, band = mods
    batch, spatial, heads, head_dim, kernel, dilation, has_rpb = CASES[case]
    ndim = len(spatial)
    params = spec.make_params(ndim, spatial, head_dim, kernel, dilation, False, None)
    x = jax.ShapeDtypeStruct((batch, *spatial, heads, head_dim), dtype, sharding=sharding)
    rpb = (
        jax.ShapeDtypeStruct((heads, *params.rpb_shape_tail), dtype, sharding=sharding)
        if has_rpb
        else None
    )
    na = getattr(api, f"na{ndim}d")
    if impl == "xla":
        fn = lambda q, k, v, r: na(q, k, v, kernel, dilation=dilation, rpb=r, implementation="xla")
    elif impl == "band":
        band._cpu_chunk = lambda batch, per_item: None  # the one-pass program a GPU would run
        fn = lambda q, k, v, r: band.na_xla(q, k, v, r, params)[0]
    elif impl == "dense":
        fn = lambda q, k, v, r: reference.na_reference(q, k, v, r, params)[0]
    elif impl == "pallas":
        reason = pallas_triton.unsupported_reason(
            spec.NACall.for_query(x.shape, dtype, params, has_rpb)
        )
        if reason:
            raise ValueError(f"pallas refuses: {reason}")
        fn = lambda q, k, v, r: pallas_triton.na_pallas(q, k, v, r, params, interpret=False)[0]
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    if program == "fwd":
        prog = jax.jit(fn)
        args = (x, x, x, rpb)
    else:

        def prog(q, k, v, r, d_out):
            out, vjp = jax.vjp(fn, q, k, v, r)
            return out, vjp(d_out)

        prog = jax.jit(prog)
        args = (x, x, x, rpb, x)
    del jnp
    return prog.trace(*args).lower().compile()


def floor_bytes(case: str, program: str, itemsize: int) -> int:
    batch, spatial, heads, head_dim, *_ = CASES[case]
    x = batch * math.prod(spatial) * heads * head_dim * itemsize
    return (4 if program == "fwd" else 11) * x


def target_sharding(target: str):
    """A one-device sharding on a deviceless topology of `target` ("h100" or "tpu-v5e")."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if target == "h100":
        topo = topologies.get_topology_desc("", "cuda", target_config=H100, topology="1x1x1")
    elif target == "tpu-v5e":
        try:
            import libtpu  # noqa: F401
        except ImportError as err:
            msg = f"--target tpu-v5e needs libtpu (pip install 'jax[tpu]'): {err}"
            raise SystemExit(msg) from err
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        topo = topologies.get_topology_desc("v5e:2x2", "tpu")  # one host: the smallest accepted
    else:
        raise SystemExit(f"--target must be h100 or tpu-v5e, got {target!r}")
    mesh = Mesh(np.array(topo.devices[:1]), ("x",))
    return topo.devices[0].device_kind, NamedSharding(mesh, P())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--project", default=os.path.join(os.path.dirname(__file__), ".."))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--impls", default="xla,band,dense,pallas")
    ap.add_argument("--programs", default="fwd,fwd+bwd")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--target", default="h100", help="h100 (default) or tpu-v5e")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    kind, sharding = target_sharding(args.target)
    mods = import_ops(args.project)
    dtype = jnp.dtype(args.dtype)
    print(f"jax {jax.__version__}; target {kind} (deviceless), {dtype}")
    head = f"{'case':<8} {'impl':<7} {'program':<8} {'GB':>8} {'floor GB':>8} "
    head += f"{'ratio':>7} {'kernels':>7}"
    print(head + "  top kernels (opcode: launches, GB)")
    rows = []
    for case in args.cases.split(","):
        n = math.prod(CASES[case][1])
        for impl in args.impls.split(","):
            if impl == "dense" and n > DENSE_MAX_TOKENS:
                print(f"{case:<8} {impl:<7} skipped: {n} tokens > {DENSE_MAX_TOKENS}")
                continue
            for program in args.programs.split(","):
                t0 = time.time()
                try:
                    compiled = build(case, impl, program, mods, sharding, dtype)
                except Exception as err:  # noqa: BLE001 - one failing case must not stop the table
                    msg = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    print(f"{case:<8} {impl:<7} {program:<8} failed: {msg}")
                    rows.append(dict(case=case, impl=impl, program=program, error=msg))
                    continue
                st = kernel_traffic(compiled.as_text())
                floor = floor_bytes(case, program, dtype.itemsize)
                top = sorted(st["by_opcode"].items(), key=lambda kv: -kv[1][1])[:3]
                top_s = ", ".join(f"{k}: {c}, {b / 1e9:.2f}" for k, (c, b) in top)
                flag = (
                    f" [{st['unknown_trips']} loops without trip count]"
                    if st["unknown_trips"]
                    else ""
                )
                if st["confined_bytes"]:  # the NaN/inf branch (not run for finite inputs)
                    flag += f" [+{st['confined_bytes'] / 1e9:.2f} GB if q/k/v hold NaN/inf]"
                print(
                    f"{case:<8} {impl:<7} {program:<8} {st['bytes'] / 1e9:8.2f} {floor / 1e9:8.3f} "
                    f"{st['bytes'] / floor:7.1f} {st['kernels']:7d}  {top_s}{flag}"
                    f"  ({time.time() - t0:.0f} s)",
                    flush=True,
                )
                rows.append(
                    dict(case=case, impl=impl, program=program, bytes=st["bytes"], floor=floor,
                         ratio=st["bytes"] / floor, kernels=st["kernels"],
                         by_opcode=st["by_opcode"], unknown_trips=st["unknown_trips"],
                         confined_bytes=st["confined_bytes"])
                )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
