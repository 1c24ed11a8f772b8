"""Model construction time against depth (issue 10 section 2: it used to grow quadratically).

  python experiments/bench_build.py --depths 10 20 40 80 --repeats 3

Builds `NatForImageClassification` with one stage of N layers (embed 16, kernel 3) under
`nnx.eval_shape` (what training and conversion do before allocating anything) and prints the
median seconds per depth, for natjax's `InitKeys` and, as the baseline measured in the same run,
the caller's `nnx.Rngs` passed straight to every layer (the code before the fix).
"""

from __future__ import annotations

import argparse
import statistics
import time

from flax import nnx

from natjax.models import NatConfig, NatForImageClassification
from natjax.models import nat as nat_lib


def build_seconds(depth: int, repeats: int) -> float:
    cfg = NatConfig(embed_dim=16, depths=(depth,), num_heads=(1,), kernel_size=3, num_labels=10)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        nnx.eval_shape(lambda: NatForImageClassification(cfg, rngs=nnx.Rngs(0)))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-baseline-above", type=int, default=80)
    args = p.parse_args()
    build_seconds(1, 1)  # warm-up: imports, first traces
    fixed = nat_lib._init_keys
    print("depth | InitKeys s | nnx.Rngs baseline s | ratio")
    for depth in args.depths:
        new = build_seconds(depth, args.repeats)
        old = float("nan")
        if depth <= args.skip_baseline_above:
            nat_lib._init_keys = lambda rngs: rngs  # the pre-fix behaviour
            try:
                old = build_seconds(depth, args.repeats)
            finally:
                nat_lib._init_keys = fixed
        print(f"{depth:5d} | {new:10.2f} | {old:19.2f} | {old / new:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
