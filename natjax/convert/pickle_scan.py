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
import pickle
import pickletools
import struct
from collections.abc import Mapping
from dataclasses import dataclass

# Real checkpoints nest a handful of levels (dict -> state dict -> tensor args tuple -> size
# tuple); CPython's C recursion limits are in the thousands.
MAX_DEPTH = 100
# Dict keys / set items with attacker-chosen hashes: inserting n colliding keys costs O(n^2)
# (20,000 take seconds: `colliding_keys_20k` in experiments/reader_hostile_memory.py). torch
# optimizer states key by small ints, which are exempt.
MAX_HASHED_KEYS = 4096

# Global kinds the caller's allow-list maps names to.
DICT_FACTORY = "dict_factory"  # collections.OrderedDict: returns a fresh, empty dict
TENSOR_FACTORY = "tensor_factory"  # torch._utils._rebuild_*: returns an array
CONSTANT = "constant"  # storage types, dtypes: not callable

_SMALL_INT_DIGITS = 18  # decimal ints this short are below 2**61 - 1: distinct hashes
_SHORT_STR = 64  # strings kept (as raw bytes) for STACK_GLOBAL: module and attribute names

# Estimated heap bytes (CPython 3.11, 64-bit, rounded up) kept alive by what an opcode builds.
_SLOT = 8  # a stack/container pointer
_COST = {
    "int": 32,
    "float": 24,
    "str": 64,  # plus 4 bytes per encoded byte (UCS-4 worst case)
    "bytes": 48,  # plus 1 per byte
    "tuple": 56,  # plus 8 per item
    "list": 72,
    "list_item": 16,
    "dict": 240,
    "dict_item": 96,
    "odict": 400,
    "odict_item": 160,
    "set": 232,
    "set_item": 80,
    "memo": 16,
    "mark": 8,
    "tensor": 192,
    "storage": 256,
}
_MEMO_COST = _COST["memo"]
_FIXED_HASH = frozenset({"str", "bytes", "smallint", "bool", "none"})


def refusal(module: str, name: str) -> str:
    """The message for a global that is not on the allow-list."""
    return (
        f"refusing to load global '{module}.{name}': only PyTorch tensor storages and state "
        "dicts can be read without running code from the file"
    )


class _Refusal(ValueError):
    """A bound broken at the current opcode (`_Scanner.run` adds where)."""


class _Sym:
    """What the scanner knows about one object: its kind, nesting depth, whether it is nested."""

    __slots__ = ("kind", "depth", "nested", "raw")

    def __init__(self, kind: str, depth: int = 0, raw: object = None) -> None:
        self.kind = kind
        self.depth = depth
        self.nested = False
        self.raw = raw  # short str: raw bytes (and encoding); global: its allow-list kind


@dataclass(frozen=True)
class ScanSummary:
    """What a successful scan saw."""

    opcodes: int
    heap_bytes: int  # the cost model's estimate
    max_depth: int
    persistent_ids: int
    tensors: int


_HANDLERS: dict[str, object] = {}


def _handles(*names: str):
    """Register the decorated `_Scanner` method as the handler of opcodes `names`."""

    def register(method):
        for name in names:
            _HANDLERS[name] = method
        return method

    return register


_SINGLETON_KINDS = {
    "BININT1": "smallint",
    "NONE": "none",
    "NEWTRUE": "bool",
    "NEWFALSE": "bool",
    "EMPTY_TUPLE": "tuple",
}
_SINGLETONS = {op: _Sym(kind) for op, kind in _SINGLETON_KINDS.items()}
_EMPTY_KINDS = {"EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_SET": "set"}
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class _Scanner:
    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], str], limits) -> None:
        self.data = data
        self.end = len(data)
        self.allowed = allowed
        self.max_depth, self.max_heap = limits
        self.stack: list[_Sym] = []
        self.marks: list[int] = []
        self.fence = 0
        self.memo: dict[int, _Sym] = {}
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

    def push(self, sym: _Sym, cost: int = 0) -> None:
        self.stack.append(sym)
        self.heap += _SLOT + cost
        if self.heap > self.max_heap:
            raise self.over_budget()

    def pop(self) -> _Sym:
        # Below the last MARK is out of reach (the unpickler's "fence").
        if len(self.stack) <= self.fence:
            raise self.fail("stack underflow: the pickle is corrupt")
        return self.stack.pop()

    def pop_n(self, n: int) -> list[_Sym]:
        stack = self.stack
        if len(stack) - n < self.fence:
            raise self.fail("stack underflow: the pickle is corrupt")
        items = stack[-n:]
        del stack[-n:]
        return items

    def pop_mark(self) -> list[_Sym]:
        if not self.marks:
            raise self.fail("no MARK to pop to: the pickle is corrupt")
        start = self.marks.pop()
        self.fence = self.marks[-1] if self.marks else 0
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self) -> _Sym:
        if len(self.stack) <= self.fence:
            raise self.fail("stack underflow: the pickle is corrupt")
        return self.stack[-1]

    def nest(self, container: _Sym, children: list[_Sym]) -> None:
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

    def mutable_target(self, kinds: tuple[str, ...], what: str) -> _Sym:
        target = self.top()
        if target.kind not in kinds:
            raise self.fail(f"{what} on a {target.kind}: the pickle is corrupt or hostile")
        if target.nested:
            raise self.fail(
                f"{what} modifies a {target.kind} already placed inside another object "
                "(torch.save never writes this; it is how recursive structures are built)"
            )
        return target

    def count_hashed(self, keys: list[_Sym]) -> None:
        self.hashed_keys += sum(1 for k in keys if k.kind not in _FIXED_HASH)
        if self.hashed_keys > MAX_HASHED_KEYS:
            raise self.fail(
                f"more than {MAX_HASHED_KEYS} non-string dict keys or set items (their hashes "
                "are chosen by the file: a hash-collision time bomb?)"
            )

    def new_container(self, kind: str, children: list[_Sym], cost: int) -> _Sym:
        sym = _Sym(kind)
        self.nest(sym, children)
        self.push(sym, cost)
        return sym

    def global_sym(self, module: str, name: str) -> _Sym:
        kind = self.allowed.get((module, name))
        if kind is None:
            raise self.fail(refusal(module, name))
        return _Sym("global", raw=kind)

    def call(self, func: _Sym, args: list[_Sym], how: str) -> None:
        """REDUCE / INST / OBJ: `func(*args)` for an allow-listed callable."""
        kind = func.raw if func.kind == "global" else None
        if kind == DICT_FACTORY:
            sym = _Sym("odict")
            self.nest(sym, args)
            self.push(sym, _COST["odict"])
        elif kind == TENSOR_FACTORY:
            for arg in args:
                arg.nested = True
            self.tensors += 1
            self.push(_Sym("tensor"), _COST["tensor"])
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
        data, pos, n_ops, table, end = self.data, 0, 0, _TABLE, self.end
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

    # One handler per opcode family, registered under the opcode names it serves.
    @_handles("MARK")
    def _mark(self, op: str, arg) -> None:
        self.fence = len(self.stack)
        self.marks.append(self.fence)
        self.charge(_COST["mark"])

    @_handles("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE")
    def _put(self, op: str, arg) -> None:
        memo = self.memo
        if op == "MEMOIZE":
            index = len(memo)
        elif op == "PUT":
            index = self.memo_index(arg)
        else:
            index = arg
        if index > len(memo):
            # The unpickler would size its memo table to 2 * index pointers.
            raise self.fail(
                f"memo index {index} is beyond the {len(memo)} objects memoized so far "
                "(picklers number them from 0): a memory-amplification attack?"
            )
        if len(self.stack) <= self.fence:
            raise self.fail("stack underflow: the pickle is corrupt")
        memo[index] = self.stack[-1]
        self.heap += _MEMO_COST
        if self.heap > self.max_heap:
            raise self.over_budget()

    @_handles("BINGET", "LONG_BINGET", "GET")
    def _get(self, op: str, arg) -> None:
        index = self.memo_index(arg) if op == "GET" else arg
        sym = self.memo.get(index)
        if sym is None:
            raise self.fail(f"memo index {index} was never set: the pickle is corrupt")
        self.stack.append(sym)
        self.heap += _SLOT
        if self.heap > self.max_heap:
            raise self.over_budget()

    @_handles("BININT1", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE")
    def _singleton(self, op: str, arg) -> None:
        # Cached by CPython (small ints, None, bools, ()): only a pointer is added. The symbols
        # are shared too: leaves are never modified, and `nested` only matters for containers.
        self.stack.append(_SINGLETONS[op])
        self.heap += _SLOT
        if self.heap > self.max_heap:
            raise self.over_budget()

    @_handles("BININT", "BININT2")
    def _int32(self, op: str, arg) -> None:
        self.push(_Sym("smallint"), _COST["int"])

    @_handles("INT", "LONG")
    def _int_text(self, op: str, arg) -> None:
        small = len(arg.rstrip(b"L").lstrip(b"-+")) <= _SMALL_INT_DIGITS
        self.push(_Sym("smallint" if small else "int"), _COST["int"] + len(arg))

    @_handles("LONG1", "LONG4")
    def _long(self, op: str, arg) -> None:
        n = arg[0]
        self.push(_Sym("smallint" if n <= 7 else "int"), _COST["int"] + n)

    @_handles("BINFLOAT", "FLOAT")
    def _float(self, op: str, arg) -> None:
        self.push(_Sym("float"), _COST["float"])

    @_handles("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8")
    def _unicode(self, op: str, arg) -> None:
        n, raw, ascii_only = arg
        # CPython stores a str in 1, 2 or 4 bytes per character: UTF-8 of n bytes needs at
        # most 4n (one astral character among ASCII), exactly n + 1 when ASCII.
        self.push(_Sym("str", raw=raw), _COST["str"] + (n if ascii_only else 4 * n))

    @_handles("UNICODE", "STRING")
    def _text(self, op: str, arg) -> None:
        self.push(_Sym("str"), _COST["str"] + 4 * len(arg))

    @_handles("BINSTRING", "SHORT_BINSTRING")
    def _binstring(self, op: str, arg) -> None:
        self.push(_Sym("str"), _COST["str"] + 4 * arg[0])

    @_handles("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8")
    def _bytes(self, op: str, arg) -> None:
        self.push(_Sym("bytes"), _COST["bytes"] + arg[0])

    @_handles("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3")
    def _tuple(self, op: str, arg) -> None:
        n = _TUPLE_SIZES.get(op)
        items = self.pop_mark() if n is None else self.pop_n(n)
        self.new_container("tuple", items, _COST["tuple"] + _SLOT * len(items))

    @_handles("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET")
    def _empty(self, op: str, arg) -> None:
        kind = _EMPTY_KINDS[op]
        self.push(_Sym(kind), _COST[kind])

    @_handles("LIST")
    def _list(self, op: str, arg) -> None:
        items = self.pop_mark()
        self.new_container("list", items, _COST["list"] + _COST["list_item"] * len(items))

    @_handles("APPEND", "APPENDS")
    def _append(self, op: str, arg) -> None:
        items = [self.pop()] if op == "APPEND" else self.pop_mark()
        self.nest(self.mutable_target(("list",), op), items)
        self.charge(_COST["list_item"] * len(items))

    @_handles("DICT")
    def _dict(self, op: str, arg) -> None:
        items = self.pop_mark()
        self.dict_items(items)
        self.new_container("dict", items, _COST["dict"] + _COST["dict_item"] * len(items))

    @_handles("SETITEM", "SETITEMS")
    def _setitems(self, op: str, arg) -> None:
        if op == "SETITEM":
            value, key = self.pop(), self.pop()
            items = [key, value]
        else:
            items = self.pop_mark()
        target = self.mutable_target(("dict", "odict"), op)
        self.dict_items(items)
        self.nest(target, items)
        self.charge(_COST[f"{target.kind}_item"] * (len(items) // 2))

    @_handles("ADDITEMS", "FROZENSET")
    def _set_items(self, op: str, arg) -> None:
        items = self.pop_mark()
        self.count_hashed(items)
        cost = _COST["set_item"] * len(items)
        if op == "ADDITEMS":
            self.nest(self.mutable_target(("set",), op), items)
            self.charge(cost)
        else:
            self.new_container("frozenset", items, _COST["set"] + cost)

    @_handles("POP", "POP_MARK", "DUP")
    def _stack_op(self, op: str, arg) -> None:
        if op == "DUP":
            self.push(self.top())
        elif op == "POP_MARK":
            self.pop_mark()
        elif self.marks and self.marks[-1] == len(self.stack):
            self.marks.pop()  # POP right after MARK discards the mark (as _pickle.c does)
            self.fence = self.marks[-1] if self.marks else 0
        else:
            self.pop()

    @_handles("GLOBAL", "INST")
    def _global(self, op: str, arg) -> None:
        module, name = (part.decode("utf-8", "replace") for part in arg)
        func = self.global_sym(module, name)
        if op == "GLOBAL":
            self.push(func)
        else:
            self.call(func, self.pop_mark(), op)

    @_handles("STACK_GLOBAL")
    def _stack_global(self, op: str, arg) -> None:
        name, module = self.pop(), self.pop()
        self.push(self.global_sym(self.text(module), self.text(name)))

    @_handles("REDUCE")
    def _reduce(self, op: str, arg) -> None:
        args = self.pop()
        if args.kind != "tuple":
            raise self.fail(f"REDUCE arguments are a {args.kind}, not a tuple")
        self.call(self.pop(), [args], op)

    @_handles("OBJ")
    def _obj(self, op: str, arg) -> None:
        items = self.pop_mark()
        if not items:
            raise self.fail("OBJ without a class: the pickle is corrupt")
        self.call(items[0], items[1:], op)

    @_handles("NEWOBJ", "NEWOBJ_EX")
    def _newobj(self, op: str, arg) -> None:
        raise self.fail(f"{op} instantiates a class; no allow-listed name is a class")

    @_handles("EXT1", "EXT2", "EXT4")
    def _ext(self, op: str, arg) -> None:
        raise self.fail(
            f"refusing to load global via the copyreg extension registry (code {arg}): "
            "torch.save never uses it"
        )

    @_handles("BUILD")
    def _build(self, op: str, arg) -> None:
        state = self.pop()
        target = self.top()
        if target.kind != "odict" or target.nested or state.kind != "dict":
            # A BUILD on an allow-listed function or stand-in would rewrite it for the whole
            # process (e.g. `__defaults__` of `_rebuild_tensor_v2`).
            raise self.fail(
                f"BUILD (set state) with a {state.kind} on a {target.kind} is refused: only a "
                "dict the file itself created may receive attributes"
            )
        self.nest(target, [state])

    @_handles("BINPERSID")
    def _binpersid(self, op: str, arg) -> None:
        pid = self.pop()
        if pid.kind != "tuple":
            raise self.fail(f"persistent id is a {pid.kind}, expected a storage tuple")
        pid.nested = True
        self.persistent_ids += 1
        self.push(_Sym("storage"), _COST["storage"])

    @_handles("PERSID")
    def _persid(self, op: str, arg) -> None:
        raise self.fail("text persistent ids (protocol 0) are not torch storages")

    @_handles("PROTO")
    def _proto(self, op: str, arg) -> None:
        if arg > pickle.HIGHEST_PROTOCOL:
            raise self.fail(f"pickle protocol {arg} is newer than this Python reads")

    @_handles("FRAME")
    def _frame(self, op: str, arg) -> None:
        pass  # the frame length was checked against what remains by `_frame_length`

    @_handles("NEXT_BUFFER", "READONLY_BUFFER")
    def _buffer(self, op: str, arg) -> None:
        raise self.fail(f"opcode {op} (out-of-band buffer) is not used by torch.save")

    def memo_index(self, arg: bytes) -> int:
        """The index of a text (protocol 0) PUT/GET."""
        try:
            index = int(arg)
        except ValueError:
            raise self.fail(f"memo index {arg[:20]!r} is not a number") from None
        if index < 0:
            raise self.fail(f"negative memo index {index}: the pickle is corrupt")
        return index

    def dict_items(self, items: list[_Sym]) -> None:
        if len(items) % 2:
            raise self.fail("odd number of items for a dict: the pickle is corrupt")
        self.count_hashed(items[0::2])

    def text(self, sym: _Sym) -> str:
        if sym.kind != "str" or sym.raw is None:
            raise self.fail(f"STACK_GLOBAL needs two short strings, got a {sym.kind}")
        return sym.raw.decode("utf-8", "replace")


# ------------------------------------------------------------------------ argument readers
# One reader per pickletools argument descriptor: `reader(scanner, pos) -> (arg, new pos)`.
# Declared lengths are checked against what remains before anything is sliced.
def _fixed(fmt: str):
    unpack, n = struct.Struct(fmt).unpack_from, struct.calcsize(fmt)

    def read(sc: _Scanner, pos: int):
        if pos + n > sc.end:
            sc.need(pos, n)
        return unpack(sc.data, pos)[0], pos + n

    return read


def _counted(fmt: str, text: bool = False):
    """A length (`fmt`) then that many bytes: (n, the bytes if short[, ASCII-only])."""
    unpack, width = struct.Struct(fmt).unpack_from, struct.calcsize(fmt)

    def read(sc: _Scanner, pos: int):
        if pos + width > sc.end:
            sc.need(pos, width)
        n = unpack(sc.data, pos)[0]
        pos += width
        if n < 0 or pos + n > sc.end:
            sc.need(pos, n)
        chunk = sc.data[pos : pos + n] if n <= _SHORT_STR else None
        if text:
            ascii_only = (sc.data[pos : pos + n] if chunk is None else chunk).isascii()
            return (n, chunk, ascii_only), pos + n
        return (n, chunk), pos + n

    return read


def _line(sc: _Scanner, pos: int):
    end = sc.data.find(b"\n", pos)
    if end < 0:
        raise sc.fail("unterminated text argument: the pickle is truncated")
    return sc.data[pos:end], end + 1


def _line_pair(sc: _Scanner, pos: int):
    first, pos = _line(sc, pos)
    second, pos = _line(sc, pos)
    return (first, second), pos


def _frame_length(sc: _Scanner, pos: int):
    n, pos = _READERS["uint8"](sc, pos)
    sc.need(pos, n)
    return n, pos


_READERS = {
    "uint1": _fixed("<B"),
    "uint2": _fixed("<H"),
    "int4": _fixed("<i"),
    "uint4": _fixed("<I"),
    "uint8": _fixed("<Q"),
    "float8": _fixed("<d"),
    "long1": _counted("<B"),
    "long4": _counted("<i"),
    "string1": _counted("<B"),
    "string4": _counted("<i"),
    "bytes1": _counted("<B"),
    "bytes4": _counted("<I"),
    "bytes8": _counted("<Q"),
    "bytearray8": _counted("<Q"),
    "unicodestring1": _counted("<B", text=True),
    "unicodestring4": _counted("<I", text=True),
    "unicodestring8": _counted("<Q", text=True),
    "stringnl": _line,
    "stringnl_noescape": _line,
    "unicodestringnl": _line,
    "decimalnl_short": _line,
    "decimalnl_long": _line,
    "floatnl": _line,
    "stringnl_noescape_pair": _line_pair,
}


def _build_table() -> list[tuple[str, object, object] | None]:
    """Opcode byte -> (name, argument reader, handler); None for bytes that are no opcode."""
    table: list[tuple[str, object, object] | None] = [None] * 256
    for op in pickletools.opcodes:
        reader = None if op.arg is None else _READERS.get(op.arg.name)
        if op.name == "FRAME":
            reader = _frame_length
        if (op.arg is not None and reader is None) or (
            op.name != "STOP" and op.name not in _HANDLERS
        ):
            continue  # an opcode newer than this scanner: left None, i.e. refused as unknown
        table[ord(op.code)] = (op.name, reader, _HANDLERS.get(op.name))
    return table


_TABLE = _build_table()


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
