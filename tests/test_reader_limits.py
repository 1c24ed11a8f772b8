"""Hostile `.bin`/`.pth` files (issue 10, section 1) are refused cheaply with one ValueError.

Each file of `reader_cases.CASES` is read in a child process capped at its warmed-up address
space + 256 MiB (`reader_isolation.ReaderWorker`): a crash, a MemoryError or any exception other
than one `ValueError` naming the file fails the test. On the landed reader these files crashed
the interpreter (SIGSEGV), allocated gigabytes, raised MemoryError/RuntimeError/zlib.error/
NotImplementedError, took seconds per file, or loaded (a BUILD rewriting an allow-listed
function, tensors copied once per view).
"""

import re
import sys
import zipfile

import pytest
from golden import golden_file
from reader_cases import CASES, build_on_function
from reader_isolation import ReaderWorker

from natjax.convert import pickle_scan, torch_tensors, torch_zip
from natjax.convert.torch_zip import MAX_BYTES_ENV, read_torch_zip


@pytest.fixture(scope="module")
def worker():
    with ReaderWorker(extra_mib=256) as w:
        yield w


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_one_value_error_in_bounded_memory(tmp_path, worker, name):
    build, pattern = CASES[name]
    path = build(tmp_path / f"{name}.pth")
    got = worker.read(path)
    assert worker.limited or not sys.platform.startswith("linux")  # the memory cap is on
    assert got["outcome"] == "ValueError", got
    assert got["message"].startswith(str(path)), got["message"]
    assert re.search(pattern, got["message"]), got["message"]


def test_golden_files_load_under_the_same_cap(worker):
    for name, file in [("nat_rand", "pytorch_model.bin"), ("dinat_rand", "original.pth")]:
        assert worker.read(golden_file(name, file))["outcome"] == "ok"


def test_build_cannot_rewrite_an_allow_listed_function(tmp_path):
    fn = torch_tensors._rebuild_tensor_v2
    before = (fn.__qualname__, fn.__defaults__, dict(fn.__dict__))
    with pytest.raises(ValueError, match=r"BUILD \(set state\) with a tuple on a global"):
        read_torch_zip(build_on_function(tmp_path / "build.pth"))
    assert (fn.__qualname__, fn.__defaults__, dict(fn.__dict__)) == before
    # What the unpickler hands out is a slotted wrapper: no __dict__, BUILD refused there too.
    factory = torch_tensors.Factory(fn, None)
    assert not hasattr(factory, "__dict__")
    with pytest.raises(ValueError, match="refusing to modify Factory"):
        factory.__setstate__((None, {"_fn": print}))


def test_max_bytes_parameter_and_environment(monkeypatch):
    golden = golden_file("nat_rand", "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: its storages hold \d+ bytes, more"):
        read_torch_zip(golden, max_bytes=10_000)
    monkeypatch.setenv(MAX_BYTES_ENV, "10_000")
    with pytest.raises(ValueError, match=rf"max_bytes=10000; raise .*\${MAX_BYTES_ENV}"):
        torch_zip.load_torch_state_dict(golden)
    assert read_torch_zip(golden, max_bytes=2**30)  # the argument wins over the environment
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=rf"\${MAX_BYTES_ENV}='lots'; expected a positive"):
        read_torch_zip(golden)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes="):
            read_torch_zip(golden, max_bytes=bad)


def test_compressed_real_checkpoint_is_refused_with_advice(tmp_path):
    # The golden file re-zipped with deflate (what `zip -r` would do): refused, not inflated.
    src = golden_file("nat_rand", "pytorch_model.bin")
    dst = tmp_path / "deflated.bin"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info))
    with pytest.raises(ValueError, match=r"deflated\.bin: zip record .* compressed \(method 8\)"):
        read_torch_zip(dst)


# ---------------------------------------------------------------------- the opcode pre-scan
KINDS = torch_tensors.SCAN_KINDS
SCAN_CASES = {
    # name: (pickle bytes, regex of the refusal)
    "unknown opcode": (b"\x80\x02\xff.", r"unknown opcode.*0xff at byte 2"),
    "no STOP": (b"\x80\x02N", r"ends without STOP"),
    "leftover stack": (b"\x80\x02NN.", r"STOP with 2 objects"),
    "underflow": (b"\x80\x02t.", r"no MARK|underflow"),
    "fence": (b"\x80\x02N(a.", r"underflow"),
    "unset memo": (b"\x80\x02h\x05.", r"memo index 5 was never set"),
    "text PUT far": (b"\x80\x02Np99999\n.", r"memo index 99999 is beyond"),
    "text PUT junk": (b"\x80\x02Npxyz\n.", r"not a number"),
    "negative length": (b"\x80\x02T\xff\xff\xff\xff.", r"negative length"),
    "frame too long": (b"\x80\x04\x95\xff\xff\x00\x00\x00\x00\x00\x00N.", r"declares 65535"),
    "protocol 9": (b"\x80\x09N.", r"protocol 9"),
    "self-append": (b"\x80\x02]\x94h\x00a.", r"holds itself"),
    "mutate nested": (b"\x80\x02]\x94\x85h\x00Na0.", r"already placed inside"),
    "odd dict": (b"\x80\x02(Nd.", r"odd number"),
    "NEWOBJ": (b"\x80\x02ctorch\nFloatStorage\n)\x81.", r"NEWOBJ instantiates a class"),
    "EXT": (b"\x80\x02\x82\x01.", r"refusing to load global via the copyreg"),
    "text persid": (b"\x80\x02P0\n.", r"text persistent ids"),
    "persid not tuple": (b"\x80\x02NQ.", r"persistent id is a none"),
    "REDUCE constant": (b"\x80\x02ctorch\nFloatStorage\n)R.", r"calls a global that is not"),
    "REDUCE non-tuple": (b"\x80\x02ccollections\nOrderedDict\nNR.", r"arguments are a none"),
    "STACK_GLOBAL": (b"\x80\x04\x8c\x02os\x8c\x06system\x93.", r"'os\.system'"),
    "STACK_GLOBAL int": (b"\x80\x04K\x01K\x02\x93.", r"needs two short strings"),
    "INST": (b"\x80\x02(ios\nsystem\n.", r"'os\.system'"),
    "out-of-band": (b"\x80\x05\x97.", r"out-of-band"),
    "BUILD on dict": (b"\x80\x02}}b.", r"BUILD .* on a dict is refused"),
    "deep list": (b"\x80\x02" + b"]" * 150 + b"a" * 149 + b".", r"nested more than 100"),
    "deep frozenset": (b"\x80\x04" + b"(" * 101 + b"\x91" * 101 + b".", r"nested more"),
}


@pytest.mark.parametrize("name", list(SCAN_CASES))
def test_prescan_refusals(name):
    data, pattern = SCAN_CASES[name]
    with pytest.raises(ValueError, match=pattern):
        pickle_scan.scan_pickle(data, KINDS, max_heap_bytes=2**20)


def test_prescan_heap_budget_and_summary():
    lists = b"\x80\x02(" + b"]" * 20_000 + b"l."
    summary = pickle_scan.scan_pickle(lists, KINDS, max_heap_bytes=2**22)
    assert summary.opcodes == 20_004 and summary.max_depth == 1
    with pytest.raises(ValueError, match=r"would build more than 1000000 bytes .* EMPTY_LIST"):
        pickle_scan.scan_pickle(lists, KINDS, max_heap_bytes=1_000_000)
    # A torch state dict with the OrderedDict `_metadata` attribute that BUILD sets passes.
    od = b"ccollections\nOrderedDict\n)R"
    state = b"\x80\x02" + od + b"}X\x09\x00\x00\x00_metadata" + od + b"sb."
    assert pickle_scan.scan_pickle(state, KINDS, max_heap_bytes=2**20).max_depth == 3
