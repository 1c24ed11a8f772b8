"""The opcode vocabulary of `pickle_scan`: symbols, the heap cost model, one handler per opcode
family, argument readers, and the byte -> (name, reader, handler) table.

Each handler applies an opcode to the scanner's symbolic stack (`pickle_scan._Scanner`): what
kind of object it builds, how deeply nested, and how much heap it would keep alive, following the
opcode definitions in CPython's `Lib/pickletools.py` and their semantics in `Modules/_pickle.c`.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from natjax.convert.pickle_scan import _Scanner

# Global kinds the caller's allow-list maps names to.
DICT_FACTORY = "dict_factory"  # collections.OrderedDict: returns a fresh, empty dict
TENSOR_FACTORY = "tensor_factory"  # torch._utils._rebuild_*: returns an array
CONSTANT = "constant"  # storage types, dtypes: not callable

_SMALL_INT_DIGITS = 18  # decimal ints this short are below 2**61 - 1: distinct hashes
_SHORT_STR = 64  # strings kept (as raw bytes) for STACK_GLOBAL: module and attribute names

# Estimated heap bytes (CPython 3.11, 64-bit, rounded up) kept alive by what an opcode builds.
SLOT = 8  # a stack/container pointer
COST = {
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
MEMO_COST = COST["memo"]
FIXED_HASH = frozenset({"str", "bytes", "smallint", "bool", "none"})


class Sym:
    """What the scanner knows about one object: its kind, nesting depth, whether it is nested."""

    __slots__ = ("kind", "depth", "nested", "raw")

    def __init__(self, kind: str, depth: int = 0, raw: object = None) -> None:
        self.kind = kind
        self.depth = depth
        self.nested = False
        self.raw = raw  # short str: its UTF-8 bytes; global: its allow-list kind


_HANDLERS: dict[str, object] = {}


def _handles(*names: str):
    """Register the decorated function as the handler of opcodes `names`."""

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
_SINGLETONS = {op: Sym(kind) for op, kind in _SINGLETON_KINDS.items()}
_EMPTY_KINDS = {"EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_SET": "set"}
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


@_handles("MARK")
def _mark(sc: _Scanner, op: str, arg) -> None:
    sc.fence = len(sc.stack)
    sc.marks.append(sc.fence)
    sc.charge(COST["mark"])


@_handles("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE")
def _put(sc: _Scanner, op: str, arg) -> None:
    memo = sc.memo
    if op == "MEMOIZE":
        index = len(memo)
    elif op == "PUT":
        index = sc.memo_index(arg)
    else:
        index = arg
    if index > len(memo):
        # The unpickler would size its memo table to 2 * index pointers.
        raise sc.fail(
            f"memo index {index} is beyond the {len(memo)} objects memoized so far "
            "(picklers number them from 0): a memory-amplification attack?"
        )
    if len(sc.stack) <= sc.fence:
        raise sc.fail("stack underflow: the pickle is corrupt")
    memo[index] = sc.stack[-1]
    sc.heap += MEMO_COST
    if sc.heap > sc.max_heap:
        raise sc.over_budget()


@_handles("BINGET", "LONG_BINGET", "GET")
def _get(sc: _Scanner, op: str, arg) -> None:
    index = sc.memo_index(arg) if op == "GET" else arg
    sym = sc.memo.get(index)
    if sym is None:
        raise sc.fail(f"memo index {index} was never set: the pickle is corrupt")
    sc.stack.append(sym)
    sc.heap += SLOT
    if sc.heap > sc.max_heap:
        raise sc.over_budget()


@_handles("BININT1", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE")
def _singleton(sc: _Scanner, op: str, arg) -> None:
    # Cached by CPython (small ints, None, bools, ()): only a pointer is added. The symbols
    # are shared too: leaves are never modified, and `nested` only matters for containers.
    sc.stack.append(_SINGLETONS[op])
    sc.heap += SLOT
    if sc.heap > sc.max_heap:
        raise sc.over_budget()


@_handles("BININT", "BININT2")
def _int32(sc: _Scanner, op: str, arg) -> None:
    sc.push(Sym("smallint"), COST["int"])


@_handles("INT", "LONG")
def _int_text(sc: _Scanner, op: str, arg) -> None:
    small = len(arg.rstrip(b"L").lstrip(b"-+")) <= _SMALL_INT_DIGITS
    sc.push(Sym("smallint" if small else "int"), COST["int"] + len(arg))


@_handles("LONG1", "LONG4")
def _long(sc: _Scanner, op: str, arg) -> None:
    n = arg[0]
    sc.push(Sym("smallint" if n <= 7 else "int"), COST["int"] + n)


@_handles("BINFLOAT", "FLOAT")
def _float(sc: _Scanner, op: str, arg) -> None:
    sc.push(Sym("float"), COST["float"])


@_handles("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8")
def _unicode(sc: _Scanner, op: str, arg) -> None:
    n, raw, ascii_only = arg
    # CPython stores a str in 1, 2 or 4 bytes per character: UTF-8 of n bytes needs at
    # most 4n (one astral character among ASCII), exactly n + 1 when ASCII.
    sc.push(Sym("str", raw=raw), COST["str"] + (n if ascii_only else 4 * n))


@_handles("UNICODE", "STRING")
def _text(sc: _Scanner, op: str, arg) -> None:
    sc.push(Sym("str"), COST["str"] + 4 * len(arg))


@_handles("BINSTRING", "SHORT_BINSTRING")
def _binstring(sc: _Scanner, op: str, arg) -> None:
    sc.push(Sym("str"), COST["str"] + 4 * arg[0])


@_handles("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8")
def _bytes(sc: _Scanner, op: str, arg) -> None:
    sc.push(Sym("bytes"), COST["bytes"] + arg[0])


@_handles("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3")
def _tuple(sc: _Scanner, op: str, arg) -> None:
    n = _TUPLE_SIZES.get(op)
    items = sc.pop_mark() if n is None else sc.pop_n(n)
    sc.new_container("tuple", items, COST["tuple"] + SLOT * len(items))


@_handles("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET")
def _empty(sc: _Scanner, op: str, arg) -> None:
    kind = _EMPTY_KINDS[op]
    sc.push(Sym(kind), COST[kind])


@_handles("LIST")
def _list(sc: _Scanner, op: str, arg) -> None:
    items = sc.pop_mark()
    sc.new_container("list", items, COST["list"] + COST["list_item"] * len(items))


@_handles("APPEND", "APPENDS")
def _append(sc: _Scanner, op: str, arg) -> None:
    items = [sc.pop()] if op == "APPEND" else sc.pop_mark()
    sc.nest(sc.mutable_target(("list",), op), items)
    sc.charge(COST["list_item"] * len(items))


@_handles("DICT")
def _dict(sc: _Scanner, op: str, arg) -> None:
    items = sc.pop_mark()
    sc.dict_items(items)
    sc.new_container("dict", items, COST["dict"] + COST["dict_item"] * len(items))


@_handles("SETITEM", "SETITEMS")
def _setitems(sc: _Scanner, op: str, arg) -> None:
    if op == "SETITEM":
        value, key = sc.pop(), sc.pop()
        items = [key, value]
    else:
        items = sc.pop_mark()
    target = sc.mutable_target(("dict", "odict"), op)
    sc.dict_items(items)
    sc.nest(target, items)
    sc.charge(COST[f"{target.kind}_item"] * (len(items) // 2))


@_handles("ADDITEMS", "FROZENSET")
def _set_items(sc: _Scanner, op: str, arg) -> None:
    items = sc.pop_mark()
    sc.count_hashed(items)
    cost = COST["set_item"] * len(items)
    if op == "ADDITEMS":
        sc.nest(sc.mutable_target(("set",), op), items)
        sc.charge(cost)
    else:
        sc.new_container("frozenset", items, COST["set"] + cost)


@_handles("POP", "POP_MARK", "DUP")
def _stack_op(sc: _Scanner, op: str, arg) -> None:
    if op == "DUP":
        sc.push(sc.top())
    elif op == "POP_MARK":
        sc.pop_mark()
    elif sc.marks and sc.marks[-1] == len(sc.stack):
        sc.marks.pop()  # POP right after MARK discards the mark (as _pickle.c does)
        sc.fence = sc.marks[-1] if sc.marks else 0
    else:
        sc.pop()


@_handles("GLOBAL", "INST")
def _global(sc: _Scanner, op: str, arg) -> None:
    module, name = (part.decode("utf-8", "replace") for part in arg)
    func = sc.global_sym(module, name)
    if op == "GLOBAL":
        sc.push(func)
    else:
        sc.call(func, sc.pop_mark(), op)


@_handles("STACK_GLOBAL")
def _stack_global(sc: _Scanner, op: str, arg) -> None:
    name, module = sc.pop(), sc.pop()
    sc.push(sc.global_sym(sc.text(module), sc.text(name)))


@_handles("REDUCE")
def _reduce(sc: _Scanner, op: str, arg) -> None:
    args = sc.pop()
    if args.kind != "tuple":
        raise sc.fail(f"REDUCE arguments are a {args.kind}, not a tuple")
    sc.call(sc.pop(), [args], op)


@_handles("OBJ")
def _obj(sc: _Scanner, op: str, arg) -> None:
    items = sc.pop_mark()
    if not items:
        raise sc.fail("OBJ without a class: the pickle is corrupt")
    sc.call(items[0], items[1:], op)


@_handles("NEWOBJ", "NEWOBJ_EX")
def _newobj(sc: _Scanner, op: str, arg) -> None:
    raise sc.fail(f"{op} instantiates a class; no allow-listed name is a class")


@_handles("EXT1", "EXT2", "EXT4")
def _ext(sc: _Scanner, op: str, arg) -> None:
    raise sc.fail(
        f"refusing to load global via the copyreg extension registry (code {arg}): "
        "torch.save never uses it"
    )


@_handles("BUILD")
def _build(sc: _Scanner, op: str, arg) -> None:
    state = sc.pop()
    target = sc.top()
    if target.kind != "odict" or target.nested or state.kind != "dict":
        # A BUILD on an allow-listed function or stand-in would rewrite it for the whole
        # process (e.g. `__defaults__` of `_rebuild_tensor_v2`).
        raise sc.fail(
            f"BUILD (set state) with a {state.kind} on a {target.kind} is refused: only a "
            "dict the file itself created may receive attributes"
        )
    sc.nest(target, [state])


@_handles("BINPERSID")
def _binpersid(sc: _Scanner, op: str, arg) -> None:
    pid = sc.pop()
    if pid.kind != "tuple":
        raise sc.fail(f"persistent id is a {pid.kind}, expected a storage tuple")
    pid.nested = True
    sc.persistent_ids += 1
    sc.push(Sym("storage"), COST["storage"])


@_handles("PERSID")
def _persid(sc: _Scanner, op: str, arg) -> None:
    raise sc.fail("text persistent ids (protocol 0) are not torch storages")


@_handles("PROTO")
def _proto(sc: _Scanner, op: str, arg) -> None:
    if arg > pickle.HIGHEST_PROTOCOL:
        raise sc.fail(f"pickle protocol {arg} is newer than this Python reads")


@_handles("FRAME")
def _frame(sc: _Scanner, op: str, arg) -> None:
    pass  # the frame length was checked against what remains by `_frame_length`


@_handles("NEXT_BUFFER", "READONLY_BUFFER")
def _buffer(sc: _Scanner, op: str, arg) -> None:
    raise sc.fail(f"opcode {op} (out-of-band buffer) is not used by torch.save")


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


TABLE = _build_table()
