"""Image classification with a pretrained NAT/DiNAT: ImageNet-style preprocessing and top-k.

Preprocessing follows the evaluation transform of the NAT/DiNAT papers (timm's, with
`crop_pct=0.875`): resize the shorter side to `size / crop_pct` with bicubic interpolation, centre
crop `size x size`, scale to [0, 1] and normalise with the ImageNet mean/std.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

from natjax.models.labels import label_name
from natjax.train.augment import resize_center_crop
from natjax.train.config import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes of an image."""

    index: int
    label: str
    probability: float


def preprocess(
    path: str | os.PathLike, size: int = 224, crop_pct: float = DEFAULT_CROP_PCT
) -> np.ndarray:
    """Load an image file as a normalised `[size, size, 3]` float32 array (channels last).

    Args:
      path: any image PIL can read (converted to RGB).
      size: output side length.
      crop_pct: the shorter side is first resized to `int(size / crop_pct)`.

    Returns:
      The normalised image.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not a readable image, or `size`/`crop_pct` are invalid.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size={size!r}; expected a positive int")
    if not isinstance(crop_pct, int | float) or not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct!r}; expected a number in (0, 1]")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None
    # The same resize + centre crop as training's evaluation (torchvision rounding, bicubic).
    img = resize_center_crop(img, size, crop_pct)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


@nnx.jit
def _probabilities(model: nnx.Module, images: jax.Array) -> jax.Array:
    logits = model(images).logits
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def predict(model: nnx.Module, images: np.ndarray, top_k: int = 5) -> list[list[Prediction]]:
    """Top-k classes of a batch of preprocessed images.

    Args:
      model: a `NatForImageClassification` with a classifier head.
      images: `[B, H, W, 3]` from `preprocess`.
      top_k: classes per image (at most `num_labels`).

    Returns:
      For each image, `top_k` predictions sorted by decreasing probability; labels come from
      `config.id2label`, else ImageNet-1k's names for 1000 classes, else "LABEL_<i>".
    """
    config = model.config
    if type(model).__name__ != "NatForImageClassification" or config.num_labels <= 0:
        raise ValueError(
            f"predict needs a classification model with a head, got {type(model).__name__} "
            f"with num_labels={config.num_labels}"
        )
    if not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k={top_k!r}; expected a positive int")
    probs = np.asarray(_probabilities(model, jnp.asarray(images)))
    k = min(top_k, probs.shape[-1])
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        results.append(
            [Prediction(int(i), label_name(config, int(i)), float(row[i])) for i in order]
        )
    return results
