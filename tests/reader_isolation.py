"""Run the checkpoint reader on untrusted files in a child process with a memory cap.

A hostile file may crash the interpreter (SIGSEGV from C recursion) or allocate without bound;
inside pytest either would take the whole run down or swap the machine. `ReaderWorker` starts
this module as a child that:

- imports only the reader (`natjax.convert.torch_zip` and its siblings depend on numpy and
  ml_dtypes alone; the package `__init__`s, which import jax, are replaced by empty stubs),
- loads a golden checkpoint once, then caps its address space (`RLIMIT_AS`) at what it uses
  plus `extra_mib`, so any allocation beyond that raises MemoryError,
- reads one path per stdin line with `read_torch_zip` and answers one JSON line: the outcome
  (`"ok"` or the exception type), the message, and the child's peak RSS so far.

If the child dies, `read` reports `"crashed (signal N)"` for the file that killed it and the
next `read` starts a fresh child.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "models" / "nat_rand" / "pytorch_model.bin"


class ReaderWorker:
    """A child process that reads checkpoints on request (see the module docstring).

    Args:
      extra_mib: address space the child may allocate beyond its warmed-up size.
      timeout_s: seconds one read may take before the child is killed.
    """

    def __init__(self, extra_mib: int = 256, timeout_s: float = 60.0) -> None:
        self.extra_mib = extra_mib
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.limited = False

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.extra_mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        ready = self._answer(timeout_s=120.0)
        if ready.get("outcome") != "ready":
            raise RuntimeError(f"reader worker failed to start: {ready}")
        self.limited = ready["limited"]

    def _answer(self, timeout_s: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if readable else ""
        if line:
            return json.loads(line)
        if not readable:
            self.proc.kill()
        rc = self.proc.wait()
        self.proc = None
        if not readable:
            return {"outcome": f"timeout after {timeout_s} s"}
        return {"outcome": f"crashed (signal {-rc})" if rc < 0 else f"exited ({rc})"}

    def read(self, path: str | os.PathLike) -> dict:
        """Read `path` in the child; returns {"outcome", "message", "rss_mib"}."""
        if self.proc is None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{os.fspath(path)}\n")
        self.proc.stdin.flush()
        return self._answer(self.timeout_s)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None

    def __enter__(self) -> ReaderWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------- the child
def _status_bytes(field: str) -> int | None:
    """A `/proc/self/status` size (VmSize: address space, VmHWM: own peak RSS); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _child(extra_mib: int) -> None:
    import resource
    import types

    for name in ("natjax", "natjax.convert"):
        stub = types.ModuleType(name)
        stub.__path__ = [str(ROOT / name.replace(".", "/"))]
        sys.modules[name] = stub
    from natjax.convert import torch_zip

    torch_zip.read_torch_zip(GOLDEN)  # warm up: imports, allocator arenas, numpy buffers
    size = _status_bytes("VmSize")
    if size is not None:
        limit = size + extra_mib * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"outcome": "ready", "limited": size is not None}), flush=True)
    for line in sys.stdin:
        answer: dict = {}
        try:
            torch_zip.read_torch_zip(line.rstrip("\n"))
            answer["outcome"] = "ok"
        except BaseException as err:  # whatever escapes is the test's finding
            answer = {"outcome": type(err).__name__, "message": str(err)[:2000]}
        peak = _status_bytes("VmHWM")  # not ru_maxrss: that includes the parent's, via fork
        answer["rss_mib"] = None if peak is None else peak / 2**20
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    # Run as a script: the test's directory is sys.path[0]; the repository must come first.
    sys.path.insert(0, str(ROOT))
    _child(int(sys.argv[1]))
