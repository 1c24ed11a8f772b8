"""How the compiled kernels' loops read global memory, from their PTX (compile gate statistic).

Issue 9 asks for tile and halo loads that are contiguous and "ready for TMA/cp.async". What
reaches the GPU is decided by Triton's pipeliner, not by the Pallas source: a load in a loop
whose addresses Triton can prove contiguous (and `num_stages >= 2`) becomes an asynchronous
`cp.async` copy into shared memory, issued one iteration ahead; a gather it cannot analyse stays
a synchronous `ld.global` whose latency the warp waits for. So the gate reads the PTX: in the
instructions of every loop body (a label and the backward branch to it), it sums the bytes one
thread moves per iteration through `cp.async` (the copy size operand) and through `ld.global`
(the vector width times the element width), per kernel.

`check_async` is the gate condition for the forward and dq kernels (their K/V halo rows and
score tables are the loop's loads): at least `MIN_ASYNC_FRACTION` of the loop's global-load
bytes must be asynchronous copies. The dk/dv kernel runs one pipeline stage (two stages hold
up to 40 more registers per thread and leave one resident block per SM at head_dim 128,
measured with the gate), so its loads are reported, not gated.
"""

from __future__ import annotations

import re

MIN_ASYNC_FRACTION = 0.75
ASYNC_GATED = ("na_pallas_fwd", "na_pallas_dq")

_ENTRY = re.compile(r"\.entry\s+(\w+)\(")
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_CP_ASYNC = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
)
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](8|16|32|64)\b")


def _kernels(ptx: str) -> dict[str, list[str]]:
    """`{entry name: its body lines}` of one PTX module."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in ptx.splitlines():
        if m := _ENTRY.search(line):
            cur = out.setdefault(m[1], [])
        elif cur is not None:
            cur.append(line)
    return out


def _loop_lines(lines: list[str]) -> list[str]:
    """The lines inside any loop: between a label and a later branch back to it."""
    where = {}
    inside = [False] * len(lines)
    for i, line in enumerate(lines):
        if m := _LABEL.match(line.strip()):
            where[m[1]] = i
        for target in _BRANCH.findall(line):
            start = where.get(target)
            if start is not None and start < i:  # a backward branch closes a loop
                for j in range(start, i + 1):
                    inside[j] = True
    return [line for line, keep in zip(lines, inside, strict=True) if keep]


def loop_loads(ptx: str) -> dict[str, dict]:
    """Bytes one thread loads per loop iteration, asynchronously and synchronously.

    Args:
      ptx: the text of one PTX module.

    Returns:
      `{kernel: {async_bytes, sync_bytes, async_copies, sync_loads}}` over its loop bodies
      (statically: each instruction once, whatever the trip counts; all 0 for a kernel
      without loops).
    """
    stats = {}
    for name, lines in _kernels(ptx).items():
        st = dict(async_bytes=0, sync_bytes=0, async_copies=0, sync_loads=0)
        for line in _loop_lines(lines):
            if m := _CP_ASYNC.search(line):
                st["async_bytes"] += int(m[1], 0)
                st["async_copies"] += 1
            for vec, bits in _LD_GLOBAL.findall(line):
                st["sync_bytes"] += int(vec or 1) * int(bits) // 8
                st["sync_loads"] += 1
        stats[name] = st
    return stats


def async_fraction(st: dict) -> float | None:
    """The asynchronous share of a loop's global-load bytes (None: the loop loads nothing)."""
    total = st["async_bytes"] + st["sync_bytes"]
    return st["async_bytes"] / total if total else None


def check_async(kernel: str, st: dict) -> str | None:
    """The gate's problem string when a gated kernel's loop loads are not mostly async copies."""
    if kernel not in ASYNC_GATED:
        return None
    frac = async_fraction(st)
    # None: no load inside a loop. A 1-D call's halo is one row, so its kernels have no
    # key loop at all (every load is issued once, up front): nothing to pipeline.
    if frac is not None and frac < MIN_ASYNC_FRACTION:
        return (
            f"{kernel.replace('na_pallas_', '')} loop loads {st['async_bytes']} B/thread by "
            f"cp.async and {st['sync_bytes']} B by ld.global ({frac:.0%} async < "
            f"{MIN_ASYNC_FRACTION:.0%}): Triton did not pipeline its tile loads"
        )
    return None
