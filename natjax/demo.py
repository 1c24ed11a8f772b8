"""`natjax demo`: the README's main job on an offline default.

Until the training tool exists this runs the neighborhood-attention benchmark on small shapes.
"""

from __future__ import annotations

import runpy
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on an offline default")
    p.set_defaults(func=run)


def run(args) -> int:
    script = Path(__file__).resolve().parent.parent / "experiments" / "bench_na.py"
    runpy.run_path(str(script), run_name="__main__")
    return 0
