"""Checkpoint folders (issue 10, section 1): a sharded index cannot make us read files outside
the folder, and integer/bool weights are refused instead of being cast into float parameters."""

import json
import os
import shutil

import numpy as np
import pytest
from golden import golden_dir
from reader_cases import deep_key
from safetensors.numpy import load_file, save_file

import natjax
from natjax.cli import main
from natjax.convert import checkpoint

INDEX = "model.safetensors.index.json"


def _sharded(folder, weights: dict, names: tuple[str, str]) -> dict:
    """Write `weights` as two shards called `names` (paths relative to `folder`) + the index."""
    keys = sorted(weights)
    halves = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2 :]}
    weight_map = {}
    for name, part in halves.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: weights[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


@pytest.fixture(scope="module")
def golden_weights():
    return load_file(str(golden_dir("nat_rand") / "model.safetensors"))


def _folder(tmp_path, name="ckpt"):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    shutil.copy(golden_dir("nat_rand") / "config.json", folder / "config.json")
    return folder


def test_sharded_checkpoint_loads(tmp_path, golden_weights):
    folder = _folder(tmp_path)
    _sharded(
        folder, golden_weights, ("model-00001-of-00002.safetensors", "sub/model-2.safetensors")
    )
    model = natjax.from_pretrained(folder)
    got = checkpoint.nnx_flat_state(model)
    assert len(got) == len(golden_weights)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_sharded_index_cannot_name_files_outside_the_folder(tmp_path, golden_weights, kind):
    folder = _folder(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # A valid shard outside the folder: the landed reader loaded it without a word.
    if kind == "dotdot":
        names = ("a.safetensors", "../elsewhere/b.safetensors")
    elif kind == "absolute":
        names = ("a.safetensors", str(outside / "b.safetensors"))
    else:
        names = ("a.safetensors", "b.safetensors")
    weight_map = _sharded(folder, golden_weights, names)
    if kind == "symlink":
        (folder / "b.safetensors").rename(outside / "b.safetensors")
        os.symlink(outside / "b.safetensors", folder / "b.safetensors")
    assert names[1] in weight_map.values()
    with pytest.raises(ValueError, match=r"index\.json: .*(outside the checkpoint folder|'\.\.')"):
        natjax.from_pretrained(folder)


def test_hugging_face_cache_links_into_blobs_are_followed(tmp_path, golden_weights):
    # <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays out its cache.
    repo = tmp_path / "models--x--nat"
    snapshot = _folder(repo / "snapshots", "0123abc")
    (repo / "blobs").mkdir()
    _sharded(snapshot, golden_weights, ("s1.safetensors", "s2.safetensors"))
    for name in ("s1.safetensors", "s2.safetensors"):
        blob = repo / "blobs" / f"hash-{name}"
        (snapshot / name).rename(blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    assert len(checkpoint.nnx_flat_state(natjax.from_pretrained(snapshot))) == len(golden_weights)
    # ... but a link from the snapshot to anywhere else in the cache is still refused.
    stray = repo / "refs-elsewhere.safetensors"
    (repo / "blobs" / "hash-s2.safetensors").rename(stray)
    os.remove(snapshot / "s2.safetensors")
    os.symlink(stray, snapshot / "s2.safetensors")
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        natjax.from_pretrained(snapshot)


def test_index_must_agree_with_its_shards(tmp_path, golden_weights):
    folder = _folder(tmp_path)
    weight_map = _sharded(folder, golden_weights, ("a.safetensors", "b.safetensors"))
    key = next(k for k, v in weight_map.items() if v == "a.safetensors")
    (folder / INDEX).write_text(json.dumps({"weight_map": {**weight_map, key: "b.safetensors"}}))
    with pytest.raises(ValueError, match=rf"places \['{key}'\] .* in 'b\.safetensors'"):
        natjax.from_pretrained(folder)
    (folder / INDEX).write_text(json.dumps({"weight_map": {key: ["a.safetensors"]}}))
    with pytest.raises(ValueError, match="do not name a shard file"):
        natjax.from_pretrained(folder)
    (folder / INDEX).write_text(json.dumps({"weight_map": {key: "missing.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        natjax.from_pretrained(folder)
    (folder / INDEX).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"index\.json: JSON nested 100000 levels deep"):
        natjax.from_pretrained(folder)
    (folder / INDEX).write_bytes(b'{"weight_map": {"a": "\xff"}}')
    with pytest.raises(ValueError, match=r"index\.json: not UTF-8"):
        natjax.from_pretrained(folder)


# ------------------------------------------------------------------------ non-float weights
def _natjax_checkpoint(tmp_path, transform=None):
    """A natjax-layout checkpoint of the nat_rand config with zero weights (nothing initialised)."""
    config, arch = checkpoint.resolve_config(golden_dir("nat_rand") / "config.json")
    model = checkpoint.instantiate_architecture(config, arch, abstract=True)
    state = {
        "/".join(map(str, path)): np.zeros(var.get_value().shape, var.get_value().dtype)
        for path, var in checkpoint.nnx.to_flat_state(checkpoint._persistent_state(model))
    }
    if transform:
        transform(state)
    folder = tmp_path / "natjax"
    folder.mkdir(exist_ok=True)
    meta = {
        "format": "natjax",
        "format_version": 1,
        "architecture": arch,
        "config": checkpoint.config_to_dict(config),
    }
    (folder / "config.json").write_text(json.dumps(meta))
    save_file(state, str(folder / checkpoint.NATJAX_WEIGHTS_NAME))
    return folder


def test_natjax_layout_refuses_integer_and_bool_weights(tmp_path):
    assert natjax.from_pretrained(_natjax_checkpoint(tmp_path))  # zeros in float32: loads

    def corrupt(state):
        qkv = next(k for k in state if k.endswith("query/kernel"))
        norm = next(k for k in state if k.endswith("layernorm/scale"))
        state[qkv] = state[qkv].astype(np.int64)
        state[norm] = state[norm].astype(bool)

    with pytest.raises(ValueError, match=r"2 weights have the wrong dtype: .*int64.*bool"):
        natjax.from_pretrained(_natjax_checkpoint(tmp_path, corrupt))


def test_hf_layout_refuses_integer_weights(tmp_path, golden_weights):
    folder = _folder(tmp_path)
    weights = dict(golden_weights)
    weights["classifier.bias"] = weights["classifier.bias"].astype(np.int64)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 weights have the wrong dtype: \['classifier\.bias"):
        natjax.from_pretrained(folder)


# ------------------------------------------------------------- the public entry points
def test_from_pretrained_and_cli_refuse_the_deep_key_file(tmp_path, capsys):
    # 200,000-deep dict key: the landed reader died with SIGSEGV here (hashing it in C).
    path = deep_key(tmp_path / "deep.pth")
    config = golden_dir("nat_rand") / "config.json"
    with pytest.raises(ValueError, match=r"deep\.pth: an object is nested more than 100 levels"):
        natjax.from_pretrained(path, config=config)
    assert main(["convert", str(path), str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "natjax convert: error:" in err and "nested more" in err
