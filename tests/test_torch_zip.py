"""The PyTorch-free `torch.save` reader: golden files, crafted archives, and refusal of code.

Crafted archives are pickled by the standard `pickle` module against a tiny fake `torch`
package that exists only inside these tests (installed with monkeypatch, so it is gone
afterwards); this gives byte streams with the same globals and persistent ids torch writes.
"""

import collections
import copyreg
import io
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from golden import golden_dir, golden_file
from reader_cases import Ops, write_torch_zip
from safetensors.numpy import load_file

from natjax.convert import torch_tensors, torch_zip
from natjax.convert.torch_zip import (
    load_torch_state_dict,
    read_torch_zip,
    save_torch_state_dict,
    select_state_dict,
)
from natjax.convert.zip_records import StoredZip


# ------------------------------------------------------------------------ fake torch (tests)
class _FakeStorage:
    """What torch's pickler sees for a storage: persistent id fields."""

    def __init__(self, storage_cls, key: str, data: bytes, numel: int):
        self.storage_cls, self.key, self.data, self.numel = storage_cls, key, data, numel


class _FakeTensor:
    def __init__(self, storage, offset, size, stride, parameter=False):
        self.args = (storage, offset, tuple(size), tuple(stride))
        self.parameter = parameter

    def __reduce__(self):
        torch = sys.modules["torch"]
        storage, offset, size, stride = self.args
        rebuilt = _FakeTensor(storage, offset, size, stride)
        if self.parameter:
            return (torch._utils._rebuild_parameter, (rebuilt, True, collections.OrderedDict()))
        return (
            torch._utils._rebuild_tensor_v2,
            (storage, offset, size, stride, False, collections.OrderedDict()),
        )


@pytest.fixture
def fake_torch(monkeypatch):
    """Install a stand-in `torch` package whose names pickle exactly like torch's."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: only pickled")

    def _rebuild_parameter(*args):
        raise AssertionError("never called: only pickled")

    for fn in (_rebuild_tensor_v2, _rebuild_parameter):
        fn.__module__, fn.__qualname__ = "torch._utils", fn.__name__
        setattr(utils, fn.__name__, fn)
    torch._utils = utils
    for name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def craft_zip(path: Path, obj, *, byteorder: str | None = "little", protocol: int = 2) -> None:
    """Pickle `obj` (with `_FakeTensor`s) the way torch.save lays out its zip."""
    storages: dict[str, _FakeStorage] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _FakeStorage):
                storages[o.key] = o
                return ("storage", o.storage_cls, o.key, "cpu", o.numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=protocol).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, s in storages.items():
            z.writestr(f"archive/data/{key}", s.data)


def storage_of(torch, arr: np.ndarray, name: str, key: str, byteorder: str = "<"):
    flat = np.ascontiguousarray(arr).reshape(-1)
    data = flat.astype(flat.dtype.newbyteorder(byteorder)).tobytes()
    return _FakeStorage(getattr(torch, name), key, data, flat.size)


# ------------------------------------------------------------------------------- golden files
@pytest.mark.parametrize("name", ["nat_rand", "dinat_rand", "nat_backbone_rand"])
def test_golden_bin_equals_safetensors(name):
    folder = golden_dir(name)
    got = load_torch_state_dict(golden_file(name, "pytorch_model.bin"))
    want = load_file(str(folder / "model.safetensors"))
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert "torch" not in sys.modules


@pytest.mark.parametrize("name", ["nat_rand", "dinat_rand"])
def test_golden_original_pth_parses(name):
    state = load_torch_state_dict(golden_file(name, "original.pth"))
    assert "levels.0.blocks.0.attn.qkv.weight" in state and "head.weight" in state
    hf = load_file(str(golden_dir(name) / "model.safetensors"))
    # The original file holds the same numbers: its classifier equals the HF classifier.
    np.testing.assert_array_equal(state["head.weight"], hf["classifier.weight"])
    # Each tensor is a read-only view of its storage's bytes (no copy), C-contiguous as saved.
    assert all(v.flags.c_contiguous and not v.flags.writeable for v in state.values())


# --------------------------------------------------------------------------------- security
class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    payload = pickle.dumps({"weight": _Evil(marker)}, protocol=protocol)
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(
        ValueError, match=rf"refusing to load global '{os.system.__module__}.system'"
    ):
        load_torch_state_dict(evil)
    assert not marker.exists()


def test_extension_registry_opcode_is_refused(tmp_path):
    # EXT1/EXT2/EXT4 name globals through copyreg's registry; they must hit find_class too.
    code = 0x7FFF0001
    copyreg.add_extension(os.system.__module__, "system", code)
    try:
        payload = pickle.dumps({"weight": _Evil(tmp_path / "pwned")}, protocol=2)
        assert pickle.EXT4 in payload
        path = tmp_path / "ext.pth"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
        with pytest.raises(ValueError, match="refusing to load global"):
            load_torch_state_dict(path)
    finally:
        copyreg.remove_extension(os.system.__module__, "system", code)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "module,name", [("builtins", "eval"), ("torch", "load"), ("numpy", "frombuffer")]
)
def test_other_globals_are_refused(tmp_path, module, name):
    # GLOBAL opcode written by hand: a name on no allow-list, even from torch itself.
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R."
    path = tmp_path / "g.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(ValueError, match=rf"'{module}\.{name}'"):
        read_torch_zip(path)


# ------------------------------------------------------------------------------ bad files
def test_empty_truncated_nonzip_and_missing_pickle(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_torch_state_dict(empty)

    truncated = tmp_path / "truncated.bin"
    data = (golden_file("nat_rand", "pytorch_model.bin")).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a zip"):
        load_torch_state_dict(truncated)

    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a zip"):
        load_torch_state_dict(text)

    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="legacy"):
        load_torch_state_dict(legacy)

    nopkl = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(nopkl, "w") as z:
        z.writestr("archive/data/0", b"\0" * 8)
    with pytest.raises(ValueError, match="data.pkl"):
        load_torch_state_dict(nopkl)

    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "missing.bin")


def test_short_storage_record_and_bad_pickle(tmp_path, fake_torch):
    arr = np.arange(6, dtype=np.float32)
    s = storage_of(fake_torch, arr, "FloatStorage", "0")
    s.data = s.data[:-4]  # one element short
    path = tmp_path / "short.pth"
    craft_zip(path, {"w": _FakeTensor(s, 0, (6,), (1,))})
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_torch_state_dict(path)

    cut = tmp_path / "cut.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cut, "w") as dst:
        dst.writestr("archive/data.pkl", src.read("archive/data.pkl")[:12])
    with pytest.raises(ValueError, match=r"cut\.pth: .*truncated"):
        load_torch_state_dict(cut)


# ------------------------------------------------------------------- dtypes, views, nesting
@pytest.mark.parametrize(
    "storage,dtype",
    [("HalfStorage", np.float16), ("BFloat16Storage", ml_dtypes.bfloat16)],
)
def test_half_precision_round_trip(tmp_path, fake_torch, storage, dtype):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((3, 5)).astype(dtype)
    path = tmp_path / "half.pth"
    craft_zip(
        path, {"w": _FakeTensor(storage_of(fake_torch, arr, storage, "0"), 0, (3, 5), (5, 1))}
    )
    got = load_torch_state_dict(path)["w"]
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(np.uint16), arr.view(np.uint16))


def test_offset_stride_shared_storage_parameter_and_nesting(tmp_path, fake_torch):
    base = np.arange(24, dtype=np.int64)
    s = storage_of(fake_torch, base, "LongStorage", "7")
    obj = {
        "epoch": 3,
        "model": collections.OrderedDict(
            # transposed 4x5 view starting at element 2 (non-contiguous, torch `.t()`)
            t=_FakeTensor(s, 2, (5, 4), (1, 5)),
            # the same storage again, contiguous slice, pickled as an nn.Parameter
            p=_FakeTensor(s, 20, (2, 2), (2, 1), parameter=True),
        ),
    }
    path = tmp_path / "nested.pth"
    craft_zip(path, obj)
    raw = read_torch_zip(path)
    assert raw["epoch"] == 3
    state, key = select_state_dict(raw)
    assert key == "model"
    np.testing.assert_array_equal(state["t"], base[2:22].reshape(4, 5).T)
    np.testing.assert_array_equal(state["p"], base[20:24].reshape(2, 2))
    # Both are views of the one storage (as in torch), read-only so that no edit aliases.
    assert np.shares_memory(state["t"], state["p"])
    assert not state["t"].flags.writeable and not state["p"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        state["p"][0, 0] = -1
    with pytest.raises(ValueError, match="key 'ema'"):
        select_state_dict(raw, "ema")


def test_big_endian_and_out_of_bounds_view(tmp_path, fake_torch):
    arr = np.linspace(-1, 1, 6, dtype=np.float32)
    path = tmp_path / "big.pth"
    s = storage_of(fake_torch, arr, "FloatStorage", "0", byteorder=">")
    craft_zip(path, {"w": _FakeTensor(s, 0, (2, 3), (3, 1))}, byteorder="big")
    np.testing.assert_array_equal(load_torch_state_dict(path)["w"], arr.reshape(2, 3))

    bad = tmp_path / "oob.pth"
    s = storage_of(fake_torch, arr, "FloatStorage", "0")
    craft_zip(bad, {"w": _FakeTensor(s, 1, (2, 3), (3, 1))})
    with pytest.raises(ValueError, match="reads past its storage"):
        load_torch_state_dict(bad)


def test_writer_round_trip_and_layout(tmp_path):
    state = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones((2,), ml_dtypes.bfloat16),
        "c": np.arange(3, dtype=np.int64),
        "d": np.zeros((0, 4), np.float16),
    }
    path = tmp_path / "w.pth"
    save_torch_state_dict(state, path)
    got = load_torch_state_dict(path)
    assert list(got) == list(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    # Same records and globals as a real torch.save file, payloads 64-byte aligned.
    with zipfile.ZipFile(golden_file("nat_rand", "original.pth")) as golden:
        golden_names = golden.namelist()
    strip = lambda names: {n.split("/", 1)[1] for n in names if "/data/" not in n}
    with zipfile.ZipFile(path) as z:
        assert strip(z.namelist()) == strip(golden_names)
        for info in z.infolist():
            z.fp.seek(info.header_offset + 26)
            n, e = np.frombuffer(z.fp.read(4), "<u2")
            assert (info.header_offset + 30 + int(n) + int(e)) % 64 == 0


def test_build_opcode_cannot_poison_the_allow_list(tmp_path):
    # GLOBAL torch.FloatStorage, {"dtype": 1}, BUILD: would rewrite the shared stand-in's
    # __dict__ and break every later load in the process.
    payload = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
    path = tmp_path / "build.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(ValueError, match=r"build\.pth: BUILD .* on a global is refused"):
        read_torch_zip(path)
    # Second lock, behind the pre-scan: the stand-ins themselves refuse BUILD.
    with StoredZip(path) as archive:
        load = torch_tensors.Load(archive, "archive/", "little", 2**20)
        with pytest.raises(ValueError, match="refusing to modify _StorageType"):
            torch_zip._RestrictedUnpickler(io.BytesIO(payload), load).load()
    assert torch_tensors.CONSTANTS[("torch", "FloatStorage")].dtype == np.float32
    assert load_torch_state_dict(golden_file("nat_rand", "pytorch_model.bin"))


def test_expanded_views_are_views_and_bounded(tmp_path, fake_torch):
    # torch.save of `x.expand(...)` stores one storage with zero strides: read as a view.
    s = storage_of(fake_torch, np.arange(3, dtype=np.float32), "FloatStorage", "0")
    path = tmp_path / "expand_small.pth"
    craft_zip(path, {"w": _FakeTensor(s, 0, (4, 3), (0, 1))})
    w = load_torch_state_dict(path)["w"]
    np.testing.assert_array_equal(w, np.broadcast_to(np.arange(3, dtype=np.float32), (4, 3)))
    assert w.strides == (0, 4)
    # 1 element viewed as 1000x1000 (4 MB from a ~500-byte file): any caller copying it would
    # amplify a tiny file into an unbounded allocation, so the viewed bytes are bounded too.
    s = storage_of(fake_torch, np.ones(1, np.float32), "FloatStorage", "0")
    path = tmp_path / "expand.pth"
    craft_zip(path, {"w": _FakeTensor(s, 0, (1000, 1000), (0, 0))})
    with pytest.raises(ValueError, match=r"expand\.pth: the tensors view 4000000 bytes"):
        load_torch_state_dict(path)


def test_state_dict_metadata_attribute_loads(tmp_path, fake_torch):
    # `module.state_dict()` is an OrderedDict carrying a `_metadata` attribute, which pickle
    # restores with BUILD: the one BUILD the pre-scan allows (on a dict the file created).
    sd = collections.OrderedDict(
        w=_FakeTensor(
            storage_of(fake_torch, np.arange(2.0, dtype=np.float32), "FloatStorage", "0"),
            0,
            (2,),
            (1,),
        )
    )
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    path = tmp_path / "meta.pth"
    craft_zip(path, {"model": sd, "epoch": 1})
    assert pickle.BUILD in zipfile.ZipFile(path).read("archive/data.pkl")
    raw = read_torch_zip(path)
    assert raw["model"]._metadata == {"": {"version": 1}}
    np.testing.assert_array_equal(load_torch_state_dict(path)["w"], [0.0, 1.0])


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_rebuild_tensor_v3_untyped_storage(tmp_path, byteorder):
    # torch >= 2 style: an untyped (byte) storage and the dtype as an explicit argument (the
    # landed reader ignored the byte order here).
    values = np.array([[1.5, -2.0, 3.25]], np.float32)
    data = values.astype(values.dtype.newbyteorder("<" if byteorder == "little" else ">"))
    ops = Ops().raw(b"}").str_("w").global_("torch._utils", "_rebuild_tensor_v3")
    ops.raw(b"((").str_("storage").global_("torch", "UntypedStorage").str_("0").str_("cpu")
    ops.int_(12).raw(b"tQ").int_(0).ints_tuple((1, 3)).ints_tuple((3, 1)).raw(b"\x89")
    ops.global_("collections", "OrderedDict").raw(b")R").global_("torch", "float32")
    ops.raw(b"tRs")
    path = tmp_path / "v3.pth"
    write_torch_zip(path, ops.bytes(), {"0": data.tobytes()}, byteorder=byteorder)
    got = load_torch_state_dict(path)["w"]
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, values)
