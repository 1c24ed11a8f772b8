"""Deviceless Hopper target, ptxas reports and Triton IR statistics for the compile gate.

* `TARGET_PROTO`: a `GpuTargetConfigProto` (text) of an H100 SXM (sm_90, 132 SMs, 64K registers
  and 228 KiB shared memory per SM, 227 KiB per block), what `jax.experimental.topologies`
  needs for a compile-only CUDA topology.
* `ptxas_report`: runs `ptxas -arch=sm_90a -v --warn-on-spills` on one PTX file and reads
  registers, spills, stack and static shared memory per kernel.
* `launches`: grid, threads and dynamic shared memory of each kernel from XLA's thunk dump.
* `blocks_per_sm`: resident blocks per SM from registers, shared memory and threads.
* `triton_calls` / `ttir_text` / `loop_ops_per_score`: the Pallas kernels' Triton IR in the
  lowered program and the non-matmul work of each inner loop per score.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

SM_REGISTERS = 65536
SM_SMEM = 233472  # bytes per SM (228 KiB)
BLOCK_SMEM = 232448  # opt-in limit per block (227 KiB)
SM_WARPS = 64
SM_BLOCKS = 32
RESERVED_SMEM_PER_BLOCK = 1024  # the driver keeps 1 KiB per resident block on sm_90

TARGET_PROTO = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    minor: 0
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 10
  patch: 0
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def find_ptxas() -> str | None:
    """ptxas of the CUDA packages jax uses (nvidia-cuda-nvcc), else the one on PATH."""
    try:
        from jax._src import lib

        root = lib.cuda_path
    except (ImportError, AttributeError):
        root = None
    if root and os.access(os.path.join(root, "bin", "ptxas"), os.X_OK):
        return os.path.join(root, "bin", "ptxas")
    return shutil.which("ptxas")


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(ptxas: str, ptx_file: str) -> dict[str, dict]:
    """Registers, spills, stack and static shared memory of every kernel in a PTX file.

    Args:
      ptxas: path of ptxas.
      ptx_file: a PTX file.

    Returns:
      `{kernel: {regs, spill_stores, spill_loads, stack, static_smem}}`.

    Raises:
      RuntimeError: when ptxas fails (a compile error).
    """
    with open(ptx_file) as f:
        arch = re.search(r"^\.target\s+(\w+)", f.read(), re.M).group(1)
    res = subprocess.run(
        [ptxas, f"-arch={arch}", "-v", "--warn-on-spills", ptx_file, "-o", os.devnull],
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = res.stdout + res.stderr
    if res.returncode:
        raise RuntimeError(f"ptxas failed on {os.path.basename(ptx_file)}: {text[-2000:]}")
    stats: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = stats.setdefault(
                m[1], dict(regs=None, spill_stores=0, spill_loads=0, stack=0, static_smem=0)
            )
        elif cur is None:
            continue
        elif m := _FRAME.search(line):
            cur.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := _USED.search(line):
            cur["regs"] = int(m[1])
            if s := _SMEM.search(line):
                cur["static_smem"] = int(s[1])
    return stats


_THUNK = re.compile(
    r"\b(\w+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
    r"shared_memory: (\d+) bytes"
)


def launches(dump_dir: str) -> dict[str, dict]:
    """`{kernel: {grid, threads, smem}}` from XLA's `*thunk_sequence.txt` dumps."""
    found = {}
    for name in sorted(os.listdir(dump_dir)):
        if name.endswith("thunk_sequence.txt"):
            with open(os.path.join(dump_dir, name)) as f:
                for m in _THUNK.finditer(f.read()):
                    found[m[1]] = dict(
                        grid=tuple(int(x) for x in m.group(2, 3, 4)),
                        threads=int(m[5]) * int(m[6]) * int(m[7]),
                        smem=int(m[8]),
                    )
    return found


def blocks_per_sm(regs: int | None, threads: int | None, smem: int | None) -> int | None:
    """Resident blocks per SM on sm_90 (limits: registers, shared memory, warps, 32 blocks)."""
    if not regs or not threads:
        return None
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = (SM_REGISTERS // regs_per_warp) // warps
    by_smem = SM_SMEM // ((smem or 0) + RESERVED_SMEM_PER_BLOCK)
    return max(0, min(by_regs, by_smem, SM_WARPS // warps, SM_BLOCKS))


def triton_calls(lowered) -> list[dict]:
    """Each Pallas Triton custom call of a lowered program: name, IR bytes, warps, stages."""
    from jax._src.lib.mlir import ir

    found = []

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        target = ir.StringAttr(child.attributes["call_target_name"]).value
                        if target == "__gpu$xla.gpu.triton":
                            cfg = ir.DictAttr(child.attributes["mhlo.backend_config"])
                            d = {cfg[i].name: cfg[i].attr for i in range(len(cfg))}
                            found.append(
                                dict(
                                    name=ir.StringAttr(d["name"]).value,
                                    ir=ir.StringAttr(d["ir"]).value_bytes,
                                    num_warps=ir.IntegerAttr(d["num_warps"]).value,
                                    num_stages=ir.IntegerAttr(d["num_stages"]).value,
                                )
                            )
                    visit(child.operation)

    visit(lowered.compiler_ir("stablehlo").operation)
    return found


def ttir_text(ir_bytes: bytes) -> str:
    """Triton IR bytecode -> text."""
    from jax._src.interpreters import mlir
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    ctx = mlir.make_ir_context()
    triton.dialect.register_dialect(ctx)
    with ctx:
        return ir.Module.parse(ir_bytes).operation.get_asm(enable_debug_info=False)


_TENSOR = re.compile(r"tensor<([0-9x]+)x[!a-z]")
_DEF = re.compile(r"^\s*(%[\w#]+)(?::\d+)?\s*=\s*\"?([a-z_]+\.[a-z_.]+)\"?(.*)$")
_STMT = re.compile(r"^\s*\"?([a-z_]+\.[a-z_.]+)\"?(.*)$")
_VAL = re.compile(r"%[\w#]+")
_FREE = ("arith.constant", "scf.yield", "tt.return", "tt.reduce.return")
# Shape-only ops: register renaming, folded by the Triton/LLVM backend as a rule; counted apart.
LAYOUT = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "tt.make_range")
# Value-preserving ops between a tile load and the matmul operand it feeds.
_PASS = ("tt.trans", "arith.truncf", "arith.extf", "tt.reshape", "tt.broadcast")
# The passes Triton's own TTIR pipeline (`make_ttir`) starts with: what the GPU compiler sees.
CANONICAL_PIPELINE = "builtin.module(canonicalize,cse,loop-invariant-code-motion,canonicalize)"


def _numel(shape: str) -> int:
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def canonicalize(ttir: str) -> str:
    """Runs MLIR's canonicalize, CSE and loop-invariant code motion on Triton IR text (the first
    passes of Triton's own TTIR pipeline, with the Triton dialect's folders): Pallas emits every
    block offset and unit stride as elementwise tensor ops, which these passes fold or hoist."""
    from jax._src.interpreters import mlir
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir, passmanager

    ctx = mlir.make_ir_context()
    triton.dialect.register_dialect(ctx)
    with ctx:
        module = ir.Module.parse(_opaque_trip_counts(ttir))
        passmanager.PassManager.parse(CANONICAL_PIPELINE).run(module.operation)
        return module.operation.get_asm(enable_debug_info=False)


_FOR = re.compile(
    r"^(\s*)(%[\w#]+(?::\d+)?\s*=\s*scf\.for\s+%[\w#]+\s*=\s*%[\w#]+\s+to\s+)(%[\w#]+)"
)


def _opaque_trip_counts(ttir: str) -> str:
    """Gives every `scf.for` an upper bound the folder cannot see through (`max(bound,
    num_programs)`; this IR is only counted, never compiled), so canonicalize keeps one-trip
    loops (1-D calls have one halo row) as loops instead of inlining them into the kernel body:
    the per-step work stays countable."""
    out = []
    for i, line in enumerate(ttir.splitlines()):
        m = _FOR.match(line)
        if m:
            ub = f"%__opaque_ub{i}"
            out.append(f"{m[1]}%__np{i} = tt.get_num_programs x : i32")
            out.append(f"{m[1]}{ub} = arith.maxsi {m[3]}, %__np{i} : i32")
            line = m[1] + m[2] + ub + line[m.end() :]
        out.append(line)
    return "\n".join(out)


def _innermost_loops(lines: list[str]) -> list[list[str]]:
    """Bodies of the innermost `scf.for` loops that contain a `tt.dot`."""
    loops = []
    for start, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for j in range(start, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            if j > start:
                body.append(lines[j])
            if depth <= 0 and j > start:
                break
        if any("tt.dot" in ln for ln in body) and not any("scf.for" in ln for ln in body):
            loops.append(body)
    return loops


def _parse_body(body: list[str]) -> list[dict]:
    """The loop body's top-level ops: kind, result name, operands, element count.

    A `tt.reduce` region (its combiner, one scalar op) is folded into the reduce, which counts
    its operand's elements.
    """
    ops, depth, pending = [], 0, None
    for ln in body:
        opens, closes = ln.count("{"), ln.count("}")
        if pending is not None:
            depth += opens - closes
            if depth <= 0 and ln.strip().startswith("})"):
                shapes = _TENSOR.findall(ln)
                pending["elements"] = _numel(shapes[0]) if shapes else 1
                ops.append(pending)
                pending = None
            continue
        m = _DEF.match(ln)
        if m:
            name, kind, rest = m[1], m[2], m[3]
        else:
            m = _STMT.match(ln)
            if not m:
                continue
            name, kind, rest = None, m[1], m[2]
        operands = _VAL.findall(rest.split(" : ")[0].split("<{")[0])
        if kind == "tt.reduce":
            pending, depth = dict(kind=kind, name=name, operands=operands, elements=1), 0
            depth = opens - closes
            continue
        shapes = _TENSOR.findall(ln)
        ops.append(
            dict(kind=kind, name=name, operands=operands,
                 elements=_numel(shapes[-1]) if shapes else 1)
        )  # fmt: skip
    return ops


def _graph(ops: list[dict]) -> tuple[dict[str, int], dict[int, set[int]]]:
    """(result name -> op index, op index -> indices of its users) within the loop body."""
    by_name = {op["name"]: i for i, op in enumerate(ops) if op["name"]}
    users: dict[int, set[int]] = {i: set() for i in range(len(ops))}
    for i, op in enumerate(ops):
        for v in op["operands"]:
            if v in by_name:
                users[by_name[v]].add(i)
    return by_name, users


def _score_slice(ops: list[dict], loads: set[int]) -> set[int]:
    """Indices of the ops that compute on the score block: everything downstream of the first
    `tt.dot` (the scores) up to and including the reductions and matmul operands it feeds, and
    everything upstream of those outside the tile loads (the bias/mask lookup, `dO V^T`). Ops
    on the `[rows]` statistics and the accumulators are past a reduction, so outside."""
    by_name, users = _graph(ops)
    first = next(i for i, op in enumerate(ops) if op["kind"] == "tt.dot")
    down, stack = set(), [first]
    while stack:
        i = stack.pop()
        if i in down:
            continue
        down.add(i)
        if i == first or ops[i]["kind"] not in ("tt.reduce", "tt.dot"):
            stack += [u for u in users[i] if ops[u]["kind"] != "tt.dot" or u == first]
    part, stack = set(), list(down)
    while stack:
        i = stack.pop()
        if i in part or i in loads:
            continue
        part.add(i)
        stack += [by_name[v] for v in ops[i]["operands"] if v in by_name]
    return part


def _tile_load_slice(ops: list[dict]) -> set[int]:
    """Indices of the ops that only load matmul operand tiles (K, V, Q, dO rows): the loads
    whose value reaches a `tt.dot` operand through value-preserving ops, and the address and
    mask arithmetic used by nothing else. That work scales with keys x head_dim, not with the
    scores; a contiguous / TMA load replaces it."""
    by_name, users = _graph(ops)

    def feeds_dot(i, seen=()):
        for u in users[i]:
            kind = ops[u]["kind"]
            if kind == "tt.dot" and ops[u]["operands"][2:3] != [ops[i]["name"]]:
                return True
            if kind in _PASS and u not in seen and feeds_dot(u, seen + (u,)):
                return True
        return False

    roots = [i for i, op in enumerate(ops) if op["kind"] == "tt.load" and feeds_dot(i)]
    part: set[int] = set()
    stack = list(roots)
    while stack:  # backward slice of the tile loads
        i = stack.pop()
        if i in part:
            continue
        part.add(i)
        stack += [by_name[v] for v in ops[i]["operands"] if v in by_name]
    changed = True
    while changed:  # keep only ops whose users all load tiles (and the loads themselves)
        changed = False
        for i in list(part):
            if i in roots:
                continue
            if any(u not in part for u in users[i]):
                part.discard(i)
                changed = True
    return part


def loop_ops_per_score(ttir: str, canonical: bool = True) -> list[dict]:
    """Non-matmul work per score of every innermost `scf.for` loop with a matmul.

    Counted on the Triton IR after `canonicalize` (what Triton compiles; `canonical=False`
    counts the IR as Pallas emits it). Each op of the loop body (not `tt.dot`, constants,
    yields or loop control) counts its result's elements (a reduction: its operand's), divided
    by the elements of the loop's first `tt.dot` result (the score block `q k^T`). Scalar ops
    count 1 element (about free). Three sums:

    * `score_ops`: ops over the score block (`_score_slice`: the scores, what they feed up to
      the reductions and matmuls, and what feeds them, outside the tile loads), counted where
      their result has exactly the score block's elements: the per-score work proper (bias/mask
      lookup, scale, softmax, `ds`, casts), the issue's metric;
    * `ops_per_score`: every op outside the tile loads, incl. `[rows]` vectors and accumulator
      rescales (`[rows, head_dim]`);
    * `load_ops_per_element`: the tile loads' address/mask ops and loads (`_tile_load_slice`)
      per loaded element;

    shape-only ops (`LAYOUT`) are left out of all three and reported as `layout_per_score`.

    Args:
      ttir: Triton IR text of one kernel.
      canonical: canonicalize first.

    Returns:
      One dict per loop: `score_ops`, `ops_per_score`, `load_ops_per_element`,
      `layout_per_score`, `score_elements`, `dots`, `top` (the 8 heaviest op kinds outside the
      tile loads with their per-score counts).
    """
    if canonical:
        ttir = canonicalize(ttir)
    out = []
    for body in _innermost_loops(ttir.splitlines()):
        ops = [op for op in _parse_body(body) if op["kind"] not in _FREE]
        ops = [op for op in ops if not op["kind"].startswith("scf.")]
        dots = [op for op in ops if op["kind"] == "tt.dot"]
        score = dots[0]["elements"]
        loads = _tile_load_slice(ops)
        on_block = _score_slice(ops, loads)
        per_kind: dict[str, float] = {}
        on_scores = layout = load_ops = loaded = 0.0
        for i, op in enumerate(ops):
            kind, n = op["kind"], op["elements"]
            if kind == "tt.dot":
                continue
            if kind in LAYOUT:
                layout += n
            elif i in loads:
                load_ops += n
                loaded += n if kind == "tt.load" else 0
            else:
                per_kind[kind] = per_kind.get(kind, 0) + n
                on_scores += n if (n == score and i in on_block) else 0
        top = sorted(per_kind.items(), key=lambda kv: -kv[1])[:8]
        out.append(
            dict(
                score_ops=round(on_scores / score, 2),
                ops_per_score=round(sum(per_kind.values()) / score, 2),
                load_ops_per_element=round(load_ops / max(loaded, 1), 2),
                layout_per_score=round(layout / score, 2),
                score_elements=score,
                dots=len(dots),
                top={k: round(v / score, 2) for k, v in top},
            )
        )
    return out
