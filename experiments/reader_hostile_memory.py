"""Peak memory and time of reading each hostile checkpoint of issue 10 (section 1).

Builds every file of `tests/reader_cases.CASES` and `SCAN_WORST_CASES` (plus the golden
`.bin`/`.pth` files for reference) in a temporary folder, then reads each one in a fresh child
process with `natjax.convert.torch_zip.load_torch_state_dict` from every `--tree` given (e.g.
the landed code and this branch). Prints the child's own peak RSS (`VmHWM`), the CPU seconds of
the load itself (a crashed or timed-out child: its wall time, startup included), the outcome.

The children import only the reader module (the package `__init__`s import jax, which would
dominate the peak RSS) and run under a safety address-space cap (`--cap-gib`), so an unbounded
allocation shows up as MemoryError instead of swapping the machine.

    .venv/bin/python experiments/reader_hostile_memory.py --tree /work/main --tree .
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reader_cases import CASES, SCAN_WORST_CASES  # noqa: E402

GOLDEN = [
    ROOT / "tests/data/models/nat_rand/pytorch_model.bin",
    ROOT / "tests/data/models/dinat_rand/original.pth",
]

# Child: stub the two packages (their __init__ import jax) so only the reader loads.
CHILD = r"""
import json, resource, sys, time, types
tree, path, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
for name, sub in (("natjax", "natjax"), ("natjax.convert", "natjax/convert")):
    mod = types.ModuleType(name)
    mod.__path__ = [f"{tree}/{sub}"]
    sys.modules[name] = mod
from natjax.convert import torch_zip
try:  # the allow-listed function a BUILD may rewrite (module moved in the new reader)
    from natjax.convert.torch_tensors import _rebuild_tensor_v2 as fn
except ImportError:
    fn = torch_zip._rebuild_tensor_v2
before = (fn.__qualname__, fn.__defaults__)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
wall, cpu = time.perf_counter(), time.process_time()
try:
    if path != "-":
        torch_zip.load_torch_state_dict(path)
    out = {"outcome": "ok"}
except BaseException as err:  # the point is to see what escapes
    out = {"outcome": type(err).__name__, "message": str(err)[:160]}
out["load_s"], out["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
if (fn.__qualname__, fn.__defaults__) != before:
    out["outcome"] += " (fn rewritten)"
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, inherited via fork).
out["hwm_mib"] = next(
    int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")
) / 1024
print(json.dumps(out), flush=True)
"""


def peak_rss_mib(tree: str, path: str, cap: int, timeout: float) -> dict:
    """Run one child; its outcome, wall time and own peak RSS (None if it died first)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, tree, path, str(cap)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"cpu_s": timeout, "rss_mib": None, "outcome": "timeout"}
    result = {"cpu_s": time.perf_counter() - start, "rss_mib": None}
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(got, rss_mib=got["hwm_mib"])
    except (IndexError, ValueError):
        rc = proc.returncode
        result["outcome"] = f"crashed (signal {-rc})" if rc < 0 else f"exit {rc}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", help="source trees to compare (default .)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--cap-gib", type=float, default=6.0, help="child address-space cap")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per child")
    args = parser.parse_args()
    trees = [str(Path(t).resolve()) for t in (args.tree or ["."])]
    cases = {name: build for name, (build, _) in CASES.items()} | SCAN_WORST_CASES
    names = args.cases.split(",") if args.cases else list(cases)
    cap = int(args.cap_gib * 2**30)
    with tempfile.TemporaryDirectory() as tmp:
        files = [("(import only)", "-", 0)]
        for name in names:
            path = cases[name](Path(tmp) / f"{name}.pth")
            files.append((name, str(path), path.stat().st_size))
        files += [(f"golden {p.parent.name}/{p.name}", str(p), p.stat().st_size) for p in GOLDEN]
        header = f"{'file':32s} {'bytes':>10s}"
        for tree in trees:
            header += f" | {Path(tree).name + ' MiB':>12s} {'cpu s':>6s} {'outcome':26s}"
        print(header)
        for name, path, size in files:
            line = f"{name:32s} {size:10d}"
            for tree in trees:
                r = peak_rss_mib(tree, path, cap, args.timeout)
                rss = "-" if r["rss_mib"] is None else f"{r['rss_mib']:.1f}"
                line += f" | {rss:>12s} {r['cpu_s']:6.2f} {r['outcome'][:26]:26s}"
            print(line, flush=True)
    scan_budget_of_golden()


def scan_budget_of_golden() -> None:
    """The pre-scan's heap estimate for real torch pickles, per pickle byte (this tree)."""
    sys.path.insert(0, str(ROOT))
    from natjax.convert import pickle_scan, torch_tensors, torch_zip

    for path in GOLDEN:
        with zipfile.ZipFile(path) as z:
            payload = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        s = pickle_scan.scan_pickle(payload, torch_tensors.SCAN_KINDS, max_heap_bytes=2**40)
        print(
            f"pre-scan of {path.parent.name}/{path.name}: {s.opcodes} opcodes, {s.tensors} "
            f"tensors, heap estimate {s.heap_bytes} B = {s.heap_bytes / len(payload):.1f} x the "
            f"pickle (budget {torch_zip._HEAP_PER_PICKLE_BYTE} x + {torch_zip._HEAP_FLOOR} B)"
        )


if __name__ == "__main__":
    main()
