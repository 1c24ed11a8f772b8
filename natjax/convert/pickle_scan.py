"""Pre-scan of a pickle opcode stream: every bound is checked before the unpickler builds anything.

The C unpickler trusts the stream. From a few bytes it will size its memo table to a declared
PUT index (`LONG_BINPUT 2**27`: 2 GB from a 9-byte pickle), allocate a declared length before
reading it (`BINBYTES8 2**40`), build containers nested 200,000 deep (a dict key that deep is
then hashed recursively in C until the process dies with SIGSEGV), spend ~70 bytes of heap per
byte of `EMPTY_LIST`s, or insert thousands of keys with one hash (quadratic time). `scan_pickle`
walks the opcodes once with a symbolic stack (kinds and nesting depths, never values) and
refuses, with a `ValueError` naming the opcode and its byte offset:

- declared lengths past the end of the stream, memo indices beyond the objects memoized so far
  (pickle's own writers number them densely from 0), unknown opcodes, out-of-band buffers;
- nesting deeper than `max_depth`; a container modified after it was placed inside another,
  which also rules out cycles (Python's pickler always fills a container before nesting it);
- more than `max_heap_bytes` of estimated Python heap (a per-opcode cost model that
  over-estimates CPython's object sizes), more than `MAX_HASHED_KEYS` dict keys or set items
  whose hash an attacker controls (anything but str/bytes, whose hashes are randomised, and
  small ints, whose hashes are distinct);
- globals not on the caller's allow-list, the copyreg extension registry, `NEWOBJ` (no
  allow-listed name is a class) and `BUILD` on anything but a dict the stream itself created
  (torch's `OrderedDict` state dicts carry a `_metadata` attribute set by BUILD).

Time and memory of the scan are linear in the stream length. The layout follows the opcode
definitions in CPython's `Lib/pickletools.py` and the semantics of `Modules/_pickle.c`.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass

from natjax.convert.pickle_opcodes import (
    CONSTANT,
    COST,
    DICT_FACTORY,
    FIXED_HASH,
    SLOT,
    TABLE,
    TENSOR_FACTORY,
    Sym,
)

__all__ = ["CONSTANT", "DICT_FACTORY", "MAX_DEPTH", "MAX_HASHED_KEYS", "TENSOR_FACTORY"]
__all__ += ["ScanSummary", "refusal", "scan_pickle"]

# Real checkpoints nest a handful of levels (dict -> state dict -> tensor args tuple -> size
# tuple); CPython's C recursion limits are in the thousands.
MAX_DEPTH = 100
# Dict keys / set items with attacker-chosen hashes: inserting n colliding keys costs O(n^2)
# (20,000 take seconds: `colliding_keys_20k` in experiments/reader_hostile_memory.py). torch
# optimizer states key by small ints, which are exempt.
MAX_HASHED_KEYS = 4096


def refusal(module: str, name: str) -> str:
    """The message for a global that is not on the allow-list."""
    return (
        f"refusing to load global '{module}.{name}': only PyTorch tensor storages and state "
        "dicts can be read without running code from the file"
    )


class _Refusal(ValueError):
    """A bound broken at the current opcode (`_Scanner.run` adds where)."""


@dataclass(frozen=True)
class ScanSummary:
    """What a successful scan saw."""

    opcodes: int
    heap_bytes: int  # the cost model's estimate
    max_depth: int
    persistent_ids: int
    tensors: int


class _Scanner:
    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], str], limits) -> None:
        self.data = data
        self.end = len(data)
        self.allowed = allowed
        self.max_depth, self.max_heap = limits
        self.stack: list[Sym] = []
        self.marks: list[int] = []
        self.fence = 0
        self.memo: dict[int, Sym] = {}
        self.heap = 0
        self.depth_seen = 0
        self.hashed_keys = 0
        self.persistent_ids = 0
        self.tensors = 0

    # ------------------------------------------------------------------------ helpers
    def fail(self, problem: str) -> _Refusal:
        """The error for `problem`; `run` adds the opcode and its byte offset."""
        return _Refusal(problem)

    def charge(self, n: int) -> None:
        self.heap += n
        if self.heap > self.max_heap:
            raise self.over_budget()

    def over_budget(self) -> ValueError:
        return self.fail(
            f"the pickle would build more than {self.max_heap} bytes of Python objects "
            f"from {len(self.data)} bytes (a memory-amplification attack?)"
        )

    def push(self, sym: Sym, cost: int = 0) -> None:
        self.stack.append(sym)
        self.heap += SLOT + cost
        if self.heap > self.max_heap:
            raise self.over_budget()

    def pop(self) -> Sym:
        # Below the last MARK is out of reach (the unpickler's "fence").
        if len(self.stack) <= self.fence:
            raise self.fail("stack underflow: the pickle is corrupt")
        return self.stack.pop()

    def pop_n(self, n: int) -> list[Sym]:
        stack = self.stack
        if len(stack) - n < self.fence:
            raise self.fail("stack underflow: the pickle is corrupt")
        items = stack[-n:]
        del stack[-n:]
        return items

    def pop_mark(self) -> list[Sym]:
        if not self.marks:
            raise self.fail("no MARK to pop to: the pickle is corrupt")
        start = self.marks.pop()
        self.fence = self.marks[-1] if self.marks else 0
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self) -> Sym:
        if len(self.stack) <= self.fence:
            raise self.fail("stack underflow: the pickle is corrupt")
        return self.stack[-1]

    def nest(self, container: Sym, children: list[Sym]) -> None:
        """Record that `children` now live inside `container` (depth, nesting, cycles)."""
        depth = container.depth or 1
        for child in children:
            if child is container:
                raise self.fail("a container holds itself: recursive structures are refused")
            child.nested = True
            if child.depth >= depth:
                depth = child.depth + 1
        container.depth = depth
        if depth > self.depth_seen:
            self.depth_seen = depth
            if depth > self.max_depth:
                raise self.fail(f"an object is nested more than {self.max_depth} levels deep")

    def mutable_target(self, kinds: tuple[str, ...], what: str) -> Sym:
        target = self.top()
        if target.kind not in kinds:
            raise self.fail(f"{what} on a {target.kind}: the pickle is corrupt or hostile")
        if target.nested:
            raise self.fail(
                f"{what} modifies a {target.kind} already placed inside another object "
                "(torch.save never writes this; it is how recursive structures are built)"
            )
        return target

    def count_hashed(self, keys: list[Sym]) -> None:
        self.hashed_keys += sum(1 for k in keys if k.kind not in FIXED_HASH)
        if self.hashed_keys > MAX_HASHED_KEYS:
            raise self.fail(
                f"more than {MAX_HASHED_KEYS} non-string dict keys or set items (their hashes "
                "are chosen by the file: a hash-collision time bomb?)"
            )

    def new_container(self, kind: str, children: list[Sym], cost: int) -> Sym:
        sym = Sym(kind)
        self.nest(sym, children)
        self.push(sym, cost)
        return sym

    def global_sym(self, module: str, name: str) -> Sym:
        kind = self.allowed.get((module, name))
        if kind is None:
            raise self.fail(refusal(module, name))
        return Sym("global", raw=kind)

    def call(self, func: Sym, args: list[Sym], how: str) -> None:
        """REDUCE / INST / OBJ: `func(*args)` for an allow-listed callable."""
        kind = func.raw if func.kind == "global" else None
        if kind == DICT_FACTORY:
            sym = Sym("odict")
            self.nest(sym, args)
            self.push(sym, COST["odict"])
        elif kind == TENSOR_FACTORY:
            for arg in args:
                arg.nested = True
            self.tensors += 1
            self.push(Sym("tensor"), COST["tensor"])
        else:
            raise self.fail(f"{how} calls a {func.kind} that is not an allow-listed function")

    # -------------------------------------------------------------------------- args
    def need(self, pos: int, n: int) -> None:
        if n < 0:
            raise self.fail(f"negative length {n}: the pickle is corrupt")
        remaining = len(self.data) - pos
        if n > remaining:
            raise self.fail(
                f"opcode declares {n} bytes but only {remaining} remain: the pickle is "
                "truncated or hostile"
            )

    # ----------------------------------------------------------------------- the walk
    def run(self) -> ScanSummary:
        data, pos, n_ops, table, end = self.data, 0, 0, TABLE, self.end
        name, start = "(start)", 0
        try:
            while True:
                if pos >= end:
                    name, start = "(end)", pos
                    raise self.fail("the pickle ends without STOP: it is truncated")
                entry = table[data[pos]]
                start = pos
                if entry is None:
                    name = f"0x{data[pos]:02x}"
                    raise self.fail("unknown opcode: the pickle is corrupt")
                name, reader, handler = entry
                pos += 1
                arg = None
                if reader is not None:
                    arg, pos = reader(self, pos)
                n_ops += 1
                if handler is None:  # STOP
                    break
                handler(self, name, arg)
            if self.marks or len(self.stack) != 1:
                raise self.fail(f"STOP with {len(self.stack)} objects and {len(self.marks)} marks")
        except _Refusal as refusal:
            raise ValueError(f"{refusal} (pickle opcode {name} at byte {start})") from None
        return ScanSummary(n_ops, self.heap, self.depth_seen, self.persistent_ids, self.tensors)

    def memo_index(self, arg: bytes) -> int:
        """The index of a text (protocol 0) PUT/GET."""
        try:
            index = int(arg)
        except ValueError:
            raise self.fail(f"memo index {arg[:20]!r} is not a number") from None
        if index < 0:
            raise self.fail(f"negative memo index {index}: the pickle is corrupt")
        return index

    def dict_items(self, items: list[Sym]) -> None:
        if len(items) % 2:
            raise self.fail("odd number of items for a dict: the pickle is corrupt")
        self.count_hashed(items[0::2])

    def text(self, sym: Sym) -> str:
        if sym.kind != "str" or sym.raw is None:
            raise self.fail(f"STACK_GLOBAL needs two short strings, got a {sym.kind}")
        return sym.raw.decode("utf-8", "replace")


def scan_pickle(
    data: bytes,
    allowed: Mapping[tuple[str, str], str],
    *,
    max_depth: int = MAX_DEPTH,
    max_heap_bytes: int,
) -> ScanSummary:
    """Check a pickle stream against every bound above without building any object.

    Args:
      data: the whole pickle (e.g. `archive/data.pkl`).
      allowed: `(module, name) -> DICT_FACTORY | TENSOR_FACTORY | CONSTANT` for each global
        the reader resolves; every other global is refused.
      max_depth: deepest container nesting accepted.
      max_heap_bytes: largest estimated Python heap the unpickler may build.

    Returns:
      What the scan counted.

    Raises:
      ValueError: the stream breaks a bound, is malformed, or names a refused global; the
        message names the opcode and its byte offset.
    """
    scanner = _Scanner(bytes(data), allowed, (max_depth, max_heap_bytes))
    # The symbols form no reference cycles; without this, the cyclic collector re-walks the
    # growing stack of millions of them and the scan turns superlinear.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return scanner.run()
    finally:
        if was_enabled:
            gc.enable()
