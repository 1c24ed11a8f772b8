"""Evaluation preprocessing of a checkpoint: raw images -> normalised model inputs.

A `PreprocessConfig` holds a checkpoint's pretrained input settings, as timm's pretrained config
does (size, crop_pct, interpolation, mean, std): read from a Hugging Face
`preprocessor_config.json` when the checkpoint has one, otherwise timm's ImageNet eval transform
(resize the shorter side to `size / crop_pct` bicubic, centre crop `size`, ImageNet mean/std),
which is NAT/DiNAT's (crop_pct 0.875). `preprocess` applies it to paths, PIL images and
numpy/JAX arrays; `natjax predict`, evaluation and training's eval split all use
`resize_and_crop` from here.

Bounded work (issue 10 sec. 4): the crop is located in the source image first and only that
region is resampled (PIL `resize(box=...)` per axis, which reads filter support from the whole
image, so the pixels equal resize-then-crop to one level of rounding), so an 8000x1 image never
becomes a 2-million-pixel-wide intermediate; files are refused before decoding above
`max_pixels` (default `MAX_PIXELS`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from natjax.models.json_file import read_json_object

PREPROCESSOR_NAME = "preprocessor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
# Largest decoded image (width x height) accepted: 64 Mpx, 192 MB as RGB uint8.
MAX_PIXELS = 1 << 26
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_PIL_NAMES = {int(v): k for k, v in INTERPOLATIONS.items()}


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """A checkpoint's eval transform.

    Attributes:
      size: output `(height, width)`.
      crop_pct: with `resize="shorter"`, the shorter side is first resized to
        `floor(min(size) / crop_pct)` and the centre `size` cropped (timm); 1.0: no margin.
      resize: "shorter" (keep the aspect ratio, then centre crop) or "exact" (resize straight to
        `size`, as Hugging Face's ViT image processor; no crop).
      interpolation: one of `INTERPOLATIONS`.
      mean, std: per-channel normalisation after scaling to [0, 1].
    """

    size: tuple[int, int] = (224, 224)
    crop_pct: float = DEFAULT_CROP_PCT
    resize: str = "shorter"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"PreprocessConfig: size={self.size!r}; expected an int > 0 or two")
        object.__setattr__(self, "size", size)
        if not isinstance(self.crop_pct, int | float) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"PreprocessConfig: crop_pct={self.crop_pct!r}; expected (0, 1]")
        if self.resize not in ("shorter", "exact"):
            raise ValueError(f"PreprocessConfig: resize={self.resize!r}; expected shorter/exact")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"PreprocessConfig: interpolation={self.interpolation!r}; expected one of "
                f"{sorted(INTERPOLATIONS)}"
            )
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"PreprocessConfig: {name}={value!r}; expected 3 finite numbers")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"PreprocessConfig: std={self.std!r}; expected values > 0")

    @classmethod
    def timm(cls, size: int = 224, crop_pct: float = DEFAULT_CROP_PCT) -> PreprocessConfig:
        """timm's ImageNet eval transform (NAT/DiNAT's)."""
        return cls(size=(size, size), crop_pct=crop_pct)

    @classmethod
    def from_hf(
        cls, data: Mapping[str, Any], where: str = "preprocessor_config"
    ) -> PreprocessConfig:
        """From a Hugging Face image processor config (`preprocessor_config.json`).

        Understands `size` (int, `{"shortest_edge"}` or `{"height", "width"}`), `crop_size`,
        `crop_pct`, `do_center_crop`, `resample` (PIL code), `image_mean`, `image_std`. Resizing
        without a crop (ViT processors) becomes `resize="exact"`.
        """

        def hw(value, field) -> tuple[int, int] | int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, Mapping):
                if "height" in value and "width" in value:
                    return (int(value["height"]), int(value["width"]))
                if "shortest_edge" in value:
                    return int(value["shortest_edge"])
            raise ValueError(f"{where}: `{field}`={value!r} is not a size this reader understands")

        try:
            size = hw(data.get("size", 224), "size")
            crop = data.get("crop_size")
            crop_pct = data.get("crop_pct")
            resample = int(data.get("resample", Image.Resampling.BICUBIC))
            kwargs: dict[str, Any] = dict(
                interpolation=_PIL_NAMES.get(resample, "bicubic"),
                mean=tuple(data.get("image_mean", IMAGENET_MEAN)),
                std=tuple(data.get("image_std", IMAGENET_STD)),
            )
            if crop_pct is not None:  # timm-style: size is the crop, resized from size / crop_pct
                side = size if isinstance(size, int) else min(size)
                return cls(size=(side, side), crop_pct=float(crop_pct), **kwargs)
            if data.get("do_center_crop") and crop is not None:
                crop = hw(crop, "crop_size")
                crop = (crop, crop) if isinstance(crop, int) else crop
                short = size if isinstance(size, int) else min(size)
                return cls(size=crop, crop_pct=min(1.0, min(crop) / short), **kwargs)
            size = (size, size) if isinstance(size, int) else size
            return cls(size=size, crop_pct=1.0, resize="exact", **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: invalid image processor config ({err})") from None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> PreprocessConfig | None:
        """The config of `folder/preprocessor_config.json`, None when there is none."""
        path = Path(folder) / PREPROCESSOR_NAME
        if not path.is_file():
            return None
        try:
            data = read_json_object(path)  # bounded: a hostile folder gets one ValueError
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return cls.from_hf(data, str(path))

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face `preprocessor_config.json` dict describing this transform."""
        resample = int(INTERPOLATIONS[self.interpolation])
        common = dict(
            do_normalize=True,
            do_rescale=True,
            rescale_factor=1 / 255,
            image_mean=list(self.mean),
            image_std=list(self.std),
            resample=resample,
        )
        if self.resize == "exact":
            size = {"height": self.size[0], "width": self.size[1]}
            return dict(image_processor_type="ViTImageProcessor", do_resize=True, size=size,
                        **common)  # fmt: skip
        # crop_pct with shortest_edge: resize to size / crop_pct, then crop (timm's transform).
        return dict(
            image_processor_type="ConvNextImageProcessor",
            do_resize=True,
            size={"shortest_edge": min(self.size)},
            crop_pct=self.crop_pct,
            **common,
        )


def resize_and_crop(img: Image.Image, config: PreprocessConfig) -> Image.Image:
    """The geometric part of the eval transform on an RGB (or "F") PIL image.

    "shorter": torchvision rounding, as timm's eval pipeline (`Resize(int)` truncates the longer
    side, `CenterCrop` rounds the offsets); the crop box is mapped back to source pixels and only
    it is resampled, so the cost is that of the output, whatever the aspect ratio.
    """
    resample = INTERPOLATIONS[config.interpolation]
    out_h, out_w = config.size
    w, h = img.size
    if config.resize == "exact":
        return img.resize((out_w, out_h), resample)
    short = int(math.floor(min(config.size) / config.crop_pct))
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    top, left = int(round((nh - out_h) / 2.0)), int(round((nw - out_w) / 2.0))
    sx, sy = w / nw, h / nh
    # One axis at a time, as PIL's full resize does (horizontal, then vertical): Pillow 13's
    # two-axis `box` resample differs from resize-then-crop by up to 19 levels on upscaled
    # axes, while each 1-D pass matches it to one level of uint8 rounding (tested).
    img = img.resize((out_w, h), resample, box=(left * sx, 0, (left + out_w) * sx, h))
    return img.resize((out_w, out_h), resample, box=(0, top * sy, out_w, (top + out_h) * sy))


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file as RGB, refusing more than `max_pixels` before decoding.

    Raises:
      FileNotFoundError: no such file.
      ValueError: unreadable, or larger than `max_pixels` (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise ValueError(
                    f"{path}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}; pass a "
                    "larger max_pixels if this image is intended"
                )
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None


def _array_to_image(x: np.ndarray) -> Image.Image | list[Image.Image]:
    """HWC/CHW/HW uint8 or [0, 1] float -> RGB PIL image (uint8) or per-channel "F" images."""
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.moveaxis(x, 0, -1)  # CHW -> HWC
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"preprocess: an image array must be [H, W], [H, W, 1|3] or [1|3, H, W], got shape "
            f"{x.shape}"
        )
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(x), "RGB")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"preprocess: image arrays must be uint8 or float, got {x.dtype}")
    x = x.astype(np.float32)
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
        raise ValueError(
            f"preprocess: float images must hold values in [0, 1], got [{lo}, {hi}] (pass "
            "uint8 arrays for 0..255 data)"
        )
    return [Image.fromarray(np.ascontiguousarray(x[..., c]), "F") for c in range(3)]


def _one(item: Any, config: PreprocessConfig, max_pixels: int) -> np.ndarray:
    """One image -> [0, 1] float32 HWC after the geometric transform."""
    if isinstance(item, str | os.PathLike):
        item = open_image(item, max_pixels)
    if isinstance(item, Image.Image):
        if item.width * item.height > max_pixels:
            raise ValueError(f"preprocess: {item.width}x{item.height} image exceeds max_pixels")
        img = resize_and_crop(item.convert("RGB"), config)
        return np.asarray(img, np.float32) / 255.0
    planes = _array_to_image(item)
    if isinstance(planes, Image.Image):
        return np.asarray(resize_and_crop(planes, config), np.float32) / 255.0
    out = np.stack([np.asarray(resize_and_crop(p, config), np.float32) for p in planes], -1)
    return np.clip(out, 0.0, 1.0)  # bicubic overshoot, as uint8 saturation would clip


def _items(images: Any) -> list[Any]:
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    array = np.asarray(images)  # numpy or JAX
    if array.ndim == 4:
        return list(array)
    return [array]


def preprocess(
    images: Any,
    config: PreprocessConfig | Any = None,
    *,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Apply a checkpoint's eval transform to raw images.

    Args:
      images: an image path, a PIL image, a numpy/JAX array (`[H, W, C]`, `[C, H, W]`,
        `[H, W]`, or a batch `[B, ...]` of those; uint8 0..255 or float [0, 1]), or a list of
        any of these.
      config: a `PreprocessConfig`; a model (its `preprocessing` from `from_pretrained`, else
        timm's default at `config.image_size`); a checkpoint folder (its
        `preprocessor_config.json`); or None for timm's ImageNet eval transform at 224.
      max_pixels: largest decoded image accepted.

    Returns:
      float32 `[B, height, width, 3]`, normalised, channels-last (what the models take).

    Raises:
      FileNotFoundError / ValueError: missing or unreadable files, bad shapes, dtypes or ranges.
    """
    cfg = resolve(config)
    batch = [_one(item, cfg, max_pixels) for item in _items(images)]
    if not batch:
        raise ValueError("preprocess: no images given")
    x = np.stack(batch)
    return ((x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)).astype(
        np.float32
    )


def resolve(config: Any) -> PreprocessConfig:
    """The `PreprocessConfig` meant by `config` (see `preprocess`)."""
    if config is None:
        return PreprocessConfig.timm()
    if isinstance(config, PreprocessConfig):
        return config
    if isinstance(config, str | os.PathLike):
        found = PreprocessConfig.from_folder(config) if Path(config).is_dir() else None
        return found or PreprocessConfig.timm()
    found = getattr(config, "preprocessing", None)
    if isinstance(found, PreprocessConfig):
        return found
    model_config = getattr(config, "config", None)
    size = getattr(model_config, "image_size", None)
    if hasattr(model_config, "num_channels"):
        return PreprocessConfig.timm(size if isinstance(size, int) and size > 0 else 224)
    raise ValueError(
        f"preprocess: config={type(config).__name__}; expected a PreprocessConfig, a model, a "
        "checkpoint folder or None"
    )
