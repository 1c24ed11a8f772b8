"""Image classification with a pretrained NAT/DiNAT: top-k classes, and `natjax predict`.

    natjax predict --model SRC IMAGE...      top-5 classes per image

`SRC` is anything `natjax.from_pretrained` takes (a folder, a weights file with `--config`, a
hub id). Images go through the checkpoint's own eval transform (`natjax.preprocess`: its
`preprocessor_config.json`, else timm's ImageNet transform at `--size`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from natjax.convert.loading import from_pretrained
from natjax.models.labels import label_name
from natjax.models.preprocessing import PreprocessConfig, preprocess, resolve


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes of an image."""

    index: int
    label: str
    probability: float


@nnx.jit
def _probabilities(model: nnx.Module, images: jax.Array) -> jax.Array:
    logits = model(images).logits
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def predict(model: nnx.Module, images: Any, top_k: int = 5) -> list[list[Prediction]]:
    """Top-k classes of images.

    Args:
      model: a `NatForImageClassification` with a classifier head.
      images: preprocessed float `[B, H, W, 3]`, or raw images (paths, PIL images, uint8
        arrays, lists of them), which go through `natjax.preprocess(images, model)` first.
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
    array = images if hasattr(images, "dtype") else None
    if array is None or not jnp.issubdtype(array.dtype, jnp.floating) or array.ndim != 4:
        images = preprocess(images, model)
    probs = np.asarray(_probabilities(model, jnp.asarray(images)))
    k = min(top_k, probs.shape[-1])
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        results.append(
            [Prediction(int(i), label_name(config, int(i)), float(row[i])) for i in order]
        )
    return results


# ----------------------------------------------------------------------------------------- CLI
def _run(args) -> int:
    kwargs = {"attention_implementation": args.attention} if args.attention else {}
    model = from_pretrained(args.model, config=args.config, revision=args.revision, **kwargs)
    settings = resolve(model)
    if args.size is not None:  # an explicit size replaces the checkpoint's
        settings = PreprocessConfig(
            size=args.size, crop_pct=settings.crop_pct, resize=settings.resize,
            interpolation=settings.interpolation, mean=settings.mean, std=settings.std,
        )  # fmt: skip
    images = preprocess(list(args.images), settings)
    for path, top in zip(args.images, predict(model, images, args.top_k), strict=True):
        print(path)
        for rank, p in enumerate(top, 1):
            print(f"  {rank}. {p.probability:.4f}  {p.label} ({p.index})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `predict` subcommand to the `natjax` parser."""
    p = sub.add_parser("predict", help="top-k ImageNet-style classification of image files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint folder, weights file (with --config) or Hugging Face hub id",
    )
    p.add_argument("--config", default=None, help="preset name or config.json path")
    p.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="crop size (default: the checkpoint's preprocessing, else 224)",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image")
    p.add_argument(
        "--attention",
        choices=("xla", "reference", "pallas"),
        default=None,
        help="neighborhood-attention implementation (default: fastest available)",
    )
    p.set_defaults(func=_run)
