"""`natjax demo`: the README's main job on an offline default.

Trains a small NAT on the handwritten digits that scikit-learn ships (no network), evaluating,
checkpointing and plotting as it goes; the same run as `natjax train` with no arguments.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a small NAT on bundled digits (offline default run)")
    p.add_argument("--workdir", default="runs/digits", help="checkpoints, metrics and plots")
    p.set_defaults(func=run)


def run(args) -> int:
    from natjax.train.cli import run_default

    return run_default(workdir=args.workdir)
