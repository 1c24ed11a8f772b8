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
_OP = re.compile(r"^\s*(?:%[\w#:, %]+=\s*)?\"?([a-z_]+\.[a-z_.]+)\"?")
_FREE = ("arith.constant", "scf.yield", "tt.return", "tt.reduce.return")
# Shape-only ops: register renaming, folded by the Triton/LLVM backend as a rule; counted apart.
LAYOUT = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans")


def _numel(shape: str) -> int:
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def loop_ops_per_score(ttir: str) -> list[dict]:
    """Non-matmul work per score of every innermost `scf.for` loop with a matmul.

    Each op in the loop body (not `tt.dot`, constants or yields) counts its result's elements
    (a reduction: its operand's), divided by the elements of the loop's first `tt.dot` result
    (the score block `q k^T`): one elementwise op over the score block counts 1, one over a
    `[rows]` vector 1/keys. Scalar ops are free. Shape-only ops (`LAYOUT`: splat, broadcast,
    expand_dims, ...) are reported apart as `layout_per_score`. `score_block_ops` counts only
    the ops over exactly the score block (index math of the key/value loads, which scales with
    keys x head_dim, and `[rows]` vectors left out): the per-score work proper.

    Args:
      ttir: Triton IR text of one kernel.

    Returns:
      One dict per loop: `ops_per_score`, `score_block_ops`, `layout_per_score`,
      `score_elements`, `dots`, `top` (the 8 heaviest op kinds with their per-score counts).
    """
    lines = ttir.splitlines()
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
        loops.append(body)
    out = []
    for body in loops:
        dots = [ln for ln in body if "tt.dot" in ln]
        if not dots or any("scf.for" in ln for ln in body):  # innermost loops only
            continue
        score = _numel(_TENSOR.findall(dots[0])[-1])
        per_kind: dict[str, float] = {}
        score_kind: dict[str, float] = {}  # ops over exactly the score block (or reducing it)
        pending_reduce = False
        for ln in body:
            m = _OP.match(ln)
            if ln.strip().startswith("})") and pending_reduce:
                shapes = _TENSOR.findall(ln)
                if shapes:
                    per_kind["tt.reduce"] = per_kind.get("tt.reduce", 0) + _numel(shapes[0])
                    if _numel(shapes[0]) == score:
                        score_kind["tt.reduce"] = score_kind.get("tt.reduce", 0) + score
                pending_reduce = False
                continue
            if not m:
                continue
            kind = m[1]
            if kind == "tt.reduce":
                pending_reduce = True
                continue
            if kind in _FREE or kind == "tt.dot" or kind.startswith("scf."):
                continue
            shapes = _TENSOR.findall(ln)
            if shapes:
                per_kind[kind] = per_kind.get(kind, 0) + _numel(shapes[-1])
                if _numel(shapes[-1]) == score:
                    score_kind[kind] = score_kind.get(kind, 0) + score
        layout = sum(v for k, v in per_kind.items() if k in LAYOUT) / score
        on_scores = sum(v for k, v in score_kind.items() if k not in LAYOUT) / score
        total = sum(v for k, v in per_kind.items() if k not in LAYOUT) / score
        top = sorted(per_kind.items(), key=lambda kv: -kv[1])[:8]
        out.append(
            dict(
                ops_per_score=round(total, 2),
                score_block_ops=round(on_scores, 2),
                layout_per_score=round(layout, 2),
                score_elements=score,
                dots=len(dots),
                top={k: round(v / score, 2) for k, v in top},
            )
        )
    return out
