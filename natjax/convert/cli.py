"""`natjax convert`, `natjax export` and `natjax predict` subcommands.

natjax convert SRC DST [--config C]        any supported checkpoint -> natjax checkpoint
natjax export SRC DST --format hf          -> config.json + model.safetensors (HF layout)
natjax export SRC DST --format original    -> config.json + original.pth (SHI-Labs layout)
natjax predict --model DIR IMAGE...        top-5 classes per image
"""

from __future__ import annotations

import argparse

from natjax.convert.checkpoint import (
    ARCHITECTURES,
    EXPORT_FORMATS,
    export_pretrained,
    model_architecture,
    save_pretrained,
)
from natjax.convert.loading import from_pretrained


def _add_source(p: argparse.ArgumentParser, name: str = "src") -> None:
    p.add_argument(
        name,
        **({"required": True} if name.startswith("-") else {}),
        help="checkpoint folder (Hugging Face or natjax) or weights file "
        "(.safetensors/.bin/.pth; single files need --config)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="NatConfig preset name (e.g. nat_mini) or config.json path; overrides the folder's",
    )
    p.add_argument(
        "--architecture",
        choices=sorted(ARCHITECTURES),
        default=None,
        help="model head (default: from config.json, else from the weights)",
    )
    p.add_argument(
        "--state-dict-key",
        default=None,
        help="key holding the weights in a nested torch checkpoint (default: auto, e.g. 'model')",
    )


def _load(args, source: str):
    kwargs = {}
    if getattr(args, "attention", None):
        kwargs["attention_implementation"] = args.attention
    return from_pretrained(
        source,
        config=args.config,
        architecture=args.architecture,
        state_dict_key=args.state_dict_key,
        **kwargs,
    )


def _convert(args) -> int:
    model = _load(args, args.src)
    out = save_pretrained(model, args.dst)
    print(f"wrote natjax checkpoint {out} ({model_architecture(model)}, {model.config.describe()})")
    return 0


def _export(args) -> int:
    model = _load(args, args.src)
    out = export_pretrained(model, args.dst, format=args.format)
    print(f"wrote {args.format} export {out} ({model_architecture(model)})")
    return 0


def _predict(args) -> int:
    # Imported here: loading images needs PIL and jit, which convert/export do not.
    import numpy as np

    from natjax.predict import predict, preprocess

    images = np.stack([preprocess(path, size=args.size) for path in args.images])
    model = _load(args, args.model)
    for path, top in zip(args.images, predict(model, images, args.top_k), strict=True):
        print(path)
        for rank, p in enumerate(top, 1):
            print(f"  {rank}. {p.probability:.4f}  {p.label} ({p.index})")
    return 0


def register(sub) -> None:
    """Add the convert/export/predict subcommands to the `natjax` parser."""
    p = sub.add_parser("convert", help="convert a checkpoint (HF, torch, original) to natjax")
    _add_source(p)
    p.add_argument("dst", help="output folder for the natjax checkpoint")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="export a checkpoint to the Hugging Face/original layout")
    _add_source(p)
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="hf", help="target layout")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="top-k ImageNet-style classification of image files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_source(p, "--model")
    p.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image")
    p.add_argument(
        "--attention",
        choices=("xla", "reference", "pallas"),
        default=None,
        help="neighborhood-attention implementation (default: fastest available)",
    )
    p.set_defaults(func=_predict)
