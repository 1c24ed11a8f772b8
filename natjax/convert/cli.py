"""`natjax convert` and `natjax export` subcommands (`natjax predict` lives in natjax.predict).

natjax convert SRC DST [--config C]        any supported checkpoint -> natjax checkpoint
natjax export SRC DST --format hf          -> config.json + model.safetensors (HF layout)
natjax export SRC DST --format original    -> config.json + original.pth (SHI-Labs layout)
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
    return from_pretrained(
        source,
        config=args.config,
        architecture=args.architecture,
        state_dict_key=args.state_dict_key,
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


def register(sub) -> None:
    """Add the convert/export subcommands to the `natjax` parser."""
    p = sub.add_parser("convert", help="convert a checkpoint (HF, torch, original) to natjax")
    _add_source(p)
    p.add_argument("dst", help="output folder for the natjax checkpoint")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="export a checkpoint to the Hugging Face/original layout")
    _add_source(p)
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="hf", help="target layout")
    p.set_defaults(func=_export)
