"""`natjax convert`, `natjax export` and `natjax predict` end to end through `natjax.cli.main`."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden import golden_dir, golden_file
from PIL import Image
from safetensors.numpy import load_file

import natjax
from natjax.cli import main
from natjax.convert.torch_zip import load_torch_state_dict
from natjax.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, preprocess

FAST = ["--attention", "reference"]  # quickest to compile on CPU; backends are tested elsewhere


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def natjax_ckpt(tmp_path_factory) -> Path:
    """nat_rand converted from its original .pth through the CLI, with named classes."""
    dst = tmp_path_factory.mktemp("cli") / "nat_ckpt"
    folder = golden_dir("nat_rand")
    assert (
        main(
            [
                "convert",
                str(golden_file("nat_rand", "original.pth")),
                str(dst),
                "--config",
                str(folder),
            ]
        )
        == 0
    )
    meta = json.loads((dst / "config.json").read_text())
    meta["config"]["id2label"] = [f"class-{c}" for c in "abcdefghij"]
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


def test_convert_then_export_reproduces_hf_files(tmp_path, capsys, natjax_ckpt):
    code, out, err = run(capsys, "export", natjax_ckpt, tmp_path / "hf", "--format", "hf")
    assert code == 0 and "wrote hf export" in out and not err
    want = load_file(str(golden_file("nat_rand", "model.safetensors")))
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"]["1"] == "class-b"

    code, out, _ = run(capsys, "export", natjax_ckpt, tmp_path / "orig", "--format", "original")
    assert code == 0
    original = load_torch_state_dict(golden_file("nat_rand", "original.pth"))
    exported = load_torch_state_dict(tmp_path / "orig" / "original.pth")
    assert set(exported) == set(original)
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)

    # A Hugging Face folder converts directly too (config.json read from it).
    code, out, _ = run(capsys, "convert", golden_dir("dinat_rand"), tmp_path / "dinat")
    assert code == 0 and "dinat" in out
    assert (tmp_path / "dinat" / "natjax_model.safetensors").is_file()


@nnx.jit
def _probs(model, images):
    return jax.nn.softmax(model(images).logits, axis=-1)


def test_predict_end_to_end(tmp_path, capsys, natjax_ckpt):
    rng = np.random.default_rng(0)
    paths = [tmp_path / "wide.png", tmp_path / "tall.jpg"]
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (100, 64, 3), dtype=np.uint8)).save(paths[1])
    code, out, err = run(capsys, "predict", "--model", natjax_ckpt, *paths, "--size", 64, *FAST)
    assert code == 0 and not err
    lines = out.splitlines()
    assert len(lines) == 12 and lines[0] == str(paths[0]) and lines[6] == str(paths[1])
    names = [f"class-{c}" for c in "abcdefghij"]
    model = natjax.from_pretrained(natjax_ckpt, attention_implementation="reference")
    images = preprocess(paths, PreprocessConfig.timm(64))
    want = np.asarray(_probs(model, jnp.asarray(images)))
    for n in range(2):
        rows = [line.split() for line in lines[6 * n + 1 : 6 * n + 6]]
        assert [r[0] for r in rows] == ["1.", "2.", "3.", "4.", "5."]
        probs = [float(r[1]) for r in rows]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-3
        indices = [int(r[3].strip("()")) for r in rows]
        assert [r[2] for r in rows] == [names[i] for i in indices]
        assert indices == list(np.argsort(-want[n])[:5])
        np.testing.assert_allclose(probs, want[n][indices], atol=1e-4)


def test_preprocess_geometry_and_normalisation(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (120, 48), (128, 128, 128)).save(path)
    x = preprocess(path, PreprocessConfig.timm(32))[0]
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    want = (128 / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(x, np.broadcast_to(want, x.shape), atol=1e-5)
    # A mirror-symmetric 98x40 image: shorter side 40 -> 18, width 98 -> 44, centre crop 16
    # leaves 14 columns each side, so the crop stays symmetric.
    ramp = (np.abs(np.arange(98) - 48.5) * 5).astype(np.uint8)
    Image.fromarray(np.tile(ramp[None, :, None], (40, 1, 3))).save(tmp_path / "ramp.png")
    y = preprocess(tmp_path / "ramp.png", PreprocessConfig.timm(16))[0]
    np.testing.assert_allclose(y[:, :, 0], y[:, ::-1, 0], atol=0.02)
    assert y[:, 0, 0].mean() > y[:, 7, 0].mean() + 1  # edges bright, centre dark: really cropped
    with pytest.raises(ValueError, match=r"size=\(0, 0\)"):
        PreprocessConfig.timm(0)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, natjax_ckpt):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png")
    garbage_bin = tmp_path / "garbage.bin"
    garbage_bin.write_bytes(b"definitely not a torch file")
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    lone = tmp_path / "lone.pth"  # no config.json beside it
    shutil.copy(golden_file("nat_rand", "original.pth"), lone)
    cases = [
        (["predict", "--model", natjax_ckpt, tmp_path / "missing.png"], "image not found"),
        (["predict", "--model", natjax_ckpt, garbage], "cannot read image"),
        (["predict", "--model", tmp_path / "no_model", image], "checkpoint not found"),
        (["predict", "--model", image, image, "--config", "nat_mini"], "not a readable"),
        (["convert", tmp_path / "nothing", tmp_path / "out"], "checkpoint not found"),
        (["convert", lone, tmp_path / "o"], "pass --config ("),  # the flag, not config=
        (["convert", garbage, tmp_path / "o", "--config", "nat_mini"], "not a readable"),
        (["convert", garbage_bin, tmp_path / "o", "--config", "nat_mini"], "not a zip"),
        (["export", natjax_ckpt, tmp_path / "o", "--config", "nat_giant"], "Unknown preset"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.count("\n") == 1 and message in err, (argv, err)
        assert err.startswith(f"natjax {argv[0]}: error: ")
    with pytest.raises(SystemExit) as info:
        main(["export", str(natjax_ckpt), str(tmp_path / "o"), "--format", "onnx"])
    assert info.value.code == 2


def test_cli_errors_name_flags_not_python_keywords():
    from natjax.cli import _flag_names, build_parser, cli_message

    flags = _flag_names(build_parser(), "convert")
    assert flags["state_dict_key"] == "--state-dict-key"
    assert cli_message("pass config= (a preset) or state_dict_key='model'", flags) == (
        "pass --config (a preset) or --state-dict-key 'model'"
    )
    # Dotted config keys (set with --set), unknown keywords and comparisons stay as they are.
    same = "run.init_from='x': num_labels=3 differs; a==b"
    assert cli_message(same, flags) == same


def test_ctrl_c_in_any_command_exits_130_in_one_line(monkeypatch, capsys):
    import natjax.predict

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(natjax.predict, "_run", interrupted)
    assert main(["predict", "--model", "m", "x.png"]) == 130
    assert capsys.readouterr().err == "natjax predict: interrupted\n"
