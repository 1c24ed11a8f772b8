"""`natjax.preprocess`: every input kind, the checkpoint's settings (preprocessor_config.json or
timm's transform), crop-before-resize equal to resize-then-crop, bounded pixels, and the errors."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from golden import golden_dir
from PIL import Image

import natjax
from natjax.models.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    resize_and_crop,
)
from natjax.train import augment

RNG = np.random.default_rng(0)


def _naive(img: Image.Image, size: int, crop_pct: float) -> Image.Image:
    """timm's eval transform written plainly: resize the whole image, then centre crop."""
    short = int(math.floor(size / crop_pct))
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("hw", [(70, 90), (100, 64), (333, 500), (31, 1000), (1, 300), (64, 64)])
def test_crop_first_equals_resize_then_crop(hw):
    img = Image.fromarray(RNG.integers(0, 256, (*hw, 3), dtype=np.uint8))
    got = np.asarray(resize_and_crop(img, PreprocessConfig.timm(64)), np.int16)
    want = np.asarray(_naive(img, 64, 0.875), np.int16)
    assert np.abs(got - want).max() <= 1  # one level of uint8 rounding in the two-pass resample
    # Training's eval split uses the same function.
    np.testing.assert_array_equal(augment.eval_transform(np.asarray(img), 64, 0.875), got)


def test_every_input_kind_gives_the_same_batch(tmp_path):
    image = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    cfg = PreprocessConfig.timm(32)
    want = natjax.preprocess(path, cfg)
    assert want.shape == (1, 32, 32, 3) and want.dtype == np.float32
    for same in (Image.fromarray(image), image, image.transpose(2, 0, 1), jnp.asarray(image),
                 str(path)):  # fmt: skip
        np.testing.assert_array_equal(natjax.preprocess(same, cfg), want)
    batch = natjax.preprocess(np.stack([image, image[::-1]]), cfg)
    assert batch.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(batch[:1], want)
    mixed = natjax.preprocess([path, image[::-1]], cfg)
    np.testing.assert_array_equal(mixed, batch)
    # Float [0, 1] input is resampled in float (no uint8 clipping between the two passes), so
    # compare on a smooth image, where bicubic does not overshoot.
    yy, xx = np.mgrid[0:40, 0:56]
    smooth = np.stack([xx * 4, yy * 5, xx + yy * 2], -1).astype(np.uint8)
    floats = natjax.preprocess(smooth.astype(np.float32) / 255, cfg)
    np.testing.assert_allclose(floats, natjax.preprocess(smooth, cfg), atol=1.5 / 255 / 0.224)
    grey = natjax.preprocess(image[..., 0], cfg)
    pixels = grey * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-6)


def test_bad_inputs_are_clear_errors(tmp_path):
    cfg = PreprocessConfig.timm(32)
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\]"):
        natjax.preprocess(np.full((8, 8, 3), 255.0, np.float32), cfg)
    with pytest.raises(ValueError, match="uint8 or float, got int16"):
        natjax.preprocess(np.zeros((8, 8, 3), np.int16), cfg)
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 5\)"):
        natjax.preprocess(np.zeros((8, 8, 5), np.uint8), cfg)
    with pytest.raises(FileNotFoundError, match="image not found"):
        natjax.preprocess(tmp_path / "missing.png", cfg)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        natjax.preprocess(tmp_path / "junk.png", cfg)
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="300x200 = 60000 pixels exceeds max_pixels=50000"):
        natjax.preprocess(tmp_path / "big.png", cfg, max_pixels=50_000)


def test_thin_image_costs_what_the_output_costs(tmp_path):
    # Issue 10 sec. 4: an 8000x1 PNG used to be resized to 2,048,000 x 256 before the crop.
    Image.new("RGB", (8000, 1), (200, 10, 10)).save(tmp_path / "thin.png")
    x = natjax.preprocess(tmp_path / "thin.png")
    want = (np.array([200, 10, 10]) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert x.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(x[0, 112, 112], want, atol=1e-5)


def test_settings_from_hf_configs_and_checkpoints(tmp_path):
    vit = PreprocessConfig.from_hf({"do_resize": True, "size": 224, "resample": 2,
                                    "image_mean": [0.5] * 3, "image_std": [0.5] * 3})  # fmt: skip
    assert (vit.resize, vit.size, vit.interpolation, vit.mean) == ("exact", (224, 224), "bilinear",
                                                                   (0.5,) * 3)  # fmt: skip
    timm = PreprocessConfig.from_hf({"size": {"shortest_edge": 384}, "crop_pct": 0.9})
    assert (timm.resize, timm.size, timm.crop_pct) == ("shorter", (384, 384), 0.9)
    crop = PreprocessConfig.from_hf({"size": {"shortest_edge": 256}, "do_center_crop": True,
                                     "crop_size": {"height": 224, "width": 224}})  # fmt: skip
    assert crop.size == (224, 224) and crop.crop_pct == 224 / 256
    for cfg in (vit, timm, PreprocessConfig.timm()):
        assert PreprocessConfig.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ValueError, match="`size`="):
        PreprocessConfig.from_hf({"size": "big"})
    # A checkpoint folder's preprocessor_config.json reaches the model and is saved with it.
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((golden_dir("nat_rand") / name).read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps(vit.to_hf()))
    model = natjax.from_pretrained(folder)
    assert model.preprocessing == vit
    image = RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    np.testing.assert_array_equal(natjax.preprocess(image, model), natjax.preprocess(image, vit))
    np.testing.assert_array_equal(natjax.preprocess(image, folder), natjax.preprocess(image, vit))
    model.save_pretrained(tmp_path / "saved")
    assert natjax.from_pretrained(tmp_path / "saved").preprocessing == vit
    plain = natjax.from_pretrained(golden_dir("nat_rand"))
    assert plain.preprocessing is None
    np.testing.assert_array_equal(natjax.preprocess(image, plain), natjax.preprocess(image))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        # Nested past Python's recursion limit: json.loads raised RecursionError here before.
        (b'{"size": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested 100001 levels deep"),
        (b'{"size": "\xff"}', "not UTF-8 text"),
        (b"[224]", "does not hold a JSON object"),
        (b"{size: 224}", "not valid JSON"),
    ],
)
def test_hostile_preprocessor_config_is_one_value_error(tmp_path, content, match):
    path = tmp_path / "preprocessor_config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: {match}"):
        PreprocessConfig.from_folder(tmp_path)
