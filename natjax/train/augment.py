"""Image augmentations: per-image ops on the host (PIL/numpy) and batch ops on the device.

Host (inside the grain pipeline, one `np.random.Generator` per example so results do not depend
on worker count or process count): random-resized-crop, horizontal flip, RandAugment, eval
resize + centre crop. Device (inside the jitted train step, keyed by the step's RNG so they are
reproducible and see the whole global batch): mixup/cutmix and random erasing. This follows
timm's ImageNet recipe used by NAT (Hassani et al. 2023, Appendix A / DeiT).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from natjax.models.preprocessing import PreprocessConfig, resize_and_crop

_RESAMPLE = Image.BICUBIC


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 HWC (C = 1 or 3) -> RGB PIL image."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(image[..., :3]))


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Image.Image:
    """torchvision's RandomResizedCrop: 10 tries at a random area/aspect, else centre crop."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return img.resize((size, size), _RESAMPLE, box=(x0, y0, x0 + cw, y0 + ch))
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), _RESAMPLE, box=(x0, y0, x0 + cw, y0 + ch))


def resize_center_crop(img: Image.Image, size: int, crop_pct: float) -> Image.Image:
    """Eval transform: resize the short side to size / crop_pct, then centre-crop size x size.

    The same function as `natjax.preprocess` (timm's rounding, bicubic; only the crop region is
    resampled, so thin or huge images cost what the output costs).
    """
    return resize_and_crop(img, PreprocessConfig.timm(size, crop_pct))


# --- RandAugment (Cubuk et al. 2020; timm "rand-m9-mstd0.5-inc1" op set, increasing variant).
_FILL = (128, 128, 128)


def _signed(level: float, rng: np.random.Generator) -> float:
    return level if rng.random() < 0.5 else -level


def _affine(img: Image.Image, matrix: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


def _op(name: str, img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    """Applies one op at magnitude m in [0, 10] (timm's level scaling)."""
    f = m / 10.0
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(_signed(30.0 * f, rng), resample=Image.BILINEAR, fillcolor=_FILL)
    if name == "PosterizeIncreasing":
        return ImageOps.posterize(img, max(1, 4 - int(4 * f)))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - int(256 * f))
    if name == "SolarizeAdd":
        arr = np.asarray(img).astype(np.int32)
        add = int(110 * f)
        return Image.fromarray(
            np.where(arr < 128, np.minimum(arr + add, 255), arr).astype(np.uint8)
        )
    enhance = {
        "ColorIncreasing": ImageEnhance.Color,
        "ContrastIncreasing": ImageEnhance.Contrast,
        "BrightnessIncreasing": ImageEnhance.Brightness,
        "SharpnessIncreasing": ImageEnhance.Sharpness,
    }
    if name in enhance:
        return enhance[name](img).enhance(1.0 + _signed(0.9 * f, rng))
    if name == "ShearX":
        return _affine(img, (1, _signed(0.3 * f, rng), 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, _signed(0.3 * f, rng), 1, 0))
    if name == "TranslateXRel":
        return _affine(img, (1, 0, _signed(0.45 * f, rng) * img.size[0], 0, 1, 0))
    if name == "TranslateYRel":
        return _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * f, rng) * img.size[1]))
    raise ValueError(f"unknown RandAugment op {name!r}")


RANDAUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def rand_augment(
    img: Image.Image, rng: np.random.Generator, n: int, m: float, mstd: float
) -> Image.Image:
    """timm RandAugment: n random ops (prob 0.5 each), magnitude ~ N(m, mstd) clipped to [0, 10]."""
    for name in rng.choice(RANDAUGMENT_OPS, size=n):
        if rng.random() > 0.5:
            continue
        mag = float(np.clip(rng.normal(m, mstd) if mstd > 0 else m, 0.0, 10.0))
        img = _op(str(name), img, mag, rng)
    return img


def train_transform(image: np.ndarray, rng: np.random.Generator, size: int, aug) -> np.ndarray:
    """Host-side training transform of one uint8 HWC image -> uint8 (size, size, 3).

    Args:
      image: uint8 HWC.
      rng: this example's generator.
      size: output side.
      aug: an `AugmentConfig`.
    """
    img = random_resized_crop(to_pil(image), size, rng, aug.rrc_scale, aug.rrc_ratio)
    if aug.hflip > 0 and rng.random() < aug.hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.randaugment_m > 0 and aug.randaugment_n > 0:
        img = rand_augment(img, rng, aug.randaugment_n, aug.randaugment_m, aug.randaugment_mstd)
    return np.asarray(img, dtype=np.uint8)


def eval_transform(image: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """Host-side eval transform -> uint8 (size, size, 3)."""
    # No shortcut for size x size inputs: with crop_pct < 1 they are zoomed in too (as timm).
    return np.asarray(resize_center_crop(to_pil(image), size, crop_pct), dtype=np.uint8)


# --- Device-side batch augmentations (inside jit).


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> normalised float NHWC."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def one_hot_smooth(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Smoothed one-hot targets (timm: off = smoothing / C, on = 1 - smoothing + off)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixup_cutmix(
    key: jax.Array, x: jax.Array, targets: jax.Array, mixup: float, cutmix: float, switch: float
) -> tuple[jax.Array, jax.Array]:
    """timm batch-mode Mixup/CutMix: pair each image with the batch reversed, one lambda per batch.

    Args:
      key: PRNG key for this step.
      x: float NHWC images (the global batch).
      targets: [N, C] soft targets.
      mixup, cutmix: Beta alphas (0 disables).
      switch: probability of cutmix when both are enabled.

    Returns:
      Mixed images and targets.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, targets
    k_sw, k_mix, k_cut, k_box = jax.random.split(key, 4)
    n, h, w, _ = x.shape
    if mixup > 0 and cutmix > 0:
        use_cut = jax.random.uniform(k_sw) < switch
    else:
        use_cut = jnp.asarray(cutmix > 0)
    lam_mix = jax.random.beta(k_mix, mixup, mixup) if mixup > 0 else jnp.float32(1.0)
    lam_cut = jax.random.beta(k_cut, cutmix, cutmix) if cutmix > 0 else jnp.float32(1.0)
    # CutMix box with area (1 - lam), centre uniform, clipped to the image (lam then corrected).
    cut_ratio = jnp.sqrt(1.0 - lam_cut)
    ch, cw = (h * cut_ratio).astype(jnp.int32), (w * cut_ratio).astype(jnp.int32)
    cy = jax.random.randint(k_box, (), 0, h)
    cx = jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
    flipped = x[::-1]
    x_cut = jnp.where(box, flipped, x)
    x_mix = x * lam_mix.astype(x.dtype) + flipped * (1 - lam_mix).astype(x.dtype)
    lam = jnp.where(use_cut, lam_cut, lam_mix)
    x = jnp.where(use_cut, x_cut, x_mix)
    targets = targets * lam + targets[::-1] * (1.0 - lam)
    return x, targets


def random_erasing(key: jax.Array, x: jax.Array, prob: float) -> jax.Array:
    """timm RandomErasing(mode='pixel', count 1): a box of 2-33% area, aspect in [0.3, 3.3],
    filled with N(0, 1) noise (images are already normalised), per image with probability prob.
    """
    if prob <= 0:
        return x
    n, h, w, c = x.shape
    k_on, k_area, k_ar, k_y, k_x, k_fill = jax.random.split(key, 6)
    on = jax.random.uniform(k_on, (n,)) < prob
    area = jax.random.uniform(k_area, (n,), minval=0.02, maxval=1 / 3) * h * w
    ar = jnp.exp(jax.random.uniform(k_ar, (n,), minval=math.log(0.3), maxval=math.log(1 / 0.3)))
    eh = jnp.clip(jnp.round(jnp.sqrt(area * ar)), 1, h).astype(jnp.int32)
    ew = jnp.clip(jnp.round(jnp.sqrt(area / ar)), 1, w).astype(jnp.int32)
    y0 = (jax.random.uniform(k_y, (n,)) * (h - eh + 1)).astype(jnp.int32)
    x0 = (jax.random.uniform(k_x, (n,)) * (w - ew + 1)).astype(jnp.int32)
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    box = (
        (ys >= y0[:, None, None])
        & (ys < (y0 + eh)[:, None, None])
        & (xs >= x0[:, None, None])
        & (xs < (x0 + ew)[:, None, None])
        & on[:, None, None]
    )
    noise = jax.random.normal(k_fill, x.shape, x.dtype)
    return jnp.where(box[..., None], noise, x)
